"""Gradient-norm clipping on the engines: ``clip_grad_norm_`` is
``torch.nn.utils.clip_grad_norm_`` with the norm taken in one multi-tensor engine call per
(device, dtype) and the gradients scaled in one more.  The optimizers' ``max_grad_norm=``
uses ``total_norm`` and folds the factor into the update pass instead.

The norm follows torch's two stages: a norm per tensor, rounded to the gradients' dtype
(torch's ``_foreach_norm``), then ``vector_norm`` of those.  The engines accumulate each
chunk in float64 on the CPU and in the math dtype on a GPU, as torch's kernels do.
"""
import math

import numpy as np
import torch

from . import bucket as _opt
from .kernels import rules

_ENGINE_ORDERS = (1.0, 2.0, math.inf)  # and any finite p > 0


def _groups(tensors):
    out = {}
    for t in tensors:
        out.setdefault((t.device, t.dtype), []).append(t)
    return out.items()


def _engine_can(device, dtype, ts, p):
    # complex and sparse tensors, and norms 0, -inf and p < 0, are torch's
    return (p in _ENGINE_ORDERS or 0 < p < math.inf) and not dtype.is_complex and \
        dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16) and \
        not any(t.is_sparse for t in ts)


class _Tables:
    """Pointer and chunk tables for one engine call over ``ts`` (contiguous)."""

    def __init__(self, ts, backend):
        self.numel = np.fromiter((t.numel() for t in ts), np.int64, len(ts))
        self.ptrs = np.fromiter((t.data_ptr() for t in ts), np.int64, len(ts))
        self.tid, self.cs, self.ce = _opt._chunks(backend, self.numel)

    def on(self, device):
        return tuple(_opt.on_device(a, device) for a in (self.ptrs, self.tid, self.cs, self.ce))


def total_norm(tensors, norm_type=2.0, backend="auto"):
    """torch.nn.utils.get_total_norm's result for ``tensors``."""
    p = float(norm_type)
    tensors = [_opt._local(t) for t in tensors]
    if not tensors:
        return torch.tensor(0.0)
    if p == math.inf and any(t.numel() == 0 for t in tensors):
        raise RuntimeError("_foreach_norm cannot compute the infinity norm on an empty tensor "
                           "because the operation does not have an identity")  # as torch
    first = tensors[0].device
    norms = []
    for (device, dtype), ts in _groups(tensors):
        if not _engine_can(device, dtype, ts, p):
            norms += [torch.linalg.vector_norm(t, p).to(first) for t in ts]
            continue
        ts = [t.contiguous() for t in ts]
        be = _opt.backend_for(backend, device)
        tab = _Tables(ts, be)
        if be == "numba":
            part = torch.from_numpy(_opt._numba().norm_partials(
                _opt._name(dtype), p, tab.ptrs, tab.tid, tab.cs, tab.ce, tab.numel))
        else:
            G, tid, cs, ce = tab.on(device)
            part = _opt._triton().norm_partials(_opt._name(dtype), p, G, tid, cs, ce)
        idx = torch.from_numpy(tab.tid).to(part.device)
        per = torch.zeros(len(ts), dtype=part.dtype, device=part.device)
        if p == math.inf:
            per.scatter_reduce_(0, idx, part, "amax")
        else:
            per = per.index_add_(0, idx, part) ** (1 / p)
        norms.append(per.to(dtype).to(first))
    norms = [n.reshape(-1) for n in norms]
    return torch.linalg.vector_norm(torch.cat(norms), p)


def clip_factor(total, max_norm):
    """torch's factor: min(max_norm / (total + 1e-6), 1), a tensor (no host sync)."""
    return torch.clamp(float(max_norm) / (total + 1e-6), max=1.0)


def scale_(tensors, factor, backend="auto"):
    """tensors *= factor (a 0-d tensor), one engine call per (device, dtype)."""
    for (device, dtype), ts in _groups([_opt._local(t) for t in tensors]):
        f = factor.to(device)
        engine = _engine_can(device, dtype, ts, 2.0)
        odd = [t for t in ts if not (engine and t.is_contiguous())]
        if odd:
            torch._foreach_mul_(odd, f)
        ts = [t for t in ts if engine and t.is_contiguous()]
        if not ts:
            continue
        be = _opt.backend_for(backend, device)
        tab = _Tables(ts, be)
        math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        C = torch.zeros(len(ts), rules.NCOEF, dtype=math_dtype, device=device)
        C[:, 0] = f.to(dtype)  # torch multiplies by the factor in the gradients' dtype
        flags = tuple(sorted(dict.fromkeys(rules.FLAGS, False).items()))
        dt = (_opt._name(dtype),) * 2
        if be == "numba":
            P = tab.ptrs
            _opt._numba().run("scale", flags, dt, 0, P, P, [P] * 4, C.numpy(), P, tab.tid,
                              tab.cs, tab.ce, tab.numel)
        else:
            P, tid, cs, ce = tab.on(device)
            aligned = bool(((tab.ptrs % 16) == 0).all())
            _opt._triton().run("scale", flags, dt, 0, P, P, [P] * 4, C, P, tid, cs, ce, aligned)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False,
                    foreach=None, *, backend="auto"):
    """Drop-in for ``torch.nn.utils.clip_grad_norm_`` (same arguments, result and errors;
    ``foreach`` is accepted and ignored).  Returns the total norm as a tensor."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    grads = [p.grad for p in parameters if p.grad is not None]
    total = total_norm(grads, norm_type, backend)
    if error_if_nonfinite and torch.logical_or(total.isnan(), total.isinf()):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`")
    if grads:
        scale_(grads, clip_factor(total, max_norm), backend)
    return total
