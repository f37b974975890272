"""Random distributed programs: 2 ranks on gloo (CPU), FSDP2 (fully_shard per Linear) or
DDP, fusedopt and its torch.optim twin on the same sharding, side by side.

    python tests/dist_programs.py FIRST COUNT [--no-reduce]

runs programs FIRST .. FIRST+COUNT-1 in one process group (spawning one costs seconds).
Each program picks a wrapper, an optimizer (AdamW, SGD with momentum, RMSprop: no torch
fused path), maybe max_grad_norm= (the torch side: clip_grad_norm_ before each step), and
~8 operations: a step on the rank's slice of a global batch (the grads accumulated or
zeroed first; the twin takes fusedopt's grads, and under max_grad_norm its clip's norm
equals fusedopt's grad_norm), fusedopt.clip_grad_norm_ against torch's (norm order 2, 1
or inf: the same norm on every rank, torch's value, the same clipped grads), zero_grad
both ways, and a
checkpoint of fusedopt's side loaded into a fresh optimizer (FSDP2: get/set_optimizer_
state_dict, or a torch.distributed.checkpoint save and load; DDP: state_dict and
load_state_dict), while the torch side runs on uninterrupted.  After every operation
each rank's params (its shards) agree with the twin's.  Rank 0 prints one line per
program; a disagreement raises on the rank that sees it and the process group fails.

--no-reduce skips fusedopt.clip's all-reduce of the partial norms (in the spawned
workers only): each rank clips by its own shards' norm, and the programs must fail
(tests/test_dist_programs.py checks that they do).
"""
import copy
import datetime
import os
import random
import shutil
import socket
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import dist_workers as W

HP = {"AdamW": dict(lr=0.01, weight_decay=0.1), "SGD": dict(lr=0.1, momentum=0.9),
      "RMSprop": dict(lr=0.01, momentum=0.5)}
OPS = ["step"] * 4 + ["clip", "clip", "zero_grad", "checkpoint"]
# the norms of one rank's shards summed in another order (the engine in float64, torch's
# _foreach_norm in float32: 4.9e-7 apart for a 1-norm of 1244, program 679): a few float32
# ulp; a skipped all-reduce moves the norm by far more
NORM_RTOL = 16 * torch.finfo(torch.float32).eps


def local(t):
    return t.to_local() if hasattr(t, "to_local") else t


def whole(t):
    # (torch's inf norm is a DTensor partial over the mesh: its local value is the shard's)
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def close(xs, ys, what, rtol=1e-5, atol=5e-7, scaled=True):
    """Within rtol, and atol plus ~8 float32 ulp of the tensor's largest element (where
    ``scaled``): a step's rounding is relative to the values it sums, so a small element
    of a param that large updates moved (SGD diverging to |p| ~ 100, program 790) carries
    the rounding of those."""
    for x, y in zip(xs, ys, strict=True):
        if x is None or y is None:
            assert x is y, f"{what}: a grad on one side only"
            continue
        x, y = local(x), local(y)
        big = 1e-6 * y.abs().max().item() if scaled and y.numel() else 0.0
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol + big,
                                   msg=lambda m: f"{what}: {m}")


class Program:
    def __init__(self, seed, rank, world, mesh, out):
        import fusedopt
        self.rng, self.rank, self.world, self.out = random.Random(seed), rank, world, out
        self.seed, self.batch = seed, seed * 1000
        self.wrap = self.rng.choice(["fsdp", "fsdp", "ddp"])
        self.name = self.rng.choice(sorted(HP))
        self.max_norm = self.rng.choice([0.5, 5.0, 1e3]) if self.rng.random() < 0.35 else None
        if self.wrap == "fsdp":
            self.build = lambda: W.shard(W.model(), mesh)
        else:
            from torch.nn.parallel import DistributedDataParallel as DDP
            self.build = lambda: DDP(W.model())
        self.m = [self.build(), self.build()]
        self.opt = [self.ours(self.m[0]),
                    getattr(fusedopt, self.name).twin()(self.m[1].parameters(), foreach=False,
                                                        **HP[self.name])]
        self.done = []

    def ours(self, m):
        import fusedopt
        return getattr(fusedopt, self.name)(m.parameters(), max_grad_norm=self.max_norm,
                                            **HP[self.name])

    def backward(self):
        """Both sides' grads of the next global batch, accumulated or zeroed first."""
        zero = self.rng.choice([None, True, False])
        scale = self.rng.choice([1.0, 1.0, 300.0])  # norms in the hundreds clip
        x = W.batch(self.batch, self.rank, self.world)
        self.batch += 1
        for m, o in zip(self.m, self.opt):
            if zero is not None:
                o.zero_grad(set_to_none=zero)
            m(x).pow(2).mean().mul(scale).backward()
        # the twin takes fusedopt's grads: the params agree within rounding, not bit for
        # bit; a backward turns that into larger differences in the grads, which a
        # normalized step carries into the params (RMSprop early on: 1e-7 to 1e-5 in one
        # step).  (Also the same grads to accumulate into where max_grad_norm left ours
        # unclipped and torch's clip scaled its own.)
        with torch.no_grad():
            for p, q in zip(self.m[0].parameters(), self.m[1].parameters()):
                if p.grad is not None:
                    q.grad.copy_(p.grad)

    def step(self):
        self.backward()
        self.opt[0].step()
        if self.max_norm is not None:
            norm = torch.nn.utils.clip_grad_norm_(list(self.m[1].parameters()), self.max_norm)
            close([whole(self.opt[0].grad_norm)], [whole(norm)], f"{self.where()} grad_norm",
                  rtol=NORM_RTOL, atol=0, scaled=False)
        self.opt[1].step()

    def clip(self):
        import fusedopt
        self.backward()
        max_norm = self.rng.choice([0.1, 2.0, 1e3])
        order = self.rng.choice([2.0, 2.0, 1.0, float("inf")])
        a = fusedopt.clip_grad_norm_(self.m[0].parameters(), max_norm, order)
        b = torch.nn.utils.clip_grad_norm_(self.m[1].parameters(), max_norm, order)
        what = f"{self.where()} clip_grad_norm_({max_norm}, {order})"
        assert type(a) is type(b), (what, type(a), type(b))
        every = [torch.zeros(()) for _ in range(self.world)]
        dist.all_gather(every, local(a).detach().clone())
        assert all(torch.equal(e, every[0]) for e in every), (what, "norms per rank", every)
        close([whole(a)], [whole(b)], f"{what}: the norm", rtol=NORM_RTOL, atol=0, scaled=False)
        close([p.grad for p in self.m[0].parameters()], [p.grad for p in self.m[1].parameters()],
              f"{what}: the clipped grads", rtol=2 * NORM_RTOL, atol=1e-30, scaled=False)

    def zero_grad(self):
        none = self.rng.random() < 0.5
        for o in self.opt:
            o.zero_grad(set_to_none=none)

    def checkpoint(self):
        """fusedopt's state saved and loaded into a fresh optimizer on the same model."""
        m, o = self.m[0], self.opt[0]
        if not o.state:
            return
        for opt in self.opt:  # (a fresh optimizer's state is made by a step on zero grads)
            opt.zero_grad(set_to_none=True)
        fresh = self.ours(m)
        how = self.rng.choice(["dcp", "state_dict"]) if self.wrap == "fsdp" else "plain"
        if how == "plain":
            fresh.load_state_dict(copy.deepcopy(o.state_dict()))
        else:
            from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                                 set_optimizer_state_dict)
            sd = get_optimizer_state_dict(m, o)
            if how == "dcp":
                import torch.distributed.checkpoint as dcp
                path = os.path.join(self.out, f"{self.seed}-{len(self.done)}")
                dcp.save(sd, checkpoint_id=path)
                sd = get_optimizer_state_dict(m, fresh)  # the layout to load into
                dcp.load(sd, checkpoint_id=path)
            set_optimizer_state_dict(m, fresh, sd)
        self.opt[0] = fresh

    def run(self, n=8):
        for _ in range(n):
            op = self.rng.choice(OPS)
            self.done.append(op)
            getattr(self, op)()
            close(list(self.m[0].parameters()), list(self.m[1].parameters()),
                  f"{self.where()} params")

    def where(self):
        return f"program {self.seed} ({self.wrap} {self.name} max_grad_norm={self.max_norm}: " \
               f"{' '.join(self.done)})"


def _worker(rank, world, port, first, count, no_reduce, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    # a rank waiting on a peer that died fails in a minute instead of gloo's 30
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (world,))
        if no_reduce:  # the mutation: each rank's norm of its own shards only
            from fusedopt import dtensor
            assert hasattr(dtensor, "all_reduce_norms"), "fusedopt.dtensor has no all_reduce_norms to skip"
            dtensor.all_reduce_norms = lambda v, *args: v
        for seed in range(first, first + count):
            p = Program(seed, rank, world, mesh, out)
            p.run()
            if rank == 0:
                print(seed, p.wrap, p.name, f"max_grad_norm={p.max_norm}", " ".join(p.done),
                      flush=True)
        dist.barrier()  # no rank tears its gloo pairs down while another still uses them
    finally:
        dist.destroy_process_group()


def main(first, count, *flags):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.set_num_threads(1)
    out = tempfile.mkdtemp(prefix="dist_programs")
    try:
        mp.spawn(_worker, args=(2, port, int(first), int(count), "--no-reduce" in flags, out),
                 nprocs=2)
    finally:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
