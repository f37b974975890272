"""A torch.profiler summary of optimizer steps: what the host and the device do in one
steady-state step (eager, not capturable), fusedopt beside torch's fused Adam.

    python bench/profile_step.py --workload gpt2-124m --out bench/results/profile.txt
"""
import argparse

import torch
from torch.profiler import ProfilerActivity, profile

import fusedopt
from fusedopt.benchmark import _make
from fusedopt.workloads import WORKLOADS


def summary(opt, device, steps):
    for _ in range(3):  # plans built, kernels compiled
        opt.step()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(steps):
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=15)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="gpt2-124m", choices=list(WORKLOADS))
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    device = torch.device(a.device)
    shapes = WORKLOADS[a.workload]()
    text = [f"{a.workload} ({len(shapes)} tensors) on {device}, {a.steps} steps each\n"]
    for label, make in (("fusedopt.Adam", lambda ps: fusedopt.Adam(ps, lr=1e-3)),
                        ("torch.optim.Adam(fused=True)",
                         lambda ps: torch.optim.Adam(ps, lr=1e-3, fused=True))):
        text.append(f"== {label}\n{summary(make(_make(shapes, device)), device, a.steps)}\n")
    out = "\n".join(text)
    print(out)
    if a.out:
        with open(a.out, "w") as f:
            f.write(out)


if __name__ == "__main__":
    main()
