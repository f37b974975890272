"""What share of a fusedopt.Muon step the Newton-Schulz matmuls take, per workload: the
step timed whole, and the batched Newton-Schulz calls inside it timed apart (the rest is
the two fused engine passes, the stacks' bfloat16 conversions and the host's checks).

    python bench/muon_share.py --workloads muon-128x128,moe-64x3,gpt2-block --repeats 2
"""
import argparse
import statistics
import time

import torch

import fusedopt
from fusedopt import muon
from fusedopt.benchmark import _make
from fusedopt.workloads import WORKLOADS


def share(shapes, repeats, device="cpu"):
    ps = _make(shapes, torch.device(device))
    opt = fusedopt.Muon(ps, lr=2e-2)
    spent, real = [0.0], muon.newton_schulz

    def timed(*args):
        t = time.perf_counter()
        out = real(*args)
        if device != "cpu":
            torch.cuda.synchronize()
        spent[0] += time.perf_counter() - t
        return out

    muon.newton_schulz = timed
    try:
        opt.step()  # warm-up: the kernels compiled or loaded, the plan built
        steps, ns = [], []
        for _ in range(repeats):
            spent[0] = 0.0
            t = time.perf_counter()
            opt.step()
            steps.append(time.perf_counter() - t)
            ns.append(spent[0])
    finally:
        muon.newton_schulz = real
    return statistics.median(steps), statistics.median(ns)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workloads", default="muon-128x128,moe-64x3,gpt2-block")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    print(f"{'workload':18} {'step ms':>10} {'NS ms':>10} {'NS share':>9}")
    for wl in args.workloads.split(","):
        step, ns = share(WORKLOADS[wl](), args.repeats)
        print(f"{wl:18} {step * 1e3:10.1f} {ns * 1e3:10.1f} {100 * ns / step:8.1f}%")


if __name__ == "__main__":
    main()
