"""The CPU memory roof: an in-place stream with the optimizer's read/write pattern,
compiled like the engine (parallel, vectorized), against which its speed is quoted."""
import numba
from numba import prange

CHUNK = 1 << 16


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _r2w1(a, b):
    for c in prange((a.size + CHUNK - 1) // CHUNK):
        s, e = c * CHUNK, min(a.size, (c + 1) * CHUNK)
        x, y = a[s:e], b[s:e]
        for i in range(e - s):
            x[i] += y[i]


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _r3w2(a, b, g):
    for c in prange((a.size + CHUNK - 1) // CHUNK):
        s, e = c * CHUNK, min(a.size, (c + 1) * CHUNK)
        x, y, z = a[s:e], b[s:e], g[s:e]
        for i in range(e - s):
            x[i] += z[i]
            y[i] += z[i]


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _r4w3(a, b, d, g):
    for c in prange((a.size + CHUNK - 1) // CHUNK):
        s, e = c * CHUNK, min(a.size, (c + 1) * CHUNK)
        x, y, w, z = a[s:e], b[s:e], d[s:e], g[s:e]
        for i in range(e - s):
            x[i] += z[i]
            y[i] += z[i]
            w[i] += z[i]


def stream(reads, writes):
    return {(2, 1): _r2w1, (3, 2): _r3w2, (4, 3): _r4w3}[(reads, writes)]
