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


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _r5w1(a, b, d, f, g):
    # Adafactor's bytes: its three passes read p and g twice, g once more, write p once
    for c in prange((a.size + CHUNK - 1) // CHUNK):
        s, e = c * CHUNK, min(a.size, (c + 1) * CHUNK)
        x, y, w, u, z = a[s:e], b[s:e], d[s:e], f[s:e], g[s:e]
        for i in range(e - s):
            x[i] += y[i] + w[i] + u[i] + z[i]


@numba.njit(parallel=True, cache=True, fastmath={"reassoc"}, error_model="numpy")
def _r1w0(a):
    # read-only streams (bench/adafactor_floor.py: the passes of a step that reduces)
    s = numba.float32(0)
    for c in prange((a.size + CHUNK - 1) // CHUNK):
        x = a[c * CHUNK:min(a.size, (c + 1) * CHUNK)]
        t = numba.float32(0)
        for i in range(x.size):
            t += x[i]
        s += t
    return s


@numba.njit(parallel=True, cache=True, fastmath={"reassoc"}, error_model="numpy")
def _r2w0(a, b):
    s = numba.float32(0)
    for c in prange((a.size + CHUNK - 1) // CHUNK):
        s0, e = c * CHUNK, min(a.size, (c + 1) * CHUNK)
        x, y = a[s0:e], b[s0:e]
        t = numba.float32(0)
        for i in range(x.size):
            t += x[i] + y[i]
        s += t
    return s


@numba.njit(parallel=True, cache=True, fastmath={"reassoc"}, error_model="numpy")
def _r3w0(a, b, d):
    # (a trust ratio's reduce pass: p, g and a moment read, nothing written)
    s = numba.float32(0)
    for c in prange((a.size + CHUNK - 1) // CHUNK):
        s0, e = c * CHUNK, min(a.size, (c + 1) * CHUNK)
        x, y, z = a[s0:e], b[s0:e], d[s0:e]
        t = numba.float32(0)
        for i in range(x.size):
            t += x[i] + y[i] + z[i]
        s += t
    return s


@numba.njit(parallel=True, cache=True, fastmath={"reassoc"}, error_model="numpy")
def _r4w0(a, b, d, f):
    s = numba.float32(0)
    for c in prange((a.size + CHUNK - 1) // CHUNK):
        s0, e = c * CHUNK, min(a.size, (c + 1) * CHUNK)
        x, y, z, w = a[s0:e], b[s0:e], d[s0:e], f[s0:e]
        t = numba.float32(0)
        for i in range(x.size):
            t += x[i] + y[i] + z[i] + w[i]
        s += t
    return s


def stream(reads, writes):
    return {(2, 1): _r2w1, (3, 2): _r3w2, (4, 3): _r4w3, (5, 1): _r5w1, (1, 0): _r1w0,
            (2, 0): _r2w0, (3, 0): _r3w0, (4, 0): _r4w0}[(reads, writes)]


def gpu_stream(reads, writes):
    """The same stream in one Triton launch (CUDA): reads = writes + 1, or 1 write and
    up to 4 reads more."""
    from . import import_triton
    triton = import_triton()
    tl = triton.language

    @triton.jit
    def _stream(a, b, c, d, e, f, n, W: tl.constexpr, X: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        m = offs < n
        g = tl.load(d + offs, mask=m)
        if X > 0:  # reads beyond writes + 1 (Adafactor: 5 reads, 1 write)
            g += tl.load(e + offs, mask=m)
        if X > 1:
            g += tl.load(f + offs, mask=m)
        if X > 2:
            g += tl.load(b + offs, mask=m)
        tl.store(a + offs, tl.load(a + offs, mask=m) + g, mask=m)
        if W > 1:
            tl.store(b + offs, tl.load(b + offs, mask=m) + g, mask=m)
        if W > 2:
            tl.store(c + offs, tl.load(c + offs, mask=m) + g, mask=m)

    extra = reads - writes - 1
    assert 0 <= extra <= 3 and (extra == 0 or writes == 1)

    def run(*bufs):
        a, b, c = (list(bufs[:writes]) + list(bufs[writes + 2:]) + [bufs[0]] * 3)[:3]
        e, f = (list(bufs[writes:writes + 2]) + [bufs[0]] * 2)[:2]
        n = bufs[0].numel()
        _stream[(triton.cdiv(n, 4096),)](a, b, c, bufs[-1], e, f, n, W=writes, X=extra,
                                          BLOCK=4096)
    return run
