"""Benchmark fusedopt's step against torch's for-loop, foreach and fused steps on this machine.

    python bench/bench.py                      # Adam on gpt2-124m, many-small, tiny
    python bench/bench.py --optim adam,rmsprop,adagrad,sgd --json bench/results/cpu.json

The same run also measures this machine's memory roof (see fusedopt.benchmark) and the
first step's time in a fresh process, with an empty and with a warm kernel cache.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

from fusedopt import benchmark

FIRST_STEP = """
import time, torch, fusedopt
ps = [torch.nn.Parameter(torch.randn(1000)) for _ in range(4)]
for p in ps: p.grad = torch.randn(1000)
opt = fusedopt.Adam(ps)
t0 = time.perf_counter(); opt.step(); print(time.perf_counter() - t0)
"""


def first_step_times():
    """Seconds for the first step in a fresh process: with an empty cache (compiles) and
    again with the cache that run left (loads)."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        out = [float(subprocess.run([sys.executable, "-c", FIRST_STEP], env=env, check=True,
                                    capture_output=True, text=True).stdout) for _ in range(2)]
    return {"cold_first_step_s": out[0], "warm_first_step_s": out[1]}


def machine():
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    try:
        import numba
        import triton
        info.update(numba=numba.__version__, triton=triton.__version__)
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
    else:
        try:
            cpu = [line for line in open("/proc/cpuinfo") if line.startswith("model name")]
            info["device"] = cpu[0].split(":", 1)[1].strip() if cpu else platform.processor()
        except OSError:
            info["device"] = platform.processor()
    return info


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optim", default="adam")
    ap.add_argument("--workloads", default="gpt2-124m,many-small,tiny")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for optim in args.optim.split(","):
        for wl in args.workloads.split(","):
            rows += benchmark.bench_one(optim, wl, device, args.repeats,
                                        progress=lambda m: print("  ..", m, file=sys.stderr))
    print(benchmark.format_table(rows))
    extra = first_step_times() if device.type == "cpu" else {}
    for k, v in extra.items():
        print(f"{k}: {v:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine(), "rows": rows, **extra}, f, indent=1)


if __name__ == "__main__":
    main()
