"""``fusedopt parity | bench | check``: the user-facing tools."""
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


def parity_cmd(args, cls=None):
    """``fusedopt parity``: every optimizer x flag set x dtype x engine against torch.optim's
    for-loop and the float64 reference; prints one line per case and returns 1 if any fails."""
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
    from . import versions
    print(versions.describe())
    if device == "cpu":  # which side is off where torch and fusedopt differ (fusedopt/arith.py)
        from . import arith
        off = arith.describe()
        print("\n".join(off) if off else "torch's elementary ops (sqrt, multiply-adds, division) "
              "on this machine are correctly rounded")
        if "triton" in backends:  # and Triton's interpreter (kernels/triton_interp.py)
            from .kernels import triton_interp
            interp_off = triton_interp.describe()
            print("\n".join(interp_off) if interp_off else "Triton's interpreter computes tl.fma, "
                  "div_rn and sqrt_rn correctly rounded, as compiled Triton does")
        print()
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
               "adamw-8bit (state_dtype=torch.uint8 vs bitsandbytes, torchao where installed)")


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
    rows = []
    t0 = time.time()
    for optim in optims:
        for wl in workloads:
            try:
                new = benchmark.bench_one(optim, wl, device, args.repeats, shapes=custom,
                                          compile_step=args.compile, progress=_progress)
            except torch.OutOfMemoryError as e:  # one workload too big: report, go on
                _progress(f"{optim} on {wl} skipped: {str(e).splitlines()[0]}")
                continue
            rows += new
            _progress("\n" + benchmark.format_table(new))  # a long run shows figures as it goes
            if args.json:  # and leaves them behind if it is cut short
                with open(args.json, "w") as f:
                    json.dump({"machine": benchmark.machine(), "rows": rows}, f, indent=1)
    print(benchmark.format_table(rows))
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


def check_cmd(args):
    """Quick parity and speed on this machine, then a verdict table."""
    ns = argparse.Namespace(optim="adam,adamw,rmsprop,sgd", dtypes="float32,bfloat16", backends=None,
                            steps=5, model=None, quick=True, json=None, device=None)
    print("== parity: fusedopt vs torch.optim vs float64 reference ==")
    parity_failed = parity_cmd(ns)
    print("\n== speed: one optimizer step, fusedopt vs torch ==")
    bs = argparse.Namespace(optim="adam,sgd", workloads="gpt2-124m,tiny", repeats=3, device=None,
                            quick=True, sizes=None, compile=False, json=args.json, plot=args.plot)
    _, rows = bench_cmd(bs)
    print("\n== verdict ==")
    from . import versions
    off = versions.untested()
    # torch's CPU ops and Triton's interpreter are replayed correctly rounded where they are
    # not (the lines above the parity table): a FAIL is the engines', on tested versions
    print(f"parity: {'PASS' if not parity_failed else 'FAIL'}"
          + (f" (untested here: {', '.join(off)}; the tested ranges: pyproject.toml)" if off else ""))
    for r in rows:
        if r["impl"].startswith("fusedopt"):
            print(f"{r['optimizer']:5} {r['workload']:10} {r['impl']:14} {r['ms']:8.2f} ms  "
                  f"{r['speedup_vs_best_torch']:6.2f}x torch's best  {r['pct_of_roof']:5.1f}% of roof")
    return parity_failed


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
    b.add_argument("--workloads", default=None, help="gpt2-124m,many-small,tiny,llama-1b")
    b.add_argument("--sizes", help="custom workload, e.g. 4096x4096,1000x100")
    b.add_argument("--repeats", type=int, default=7)
    b.add_argument("--device")
    b.add_argument("--quick", action="store_true")
    b.add_argument("--compile", action="store_true", help="also time a torch.compile'd step (slow to compile)")
    b.add_argument("--json")
    b.add_argument("--plot", help="write a PNG chart")
    c = sub.add_parser("check", help="quick parity + speed on this machine, with a verdict")
    c.add_argument("--json")
    c.add_argument("--plot")
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
    return check_cmd(args)


if __name__ == "__main__":
    sys.exit(main())
