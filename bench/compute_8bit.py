"""Is the CPU's 8-bit step bound by arithmetic or by memory?  AdamW's step time per param
with 8-bit and with float32 state, on a tensor whose step's bytes fit in L3 (2^20 params:
~10 MiB 8-bit, ~20 MiB float32) and on one that streams from memory (2^25 params), side
by side in rounds (median).  A step bound by arithmetic takes about the same time per
param in both; one bound by memory is several times faster in cache.

    python bench/compute_8bit.py --rounds 7
"""
import argparse
import statistics
import time

import torch

import fusedopt

SIZES = {"in L3 (2^20)": (1 << 20, 30), "from memory (2^25)": (1 << 25, 1)}  # params, steps


def _step(n, state_dtype):
    gen = torch.Generator().manual_seed(0)
    p = torch.nn.Parameter(torch.randn(n, generator=gen))
    p.grad = torch.randn(n, generator=gen)
    opt = fusedopt.AdamW([p], lr=1e-3, state_dtype=state_dtype)
    for _ in range(3):  # compilation, the plan, the state
        opt.step()
    return opt.step


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    a = ap.parse_args(argv)
    runs = {(where, name): (_step(n, dt), n, steps)
            for where, (n, steps) in SIZES.items()
            for name, dt in (("8-bit", torch.uint8), ("float32", torch.float32))}
    times = {k: [] for k in runs}
    for _ in range(a.rounds):
        for k, (step, n, steps) in runs.items():
            t = time.perf_counter()
            for _ in range(steps):
                step()
            times[k].append((time.perf_counter() - t) / steps / n * 1e9)
    print(f"AdamW step, ns per param (median of {a.rounds} rounds, "
          f"{torch.get_num_threads()} threads)")
    for (where, name), v in times.items():
        print(f"  {name:8} {where:20} {statistics.median(v):6.3f}")


if __name__ == "__main__":
    main()
