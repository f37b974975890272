"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed), and the
float32 PTX moves data with 128-bit vector loads and stores and spills nothing."""
import re

import pytest

from fusedopt.kernels import rules, triton_engine

# one representative flag set per rule: every flag on that the rule reads
VARIANTS = {
    "adam": (dict(AMSGRAD=True, WEIGHT_DECAY=True, MAXIMIZE=True, L1=True, LERP_SMALL=True), 7),
    "adamax": (dict(WEIGHT_DECAY=True, LERP_SMALL=False), 3),
    "rmsprop": (dict(CENTERED=True, MOMENTUM=True, WEIGHT_DECAY=True), 7),
    "adagrad": (dict(WEIGHT_DECAY=True, L1=True), 1),
    "sgd": (dict(MOMENTUM=True, NESTEROV=True), 1),
}


def _flags(on):
    flags = dict.fromkeys(rules.FLAGS, False)
    flags.update(on)
    return tuple(sorted(flags.items()))


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("rule", sorted(rules.RULES))
def test_compiles_with_vector_loads(rule, arch):
    te = triton_engine
    assert rule in VARIANTS, "every rule needs an AOT variant here"
    on, mask = VARIANTS[rule]
    ptx, meta = te.compile_ptx(rule, _flags(on), "float32", mask, arch)
    assert re.search(r"ld\.global(\.\w+)*\.v4\.b32", ptx), "no 128-bit loads"
    assert re.search(r"st\.global(\.\w+)*\.v4\.b32", ptx), "no 128-bit stores"
    assert "div.full" not in ptx and "sqrt.approx" not in ptx, "approximate math"
    assert "ld.local" not in ptx and "st.local" not in ptx, "register spills"
    for dtype in ("float64", "float16", "bfloat16"):
        te.compile_ptx(rule, _flags(on), dtype, mask, arch)
