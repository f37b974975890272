"""CPU engine: applies any rule of ``rules.py`` to every tensor of a group in one compiled call.

The group arrives as int64 pointer tables (param, grad, three state slots) and a chunk
table (tensor index, start, end; chunks of at most CHUNK elements).  ``prange`` spreads
the chunks over the threads; inside a chunk the loop runs over *slices* of the arrays,
which lets LLVM prove the indices in range and emit AVX-512 (indexing the whole array
with ``range(s, e)`` did not vectorize and ran 6x slower).  float16 and bfloat16 are
read as uint16 and converted by integer operations (numba has no CPU arithmetic for
them); the math runs in float32, or float64 for float64 params.
"""
import numba
import numpy as np
from numba import prange

from . import numba_base as base, numba_quant
from .coefficients import GRAD_SCALE
from .flags import CODED, UPDATE_A, UPDATE_B, UPDATE_C, UPDATE_KAHAN, UPDATE_MASTER, Codes
from .numba_base import IO, coef_row, f32_to_bf16_stochastic, voidptr

CHUNK = 1 << 16

# what each variant binds (_build): the rule, the loads and stores of the params' and the
# state's dtypes, the compensated update (numba_base._kahan), the flags
rule = load = store = sload = sstore = kahan = None
SCALE_GRAD = WRITE_GRAD = STOCH_ROUND = False
_FLAGS = ("SCALE_GRAD", "WRITE_GRAD", "STOCH_ROUND")


def _template(KEY, MASK, DT, SDT):
    # MASK: flags.Update (the state slots in use, a float32 master copy of the param or a
    # compensation buffer in its dtype: table S3 either way)
    WDT = DT if MASK & UPDATE_KAHAN else SDT
    def kernel(P, G, S0, S1, S2, S3, C, R, TID, CS, CE, N):
        if KEY == 0:  # KEY only tells numba's on-disk cache one variant from another
            return
        for ci in prange(TID.shape[0]):
            t = TID[ci]
            s = CS[ci]
            e = CE[ci]
            n = N[t]
            key = R[t]
            p = numba.carray(voidptr(P[t]), n, DT)[s:e]
            g = numba.carray(voidptr(G[t]), n, DT)[s:e]
            a = numba.carray(voidptr(S0[t]), n, SDT)[s:e]
            b = numba.carray(voidptr(S1[t]), n, SDT)[s:e]
            c = numba.carray(voidptr(S2[t]), n, SDT)[s:e]
            w = numba.carray(voidptr(S3[t]), n, WDT)[s:e]
            hs = coef_row(C, t if C.shape[0] > 1 else 0)  # one row: the same for all
            for j in range(e - s):
                gv = load(g[j])
                if SCALE_GRAD:  # see rules.FLAGS
                    gs = store(gv * hs[GRAD_SCALE])
                    if WRITE_GRAD:
                        g[j] = gs
                    gv = load(gs)
                # unused slots point at the param, maybe of another dtype: never read them
                pv = sload(w[j]) if MASK & UPDATE_MASTER else load(p[j])
                p0 = pv
                av = sload(a[j]) if MASK & UPDATE_A else pv
                bv = sload(b[j]) if MASK & UPDATE_B else pv
                cv = sload(c[j]) if MASK & UPDATE_C else pv
                pv, av, bv, cv = rule(pv, gv, av, bv, cv, hs)
                if MASK & UPDATE_MASTER:
                    w[j] = sstore(pv)
                if MASK & UPDATE_KAHAN:  # the update, compensated (numba_base._kahan)
                    p[j], w[j] = kahan(p0, pv, w[j])
                elif STOCH_ROUND:
                    p[j] = f32_to_bf16_stochastic(pv, s + j, key)
                else:
                    p[j] = store(pv)
                if MASK & UPDATE_A:
                    a[j] = sstore(av)
                if MASK & UPDATE_B:
                    b[j] = sstore(bv)
                if MASK & UPDATE_C:
                    c[j] = sstore(cv)
    return kernel


def _build(rule, flags, dtypes, mask):
    key = base.cache_key(__name__, rule, flags, dtypes, mask)
    dt, sdt = IO[dtypes[0]][0], IO[dtypes[1]][0]
    if mask & Codes.ANY:  # 8-bit slots: uint8 codes (numba_quant's template, its globals)
        proto = numba_quant.template8(key, mask, dt, sdt,
                                      *(np.uint8 if mask & q else sdt for q in CODED))
        module = vars(numba_quant)
    else:
        proto, module = _template(key, mask, dt, sdt), globals()
    gl = base.variant_globals(module, dict(base.bindings(rule, flags, dtypes, _FLAGS),
                                           kahan=base.kahan_for(dtypes[0])))
    return base.compile_kernel(proto, gl, f"kernel_{rule}_{key:x}")


def run(rule, flags, dtypes, mask, P, G, S, C, R, TID, CS, CE, N, Q=None):
    """Apply ``rule`` to one group.  ``flags``: sorted tuple of (name, bool); ``dtypes``:
    torch dtype names of (params and grads, state and master copy); P, G, S[0..3], TID, CS,
    CE, N: int64 arrays; C: [n, NCOEF] (coefficients.pack's rows), or [1, NCOEF] when all
    tensors share them;
    R: each tensor's stochastic-rounding key.  8-bit slots (flags.Codes, numba_quant):
    S[4 + i] points at their absmax, Q is quant.engine_table() as float32 numpy."""
    k = (rule, flags, dtypes, mask)
    fn = base.kernels.get(k)
    if fn is None:
        fn = base.kernels[k] = _build(rule, flags, dtypes, mask)
    if mask & Codes.ANY:
        fn(P, G, S[0], S[1], S[2], S[3], S[4], S[5], S[6], Q, C, R, TID, CS, CE, N)
    else:
        fn(P, G, S[0], S[1], S[2], S[3], C, R, TID, CS, CE, N)


def _norm_template(KEY, ORD, DT):
    # ORD: 1, 2, 0 for inf, 3 for any other p (PW)
    def kernel(G, TID, CS, CE, N, PW, OUT):
        if KEY == 0:
            return
        for ci in prange(TID.shape[0]):
            t = TID[ci]
            s = CS[ci]
            g = numba.carray(voidptr(G[t]), N[t], DT)[s:CE[ci]]
            acc = np.float64(0)
            for j in range(g.shape[0]):
                x = abs(np.float64(load(g[j])))
                if ORD == 2:
                    acc += x * x
                elif ORD == 1:
                    acc += x
                elif ORD == 0:
                    acc = x if (x > acc or x != x) else acc  # NaN sticks
                else:
                    acc += x ** PW
            OUT[ci] = acc
    return kernel


def norm_partials(dtype, order, G, TID, CS, CE, N):
    """Per chunk: the sum of |g|**order (order 1, 2 or any p > 0) or, for order inf, the
    max of |g|, accumulated in float64 (as torch's CPU norms are).  One compiled call."""
    ord_ = {1.0: 1, 2.0: 2, float("inf"): 0}.get(float(order), 3)
    k = ("norm", ord_, dtype)
    fn = base.kernels.get(k)
    if fn is None:
        key = base.cache_key(__name__, *k)
        # reassociation lets LLVM split the float64 sum over vector lanes: one sum is a chain
        # of dependent adds, latency-bound at ~5x below the memory roof (the order of a
        # float64 sum of float32 squares hardly matters; the update kernels get no fastmath)
        gl = base.variant_globals(globals(), dict(load=IO[dtype][1]))
        fn = base.kernels[k] = base.compile_kernel(_norm_template(key, ord_, IO[dtype][0]), gl,
                                                   f"norm_{key:x}", fastmath={"reassoc"})
    out = np.empty(len(TID), dtype=np.float64)
    fn(G, TID, CS, CE, N, np.float64(order), out)
    return out
