"""What every Numba kernel shares: the JIT settings, the pointer and bit-cast intrinsics,
dtype IO (bfloat16 and float16 held as uint16, converted by integer operations: numba has
no CPU arithmetic for them), stochastic rounding, the coefficients' row, the rule binding,
the compiled kernels' table and the on-disk cache key.

numba_engine (the update and norm kernels), numba_quant (8-bit slots) and numba_matrix
import from here and never from each other, except numba_engine from numba_quant and
numba_quant from numba_quant4.
"""
import ast
import functools
import hashlib
import os
import pathlib
import types

import numba
import numpy as np
from numba import types as nt
from numba.core import cgutils
from numba.extending import intrinsic

from . import coefficients, numba_ops, rules

JIT = dict(error_model="numpy", nogil=True)


@intrinsic
def voidptr(typingctx, addr):
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return nt.voidptr(nt.int64), codegen


@intrinsic
def f32_bits(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(nt.uint32))
    return nt.uint32(nt.float32), codegen


@intrinsic
def bits_f32(typingctx, u):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(nt.float32))
    return nt.float32(nt.uint32), codegen


_TWO112 = np.float32(2.0 ** 112)
_HALF = np.float32(0.5)


@numba.njit(inline="always", **JIT)
def same(x):
    return x


@numba.njit(inline="always", **JIT)
def bf16_to_f32(h):
    return bits_f32(np.uint32(h) << np.uint32(16))


@numba.njit(inline="always", **JIT)
def f32_to_bf16(f):
    # round to nearest even; NaN becomes torch's 0x7FC0
    u = np.int64(f32_bits(f))
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return np.uint16(0x7FC0)
    return np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)


@numba.njit(inline="always", **JIT)
def f16_to_f32(h):
    h = np.int64(h)
    sign = np.uint32((h & 0x8000) << 16)
    em = h & 0x7FFF
    if em >= 0x7C00:  # inf / NaN
        return bits_f32(sign | np.uint32(0x7F800000 | ((em & 0x3FF) << 13)))
    # the fp16 bits shifted into a float32 are the value times 2**-112, subnormals included
    f = bits_f32(np.uint32(em << 13)) * _TWO112
    return bits_f32(f32_bits(f) | sign)


@numba.njit(inline="always", **JIT)
def f32_to_f16(f):
    u = np.int64(f32_bits(f))
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a >= 0x47800000:  # >= 2**16: inf, or NaN (quiet, sign kept, as c10::Half)
        o = 0x7E00 if a > 0x7F800000 else 0x7C00
    elif a < 0x38800000:  # below 2**-14: adding 0.5 rounds to the fp16 subnormal grid
        o = np.int64(f32_bits(bits_f32(np.uint32(a)) + _HALF)) - 0x3F000000
    else:
        o = (a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13
    return np.uint16(o | sign)


@numba.njit(inline="always", **JIT)
def join_master(h, r):
    # master_weights="remainder" (fusedopt/remainder.py's scheme): the float32 master of a
    # bfloat16 param's bits h and its remainder's bits r (both uint16); a negative
    # remainder (r's top bit) marks a carry the split added to the param, taken back here
    u = (((np.int64(h) - (np.int64(r) >> 15)) & 0xFFFF) << 16) | np.int64(r)
    return bits_f32(np.uint32(u))


@numba.njit(inline="always", **JIT)
def split_master(f):
    # the inverse of join_master: the param is the upper half rounded to nearest, ties away
    # from zero (a bijection, as round-to-nearest-even cannot be); NaN: torch's 0x7FC0, 0
    u = np.int64(f32_bits(f))
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return np.uint16(0x7FC0), np.uint16(0)
    lo = u & 0xFFFF
    return np.uint16(((u >> 16) + (lo >> 15)) & 0xFFFF), np.uint16(lo)


# storage dtype, (load, store) per torch dtype name
IO = {
    "float32": (np.float32, same, same),
    "float64": (np.float64, same, same),
    "float16": (np.uint16, f16_to_f32, f32_to_f16),
    "bfloat16": (np.uint16, bf16_to_f32, f32_to_bf16),
}


_M32 = 0xFFFFFFFF


@numba.njit(inline="always", **JIT)
def fmix32(h):
    # murmur3's finalizer on 32 bits kept in an int64 (a product of two 32-bit values wraps
    # the same in its low 32 bits as uint32 arithmetic would)
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


@numba.njit(inline="always", **JIT)
def f32_to_bf16_stochastic(f, index, key):
    # unbiased: add 16 random bits below the kept ones, then truncate (a value already on
    # the bf16 grid never moves); the bits come from (key, element index) alone, so both
    # engines draw the same ones
    u = np.int64(f32_bits(f))
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return np.uint16(0x7FC0)
    r = fmix32(fmix32(index & _M32) ^ key) & 0xFFFF
    return np.uint16((u + r) >> 16)


@numba.njit(inline="always", **JIT)
def coef_row(C, r):
    # the coefficients of tensor r (C: a row per tensor, or one row for all): read once per
    # chunk, out of the element loop (coefficients.NCOEF of them)
    return (C[r, 0], C[r, 1], C[r, 2], C[r, 3], C[r, 4], C[r, 5], C[r, 6], C[r, 7], C[r, 8],
            C[r, 9], C[r, 10], C[r, 11], C[r, 12], C[r, 13], C[r, 14], C[r, 15], C[r, 16])


assert coefficients.NCOEF == 17, "coef_row reads NCOEF slots"


@numba.njit(fastmath={"reassoc"}, **JIT)
def lanes(v):
    # the sum of v, reassociated so that LLVM splits it over vector lanes (one float64 sum
    # is a chain of dependent adds, latency-bound: the matrix kernel's Kahan sums per
    # element made Adafactor's CPU step 2x slower than torch's); compiled apart, so that
    # the flag reaches no rule (the reduce kernels of numba_engine and numba_matrix).
    # Squares of float32 values are exact in float64, and n of them sum with a relative
    # error of at most ~n * 2**-53
    acc = np.float64(0)
    for j in range(v.shape[0]):
        acc += v[j]
    return acc


def bind_rule(rule, flags):
    """``rule`` compiled with ``ops`` = numba_ops and each flag a constant, called through
    its adapter (coefficients.adapter): call(p, g, a, b, c, row) -> (p, a, b, c)."""
    gl = {"ops": numba_ops, **dict(flags)}
    jit = numba.njit(inline="always", **JIT)
    for f in rules.HELPERS:
        gl[f.__name__] = jit(types.FunctionType(f.__code__, gl, f.__name__))
    gl[rule] = jit(types.FunctionType(coefficients.positional(rules.RULES[rule]).__code__, gl,
                                      rule))
    return jit(types.FunctionType(coefficients.adapter(rule).__code__, gl, "call"))


def _kahan(p0, pv, w):
    # kahan_sum=True: the rule moved the param from p0 to pv (float32); that update goes
    # into the param as optimi's compensated sum, its three steps in its order:
    # comp += update; param += comp (rounded to the param's dtype); comp += old - new.
    # Returns the param's and the compensation's new bits (w: the compensation's bits)
    y = load(w) + (pv - p0)
    q = store(p0 + y)
    return q, store(y + (p0 - load(q)))


def kahan_for(dtype):
    """_kahan for params of ``dtype`` (a torch dtype name): the update kernels' ``kahan``."""
    io = {"load": IO[dtype][1], "store": IO[dtype][2]}
    return numba.njit(inline="always", **JIT)(types.FunctionType(_kahan.__code__, io, "kahan"))


def bindings(rule, flags, dtypes, names):
    """What a kernel variant binds (variant_globals): ``rule`` (bind_rule), the loads and
    stores of dtypes (params', state's: load, store, sload, sstore), the flags of ``names``."""
    fl = dict(flags)
    return dict(rule=bind_rule(rule, flags), load=IO[dtypes[0]][1], store=IO[dtypes[0]][2],
                sload=IO[dtypes[1]][1], sstore=IO[dtypes[1]][2], **{n: fl[n] for n in names})


def variant_globals(module_globals, binds):
    """The globals of a kernel variant: its module's, the names of ``binds`` replaced (the
    variant's rule, loads and stores, flags).  Each one must be a name the module declares,
    so that the kernel's code reads no name its module does not define."""
    undeclared = set(binds) - set(module_globals)
    if undeclared:
        raise NameError(f"{module_globals['__name__']} does not declare {sorted(undeclared)}")
    return dict(module_globals, **binds)


def compile_kernel(proto, gl, name, **options):
    """A kernel template's function ``proto`` compiled with the globals ``gl``, cached on
    disk under ``name`` (numba names its cache files after the qualname: one index file per
    variant, so that processes compiling different variants at once cannot overwrite each
    other's entries)."""
    fn = types.FunctionType(proto.__code__, gl, proto.__name__, None, proto.__closure__)
    fn.__qualname__ = name
    return numba.njit(parallel=PARALLEL[0], cache=True, **JIT, **options)(fn)


# -- the on-disk cache key -------------------------------------------------------------
# numba's cache notices edits to the file that holds a kernel's code, nothing else: a
# helper, rule or constant it binds from another module would load stale.  The key of a
# kernel of module m hashes the source of m and of every module of this package that m
# imports, transitively (read from their ASTs): no list to keep up to date.

_HERE = pathlib.Path(__file__).resolve().parent
_MODULES = {p.stem for p in _HERE.glob("*.py")}


def _source(name):
    """The source text of module ``name`` of this package ("" for the package itself; the
    tests replace this to see which keys an edit reaches)."""
    return (_HERE / f"{name or '__init__'}.py").read_text()


def _imports(name):
    # the package's modules that module `name` ("": the package) imports anywhere in its
    # code: `from . import x` (the module x, else the package), `from .x import y`
    out = set()
    for node in ast.walk(ast.parse(_source(name))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module)
            else:
                out.update(a.name if a.name in _MODULES else "" for a in node.names)
    out.discard(name)
    return out


@functools.cache
def source_hash(name):
    """sha256 of the source of module ``name`` of this package ("fusedopt.kernels.numba_engine"
    or "numba_engine") and of every module of the package it imports, transitively."""
    seen, todo = set(), [name.rpartition(".")[2]]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo.extend(_imports(m))
    h = hashlib.sha256()
    for m in sorted(seen):
        h.update(f"{m}\0{_source(m)}\0".encode())
    return h.hexdigest()


def cache_key(module, *variant):
    """The key of one compiled variant of a kernel of ``module`` (as source_hash): a positive
    int (never 0) from the sources it binds (source_hash), the variant and whether the
    kernels run parallel."""
    return int(hashlib.sha256(repr((source_hash(module), variant, PARALLEL[0])).encode())
               .hexdigest()[:15], 16) | 1


# -- compiled kernels, per process ---------------------------------------------------------
kernels = {}
# numba's OpenMP pool (GNU) cannot be used in a child forked after the parent used it:
# numba terminates the child at its first parallel launch.  A forked child (multiprocessing's
# default on Linux) therefore compiles or loads serial variants of the kernels; the parent
# keeps its threads (the fork-safe layers measured 10-25 % slower on 5000 x 4096 Adam).
PARALLEL = [True]


def _forked():
    PARALLEL[0] = False
    kernels.clear()


os.register_at_fork(after_in_child=_forked)


def _init_numba():
    # numba sets up its CPU target (imports ~100 of its modules) the first time anything is
    # compiled or loaded from the cache: ~0.5 s.  Paid here, at import, the first step only
    # loads its kernel.
    from numba.core.compiler_lock import global_compiler_lock
    from numba.core.registry import cpu_target
    with global_compiler_lock:
        cpu_target.target_context.refresh()


_init_numba()
