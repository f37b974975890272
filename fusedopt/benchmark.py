"""Time one optimizer step: fusedopt against torch's for-loop, foreach and fused paths.

Every figure comes from one run on one machine, implementations timed side by side, and
next to the machine's memory roof measured in the same run: an in-place stream that
reads and writes the same number of bytes as the optimizer (e.g. Adam in float32 reads
param, grad, exp_avg, exp_avg_sq and writes three of them: 28 bytes per param).
CPU: wall time after warm-up, median of repeats.  CUDA: CUDA events.
"""
import gc
import inspect
import math
import statistics
import sys
import time

import numpy as np
import torch

import fusedopt
from .workloads import WORKLOADS

# per optimizer (its class name in lower case): the class name, torch kwargs and the
# (reads, writes) of float32 tensors per param, from its spec (fusedopt/spec.py)
OPTIMS = {name.lower(): (name, cls.spec.bench_hp, cls.spec.traffic)
          for name, cls in fusedopt.spec.REGISTRY.items()}
# mixed precision: fusedopt's options, the params' dtype, clipping, and our bytes per param
# (the roof streams as many bytes).  torch has no float32 state for bfloat16 params: its
# rows keep bfloat16 state (14 B/param); with clipping, torch runs clip_grad_norm_ (one
# read of the grads for the norm, a read and a write to scale them) before its step.
# adamw-8bit: 8-bit moments (state_dtype=torch.uint8): p and g read and p written in
# float32, two codes read and written, an absmax per 256 of each (16 B/param and 1/16 B);
# torch's rows keep float32 state, bitsandbytes' and torchao's 8-bit AdamW are rows where
# installed.  adamw-4bit (state_dtype=torch.uint4): two nibbles read and written, an
# absmax per 128 of each (14 B/param and 1/16 B), beside torchao's AdamW4bit where installed
MIXED = {
    "adam-bf16": (dict(state_dtype=torch.float32), torch.bfloat16, None, 22),
    "adam-clip": (dict(max_grad_norm=1.0), torch.float32, 1.0, 32),
    "adamw-8bit": (dict(state_dtype=torch.uint8), torch.float32, None, 16.0625),
    "adamw-4bit": (dict(state_dtype=torch.uint4), torch.float32, None, 14.0625),
}
OPTIMS.update({k: OPTIMS["adamw" if k.startswith("adamw") else "adam"] for k in MIXED})
EIGHT_BIT = {"bitsandbytes-8bit": ("bitsandbytes.optim", "AdamW8bit"),
             "torchao-8bit": ("torchao.optim", "AdamW8bit")}
# the other packages' rows of a quantized state dtype
PEERS = {torch.uint8: EIGHT_BIT, torch.uint4: {"torchao-4bit": ("torchao.optim", "AdamW4bit")}}
TORCH_FUSED = {name for name, cls in fusedopt.spec.REGISTRY.items() if cls.spec.torch_fused}


def _time(fn, device):
    """Seconds for one call: CUDA events on GPU, wall time on CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def roof(numel, reads, writes, device, passes=None):
    """A step function for the machine's memory roof over the optimizer's bytes, and the
    byte count: an in-place stream over float32 buffers of ``numel`` elements in which
    ``writes`` buffers are read and updated and the others only read; or, with ``passes``
    (Spec.traffic of a step of several passes: (reads, writes) each), one such stream
    per pass, one after another."""
    if passes is not None:
        fns = [roof(numel, r, w, device) for r, w in passes]
        return (lambda: [f() for f, _ in fns]), sum(n for _, n in fns)
    if device.type == "cuda":
        # Triton vectorises the masked stream only when the length is a multiple of 16:
        # an H200 run measured 2.98 TB/s over 970,997,028 floats, 4.1 TB/s over 1,235,814,400
        numel = max(16, numel // 16 * 16)
    bufs = [torch.ones(numel, device=device) for _ in range(reads)]
    nbytes = (reads + writes) * 4 * numel
    from .kernels import roofline
    if device.type == "cuda":
        fn = roofline.gpu_stream(reads, writes)
        return (lambda: fn(*bufs)), nbytes
    arrays = [b.numpy() for b in bufs]
    fn = roofline.stream(reads, writes)
    return (lambda: fn(*arrays)), nbytes


def _make(shapes, device, dtype=torch.float32, seed=0):
    # drawn on the device: a billion CPU draws per implementation took minutes
    gen = torch.Generator(device).manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=gen, device=device).to(dtype)) for s in shapes]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen, device=device).to(dtype)
    return ps


def _cupy_adam(ps, hp):
    """What a CuPy user would write: one ElementwiseKernel launch per parameter."""
    import cupy as cp
    kernel = cp.ElementwiseKernel(
        "T g, T step_size, T b1, T b2, T eps, T bc2_sqrt", "T p, T m, T v",
        "m = b1 * m + (1 - b1) * g; v = b2 * v + (1 - b2) * g * g;"
        "p -= step_size * m / (sqrt(v) / bc2_sqrt + eps);", "fusedopt_bench_adam")
    state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in ps]
    count = [0]
    b1, b2 = 0.9, 0.999

    def step():
        count[0] += 1
        t = count[0]
        f = np.float32
        args = (f(hp["lr"] / (1 - b1 ** t)), f(b1), f(b2), f(1e-8), f((1 - b2 ** t) ** 0.5))
        for p, (m, v) in zip(ps, state):
            kernel(cp.asarray(p.grad), *args, cp.asarray(p.detach()), cp.asarray(m), cp.asarray(v))
    return step


def _steps(cls_name, hp, shapes, device, compile_step, mixed=None):
    """name -> step function, each over its own params, grads and state."""
    ours, dtype, clip, _ = mixed or ({}, torch.float32, None, 0)
    impls = {"torch-forloop": dict(foreach=False), "torch-foreach": dict(foreach=True)}
    twin = getattr(fusedopt, cls_name).twin()
    foreach = "foreach" in inspect.signature(twin).parameters
    if not foreach:  # (torch's Muon: its for-loop alone)
        impls = {"torch-forloop": {}}
    other = None
    if not twin.__module__.startswith("torch.optim"):  # not in torch: its spec's source
        row, other = _source(cls_name, twin)
        impls = {row: {}}  # its default path (pytorch_optimizer's: foreach, on CPU too)
    if cls_name in TORCH_FUSED and not (cls_name == "Adagrad" and device.type == "cuda"):  # CPU-only
        impls["torch-fused"] = dict(fused=True)
    if compile_step:
        impls["torch-compile"] = dict(foreach=True) if foreach else {}
    impls["fusedopt"] = {}
    impls["fusedopt-flat"] = dict(flat=True)  # grads stay the buffer's aliases: no zero_grad
    steps = {}
    for impl, kw in impls.items():
        mine = impl.startswith("fusedopt")
        cls = getattr(fusedopt, cls_name) if mine else twin if impl.startswith("torch") \
            else other
        ps = _make(shapes, device, dtype)
        opt = fusedopt.spec.ready(cls(ps, **hp, **kw, **(ours if mine else {})))
        steps[impl] = torch.compile(opt.step) if impl == "torch-compile" else opt.step
        if clip is not None and not mine:  # torch clips with clip_grad_norm_ before its step
            steps[impl] = _clipped(ps, clip, kw.get("foreach", foreach), steps[impl])
        if mine and not fusedopt.spec.spec(cls_name).stacked:  # (Muon's host work would
            steps[impl + HOST] = _host_only(opt.step, device)  # hold its matmuls)
    # (Lion and Adafactor, like torch's Adafactor, have no capturable flag: no graph row)
    if device.type == "cuda" and "capturable" in inspect.signature(twin).parameters:
        steps["fusedopt-graph"] = _graphed(cls_name, hp, shapes, device, dtype, ours)
    if ours.get("state_dtype") in PEERS:
        for impl, (mod, cls) in PEERS[ours["state_dtype"]].items():
            try:
                other = getattr(__import__(mod, fromlist=[cls]), cls)
                steps[impl] = other(_make(shapes, device, dtype), **hp).step
            except Exception as e:  # not installed, or no support on this device: reported
                print(f"  .. {impl}: not run ({type(e).__name__}: {str(e).splitlines()[0][:80]})",
                      file=sys.stderr)
    # a fifth copy of llama-1b's Adam state would not fit beside the others on one GPU
    if device.type == "cuda" and cls_name == "Adam" and sum(p.numel() for p in ps) < 3e8:
        try:
            steps["cupy-elementwise"] = _cupy_adam(_make(shapes, device), hp)
        except ImportError:
            pass
    return steps


def _source(cls_name, twin):
    """(row name, class) of the package an algorithm torch lacks is a twin of: its spec's
    ``source``, ``"module.Class"`` or a distribution whose module holds the class of the
    same name (``"lion-pytorch"``: ``lion_pytorch.Lion``); the row is named after the
    distribution (``pytorch-optimizer``).  Where it is not installed, the twin's
    one-tensor-at-a-time arithmetic (fusedopt.lion.LionForLoop, ...), in a row of its name."""
    source = fusedopt.spec.spec(cls_name).source
    module, _, attr = source.rpartition(".") if "." in source else (source, "", cls_name)
    module = module.replace("-", "_")
    try:
        cls = getattr(__import__(module, fromlist=[attr]), attr)
        return module.split(".")[0].replace("_", "-"), cls
    except (ImportError, AttributeError):
        return twin.__name__, twin


HOST = " host"  # suffix: a fusedopt step with the engine calls stubbed, its host work


def _graphed(cls_name, hp, shapes, device, dtype, ours):
    """A capturable=True step captured in a CUDA graph, replayed: the host's cost of a
    replay does not grow with the tensor count."""
    ps = _make(shapes, device, dtype)
    opt = getattr(fusedopt, cls_name)(ps, **hp, capturable=True, **ours)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs need
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph.replay


def _host_only(step, device):
    """The step with the engines' kernel calls replaced by nothing: what remains is the
    host's work (checks, tables, coefficients, counters), timed like the rest.  On a GPU
    the launches are skipped too, so this is the host's side of the step.  The matrix
    kernel's sums (Adafactor) come out as zeros: garbage there could be subnormal or NaN
    in the state of the step timed for real."""
    if device.type == "cpu":  # the Numba engine's (a CPU install may lack triton)
        from .kernels import numba_engine as engine, numba_matrix as matrix
    else:
        from .kernels import triton_engine as engine, triton_matrix as matrix

    def nothing(*args, **kw):
        pass

    def zeros(*args, **kw):  # (the numba matrix kernel's last three: its sums' buffers)
        for out in args[-3:]:
            if hasattr(out, "fill"):
                out.fill(0)
    mods = (engine, "run", nothing), (matrix, "run_matrix", zeros if device.type == "cpu" else nothing)

    def fn():
        saved = [getattr(m, name) for m, name, _ in mods]
        for m, name, stub in mods:
            setattr(m, name, stub)
        try:
            step()
        finally:
            for (m, name, _), f in zip(mods, saved):
                setattr(m, name, f)
    return fn


def _clipped(ps, max_norm, foreach, step):
    def fn():
        torch.nn.utils.clip_grad_norm_(ps, max_norm, foreach=foreach)
        step()
    return fn


def bench_one(optim, workload, device, repeats=5, shapes=None, compile_step=False, progress=None):
    """Rows of results for one optimizer on one workload: every implementation and the
    roof are timed in rounds (one step of each per round, median over rounds), so that a
    noisy neighbour slows them all alike."""
    cls_name, hp, traffic = OPTIMS[optim]
    passes = traffic if isinstance(traffic[0], tuple) else None  # (one per pass)
    reads, writes = map(sum, zip(*passes)) if passes else traffic
    shapes = shapes if shapes is not None else WORKLOADS[workload]()
    numel = sum(math.prod(s) for s in shapes)
    if progress:
        progress(f"{optim} on {workload}: {len(shapes)} tensors, {numel / 1e6:.1f}M params")
    mixed = MIXED.get(optim)
    steps = _steps(cls_name, hp, shapes, device, compile_step, mixed)
    if mixed:  # the roof streams the same number of bytes as our step
        roof_step, nbytes = roof(int(numel * mixed[3]) // ((reads + writes) * 4), reads, writes,
                                 device, passes)
    else:
        roof_step, nbytes = roof(numel, reads, writes, device, passes)
    steps = {"roof": roof_step, **steps}
    for fn in steps.values():  # warm-up (and torch.compile's compilation)
        fn()
        fn()
    times = {k: [] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            times[k].append(_time(fn, device))
    del steps
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    t_roof = statistics.median(times["roof"])
    host_ms = {k[:-len(HOST)]: statistics.median(times.pop(k)) * 1e3
               for k in list(times) if k.endswith(HOST)}
    rows = []
    for impl, ts in times.items():
        s = statistics.median(ts)
        rows.append(dict(optimizer=optim, workload=workload, impl=impl, ms=s * 1e3,
                         tensors=len(shapes), params=numel, bytes=nbytes,
                         gparams_per_s=numel / s / 1e9, gb_per_s=nbytes / s / 1e9,
                         pct_of_roof=100 * t_roof / s,
                         host_ms=host_ms.get(impl)))
    torch_rows = [r for r in rows if not r["impl"].startswith(("fusedopt", "roof", "cupy"))
                  and not any(r["impl"] in peers for peers in PEERS.values())]
    best = min(r["ms"] for r in torch_rows)
    for r in rows:
        r["speedup_vs_best_torch"] = best / r["ms"]
        for o in torch_rows:
            r[f"speedup_vs_{o['impl']}"] = o["ms"] / r["ms"]
    return rows


def format_table(rows):
    head = (f"{'optimizer':9} {'workload':11} {'impl':14} {'ms':>9} {'Gparam/s':>9} {'GB/s':>7} "
            f"{'%roof':>6} {'vs best torch':>13} {'host ms':>8}")
    lines = [head, "-" * len(head)]
    for r in rows:
        host = "" if r.get("host_ms") is None else f"{r['host_ms']:8.2f}"
        lines.append(f"{r['optimizer']:9} {r['workload']:11} {r['impl']:14} {r['ms']:9.2f} "
                     f"{r['gparams_per_s']:9.2f} {r['gb_per_s']:7.1f} {r['pct_of_roof']:6.1f} "
                     f"{r['speedup_vs_best_torch']:12.2f}x {host:>8}")
    return "\n".join(lines)


FIRST_STEP = """
import time, torch
t0 = time.perf_counter(); import fusedopt; t1 = time.perf_counter()
ps = [torch.nn.Parameter(torch.randn(1000)) for _ in range(4)]
for p in ps: p.grad = torch.randn(1000)
opt = fusedopt.Adam(ps)
t2 = time.perf_counter(); opt.step(); print(t1 - t0, time.perf_counter() - t2)
"""


def first_step_times():
    """Seconds for ``import fusedopt`` (after torch) and the first Adam step in a fresh
    process: with an empty kernel cache (compiles) and again with the cache that run left
    (loads)."""
    import os
    import subprocess
    import sys
    import tempfile
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        out = [[float(x) for x in subprocess.run(
            [sys.executable, "-c", FIRST_STEP], env=env, check=True, capture_output=True,
            text=True).stdout.split()] for _ in range(2)]
    return {"import_s": out[1][0], "cold_first_step_s": out[0][1], "warm_first_step_s": out[1][1]}


def machine():
    """Where and with what the figures were taken."""
    import platform
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for mod in ("numba", "triton", "cupy"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    else:
        try:
            names = [ln for ln in open("/proc/cpuinfo") if ln.startswith("model name")]
            info["device"] = f"{names[0].split(':', 1)[1].strip()} ({len(names)} cpus)"
        except (OSError, IndexError):
            info["device"] = platform.processor()
    return info


def plot(rows, path, device=None):
    """Roofline-style chart: achieved GB/s of each implementation, per optimizer and
    workload, against the measured roof."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cases = list(dict.fromkeys((r["optimizer"], r["workload"]) for r in rows))
    impls = [i for i in dict.fromkeys(r["impl"] for r in rows) if i != "roof"]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(cases)), 4.5))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        ys = [next((r["gb_per_s"] for r in rows if (r["optimizer"], r["workload"], r["impl"]) == (*c, impl)), 0)
              for c in cases]
        ax.bar([i + k * width for i in range(len(cases))], ys, width, label=impl)
    for i, c in enumerate(cases):
        roof_gbs = next(r["gb_per_s"] for r in rows if (r["optimizer"], r["workload"], r["impl"]) == (*c, "roof"))
        ax.hlines(roof_gbs, i - width / 2, i + 0.8 - width / 2, colors="k", linestyles="--",
                  label="measured roof" if i == 0 else None)
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(cases))])
    ax.set_xticklabels([f"{o}\n{w}" for o, w in cases], fontsize=8)
    ax.set_ylabel("GB/s moved by the step")
    ax.set_yscale("log")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"optimizer step bandwidth ({device or machine()['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
