"""What the per-step safety checks cost on the host, measured inside real steps.

Rounds alternate, in one process on the same tensors, between the step as it is (the
fast path re-proves every address: params' addresses, grads' sizes, contiguity; then
moves the params' version counters) and the same step with the first-wave reads only
(grads' addresses and contiguity, no version bump).  Each step comes after a pass over
as many bytes as the step touches, as after backward in training (cold caches).

    python bench/check_cost.py --workloads many-small,tiny --rounds 15
"""
import argparse
import time

import numpy as np
import torch

import fusedopt
from fusedopt import bucket, optimizer
from fusedopt.workloads import WORKLOADS


def _first_wave(self, params):
    # the reads the first wave made: grads' addresses and contiguity, nothing re-proved
    grads = list(map(bucket._GRAD, params))
    try:
        ptrs = np.fromiter(map(bucket._PTR, grads), np.int64, len(grads))
    except (TypeError, RuntimeError):
        return None
    return ptrs if all(map(bucket._CONTIG, grads)) else None


def measure(name, shapes, rounds, cls):
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape)
    opt = cls(params, lr=1e-3)
    opt.step()
    flush = torch.empty(sum(p.numel() for p in params) * 3)
    checked, bump = bucket._Plan.grad_ptrs, optimizer.FusedOptimizer._bump_versions
    modes = {"first wave": (_first_wave, lambda *a: None), "checks": (checked, lambda *a: None),
             "checks + versions": (checked, bump)}
    times = {m: [] for m in modes}
    for r in range(rounds):
        for mode in (list(modes)[::-1] if r % 2 else list(modes)):
            bucket._Plan.grad_ptrs, optimizer.FusedOptimizer._bump_versions = modes[mode]
            flush.fill_(r)
            t = time.perf_counter()
            opt.step()
            times[mode].append(time.perf_counter() - t)
    bucket._Plan.grad_ptrs, optimizer.FusedOptimizer._bump_versions = checked, bump
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    base = med["first wave"]
    extra = ", ".join(f"{k} +{(med[k] - base) / len(params) * 1e3:.2f}" for k in list(modes)[1:])
    print(f"{cls.__name__:5} {name:11} {len(params):6} tensors: first-wave step {base:7.2f} ms; "
          f"us per tensor: {extra}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="many-small,tiny")
    ap.add_argument("--optim", default="adam,sgd")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args()
    for o in args.optim.split(","):
        cls = {c.lower(): getattr(fusedopt, c) for c in ("Adam", "SGD", "AdamW")}[o]
        for w in args.workloads.split(","):
            measure(w, WORKLOADS[w](), args.rounds, cls)


if __name__ == "__main__":
    main()
