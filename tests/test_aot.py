"""Every Triton kernel compiles ahead of time for sm_80 and sm_90 (no GPU needed), and the
float32 PTX moves data with 128-bit vector loads and stores and spills nothing."""
import json
import os
import subprocess
import sys

import pytest

import fusedopt  # noqa: F401  (defining the classes registers their specs)
from fusedopt import spec
from fusedopt.kernels import rules
from fusedopt.kernels.flags import SLOT, Update, update_mask

# with the README's `--dist loadgroup`, every test here runs on one xdist worker, which pays
# update_ptx's compiles once (under -n's default, "load", each worker that got one of these
# tests compiled them all)
pytestmark = pytest.mark.xdist_group("aot")

# one representative flag set per rule, from the spec of the class that runs it (every flag
# on that the rule reads, and the state slots it uses: flags.Update); Adafactor's is the
# update kernel over the rule alone (fusedopt runs it in the matrix kernel:
# test_matrix_kernel_compiles)
VARIANTS = {cls._rule: cls.spec.aot for cls in spec.REGISTRY.values() if cls.spec.aot}
VARIANTS["scale"] = ({}, 0)  # clip_grad_norm_'s multiply
VARIANTS["schedulefree_swap"] = ({}, 1)  # schedule-free's train()/eval(): slot a is z
VARIANTS["muon_update"] = ({}, 0)  # Muon's second pass (its first, muon_momentum: its spec's)


# The update kernel's variants are compiled in one process of their own without
# TRITON_INTERPRET (as the norm and matrix kernels' below): in this one, a Triton function
# the interpreter ran directly leaves triton.language patched, and compiling then fails
# in triton's code generator ("'block_argument' object has no attribute 'get_element_ty'")
UPDATE_AOT = """
import json, re, sys
from fusedopt.kernels import rules, triton_aot as te
variants = json.loads(sys.argv[1])
out = {}
for key, (rule, on, mask, arch, dtype, sdtype, checks) in variants.items():
    flags = tuple(sorted(dict(dict.fromkeys(rules.FLAGS, False), **on).items()))
    try:
        ptx, _ = te.compile_ptx(rule, flags, dtype, mask, arch, sdtype=sdtype)
        for name, pattern, want in checks:
            if bool(re.search(pattern, ptx)) != want:
                raise AssertionError(name)
        out[key] = "ok"
    except Exception as e:
        out[key] = f"{type(e).__name__}: {str(e)[-1500:]}"
print(json.dumps(out))
"""
VEC_LOADS = ("no 128-bit loads", r"ld\.global(\.\w+)*\.v4\.b32", True)
VEC_STORES = ("no 128-bit stores", r"st\.global(\.\w+)*\.v4\.b32", True)
APPROX = ("approximate math", r"div\.full|sqrt\.approx", False)
SPILLS = ("register spills", r"ld\.local|st\.local", False)
HASH32 = ("the hash on 32-bit integers", r"mul\.lo\.[su]32", True)


def _dtypes(arch, amp):
    # float32 for every arch and amp (the PTX checks); the other dtypes compile (no checks)
    # once per arch, with amp on at sm_80 and off at sm_90: each of the ~260 compiles of
    # every dtype everywhere cost CI ~0.6 s
    return ("float32",) + (("float64", "float16", "bfloat16") if amp == (arch == 80) else ())


def _update_variants():
    out = {}
    for rule in sorted(rules.RULES):
        on, mask = VARIANTS.get(rule, ({}, 0))
        for arch in (80, 90):
            for amp in (False, True):
                flags = dict(on, SCALE_GRAD=amp, WRITE_GRAD=amp, FOUND_INF=amp)
                for dtype in _dtypes(arch, amp):
                    checks = (VEC_LOADS, VEC_STORES, APPROX, SPILLS) if dtype == "float32" else ()
                    out[f"{rule}-{arch}-{amp}-{dtype}"] = (rule, flags, mask, arch, dtype, None,
                                                          checks)
        # bfloat16 params, float32 state: a master copy, SR, or the master as the param and
        # its remainder (master_weights="remainder")
        for sr in (False, True, "remainder"):
            flags = dict(on, STOCH_ROUND=sr is True, SCALE_GRAD=True, WRITE_GRAD=True)
            checks = (VEC_LOADS, SPILLS) + ((HASH32,) if sr is True else ())
            master = 0 if sr is True else Update.MASTER | (Update.REMAINDER if sr else 0)
            out[f"{rule}-mixed-{sr}"] = (rule, flags, mask | master, 90, "bfloat16", "float32",
                                         checks)
        used = [bool(mask & s) for s in SLOT]
        if any(used):  # 8-bit state: every slot as codes, the first with the signed map
            for arch in (80, 90):
                for bits in (8, 4):  # (4: two codes a byte, flags.Codes.FOUR)
                    out[f"{rule}-{bits}bit-{arch}"] = (
                        rule, on, update_mask(used, False, used, (True,), four=bits == 4),
                        arch, "float32", "float32", (VEC_LOADS, APPROX, SPILLS))
    return out


def _needs(item):
    # the variant keys a test of this module reads from update_ptx (none for the others)
    p = getattr(item, "callspec", None) and item.callspec.params
    name = getattr(item, "originalname", "")
    if name == "test_compiles_with_vector_loads":
        return [f"{p['rule']}-{p['arch']}-{p['amp']}-{d}" for d in _dtypes(p["arch"], p["amp"])]
    if name == "test_8bit_state_compiles":
        return [f"{p['rule']}-8bit-{p['arch']}"]
    if name == "test_4bit_state_compiles":
        return [f"{p['rule']}-4bit-{p['arch']}"]
    if name == "test_mixed_precision_compiles":
        return [f"{p['rule']}-mixed-{p['sr']}"]
    return []


@pytest.fixture(scope="module")
def update_ptx(request):
    # only the variants the session's selected tests read (the quick tier's few, --full's
    # all; ~0.6 s each): a test whose key was left out would fail on the missing key
    wanted = {k for item in request.session.items for k in _needs(item)}
    variants = {k: v for k, v in _update_variants().items() if k in wanted}
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", UPDATE_AOT, json.dumps(variants)], env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("amp", [False, True], ids=["plain", "gradscaler"])
@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("rule", sorted(rules.RULES))
def test_compiles_with_vector_loads(update_ptx, rule, arch, amp):
    """float32: 128-bit loads and stores, IEEE division and square root, no spills; float64,
    float16 and bfloat16 compile (at sm_80 with amp, at sm_90 without).  amp: the engine's
    GradScaler flags on (unscale and write back the gradient, read found_inf on the
    device)."""
    assert rule in VARIANTS, "every rule needs an AOT variant here"
    for dtype in _dtypes(arch, amp):
        assert update_ptx[f"{rule}-{arch}-{amp}-{dtype}"] == "ok", dtype


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("rule", sorted(r for r in rules.RULES if VARIANTS.get(r, ({}, 0))[1]))
def test_8bit_state_compiles(update_ptx, rule, arch):
    """8-bit state (dequantize, rule, per-block absmax, requantize in one launch): float32
    params still move with 128-bit loads, the math is IEEE, nothing spills."""
    assert update_ptx[f"{rule}-8bit-{arch}"] == "ok"


@pytest.mark.parametrize("arch", [80, 90])
@pytest.mark.parametrize("rule", sorted(r for r in rules.RULES if VARIANTS.get(r, ({}, 0))[1]))
def test_4bit_state_compiles(update_ptx, rule, arch):
    """4-bit state (two codes a byte, blocks of 128) compiles as 8-bit state does: 128-bit
    loads of the float32 params, IEEE math, no spills."""
    assert update_ptx[f"{rule}-4bit-{arch}"] == "ok"


NORM_AOT = """
import sys
from fusedopt.kernels import triton_aot as te
for arch in (80, 90):
    for order in (2.0, 1.0, float("inf"), 3.5):
        for dtype in ("float32", "float64", "float16", "bfloat16"):
            ptx, _ = te.compile_norm_ptx(dtype, order, arch)
            assert "ld.global" in ptx, (arch, order, dtype)
            assert "ld.local" not in ptx and "st.local" not in ptx, ("spills", arch, order, dtype)
print("compiled", 2 * 4 * 4)
"""


def test_norm_kernel_compiles():
    """clip_grad_norm_'s reduction compiles for every order, dtype and both archs, with no
    spills.  In a process of its own without TRITON_INTERPRET: in this one (set by
    conftest for the interpreted tests), compiling this kernel twice failed in triton's
    code generator."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", NORM_AOT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "compiled 32" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("sr", [False, True, "remainder"], ids=["master", "stochastic",
                                                                "remainder"])
@pytest.mark.parametrize("rule", sorted(set(rules.RULES) - {"scale"}))
def test_mixed_precision_compiles(update_ptx, rule, sr):
    """bfloat16 params and grads with float32 state: with a float32 master copy (Update.MASTER
    3), rounded stochastically, or with the master joined from the param and its int16
    remainder (Update.REMAINDER).  Vector loads of both widths, no spills; the stochastic
    rounding's hash on 32-bit integers."""
    assert update_ptx[f"{rule}-mixed-{sr}"] == "ok"


MATRIX_AOT = """
from fusedopt.kernels import rules, triton_aot as tm
from fusedopt.kernels.flags import Matrix
n = 0
for arch in (80, 90):
    for extra, mask in (({}, Matrix.SLOTS), (dict(REDUCE=True), 0),
                        (dict(REDUCE=True, ROW_LERP=True), 0),
                        (dict(REDUCE=True, SECOND=True), Matrix.SLOTS | Matrix.TOTAL_ONLY),
                        (dict(SCALE_GRAD=True, WRITE_GRAD=True,
                              L1=True), Matrix.SLOTS)):
        flags = dict(dict.fromkeys(rules.FLAGS, False), DECOUPLED=True, **extra)
        for dtype in ("float32", "float64", "float16", "bfloat16"):
            ptx, _ = tm.compile_matrix_ptx("adafactor", tuple(sorted(flags.items())), dtype,
                                           mask, arch)
            # (ALIGNED, the default here: wide tiles load 128 bits at a time)
            vec = "ld.global.v2.b64" if dtype == "float64" else "ld.global.v4.b32"
            assert vec in ptx, ("no 128-bit loads", arch, extra, dtype)
            if not extra.get("REDUCE"):  # (the storing kernels: 128-bit stores too)
                assert vec.replace("ld", "st") in ptx, ("no 128-bit stores", arch, extra, dtype)
            assert "ld.local" not in ptx and "st.local" not in ptx, ("spills", arch, extra, dtype)
            assert "div.full" not in ptx and "sqrt.approx" not in ptx, ("approx", arch, extra)
            n += 1
print("compiled", n)
"""


def test_matrix_kernel_compiles():
    """The matrix kernel (the general reduction pass, Adafactor's update) compiles for
    both archs, every dtype, storing and reducing (with and without the row factors'
    lerp, ROW_LERP: Adafactor's first pass), with 128-bit loads and stores of p and g
    (ALIGNED: Tables.aligned decides it), IEEE division and square root
    and no spills.  In a process of its own, as the norm kernel's test."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, "-c", MATRIX_AOT], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0 and "compiled 40" in proc.stdout, proc.stderr[-3000:]
