"""Parity: run fusedopt, torch.optim(foreach=False) and the float64 reference on identical
data, and compare.  The test suite and ``fusedopt parity`` apply the same criteria (``check``).

Criteria, for one optimizer, flag set, dtype and engine, after ``steps`` steps:
  * accuracy: the error against float64 is no larger than torch.optim's own in the same
    dtype.  Slack: RMS error within 10 % of torch's (float64 rounding noise), max error
    within 4 ulp of the largest param of torch's (the max is one element: noise decides);
  * float32/float64: results within ULP_STEPS units of torch.optim's (see ``max_ulp``: the
    unit is the ulp of the param or of one update) -- torch.optim's op order with each op
    correctly rounded, not this machine's torch arithmetic: torch's CPU ops round
    differently on different CPUs (AMD EPYC's sqrt, multiply-adds rounded twice without
    vector kernels), so ``arith.replay`` runs torch.optim with the ops that ``arith.probe``
    finds off on this machine replaced by correctly rounded ones (nothing where torch is
    right).  The rules fuse multiply-adds exactly where torch's vector kernels do: on CPU
    every float32/float64 case comes out bitwise equal.  ULP_STEPS leaves room for the
    compiled GPU engine, whose compiler contracts some multiply-adds;
  * engines agree within 2 ulp of each other (Adafactor: its spec's ``ulp``).
float16 runs use eps >= 1e-4: torch's default 1e-8 rounds to 0 in float16 and turns
torch.optim's own float16 Adam into NaN.
"""
import contextlib
import inspect
import os

import torch

import fusedopt
from fusedopt import arith, reference, spec

ULP_STEPS = 64
# an algorithm whose spec sets ``ulp`` (Adafactor) is held to that bound instead, on both
# counts, in units of the param or of the update (max_ulp with scales)

# four param groups per run: sizes 0, 1, 7, 65537, 1023, 2-D and 3-D, many tiny tensors
SHAPES = [[(0,), (1,), (7,), (65537,)], [(1023,), (33, 17)], [(5,), (300,), (2, 3, 4)],
          [(3,)] * 8]
BACKENDS = ["numba", "triton"]  # triton runs in its interpreter without a GPU
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


def run(impl, name, dtype, groups, steps=20, seed=0, backend=None, cls=None, device="cpu"):
    """Train ``groups`` (a list of (shapes, hyperparameters)) for ``steps`` steps with
    impl in {"fusedopt", "torch", "reference"}; returns the final params (flat list) and,
    except for the reference, the optimizer."""
    data = [make_data(seed + k, dtype, steps, shapes) for k, (shapes, _) in enumerate(groups)]
    if impl == "reference":
        out = []
        for (params, grads), (_, hp) in zip(data, groups):
            ps = [p.to(torch.float64) for p in params]
            states = [{} for _ in ps]
            for gs in grads:  # dtype: the params' (Adafactor's default eps1 is its epsilon)
                reference.step(name.lower(), ps, gs, states, dtype=dtype, **hp)
            out += ps
        return out, None
    if cls is None:
        cls = getattr(fusedopt, name)
        cls = cls if impl == "fusedopt" else cls.twin()
    pgroups = []
    for (params, _), (_, hp) in zip(data, groups):
        pgroups.append(dict(params=[torch.nn.Parameter(p.clone().to(device)) for p in params], **hp))
    # (a twin without a foreach path, torch's Muon, takes no foreach argument)
    kw = {"backend": backend} if impl == "fusedopt" else \
        {"foreach": False} if "foreach" in inspect.signature(cls).parameters else {}
    if inspect.signature(cls).parameters["lr"].default is inspect.Parameter.empty:
        kw["lr"] = pgroups[0]["lr"]  # (a required lr, as optimi's: each group has its own)
    opt = spec.ready(cls(pgroups, **kw))
    # torch.optim's op order, each op rounded once, whatever this machine's torch does
    replay = arith.replay if impl == "torch" else contextlib.nullcontext
    for s in range(steps):
        for g, (_, grads) in zip(opt.param_groups, data):
            for p, gr in zip(g["params"], grads[s]):
                p.grad = gr.clone().to(device)
        with replay():
            opt.step()
    return [p.detach().cpu() for g in opt.param_groups for p in g["params"]], opt


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


def max_ulp(xs, ys, scales=None, floor=0.0, unit=None):
    """Largest difference between corresponding elements, in units of last place.

    With ``scales`` (the params before the update), the unit is the ulp of the largest of
    |x|, |y|, |scale|, the update |y - scale| and ``floor`` (e.g. lr): where an update cancels most of a param, a rounding difference of one
    ulp in the update is many ulps of the small result, and that is not a real
    difference (torch itself rounds its vectorized body and its scalar tail differently).
    ``unit`` (with ``scales``): count in ulp of that dtype instead of the params'.
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
        if unit is None:
            ulp = torch.nextafter(s, torch.full_like(s, float("inf"))) - s
        else:  # the unit dtype's eps times the power of 2 at or below s
            s = s.double()
            ulp = torch.ldexp(torch.ones_like(s), torch.frexp(s)[1] - 1) * torch.finfo(unit).eps
        d = (x.double() - y.double()).abs() / ulp.double()
        worst = max(worst, d.nan_to_num(0.0).max().item())
    return worst


# each algorithm's cases, four groups' hyperparameters and shapes: its spec (fusedopt/spec.py);
# every case also crosses maximize x weight_decay (CROSS)
CROSS = [dict(maximize=False, weight_decay=0), dict(maximize=True, weight_decay=0.1),
         dict(maximize=False, weight_decay=0.05), dict(maximize=True, weight_decay=0)]


def groups_for(name, case, dtype, shapes=None):
    """Four param groups for one case: each its own sizes, hyperparameters and
    maximize/weight_decay (``shapes``, if given, are dealt out over the four groups)."""
    groups, sp = [], spec.spec(name)
    for k, (hp, cross) in enumerate(zip(sp.group_hp, CROSS)):
        if not sp.weight_decay:
            cross = {k: v for k, v in cross.items() if k != "weight_decay"}
        if not sp.maximize:
            cross = {k: v for k, v in cross.items() if k != "maximize"}
        hp = {**hp, **cross, **case}
        if dtype == torch.float16 and sp.fp16_eps:
            hp["eps"] = max(hp.get("eps", 0), 1e-4)
        groups.append((shapes[k::4] if shapes else (sp.shapes or SHAPES)[k], hp))
    return groups


def available_backends(device="cpu"):
    """The engines that can run on ``device``: Triton on CUDA; on CPU Numba, and Triton
    in its interpreter when TRITON_INTERPRET=1 was set before triton was first used (and
    triton is installed: a CPU install need not have it)."""
    from .kernels import triton_installed
    if str(device).startswith("cuda"):
        return ["triton"]
    if os.environ.get("TRITON_INTERPRET") == "1" and triton_installed():
        return list(BACKENDS)
    return ["numba"]


def check(name, case, dtype, backends=None, steps=20, shapes=None, cls=None, device="cpu"):
    """Run one case; returns a dict of measurements and ``ok``."""
    backends = backends or available_backends(device)
    groups = groups_for(name, case, dtype, shapes)
    ref = run("reference", name, dtype, groups, steps)[0]
    theirs = run("torch", name, dtype, groups, steps)[0]  # torch's CPU for-loop: the anchor
    ours = {b: run("fusedopt", name, dtype, groups, steps, backend=b, cls=cls, device=device)[0]
            for b in backends}
    t_max, t_rms = errors(theirs, ref)
    scale = max((r.abs().max().item() for r in ref if r.numel()), default=0.0)
    slack = 4 * torch.finfo(dtype).eps * scale
    out = dict(optimizer=name, case=case, dtype=str(dtype).replace("torch.", ""), steps=steps,
               torch_max_err=t_max, torch_rms_err=t_rms, ok=True, failures=[])
    for b, xs in ours.items():
        o_max, o_rms = errors(xs, ref)
        out[f"{b}_max_err"], out[f"{b}_rms_err"] = o_max, o_rms
        out[f"{b}_err_ratio"] = o_rms / t_rms if t_rms else (0.0 if o_rms == 0 else float("inf"))
        if not o_rms <= 1.1 * t_rms:
            out["failures"].append(f"{b}: rms error {o_rms:.3g} > 1.1 x torch's {t_rms:.3g}")
        if not o_max <= t_max + slack:
            out["failures"].append(f"{b}: max error {o_max:.3g} > torch's {t_max:.3g} + 4 ulp")
    if dtype in (torch.float32, torch.float64):
        init, k, worst = initial(dtype, groups), 0, 0.0
        for shp, hp in groups:
            n = len(shp)
            worst = max(worst, max_ulp(ours[backends[0]][k:k + n], theirs[k:k + n], init[k:k + n],
                                       floor=hp["lr"], unit=spec.spec(name).ulp_dtype))
            k += n
        out["ulp_vs_torch"] = worst
        bound = spec.spec(name).ulp or ULP_STEPS
        if worst > bound:
            out["failures"].append(f"{worst:.0f} ulp from torch.optim > {bound}")
    if len(backends) > 1:
        a, b = ours[backends[0]], ours[backends[1]]
        if spec.spec(name).ulp:  # sums of float64 (CPU) and float32 (GPU): in units as above
            init, k, apart = initial(dtype, groups), 0, 0.0
            for shp, hp in groups:
                n = len(shp)
                apart = max(apart, max_ulp(a[k:k + n], b[k:k + n], init[k:k + n], hp["lr"],
                                           unit=spec.spec(name).ulp_dtype))
                k += n
        else:
            apart = max_ulp(a, b)
        out["ulp_between_engines"] = apart
        if apart > (spec.spec(name).ulp or 2):
            out["failures"].append(f"engines {apart:.0f} ulp apart")
    out["ok"] = not out["failures"]
    return out


def matrix(optims=None, dtypes=None):
    """(name, case, dtype) for every case of the given optimizers (default: all)."""
    names = [n for n in spec.names() if optims is None or n.lower() in optims]
    return [(n, c, d) for n in names for c in spec.spec(n).cases for d in (dtypes or DTYPES)]


def case_id(case):
    return ",".join(f"{k}={v}" for k, v in case.items()) or "default"
