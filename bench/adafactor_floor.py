"""Adafactor's CPU step against the memory roof and against the floor of its own passes.

The roof (fusedopt bench) is one in-place stream over the step's bytes, 5 reads and 1
write per param.  Adafactor cannot be one pass: its update needs the column sums of the
whole gradient, then the norm of the whole update.  Its three passes are streams of their
own: read p and g (sums of squares), read g (the update's norm), read p and g and write p
(the update).  Timed here side by side, in rounds (median over rounds), with the step:
their sum is the floor of a three-pass step on this machine, whatever its arithmetic.
Each pass's engine call inside the step is timed too (CPU engine).

    python bench/adafactor_floor.py --workload gpt2-124m --rounds 9
"""
import argparse
import math
import statistics
import time

import torch

import fusedopt
from fusedopt.benchmark import _make
from fusedopt.workloads import WORKLOADS
from fusedopt.kernels import numba_matrix, roofline


def _passes(times):
    # time each engine call of the step, named by its pass (rules.adafactor's flags)
    run = numba_matrix.run_matrix

    def timed(rule, flags, *args):
        f = dict(flags)
        name = "pass 3 kernel" if not f["REDUCE"] else \
            "pass 2 kernel" if f["SECOND"] else "pass 1 kernel"
        t = time.perf_counter()
        run(rule, flags, *args)
        times.setdefault(name, []).append(time.perf_counter() - t)
    numba_matrix.run_matrix = timed


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="gpt2-124m", choices=list(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=9)
    a = ap.parse_args(argv)
    shapes = WORKLOADS[a.workload]()
    n = sum(math.prod(s) for s in shapes)
    params = _make(shapes, torch.device("cpu"))
    opt = fusedopt.Adafactor(params, lr=1e-2)
    bufs = [torch.ones(n).numpy() for _ in range(5)]
    runs = {"roof (5 reads, 1 write)": lambda: roofline.stream(5, 1)(*bufs),
            "pass 1 stream (read 2)": lambda: roofline.stream(2, 0)(*bufs[:2]),
            "pass 2 stream (read 1)": lambda: roofline.stream(1, 0)(bufs[0]),
            "pass 3 stream (2 reads, 1 write)": lambda: roofline.stream(2, 1)(*bufs[:2]),
            "fusedopt Adafactor step": opt.step}
    for fn in runs.values():  # warm-up (compilation, the plan)
        fn()
        fn()
    times = {k: [] for k in runs}
    _passes(times)
    for _ in range(a.rounds):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    roof, step = med["roof (5 reads, 1 write)"], med["fusedopt Adafactor step"]
    floor = sum(v for k, v in med.items() if " stream " in k)
    print(f"Adafactor on {a.workload}: {n / 1e6:.1f}M params, 24 B each, median of "
          f"{a.rounds} rounds (ms)")
    nbytes = dict(zip(runs, (24, 8, 4, 12, 24)))  # per param
    for k, v in med.items():
        if k.endswith("kernel"):
            continue
        print(f"  {k:34} {v:8.2f}  {nbytes[k] * n / v / 1e6:6.1f} GB/s")
    print(f"  {'floor: the three passes streams':34} {floor:8.2f}")
    for k in sorted(k for k in med if k.endswith("kernel")):
        print(f"  {k + ' (in the step)':34} {med[k]:8.2f}")
    print(f"floor {100 * roof / floor:.0f} % of the roof; the step {100 * roof / step:.0f} % "
          f"of the roof, {100 * floor / step:.0f} % of the floor")


if __name__ == "__main__":
    main()
