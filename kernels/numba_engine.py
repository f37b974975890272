"""CPU engine: applies any rule of ``rules.py`` to every tensor of a group in one compiled call.

The group arrives as int64 pointer tables (param, grad, three state slots) and a chunk
table (tensor index, start, end; chunks of at most CHUNK elements).  ``prange`` spreads
the chunks over the threads; inside a chunk the loop runs over *slices* of the arrays,
which lets LLVM prove the indices in range and emit AVX-512 (indexing the whole array
with ``range(s, e)`` did not vectorize and ran 6x slower).  float16 and bfloat16 are
read as uint16 and converted by integer operations (numba has no CPU arithmetic for
them); the math runs in float32, or float64 for float64 params.
"""
import hashlib
import inspect
import os
import sys
import types

import numba
import numpy as np
from numba import prange
from numba import types as nt
from numba.core import cgutils
from numba.extending import intrinsic

from . import coefficients, flags as masks, numba_ops, rules
from .coefficients import SLOTS

CHUNK = 1 << 16
JIT = dict(error_model="numpy", nogil=True)


@intrinsic
def _voidptr(typingctx, addr):
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)
    return nt.voidptr(nt.int64), codegen


@intrinsic
def _f32_bits(typingctx, x):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(nt.uint32))
    return nt.uint32(nt.float32), codegen


@intrinsic
def _bits_f32(typingctx, u):
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
    return _bits_f32(np.uint32(h) << np.uint32(16))


@numba.njit(inline="always", **JIT)
def f32_to_bf16(f):
    # round to nearest even; NaN becomes torch's 0x7FC0
    u = np.int64(_f32_bits(f))
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return np.uint16(0x7FC0)
    return np.uint16((u + 0x7FFF + ((u >> 16) & 1)) >> 16)


@numba.njit(inline="always", **JIT)
def f16_to_f32(h):
    h = np.int64(h)
    sign = np.uint32((h & 0x8000) << 16)
    em = h & 0x7FFF
    if em >= 0x7C00:  # inf / NaN
        return _bits_f32(sign | np.uint32(0x7F800000 | ((em & 0x3FF) << 13)))
    # the fp16 bits shifted into a float32 are the value times 2**-112, subnormals included
    f = _bits_f32(np.uint32(em << 13)) * _TWO112
    return _bits_f32(_f32_bits(f) | sign)


@numba.njit(inline="always", **JIT)
def f32_to_f16(f):
    u = np.int64(_f32_bits(f))
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a >= 0x47800000:  # >= 2**16: inf, or NaN (quiet, sign kept, as c10::Half)
        o = 0x7E00 if a > 0x7F800000 else 0x7C00
    elif a < 0x38800000:  # below 2**-14: adding 0.5 rounds to the fp16 subnormal grid
        o = np.int64(_f32_bits(_bits_f32(np.uint32(a)) + _HALF)) - 0x3F000000
    else:
        o = (a - 0x38000000 + 0xFFF + ((a >> 13) & 1)) >> 13
    return np.uint16(o | sign)


# storage dtype, (load, store) per torch dtype name
_IO = {
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
    u = np.int64(_f32_bits(f))
    if (u & 0x7FFFFFFF) > 0x7F800000:
        return np.uint16(0x7FC0)
    r = fmix32(fmix32(index & _M32) ^ key) & 0xFFFF
    return np.uint16((u + r) >> 16)


@numba.njit(inline="always", **JIT)
def _row(C, r):
    # the coefficients of tensor r (C: a row per tensor, or one row for all): read once per
    # chunk, out of the element loop (coefficients.NCOEF of them)
    return (C[r, 0], C[r, 1], C[r, 2], C[r, 3], C[r, 4], C[r, 5], C[r, 6], C[r, 7], C[r, 8],
            C[r, 9], C[r, 10], C[r, 11], C[r, 12], C[r, 13], C[r, 14], C[r, 15])


assert coefficients.NCOEF == 16, "_row reads NCOEF slots"


def _template(KEY, MASK, DT, SDT):
    # MASK: flags.Update (the state slots in use, a float32 master copy of the param)
    def kernel(P, G, S0, S1, S2, S3, C, R, TID, CS, CE, N):
        if KEY == 0:  # KEY only tells numba's on-disk cache one variant from another
            return
        for ci in prange(TID.shape[0]):
            t = TID[ci]
            s = CS[ci]
            e = CE[ci]
            n = N[t]
            key = R[t]
            p = numba.carray(_voidptr(P[t]), n, DT)[s:e]
            g = numba.carray(_voidptr(G[t]), n, DT)[s:e]
            a = numba.carray(_voidptr(S0[t]), n, SDT)[s:e]
            b = numba.carray(_voidptr(S1[t]), n, SDT)[s:e]
            c = numba.carray(_voidptr(S2[t]), n, SDT)[s:e]
            w = numba.carray(_voidptr(S3[t]), n, SDT)[s:e]
            hs = _row(C, t if C.shape[0] > 1 else 0)  # one row: the same for all
            for j in range(e - s):
                gv = load(g[j])
                if SCALE_GRAD:  # see rules.FLAGS
                    gs = store(gv * hs[GRAD_SCALE])
                    if WRITE_GRAD:
                        g[j] = gs
                    gv = load(gs)
                # unused slots point at the param, maybe of another dtype: never read them
                pv = sload(w[j]) if MASK & UPDATE_MASTER else load(p[j])
                av = sload(a[j]) if MASK & UPDATE_A else pv
                bv = sload(b[j]) if MASK & UPDATE_B else pv
                cv = sload(c[j]) if MASK & UPDATE_C else pv
                pv, av, bv, cv = rule(pv, gv, av, bv, cv, hs)
                if MASK & UPDATE_MASTER:
                    w[j] = sstore(pv)
                if STOCH_ROUND:
                    p[j] = f32_to_bf16_stochastic(pv, s + j, key)
                else:
                    p[j] = store(pv)
                if MASK & UPDATE_A:
                    a[j] = sstore(av)
                if MASK & UPDATE_B:
                    b[j] = sstore(bv)
                if MASK & UPDATE_C:
                    c[j] = sstore(cv)
    return kernel


# numba's cache notices edits to this file only: the rules, ops and the row's layout (the
# rules' adapters are generated from it) go into the key
_SOURCE_HASH = hashlib.sha256("".join(map(inspect.getsource, (rules, numba_ops, coefficients,
                                                               masks))).encode()).hexdigest()
_kernels = {}
# numba's OpenMP pool (GNU) cannot be used in a child forked after the parent used it:
# numba terminates the child at its first parallel launch.  A forked child (multiprocessing's
# default on Linux) therefore compiles or loads serial variants of the kernels; the parent
# keeps its threads (the fork-safe layers measured 10-25 % slower on 5000 x 4096 Adam).
_PARALLEL = [True]


def _forked():
    _PARALLEL[0] = False
    _kernels.clear()


os.register_at_fork(after_in_child=_forked)


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


def _build(rule, flags, dtypes, mask):
    dt, load, store = _IO[dtypes[0]]
    sdt, sload, sstore = _IO[dtypes[1]]
    # an 8-bit kernel's code lives in numba_quant, calls helpers of this file and reads the
    # table's columns from qmap: numba's cache would notice edits to numba_quant.py only (a
    # stale column number would read past the table)
    extra = ""
    if mask & masks.Codes.ANY:
        from . import qmap
        extra = hashlib.sha256("".join(inspect.getsource(m) for m in (sys.modules[__name__], qmap))
                               .encode()).hexdigest()
    key = int(hashlib.sha256(repr((_SOURCE_HASH, extra, rule, flags, dtypes, mask, _PARALLEL[0]))
                             .encode()).hexdigest()[:15], 16) | 1
    if mask & masks.Codes.ANY:  # 8-bit slots: uint8 codes (numba_quant)
        from . import numba_quant
        proto = numba_quant.template8(key, mask, dt, sdt, *(np.uint8 if mask & q else sdt
                                                             for q in masks.CODED))
    else:
        proto = _template(key, mask, dt, sdt)
    fl = dict(flags)
    kgl = dict(globals(), **(numba_quant.GLOBALS if mask & masks.Codes.ANY else {}),
               rule=bind_rule(rule, flags), **SLOTS, **masks.CONSTANTS,
               load=load, store=store, sload=sload, sstore=sstore,
               SCALE_GRAD=fl["SCALE_GRAD"], WRITE_GRAD=fl["WRITE_GRAD"],
               STOCH_ROUND=fl["STOCH_ROUND"])
    fn = types.FunctionType(proto.__code__, kgl, proto.__name__, None, proto.__closure__)
    # numba names cache files after the qualname: one index file per variant, so that
    # processes compiling different variants at once cannot overwrite each other's entries
    fn.__qualname__ = f"kernel_{rule}_{key:x}"
    return numba.njit(parallel=_PARALLEL[0], cache=True, **JIT)(fn)


def run(rule, flags, dtypes, mask, P, G, S, C, R, TID, CS, CE, N, Q=None):
    """Apply ``rule`` to one group.  ``flags``: sorted tuple of (name, bool); ``dtypes``:
    torch dtype names of (params and grads, state and master copy); P, G, S[0..3], TID, CS,
    CE, N: int64 arrays; C: [n, NCOEF] (coefficients.pack's rows), or [1, NCOEF] when all
    tensors share them;
    R: each tensor's stochastic-rounding key.  8-bit slots (flags.Codes, numba_quant):
    S[4 + i] points at their absmax, Q is quant.engine_table() as float32 numpy."""
    k = (rule, flags, dtypes, mask)
    fn = _kernels.get(k)
    if fn is None:
        fn = _kernels[k] = _build(rule, flags, dtypes, mask)
    if mask & masks.Codes.ANY:
        fn(P, G, S[0], S[1], S[2], S[3], S[4], S[5], S[6], Q, C, R, TID, CS, CE, N)
    else:
        fn(P, G, S[0], S[1], S[2], S[3], C, R, TID, CS, CE, N)


def _norm_template(KEY, ORD, DT):
    # ORD: 1, 2, 0 for inf, 3 for any other p (PW)
    def kernel(G, TID, CS, CE, N, PW, OUT):
        if KEY == 0:
            return
        for ci in prange(TID.shape[0]):
            t = TID[ci]
            s = CS[ci]
            g = numba.carray(_voidptr(G[t]), N[t], DT)[s:CE[ci]]
            acc = np.float64(0)
            for j in range(g.shape[0]):
                x = abs(np.float64(load(g[j])))
                if ORD == 2:
                    acc += x * x
                elif ORD == 1:
                    acc += x
                elif ORD == 0:
                    acc = x if (x > acc or x != x) else acc  # NaN sticks
                else:
                    acc += x ** PW
            OUT[ci] = acc
    return kernel


def norm_partials(dtype, order, G, TID, CS, CE, N):
    """Per chunk: the sum of |g|**order (order 1, 2 or any p > 0) or, for order inf, the
    max of |g|, accumulated in float64 (as torch's CPU norms are).  One compiled call."""
    ord_ = {1.0: 1, 2.0: 2, float("inf"): 0}.get(float(order), 3)
    k = ("norm", ord_, dtype)
    fn = _kernels.get(k)
    if fn is None:
        dt, load, _ = _IO[dtype]
        key = int(hashlib.sha256(repr((_SOURCE_HASH, k, _PARALLEL[0])).encode()).hexdigest()[:15], 16) | 1
        proto = _norm_template(key, ord_, dt)
        code = types.FunctionType(proto.__code__, dict(globals(), load=load), proto.__name__,
                                  None, proto.__closure__)
        code.__qualname__ = f"norm_{key:x}"
        # reassociation lets LLVM split the float64 sum over vector lanes: one sum is a chain
        # of dependent adds, latency-bound at ~5x below the memory roof (the order of a
        # float64 sum of float32 squares hardly matters; the update kernels get no fastmath)
        fn = _kernels[k] = numba.njit(parallel=_PARALLEL[0], cache=True, fastmath={"reassoc"},
                                      **JIT)(code)
    out = np.empty(len(TID), dtype=np.float64)
    fn(G, TID, CS, CE, N, np.float64(order), out)
    return out


def _init_numba():
    # numba sets up its CPU target (imports ~100 of its modules) the first time anything is
    # compiled or loaded from the cache: ~0.5 s.  Paid here, at import, the first step only
    # loads its kernel.
    from numba.core.compiler_lock import global_compiler_lock
    from numba.core.registry import cpu_target
    with global_compiler_lock:
        cpu_target.target_context.refresh()


_init_numba()
