"""Host side of the engines' matrix kernel (kernels/numba_matrix.py, triton_matrix.py): the
general reduction pass.  Every tensor is seen as a batch of matrices, its last two dims
(leading dims folded into the batch; a 1-D tensor of n elements is n rows of one
column), and the kernel runs any rule over them: storing the params, or (flag REDUCE)
summing squares of the rule's outputs per tensor, per row and per column.

``Tables`` holds, per bucket and set of shapes, the views and the chunk table (a chunk is
up to CHUNK elements of whole rows of one matrix, so that a chunk owns its rows' sums;
its column sums are partials, added up here).  ``reduce`` and ``apply`` make one engine
call each.  ``factors`` and the functions before it are what an algorithm with a factored
second moment (Spec.factored) shares: the plan calls them, never the optimizer.
"""
import numpy as np
import torch

from .bucket import _numba, _triton, on_device, one_buffer
from .kernels.coefficients import pack
from .kernels.flags import Matrix


def exact_sqrt(t):
    """Correctly rounded sqrt (numpy's IEEE one on the CPU): torch's CPU sqrt is not, on
    every machine."""
    return torch.as_tensor(np.sqrt(t.numpy())) if t.device.type == "cpu" else t.sqrt()


class Tables:
    def __init__(self, shapes, backend, device):
        self.backend, self.device = backend, device
        if backend == "numba":
            from .kernels import numba_matrix
            chunk = numba_matrix.CHUNK
        else:
            chunk = _triton().CHUNK
        F, tid, rs, re, roff, cbase = [], [], [], [], [0], [0]
        for t, s in enumerate(shapes):
            n = int(np.prod(s, dtype=np.int64))
            cols, rows = (s[-1], s[-2]) if len(s) > 1 else (1, n)
            nmat = n // (rows * cols) if n else 0
            F.append((cols, rows, n))
            per = max(1, chunk // max(cols, 1))  # whole rows, about CHUNK elements
            starts = (np.arange(nmat)[:, None] * rows
                      + np.arange(0, rows, per)[None, :]).reshape(-1)
            tid.append(np.full(len(starts), t))
            rs.append(starts)
            re.append(np.minimum(starts + per, (starts // max(rows, 1) + 1) * rows))
            roff.append(roff[-1] + nmat * rows)
            cbase.append(cbase[-1] + (nmat * cols if len(s) > 1 else 0))
        cat = (lambda xs: np.concatenate(xs).astype(np.int64)) if shapes else \
            (lambda xs: np.zeros(0, np.int64))
        self.tid, self.rs, self.re = cat(tid), cat(rs), cat(re)
        self.F = np.array(F, dtype=np.int64).reshape(-1, 3)
        self.ncols = self.F[self.tid, 0]
        self.coff = np.concatenate([[0], np.cumsum(self.ncols)])[:-1].astype(np.int64)
        self.roff = np.array(roff[:-1], dtype=np.int64)
        self.nrows, self.ncolsum = roff[-1], cbase[-1]
        # each column partial's place among the tensors' column sums (1-D: dropped)
        factored = np.array([len(s) > 1 for s in shapes], dtype=bool)
        j = np.arange(int(self.ncols.sum())) - np.repeat(self.coff, self.ncols)
        t = np.repeat(self.tid, self.ncols)
        mat = np.repeat(self.rs // np.maximum(self.F[self.tid, 1], 1), self.ncols)
        self.cidx = np.where(factored[t], np.array(cbase[:-1], np.int64)[t]
                             + mat * self.F[t, 0] + j, self.ncolsum)
        # each chunk's first column among them (a chunk's partials go to consecutive ones)
        self.cstart = self.cidx[self.coff] if len(self.cidx) else self.coff
        self.max_cols = int(self.F[:, 0].max()) if len(F) else 1
        # for the caller's ops on the small vectors: each row's and column's tensor, each
        # factored matrix's rows, each factored row's matrix
        nmat = np.where(self.F[:, 1] * self.F[:, 0] > 0,
                        self.F[:, 2] // np.maximum(self.F[:, 1] * self.F[:, 0], 1), 0)
        self.factored = factored
        self.cbase = np.array(cbase[:-1], np.int64)
        self.mbase = np.concatenate([[0], np.cumsum(np.where(factored, nmat, 0))])[:-1]
        self.row_tensor = np.repeat(np.arange(len(F)), nmat * self.F[:, 1])
        self.col_tensor = np.repeat(np.arange(len(F)), np.where(factored, nmat * self.F[:, 0], 0))
        self.mat_rows = np.repeat(self.F[:, 1], np.where(factored, nmat, 0))
        self.row_mat = np.repeat(np.arange(len(self.mat_rows)), self.mat_rows)
        if backend != "numba":
            self.dev = {k: on_device(getattr(self, k), device) for k in ("F", "roff", "cidx")}
            # one launch for the one-column tensors (1-D: tiles of BLOCK rows), one for the
            # others (tiles as wide as the widest matrix): a tile is one width per launch
            sels = [s for s in (np.flatnonzero(self.ncols == 1), np.flatnonzero(self.ncols > 1))
                    if len(s)]
            # (and each launch's row width that every one of its matrices' is a multiple of)
            self.launches = [({k: on_device(getattr(self, k)[s], device)
                               for k in ("tid", "rs", "re", "coff")}, int(self.ncols[s].max()),
                              int(np.gcd.reduce(self.ncols[s])))
                             for s in sels]
            self.dev["tid"] = on_device(np.concatenate([self.tid[s] for s in sels] or
                                                       [np.zeros(0, np.int64)]), device)

    @staticmethod
    def aligned(ptrs_aligned, width, dtype):
        """Whether a launch may say ALIGNED (triton_matrix): its params' and gradients'
        addresses 16-byte aligned (``ptrs_aligned``, the caller's check) and every row a
        multiple of 16 bytes (``width``: a number of columns every matrix's is a multiple
        of), so that every row starts 16-byte aligned.  Never one-column tensors."""
        return bool(ptrs_aligned) and width > 1 and \
            width * getattr(torch, dtype).itemsize % 16 == 0

    def _call(self, rule, flags, dtypes, mask, P, G, S, C, reduce, aligned=False):
        f64, mask = dtypes[0] == "float64", int(mask)  # (mask: flags.Matrix)
        nchunk = len(self.tid)
        sums = reduce and not mask & Matrix.TOTAL_ONLY  # row and column sums wanted
        # (ROW_LERP: the rows' factors are written in place, their sums never leave)
        nrows = 0 if dict(flags)["ROW_LERP"] or not sums else self.nrows
        if self.backend == "numba":
            from .kernels import numba_matrix
            # the kernel writes every entry of these (no zeros needed).  The rows' sums (one
            # per element of a 1-D param: 8 bytes each) reuse one buffer: a fresh one per
            # call cost a page fault per 4 KiB, more than the pass itself on 1-D params
            rows, part = np.empty(0), np.empty(0)
            if sums:
                if getattr(self, "_part", None) is None:  # (float64: compensations too)
                    self._part = np.empty((2 if f64 else 1) * len(self.cidx))
                part = self._part
            if nrows:
                if getattr(self, "_rows", None) is None:
                    self._rows = np.empty(self.nrows)
                rows = self._rows
            tot = np.empty(nchunk)
            numba_matrix.run_matrix(rule, flags, dtypes, mask, P, G, S, C, self.tid, self.rs,
                                    self.re, self.F, self.roff, self.coff, tot, rows, part)
            if not reduce:
                return None
            per = np.bincount(self.tid, tot, len(self.F))
            cols = numba_matrix.column_sums(part, self.coff, self.ncols, self.cstart,
                                            self.ncolsum + 1, f64)[:-1] \
                if sums else np.zeros(self.ncolsum)
            return tuple(torch.from_numpy(a) for a in (per, rows, cols))
        from .kernels import triton_matrix
        d = self.dev
        dt = torch.float64 if f64 else torch.float32
        new = lambda n: torch.zeros(n, dtype=dt, device=self.device)  # noqa: E731
        rows, part = new(max(nrows, 1)), new(len(self.cidx) if sums else 1)
        tots = []
        for t, cols, width in self.launches:
            tots.append(new(len(t["tid"])))
            triton_matrix.run_matrix(rule, flags, dtypes, mask, P, G, S, C, t["tid"], t["rs"],
                                     t["re"], d["F"], d["roff"], t["coff"], tots[-1], rows,
                                     part, cols, self.aligned(aligned, width, dtypes[0]))
        if not reduce:
            return None
        per = new(len(self.F)).index_add_(0, d["tid"], torch.cat(tots) if tots else new(0))
        cols = new(self.ncolsum + 1).index_add_(0, d["cidx"], part)[:-1] if sums else \
            new(self.ncolsum)
        return per, rows, cols

    def reduce(self, *args, aligned=False):
        """(per tensor: sum of the first output's squares, per row and per column of the
        factored tensors: of the second's), float64 on the CPU, the math dtype on GPU.
        The rows' sums on the CPU are a buffer of these tables, overwritten by the next
        call: use them before it.  Under ROW_LERP there are none (an empty tensor)."""
        return self._call(*args, reduce=True, aligned=aligned)

    def apply(self, *args, aligned=False):
        self._call(*args, reduce=False, aligned=aligned)

    def on(self, device):
        """The tables the caller's torch ops index with, on ``device`` (made once)."""
        if getattr(self, "_on", None) is None:
            x = {k: torch.as_tensor(getattr(self, k), device=device) for k in
                 ("F", "factored", "row_tensor", "col_tensor", "mat_rows")}
            at = np.flatnonzero(self.factored[self.row_tensor])  # the factored rows
            # the matrices of each row count: their rows' places, their own
            x["means"] = [(int(r), torch.as_tensor(at[np.isin(self.row_mat, m)], device=device),
                           torch.as_tensor(m, device=device))
                          for r in np.unique(self.mat_rows)
                          for m in [np.flatnonzero(self.mat_rows == r)]]
            self._on = x
        return self._on

    def col_means(self, csum, dt):
        """torch's ``norm(g, dim=-2).square_().div_(rows)`` from the float64 sums of squares
        per column, rounded in the param's dtype ``dt`` at each op as torch's are (the rows'
        are the kernel's: flag ROW_LERP)."""
        x, op = self.on(self.device), torch.float64 if dt == torch.float64 else torch.float32
        if self.backend == "numba" and dt == torch.float32:  # the same ops in one pass
            from .kernels import numba_matrix
            n = self.F[self.col_tensor, 1]
            return torch.from_numpy(numba_matrix.means_float32(csum.numpy(), n,
                                                               np.empty(len(n), np.float32)))
        return ((exact_sqrt(csum).to(dt) ** 2).to(op) / x["F"][x["col_tensor"], 1].to(op)).to(dt)

    def counts(self):
        """Per tensor: its columns if factored, else 0 (ROW_LERP's count, h7)."""
        if getattr(self, "_count", None) is None:
            self._count = torch.as_tensor(np.where(self.factored, self.F[:, 0], 0),
                                          dtype=torch.float64, device=self.device)
        return self._count

    def row_means(self, rows, x):
        """Per factored matrix: torch's mean of its rows' values in ``rows`` (one value
        per row of every tensor), the matrices of one row count in one op."""
        means = rows.new_empty(len(x["mat_rows"]))
        for r, idx, mats in x["means"]:
            means[mats] = rows[idx].view(-1, r).mean(-1)
        return means

    def run(self, bucket, rule, flags, mask, gptr, vecs, coeffs):
        """One engine call over ``bucket`` (bucket.py): ``vecs`` = (a value per row, per
        column, per matrix, and a 1 that 1-D tensors read as column and matrix value),
        ``coeffs`` the rule's and the engines' coefficients by name (coefficients.pack), each
        a float or a tensor per tensor; REDUCE in ``flags`` (a dict) decides between
        ``reduce`` and ``apply``."""
        C = bucket.C
        C.zero_()
        for j, c in enumerate(pack(rule, coeffs)):
            C[:, j] = c.to(C.device) if torch.is_tensor(c) else c
        rows, cols, means, one = vecs
        size = rows.element_size()
        S = np.stack([rows.data_ptr() + self.roff * size,
                      np.where(self.factored, cols.data_ptr() + self.cbase * size, one.data_ptr()),
                      np.where(self.factored, means.data_ptr() + self.mbase * size,
                               one.data_ptr())]).astype(np.int64)
        flags = tuple(sorted(flags.items()))
        dts = (bucket.dtype, bucket.dtype)
        call = self.reduce if dict(flags)["REDUCE"] else self.apply
        if bucket.backend == "numba":
            return call(rule, flags, dts, mask, bucket.P, gptr, list(S), bucket.Cn)
        aligned = bucket.aligned and not (gptr % 16).any()  # (as bucket.run's)
        S, G = on_device(S, bucket.device), on_device(gptr, bucket.device)
        return call(rule, flags, dts, mask, bucket.P, G, list(S), C, aligned=aligned)


def _as_views(entries, empty):
    """The state tensors ``entries`` ((state dict, key, tensor) of one bucket) as views of
    one new buffer (``empty`` where there are none), for one op per step over all (as the
    step counters, bucket.py), written through the state."""
    if not entries:
        return empty
    buf = one_buffer([v for _, _, v in entries])
    if buf is None:
        buf = torch.cat([v.reshape(-1) for _, _, v in entries])
        for (s, k, v), piece in zip(entries, buf.split([v.numel() for _, _, v in entries])):
            s[k] = piece.view(v.shape)
    return buf


# A factored second moment (Spec.factored), torch's Adafactor's state: a row factor
# ``row_var`` and a column factor ``col_var`` (the last dim, then the one before, reduced
# to 1) for a param of 2 or more dims, one value per element (``variance``) for a 1-D one.

def factor_names(p):
    return ("row_var", "col_var") if p.dim() > 1 else ("variance",)


def state_shape(name, p):
    """The shape of state tensor ``name`` of param p."""
    s = list(p.shape)
    if name in ("row_var", "col_var"):
        s[-1 if name == "row_var" else -2] = 1
    return torch.Size(s)


def unfit_factors(p, st):
    """Why p's factors do not fit the engines, or None: missing, or of another param's
    shape (p.data = ... of another size) or dtype (model.half(): torch's lerp_ takes no
    other dtype): torch's for-loop raises its AssertionError or RuntimeError, param by
    param, in its order."""
    for k in factor_names(p) if st else ():
        v = st.get(k)
        if not torch.is_tensor(v) or v.shape != state_shape(k, p) \
                or v.device != p.device or v.dtype != p.dtype:
            return f"state {k!r} that does not fit the param"
    return None


def factors(bucket, states):
    """(Tables, [row factors, column factors]) of a bucket (bucket.py) of a factored
    state, made with its plan (rebuilt when a param's shape changes: host.py's facts hold
    a digest of the sizes): the matrix tables of its shapes, and the factors (row_var or
    variance, col_var) as views of two buffers, so that one op per step updates them all.
    The factors are watched as the bucket's other state tensors: a state entry replaced
    later rebuilds the plan, and these."""
    tables = Tables(tuple(p.shape for p in bucket.params), bucket.backend, bucket.device)
    rk = ["row_var" if "row_var" in s else "variance" for s in states]
    vs = [[(s, k, s.get(k)) for s, k in zip(states, rk)],
          [(s, "col_var", s.get("col_var")) for s in states if "col_var" in s]]
    for (s, k, v), p in zip(vs[0], bucket.params):  # torch's errors: a missing factor,
        c = s.get("col_var")  # then its lerp_ on the wrong shape
        if (k == "row_var") != (p.dim() > 1) or v is None:
            raise AssertionError("row_var and col_var should be defined when grad is "
                                 "multidimensional" if p.dim() > 1 else
                                 "variance should be defined when grad is a vector")
        if v.shape != state_shape(k, p) or \
                (c is not None and c.shape != state_shape("col_var", p)):
            raise RuntimeError(f"state {k!r} of shape {tuple(v.shape)} does not fit a "
                               f"param of shape {tuple(p.shape)}")
    one = torch.ones(1, dtype=bucket.params[0].dtype, device=bucket.device)
    bufs = [_as_views(col, one) for col in vs]
    bucket.watched = bucket.watched + [s[k] for col in vs for s, k, _ in col]
    return tables, bufs
