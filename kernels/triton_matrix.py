"""The matrix kernel in Triton: any rule over tensors seen as batches of matrices, storing
the params or (flag REDUCE) reducing squares per tensor, row and column.  The general
reduction pass (numba_matrix.py is the CPU twin); the rules are bound by triton_base.bind_rule,
as in triton_engine."""
from . import triton_base as base
from .coefficients import GRAD_SCALE, LERP_COUNT, LERP_W, LERP_W_REST
from .flags import MATRIX_A, MATRIX_B, MATRIX_C, MATRIX_TOTAL_ONLY
from .triton_base import (BLOCK, INTERPRET, KINDS, NUM_WARPS, kernels, launching, loaded_row,
                          narrow, rebind, tensor_ptr, tl, triton, widen)

# what build_matrix binds per kernel: the rule, the flags (as constexprs)
rule = None
REDUCE = SCALE_GRAD = WRITE_GRAD = ROW_LERP = False


@triton.jit
def _row_factor(s, count, old, w, w_rest, KIND: tl.constexpr):
    # as numba_matrix._row_factor: torch's lerp_(norm**2 / count, w) per row (count 0: of
    # g**2), each op rounded to the param's dtype (KIND), from the rows' sums s
    if KIND == 1:
        r = tl.sqrt(s)
    else:
        r = tl.sqrt_rn(s)
    r = widen(narrow(r, KIND), KIND)
    m = widen(narrow(r * r, KIND), KIND)
    n = tl.maximum(count, 1)  # (count 0: the other branch)
    if KIND == 1:
        m = m / n
    else:
        m = tl.div_rn(m, n)
    m = tl.where(count > 0, widen(narrow(m, KIND), KIND), widen(narrow(s, KIND), KIND))
    small = tl.abs(w) < 0.5
    return tl.fma(tl.where(small, w, -w_rest), m - old, tl.where(small, old, m))


@triton.jit
def _matrix_kernel(P, G, S0, S1, S2, C, TID, RS, RE, F, ROFF, COFF, TOT, ROWS, CPART,
                   MASK: tl.constexpr, KIND: tl.constexpr, SKIND: tl.constexpr,
                   BR: tl.constexpr, BC: tl.constexpr, ALIGNED: tl.constexpr):
    # as numba_matrix._matrix_template: one program per chunk (rows RS..RE of one matrix),
    # in tiles of BR rows x BC columns; sums accumulate in the math dtype (float32 unless
    # float64), as the norm kernel's
    pid = tl.program_id(0)
    t = tl.load(TID + pid)
    r0 = tl.load(RS + pid)
    r1 = tl.load(RE + pid)
    ncol = tl.load(F + t * 3)
    nrow = tl.load(F + t * 3 + 1)
    # ALIGNED (the host checked it: Tables.aligned): every p and g 16-byte aligned, and
    # every row a multiple of 16 bytes.  Said with tl.multiple_of, so that the tiles load
    # and store 128 bits at a time (addresses and sizes loaded from tables carry no such
    # facts).  Not for one-column tensors (BC 1): a [BR, 1] tile loads element by element
    VEC: tl.constexpr = 2 if KIND == 1 else (4 if KIND == 0 else 8)
    if ALIGNED:
        ncol = tl.multiple_of(ncol, VEC)
    pp = tensor_ptr(P, t, KIND, ALIGNED)
    gp = tensor_ptr(G, t, KIND, ALIGNED)
    ap = tensor_ptr(S0, t, SKIND, False)
    bp = tensor_ptr(S1, t, SKIND, False)
    cp = tensor_ptr(S2, t, SKIND, False)
    hs = loaded_row(C, t)
    mat = r0 // nrow
    co = tl.load(COFF + pid)
    ro = tl.load(ROFF + t)
    if KIND == 1:
        acc = tl.zeros([BR, BC], dtype=tl.float64)
    else:
        acc = tl.zeros([BR, BC], dtype=tl.float32)
    if REDUCE and not MASK & MATRIX_TOTAL_ONLY:  # (no column partials: CPART has one entry)
        for c0 in range(0, ncol, BC):
            cols = c0 + tl.arange(0, BC)
            tl.store(CPART + co + cols, tl.sum(acc, 0), mask=cols < ncol)
    for rr in range(r0, r1, BR):
        rows = rr + tl.arange(0, BR)
        rmask = rows < r1
        racc = tl.sum(acc * 0, 1)
        for c0 in range(0, ncol, BC):
            cols = c0 + tl.arange(0, BC)
            cmask = cols < ncol
            mask = rmask[:, None] & cmask[None, :]
            offs = rows[:, None] * ncol + cols[None, :]
            p = widen(tl.load(pp + offs, mask=mask, other=0), KIND)
            g = widen(tl.load(gp + offs, mask=mask, other=0), KIND)
            if SCALE_GRAD:  # as the update kernel (rules.FLAGS)
                gs = narrow(g * hs[GRAD_SCALE], KIND)
                if WRITE_GRAD:
                    tl.store(gp + offs, gs, mask=mask)
                g = widen(gs, KIND)
            a = tl.where(mask, p, 1)  # unused slots: no 0 / 0 in masked lanes
            b = a
            c = a
            if MASK & MATRIX_A:
                a = widen(tl.load(ap + rows[:, None], mask=rmask[:, None], other=1), SKIND)
            if MASK & MATRIX_B:
                b = widen(tl.load(bp + mat * ncol + cols[None, :], mask=cmask[None, :],
                                   other=1), SKIND)
            if MASK & MATRIX_C:
                c = widen(tl.load(cp + mat), SKIND)
            x, y, _b, _c = rule(p, g, a, b, c, hs)
            if REDUCE:
                x = tl.where(mask, x, 0)
                acc += x * x
                if not MASK & MATRIX_TOTAL_ONLY:  # (the caller needs TOT alone)
                    y = tl.where(mask, y, 0)
                    racc += tl.sum(y * y, 1)
                    old = tl.load(CPART + co + cols, mask=cmask, other=0)
                    tl.store(CPART + co + cols, old + tl.sum(y * y, 0), mask=cmask)
            else:
                tl.store(pp + offs, narrow(x, KIND), mask=mask)
        if REDUCE and ROW_LERP:  # each row's factor (rules.FLAGS), in slot a
            old = widen(tl.load(ap + rows, mask=rmask, other=0), SKIND)
            new = _row_factor(racc, hs[LERP_COUNT], old, hs[LERP_W], hs[LERP_W_REST], KIND)
            tl.store(ap + rows, narrow(new, SKIND), mask=rmask)
        elif REDUCE and not MASK & MATRIX_TOTAL_ONLY:
            tl.store(ROWS + ro + rows, racc, mask=rmask)
    if REDUCE:
        tl.store(TOT + pid, tl.sum(tl.sum(acc, 1), 0))


def build_matrix(rule, flags, interpret=None):
    """The matrix kernel (_matrix_kernel) for one rule and flag set."""
    interpret = INTERPRET if interpret is None else interpret
    k = ("matrix", rule, flags, interpret)
    if k not in kernels:
        kgl = base.bind_rule(rule, flags, interpret)
        kgl["ROW_LERP"] = tl.constexpr(dict(flags)["ROW_LERP"])
        kgl["_row_factor"] = rebind(_row_factor, kgl, interpret)
        kernels[k] = rebind(_matrix_kernel, kgl, interpret, launch=True)
    return kernels[k]


def run_matrix(rule, flags, dtypes, mask, P, G, S, C, TID, RS, RE, F, ROFF, COFF, TOT, ROWS,
               CPART, max_cols, aligned=False):
    """As numba_engine.run_matrix; one launch.  Tables are int64 tensors on the device, C
    is [n, NCOEF] in the math dtype, TOT, ROWS and CPART are of the math dtype;
    ``max_cols``: the widest matrix (the tiles' width is the next power of 2, at most
    BLOCK)."""
    if TID.numel() == 0:
        return
    bc = min(triton.next_power_of_2(max(int(max_cols), 1)), BLOCK)
    br = BLOCK // bc
    if INTERPRET:  # tiles no taller than the tallest chunk (base.block_for's reason)
        br = min(br, base.longest(RS, RE))
    with launching():
        build_matrix(rule, flags)[(TID.numel(),)](
            P, G, S[0], S[1], S[2], C, TID, RS, RE, F, ROFF, COFF, TOT, ROWS, CPART, MASK=mask,
            KIND=KINDS[dtypes[0]], SKIND=KINDS[dtypes[1]], BR=br, BC=bc,
            ALIGNED=aligned, num_warps=NUM_WARPS, enable_fp_fusion=False)

