"""Time one optimizer step: fusedopt against torch's for-loop, foreach and fused paths.

Every figure comes from one run on one machine, implementations timed side by side, and
next to the machine's memory roof measured in the same run: an in-place stream that
reads and writes the same number of bytes as the optimizer (e.g. Adam in float32 reads
param, grad, exp_avg, exp_avg_sq and writes three of them: 28 bytes per param).
CPU: wall time after warm-up, median of repeats.  CUDA: CUDA events.
"""
import gc
import math
import statistics
import time

import numpy as np
import torch

import fusedopt
from .workloads import WORKLOADS

# (reads, writes) of float32 tensors per param, and torch kwargs per optimizer
OPTIMS = {
    "adam": ("Adam", dict(lr=1e-3), (4, 3)),
    "adamw": ("AdamW", dict(lr=1e-3), (4, 3)),
    "adamax": ("Adamax", dict(lr=1e-3), (4, 3)),
    "rmsprop": ("RMSprop", dict(lr=1e-3), (3, 2)),
    "adagrad": ("Adagrad", dict(lr=1e-3), (3, 2)),
    "sgd": ("SGD", dict(lr=1e-3, momentum=0.9), (3, 2)),
}
TORCH_FUSED = {"Adam", "AdamW", "SGD", "Adagrad"}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def roof(numel, reads, writes, device, repeats):
    """Seconds for the best in-place stream moving reads + writes float32 tensors of numel:
    each written tensor is read and updated in place (x += y), the rest only read."""
    bufs = [torch.ones(numel, device=device) for _ in range(reads)]
    if device.type == "cuda":
        def step():
            for k in range(writes):
                bufs[k].add_(bufs[writes + (k % (reads - writes))] if reads > writes else bufs[k])
        # torch's single pass per tensor; ~one kernel each, close to copy bandwidth
        return _time(step, device, repeats), reads * 4 * numel + writes * 4 * numel
    from .kernels import roofline
    arrays = [b.numpy() for b in bufs]
    fn = roofline.stream(reads, writes)
    return _time(lambda: fn(*arrays), device, repeats), (reads + writes) * 4 * numel


def _make(shapes, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen).to(device, dtype)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(device, dtype)
    return ps


def implementations(name, has_fused):
    impls = {"torch-forloop": dict(foreach=False), "torch-foreach": dict(foreach=True)}
    if has_fused:
        impls["torch-fused"] = dict(fused=True)
    impls["fusedopt"] = {}
    return impls


def bench_one(optim, workload, device, repeats=5, shapes=None, compile_step=False, progress=None):
    """Rows of results for one optimizer on one workload."""
    cls_name, hp, (reads, writes) = OPTIMS[optim]
    shapes = shapes or WORKLOADS[workload]()
    numel = sum(math.prod(s) for s in shapes)
    t_roof, nbytes = roof(numel, reads, writes, device, repeats)
    rows = [dict(optimizer=optim, workload=workload, impl="roof", ms=t_roof * 1e3,
                 tensors=len(shapes), params=numel, bytes=nbytes)]
    impls = implementations(cls_name, cls_name in TORCH_FUSED)
    if compile_step:
        impls["torch-compile"] = dict(foreach=True, _compile=True)
    for impl, kw in impls.items():
        if progress:
            progress(f"{optim} {workload} {impl}")
        ps = _make(shapes, device)
        kw = dict(kw)
        compiled = kw.pop("_compile", False)
        cls = getattr(fusedopt if impl == "fusedopt" else torch.optim, cls_name)
        opt = cls(ps, **hp, **kw)
        step = opt.step
        if compiled:
            step = torch.compile(opt.step)
        t = _time(step, device, repeats)
        rows.append(dict(optimizer=optim, workload=workload, impl=impl, ms=t * 1e3,
                         tensors=len(shapes), params=numel, bytes=nbytes))
        del opt, ps, step
        gc.collect()
    for r in rows:
        s = r["ms"] / 1e3
        r["gparams_per_s"] = numel / s / 1e9
        r["gb_per_s"] = nbytes / s / 1e9
        r["pct_of_roof"] = 100 * t_roof / s
    best_torch = min((r["ms"] for r in rows if r["impl"].startswith("torch")), default=np.nan)
    for r in rows:
        r["speedup_vs_best_torch"] = best_torch / r["ms"]
        for o in rows:
            if o["impl"].startswith("torch"):
                r[f"speedup_vs_{o['impl']}"] = o["ms"] / r["ms"]
    return rows


def format_table(rows):
    head = f"{'optimizer':9} {'workload':11} {'impl':14} {'ms':>9} {'Gparam/s':>9} {'GB/s':>7} {'%roof':>6} {'vs best torch':>13}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['optimizer']:9} {r['workload']:11} {r['impl']:14} {r['ms']:9.2f} "
                     f"{r['gparams_per_s']:9.2f} {r['gb_per_s']:7.1f} {r['pct_of_roof']:6.1f} "
                     f"{r['speedup_vs_best_torch']:12.2f}x")
    return "\n".join(lines)
