"""Clipping by the global gradient norm under FSDP2, scenarios for test_distributed.py, run as
``python dist_workers.py dist_clip:NAME WORLD DIR`` (every rank asserting on its own).  The
torch side is torch.nn.utils.clip_grad_norm_ and torch.optim (for-loop) on the same sharding.

* clip:         fusedopt.clip_grad_norm_ equals torch's for the norms 2, 1, inf and 3.5: the
                same type (a DTensor), the same value on every rank, the same clipped grads;
                error_if_nonfinite raises on every rank as torch's does.
* fold:         AdamW, SGD and RMSprop (no torch fused path) with max_grad_norm equal torch's
                clip_grad_norm_ + step within 1e-6 after 5 steps.
* two_meshes:   params of one optimizer on two meshes (a 1-D mesh and a 2-D replicate x
                shard mesh): the norm of all of them, and max_grad_norm.
* every:        the three above in one process group.
* no_reduce:    the fold scenario with the all-reduce skipped: it must fail (the test
                expects this run to fail).
"""
import math

import torch

import dist_workers as W
import fusedopt
from fusedopt import dtensor

STEPS = 5


def loud(m, step, rank, world):
    """A backward whose gradients clip (norms in the hundreds, as a real first step's can)."""
    m(W.batch(step, rank, world)).pow(2).mean().mul(1000).backward()


def equal(xs, ys, what, atol=0.0, rtol=0.0):
    for x, y in zip(xs, ys):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


# a shard's norm from the engine and from torch's _foreach_norm may differ by rounding (their
# sums run in other orders: test_clip.py bounds both against float64); a few float32 ulp of
# the norm, and of the clipped grads.  Skipping the all-reduce moves the norm by ~10 %.
NORM_RTOL = 4 * torch.finfo(torch.float32).eps


def local(ps):
    return [p.to_local() for p in ps]


def clip_(rank, world, mesh, out):
    ours, theirs = W.shard(W.model(), mesh), W.shard(W.model(), mesh)
    for order in (2.0, 1.0, math.inf, 3.5):
        for m in (ours, theirs):
            m.zero_grad()
            loud(m, 0, rank, world)
        a = fusedopt.clip_grad_norm_(ours.parameters(), 1.0, order)
        b = torch.nn.utils.clip_grad_norm_(theirs.parameters(), 1.0, order)
        assert type(a) is type(b), (type(a), type(b))
        whole = b.full_tensor()
        # the same value on every rank: the gathered values all equal torch's
        every = [torch.zeros(()) for _ in range(world)]
        torch.distributed.all_gather(every, a.to_local())
        equal(every, [every[0]] * world, f"norm {order}: one value on every rank")
        equal([a.full_tensor()], [whole], f"norm {order}", rtol=NORM_RTOL)
        assert a.full_tensor() > 1.0, a  # the grads were clipped, not left alone
        equal(local(p.grad for p in ours.parameters()),
              local(p.grad for p in theirs.parameters()), f"grads clipped by the {order}-norm",
              rtol=2 * NORM_RTOL, atol=1e-30)
    # a non-finite total: both raise on every rank (the inf is on rank 0's shard only)
    for m in (ours, theirs):
        m.zero_grad()
        loud(m, 1, rank, world)
        if rank == 0:
            next(m.parameters()).grad.to_local()[0, 0] = math.inf
    for fn in (fusedopt.clip_grad_norm_, torch.nn.utils.clip_grad_norm_):
        try:
            fn((ours if fn is fusedopt.clip_grad_norm_ else theirs).parameters(), 1.0,
               error_if_nonfinite=True)
        except RuntimeError as e:
            assert "non-finite" in str(e), e
        else:
            raise AssertionError(f"{fn.__module__} did not raise on rank {rank}")


def whole_norm(grads):
    """torch's definition where its clip_grad_norm_ refuses the grads (two meshes: its stack
    of the partial norms fails): the vector norm of the whole tensors' norms."""
    return torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g, 2.0).full_tensor() for g in grads]))


def torch_clip(params, max_norm, meshes):
    """torch's clip_grad_norm_ (one mesh), or its math written out over several meshes."""
    if meshes == 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm).full_tensor()
    grads = [p.grad for p in params]
    norm = whole_norm(grads)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    torch._foreach_mul_([g.to_local() for g in grads], coef)
    return norm


def _fold(rank, world, build, meshes=1):
    cases = {"AdamW": dict(lr=0.01, weight_decay=0.1), "SGD": dict(lr=0.1, momentum=0.9),
             "RMSprop": dict(lr=0.01, momentum=0.5)}
    for name, hp in cases.items():
        ours, theirs = build(), build()
        o = getattr(fusedopt, name)(ours.parameters(), max_grad_norm=1.0, **hp)
        t = getattr(torch.optim, name)(theirs.parameters(), foreach=False, **hp)
        for s in range(STEPS):
            for m, opt in ((ours, o), (theirs, t)):
                opt.zero_grad()
                loud(m, s, rank, world)
                if opt is t:
                    norm = torch_clip(list(theirs.parameters()), 1.0, meshes)
                opt.step()
            equal([o.grad_norm], [norm], f"{name} grad_norm step {s}", rtol=NORM_RTOL)
            equal(W.full(ours), W.full(theirs), f"{name} max_grad_norm step {s}", atol=1e-6)


def fold(rank, world, mesh, out):
    _fold(rank, world, lambda: W.shard(W.model(), mesh))


def no_reduce(rank, world, mesh, out):
    dtensor.all_reduce_norms = lambda v, p, mesh, dims: v  # the mutation: each rank its own norm
    fold(rank, world, mesh, out)


def _two_meshes(mesh):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    hsdp = init_device_mesh("cpu", (1, mesh.size()), mesh_dim_names=("replicate", "shard"))
    m = W.model()
    fully_shard(m[0], mesh=mesh)
    fully_shard(m[2], mesh=hsdp)
    return m


def two_meshes(rank, world, mesh, out):
    m = _two_meshes(mesh)
    loud(m, 0, rank, world)
    grads = [p.grad for p in m.parameters()]
    assert len({g.device_mesh.ndim for g in grads}) == 2
    equal([fusedopt.clip_grad_norm_(m.parameters(), 1e9).full_tensor()], [whole_norm(grads)],
          "two meshes", rtol=NORM_RTOL)
    _fold(rank, world, lambda: _two_meshes(mesh), meshes=2)


def every(rank, world, mesh, out):
    """All of the above in one process group (spawning one costs ~10 s on 2 cores)."""
    clip_(rank, world, mesh, out)
    fold(rank, world, mesh, out)
    two_meshes(rank, world, mesh, out)
