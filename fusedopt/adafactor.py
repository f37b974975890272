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

from .bucket import scalar_dtype
from .matrix import Tables, as_views
from .optimizer import FusedOptimizer, signature_with

_UNSUPPORTED = ("master_weights", "stochastic_rounding", "state_dtype")


def _sqrt(t):
    # correctly rounded (numpy's IEEE sqrt): torch's CPU sqrt is not on every machine
    return torch.as_tensor(np.sqrt(t.numpy())) if t.device.type == "cpu" else t.sqrt()


class Adafactor(FusedOptimizer, torch.optim.Adafactor):
    _rule = "adafactor"
    _sparse_error = "Adafactor does not support sparse gradients"

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

    def _unfit_state(self, group, p, st):
        # factors missing, or of another param's shape (p.data = ... of another size):
        # torch's for-loop raises its AssertionError or RuntimeError, param by param
        for k in (("row_var", "col_var") if p.dim() > 1 else ("variance",)) if st else ():
            v = st.get(k)
            if not torch.is_tensor(v) or v.shape != self._state_shape(k, p) or v.device != p.device:
                return f"state {k!r} that does not fit the param"
        return None

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
            bucket.factors = None
        tab, dev = bucket.tables, bucket.device
        if bucket.factors is None:
            bucket.factors = self._rehome(group, bucket)
        (rows, cols), x = bucket.factors, tab.on(dev)
        lr, (eps1, eps2), d = group["lr"], group["eps"], group["d"]
        if torch.is_tensor(lr):  # torch reads it as a Python float; here no host sync
            lr = lr.to(torch.float64)
        if eps1 is None:  # torch: the first param with a grad decides
            eps1 = torch.finfo(next(p for p in group["params"] if p.grad is not None).dtype).eps
        for _, p, w in bucket.work:
            w.copy_(p)
        step = bucket.step_value(False)
        wd, l1 = 1 - lr * group["weight_decay"], group["l1"]
        # the gradient's factor (GradScaler's 1 / scale, max_grad_norm's clipping) in every
        # pass, the scaled gradient written back by the last (under GradScaler)
        inv, _, scaled = amp
        if inv is not None:
            inv = float(inv) if inv.device.type == "cpu" else inv.to(dev)
        flags = dict(self._all_flags(group, SCALE_GRAD=inv is not None), REDUCE=True)
        h = (0.0,) * 6 + (inv,) if inv is not None else ()
        one = rows.new_ones(1)
        # pass 1: |p|**2 (alpha), g**2 per row and column
        psq, rsum, csum = self._call(bucket, tab, flags, 0, gptr, (rows, cols, one, one),
                                     (wd, l1, 0.0, 0.0, 0.0, *h))
        op = torch.float64 if dt == torch.float64 else torch.float32
        w = step ** group["beta2_decay"]
        weight = (lambda idx: w) if not torch.is_tensor(w) else \
            (lambda idx: w.to(dev, dt)[idx])  # per param where the counters differ
        # torch: norm(g, dim).square_().div_(size): rounded in the param's dtype at each op
        F = x["F"]
        if "frows" not in x:  # the rows of factored tensors (the others: one element each)
            x["frows"] = torch.nonzero(x["factored"][x["row_tensor"]]).reshape(-1)
        fr = x["frows"]
        mean = rsum.to(dt)  # a vector's variance: g**2 itself
        if len(fr):  # only there: the formula over the (few) rows of the matrices
            ncol = F[x["row_tensor"][fr], 0].to(op)
            mean[fr] = ((_sqrt(rsum[fr]).to(dt) ** 2).to(op) / ncol).to(dt)
        rows.lerp_(mean, weight(x["row_tensor"]))
        if len(x["col_tensor"]):
            nrow = F[x["col_tensor"], 1].to(op)
            cols.lerp_(((_sqrt(csum).to(dt) ** 2).to(op) / nrow).to(dt), weight(x["col_tensor"]))
            # torch: row_var.mean(dim=-2).clamp_(min=eps1): torch's mean (its summation
            # order), over the matrices of each row count at once
            means = tab.row_means(rows, x).clamp(min=eps1)
        else:
            means = one
        # pass 2: |update|**2 (denom); pass 3: the update
        vecs, co = (rows, cols, means, one), (wd, l1, eps1 * eps1, 1.0)
        usq = self._call(bucket, tab, dict(flags, SECOND=True), 7 | 8, gptr, vecs,  # 8: a total
                         (*co, 0.0, *h))[0]
        # torch's Python floats: max(eps2, |p| / sqrt(n)) * min(lr, 1 / sqrt(step)) and
        # max(1, |update| / (sqrt(n) * d)), the norms rounded to the param's dtype
        n = _sqrt(torch.as_tensor(bucket.numel, dtype=torch.float64)).to(usq.device)
        rho = torch.minimum(1 / _sqrt(torch.as_tensor(step, dtype=torch.float64)),
                            torch.as_tensor(lr, dtype=torch.float64))
        alpha = _sqrt(psq).to(dt).double() / n
        alpha = torch.where(alpha > eps2, alpha, eps2) * rho.to(usq.device)
        denom = _sqrt(usq).to(dt).double() / (n * d)
        denom = torch.where(denom > 1.0, denom, 1.0)
        self._call(bucket, tab, dict(flags, REDUCE=False, WRITE_GRAD=scaled), 7, gptr, vecs,
                   (*co, -alpha / denom, *h))
        for _, p, w in bucket.work:
            p.copy_(w)

    def _rehome(self, group, bucket):
        """The factors (row_var or variance, col_var) of the bucket's params as views of
        two buffers, kept with the plan: one op per step updates them all (as the step
        counters, bucket.py).  A state entry replaced later rebuilds the plan, and this."""
        states, dev = [self.state[p] for p in bucket.params], bucket.device
        rk = ["row_var" if "row_var" in s else "variance" for s in states]
        vs = [[(s, k, s.get(k)) for s, k in zip(states, rk)],
              [(s, "col_var", s.get("col_var")) for s in states if "col_var" in s]]
        for (s, k, v), p in zip(vs[0], bucket.params):  # torch's errors: a missing factor,
            c = s.get("col_var")  # then its lerp_ on the wrong shape
            if (k == "row_var") != (p.dim() > 1) or v is None:
                raise AssertionError("row_var and col_var should be defined when grad is "
                                     "multidimensional" if p.dim() > 1 else
                                     "variance should be defined when grad is a vector")
            if v.shape != self._state_shape(k, p) or \
                    (c is not None and c.shape != self._state_shape("col_var", p)):
                raise RuntimeError(f"state {k!r} of shape {tuple(v.shape)} does not fit a "
                                   f"param of shape {tuple(p.shape)}")
        one = torch.ones(1, dtype=bucket.params[0].dtype, device=dev)
        return [as_views(self, group, col, one) for col in vs]

    def _call(self, bucket, tab, flags, mask, gptr, vecs, coeffs):
        return tab.run(bucket, self._rule, flags, mask, gptr, vecs, coeffs)


Adafactor.__signature__ = signature_with(torch.optim.Adafactor)
