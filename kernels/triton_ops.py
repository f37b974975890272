"""The ``ops`` namespace the Triton engine binds into the rules (Numba binds numba_ops).

Plain ``/`` and ``tl.sqrt`` on float32 compile to approximate PTX (``div.full.f32``); the
rules need IEEE round-to-nearest, as torch computes, and ``tl.div_rn`` / ``tl.sqrt_rn``
accept only float32, hence the dispatch on dtype.  ``fma`` rounds once, as torch's
vectorized CPU kernels do in addcmul, lerp and add(alpha=...).  The engine compiles these (they are
plain functions here so that the interpreter can call them without a jit wrapper).
"""
from . import import_triton

tl = import_triton().language


def div(a, b):
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


def sqrt(x):
    if x.dtype == tl.float64:
        return tl.sqrt(x)
    else:
        return tl.sqrt_rn(x)


def maximum(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


def where(c, a, b):
    return tl.where(c, a, b)


def abs(x):  # noqa: A001
    return tl.abs(x)


def fma(a, b, c):
    return tl.fma(a, b, c)
