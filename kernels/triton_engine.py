"""GPU engine: the same job as numba_engine in Triton, one launch per group and step.

Each program takes one chunk (tensor index, start, end) from the chunk table and reads
the tensor's addresses from int64 pointer tables.  Pointers loaded from memory carry no
alignment facts, so when the host has checked that every address is 16-byte aligned
(ALIGNED) the kernel asserts it with ``tl.multiple_of`` and full blocks load without a
mask: that is what lets the compiler emit 128-bit loads.  bfloat16 is moved as uint16
and rounded to nearest even by hand: ``.to(tl.bfloat16)`` truncates in the interpreter.
"""
import numpy as np
import torch

from . import triton_base as base, triton_quant
from .coefficients import GRAD_SCALE
from .flags import (CODES_A, CODES_B, CODES_C, CODES_FOUR, CODES_SIGNED_A, CODES_SIGNED_B,
                    CODES_SIGNED_C,
                    UPDATE_A, UPDATE_B, UPDATE_C, UPDATE_KAHAN, UPDATE_MASTER, UPDATE_REMAINDER,
                    Codes)
from .triton_base import (BLOCK, CHUNK, INTERPRET, KINDS, NUM_WARPS, SCALARS, block_for,
                          given_row, join_master, kernels, launching, load, load_raw,
                          loaded_row, narrow, narrow_stochastic, rebind, split_master, store,
                          store_raw, tensor_ptr, tl, triton, widen)
from .triton_quant import QTABLE, qload, qload4, qstore, qstore4

# what bind_rule binds per kernel: the rule, the flags (as constexprs)
rule = None
SCALE_GRAD = WRITE_GRAD = FOUND_INF = STOCH_ROUND = False


@triton.jit
def _block(pp, gp, ap, bp, cp, wp, xa, xb, xc, Q, offs, end, key, hs,
           MASK: tl.constexpr, KIND: tl.constexpr, SKIND: tl.constexpr, MASKED: tl.constexpr,
           BLOCK: tl.constexpr):
    # MASK and the flags as in numba_engine._template; hs: the coefficients' row
    g = load(gp, offs, end, KIND, MASKED)
    if SCALE_GRAD:  # see rules.FLAGS
        gs = narrow(g * hs[GRAD_SCALE], KIND)
        if WRITE_GRAD:
            store_raw(gp, offs, end, gs, MASKED)
        g = widen(gs, KIND)
    if MASK & UPDATE_REMAINDER:
        p = join_master(load_raw(pp, offs, end, MASKED), load_raw(wp, offs, end, MASKED))
    elif MASK & UPDATE_MASTER:
        p = load(wp, offs, end, SKIND, MASKED)
    else:
        p = load(pp, offs, end, KIND, MASKED)
    a = p
    b = p
    c = p
    # 8-bit slots (flags.Codes), the signed map's rows of Q: 1 (SIGNED_*), else 0 (4-bit:
    # 3 and 2)
    SA: tl.constexpr = (MASK // CODES_SIGNED_A) % 2
    SB: tl.constexpr = (MASK // CODES_SIGNED_B) % 2
    SC: tl.constexpr = (MASK // CODES_SIGNED_C) % 2
    F4: tl.constexpr = (MASK // CODES_FOUR) % 2  # 4-bit slots: rows 2 and 3
    if MASK & CODES_A and F4:
        a = qload4(ap, xa, offs, end, Q + (SA + 2) * QTABLE, MASKED)
    elif MASK & CODES_A:
        a = qload(ap, xa, offs, end, Q + SA * QTABLE, MASKED)
    elif MASK & UPDATE_A:
        a = load(ap, offs, end, SKIND, MASKED)
    if MASK & CODES_B and F4:
        b = qload4(bp, xb, offs, end, Q + (SB + 2) * QTABLE, MASKED)
    elif MASK & CODES_B:
        b = qload(bp, xb, offs, end, Q + SB * QTABLE, MASKED)
    elif MASK & UPDATE_B:
        b = load(bp, offs, end, SKIND, MASKED)
    if MASK & CODES_C and F4:
        c = qload4(cp, xc, offs, end, Q + (SC + 2) * QTABLE, MASKED)
    elif MASK & CODES_C:
        c = qload(cp, xc, offs, end, Q + SC * QTABLE, MASKED)
    elif MASK & UPDATE_C:
        c = load(cp, offs, end, SKIND, MASKED)
    p0 = p
    p, a, b, c = rule(p, g, a, b, c, hs)
    if MASK & UPDATE_REMAINDER:  # the new master split: param and remainder
        h, r = split_master(p)
        store_raw(pp, offs, end, h, MASKED)
        store_raw(wp, offs, end, r, MASKED)
    elif MASK & UPDATE_MASTER:
        store(wp, offs, end, p, SKIND, MASKED)
        store(pp, offs, end, p, KIND, MASKED)
    elif MASK & UPDATE_KAHAN:  # the update, compensated: numba_base._kahan's steps
        y = load(wp, offs, end, KIND, MASKED) + (p - p0)
        q = narrow(p0 + y, KIND)
        store(wp, offs, end, y + (p0 - widen(q, KIND)), KIND, MASKED)
        store_raw(pp, offs, end, q, MASKED)
    elif STOCH_ROUND:
        store_raw(pp, offs, end, narrow_stochastic(p, offs, key), MASKED)
    else:
        store(pp, offs, end, p, KIND, MASKED)
    if MASK & CODES_A and F4:
        qstore4(ap, xa, offs, end, a, Q + (SA + 2) * QTABLE, BLOCK, MASKED)
    elif MASK & CODES_A:
        qstore(ap, xa, offs, end, a, Q + SA * QTABLE, SA, BLOCK, MASKED)
    elif MASK & UPDATE_A:
        store(ap, offs, end, a, SKIND, MASKED)
    if MASK & CODES_B and F4:
        qstore4(bp, xb, offs, end, b, Q + (SB + 2) * QTABLE, BLOCK, MASKED)
    elif MASK & CODES_B:
        qstore(bp, xb, offs, end, b, Q + SB * QTABLE, SB, BLOCK, MASKED)
    elif MASK & UPDATE_B:
        store(bp, offs, end, b, SKIND, MASKED)
    if MASK & CODES_C and F4:
        qstore4(cp, xc, offs, end, c, Q + (SC + 2) * QTABLE, BLOCK, MASKED)
    elif MASK & CODES_C:
        qstore(cp, xc, offs, end, c, Q + SC * QTABLE, SC, BLOCK, MASKED)
    elif MASK & UPDATE_C:
        store(cp, offs, end, c, SKIND, MASKED)


@triton.jit
def _kernel(P, G, S0, S1, S2, S3, A0, A1, A2, Q, C, R, TID, CS, CE, FI, H0, H1, H2, H3, H4, H5,
            H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, H16, MASK: tl.constexpr,
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
    pp = tensor_ptr(P, t, KIND, ALIGNED)
    gp = tensor_ptr(G, t, KIND, ALIGNED)
    # (an 8-bit slot: uint8 codes, and its blocks' absmax)
    ap = tensor_ptr(S0, t, SKIND + (4 - SKIND) * ((MASK // CODES_A) % 2), ALIGNED)
    bp = tensor_ptr(S1, t, SKIND + (4 - SKIND) * ((MASK // CODES_B) % 2), ALIGNED)
    cp = tensor_ptr(S2, t, SKIND + (4 - SKIND) * ((MASK // CODES_C) % 2), ALIGNED)
    # (the master copy in the state's dtype, or the compensation in the param's, or the
    # master's remainder as uint16 bits: KIND 3)
    WKIND: tl.constexpr = SKIND + (KIND - SKIND) * ((MASK // UPDATE_KAHAN) % 2) \
        + (3 - SKIND) * ((MASK // UPDATE_REMAINDER) % 2)
    wp = tensor_ptr(S3, t, WKIND, ALIGNED)
    xa = tensor_ptr(A0, t, 0, ALIGNED)
    xb = tensor_ptr(A1, t, 0, ALIGNED)
    xc = tensor_ptr(A2, t, 0, ALIGNED)
    if UNIFORM:  # the same coefficients for every tensor: no table, no copy to the device
        hs = given_row(C, H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15,
                       H16)
    else:
        hs = loaded_row(C, t)
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
def _reduce_kernel(P, G, S0, S1, S2, S3, C, TID, CS, CE, FI, OUT, MASK: tl.constexpr,
                   KIND: tl.constexpr, SKIND: tl.constexpr, BLOCK: tl.constexpr):
    # flag REDUCE (numba_engine._reduce_template): the rule as _block runs it, nothing
    # stored; per chunk the sums of its outputs' products p * a and b * c in float64, as
    # the CPU engine's (products of float32 values exact: a trust ratio's norms then agree
    # with the CPU's to the last bit but for the order of the sums)
    pid = tl.program_id(0)
    t = tl.load(TID + pid)
    start = tl.load(CS + pid)
    end = tl.load(CE + pid)
    if FOUND_INF:
        end = tl.where(tl.load(FI) != 0, start, end)
    pp = tensor_ptr(P, t, KIND, False)
    gp = tensor_ptr(G, t, KIND, False)
    ap = tensor_ptr(S0, t, SKIND, False)
    bp = tensor_ptr(S1, t, SKIND, False)
    cp = tensor_ptr(S2, t, SKIND, False)
    WKIND: tl.constexpr = SKIND + (3 - SKIND) * ((MASK // UPDATE_REMAINDER) % 2)
    wp = tensor_ptr(S3, t, WKIND, False)
    hs = loaded_row(C, t)
    s0 = tl.zeros([BLOCK], dtype=tl.float64)
    s1 = s0
    for i in range(start, end, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        g = load(gp, offs, end, KIND, True)
        if SCALE_GRAD:
            g = widen(narrow(g * hs[GRAD_SCALE], KIND), KIND)
        if MASK & UPDATE_REMAINDER:
            p = join_master(load_raw(pp, offs, end, True), load_raw(wp, offs, end, True))
        elif MASK & UPDATE_MASTER:
            p = load(wp, offs, end, SKIND, True)
        else:
            p = load(pp, offs, end, KIND, True)
        a = p
        b = p
        c = p
        if MASK & UPDATE_A:
            a = load(ap, offs, end, SKIND, True)
        if MASK & UPDATE_B:
            b = load(bp, offs, end, SKIND, True)
        if MASK & UPDATE_C:
            c = load(cp, offs, end, SKIND, True)
        p, a, b, c = rule(p, g, a, b, c, hs)
        inside = offs < end
        s0 += tl.where(inside, p.to(tl.float64) * a.to(tl.float64), 0)
        s1 += tl.where(inside, b.to(tl.float64) * c.to(tl.float64), 0)
    tl.store(OUT + 2 * pid, tl.sum(s0, 0))
    tl.store(OUT + 2 * pid + 1, tl.sum(s1, 0))


@triton.jit
def _norm_kernel(G, TID, CS, CE, PW, OUT, KIND: tl.constexpr, ORD: tl.constexpr,
                 BLOCK: tl.constexpr, EXACT: tl.constexpr):
    # one program per chunk: the sum of |g|**p (ORD 1, 2, or 3 for any p) or the max of
    # |g| (ORD 0, inf), accumulated in the math dtype (float32 unless float64) as torch's
    # CUDA norms are
    pid = tl.program_id(0)
    t = tl.load(TID + pid)
    start = tl.load(CS + pid)
    end = tl.load(CE + pid)
    gp = tensor_ptr(G, t, KIND, False)
    if KIND == 1 or EXACT:  # (EXACT: float64 sums of 2-norms' squares, as the CPU's)
        acc = tl.zeros([BLOCK], dtype=tl.float64)
    else:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(start, end, BLOCK):
        offs = i + tl.arange(0, BLOCK)
        x = tl.abs(load(gp, offs, end, KIND, True))
        if EXACT:
            x = x.to(tl.float64)
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


assert [a for a in _kernel.arg_names if a in SCALARS] == SCALARS, "_kernel takes the row"


def build(rule, flags, interpret=None):
    """The kernel for one rule and flag set: a copy of _kernel whose `rule` is a copy of
    the rule with ``ops`` = triton_ops and each flag a constexpr."""
    interpret = INTERPRET if interpret is None else interpret
    k = (rule, flags, interpret)
    if k not in kernels:
        kgl = base.bind_rule(rule, flags, interpret)
        # the 8-bit slots' helpers (triton_quant) and their constants
        kgl.update(QBLOCK=triton_quant.QBLOCK, QBLOCK4=triton_quant.QBLOCK4,
                   QTABLE=triton_quant.QTABLE, **triton_quant.QCOLS)
        for f in (triton_quant.qload, triton_quant.per_block, triton_quant.absmax_scales,
                  triton_quant.qload4, triton_quant.qstore4, triton_quant.qstore, _block):
            kgl[f.fn.__name__] = rebind(f, kgl, interpret)
        kernels[k] = rebind(_kernel, kgl, interpret, launch=True)
    return kernels[k]


_NO_COEFS = (0,) * len(SCALARS)


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
                               ALIGNED=aligned, UNIFORM=coefs is not None, BLOCK=block_for(CS, CE),
                               num_warps=NUM_WARPS, enable_fp_fusion=False)


def reduce(rule, flags, dtypes, mask, P, G, S, C, TID, CS, CE, found_inf=None):
    """Per chunk, as numba_engine.reduce (C: the [n, NCOEF] table); one launch.  Returns a
    (chunks, 2) float64 tensor."""
    out = torch.zeros((TID.numel(), 2), dtype=torch.float64, device=TID.device)
    if TID.numel() == 0:
        return out
    k = ("reduce", rule, flags, INTERPRET)
    if k not in kernels:
        kgl = base.bind_rule(rule, flags, INTERPRET)
        kernels[k] = rebind(_reduce_kernel, kgl, INTERPRET, launch=True)
    with launching():
        kernels[k][(TID.numel(),)](P, G, S[0], S[1], S[2], S[3], C, TID, CS, CE,
                                   TID if found_inf is None else found_inf, out, MASK=mask,
                                   KIND=KINDS[dtypes[0]], SKIND=KINDS[dtypes[1]],
                                   BLOCK=block_for(CS, CE), num_warps=NUM_WARPS,
                                   enable_fp_fusion=False)
    return out


def norm_partials(dtype, order, G, TID, CS, CE, exact=False):
    """Per chunk, as numba_engine.norm_partials; one launch.  Tables are int64 tensors on
    the device; returns a tensor of the math dtype (``exact``: float64 sums)."""
    ord_ = {1.0: 1, 2.0: 2, float("inf"): 0}.get(float(order), 3)
    f64 = dtype == "float64" or bool(exact)
    out = torch.empty(TID.numel(), dtype=torch.float64 if f64 else torch.float32,
                      device=TID.device)
    if TID.numel():
        with launching():
            norm_jit(INTERPRET)[(TID.numel(),)](G, TID, CS, CE, float(order), out,
                                                KIND=KINDS[dtype], ORD=ord_,
                                                BLOCK=block_for(CS, CE),
                                                EXACT=bool(exact), num_warps=NUM_WARPS)
    return out


def norm_jit(interpret):
    """The norm kernel, interpreted or compiled."""
    k = ("norm", interpret)
    if k not in kernels:
        kgl = {"__name__": __name__, "tl": tl, "triton": triton}
        for f in (tensor_ptr, widen, load):
            kgl[f.fn.__name__] = rebind(f, kgl, interpret)
        kernels[k] = rebind(_norm_kernel, kgl, interpret, launch=True)
    return kernels[k]

