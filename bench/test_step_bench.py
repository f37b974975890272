"""pytest-benchmark suite: one benchmark per optimizer x workload x implementation.

    pytest bench/ --benchmark-only                       # run
    pytest bench/ --benchmark-only --benchmark-autosave  # save, then after a change:
    pytest bench/ --benchmark-only --benchmark-compare   # compare with the saved run

Groups are "<optimizer>-<workload>", so a comparison lines up implementations of the same
step.  Not part of the CI test run (CI runs tests/).  FUSEDOPT_BENCH_WORKLOADS picks the
workloads (default: many-small,tiny; gpt2-124m needs ~10 GB).
"""
import os

import pytest
import torch

import fusedopt
from fusedopt.benchmark import MIXED, OPTIMS, TORCH_FUSED, _make
from fusedopt.workloads import WORKLOADS

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
WL = os.environ.get("FUSEDOPT_BENCH_WORKLOADS", "many-small,tiny").split(",")
CASES = [(o, w, impl) for o in OPTIMS if o not in MIXED for w in WL
         for impl in ("torch-forloop", "torch-foreach", "torch-fused", "fusedopt")
         if impl != "torch-fused" or OPTIMS[o][0] in TORCH_FUSED
         if impl == "fusedopt" or getattr(torch.optim, OPTIMS[o][0], None)]  # Lion: not in torch


@pytest.mark.parametrize("optim,workload,impl", CASES)
def test_step(benchmark, optim, workload, impl):
    cls_name, hp, _ = OPTIMS[optim]
    kw = {"torch-forloop": dict(foreach=False), "torch-foreach": dict(foreach=True),
          "torch-fused": dict(fused=True), "fusedopt": {}}[impl]
    cls = getattr(fusedopt if impl == "fusedopt" else torch.optim, cls_name)
    opt = cls(_make(WORKLOADS[workload](), DEVICE), **hp, **kw)
    opt.step()
    benchmark.group = f"{optim}-{workload}"
    if DEVICE.type == "cuda":
        def step():
            opt.step()
            torch.cuda.synchronize()
        benchmark(step)
    else:
        benchmark(opt.step)
