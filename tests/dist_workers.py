"""Distributed scenarios for test_distributed.py, each run as ``python dist_workers.py NAME
WORLD DIR``: WORLD processes on the gloo backend (CPU), every rank asserting on its own.

* ddp:        DDP training with fusedopt equals training with the torch.optim twin.
* fsdp:       FSDP2 (fully_shard, DTensor params on a CPU mesh): the optimizer updates
              the local shards and equals torch.optim on the same sharding.
* ddp_flat:   the same with flat=True and zero_grad(set_to_none=False) (the grads stay the
              buffer's aliases), with and without DDP's gradient_as_bucket_view.
* fsdp_flat:  flat=True with DTensor params is refused with a clear RuntimeError.
* dcp_save:   FSDP2 training, a torch.distributed.checkpoint save after 3 steps, then 3
              more steps whose params are written to DIR as the expected continuation.
* dcp_load:   fresh processes (any WORLD): load the checkpoint, take the same 3 steps
              on the same global batches, compare with what dcp_save wrote.
"""
import importlib
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS, DIM, BATCH = 3, 16, 8


def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM, 32), torch.nn.Tanh(), torch.nn.Linear(32, 5))


def batch(step, rank, world):
    """This rank's slice of the global batch of ``step`` (the same global batch for any world)."""
    x = torch.randn(2 * BATCH, DIM, generator=torch.Generator().manual_seed(100 + step))
    per = x.shape[0] // world
    return x[rank * per:(rank + 1) * per]


def train(m, opt, steps, rank, world, first=0):
    for s in range(first, first + steps):
        opt.zero_grad()
        m(batch(s, rank, world)).pow(2).mean().backward()
        opt.step()


def shard(m, mesh):
    from torch.distributed.fsdp import fully_shard
    for layer in m:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(m, mesh=mesh)


def full(m):
    """The whole params, gathered (DTensor) or as they are."""
    return [p.full_tensor() if hasattr(p, "full_tensor") else p.detach().clone()
            for p in m.parameters()]


def assert_close(xs, ys, what):
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6, msg=lambda m: f"{what}: {m}")


def pair(build, name="AdamW", **hp):
    """The same model twice: one trained by fusedopt.NAME, one by torch.optim.NAME."""
    import fusedopt
    hp = hp or dict(lr=0.01, weight_decay=0.1)
    ours, theirs = build(), build()
    return ((ours, getattr(fusedopt, name)(ours.parameters(), **hp)),
            (theirs, getattr(fusedopt, name).twin()(theirs.parameters(), foreach=False, **hp)))


def ddp(rank, world, mesh, out):
    from torch.nn.parallel import DistributedDataParallel as DDP
    (m, o), (t, to) = pair(lambda: DDP(model()))
    for s in range(STEPS):
        train(m, o, 1, rank, world, s)
        train(t, to, 1, rank, world, s)
        assert_close(full(m), full(t), f"ddp step {s}")


def ddp_flat(rank, world, mesh, out):
    from torch.nn.parallel import DistributedDataParallel as DDP
    import fusedopt
    for view in (False, True):
        m, t = DDP(model(), gradient_as_bucket_view=view), DDP(model(), gradient_as_bucket_view=view)
        o = fusedopt.AdamW(m.parameters(), lr=0.01, weight_decay=0.1, flat=True)
        to = torch.optim.AdamW(t.parameters(), lr=0.01, weight_decay=0.1, foreach=False)
        for s in range(STEPS + 2):
            for mm, oo in ((m, o), (t, to)):
                oo.zero_grad(set_to_none=False)
                mm(batch(s, rank, world)).pow(2).mean().backward()
                oo.step()
            assert_close(full(m), full(t), f"ddp flat (bucket view {view}) step {s}")
        (plan,) = o._plans.values()
        assert plan.buckets[0][1].buffers is not None


def fsdp_flat(rank, world, mesh, out):
    import fusedopt
    m = shard(model(), mesh)
    o = fusedopt.AdamW(m.parameters(), lr=0.01, flat=True)
    m(batch(0, rank, world)).pow(2).mean().backward()
    try:
        o.step()
    except RuntimeError as e:
        assert "flat=True does not take DTensor" in str(e), e
    else:
        raise AssertionError("flat=True with DTensor params stepped")


def fsdp(rank, world, mesh, out):
    runs = {"adamw": pair(lambda: shard(model(), mesh)),
            "sgd": pair(lambda: shard(model(), mesh), "SGD", lr=0.1, momentum=0.9, nesterov=True)}
    for s in range(STEPS):
        for what, ((m, o), (t, to)) in runs.items():
            assert all(type(p).__name__ == "DTensor" for p in m.parameters())
            train(m, o, 1, rank, world, s)
            train(t, to, 1, rank, world, s)
            assert_close([p.to_local() for p in m.parameters()],
                         [p.to_local() for p in t.parameters()], f"fsdp {what} step {s}")
    # one engine call per step updates every local shard: one plan, one bucket
    (plan,) = runs["adamw"][0][1]._plans.values()
    assert len(plan.buckets) == 1 and len(plan.buckets[0][1].params) == 4


def _dcp_setup(mesh):
    import fusedopt
    m = shard(model(), mesh)
    return m, fusedopt.Adam(m.parameters(), lr=0.01, amsgrad=True)


def _states(m, o):
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         get_optimizer_state_dict)
    return {"model": get_model_state_dict(m), "optim": get_optimizer_state_dict(m, o)}


def dcp_save(rank, world, mesh, out):
    import torch.distributed.checkpoint as dcp
    m, o = _dcp_setup(mesh)
    train(m, o, STEPS, rank, world)
    dcp.save(_states(m, o), checkpoint_id=os.path.join(out, "ckpt"))
    train(m, o, STEPS, rank, world, STEPS)
    expect = full(m)
    if rank == 0:
        torch.save(expect, os.path.join(out, "expect.pt"))


def dcp_load(rank, world, mesh, out):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)
    m, o = _dcp_setup(mesh)
    sd = _states(m, o)  # the layout to load into: this world's sharding
    dcp.load(sd, checkpoint_id=os.path.join(out, "ckpt"))
    set_model_state_dict(m, sd["model"])
    set_optimizer_state_dict(m, o, sd["optim"])
    steps = {float(st["step"]) for st in o.state.values()}
    assert steps == {float(STEPS)}, steps
    train(m, o, STEPS, rank, world, STEPS)
    assert_close(full(m), torch.load(os.path.join(out, "expect.pt")), "dcp continuation")


def _worker(rank, world, port, name, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        module, _, fn = name.rpartition(":")  # "dist_clip:name": another file's scenario
        scenarios = vars(importlib.import_module(module)) if module else globals()
        scenarios[fn](rank, world, init_device_mesh("cpu", (world,)), out)
        # no rank tears its gloo pairs down while another still uses them (rank 0 writing
        # the expectation after dcp_save): a peer's closed connection in gloo's background
        # thread aborted a rank once ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(name, world, out):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.set_num_threads(1)
    mp.spawn(_worker, args=(world, port, name, out), nprocs=world)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
