"""What the per-step safety checks cost on the host, measured inside real steps.

Rounds alternate, in one process on the same tensors, between the step as it is (the
fast path re-reads the facts of every param, grad and state tensor, host.py, checks that
no grad meets memory the step writes, then moves the params' version counters), the same
without that grads' memory check, the same with the facts read in Python (the fallback
without a compiler), and the same step with the first-wave reads only (grads' addresses
and contiguity, no check, no version bump).  Each step comes after a pass over
as many bytes as the step touches, as after backward in training (cold caches).

    python bench/check_cost.py --workloads many-small,tiny --rounds 15
    python bench/check_cost.py --lookups --workloads tiny --rounds 60   (host.read alone)
"""
import argparse
import time

import numpy as np
import torch

import fusedopt
from fusedopt import bucket, host, optimizer, plan
from fusedopt.workloads import WORKLOADS


def _first_wave(self, params):
    # the reads the first wave made: grads' addresses and contiguity, nothing re-proved
    grads = list(map(bucket._GRAD, params))
    try:
        ptrs = np.fromiter(map(bucket._PTR, grads), np.int64, len(grads))
    except (TypeError, RuntimeError):
        return None
    return ptrs if all(map(bucket._CONTIG, grads)) else None


_CHECKED = plan._Plan.grad_ptrs


def _grads_memory_unchecked(self, params):
    # the full check but for the grads' memory against the memory the step writes
    written, self.written = self.written, None
    try:
        return _CHECKED(self, params)
    finally:
        self.written = written


def _optimizer(cls, shapes, reader):
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape)
    host._native = reader
    opt = cls(params, lr=1e-3)
    opt.step()  # the plan records its facts with this reader
    return opt


def measure(name, shapes, rounds, cls):
    helper = host.native()
    opt, opt_py = _optimizer(cls, shapes, helper), _optimizer(cls, shapes, False)
    flush = torch.empty(sum(s.numel() for s in map(torch.Size, shapes)) * 3)
    checked, bump = plan._Plan.grad_ptrs, optimizer.FusedOptimizer._bump_versions
    modes = {"first wave": (_first_wave, lambda *a: None, helper, opt),
             "checks but grads' memory": (_grads_memory_unchecked, lambda *a: None, helper, opt),
             "checks": (checked, lambda *a: None, helper, opt),
             "checks + versions": (checked, bump, helper, opt),
             "same, read in Python": (checked, bump, False, opt_py)}
    times = {m: [] for m in modes}
    for r in range(rounds):
        for mode in (list(modes)[::-1] if r % 2 else list(modes)):
            plan._Plan.grad_ptrs, optimizer.FusedOptimizer._bump_versions, host._native, o = \
                modes[mode]
            flush.fill_(r)
            t = time.perf_counter()
            o.step()
            times[mode].append(time.perf_counter() - t)
    plan._Plan.grad_ptrs, optimizer.FusedOptimizer._bump_versions = checked, bump
    host._native = helper
    assert all(len(p._plans) == 1 for p in (opt, opt_py))  # no rebuild was timed
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    base = med["first wave"]
    n = len(shapes)
    extra = ", ".join(f"{k} {(med[k] - base) / n * 1e3:+.2f}" for k in list(modes)[1:])
    print(f"{cls.__name__:5} {name:11} {n:6} tensors: first-wave step {base:7.2f} ms; "
          f"us per tensor: {extra}", flush=True)


def lookups(name, shapes, rounds):
    """host.read alone, rounds alternating between no grads' memory check, the check with
    every grad looked up, and the check skipping fresh grads (as a step does where every
    written tensor is an allocation of its own), each after a cache-evicting pass."""
    opt = _optimizer(fusedopt.Adam, shapes, host.native())
    (pl,) = opt._plans.values()
    params = opt.param_groups[0]["params"]
    flush = torch.empty(sum(p.numel() for p in params) * 3)
    modes = {"unchecked": (None, False), "every grad looked up": (pl.written, False),
             "fresh grads skipped": (pl.written, True)}
    times = {m: [] for m in modes}
    for r in range(rounds):
        for mode, (written, owned) in modes.items():
            flush.fill_(r)
            t = time.perf_counter()
            host.read(params, pl.watched, None, written, owned)
            times[mode].append(time.perf_counter() - t)
    base = [np.median(times["unchecked"]), np.percentile(times["unchecked"], 25)]
    print(f"Adam  {name:11} host.read {base[0] * 1e3:.2f} ms (median); added: " + ", ".join(
        f"{m} {(np.median(v) - base[0]) * 1e3:+.2f} / {(np.percentile(v, 25) - base[1]) * 1e3:+.2f} ms"
        for m, v in times.items() if m != "unchecked") + " (median / 25th percentile)", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="many-small,tiny")
    ap.add_argument("--optim", default="adam,sgd")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--lookups", action="store_true", help="time the grads' memory lookups alone")
    args = ap.parse_args()
    if args.lookups:
        for w in args.workloads.split(","):
            lookups(w, WORKLOADS[w](), args.rounds)
        return
    for o in args.optim.split(","):
        cls = {c.lower(): getattr(fusedopt, c) for c in ("Adam", "SGD", "AdamW")}[o]
        for w in args.workloads.split(","):
            measure(w, WORKLOADS[w](), args.rounds, cls)


if __name__ == "__main__":
    main()
