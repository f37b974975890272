"""Gradient-norm clipping on the engines: ``clip_grad_norm_`` is
``torch.nn.utils.clip_grad_norm_`` with the norm taken in one multi-tensor engine call per
(device, dtype) and the gradients scaled in one more.  The optimizers' ``max_grad_norm=``
uses ``total_norm`` and folds the factor into the update pass instead.

The norm follows torch's two stages: a norm per tensor, rounded to the gradients' dtype
(torch's ``_foreach_norm``), then ``vector_norm`` of those.  The engines accumulate each
chunk in float64 on the CPU and in the math dtype on a GPU, as torch's kernels do.

DTensor gradients (FSDP2) are the norm's one distributed step, done as DTensor does it:
each rank takes its shards' norms in the engine, then one all-reduce per mesh (over the
process group of each mesh dim a gradient is sharded on, never the world) turns them into
the whole tensors' norms (x**p, sum, x**(1/p); max for the inf norm); the total of those and
the clipping factor are then the same on every rank, and each rank scales its own shards.
"""
import math

import numpy as np
import torch

from . import bucket as _opt, release as _release
from .dtensor import mesh_dims as _mesh_dims, whole_norms
from .kernels import rules
from .kernels.coefficients import NCOEF, pack
from .kernels.flags import update_mask

_ENGINE_ORDERS = (1.0, 2.0, math.inf)  # and any finite p > 0


def _groups(tensors):
    out = {}
    for t in tensors:
        out.setdefault((t.device, t.dtype), []).append(t)
    return out.items()


def _engine_can(device, dtype, ts, p):
    # complex and sparse tensors, meta and other devices, norms 0, -inf and p < 0: torch's
    return device.type in ("cpu", "cuda") and \
        (p in _ENGINE_ORDERS or 0 < p < math.inf) and not dtype.is_complex and \
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


def _local_norms(ts, p, device, dtype, backend, exact=False):
    """Each tensor's p-norm (its local shard's for a DTensor), in ``dtype`` on ``device``,
    from one engine call (torch's ``_foreach_norm``: each norm rounded to the dtype;
    ``exact``: summed in float64 on a GPU too, as on the CPU)."""
    ts = [t.contiguous() for t in ts]
    be = _opt.backend_for(backend, device)
    tab = _Tables(ts, be)
    if be == "numba":
        part = torch.from_numpy(_opt._numba().norm_partials(
            _opt._name(dtype), p, tab.ptrs, tab.tid, tab.cs, tab.ce, tab.numel))
    else:
        G, tid, cs, ce = tab.on(device)
        part = _opt._triton().norm_partials(_opt._name(dtype), p, G, tid, cs, ce, exact)
    idx = torch.from_numpy(tab.tid).to(part.device)
    per = torch.zeros(len(ts), dtype=part.dtype, device=part.device)
    if p == math.inf:
        per.scatter_reduce_(0, idx, part, "amax")
    else:
        per = per.index_add_(0, idx, part) ** (1 / p)
    # (exact: a float16/bfloat16 tensor's norm in float32, as Apex's FusedLAMB takes it)
    return per.to(dtype if not exact or dtype == torch.float64 else torch.float32)


def _norms(ts, p, device, dtype, backend, exact=False):
    """The whole tensors' norms: the shards' norms reduced over each mesh they are on."""
    dt = _opt._dtensor()
    if not dt or not isinstance(ts[0], dt):
        if _engine_can(device, dtype, ts, p):
            return _local_norms(ts, p, device, dtype, backend, exact)
        return torch.stack([torch.linalg.vector_norm(t, p) for t in ts])
    dims = [_mesh_dims(t) for t in ts]
    if not _engine_can(device, dtype, ts, p) or None in dims:
        return torch.stack([torch.linalg.vector_norm(t, p).full_tensor() for t in ts])
    v = _local_norms([t._local_tensor for t in ts], p, device, dtype, backend, exact)
    return whole_norms(ts, v, p)


def _mixed_error():
    # torch's own error for such a list (its _foreach_norm refuses it)
    return RuntimeError("clip_grad_norm_ got mixed torch.Tensor and DTensor gradients: "
                        "convert every torch.Tensor to a DTensor first, as torch requires")


def total_norm(tensors, norm_type=2.0, backend="auto", exact=False):
    """torch.nn.utils.get_total_norm's result for ``tensors`` (``exact``: each tensor's
    norm from float64 sums on a GPU too, as on the CPU: LAMB's global norm).  DTensor gradients (FSDP2):
    each rank takes its shards' norms in the engine, one all-reduce per mesh makes them the
    whole tensors' norms, and the result is a replicated DTensor on the first tensor's mesh,
    the same value on every rank."""
    p = float(norm_type)
    tensors = list(tensors)
    if not tensors:
        return torch.tensor(0.0)
    dt = _opt._dtensor()
    sharded = sum(isinstance(t, dt) for t in tensors) if dt else 0
    if 0 < sharded < len(tensors):
        raise _mixed_error()
    if p == math.inf and any(t.numel() == 0 for t in tensors):
        raise RuntimeError("_foreach_norm cannot compute the infinity norm on an empty tensor "
                           "because the operation does not have an identity")  # as torch
    first = _opt._local(tensors[0]).device
    norms = [_norms(ts, p, device, dtype, backend, exact).to(first).reshape(-1)
             for (device, dtype), ts in _groups(tensors)]
    total = torch.linalg.vector_norm(torch.cat(norms), p)
    if sharded:
        from torch.distributed.tensor import DTensor, Replicate
        mesh = tensors[0].device_mesh
        total = DTensor.from_local(total, mesh, [Replicate()] * mesh.ndim, run_check=False)
    return total


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
        # torch multiplies in the math dtype by the factor as it is (a float32 factor when
        # bfloat16 and float32 norms were combined), rounding only the product
        C = torch.zeros(len(ts), NCOEF, dtype=math_dtype, device=device)
        for j, c in enumerate(pack("scale", {"factor": f.to(math_dtype)})):
            if torch.is_tensor(c):
                C[:, j] = c
        flags = tuple(sorted(dict.fromkeys(rules.FLAGS, False).items()))
        dt, mask = (_opt._name(dtype),) * 2, update_mask((), False)  # (no state)
        if be == "numba":
            P = tab.ptrs
            _opt._numba().run("scale", flags, dt, mask, P, P, [P] * 4, C.numpy(), P, tab.tid,
                              tab.cs, tab.ce, tab.numel)
        else:
            P, tid, cs, ce = tab.on(device)
            aligned = bool(((tab.ptrs % 16) == 0).all())
            _opt._triton().run("scale", flags, dt, mask, P, P, [P] * 4, C, P, tid, cs, ce, aligned)


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False,
                    foreach=None, *, backend="auto"):
    """Drop-in for ``torch.nn.utils.clip_grad_norm_`` (same arguments, result and errors;
    ``foreach`` is accepted and ignored).  Returns the total norm as a tensor.

    The norm takes one engine call per (device, dtype) and the scaling one more; norms 1, 2,
    inf and any p > 0 run on the engines (accumulated in float64 on the CPU), 0, -inf,
    negative p, complex and sparse gradients go to torch.  Under FSDP2 (DTensor gradients)
    the norm is the whole model's, one all-reduce per mesh, the same on every rank.
    ``backend`` (keyword-only): ``"auto"``, ``"numba"`` or ``"triton"``, as for the
    optimizers.  See the Options page of the documentation (``docs/options.md``)."""
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    parameters = list(parameters)
    grads = [p.grad for p in parameters if p.grad is not None]
    if len(grads) < len(parameters) and _release.released(parameters):
        raise RuntimeError("clip_grad_norm_ over params prepared for gradient release: their "
                           "gradients were stepped and freed during the backward, so there is "
                           "no global norm left to clip by (build the optimizer without "
                           "gradient_release to clip)")
    total = total_norm(grads, norm_type, backend)
    local = _opt._local(total)  # a DTensor's value, the same on every rank
    if error_if_nonfinite and torch.logical_or(local.isnan(), local.isinf()):
        raise RuntimeError(
            f"The total norm of order {float(norm_type)} for gradients from "
            "`parameters` is non-finite, so it cannot be clipped. To disable "
            "this error and scale the gradients by the non-finite norm anyway, "
            "set `error_if_nonfinite=False`")
    if grads:
        scale_(grads, clip_factor(local, max_norm), backend)
    return total
