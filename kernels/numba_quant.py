"""The CPU engine's 8-bit state (fusedopt/quant.py): the variant of numba_engine's kernel
whose moment slots are uint8 codes with a float32 absmax per block of QBLOCK elements.
Each block is dequantized into float32 scratch, updated by the same rule, and quantized
again with its new absmax, in the one pass over the chunk.  numba_engine compiles
``template8`` with these names in the kernel's globals (``GLOBALS``).
"""
# ruff: noqa: F821  (template8's code runs with numba_engine's globals: its helpers, the
# rule, load/store and the flags are bound in by numba_engine._build)
import numba
import numpy as np

from . import numba_ops, qmap
from .numba_engine import JIT, _bits_f32, _f32_bits

# mask bit 16 << i marks slot i as uint8 codes with a float32 absmax per block of QBLOCK
# elements (tables A0..A2), bit 256 << i its map as signed


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
    # a block's codes -> float32 scratch: a table lookup per element, in a loop of its own
    for j in range(m):
        f[j] = T[codes[j]] * absmax


@numba.njit(inline="always", **JIT)
def requantize(f, codes, m, T, signed):
    # a block's new absmax (the largest magnitude, as float32 bits: NaN sticks; a loop of its
    # own: inside the rule's it kept that from vectorizing), then its codes; returns absmax
    mx = np.uint32(0)
    for j in range(m):
        mx = max(mx, _f32_bits(f[j]) & np.uint32(0x7FFFFFFF))
    absmax = _bits_f32(mx)
    # y = |x| / absmax as a product: one division per block.  A subnormal absmax (moments of
    # vanishing grads) has no finite float32 reciprocal: such blocks are scaled by
    # 1 / qmap.TINY first, which is exact for x and absmax alike
    sc = np.float32(1 / qmap.TINY) if absmax < np.float32(qmap.TINY) else np.float32(1)
    inv = np.float32(1) / (absmax * sc)
    low = q7(T, qmap.LOW)  # (one per line: numba's array analysis fails on unpacking tuples)
    ps = q7(T, qmap.P)
    parts = q7(T, qmap.PARTS)
    ninth = T[qmap.NINTH]
    top_mid = T[qmap.TOP_MID]
    top_k = T[qmap.TOP_K]
    u = np.float32(0 if signed else 1)
    z = np.float32(127 if signed else 0)  # the code of 0
    for j in range(m):
        k = qcode(abs(f[j]) * sc * inv, low, ps, parts, u, ninth, top_mid, top_k)
        codes[j] = np.uint8(z + k if (f[j] >= 0 or not signed) else z - min(k, z))
    return absmax


def template8(KEY, MASK, DT, SDT, ADT, BDT, CDT):
    # as _template, with slots whose mask bit 16 << i is set held as 8-bit codes: each
    # block of QBLOCK elements is dequantized into float32 scratch, updated by the rule,
    # and quantized again with its new absmax, in one pass over the chunk (chunks start
    # at multiples of CHUNK, hence of QBLOCK)
    QA, QB, QC = MASK & 16, MASK & 32, MASK & 64
    RA, RB, RC = (MASK >> 8) & 1, (MASK >> 9) & 1, (MASK >> 10) & 1  # map rows

    def kernel(P, G, S0, S1, S2, S3, A0, A1, A2, Q, C, R, TID, CS, CE, N):
        if KEY == 0:
            return
        for ci in prange(TID.shape[0]):
            t = TID[ci]
            s = CS[ci]
            e = CE[ci]
            n = N[t]
            nb = (n + QBLOCK - 1) // QBLOCK
            key = R[t]
            p_ = numba.carray(_voidptr(P[t]), n, DT)
            g_ = numba.carray(_voidptr(G[t]), n, DT)
            a_ = numba.carray(_voidptr(S0[t]), n, ADT)
            b_ = numba.carray(_voidptr(S1[t]), n, BDT)
            c_ = numba.carray(_voidptr(S2[t]), n, CDT)
            w_ = numba.carray(_voidptr(S3[t]), n, SDT)
            xa = numba.carray(_voidptr(A0[t]), nb, np.float32)
            xb = numba.carray(_voidptr(A1[t]), nb, np.float32)
            xc = numba.carray(_voidptr(A2[t]), nb, np.float32)
            qa, qb, qc = Q[RA], Q[RB], Q[RC]
            r = t if C.shape[0] > 1 else 0
            h0, h1, h2, h3, h4, h5 = C[r, 0], C[r, 1], C[r, 2], C[r, 3], C[r, 4], C[r, 5]
            h6, h7, h8, h9, h10, h11 = C[r, 6], C[r, 7], C[r, 8], C[r, 9], C[r, 10], C[r, 11]
            fa = np.empty(QBLOCK, np.float32)
            fb = np.empty(QBLOCK, np.float32)
            fc = np.empty(QBLOCK, np.float32)
            for b0 in range(s, e, QBLOCK):
                b1 = min(b0 + QBLOCK, e)
                m = b1 - b0
                blk = b0 // QBLOCK
                p, g, w = p_[b0:b1], g_[b0:b1], w_[b0:b1]
                a, b, c = a_[b0:b1], b_[b0:b1], c_[b0:b1]
                if QA:
                    dequantize(fa, a, m, qa, xa[blk])
                if QB:
                    dequantize(fb, b, m, qb, xb[blk])
                if QC:
                    dequantize(fc, c, m, qc, xc[blk])
                for j in range(m):
                    gv = load(g[j])
                    if SCALE_GRAD:
                        gs = store(gv * h11)
                        if WRITE_GRAD:
                            g[j] = gs
                        gv = load(gs)
                    pv = sload(w[j]) if MASK & 8 else load(p[j])
                    av = (fa[j] if QA else sload(a[j])) if MASK & 1 else pv
                    bv = (fb[j] if QB else sload(b[j])) if MASK & 2 else pv
                    cv = (fc[j] if QC else sload(c[j])) if MASK & 4 else pv
                    pv, av, bv, cv = rule(pv, gv, av, bv, cv, h0, h1, h2, h3, h4, h5, h6, h7,
                                         h8, h9, h10, h11)
                    if MASK & 8:
                        w[j] = sstore(pv)
                    if STOCH_ROUND:
                        p[j] = f32_to_bf16_stochastic(pv, b0 + j, key)
                    else:
                        p[j] = store(pv)
                    if QA:
                        fa[j] = av
                    elif MASK & 1:
                        a[j] = sstore(av)
                    if QB:
                        fb[j] = bv
                    elif MASK & 2:
                        b[j] = sstore(bv)
                    if QC:
                        fc[j] = cv
                    elif MASK & 4:
                        c[j] = sstore(cv)
                if QA:
                    xa[blk] = requantize(fa, a, m, qa, RA)
                if QB:
                    xb[blk] = requantize(fb, b, m, qb, RB)
                if QC:
                    xc[blk] = requantize(fc, c, m, qc, RC)
    return kernel


# what template8's code looks up besides numba_engine's globals
GLOBALS = dict(QBLOCK=qmap.QBLOCK, dequantize=dequantize, requantize=requantize)
