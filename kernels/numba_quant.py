"""The CPU engine's 8-bit state (fusedopt/quant.py): the variant of numba_engine's kernel
whose moment slots are uint8 codes with a float32 absmax per block of QBLOCK elements (or
4-bit codes per block of QBLOCK4, numba_quant4, under flags.Codes.FOUR).
Each block is dequantized into float32 scratch, updated by the same rule, and quantized
again with its new absmax, in the one pass over the chunk: numba_engine compiles
``template8`` with this module's globals.
"""
import numba
import numpy as np
from llvmlite import ir
from numba import prange
from numba import types as nt
from numba.core import cgutils
from numba.core.registry import cpu_target
from numba.extending import intrinsic

from . import numba_avx2, numba_ops, numba_quant4, qmap
from .numba_avx2 import data_ptrs as _data, splat as _splat
from .coefficients import GRAD_SCALE
from .flags import (UPDATE_A, UPDATE_B, UPDATE_C, UPDATE_KAHAN, UPDATE_MASTER, UPDATE_REMAINDER,
                    Codes)
from .numba_base import (JIT, coef_row, f32_to_bf16_stochastic, join_master,
                         split_master, voidptr)
from .numba_quant4 import dequantize4, requantize4

QBLOCK = qmap.QBLOCK

# what each variant binds (numba_engine._build): as numba_engine's
rule = load = store = sload = sstore = kahan = None
SCALE_GRAD = WRITE_GRAD = STOCH_ROUND = False

# what the CPU numba compiles for (its target machine's features) has: with AVX-512, the
# codes are computed 16 at a time with permutes (_coders); with AVX-512 VBMI's byte
# permutes too, the 8-bit map is looked up 64 codes at a time (_permutes) instead of one
# load per code, which LLVM does not vectorize on AMD CPUs (a gather is costed too slow)
# and which took ~30 % of the 8-bit step
try:
    _FEATURES = set(cpu_target.target_context.codegen()._tm_features.split(","))
except Exception:  # (a numba without that attribute: the portable loops)
    _FEATURES = set()
AVX512 = "+avx512f" in _FEATURES
VBMI = AVX512 and {"+avx512bw", "+avx512vbmi"} <= _FEATURES
AVX2 = {"+avx2", "+fma"} <= _FEATURES  # (numba_avx2: 8 lanes, where AVX-512 is not there)
_I8, _I32, _F32 = ir.IntType(8), ir.IntType(32), ir.FloatType()


def _permutes(groups):
    # f[j:j+64*groups] = T[codes[...]] * absmax, 64 codes at a time: the map's four byte
    # planes (T's columns PLANES on) permuted by the codes (vpermi2b: 128 entries, the
    # codes' top bit picks the half), the bytes interleaved back into float32 values, one
    # multiply.  The planes are loaded once per call: a whole block (groups=4) loads them
    # once, not once per 64 codes (the stores to f may alias T, for all LLVM knows)
    @intrinsic
    def permute(typingctx, f, codes, T, absmax, j):
        sig = nt.void(f, codes, T, absmax, j)

        def codegen(context, builder, sig, args):
            ptr = _data(context, builder, sig, args, 3)
            v64, f64 = ir.VectorType(_I8, 64), ir.VectorType(_F32, 64)
            load = lambda p: builder.load(  # noqa: E731
                builder.bitcast(p, v64.as_pointer()), align=1)
            perm = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(v64, [v64, v64, v64]),
                "llvm.x86.avx512.vpermi2var.qi.512")
            base = builder.bitcast(builder.gep(ptr[2], [ir.Constant(_I32, qmap.PLANES)]),
                                   _I8.as_pointer())
            q = [load(builder.gep(base, [ir.Constant(_I32, 64 * i)])) for i in range(16)]
            zip_ = ir.Constant(ir.VectorType(_I32, 128),
                               [x for k in range(64) for x in (k, 64 + k)])
            scale = _splat(builder, args[3], f64)
            for k in range(groups):
                at = builder.add(args[4], ir.Constant(args[4].type, 64 * k))
                idx = load(builder.gep(ptr[1], [at]))
                upper = builder.icmp_signed("<", idx, ir.Constant(v64, None))  # codes 128-255
                planes = [builder.select(upper,
                                         builder.call(perm, [q[4 * p + 2], idx, q[4 * p + 3]]),
                                         builder.call(perm, [q[4 * p], idx, q[4 * p + 1]]))
                          for p in range(4)]
                half = [builder.bitcast(builder.shuffle_vector(planes[p], planes[p + 1], zip_),
                                        ir.VectorType(ir.IntType(16), 64)) for p in (0, 2)]
                values = builder.bitcast(builder.shuffle_vector(half[0], half[1], zip_), f64)
                out = builder.bitcast(builder.gep(ptr[0], [at]), f64.as_pointer())
                builder.store(builder.fmul(values, scale), out, align=4)
            return context.get_dummy_value()
        return sig, codegen
    return permute


# a whole block's (QBLOCK values) in one call: whole groups of 64 values and 16 codes
assert qmap.QBLOCK % 64 == 0
_permute64, _permute_block = _permutes(1), _permutes(qmap.QBLOCK // 64)


def _coders(groups):
    # codes[j:j+16*groups] of f[j:j+16*groups], 16 at a time: qcode's float32 operations in
    # the same order, with the decade found from y's binary exponent (quant.engine_table's
    # EXP_D, EXP_LOW: a permute of 32 entries each, one compare) and its P and PARTS by a
    # permute of 16, instead of six compares and twelve selects per element.  The tables
    # are loaded once per call (a whole block: groups=16), as in _permutes
    @intrinsic
    def coder(typingctx, codes, f, T, sc, inv, j, signed):
        sig = nt.void(codes, f, T, sc, inv, j, signed)

        def codegen(context, builder, sig, args):
            ptr = _data(context, builder, sig, args, 3)
            v16, i16 = ir.VectorType(_F32, 16), ir.VectorType(_I32, 16)
            splat = lambda x, t=v16: _splat(builder, x, t)  # noqa: E731
            const = lambda x: ir.Constant(v16, float(x))  # noqa: E731
            fn = lambda name, ret, *a: builder.call(cgutils.get_or_insert_function(  # noqa: E731
                builder.module, ir.FunctionType(ret, [x.type for x in a]), name), a)
            cols = {}

            def col(c):  # a vector of 16 columns of T from c, loaded at its first use
                if c not in cols:
                    cols[c] = builder.load(builder.bitcast(
                        builder.gep(ptr[2], [ir.Constant(_I32, c)]), v16.as_pointer()), align=4)
                return cols[c]
            icol = lambda c: builder.bitcast(col(c), i16)  # noqa: E731  (int32 columns)
            low = splat(builder.load(builder.gep(ptr[2], [ir.Constant(_I32, qmap.LOW)])))
            zero = ir.Constant(i16, 0)
            z = builder.select(builder.icmp_signed("!=", args[6], ir.Constant(args[6].type, 0)),
                               ir.Constant(i16, [127] * 16), zero)  # the code of 0
            for g in range(groups):
                at = builder.add(args[5], ir.Constant(args[5].type, 16 * g))
                x = builder.load(builder.bitcast(builder.gep(ptr[1], [at]), v16.as_pointer()),
                                 align=4)
                ax = fn("llvm.fabs.v16f32", v16, x)
                y = builder.fmul(builder.fmul(ax, splat(args[3])), splat(args[4]))
                # y's exponent field (its sign bit is 0), of which the permutes read the
                # low 5 bits: for y in [2^-31, 2) that is the bucket (qmap.EXP_D); a y below
                # 2^-31 gets code 0 whatever its decade (it is under LOW[0], checked last),
                # and so does NaN.  y < 2 holds: requantize's absmax is the block's largest
                # |x|, so y <= 1 + 2^-23 (and inf, from a block of absmax inf, lands in
                # bucket 31: decade 7, 1's code)
                b = builder.lshr(builder.bitcast(y, i16), ir.Constant(i16, 23))
                d = builder.bitcast(fn("llvm.x86.avx512.vpermi2var.ps.512", v16,
                                       col(qmap.EXP_D), b, col(qmap.EXP_D + 16)), i16)
                above = builder.fcmp_ordered(">", y, fn(
                    "llvm.x86.avx512.vpermi2var.ps.512", v16, col(qmap.EXP_LOW), b,
                    col(qmap.EXP_LOW + 16)))
                d = builder.select(above, builder.add(d, ir.Constant(i16, 1)), d)
                pick = lambda c, d=d: fn(  # noqa: E731
                    "llvm.x86.avx512.permvar.sf.512", v16, col(c), d)
                ipick = lambda c, d=d: fn(  # noqa: E731
                    "llvm.x86.avx512.permvar.si.512", i16, icol(c), d)
                # qcode's t = PARTS * fma(y, P, -1/9) as one fma (the same bits), NaN and
                # negatives to 0, then in int32: min(PARTS - u + int(t), 2 PARTS - u - 1)
                # = PK + min(int(t), PM)
                t = fn("llvm.fma.v16f32", v16, y, pick(qmap.PA), builder.fneg(pick(qmap.PB)))
                t = builder.select(builder.fcmp_ordered(">", t, const(0)), t, const(0))
                ti = builder.fptosi(t, i16)  # (t in [0, ~2 PARTS]: defined)
                pm = ipick(qmap.PM)
                ti = builder.select(builder.icmp_signed("<", pm, ti), pm, ti)
                k = builder.add(ipick(qmap.PK), ti)
                k = builder.select(builder.fcmp_ordered(">", y, low), k, zero)
                kz = builder.select(builder.icmp_signed("<", z, k), z, k)  # min(k, z)
                pos = builder.or_(builder.fcmp_ordered(">=", x, const(0)),
                                  builder.icmp_signed("==", z, zero))
                code = builder.select(pos, builder.add(z, k), builder.sub(z, kz))
                out = builder.trunc(code, ir.VectorType(_I8, 16))
                builder.store(out, builder.bitcast(builder.gep(ptr[0], [at]),
                                                   ir.VectorType(_I8, 16).as_pointer()), align=1)
            return context.get_dummy_value()
        return sig, codegen
    return coder


_codes16, _codes_block = _coders(1), _coders(qmap.QBLOCK // 16)


_scale_block = numba_quant4.block_scale(qmap.QBLOCK)


def _loads(n):
    # what _permutes does, a load per code (CPUs without VBMI)
    @numba.njit(inline="always", **JIT)
    def loads(f, codes, T, absmax, j):
        for i in range(j, j + n):
            f[i] = T[codes[i]] * absmax
    return loads


_lookup64 = _permute64 if VBMI else _loads(64)
_lookup_block = _permute_block if VBMI else _loads(qmap.QBLOCK)

# flags.Codes marks a slot as uint8 codes with a float32 absmax per block of QBLOCK
# elements (tables A0..A2), and its map as signed


@numba.njit(inline="always", **JIT)
def q7(T, o):
    # seven columns of a row of quant.engine_table(), read into registers once per block
    # (loads from the table inside the element loop kept it from vectorizing: ~4x slower)
    return (T[o], T[o + 1], T[o + 2], T[o + 3], T[o + 4], T[o + 5], T[o + 6])


@numba.njit(inline="always", **JIT)
def qcode(y, low, ps, parts_, u, ninth, top_mid, top_k):
    # the code of y = |x| / absmax under a map (quant.engine_table(), whose docstring gives
    # the formula; low, ps, parts_: its columns LOW, P, PARTS by q7; u: 1 for the unsigned
    # map), counted from the code of 0, as float32: compares, selects and one fma per element
    pr = ps[0]
    parts = parts_[0]
    for i in range(1, 7):
        s = y > low[i]
        pr = ps[i] if s else pr
        parts = parts_[i] if s else parts
    t = parts * numba_ops.fma(y, pr, -ninth)  # (parts is a power of 2: exact)
    t = t if t > 0 else np.float32(0)  # (NaN: a block of zeros, 0 * inf) -> 0
    k = min(parts - u + np.float32(np.int32(t)), parts + parts - u - np.float32(1))
    k = top_k if y > top_mid else k
    return k if y > low[0] else np.float32(0)


@numba.njit(inline="always", **JIT)
def dequantize(f, codes, m, T, absmax):
    # a block's codes -> float32 scratch, map[code] * absmax: 64 codes at a time (_lookup64),
    # the rest of a short last block one by one
    if m == qmap.QBLOCK:  # (every block but a tensor's last)
        _lookup_block(f, codes, T, absmax, 0)
        return
    whole = m - m % 64
    for j in range(0, whole, 64):
        _lookup64(f, codes, T, absmax, j)
    for j in range(whole, m):
        f[j] = T[codes[j]] * absmax


@numba.njit(inline="always", **JIT)
def _coded(codes, f, T, sc, inv, lo, hi, signed):
    # codes[lo:hi] of f[lo:hi], one element at a time (qcode)
    low = q7(T, qmap.LOW)  # (one per line: numba's array analysis fails on unpacking tuples)
    ps = q7(T, qmap.P)
    parts = q7(T, qmap.PARTS)
    ninth = T[qmap.NINTH]
    top_mid = T[qmap.TOP_MID]
    top_k = T[qmap.TOP_K]
    u = np.float32(0 if signed else 1)
    z = np.float32(127 if signed else 0)  # the code of 0
    for j in range(lo, hi):
        k = qcode(abs(f[j]) * sc * inv, low, ps, parts, u, ninth, top_mid, top_k)
        codes[j] = np.uint8(z + k if (f[j] >= 0 or not signed) else z - min(k, z))


@numba.njit(inline="always", **JIT)
def _permuted(codes, f, T, sc, inv, lo, hi, signed):
    # codes[lo:hi] of f[lo:hi], hi - lo a multiple of 16: a whole block by _codes_block (its
    # tables loaded once), else by _codes16
    if hi - lo == qmap.QBLOCK:
        _codes_block(codes, f, T, sc, inv, lo, signed)
        return
    for j in range(lo, hi, 16):
        _codes16(codes, f, T, sc, inv, j, signed)


_coded16 = _permuted if AVX512 else numba_avx2.coded8 if AVX2 else _coded


@numba.njit(inline="always", **JIT)
def requantize(f, codes, m, T, signed):
    # a block's new absmax and its codes (numba_quant4.block_scale); returns absmax
    absmax, sc, inv = _scale_block(f, m)
    whole = m - m % 16
    if sc == np.float32(1):  # (almost every block: the multiply by sc folded away)
        _coded16(codes, f, T, np.float32(1), inv, 0, whole, signed)
    else:
        _coded16(codes, f, T, sc, inv, 0, whole, signed)
    _coded(codes, f, T, sc, inv, whole, m, signed)
    return absmax


def template8(KEY, MASK, DT, SDT, ADT, BDT, CDT):
    # as numba_engine._template, with the slots that MASK's Codes bits name held as 8-bit
    # codes: each block of QBLOCK elements is dequantized into float32 scratch, updated by
    # the rule, and quantized again with its new absmax, in one pass over the chunk (chunks
    # start at multiples of numba_engine.CHUNK, hence of QBLOCK)
    QA, QB, QC = MASK & Codes.A, MASK & Codes.B, MASK & Codes.C
    FOUR = bool(MASK & Codes.FOUR)  # 4-bit codes: QBLOCK4 elements a block, two a byte
    QS = qmap.QBLOCK4 if FOUR else QBLOCK
    # per slot: the shift from an element's index to its code's byte's (1: 4-bit codes)
    HA, HB, HC = (int(FOUR and bool(q)) for q in (QA, QB, QC))
    RA, RB, RC = (int(bool(MASK & s)) for s in (Codes.SIGNED_A, Codes.SIGNED_B,
                                                Codes.SIGNED_C))  # map rows
    RA4, RB4, RC4 = (r + 2 * FOUR for r in (RA, RB, RC))  # (rows 2, 3: the 4-bit maps)
    # (as numba_engine._template)
    WDT = DT if MASK & UPDATE_KAHAN else np.uint16 if MASK & UPDATE_REMAINDER else SDT

    def kernel(P, G, S0, S1, S2, S3, A0, A1, A2, Q, C, R, TID, CS, CE, N):
        if KEY == 0:
            return
        for ci in prange(TID.shape[0]):
            t = TID[ci]
            s = CS[ci]
            e = CE[ci]
            n = N[t]
            nb = (n + QS - 1) // QS
            key = R[t]
            p_ = numba.carray(voidptr(P[t]), n, DT)
            g_ = numba.carray(voidptr(G[t]), n, DT)
            a_ = numba.carray(voidptr(S0[t]), n >> HA, ADT)
            b_ = numba.carray(voidptr(S1[t]), n >> HB, BDT)
            c_ = numba.carray(voidptr(S2[t]), n >> HC, CDT)
            w_ = numba.carray(voidptr(S3[t]), n, WDT)
            xa = numba.carray(voidptr(A0[t]), nb, np.float32)
            xb = numba.carray(voidptr(A1[t]), nb, np.float32)
            xc = numba.carray(voidptr(A2[t]), nb, np.float32)
            qa, qb, qc = Q[RA4], Q[RB4], Q[RC4]
            hs = coef_row(C, t if C.shape[0] > 1 else 0)
            fa = np.empty(QS, np.float32)
            fb = np.empty(QS, np.float32)
            fc = np.empty(QS, np.float32)
            for b0 in range(s, e, QS):
                b1 = min(b0 + QS, e)
                m = b1 - b0
                blk = b0 // QS
                p, g, w = p_[b0:b1], g_[b0:b1], w_[b0:b1]
                a, b, c = a_[b0 >> HA:b1 >> HA], b_[b0 >> HB:b1 >> HB], c_[b0 >> HC:b1 >> HC]
                if QA and FOUR:
                    dequantize4(fa, a, m, qa, xa[blk])
                elif QA:
                    dequantize(fa, a, m, qa, xa[blk])
                if QB and FOUR:
                    dequantize4(fb, b, m, qb, xb[blk])
                elif QB:
                    dequantize(fb, b, m, qb, xb[blk])
                if QC and FOUR:
                    dequantize4(fc, c, m, qc, xc[blk])
                elif QC:
                    dequantize(fc, c, m, qc, xc[blk])
                for j in range(m):
                    gv = load(g[j])
                    if SCALE_GRAD:
                        gs = store(gv * hs[GRAD_SCALE])
                        if WRITE_GRAD:
                            g[j] = gs
                        gv = load(gs)
                    if MASK & UPDATE_REMAINDER:
                        pv = join_master(p[j], w[j])
                    else:
                        pv = sload(w[j]) if MASK & UPDATE_MASTER else load(p[j])
                    p0 = pv
                    av = (fa[j] if QA else sload(a[j])) if MASK & UPDATE_A else pv
                    bv = (fb[j] if QB else sload(b[j])) if MASK & UPDATE_B else pv
                    cv = (fc[j] if QC else sload(c[j])) if MASK & UPDATE_C else pv
                    pv, av, bv, cv = rule(pv, gv, av, bv, cv, hs)
                    if MASK & UPDATE_MASTER and not MASK & UPDATE_REMAINDER:
                        w[j] = sstore(pv)
                    if MASK & UPDATE_REMAINDER:
                        p[j], w[j] = split_master(pv)
                    elif MASK & UPDATE_KAHAN:
                        p[j], w[j] = kahan(p0, pv, w[j])
                    elif STOCH_ROUND:
                        p[j] = f32_to_bf16_stochastic(pv, b0 + j, key)
                    else:
                        p[j] = store(pv)
                    if QA:
                        fa[j] = av
                    elif MASK & UPDATE_A:
                        a[j] = sstore(av)
                    if QB:
                        fb[j] = bv
                    elif MASK & UPDATE_B:
                        b[j] = sstore(bv)
                    if QC:
                        fc[j] = cv
                    elif MASK & UPDATE_C:
                        c[j] = sstore(cv)
                if QA and FOUR:
                    xa[blk] = requantize4(fa, a, m, qa)
                elif QA:
                    xa[blk] = requantize(fa, a, m, qa, RA)
                if QB and FOUR:
                    xb[blk] = requantize4(fb, b, m, qb)
                elif QB:
                    xb[blk] = requantize(fb, b, m, qb, RB)
                if QC and FOUR:
                    xc[blk] = requantize4(fc, c, m, qc)
                elif QC:
                    xc[blk] = requantize(fc, c, m, qc, RC)
    return kernel
