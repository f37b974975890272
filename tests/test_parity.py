"""Parity matrix: every flag combination x four dtypes x both engines, 20 steps.

Each case trains four param groups that cover maximize x weight_decay (and differ in lr,
betas, ...) on awkward sizes (0, 1, 7, 65537, 1023, 33x17, 2x3x4, many of 3) with
fusedopt, torch.optim(foreach=False) and the float64 reference on identical data.
The criteria and their slack are documented in fusedopt/parity.py (``check``).
"""
import pytest
import torch

from fusedopt import parity, spec

MATRIX = parity.matrix()


@pytest.mark.parametrize("name,case,dtype", MATRIX,
                         ids=[f"{n}[{parity.case_id(c)}]-{str(d)[6:]}" for n, c, d in MATRIX])
def test_parity(name, case, dtype):
    backends = parity.BACKENDS
    if name == "Adafactor" and (case != spec.spec(name).cases[0]
                                or dtype in (torch.float16, torch.bfloat16)):
        # Triton's interpreter takes ~20-40 s per Adafactor case (its matrix kernel, program
        # by program in Python) against ~2 s for Numba: the interpreted engine runs
        # Adafactor's first case in float32 and float64 (half-precision params widen to
        # float32 in the same kernel), Numba every case (bench/gpu.sh runs the compiled one)
        backends = [b for b in backends if b != "triton"]
    result = parity.check(name, case, dtype, backends=backends)
    assert result["ok"], result["failures"]
