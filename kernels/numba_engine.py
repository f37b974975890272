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
from .flags import (CODED, UPDATE_A, UPDATE_B, UPDATE_C, UPDATE_KAHAN, UPDATE_MASTER,
                    UPDATE_REMAINDER, Codes)
from .numba_base import IO, coef_row, f32_to_bf16_stochastic, join_master, split_master, voidptr
from .numba_base import lanes as _lanes

CHUNK = 1 << 16

# what each variant binds (_build): the rule, the loads and stores of the params' and the
# state's dtypes, the compensated update (numba_base._kahan), the flags
rule = load = store = sload = sstore = kahan = None
SCALE_GRAD = WRITE_GRAD = STOCH_ROUND = False
_FLAGS = ("SCALE_GRAD", "WRITE_GRAD", "STOCH_ROUND")


def _template(KEY, MASK, DT, SDT):
    # MASK: flags.Update (the state slots in use, a float32 master copy of the param or a
    # compensation buffer in its dtype, or the master's remainder, uint16 bits: table S3)
    WDT = DT if MASK & UPDATE_KAHAN else np.uint16 if MASK & UPDATE_REMAINDER else SDT
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
                if MASK & UPDATE_REMAINDER:
                    pv = join_master(p[j], w[j])
                else:
                    pv = sload(w[j]) if MASK & UPDATE_MASTER else load(p[j])
                p0 = pv
                av = sload(a[j]) if MASK & UPDATE_A else pv
                bv = sload(b[j]) if MASK & UPDATE_B else pv
                cv = sload(c[j]) if MASK & UPDATE_C else pv
                pv, av, bv, cv = rule(pv, gv, av, bv, cv, hs)
                if MASK & UPDATE_MASTER and not MASK & UPDATE_REMAINDER:
                    w[j] = sstore(pv)
                if MASK & UPDATE_REMAINDER:  # the new master split: param and remainder
                    p[j], w[j] = split_master(pv)
                elif MASK & UPDATE_KAHAN:  # the update, compensated (numba_base._kahan)
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


TILE = 256  # elements of a reduce pass's products summed at once (see _reduce_template)


def _reduce_template(KEY, MASK, DT, SDT):
    # flag REDUCE: the rule run as by _template (same loads, same math), nothing stored;
    # per chunk, OUT[ci] = the float64 sums of the products of its outputs (p, a, b, c) two
    # by two: p * a and b * c (a rule returns (p, p, u, u) for |p|**2 and |u|**2, or (r, 1,
    # ..) for the sum of r).  Products of float32 values are exact in float64.  A tile's
    # products go to scratch and are summed by _lanes (compiled apart with reassociation,
    # so that it reaches no op of the rule)
    WDT = np.uint16 if MASK & UPDATE_REMAINDER else SDT

    def kernel(P, G, S0, S1, S2, S3, C, R, TID, CS, CE, N, OUT):
        if KEY == 0:
            return
        for ci in prange(TID.shape[0]):
            t = TID[ci]
            s = CS[ci]
            e = CE[ci]
            n = N[t]
            hs = coef_row(C, t if C.shape[0] > 1 else 0)
            xs = np.empty(TILE, np.float64)
            ys = np.empty(TILE, np.float64)
            s0 = s1 = np.float64(0)
            for j0 in range(s, e, TILE):
                m = min(TILE, e - j0)
                # slices: LLVM then vectorizes the loop (as _template's)
                p = numba.carray(voidptr(P[t]), n, DT)[j0:j0 + m]
                g = numba.carray(voidptr(G[t]), n, DT)[j0:j0 + m]
                a = numba.carray(voidptr(S0[t]), n, SDT)[j0:j0 + m]
                b = numba.carray(voidptr(S1[t]), n, SDT)[j0:j0 + m]
                c = numba.carray(voidptr(S2[t]), n, SDT)[j0:j0 + m]
                w = numba.carray(voidptr(S3[t]), n, WDT)[j0:j0 + m]
                for j in range(m):
                    gv = load(g[j])
                    if SCALE_GRAD:
                        gv = load(store(gv * hs[GRAD_SCALE]))
                    if MASK & UPDATE_REMAINDER:
                        pv = join_master(p[j], w[j])
                    else:
                        pv = sload(w[j]) if MASK & UPDATE_MASTER else load(p[j])
                    av = sload(a[j]) if MASK & UPDATE_A else pv
                    bv = sload(b[j]) if MASK & UPDATE_B else pv
                    cv = sload(c[j]) if MASK & UPDATE_C else pv
                    pv, av, bv, cv = rule(pv, gv, av, bv, cv, hs)
                    xs[j] = np.float64(pv) * np.float64(av)
                    ys[j] = np.float64(bv) * np.float64(cv)
                s0 += _lanes(xs[:m])
                s1 += _lanes(ys[:m])
            OUT[ci, 0] = s0
            OUT[ci, 1] = s1
    return kernel


def reduce(rule, flags, dtypes, mask, P, G, S, C, TID, CS, CE, N):
    """Per chunk, the two sums of the rule's outputs' products (_reduce_template) of one
    group (the arguments as run's; no 8-bit slots): a (chunks, 2) float64 array."""
    k = ("reduce", rule, flags, dtypes, mask)
    fn = base.kernels.get(k)
    if fn is None:
        key = base.cache_key(__name__, *k)
        proto = _reduce_template(key, mask, IO[dtypes[0]][0], IO[dtypes[1]][0])
        gl = base.variant_globals(globals(), base.bindings(rule, flags, dtypes, _FLAGS))
        fn = base.kernels[k] = base.compile_kernel(proto, gl, f"reduce_{rule}_{key:x}")
    out = np.empty((len(TID), 2), dtype=np.float64)
    fn(P, G, S[0], S[1], S[2], S[3], C, P, TID, CS, CE, N, out)
    return out


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
