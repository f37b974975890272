"""Adafactor: torch.optim.Adafactor with a fused multi-tensor step (torch has no fused one).

Three calls of the engines' matrix kernel per bucket (fusedopt/matrix.py): sums of p**2
and of g**2 per row and column; sums of update**2; the update.  Between them, torch ops on
the small vectors (row and column factors, O(rows + cols)): torch's own ops in torch's
order and dtype, so that the factors come out as torch's wherever the sums agree (a rule
would buy nothing on vectors this small).  A 1-D param is n rows of one column: its
row "sums" are g**2 and its variance is its row factor (column factor and mean: 1).
"""
import numpy as np
import torch

from .bucket import on_device, scalar_dtype
from .matrix import Tables
from .optimizer import FusedOptimizer, signature_with

_UNSUPPORTED = ("max_grad_norm", "master_weights", "stochastic_rounding", "state_dtype")


def _sqrt(t):
    # correctly rounded (numpy's IEEE sqrt): torch's CPU sqrt is not on every machine
    return torch.as_tensor(np.sqrt(t.numpy())) if t.device.type == "cpu" else t.sqrt()


class Adafactor(FusedOptimizer, torch.optim.Adafactor):
    _rule = "adafactor"
    _sparse_error = "Adafactor does not support sparse gradients"
    _step_supports_amp_scaling = False  # as torch's: GradScaler unscales before step()

    def __init__(self, *args, **kwargs):
        for k in _UNSUPPORTED:
            if kwargs.get(k):
                raise ValueError(f"fusedopt.Adafactor does not support {k}")
        super().__init__(*args, **kwargs)

    def _slots(self, group):
        return (None, None, None)  # the factors are not param-shaped: gathered per step

    def _flags(self, group):
        return {"DECOUPLED": True}

    def _inplace_updates(self, group):
        return 2 if group["weight_decay"] != 0 else 1  # torch: param.mul_, param.add_

    def _init_state(self, group, p, state):
        if p.is_complex():
            raise RuntimeError("Adafactor does not support complex parameters")
        state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
        if p.grad.dim() > 1:
            state["row_var"] = p.grad.new_zeros(self._state_shape("row_var", p))
            state["col_var"] = p.grad.new_zeros(self._state_shape("col_var", p))
        else:
            state["variance"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)

    def _state_shape(self, name, p):
        s = list(p.shape)
        if name in ("row_var", "col_var"):
            s[-1 if name == "row_var" else -2] = 1
        return torch.Size(s)

    def _run(self, bucket, group, gptr, amp):
        ps, dt = bucket.params, bucket.params[0].dtype
        if dt.is_complex:
            raise RuntimeError("Adafactor does not support complex parameters")
        if 0 in bucket.numel:  # torch: a norm of 0 / sqrt(0)
            raise ZeroDivisionError("float division by zero")
        shapes = tuple(p.shape for p in ps)
        if getattr(bucket, "shapes", None) != shapes:  # cached with the plan, for its shapes
            bucket.shapes, bucket.tables = shapes, Tables(shapes, bucket.backend, bucket.device)
        tab, dev = bucket.tables, bucket.device
        x = {k: torch.as_tensor(getattr(tab, k), device=dev) for k in
             ("F", "factored", "row_tensor", "col_tensor")}
        lr, (eps1, eps2), d = group["lr"], group["eps"], group["d"]
        if torch.is_tensor(lr):  # torch reads it as a Python float; here no host sync
            lr = lr.to(torch.float64)
        if eps1 is None:  # torch: the first param with a grad decides
            eps1 = torch.finfo(next(p for p in group["params"] if p.grad is not None).dtype).eps
        st = [self.state[p] for p in ps]
        rowv = [s["row_var"] if "row_var" in s else s["variance"] for s in st]
        colv = [s["col_var"] for s in st if "col_var" in s]
        rows = torch.cat([v.reshape(-1) for v in rowv])
        cols = torch.cat([v.reshape(-1) for v in colv]) if colv else rows.new_ones(1)
        for _, p, w in bucket.work:
            w.copy_(p)
        step = bucket.step_value(False)
        wd, l1 = 1 - lr * group["weight_decay"], group["l1"]
        flags = dict(self._all_flags(group), REDUCE=True)
        one = rows.new_ones(1)
        # pass 1: |p|**2 (alpha), g**2 per row and column
        psq, rsum, csum = self._call(bucket, tab, flags, 0, gptr, (rows, cols, one, one),
                                     (wd, l1))
        op = torch.float64 if dt == torch.float64 else torch.float32
        w = step ** group["beta2_decay"]
        weight = (lambda idx: w) if not torch.is_tensor(w) else \
            (lambda idx: w.to(dev, dt)[idx])  # per param where the counters differ
        # torch: norm(g, dim).square_().div_(size): rounded in the param's dtype at each op
        F, flat = x["F"], ~x["factored"][x["row_tensor"]]
        ncol = F[x["row_tensor"], 0].to(op)
        mean = torch.where(flat, rsum.to(dt), ((_sqrt(rsum).to(dt) ** 2).to(op) / ncol).to(dt))
        rows.lerp_(mean, weight(x["row_tensor"]))
        if colv:
            nrow = F[x["col_tensor"], 1].to(op)
            cols.lerp_(((_sqrt(csum).to(dt) ** 2).to(op) / nrow).to(dt), weight(x["col_tensor"]))
            # torch: row_var.mean(dim=-2).clamp_(min=eps1), torch's own mean per param (its
            # summation order: a float64 mean must agree with torch's to the last bit)
            parts = rows.split([v.numel() for v in rowv])
            means = torch.cat([r.view(v.shape).mean(-2).reshape(-1)
                               for r, v in zip(parts, rowv) if v.dim() > 1]).clamp(min=eps1)
        else:
            means = one
        # pass 2: |update|**2 (denom); pass 3: the update
        vecs, co = (rows, cols, means, one), (wd, l1, eps1 * eps1, 1.0)
        usq = self._call(bucket, tab, dict(flags, SECOND=True), 7, gptr, vecs, co)[0]
        # torch's Python floats: max(eps2, |p| / sqrt(n)) * min(lr, 1 / sqrt(step)) and
        # max(1, |update| / (sqrt(n) * d)), the norms rounded to the param's dtype
        n = _sqrt(torch.as_tensor(bucket.numel, dtype=torch.float64)).to(usq.device)
        rho = torch.minimum(1 / _sqrt(torch.as_tensor(step, dtype=torch.float64)),
                            torch.as_tensor(lr, dtype=torch.float64))
        alpha = _sqrt(psq).to(dt).double() / n
        alpha = torch.where(alpha > eps2, alpha, eps2) * rho.to(usq.device)
        denom = _sqrt(usq).to(dt).double() / (n * d)
        denom = torch.where(denom > 1.0, denom, 1.0)
        self._call(bucket, tab, dict(flags, REDUCE=False), 7, gptr, vecs, (*co, -alpha / denom))
        for _, p, w in bucket.work:
            p.copy_(w)
        for vs, flat_v in ((rowv, rows), (colv, cols)):
            if vs:
                parts = flat_v.split([v.numel() for v in vs])
                torch._foreach_copy_(vs, [a.view(v.shape) for a, v in zip(parts, vs)])

    def _call(self, bucket, tab, flags, mask, gptr, vecs, coeffs):
        # one engine call: the small vectors' addresses per tensor (vecs: rows, columns,
        # means, and a 1 for a 1-D param's column factor and mean), coefficients per tensor
        C = bucket.C
        C.zero_()
        for j, c in enumerate(coeffs):
            C[:, j] = c.to(C.device) if torch.is_tensor(c) else c
        rows, cols, means, one = vecs
        size = rows.element_size()
        S = np.stack([rows.data_ptr() + tab.roff * size,
                      np.where(tab.factored, cols.data_ptr() + tab.cbase * size, one.data_ptr()),
                      np.where(tab.factored, means.data_ptr() + tab.mbase * size,
                               one.data_ptr())]).astype(np.int64)
        flags = tuple(sorted(flags.items()))
        dts = (bucket.dtype, bucket.dtype)
        call = tab.reduce if dict(flags)["REDUCE"] else tab.apply
        if bucket.backend == "numba":
            return call(self._rule, flags, dts, mask, bucket.P, gptr, list(S), bucket.Cn)
        S, G = on_device(S, bucket.device), on_device(gptr, bucket.device)
        return call(self._rule, flags, dts, mask, bucket.P, G, list(S), C)


Adafactor.__signature__ = signature_with(torch.optim.Adafactor)
