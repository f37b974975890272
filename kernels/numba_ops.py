"""The ``ops`` namespace the Numba engine binds into the rules (Triton binds triton.language)."""
import math

import numba
from numba.extending import intrinsic


@numba.njit(inline="always")
def sqrt(x):
    return math.sqrt(x)


@numba.njit(inline="always")
def div(a, b):
    return a / b


@numba.njit(inline="always")
def where(cond, a, b):
    return a if cond else b


@numba.njit(inline="always")
def maximum(a, b):
    # NaN-propagating like torch.maximum
    return a if (a > b or a != a) else b


@numba.njit(inline="always")
def abs(x):  # noqa: A001  (mirrors triton.language.abs)
    return x if x >= -x else -x


@intrinsic
def fma(typingctx, a, b, c):
    # a * b + c rounded once (llvm.fma), as torch's vectorized CPU kernels compute it
    if not (a == b == c):
        return None

    def codegen(context, builder, sig, args):
        return builder.fma(*args)
    return a(a, b, c), codegen
