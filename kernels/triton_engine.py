"""GPU engine: the same job as numba_engine in Triton, one launch per group and step.

Each program takes one chunk (tensor index, start, end) from the chunk table and reads
the tensor's addresses from int64 pointer tables.  Pointers loaded from memory carry no
alignment facts, so when the host has checked that every address is 16-byte aligned
(ALIGNED) the kernel asserts it with ``tl.multiple_of`` and full blocks load without a
mask: that is what lets the compiler emit 128-bit loads.  bfloat16 is moved as uint16
and rounded to nearest even by hand: ``.to(tl.bfloat16)`` truncates in the interpreter.
"""
import contextlib
import os
import types

import numpy as np
import torch

from . import coefficients, import_triton, rules, triton_interp, triton_ops, triton_quant
from .coefficients import NCOEF, SLOTS
from .flags import CONSTANTS, Codes

triton = import_triton()
tl, JITFunction = triton.language, triton.runtime.jit.JITFunction

# the interpreter runs programs one after another in Python: few large blocks are faster
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CHUNK = 1 << 16 if _INTERPRET else 1 << 14
BLOCK = CHUNK if _INTERPRET else 1024
NUM_WARPS = 4


def launching():
    """The context of every launch: in the interpreter, its ops that are not correctly
    rounded on this triton version replayed correctly rounded, as compiled Triton computes
    them (kernels/triton_interp.py); compiled, nothing."""
    return triton_interp.replay() if _INTERPRET else contextlib.nullcontext()


@triton.jit
def _ptr(table, t, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    # KIND: 0 float32, 1 float64, 2 float16, 3 bfloat16 (moved as uint16), 4 uint8 (codes)
    if KIND == 4:
        ptr = tl.load(table + t).to(tl.pointer_type(tl.uint8))
    elif KIND == 0:
        ptr = tl.load(table + t).to(tl.pointer_type(tl.float32))
    elif KIND == 1:
        ptr = tl.load(table + t).to(tl.pointer_type(tl.float64))
    elif KIND == 2:
        ptr = tl.load(table + t).to(tl.pointer_type(tl.float16))
    else:
        ptr = tl.load(table + t).to(tl.pointer_type(tl.uint16))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _widen(x, KIND: tl.constexpr):
    # storage -> math dtype
    if KIND == 1:
        return x
    elif KIND == 3:
        return (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _narrow(x, KIND: tl.constexpr):
    # math -> storage dtype
    if KIND == 2:
        y = x.to(tl.float16)
    elif KIND == 3:  # round to nearest even; NaN becomes torch's 0x7FC0
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        y = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r).to(tl.uint16)
    else:
        y = x
    return y


@triton.jit
def _fmix32(h):
    # murmur3's finalizer (uint32 arithmetic wraps as numba_engine.fmix32's masked int64)
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _narrow_stochastic(x, offs, key):
    # as numba_engine.f32_to_bf16_stochastic: add 16 random bits from (key, index), truncate
    u = x.to(tl.uint32, bitcast=True)
    r = _fmix32(_fmix32(offs.to(tl.uint32)) ^ key) & 0xFFFF
    y = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, (u + r) >> 16)
    return y.to(tl.uint16)


@triton.jit
def _load(ptr, offs, end, KIND: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptr + offs, mask=offs < end, other=0)
    else:
        x = tl.load(ptr + offs)
    return _widen(x, KIND)


@triton.jit
def _store_raw(ptr, offs, end, y, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, y, mask=offs < end)
    else:
        tl.store(ptr + offs, y)


@triton.jit
def _store(ptr, offs, end, x, KIND: tl.constexpr, MASKED: tl.constexpr):
    _store_raw(ptr, offs, end, _narrow(x, KIND), MASKED)


@triton.jit
def _block(pp, gp, ap, bp, cp, wp, xa, xb, xc, Q, offs, end, key, hs,
           MASK: tl.constexpr, KIND: tl.constexpr, SKIND: tl.constexpr, MASKED: tl.constexpr,
           BLOCK: tl.constexpr):
    # MASK and the flags as in numba_engine._template; hs: the coefficients' row
    g = _load(gp, offs, end, KIND, MASKED)
    if SCALE_GRAD:  # see rules.FLAGS
        gs = _narrow(g * hs[GRAD_SCALE], KIND)
        if WRITE_GRAD:
            _store_raw(gp, offs, end, gs, MASKED)
        g = _widen(gs, KIND)
    if MASK & UPDATE_MASTER:
        p = _load(wp, offs, end, SKIND, MASKED)
    else:
        p = _load(pp, offs, end, KIND, MASKED)
    a = p
    b = p
    c = p
    # 8-bit slots (flags.Codes), the signed map's rows of Q: 1 (SIGNED_*), else 0
    SA: tl.constexpr = (MASK // CODES_SIGNED_A) % 2
    SB: tl.constexpr = (MASK // CODES_SIGNED_B) % 2
    SC: tl.constexpr = (MASK // CODES_SIGNED_C) % 2
    if MASK & CODES_A:
        a = _qload(ap, xa, offs, end, Q + SA * QTABLE, MASKED)
    elif MASK & UPDATE_A:
        a = _load(ap, offs, end, SKIND, MASKED)
    if MASK & CODES_B:
        b = _qload(bp, xb, offs, end, Q + SB * QTABLE, MASKED)
    elif MASK & UPDATE_B:
        b = _load(bp, offs, end, SKIND, MASKED)
    if MASK & CODES_C:
        c = _qload(cp, xc, offs, end, Q + SC * QTABLE, MASKED)
    elif MASK & UPDATE_C:
        c = _load(cp, offs, end, SKIND, MASKED)
    p, a, b, c = rule(p, g, a, b, c, hs)
    if MASK & UPDATE_MASTER:
        _store(wp, offs, end, p, SKIND, MASKED)
    if STOCH_ROUND:
        _store_raw(pp, offs, end, _narrow_stochastic(p, offs, key), MASKED)
    else:
        _store(pp, offs, end, p, KIND, MASKED)
    if MASK & CODES_A:
        _qstore(ap, xa, offs, end, a, Q + SA * QTABLE, SA, BLOCK, MASKED)
    elif MASK & UPDATE_A:
        _store(ap, offs, end, a, SKIND, MASKED)
    if MASK & CODES_B:
        _qstore(bp, xb, offs, end, b, Q + SB * QTABLE, SB, BLOCK, MASKED)
    elif MASK & UPDATE_B:
        _store(bp, offs, end, b, SKIND, MASKED)
    if MASK & CODES_C:
        _qstore(cp, xc, offs, end, c, Q + SC * QTABLE, SC, BLOCK, MASKED)
    elif MASK & UPDATE_C:
        _store(cp, offs, end, c, SKIND, MASKED)


@triton.jit
def _coef(bits, C):
    # a coefficient passed as a scalar argument: float64 bits in an int64, rounded once to
    # the math dtype (C's), as a float64 written into C would be
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(C.dtype.element_ty)


@triton.jit
def _given(C, H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15):
    # the row passed as scalars (coefficients.NCOEF of them)
    return (_coef(H0, C), _coef(H1, C), _coef(H2, C), _coef(H3, C), _coef(H4, C), _coef(H5, C),
            _coef(H6, C), _coef(H7, C), _coef(H8, C), _coef(H9, C), _coef(H10, C),
            _coef(H11, C), _coef(H12, C), _coef(H13, C), _coef(H14, C), _coef(H15, C))


@triton.jit
def _loaded(C, t):
    # tensor t's row of the table C (coefficients.NCOEF per row)
    r = C + t * NCOEF
    return (tl.load(r), tl.load(r + 1), tl.load(r + 2), tl.load(r + 3), tl.load(r + 4),
            tl.load(r + 5), tl.load(r + 6), tl.load(r + 7), tl.load(r + 8), tl.load(r + 9),
            tl.load(r + 10), tl.load(r + 11), tl.load(r + 12), tl.load(r + 13),
            tl.load(r + 14), tl.load(r + 15))


@triton.jit
def _kernel(P, G, S0, S1, S2, S3, A0, A1, A2, Q, C, R, TID, CS, CE, FI, H0, H1, H2, H3, H4, H5,
            H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, MASK: tl.constexpr,
            KIND: tl.constexpr, SKIND: tl.constexpr, ALIGNED: tl.constexpr,
            UNIFORM: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(TID + pid)
    start = tl.load(CS + pid)
    end = tl.load(CE + pid)
    if FOUND_INF:  # GradScaler found an inf/NaN: an empty range, nothing written
        end = tl.where(tl.load(FI) != 0, start, end)
    key = 0
    if STOCH_ROUND:
        key = tl.load(R + t).to(tl.uint32)
    pp = _ptr(P, t, KIND, ALIGNED)
    gp = _ptr(G, t, KIND, ALIGNED)
    # (an 8-bit slot: uint8 codes, and its blocks' absmax)
    ap = _ptr(S0, t, SKIND + (4 - SKIND) * ((MASK // CODES_A) % 2), ALIGNED)
    bp = _ptr(S1, t, SKIND + (4 - SKIND) * ((MASK // CODES_B) % 2), ALIGNED)
    cp = _ptr(S2, t, SKIND + (4 - SKIND) * ((MASK // CODES_C) % 2), ALIGNED)
    wp = _ptr(S3, t, SKIND, ALIGNED)
    xa = _ptr(A0, t, 0, ALIGNED)
    xb = _ptr(A1, t, 0, ALIGNED)
    xc = _ptr(A2, t, 0, ALIGNED)
    if UNIFORM:  # the same coefficients for every tensor: no table, no copy to the device
        hs = _given(C, H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15)
    else:
        hs = _loaded(C, t)
    nfull = (end - start) // BLOCK
    for i in range(nfull):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        if ALIGNED:  # chunk starts are multiples of CHUNK, hence of BLOCK
            offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
        _block(pp, gp, ap, bp, cp, wp, xa, xb, xc, Q, offs, end, key, hs, MASK, KIND, SKIND,
               False, BLOCK)
    tail = start + nfull * BLOCK
    if tail < end:
        offs = tail + tl.arange(0, BLOCK)
        _block(pp, gp, ap, bp, cp, wp, xa, xb, xc, Q, offs, end, key, hs, MASK, KIND, SKIND,
               True, BLOCK)


@triton.jit
def _norm_kernel(G, TID, CS, CE, PW, OUT, KIND: tl.constexpr, ORD: tl.constexpr,
                 BLOCK: tl.constexpr):
    # one program per chunk: the sum of |g|**p (ORD 1, 2, or 3 for any p) or the max of
    # |g| (ORD 0, inf), accumulated in the math dtype (float32 unless float64) as torch's
    # CUDA norms are
    pid = tl.program_id(0)
    t = tl.load(TID + pid)
    start = tl.load(CS + pid)
    end = tl.load(CE + pid)
    gp = _ptr(G, t, KIND, False)
    if KIND == 1:
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(start, end, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        x = tl.abs(_load(gp, offs, end, KIND, True))
        if ORD == 2:
            acc += x * x
        elif ORD == 1:
            acc += x
        elif ORD == 0:
            acc = tl.where((x > acc) | (x != x), x, acc)
        else:
            pos = x > 0  # |g|**p by exp2/log2; 0 and NaN pass through as they are
            acc += tl.where(pos, tl.exp2(PW * tl.log2(tl.where(pos, x, 1))), x)
    if ORD == 0:
        nan = tl.sum(tl.where(acc != acc, acc, 0), 0)  # NaN if any lane is, else 0
        tl.store(OUT + pid, tl.max(tl.where(acc != acc, 0, acc), 0) + nan)
    else:
        tl.store(OUT + pid, tl.sum(acc, 0))


KINDS = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}
_kernels = {}


_SCALARS = [f"H{j}" for j in range(NCOEF)]
assert [a for a in _kernel.arg_names if a in _SCALARS] == _SCALARS, "_kernel takes the row"


def _rebind(fn, gl, interpret, launch=False):
    """A copy of ``fn`` (a plain function or a JITFunction) whose globals are ``gl``.
    Under the interpreter, helpers stay plain Python: each nested jit call would re-patch
    triton.language, which made the interpreted tests several times slower."""
    orig = getattr(fn, "fn", fn)
    py = types.FunctionType(orig.__code__, gl, orig.__name__, orig.__defaults__)
    # a launch reads which parameters are constexpr from the annotations; without them
    # every flag became a runtime argument on the GPU (the AOT path names them itself)
    py.__annotations__ = dict(orig.__annotations__)
    if not interpret:
        # coefficient bits change every step: never specialise on their values
        return JITFunction(py, do_not_specialize=[a for a in _SCALARS
                                                  if a in py.__code__.co_varnames])
    return triton.jit(py) if launch else py


def _bind(rule, flags, interpret):
    """Globals for a kernel running ``rule``: a copy of the rule with ``ops`` = triton_ops
    and each flag a constexpr, and the engine's helpers."""
    ops = types.ModuleType(triton_ops.__name__)
    for name in ("div", "sqrt", "maximum", "where", "abs", "fma"):
        setattr(ops, name, _rebind(getattr(triton_ops, name), {"tl": tl, "__name__": ops.__name__},
                                   interpret))
    gl = {"__name__": rules.__name__, "ops": ops, "tl": tl,
          **{n: tl.constexpr(v) for n, v in flags}}
    for f in (*rules.HELPERS, coefficients.positional(rules.RULES[rule])):
        gl[f.__name__] = _rebind(f, gl, interpret)
    kgl = {"__name__": __name__, "tl": tl, "triton": triton, "NCOEF": tl.constexpr(NCOEF),
           "rule": _rebind(coefficients.adapter(rule), gl, interpret),
           **{n: tl.constexpr(v) for n, v in SLOTS.items()},
           # (the interpreter's MASK is an int, which has no & with a constexpr)
           **{n: v if interpret else tl.constexpr(v) for n, v in CONSTANTS.items()},
           **{n: tl.constexpr(v) for n, v in flags if n in ("SCALE_GRAD", "WRITE_GRAD",
                                                             "FOUND_INF", "STOCH_ROUND",
                                                             "REDUCE")}}
    kgl.update(QBLOCK=triton_quant.QBLOCK, QTABLE=triton_quant.QTABLE, **triton_quant.QCOLS)
    for f in (_ptr, _widen, _narrow, _fmix32, _narrow_stochastic, _load, _store_raw, _store,
              _coef, _given, _loaded, triton_quant._qload, triton_quant._per_block,
              triton_quant._qstore):
        kgl[f.fn.__name__] = _rebind(f, kgl, interpret)
    return kgl


def build(rule, flags, interpret=None):
    """The kernel for one rule and flag set: a copy of _kernel whose `rule` is a copy of
    the rule with ``ops`` = triton_ops and each flag a constexpr."""
    interpret = _INTERPRET if interpret is None else interpret
    k = (rule, flags, interpret)
    if k not in _kernels:
        kgl = _bind(rule, flags, interpret)
        kgl["_block"] = _rebind(_block, kgl, interpret)
        _kernels[k] = _rebind(_kernel, kgl, interpret, launch=True)
    return _kernels[k]


_NO_COEFS = (0,) * NCOEF


def run(rule, flags, dtypes, mask, P, G, S, C, R, TID, CS, CE, aligned, found_inf=None,
        coefs=None, Q=None):
    """Launch ``rule`` over one group: one program per chunk.  As numba_engine.run, but
    every table is an int64 tensor on the params' device; C is [n, NCOEF] in the
    math dtype, read only when ``coefs`` is None: else ``coefs`` (Python floats) are every
    tensor's coefficients, passed as scalar arguments (no device op besides the launch);
    ``found_inf``: the scaler's float32 flag on the device (read when flags say
    FOUND_INF); 8-bit slots as numba_engine.run (Q a float32 tensor on the device)."""
    if TID.numel() == 0:
        return
    kernel = build(rule, flags)
    fi = TID if found_inf is None else found_inf
    h = _NO_COEFS if coefs is None else np.array(coefs, np.float64).view(np.int64).tolist()
    A = S[4:7] if mask & Codes.ANY else (P, P, P)
    q = C if Q is None else Q  # (unused without 8-bit slots)
    with launching():
        kernel[(TID.numel(),)](P, G, S[0], S[1], S[2], S[3], *A, q, C, R, TID, CS, CE, fi, *h,
                               MASK=mask, KIND=KINDS[dtypes[0]], SKIND=KINDS[dtypes[1]],
                               ALIGNED=aligned, UNIFORM=coefs is not None, BLOCK=BLOCK,
                               num_warps=NUM_WARPS, enable_fp_fusion=False)


def norm_partials(dtype, order, G, TID, CS, CE):
    """Per chunk, as numba_engine.norm_partials; one launch.  Tables are int64 tensors on
    the device; returns a tensor of the math dtype."""
    ord_ = {1.0: 1, 2.0: 2, float("inf"): 0}.get(float(order), 3)
    f64 = dtype == "float64"
    out = torch.empty(TID.numel(), dtype=torch.float64 if f64 else torch.float32,
                      device=TID.device)
    if TID.numel():
        with launching():
            _norm_jit(_INTERPRET)[(TID.numel(),)](G, TID, CS, CE, float(order), out,
                                                  KIND=KINDS[dtype], ORD=ord_, BLOCK=BLOCK,
                                                  num_warps=NUM_WARPS)
    return out


def _norm_jit(interpret):
    k = ("norm", interpret)
    if k not in _kernels:
        kgl = {"__name__": __name__, "tl": tl, "triton": triton}
        for f in (_ptr, _widen, _load):
            kgl[f.fn.__name__] = _rebind(f, kgl, interpret)
        _kernels[k] = _rebind(_norm_kernel, kgl, interpret, launch=True)
    return _kernels[k]

