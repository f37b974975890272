"""``fusedopt parity | bench | check | warmup``: the user-facing tools."""
import argparse
import importlib
import json
import os
import sys
import time

import torch

def _progress(msg):
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def _model_shapes(spec):
    """Shapes of the params of ``module:factory`` (a callable returning a module or params)."""
    mod, _, fn = spec.partition(":")
    obj = getattr(importlib.import_module(mod), fn)()
    params = obj.parameters() if hasattr(obj, "parameters") else obj
    return [tuple(p.shape) for p in params]


def parity_cmd(args, cls=None, notes=None):
    """``fusedopt parity``: every optimizer x flag set x dtype x engine against torch.optim's
    for-loop and the float64 reference; prints one line per case and returns 1 if any fails.
    ``notes``: a list that receives the notes on this machine (torch and triton versions
    against the tested ranges, torch's arithmetic, Triton's interpreter's) instead of
    printing them after the summary (check prints them after its verdict)."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":  # the Triton engine runs in its interpreter on CPU
        os.environ.setdefault("TRITON_INTERPRET", "1")
    from . import parity
    optims = args.optim.lower().split(",") if args.optim else None
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")] if args.dtypes else None
    backends = args.backends.split(",") if args.backends else parity.available_backends(device)
    from .kernels import triton_installed
    if device == "cpu" and not args.backends and not triton_installed():
        print("triton is not installed: the Triton engine's rows are skipped "
              "(pip install 'fusedopt[gpu]' to run them in its interpreter)", file=sys.stderr)
    shapes = _model_shapes(args.model) if args.model else None
    cases = parity.matrix(optims, dtypes)
    if args.quick:  # each algorithm's last case: the one with the most flags on
        from .spec import spec
        cases = [c for c in cases if c[1] == spec(c[0]).cases[-1]]
    results, off, interp_off = [], [], []
    if device == "cpu":  # which side is off where torch and fusedopt differ (fusedopt/arith.py)
        from . import arith
        off = arith.describe()
        if "triton" in backends:  # and Triton's interpreter (kernels/triton_interp.py)
            from .kernels import triton_interp
            interp_off = triton_interp.describe()
    head = (f"{'optimizer':9} {'flags':44} {'dtype':8} {'err vs f64: ours/torch':>22} "
            f"{'ulp vs torch':>12} {'ulp engines':>11}  result")
    print(head)
    print("-" * len(head))
    for k, (name, case, dtype) in enumerate(cases):
        _progress(f"[{k + 1}/{len(cases)}] {name} {parity.case_id(case)} {str(dtype)[6:]}")
        r = parity.check(name, case, dtype, backends, args.steps, shapes,
                         cls=(cls or {}).get(name.lower()), device=device)
        results.append(r)
        ratio = max(r[f"{b}_err_ratio"] for b in backends)
        ulp = f"{r['ulp_vs_torch']:.0f}" if "ulp_vs_torch" in r else "-"
        eng = f"{r['ulp_between_engines']:.0f}" if "ulp_between_engines" in r else "-"
        verdict = "pass" if r["ok"] else "FAIL: " + "; ".join(r["failures"])
        print(f"{name:9} {parity.case_id(case)[:44]:44} {r['dtype']:8} {ratio:22.3f} "
              f"{ulp:>12} {eng:>11}  {verdict}", flush=True)
    failed = sum(not r["ok"] for r in results)
    print(f"\n{len(results) - failed}/{len(results)} cases pass "
          f"({args.steps} steps, engines: {', '.join(backends)})")
    from . import versions
    text = [versions.describe()]  # context for the ulp column, not the result: after it
    if device == "cpu":
        text += off or ["torch's elementary ops (sqrt, multiply-adds, division) on this machine "
                        "are correctly rounded"]
        if "triton" in backends:
            text += interp_off or ["Triton's interpreter computes tl.fma, div_rn and sqrt_rn "
                                   "correctly rounded, as compiled Triton does"]
    if notes is None:
        print("\n" + "\n".join(text))
    else:
        notes += text
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": args.steps, "backends": backends, "results": results,
                       "torch_ops_off": off, "interpreter_ops_off": interp_off,
                       "versions": versions.installed()}, f,
                      indent=1, default=str)
    return 1 if failed else 0


OPTIMS_HELP = ("every optimizer by its class name in lower case (adam, sgd, lion, ...)",
               "adam-bf16 (bfloat16 params, float32 state)",
               "adam-clip (max_grad_norm=1 vs clip_grad_norm_ + step)",
               "adamw-8bit (state_dtype=torch.uint8 vs bitsandbytes, torchao where installed)",
               "adamw-4bit (state_dtype=torch.uint4 vs torchao's AdamW4bit where installed)")


def bench_cmd(args):
    """``fusedopt bench``: one step of each optimizer on each workload, timed in rounds beside
    torch's paths and the memory roof; prints the table, returns (0, rows)."""
    from . import benchmark
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    optims = args.optim.split(",")
    workloads = args.workloads.split(",")
    custom = None
    if args.sizes:
        custom = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
        workloads = ["custom"]
    sized = getattr(args, "shapes", None) or {}  # workload name -> shapes (check's)
    rows = []
    t0 = time.time()
    for optim in optims:
        for wl in workloads:
            try:
                new = benchmark.bench_one(optim, wl, device, args.repeats,
                                          shapes=sized.get(wl, custom),
                                          compile_step=args.compile, progress=_progress)
            except torch.OutOfMemoryError as e:  # one workload too big: report, go on
                _progress(f"{optim} on {wl} skipped: {str(e).splitlines()[0]}")
                continue
            rows += new
            # each table once, on stdout, as soon as it is done: a long run shows figures
            # as it goes, and a terminal (stdout and stderr) does not show them twice
            print(benchmark.format_table(new) + "\n", flush=True)
            if args.json:  # and leaves them behind if it is cut short
                with open(args.json, "w") as f:
                    json.dump({"machine": benchmark.machine(), "rows": rows}, f, indent=1)
    extra = benchmark.first_step_times() if device.type == "cpu" and not args.quick else {}
    for k, v in extra.items():
        print(f"{k}: {v:.2f}")
    _progress(f"benchmark took {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": benchmark.machine(), "rows": rows, **extra}, f, indent=1)
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            sys.exit("--plot needs matplotlib: pip install 'fusedopt[plot]' (or matplotlib)")
        benchmark.plot(rows, args.plot)
    return 0, rows


def bench_default_workloads(device):
    return "gpt2-124m,many-small,tiny" + (",llama-1b" if device.type == "cuda" else "")


CHECK_MEMORY = 4e9  # what `fusedopt check` may use at most (an 8 GB laptop runs it)
# bytes of memory per param of the speed workload while one optimizer is timed: the roof's
# buffers and, per implementation (torch's for-loop, foreach, fused; fusedopt, flat),
# params, grads, state and torch's temporaries (measured: Adam ~120 B, SGD ~92 B)
CHECK_BYTES_PER_PARAM = 125


def _memory():
    """(bytes this process holds now, bytes the system has available), from /proc where
    there is one; (0, None) elsewhere."""
    rss = avail = None
    try:
        with open("/proc/self/statm") as f:
            rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return rss or 0, avail


def check_workloads(limit=CHECK_MEMORY):
    """The speed workloads of ``fusedopt check``, sized so that the process stays under
    ``limit`` bytes (and under 60 % of the memory available now): GPT-2-124M's 148 tensors
    scaled down to what fits (~22M params from 4 GB), and 20000 tensors of 100.  Returns
    ({name: shapes}, a line that says what was chosen)."""
    from . import workloads
    rss, avail = _memory()
    budget = min(limit, 0.6 * avail) if avail else limit
    full = sum(workloads._numel(s) for s in workloads.gpt2_124m())
    # 0.3 GB: what torch's allocator and numba's threads add beyond the measured figure
    room = max(budget - rss - 0.3e9, 0) / CHECK_BYTES_PER_PARAM
    shapes = workloads.gpt2_like(max(room, 1e6))
    n = sum(workloads._numel(s) for s in shapes)
    name = "gpt2-124m" if n == full else f"gpt2/{n / 1e6:.0f}M"
    note = (f"speed workloads: {name} (GPT-2 small's 148 tensors"
            + ("" if n == full else f", every dimension scaled down to {n / 1e6:.1f}M params")
            + f") and tiny (20000 x 100), for a peak of ~{(rss + 0.3e9 + n * CHECK_BYTES_PER_PARAM) / 1e9:.1f} GB"
            + ("" if n == full else
               f"; GPT-2-124M itself needs ~{(rss + 0.3e9 + full * CHECK_BYTES_PER_PARAM) / 1e9:.0f} GB: "
               "fusedopt bench --optim adam,sgd --workloads gpt2-124m"))
    return {name: shapes, "tiny": workloads.WORKLOADS["tiny"]()}, note


def check_cmd(args):
    """Quick parity and speed on this machine, then a verdict, then notes on the machine."""
    from . import notice
    t0, compiled = time.perf_counter(), notice.COMPILES.count
    ns = argparse.Namespace(optim="adam,adamw,rmsprop,sgd", dtypes="float32,bfloat16", backends=None,
                            steps=5, model=None, quick=True, json=None, device=None)
    notes = []
    print("== parity: fusedopt vs torch.optim vs float64 reference ==", flush=True)
    parity_failed = parity_cmd(ns, notes=notes)
    print("\n== speed: one optimizer step, fusedopt vs torch ==", flush=True)
    sized, line = check_workloads()
    notes.append(line)
    bs = argparse.Namespace(optim="adam,sgd", workloads=",".join(sized), shapes=sized, repeats=3,
                            device=None, quick=True, sizes=None, compile=False, json=args.json,
                            plot=args.plot)
    _, rows = bench_cmd(bs)
    print("== verdict ==")
    from . import versions
    off = versions.untested()
    # torch's CPU ops and Triton's interpreter are replayed correctly rounded where they are
    # not (the notes): on tested versions a FAIL is the engines', never the environment's
    print(f"parity: {'PASS' if not parity_failed else 'FAIL'}"
          + (f" (untested here: {', '.join(off)}; the tested ranges: pyproject.toml)" if off else ""))
    for r in rows:
        if r["impl"].startswith("fusedopt"):
            print(f"{r['optimizer']:5} {r['workload']:10} {r['impl']:14} {r['ms']:8.2f} ms  "
                  f"{r['speedup_vs_best_torch']:6.2f}x torch's best  {r['pct_of_roof']:5.1f}% of roof")
    n = notice.COMPILES.count - compiled
    took = f"check took {time.perf_counter() - t0:.0f} s" + (
        f"; {n} CPU kernels compiled (first use on this machine: a second run loads them "
        "from numba's cache)" if n else "; the CPU kernels came from numba's cache")
    print("\n== notes on this machine ==")
    print("\n".join(notes + [took]))
    return parity_failed


def _warmup_optimizers():
    import fusedopt  # noqa: F401  (defining the classes registers them)
    from .spec import REGISTRY
    return {name.lower(): cls for name, cls in REGISTRY.items()}


def warmup_cmd(args):
    """Compile ahead what a first step would compile: the C++ host helper and, per
    optimizer, the CPU kernels its default options use (two steps over a few small float32
    params, 1-D and 2-D; 2-D alone for Muon), and clip_grad_norm_'s norm kernel.  They are cached on disk
    (numba's cache: next to the installed kernels, or $NUMBA_CACHE_DIR; the helper:
    ~/.cache/fusedopt or $FUSEDOPT_BUILD_DIR), so a container or CI image built with
    `fusedopt warmup` starts its first step without compiling."""
    import fusedopt
    from . import host, notice
    known = _warmup_optimizers()
    names = args.optim.lower().split(",") if args.optim else list(known) + ["clip"]
    unknown = [n for n in names if n not in known and n != "clip"]
    if unknown:
        print(f"unknown optimizer(s): {', '.join(unknown)}; known: {', '.join(known)}, clip",
              file=sys.stderr)
        return 2
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    t_all = time.perf_counter()
    with notice.silenced():  # this command says what it does itself
        if os.environ.get("FUSEDOPT_HOST") != "python":
            t0 = time.perf_counter()
            helper = host.native()
            state = "ready" if helper is not None else "could not be built (see the warning)"
            print(f"{'host helper':20} {time.perf_counter() - t0:6.1f} s  {state}"
                  + (f" ({host._build_dir()})" if helper is not None else ""), flush=True)
        for name in names:
            for dtype in dtypes:
                t0, c0 = time.perf_counter(), notice.COMPILES.count
                # (an algorithm of 2-D params alone, Spec.stacked: two matrices)
                flat = name == "clip" or not known[name].spec.stacked
                ps = [torch.nn.Parameter(torch.zeros(s, dtype=dtype))
                      for s in ((7,) if flat else (7, 3), (33, 5))]
                for p in ps:
                    p.grad = torch.ones_like(p)
                if name == "clip":
                    fusedopt.clip_grad_norm_(ps, 1.0)
                else:
                    opt = known[name](ps)
                    for _ in range(2):  # a first step may take a variant later ones do not
                        opt.step()
                n = notice.COMPILES.count - c0
                what = f"{n} kernel(s) compiled" if n else "loaded from the cache"
                print(f"{name + ' ' + str(dtype)[6:]:20} {time.perf_counter() - t0:6.1f} s  {what}",
                      flush=True)
    print(f"warmup took {time.perf_counter() - t_all:.1f} s; kernels cached in {_numba_cache()}")
    return 0


def _numba_cache():
    """Where numba keeps fusedopt's compiled kernels (a best guess without a kernel)."""
    try:
        from .kernels import numba_engine
        for fn in numba_engine._kernels.values():
            return os.path.dirname(fn._cache._cache_path + os.sep)
    except (ImportError, AttributeError):
        pass
    return os.environ.get("NUMBA_CACHE_DIR") or "numba's cache"


CHECK_HELP = """\
Parity of Adam, AdamW, RMSprop and SGD against torch.optim and a float64
reference, then the speed of one step against torch's paths and the memory
roof, then a verdict and notes on this machine.

Memory: the speed workloads are sized to stay under 4 GB (and under 60 % of
the memory available): GPT-2-124M's tensors scaled down (~22M params) and
20000 tiny tensors.  GPT-2-124M itself needs ~16 GB:
fusedopt bench --optim adam,sgd --workloads gpt2-124m.

Time: the first run on a machine compiles the CPU kernels (28) and the C++ host
helper, later runs load them.  Measured on a 2-core AMD EPYC VM shared with other
work (load ~10, so wall times are inflated; CPU seconds are the steadier figure):
first run 14 min 47 s wall, 194 s of CPU; a second run 6 min 46 s wall, 95 s of
CPU; peak memory 3.1 GB (docs/first-use.md).  `fusedopt warmup` compiles the
default variants ahead; check's parity cases use others (amsgrad, nesterov,
centered, bfloat16), which it compiles itself, with a line on stderr.
"""


def main(argv=None, cls=None):
    """The ``fusedopt`` command (also ``python -m fusedopt``): ``parity``, ``bench`` or
    ``check``; returns the exit status.  ``cls`` maps optimizer names to classes to test in
    place of fusedopt's (the tests pass mutants)."""
    ap = argparse.ArgumentParser(prog="fusedopt", description="fused optimizer tools")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("parity", help="numerical parity against torch.optim and float64")
    p.add_argument("--optim", help="comma list, e.g. adam,sgd (default: all)")
    p.add_argument("--dtypes", help="comma list of torch dtypes (default: float32,float64,float16,bfloat16)")
    p.add_argument("--backends", help="numba,triton (default: those that run here)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--model", help="module:factory returning a model or params: use its shapes")
    p.add_argument("--quick", action="store_true", help="one flag set per optimizer")
    p.add_argument("--device", help="cpu or cuda (default: cuda if available)")
    p.add_argument("--json")
    b = sub.add_parser("bench", help="time a step against torch's paths and the memory roof")
    b.add_argument("--optim", default="adam", help="comma list of " + ",".join(OPTIMS_HELP))
    b.add_argument("--workloads", default=None, help="gpt2-124m,many-small,tiny,llama-1b; 2-D only "
                   "(Muon): gpt2-124m-hidden,gpt2-block,muon-128x128,moe-64x3")
    b.add_argument("--sizes", help="custom workload, e.g. 4096x4096,1000x100")
    b.add_argument("--repeats", type=int, default=7)
    b.add_argument("--device")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--compile", action="store_true", help="also time a torch.compile'd step (slow to compile)")
    b.add_argument("--json")
    b.add_argument("--plot", help="write a PNG chart")
    c = sub.add_parser("check", help="quick parity + speed on this machine, with a verdict",
                       description=CHECK_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("--json")
    c.add_argument("--plot")
    w = sub.add_parser("warmup", help="compile ahead what a first step compiles (for images, CI)",
                       description=warmup_cmd.__doc__)
    w.add_argument("--optim", help="comma list of " + ",".join(_warmup_optimizers())
                   + ",clip (default: all)")
    w.add_argument("--dtypes", default="float32",
                   help="comma list of param dtypes (default: float32)")
    args = ap.parse_args(argv)
    if args.cmd == "parity":
        return parity_cmd(args, cls)
    if args.cmd == "bench":
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        args.workloads = args.workloads or ("gpt2-124m,tiny" if args.quick
                                            else bench_default_workloads(device))
        if args.quick:
            args.repeats = min(args.repeats, 3)
        return bench_cmd(args)[0]
    if args.cmd == "warmup":
        return warmup_cmd(args)
    return check_cmd(args)


if __name__ == "__main__":
    sys.exit(main())
