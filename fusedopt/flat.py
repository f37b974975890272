"""Flat buffers (``flat=True``): a bucket's params, grads and state live in one contiguous
buffer each, every tensor an alias of its range, so the kernel runs over one range per
bucket (no per-tensor chunks) and ``zero_grad(set_to_none=False)`` is one fill.

The aliases are made with ``Tensor.set_(storage, offset, shape)``, not as views: each
keeps its own autograd version counter (a view shares its base's), so torch's in-place
bookkeeping stays per tensor.  autograd accumulates a backward into an existing grad in
place, so grads stay aliases from step to step -- unless they are set to None
(``zero_grad()``'s default, ``model.zero_grad()``): then the next backward allocates
fresh grads, the plan's check sees them elsewhere, and the step runs over per-tensor
tables as without ``flat`` (torch's semantics: params without a grad are skipped).

Everything is re-homed when a plan is built (the first step, and after anything the
safety checks notice: ``p.data = ...``, ``load_state_dict``, a state reset), by copying
the current values into a fresh buffer; between rebuilds nothing is copied.
"""
import numpy as np
import torch

from . import host


def alias(buffer, offset, like):
    """A tensor of ``like``'s shape over ``buffer[offset:offset + like.numel()]``."""
    return torch.empty(0, dtype=buffer.dtype, device=buffer.device).set_(
        buffer.untyped_storage(), offset, like.shape)


def eligible(params, grads):
    # dense, contiguous, plain tensors with dense grads of their own dtype
    return all(p.is_contiguous() and type(p.data) is torch.Tensor and g is not None
               and g.layout is torch.strided and g.dtype == p.dtype
               for p, g in zip(params, grads))


class Buffers:
    """One bucket's buffers: ``param``, ``grad`` and one per state name."""

    def __init__(self, params, states, names):
        states = states or [{}] * len(params)
        sizes = np.array([p.numel() for p in params], dtype=np.int64)
        self.offsets = np.cumsum(sizes) - sizes
        total = int(sizes.sum())
        p0 = params[0]
        self.param = torch.empty(total, dtype=p0.dtype, device=p0.device)
        self.grad = torch.empty(total, dtype=p0.dtype, device=p0.device)
        self.state = {n: torch.empty(total, dtype=states[0][n].dtype, device=p0.device)
                      for n in names}
        for p, st, off in zip(params, states, self.offsets.tolist()):
            a = alias(self.param, off, p)
            a.copy_(p.detach())
            p.data = a
            g = alias(self.grad, off, p)
            g.copy_(p.grad)
            p.grad = g
            for n in names:
                s = alias(self.state[n], off, st[n])
                s.copy_(st[n])
                st[n] = s
        # where each grad must be for the one-range kernel (see _Bucket.run)
        itemsize = self.grad.element_size()
        self.grad_ptrs = self.grad.data_ptr() + self.offsets * itemsize
        self.numel = total


def buffers_of(plan, group, state, slots):
    """(the group's Buffers, whether every grad is still its alias), or (None, False)
    where the group's ``plan`` (None: none yet) is not one flat bucket still valid for
    ``state`` and ``slots`` (plan.valid), or a param moved (p.data = ..., .half())."""
    if not (group.get("flat") and plan is not None and plan.single
            and plan.buckets[0][1].buffers is not None
            and plan.valid(state, group, group["params"], None, slots)):
        return None, False
    buffers = plan.buckets[0][1].buffers
    P, G, _ = host.read(group["params"], [])
    if not np.array_equal(P, plan.pfacts):
        return None, False
    return buffers, np.array_equal(G[:, 0], buffers.grad_ptrs)


def zero(plan, group, state, slots):
    """zero_grad(set_to_none=False) for a flat group: one fill of its grad buffer.  Fresh
    grads (after set_to_none or model.zero_grad(); every param has one) are replaced by
    the buffer's zeroed aliases.  False where the group is not flat or its grads no
    longer fit the buffer: torch's zero_grad does it."""
    buffers, aliased = buffers_of(plan, group, state, slots)
    if buffers is None:
        return False
    if not aliased:
        _, G, _ = host.read(group["params"], [])
        if not np.array_equal(G[:, 1:], plan.gwant):
            return False
        for p, off in zip(group["params"], buffers.offsets.tolist()):
            p.grad = alias(buffers.grad, off, p)
    buffers.grad.zero_()
    return True
