"""The GPU engine's 8-bit state (fusedopt/quant.py), as numba_quant for the CPU: moment
slots held as uint8 codes with a float32 absmax per block of QBLOCK elements, dequantized
before the rule and quantized again after it, in the same launch.  A program's BLOCK holds
BLOCK // QBLOCK whole blocks (chunks and BLOCKs start at multiples of QBLOCK), so each
block's absmax is a reduction over one row of the BLOCK reshaped.  4-bit slots
(flags.Codes.FOUR) likewise, with blocks of QBLOCK4 and two codes a byte (qload4,
qstore4, as numba_quant4).  triton_engine binds these helpers into its kernel.
"""
from . import qmap
from .triton_base import store_raw, tl, triton

QBLOCK = tl.constexpr(qmap.QBLOCK)  # elements per absmax
QBLOCK4 = tl.constexpr(qmap.QBLOCK4)  # elements per absmax of 4-bit slots
QTABLE = tl.constexpr(qmap.TABLE)  # columns of a row of quant.engine_table()
# where the map's structure lies in a row, and TINY (kernels/qmap.py), as constexprs for
# the kernel
QCOLS = {n: tl.constexpr(getattr(qmap, n)) for n in ("LOW", "P", "PARTS", "NINTH", "TOP_MID",
                                                     "TOP_K", "TINY", "MID4")}
LOW, P, PARTS, NINTH, TOP_MID, TOP_K, TINY, MID4 = QCOLS.values()


@triton.jit
def qload(cp, xp, offs, end, T, MASKED: tl.constexpr):
    # 8-bit codes -> float32: the map's value (row T of quant.engine_table) times the
    # block's absmax
    codes = tl.load(cp + offs, mask=offs < end, other=0) if MASKED else tl.load(cp + offs)
    return tl.load(T + codes.to(tl.int32)) * tl.load(xp + offs // QBLOCK)


@triton.jit
def per_block(v, BLOCK: tl.constexpr, QS: tl.constexpr):
    # one value per block of QS -> one per element of the BLOCK
    return tl.reshape(tl.broadcast_to(tl.expand_dims(v, 1), [BLOCK // QS, QS]), [BLOCK])


@triton.jit
def absmax_scales(xp, offs, end, x, BLOCK: tl.constexpr, QS: tl.constexpr):
    # each block's (of QS elements) new absmax, stored, and the factors sc, inv per element
    # by which y = x * sc * inv, as numba_quant.requantize computes them: a block of
    # subnormal absmax is scaled by 1 / TINY (exactly) before its one division
    bits = tl.where(offs < end, x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF, 0)
    amax = tl.max(tl.reshape(bits, [BLOCK // QS, QS]), 1)  # NaN's bits are largest
    first = tl.min(tl.reshape(offs, [BLOCK // QS, QS]), 1)  # each block's start
    tl.store(xp + first // QS, amax.to(tl.float32, bitcast=True), mask=first < end)
    amf = amax.to(tl.float32, bitcast=True)
    sc = tl.where(amf < TINY, 1.0 / TINY, 1.0)
    inv = tl.div_rn(1.0, amf * sc)
    return per_block(sc, BLOCK, QS), per_block(inv, BLOCK, QS)


@triton.jit
def qload4(cp, xp, offs, end, T, MASKED: tl.constexpr):
    # packed 4-bit codes -> float32 (the even element's code in the byte's low nibble)
    bp = cp + offs // 2
    byte = tl.load(bp, mask=offs < end, other=0) if MASKED else tl.load(bp)
    code = (byte.to(tl.int32) >> ((offs % 2) * 4)) & 15
    return tl.load(T + code) * tl.load(xp + offs // QBLOCK4)


@triton.jit
def qstore4(cp, xp, offs, end, x, T, BLOCK: tl.constexpr, MASKED: tl.constexpr):
    # float32 -> packed 4-bit codes with each block's new absmax, as numba_quant4's
    # requantize4: the count of the map's midpoints below y = x * sc * inv
    sc, inv = absmax_scales(xp, offs, end, x, BLOCK, QBLOCK4)
    y = x * sc * inv
    k = tl.zeros([BLOCK], dtype=tl.int32)
    for i in tl.static_range(15):
        k += (y > tl.load(T + MID4 + i)).to(tl.int32)
    k = tl.where(offs < end, k << ((offs % 2) * 4), 0)
    pair = tl.sum(tl.reshape(k, [BLOCK // 2, 2]), 1)  # (disjoint nibbles: the sum is the or)
    at = tl.min(tl.reshape(offs, [BLOCK // 2, 2]), 1) // 2
    store_raw(cp, at, (end + 1) // 2, pair.to(tl.uint8), MASKED)


@triton.jit
def qstore(cp, xp, offs, end, x, T, SIGNED: tl.constexpr, BLOCK: tl.constexpr,
            MASKED: tl.constexpr):
    # float32 -> 8-bit codes with each block's new absmax, as numba_quant's qcode (the
    # same float32 operations: the engines' codes are equal)
    sc, inv = absmax_scales(xp, offs, end, x, BLOCK, QBLOCK)
    y = tl.abs(x) * sc * inv
    pr = tl.load(T + P)
    parts = tl.load(T + PARTS)
    for i in tl.static_range(1, 7):
        s = y > tl.load(T + LOW + i)
        pr = tl.where(s, tl.load(T + P + i), pr)
        parts = tl.where(s, tl.load(T + PARTS + i), parts)
    t = parts * tl.fma(y, pr, -tl.load(T + NINTH))
    t = tl.where(t > 0, t, 0.0)
    u = 0.0 if SIGNED else 1.0
    k = tl.minimum(parts - u + t.to(tl.int32).to(tl.float32), parts + parts - u - 1.0)
    k = tl.where(y > tl.load(T + TOP_MID), tl.load(T + TOP_K), k)
    k = tl.where(y > tl.load(T + LOW), k, 0.0)
    if SIGNED:
        code = tl.where(x >= 0, 127.0 + k, 127.0 - tl.minimum(k, 127.0))
    else:
        code = k
    store_raw(cp, offs, end, code.to(tl.uint8), MASKED)
