"""The matrix kernel on the CPU: any rule over tensors seen as batches of matrices, storing
the params or (flag REDUCE) reducing squares per tensor, row and column -- the general
reduction pass (triton_matrix.py is the GPU twin).  Built like numba_engine's kernels."""
import types

import numba
import numpy as np
from numba import prange

from . import numba_base as base, numba_ops
from .coefficients import GRAD_SCALE, LERP_COUNT, LERP_W, LERP_W_REST
from .flags import MATRIX_A, MATRIX_B, MATRIX_C, MATRIX_TOTAL_ONLY
from .numba_base import IO, JIT, coef_row, voidptr
from .numba_base import lanes as _lanes

# what each variant binds (run_matrix): the rule, the loads and stores of the params' and
# the state's dtypes, the math dtype, the flags, the one-column path (_vector_template)
rule = load = store = sload = sstore = MT = _vector = None
REDUCE = SCALE_GRAD = WRITE_GRAD = ROW_LERP = False

TILE = 256  # columns of a row taken at once (float64 params: see _matrix_template)
# elements of whole rows per chunk (a chunk has its own column partials: 4x numba_engine's
# CHUNK cut those to write and add up from 20 MB to 5 MB on GPT-2 shapes, 2.3 ms to 0.6)
CHUNK = 1 << 18


@numba.njit(inline="always", **JIT)
def _kahan(s, c, x):
    # s + x * x with the running compensation c (s - c is the sum; no fastmath here: the
    # order is kept), the square's own rounding error (an fma) folded into c: float64
    # squares of float64 values are not exact
    x2 = x * x
    y = x2 - c
    t = s + y
    return t, ((t - s) - y) - numba_ops.fma(x, x, -x2)


@numba.njit(inline="always", **JIT)
def _kahan_add(s, c, v):
    # s + v with the running compensation c (s - c is the sum)
    y = v - c
    t = s + y
    return t, (t - s) - y


@numba.njit(cache=True, **JIT)
def column_sums(part, coff, ncols, start, n, exact):
    """The matrices' column sums from the chunks' partials (matrix kernel, CPART): chunk c's
    ncols[c] partials (from coff[c]) go to columns start[c] on, of n (the last: dropped
    entries, 1-D chunks'), added in chunk order (deterministic), less their compensations
    where ``exact`` (in the second half of part).  Contiguous runs, so the adds vectorize
    (one scattered add per entry took ~0.4 ms a step on GPT-2 shapes)."""
    out = np.zeros(n)
    half = part.shape[0] // 2 if exact else 0
    for c in range(coff.shape[0]):
        o = out[start[c]:start[c] + ncols[c]]
        p = part[coff[c]:coff[c] + ncols[c]]
        q = part[half + coff[c]:half + coff[c] + ncols[c]]
        for j in range(ncols[c]):
            o[j] += (p[j] - q[j]) if exact else p[j]
    return out


@numba.njit(parallel=True, cache=True, **JIT)
def means_float32(x, count, out):
    """out[i] = torch's ``norm(g, dim=-2).square_().div_(count[i])`` in float32 from the
    columns' sums of squares x[i] (float64), the norm rounded once (the square root of the
    float64 sum, correctly rounded, then to float32).  Over the threads, one pass: as
    torch ops (matrix.col_means) 0.20 ms a step on GPT-2 shapes' 84k columns, here 0.11."""
    for b in prange((x.shape[0] + 65535) // 65536):
        xs, ns = x[b * 65536:(b + 1) * 65536], count[b * 65536:(b + 1) * 65536]
        os = out[b * 65536:(b + 1) * 65536]
        for i in range(xs.shape[0]):
            r = np.float32(np.sqrt(xs[i]))
            os[i] = (r * r) / np.float32(ns[i])
    return out


def _row_factor(s, count, old, w, w_rest):
    # flag ROW_LERP: a row's new factor from its float64 sum of squares s, torch's
    # ``row.lerp_(norm(g, dim=-1).square_().div_(count), w)`` (count 0: a 1-D param's
    # ``variance.lerp_(g.square(), w)``), each op rounded to the param's dtype as torch's
    # (MT: the math dtype; load(store(x)): x rounded to the param's).  The lerp is torch's
    # vectorized one: one fma from the nearer end (|w| < 0.5: from old)
    if count > 0:
        r = load(store(MT(np.sqrt(s))))
        m = load(store(r * r))
        m = load(store(m / MT(count)))
    else:
        m = load(store(MT(s)))
    w, w_rest = MT(w), MT(w_rest)
    small = abs(w) < MT(0.5)
    return numba_ops.fma(numba_ops.where(small, w, -w_rest), m - old,
                         numba_ops.where(small, old, m))


def _vector_template(MASK, EXACT):
    # the matrix kernel's path for one-column tensors (1-D params): rows RS..RE are single
    # elements, so the per-row work of the general path (slices, a row's lane sum) would
    # cost more than the element.  Its one column's sum goes to CPART (an (n, 1) matrix's
    # column factor; a 1-D tensor's is dropped: its rows are its elements).  EXACT
    # (float64 params): the total keeps Kahan's compensation (plain sums put float64
    # Adafactor's error above torch's in test_parity).
    # Else squares of float32 values are exact in float64, and a chunk sums at most CHUNK
    # of them: one sum, which LLVM splits over vector lanes (the reducing kernel is compiled
    # with reassociation: run_matrix)
    def vector(p, g, a, b, c, mat, r0, r1, ROWS, roff, hs):
        tot = tc = col = cc = np.float64(0)
        # slices, not base + j indexing of whole arrays: else LLVM does not vectorize
        pr, gr, ar = p[r0:r1], g[r0:r1], a[r0:r1]
        rows = ROWS[roff + r0:roff + r1] if REDUCE and not MASK & MATRIX_TOTAL_ONLY else ROWS[:0]
        for j in range(r1 - r0):
            pv = load(pr[j])
            gv = load(gr[j])
            if SCALE_GRAD:
                gs = store(gv * hs[GRAD_SCALE])
                if WRITE_GRAD:
                    gr[j] = gs
                gv = load(gs)
            av = sload(ar[j]) if MASK & MATRIX_A else pv
            bv = sload(b[mat]) if MASK & MATRIX_B else pv
            cv = sload(c[mat]) if MASK & MATRIX_C else pv
            x, y, _, _ = rule(pv, gv, av, bv, cv, hs)
            if REDUCE:
                x64, y64 = np.float64(x), np.float64(y)
                if EXACT:
                    tot, tc = _kahan(tot, tc, x64)
                else:
                    tot += x64 * x64
                if not MASK & MATRIX_TOTAL_ONLY:  # the column's sum ((n, 1); 1-D: dropped)
                    if EXACT:
                        col, cc = _kahan(col, cc, y64)
                    else:
                        col += y64 * y64
                if ROW_LERP:  # (a 1-D param's rows: its elements)
                    ar[j] = sstore(_row_factor(y64 * y64, hs[LERP_COUNT], sload(ar[j]),
                                               hs[LERP_W], hs[LERP_W_REST]))
                elif not MASK & MATRIX_TOTAL_ONLY:
                    rows[j] = y64 * y64
            else:
                pr[j] = store(x)
        return tot - tc, col - cc
    return vector


def _matrix_template(KEY, MASK, DT, SDT, EXACT):
    # Each tensor viewed as matrices (leading dims folded): F[t] = (columns, rows per
    # matrix, numel); a chunk is rows RS..RE of one matrix.  Slot a is read per row, b per
    # column of the matrix, c once per matrix (read-only: small vectors, never stored).
    # REDUCE: sums of squares instead of stores, in float64 -- the rule's first output per
    # chunk (TOT), its second per row (ROWS, at the tensor's row offset ROFF) and per
    # column (this chunk's partials in CPART from COFF; for float64 params their Kahan
    # compensations in its second half; the caller adds them up).  MASK: flags.Matrix
    # (TOTAL_ONLY: the caller needs TOT alone, no second output's sums, CPART empty)
    def kernel(P, G, S0, S1, S2, C, TID, RS, RE, F, ROFF, COFF, TOT, ROWS, CPART):
        if KEY == 0:
            return
        for ci in prange(TID.shape[0]):
            t = TID[ci]
            ncol, nrow, n = F[t, 0], F[t, 1], F[t, 2]
            nmat = n // (ncol * nrow)
            p = numba.carray(voidptr(P[t]), n, DT)
            g = numba.carray(voidptr(G[t]), n, DT)
            a = numba.carray(voidptr(S0[t]), nmat * nrow, SDT)
            b = numba.carray(voidptr(S1[t]), nmat * ncol, SDT)
            c = numba.carray(voidptr(S2[t]), nmat, SDT)
            hs = coef_row(C, t if C.shape[0] > 1 else 0)
            mat = RS[ci] // nrow
            cp = COFF[ci]
            tot = np.float64(0)
            tc = np.float64(0)  # Kahan: a long float64 sum of float64 squares stays exact
            half = CPART.shape[0] // 2 if EXACT else 0  # the compensations' place
            if REDUCE and not MASK & MATRIX_TOTAL_ONLY:
                CPART[cp:cp + ncol] = 0
                if EXACT:
                    CPART[half + cp:half + cp + ncol] = 0
            if ncol == 1:  # a vector: one element per row, no per-row loop (see _vector)
                TOT[ci], csum = _vector(p, g, a, b, c, mat, RS[ci], RE[ci], ROWS, ROFF[t], hs)
                if REDUCE and not MASK & MATRIX_TOTAL_ONLY:
                    CPART[cp] = csum
                continue
            # float64 params: a row is taken in tiles of TILE columns, so that its squares'
            # scratch (and the tile of the column sums) stays in L1 (whole rows of 3072
            # columns, 24 KiB a scratch array, ran pass 1 of Adafactor at a third of the
            # speed).  Else the sums need no scratch: the kernel is compiled with
            # reassociation (run_matrix), so LLVM splits them over vector lanes itself,
            # and whole rows ran pass 1 ~10 % faster than tiles of 256 (GPT-2 shapes)
            tile = TILE if EXACT else ncol
            xs = np.empty(TILE if REDUCE and EXACT else 0, np.float64)  # a tile's squares
            ys = np.empty(TILE if REDUCE and EXACT else 0, np.float64)
            for row in range(RS[ci], RE[ci]):
                rsum = rc = np.float64(0)
                for j0 in range(0, ncol, tile):
                    m = min(tile, ncol - j0)
                    # slices: LLVM then vectorizes the loop (indexing whole arrays with
                    # base + j, it did not: the kernel ran at ~7 % of the memory roof)
                    pr = p[row * ncol + j0:row * ncol + j0 + m]
                    gr = g[row * ncol + j0:row * ncol + j0 + m]
                    bt = b[mat * ncol + j0:mat * ncol + j0 + m]
                    cs = CPART[cp + j0:cp + j0 + m]
                    cc = CPART[half + cp + j0:half + cp + j0 + m]
                    for j in range(m):
                        pv = load(pr[j])
                        gv = load(gr[j])
                        if SCALE_GRAD:  # as the update kernel (rules.FLAGS)
                            gs = store(gv * hs[GRAD_SCALE])
                            if WRITE_GRAD:
                                gr[j] = gs
                            gv = load(gs)
                        av = sload(a[row]) if MASK & MATRIX_A else pv
                        bv = sload(bt[j]) if MASK & MATRIX_B else pv
                        cv = sload(c[mat]) if MASK & MATRIX_C else pv
                        x, y, _, _ = rule(pv, gv, av, bv, cv, hs)
                        if REDUCE:
                            x64, y64 = np.float64(x), np.float64(y)
                            if EXACT:
                                xs[j] = x64 * x64
                                if not MASK & MATRIX_TOTAL_ONLY:
                                    ys[j] = y64 * y64
                                    cs[j], cc[j] = _kahan(cs[j], cc[j], y64)
                            else:  # squares of float32 values: exact in float64
                                tot += x64 * x64
                                if not MASK & MATRIX_TOTAL_ONLY:
                                    y2 = y64 * y64
                                    rsum += y2
                                    cs[j] += y2
                        else:
                            pr[j] = store(x)
                    if REDUCE and EXACT:
                        # a tile's sums in float64 lanes (see _lanes), added up over the
                        # row's tiles and the chunk's rows with Kahan's compensation
                        if not MASK & MATRIX_TOTAL_ONLY:
                            rsum, rc = _kahan_add(rsum, rc, _lanes(ys[:m]))
                        tot, tc = _kahan_add(tot, tc, _lanes(xs[:m]))
                if REDUCE and ROW_LERP:
                    a[row] = sstore(_row_factor(rsum - rc, hs[LERP_COUNT], sload(a[row]),
                                                hs[LERP_W], hs[LERP_W_REST]))
                elif REDUCE and not MASK & MATRIX_TOTAL_ONLY:
                    ROWS[ROFF[t] + row] = rsum - rc
            TOT[ci] = tot - tc
    return kernel


def run_matrix(rule, flags, dtypes, mask, P, G, S, C, TID, RS, RE, F, ROFF, COFF, TOT, ROWS,
               CPART):
    """Apply ``rule`` to one group of tensors seen as matrices (see _matrix_template), one
    compiled call: stores the params, or (flag REDUCE) fills TOT, ROWS and CPART."""
    k = ("matrix", rule, flags, dtypes, mask)
    fn = base.kernels.get(k)
    if fn is None:
        key = base.cache_key(__name__, *k)
        proto = _matrix_template(key, mask, IO[dtypes[0]][0], IO[dtypes[1]][0],
                                 dtypes[0] == "float64")
        kgl = base.variant_globals(globals(), dict(
            base.bindings(rule, flags, dtypes, ("REDUCE", "SCALE_GRAD", "WRITE_GRAD", "ROW_LERP")),
            MT=np.float64 if dtypes[0] == "float64" else np.float32))
        # compiled apart (LLVM inlines it, its instructions keeping their flags): a
        # reducing kernel's reassociation must not reach the factor's rounded ops
        kgl["_row_factor"] = numba.njit(**JIT)(
            types.FunctionType(_row_factor.__code__, kgl, "_row_factor"))
        vec = _vector_template(mask, dtypes[0] == "float64")
        kgl["_vector"] = numba.njit(inline="always", **JIT)(
            types.FunctionType(vec.__code__, kgl, "_vector", None, vec.__closure__))
        # a reduction over float32 math: its sums may be reassociated (squares of float32
        # values are exact in float64, and a chunk's sum of them is good to ~CHUNK * 2**-53;
        # the rules' outputs are only summed there).  Never a kernel that stores params
        fast = dict(flags)["REDUCE"] and dtypes[0] != "float64"
        fn = base.kernels[k] = base.compile_kernel(proto, kgl, f"matrix_{rule}_{key:x}",
                                                   fastmath={"reassoc"} if fast else False)
    fn(P, G, S[0], S[1], S[2], C, TID, RS, RE, F, ROFF, COFF, TOT, ROWS, CPART)
