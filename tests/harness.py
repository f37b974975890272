"""Run fusedopt, torch.optim and the float64 reference on identical data, and compare."""
import numpy as np
import torch

import fusedopt
from fusedopt import reference

# four param groups per run: sizes 0, 1, 7, 65537, 1023, 2-D and 3-D, many tiny tensors
SHAPES = [[(0,), (1,), (7,), (65537,)], [(1023,), (33, 17)], [(5,), (300,), (2, 3, 4)],
          [(3,)] * 8]
BACKENDS = ["numba", "triton"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def make_data(seed, dtype, steps, shapes):
    """Initial params and per-step grads, drawn in float64 and rounded to ``dtype`` once,
    so every implementation starts from the same values."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
             for _ in range(steps)]
    return params, grads


def initial(dtype, groups, seed=0):
    """The initial params ``run`` starts from (flat list)."""
    return [p for k, (shapes, _) in enumerate(groups)
            for p in make_data(seed + k, dtype, 0, shapes)[0]]


def run(impl, name, dtype, groups, steps=20, seed=0, backend=None):
    """Train ``groups`` (a list of (shapes, hyperparameters)) for ``steps`` steps with
    impl in {"fusedopt", "torch", "reference"}; returns the final params (flat list) and,
    except for the reference, the optimizer."""
    data = [make_data(seed + k, dtype, steps, shapes) for k, (shapes, _) in enumerate(groups)]
    if impl == "reference":
        out = []
        for (params, grads), (_, hp) in zip(data, groups):
            ps = [p.to(torch.float64) for p in params]
            states = [{} for _ in ps]
            for gs in grads:
                reference.step(name.lower(), ps, gs, states, **hp)
            out += ps
        return out, None
    cls = getattr(fusedopt, name) if impl == "fusedopt" else getattr(torch.optim, name)
    pgroups = []
    for (params, _), (_, hp) in zip(data, groups):
        pgroups.append(dict(params=[torch.nn.Parameter(p.clone()) for p in params], **hp))
    kw = {"backend": backend} if impl == "fusedopt" else {"foreach": False}
    opt = cls(pgroups, **kw)
    for s in range(steps):
        for g, (_, grads) in zip(opt.param_groups, data):
            for p, gr in zip(g["params"], grads[s]):
                p.grad = gr.clone()
        opt.step()
    return [p.detach() for g in opt.param_groups for p in g["params"]], opt


def errors(xs, ref):
    """(max abs error, rms error) of the tensors xs against float64 ``ref``."""
    d = torch.cat([(x.double() - r).flatten() for x, r in zip(xs, ref)])
    if d.numel() == 0:
        return 0.0, 0.0
    return d.abs().max().item(), d.pow(2).mean().sqrt().item()


_INT = {torch.float32: torch.int32, torch.float64: torch.int64,
        torch.float16: torch.int16, torch.bfloat16: torch.int16}


def ordered(x):
    """Bit patterns mapped to integers that count representable values in order."""
    i = x.contiguous().view(_INT[x.dtype]).to(torch.int64)
    top = torch.iinfo(_INT[x.dtype]).min
    return torch.where(i < 0, top - i, i)


def max_ulp(xs, ys, scales=None, floor=0.0):
    """Largest difference between corresponding elements, in units of last place.

    With ``scales`` (the params before the update), the unit is the ulp of the largest of
    |x|, |y|, |scale|, the update |y - scale| and ``floor`` (e.g. lr): where an update cancels most of a param, a rounding difference of one
    ulp in the update is many ulps of the small result, and that is not a real
    difference (torch itself rounds its vectorized body and its scalar tail differently).
    """
    worst = 0
    for k, (x, y) in enumerate(zip(xs, ys)):
        if not x.numel():
            continue
        assert torch.equal(x.isnan(), y.isnan())
        if scales is None:
            worst = max(worst, (ordered(x) - ordered(y)).abs().max().item())
            continue
        before = scales[k].to(x.dtype)
        s = torch.maximum(torch.maximum(x.abs(), y.abs()), before.abs())
        s = torch.maximum(s, (y - before).abs()).clamp(min=floor)
        ulp = torch.nextafter(s, torch.full_like(s, float("inf"))) - s
        d = (x.double() - y.double()).abs() / ulp.double()
        worst = max(worst, d.nan_to_num(0.0).max().item())
    return worst
