"""The Triton kernels compiled ahead of time for an NVIDIA target, without a GPU: the tests
read their PTX for 128-bit loads, IEEE math and register spills."""
from . import triton_engine as te, triton_matrix as tm
from .flags import Matrix, Update
from .triton_base import KINDS, NUM_WARPS, SCALARS, triton


def aot(kernel, sig, const, aligned_args, arch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # what a launch on a GPU treats as constexpr: the AOT build must see the same kernel
    declared = {p.name for p in kernel.params if p.is_constexpr}
    assert declared == set(const), f"constexpr parameters {sorted(declared)} != {sorted(const)}"
    sig.update({n: "constexpr" for n in const})
    attrs = {(kernel.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned_args}
    src = ASTSource(kernel, signature=sig, constexprs=const, attrs=attrs)
    out = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                         options={"num_warps": NUM_WARPS, "enable_fp_fusion": False})
    return out.asm["ptx"], out.metadata


def compile_norm_ptx(dtype="float32", order=2.0, arch=90):
    """The norm kernel compiled ahead of time (as compile_ptx)."""
    kernel = te.norm_jit(False)
    names = ["G", "TID", "CS", "CE"]
    sig = {n: "*i64" for n in names}
    sig.update(PW="fp32", OUT="*fp64" if dtype == "float64" else "*fp32")
    ord_ = {1.0: 1, 2.0: 2, float("inf"): 0}.get(float(order), 3)
    const = {"KIND": KINDS[dtype], "ORD": ord_, "BLOCK": 1024, "EXACT": False}
    return aot(kernel, sig, const, names + ["OUT"], arch)


def compile_ptx(rule, flags, dtype="float32", mask=Update.A | Update.B, arch=90, aligned=True,
                sdtype=None, uniform=True):
    """Compile one kernel ahead of time for an NVIDIA target (no GPU needed); returns
    (ptx, metadata).  The tests read the PTX for 128-bit loads and register spills."""
    kernel = te.build(rule, flags, interpret=False)
    names = ["P", "G", "S0", "S1", "S2", "S3", "A0", "A1", "A2", "R", "TID", "CS", "CE"]
    sig = {n: "*i64" for n in names}
    sig["FI"] = "*fp32"
    sig["Q"] = "*fp32"
    sig["C"] = "*fp64" if dtype == "float64" else "*fp32"
    sig.update({h: "i64" for h in SCALARS})
    const = {"MASK": int(mask), "KIND": KINDS[dtype], "SKIND": KINDS[sdtype or dtype],
             "ALIGNED": aligned, "UNIFORM": uniform, "BLOCK": 1024}
    return aot(kernel, sig, const, names + ["C"], arch)


def compile_matrix_ptx(rule, flags, dtype="float32", mask=Matrix.SLOTS, arch=90, bc=32,
                       aligned=True):
    """The matrix kernel compiled ahead of time (as compile_ptx)."""
    kernel = tm.build_matrix(rule, flags, interpret=False)
    names = ["P", "G", "S0", "S1", "S2", "TID", "RS", "RE", "F", "ROFF", "COFF"]
    sig = {n: "*i64" for n in names}
    f = "*fp64" if dtype == "float64" else "*fp32"
    sig.update(C=f, TOT=f, ROWS=f, CPART=f)
    const = {"MASK": int(mask), "KIND": KINDS[dtype], "SKIND": KINDS[dtype], "BR": 1024 // bc,
             "BC": bc, "ALIGNED": aligned}
    return aot(kernel, sig, const, names + ["C"], arch)
