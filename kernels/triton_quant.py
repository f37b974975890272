"""The GPU engine's 8-bit state (fusedopt/quant.py), as numba_quant for the CPU: moment
slots held as uint8 codes with a float32 absmax per block of QBLOCK elements, dequantized
before the rule and quantized again after it, in the same launch.  A program's BLOCK holds
BLOCK // QBLOCK whole blocks (chunks and BLOCKs start at multiples of QBLOCK), so each
block's absmax is a reduction over one row of the BLOCK reshaped.  triton_engine binds
these helpers into its kernel (they call its ``_store_raw``).
"""
# ruff: noqa: F821  (_store_raw is triton_engine's, bound in when the kernel is built)
import triton
import triton.language as tl

QBLOCK = tl.constexpr(256)  # elements per absmax
QTABLE = tl.constexpr(296)  # columns of a row of quant.engine_table()


@triton.jit
def _qload(cp, xp, offs, end, T, MASKED: tl.constexpr):
    # 8-bit codes -> float32: the map's value (row T of quant.engine_table) times the
    # block's absmax
    codes = tl.load(cp + offs, mask=offs < end, other=0) if MASKED else tl.load(cp + offs)
    return tl.load(T + codes.to(tl.int32)) * tl.load(xp + offs // QBLOCK)


@triton.jit
def _qstore(cp, xp, offs, end, x, T, SIGNED: tl.constexpr, BLOCK: tl.constexpr,
            MASKED: tl.constexpr):
    # float32 -> 8-bit codes with each block's new absmax, as numba_engine's qcode (the
    # same float32 operations: the engines' codes are equal)
    bits = tl.where(offs < end, x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF, 0)
    amax = tl.max(tl.reshape(bits, [BLOCK // QBLOCK, QBLOCK]), 1)  # NaN's bits are largest
    first = tl.min(tl.reshape(offs, [BLOCK // QBLOCK, QBLOCK]), 1)  # each block's start
    tl.store(xp + first // QBLOCK, amax.to(tl.float32, bitcast=True), mask=first < end)
    am = tl.reshape(tl.broadcast_to(tl.expand_dims(amax, 1), [BLOCK // QBLOCK, QBLOCK]),
                    [BLOCK]).to(tl.float32, bitcast=True)
    y = tl.div_rn(tl.abs(x), am)
    r = tl.load(T + 263)
    c = tl.load(T + 270)
    k0 = tl.load(T + 277)
    km = tl.load(T + 284)
    for i in tl.static_range(1, 7):
        s = y > tl.load(T + 256 + i)
        r = tl.where(s, tl.load(T + 263 + i), r)
        c = tl.where(s, tl.load(T + 270 + i), c)
        k0 = tl.where(s, tl.load(T + 277 + i), k0)
        km = tl.where(s, tl.load(T + 284 + i), km)
    t = tl.fma(y, r, -c)
    t = tl.where(t > 0, t, 0.0)
    k = tl.minimum(k0 + t.to(tl.int32).to(tl.float32), km)
    k = tl.where(y > tl.load(T + 291), tl.load(T + 292), k)
    k = tl.where(y > tl.load(T + 256), k, 0.0)
    if SIGNED:
        code = tl.where(x >= 0, 127.0 + k, 127.0 - tl.minimum(k, 127.0))
    else:
        code = k
    _store_raw(cp, offs, end, code.to(tl.uint8), MASKED)
