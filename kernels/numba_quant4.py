"""The CPU engine's 4-bit state (fusedopt/quant.py, ``state_dtype=torch.uint4``): a block
of QBLOCK4 elements as two codes per byte (the even element in the low nibble) and one
float32 absmax, dequantized into float32 scratch and quantized again by numba_quant's
template, in its one pass (flags.Codes.FOUR).  A code is the count of the map's 15
midpoints (quant.engine_table's rows 2 and 3, columns MID4 on) below y = x * (1 / absmax):
the same float32 compares as triton_quant's, so the engines' codes are equal.

Also the block's absmax by vector maxes (``absmax_bits``), which the 8-bit blocks use too.
"""
import numba
import numpy as np
from llvmlite import ir
from numba import types as nt
from numba.core import cgutils
from numba.extending import intrinsic

from . import qmap
from .numba_avx2 import data_ptrs as _data
from .numba_base import JIT, bits_f32, f32_bits

QBLOCK4 = qmap.QBLOCK4
_I32 = ir.IntType(32)


def absmax_bits(n):
    # the largest |f[0:n]| as float32 bits (NaN's above inf's: it sticks): n / 16 vector
    # loads, masks and unsigned maxes, one reduction.  Numba's loop of uint32 maxes (its
    # ints widen to 64 bits) was slower: the 8-bit step went 0.855 -> 0.818 ns of core time
    # per param in cache with this
    assert n % 16 == 0

    @intrinsic
    def absmax(typingctx, f):
        sig = nt.uint32(f)

        def codegen(context, builder, sig, args):
            i16 = ir.VectorType(_I32, 16)
            base = builder.bitcast(_data(context, builder, sig, args, 1)[0], i16.as_pointer())
            umax = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(i16, [i16, i16]), "llvm.umax.v16i32")
            mask = ir.Constant(i16, [0x7FFFFFFF] * 16)
            v = [builder.and_(builder.load(builder.gep(base, [ir.Constant(_I32, i)]), align=4),
                              mask) for i in range(n // 16)]
            while len(v) > 1:  # a tree of independent maxes (an odd one out waits a level)
                v = [builder.call(umax, [v[i], v[i + 1]]) for i in range(0, len(v) - 1, 2)] \
                    + v[len(v) - len(v) % 2:]
            red = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_I32, [i16]), "llvm.vector.reduce.umax.v16i32")
            return builder.call(red, [v[0]])
        return sig, codegen
    return absmax


@numba.njit(inline="always", **JIT)
def _mids(T):
    # the 15 midpoints of a 4-bit row, read into registers once per block
    o = qmap.MID4
    return (T[o], T[o + 1], T[o + 2], T[o + 3], T[o + 4], T[o + 5], T[o + 6], T[o + 7],
            T[o + 8], T[o + 9], T[o + 10], T[o + 11], T[o + 12], T[o + 13], T[o + 14])


@numba.njit(inline="always", **JIT)
def _code(y, m):
    # the count of midpoints below y, written out: a loop over the 15 (LLVM did not unroll
    # it before vectorizing) made the 4-bit step ~100x slower
    return (np.int32(y > m[0]) + np.int32(y > m[1]) + np.int32(y > m[2]) + np.int32(y > m[3])
            + np.int32(y > m[4]) + np.int32(y > m[5]) + np.int32(y > m[6])
            + np.int32(y > m[7]) + np.int32(y > m[8]) + np.int32(y > m[9])
            + np.int32(y > m[10]) + np.int32(y > m[11]) + np.int32(y > m[12])
            + np.int32(y > m[13]) + np.int32(y > m[14]))


@numba.njit(inline="always", **JIT)
def dequantize4(f, codes, m, T, absmax):
    # a block's packed codes -> float32 scratch, map[code] * absmax (m is even: 4-bit state
    # is taken by params whose last dim is even, quant.takes)
    for j in range(m >> 1):
        byte = codes[j]
        f[2 * j] = T[byte & 15] * absmax  # (uint8 operands here: ~40x slower)
        f[2 * j + 1] = T[byte >> 4] * absmax


def block_scale(n):
    """``scale(f, m)``: the new absmax of a block of m values (n in every block but a
    tensor's last) and the factors (sc, inv) of y = x * sc * inv, its values scaled into
    [-1, 1] for coding, shared by both widths.  absmax is the largest magnitude, as float32
    bits (a loop of its own: inside the rule's it kept that from vectorizing; NaN sticks).
    y is a product: one division per block.  A subnormal absmax (moments of vanishing
    grads) has no finite float32 reciprocal: such blocks are scaled by 1 / qmap.TINY
    first, which is exact for x and absmax alike."""
    whole = absmax_bits(n)

    @numba.njit(inline="always", **JIT)
    def scale(f, m):
        if m == n:
            mx = whole(f)
        else:
            mx = np.uint32(0)
            for j in range(m):
                mx = max(mx, f32_bits(f[j]) & np.uint32(0x7FFFFFFF))
        absmax = bits_f32(mx)
        sc = np.float32(1 / qmap.TINY) if absmax < np.float32(qmap.TINY) else np.float32(1)
        return absmax, sc, np.float32(1) / (absmax * sc)
    return scale


_scale4 = block_scale(QBLOCK4)


@numba.njit(inline="always", **JIT)
def requantize4(f, codes, m, T):
    # a block's new absmax and its packed codes (block_scale); returns absmax.  Signed: the
    # unsigned map's y is never negative, and a negative y gets its first code all the same
    absmax, sc, inv = _scale4(f, m)
    mids = _mids(T)
    for j in range(m >> 1):
        codes[j] = np.uint8(_code(f[2 * j] * sc * inv, mids)
                            | (_code(f[2 * j + 1] * sc * inv, mids) << 4))
    return absmax
