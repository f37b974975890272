"""Distributed scenarios for test_distributed.py, each run as ``python dist_workers.py NAME
WORLD DIR``: WORLD processes on the gloo backend (CPU), every rank asserting on its own.

* ddp:        DDP training with fusedopt equals training with the torch.optim twin.
* fsdp:       FSDP2 (fully_shard, DTensor params on a CPU mesh): the optimizer updates
              the local shards and equals torch.optim on the same sharding.
* fsdp_adafactor: Adafactor's factors and param RMS are sums over a whole param: its
              DTensor params go to torch's own step, whose outcome (torch 2.13: a
              RuntimeError from DTensor's sharding propagation) fusedopt's is.
* ddp_flat:   the same with flat=True and zero_grad(set_to_none=False) (the grads stay the
              buffer's aliases), with and without DDP's gradient_as_bucket_view.
* fsdp_flat:  flat=True with DTensor params is refused with a clear RuntimeError.
* dcp_save:   FSDP2 training, a torch.distributed.checkpoint save after 3 steps, then 3
              more steps whose params are written to DIR as the expected continuation.
* dcp_load:   fresh processes (any WORLD): load the checkpoint, take the same 3 steps
              on the same global batches, compare with what dcp_save wrote.
* fsdp_8bit:  8-bit AdamW state under FSDP2: codes and absmax are DTensors on the
              param's mesh (float32 state where rows are not whole blocks), <= 2.2 bytes
              of state per param per shard, the final loss within 2 % of a single-process
              8-bit run; dequantized / re-quantized shard by shard as the whole tensor;
              a DCP save, then fresh model and optimizer loading it continue bit for bit.
* dcp_load_8bit: fresh processes of another WORLD load fsdp_8bit's checkpoint: codes and
              absmax resharded bit for bit, the continuation close to the saved run's.
"""
import functools
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


def fsdp_adafactor(rank, world, mesh, out):
    (m, o), (t, to) = pair(lambda: shard(model(), mesh), "Adafactor", lr=0.01)
    outcome = []
    for mm, oo in ((m, o), (t, to)):
        mm(batch(0, rank, world)).pow(2).mean().backward()
        try:
            oo.step()
            outcome.append(None)
        except RuntimeError as e:
            outcome.append(str(e).splitlines()[0])
    assert outcome[0] == outcome[1], outcome
    if outcome[0] is None:  # a torch that steps it: the same params
        assert_close([p.to_local() for p in m.parameters()],
                     [p.to_local() for p in t.parameters()], "fsdp adafactor")


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


STEPS8, SAVE8 = 12, 9  # fsdp_8bit: steps in all, and the step after which it saves


def model8():
    """Mostly 8-bit: three weights of rows of whole blocks (the third, 17 rows, sharded
    unevenly), one of rows of 17 (float32 state, as the biases, under MIN_NUMEL)."""
    torch.manual_seed(0)
    L = torch.nn.Linear
    return torch.nn.Sequential(L(256, 512), torch.nn.Tanh(), L(512, 256), torch.nn.Tanh(),
                               L(256, 17), torch.nn.Tanh(), L(17, 256))


@functools.cache
def teacher():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(256, 16), torch.nn.Tanh(), torch.nn.Linear(16, 256))
    return net.requires_grad_(False)


def batch8(step, rank=0, world=1):
    """This rank's slice of step's global batch (inputs, a teacher's outputs): the same
    for 1 to 4 ranks."""
    x = torch.randn(12, 256, generator=torch.Generator().manual_seed(200 + step))
    per = x.shape[0] // world
    x = x[rank * per:(rank + 1) * per]
    return x, teacher()(x) * 3


def train8(m, opt, first, last, rank=0, world=1):
    for s in range(first, last):
        opt.zero_grad()
        x, y = batch8(s, rank, world)
        (m(x) - y).pow(2).mean().backward()
        opt.step()


def adamw8(m):
    import fusedopt
    return fusedopt.AdamW(m.parameters(), lr=1e-3, weight_decay=0.01, state_dtype=torch.uint8)


def eval8(m):
    """The loss on a held-out batch, from the gathered params (the same on every rank)."""
    x, y = batch8(1000)
    net = model8()
    params = dict(zip([n for n, _ in net.named_parameters()], full(m)))
    return torch.func.functional_call(net, params, (x,)).sub(y).pow(2).mean().item()


def check_8bit_layout(m, o):
    """Every state tensor a DTensor on its param's mesh, laid like it: 8-bit codes and an
    absmax of (rows, blocks per row) where rows are whole blocks, float32 elsewhere.
    Returns the bytes of state per param on this rank."""
    from fusedopt import quant
    nbytes = nparams = 0
    for p in m.parameters():
        st, local = o.state[p], p.to_local()
        nparams += local.numel()
        eight = p.dim() == 2 and p.shape[1] % 256 == 0 and p.numel() >= quant.MIN_NUMEL
        for k, v in st.items():
            nbytes += v.to_local().nbytes if k != "step" else v.nbytes
            if k == "step":
                continue
            assert type(v).__name__ == "DTensor" and v.device_mesh == p.device_mesh, k
            assert v.placements == p.placements, (k, v.placements)
            if k.endswith(quant.ABSMAX):
                assert v.shape == (p.shape[0], p.shape[1] // 256) and v.dtype == torch.float32
                assert v.to_local().numel() * 256 == local.numel()
            else:
                assert v.shape == p.shape and v.to_local().shape == local.shape, k
                assert v.dtype == (torch.uint8 if eight else torch.float32), (k, p.shape, v.dtype)
        assert (quant.ABSMAX in "".join(st)) == eight, (p.shape, list(st))
    return nbytes / nparams


def _codes(o):
    """Every 8-bit state entry (codes and absmax), gathered, in param order."""
    return [v.full_tensor() for st in o.state.values() for k, v in st.items()
            if v.dtype == torch.uint8 or k.endswith("_absmax")]


def fsdp_8bit(rank, world, mesh, out):
    import torch.distributed.checkpoint as dcp
    single = model8()  # the single-process 8-bit run on the same global batches
    train8(single, adamw8(single), 0, STEPS8)
    m = shard(model8(), mesh)
    o = adamw8(m)
    train8(m, o, 0, SAVE8, rank, world)
    per = check_8bit_layout(m, o)
    assert per <= 2.2, per
    dcp.save(_states(m, o), checkpoint_id=os.path.join(out, "ckpt8"))
    saved = _codes(o)
    _requantized(m, o)
    train8(m, o, SAVE8, STEPS8, rank, world)
    ours, theirs = eval8(m), eval8(single)
    assert abs(ours - theirs) <= 0.02 * theirs and ours < 0.99 * eval8(model8()), (ours, theirs)
    print(f"rank {rank}: {per:.4f} bytes of state per param; loss {ours:.6f}, single process "
          f"{theirs:.6f} ({(ours - theirs) / theirs:+.2e})")
    expect = full(m)
    if rank == 0:
        torch.save({"params": expect, "codes": saved, "loss": ours},
                   os.path.join(out, "expect8.pt"))
    m = shard(model8(), mesh)
    o = _load8(m, out)
    train8(m, o, SAVE8, STEPS8, rank, world)
    assert all(torch.equal(a, b) for a, b in zip(full(m), expect)), "8-bit DCP continuation"


def _requantized(m, o):
    """float_state_dict dequantizes DTensor codes into float32 DTensors laid like the
    param, and quant.fit quantizes those again (as a loaded float state at the next step),
    shard by shard: both equal to dequantize / quantize of the whole gathered tensor."""
    from fusedopt import quant
    plain = quant.float_state_dict(o.state_dict())["state"]
    for i, p in enumerate(m.parameters()):
        st, ours = dict(plain[i]), o.state[p]
        for name in [k for k in ours if k + quant.ABSMAX in ours]:
            qmap = quant.dynamic_map(quant.signed(name))
            assert st[name].dtype == torch.float32 and st[name].placements == p.placements
            values = st[name].full_tensor()
            assert torch.equal(values, quant.dequantize(ours[name].full_tensor(), ours[
                name + quant.ABSMAX].full_tensor(), qmap)), name
            quant.fit(st, name, p)
            codes, absmax = quant.quantize(values, qmap)
            assert st[name].placements == p.placements and st[name].dtype == torch.uint8
            assert torch.equal(st[name].full_tensor(), codes), name
            assert torch.equal(st[name + quant.ABSMAX].full_tensor().flatten(), absmax), name


def _load8(m, out):
    """A fresh optimizer for m with fsdp_8bit's checkpoint loaded (DCP: resharded into
    this world), its state checked as laid for this world before and after."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                         set_optimizer_state_dict)
    o = adamw8(m)
    sd = _states(m, o)  # (a fresh optimizer's state, made by the call: the layout to load into)
    check_8bit_layout(m, o)
    dcp.load(sd, checkpoint_id=os.path.join(out, "ckpt8"))
    set_model_state_dict(m, sd["model"])
    set_optimizer_state_dict(m, o, sd["optim"])
    check_8bit_layout(m, o)
    assert {float(st["step"]) for st in o.state.values()} == {float(SAVE8)}
    return o


def dcp_load_8bit(rank, world, mesh, out):
    m = shard(model8(), mesh)
    o = _load8(m, out)
    expect = torch.load(os.path.join(out, "expect8.pt"))
    assert all(torch.equal(a, b) for a, b in zip(_codes(o), expect["codes"])), "resharded codes"
    train8(m, o, SAVE8, STEPS8, rank, world)
    # another world sums the gradients in another order: the codes, equal at the load,
    # part by a code here and there (the params by a fraction of one step's lr, 1e-3)
    diff = max((a - b).abs().max().item() for a, b in zip(full(m), expect["params"]))
    loss = eval8(m) / expect["loss"] - 1
    print(f"world {world}: continuation's params within {diff:.3g} of the saved run's, "
          f"its loss {loss:+.2e} of the saved run's")
    assert diff <= 3e-4 and abs(loss) <= 1e-4, (diff, loss)


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
    if world == 1:  # this process is fresh already: a spawned one would import torch again
        _worker(0, 1, port, name, out)
    else:
        mp.spawn(_worker, args=(world, port, name, out), nprocs=world)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
