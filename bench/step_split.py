"""Where a CPU step's time goes: the engine's kernel, the host's reads of the gradients'
addresses, and the rest, each timed inside real steps.

Every round first streams over as many bytes as the step (the roof's pass, which is
timed too), so the step starts with cold caches as it does after backward in training;
the last row times the address reads again in a warm loop.  "kernel" is the engine call
with what the bucket does around it (coefficients into the table).  One param group of
one dtype (the workloads'), so each step makes one address read and one engine call.

    python bench/step_split.py --optim sgd --workload many-small --rounds 25
"""
import argparse
import collections
import math
import statistics
import time

import torch

import fusedopt
from fusedopt import bucket
from fusedopt import plan as plans
from fusedopt.benchmark import OPTIMS, _make, roof
from fusedopt.workloads import WORKLOADS


def _timed(obj, name, label, times):
    fn = getattr(obj, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        times[label].append(time.perf_counter() - t)
        return out
    setattr(obj, name, wrapper)
    return lambda: setattr(obj, name, fn)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--optim", default="sgd", choices=[k for k, v in OPTIMS.items() if "-" not in k])
    ap.add_argument("--workload", default="many-small", choices=list(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=25)
    a = ap.parse_args(argv)
    cls_name, hp, (reads, writes) = OPTIMS[a.optim]
    shapes = WORKLOADS[a.workload]()
    params = _make(shapes, torch.device("cpu"))
    opt = getattr(fusedopt, cls_name)(params, **hp)
    flush, _ = roof(sum(math.prod(s) for s in shapes), reads, writes, torch.device("cpu"))
    for _ in range(2):
        opt.step()
        flush()
    times = collections.defaultdict(list)
    undo = [_timed(plans._Plan, "grad_ptrs", "address reads (cold)", times),
            _timed(bucket._Bucket, "run", "kernel", times)]
    try:
        for _ in range(a.rounds):
            t = time.perf_counter()
            flush()
            times["roof"].append(time.perf_counter() - t)
            t = time.perf_counter()
            opt.step()
            times["whole step"].append(time.perf_counter() - t)
            # per round, not from the medians: the parts are nested in this step
            times["rest of the step"].append(times["whole step"][-1] - times["kernel"][-1]
                                             - times["address reads (cold)"][-1])
    finally:
        for u in undo:
            u()
    plan = opt._plans[id(opt.param_groups[0])]
    for _ in range(a.rounds):
        t = time.perf_counter()
        plan.grad_ptrs(params)
        times["address reads (warm)"].append(time.perf_counter() - t)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    med["smallest rest"] = min(times["rest of the step"]) * 1e3
    print(f"{a.optim} on {a.workload}: {len(shapes)} tensors, median of {a.rounds} rounds (ms)")
    for k in ("roof", "whole step", "kernel", "address reads (cold)", "rest of the step",
              "address reads (warm)"):
        print(f"  {k:22} {med[k]:8.2f}")
    return med


if __name__ == "__main__":
    main()
