"""Same-shape stacks of updates between two engine passes (Spec.stacked: Muon).

An algorithm whose update of a 2-D param is a matrix function of a per-param tensor
(Muon's Newton-Schulz orthogonalization of its momentum) runs as three parts per bucket:
an engine pass that writes each param's tensor into its place in a stack of its shape
(``Stacks``: one contiguous (batch, rows, cols) buffer per shape, in the param's dtype),
torch ops on each stack as a batch (one matmul per stack, not per param), and an engine
pass that reads each param's place back as its "gradient".  The plan makes the stacks
with the bucket (``plan.py``: it calls down, as for ``matrix.factors``); they are held by
the bucket and never handed out, so no address in their tables can go stale, and they are
rebuilt with the plan whenever a param's shape, dtype or address changes.
"""
import numpy as np
import torch

from .bucket import _numba, _triton, on_device
from .kernels.coefficients import pack


class Stacks:
    """The stacks of one bucket (bucket.py): ``groups`` is a list of (shape, the params'
    positions in the bucket, the (batch, rows, cols) buffer); ``U`` the pointer table of
    each param's place (numpy for Numba, a device tensor for Triton); ``group_of`` each
    param's group."""

    def __init__(self, bucket):
        params = bucket.params
        by = {}
        for k, p in enumerate(params):
            by.setdefault(tuple(p.shape), []).append(k)
        dt, dev = params[0].dtype, bucket.device
        self.groups, self.group_of = [], np.zeros(len(params), np.int64)
        ptr = np.zeros(len(params), np.int64)
        for gi, (shape, ks) in enumerate(by.items()):
            buf = torch.empty((len(ks), *shape), dtype=dt, device=dev)
            for j, k in enumerate(ks):
                ptr[k] = buf[j].data_ptr()
                self.group_of[k] = gi
            self.groups.append((shape, np.array(ks, np.int64), buf))
        self.U_np = ptr
        self.aligned = bool((ptr % 16 == 0).all())
        self.U = ptr if bucket.backend == "numba" else on_device(ptr, dev)

    def per_param(self, values):
        """One value per group -> a float if all agree, else a float64 tensor per param (an
        engine coefficient: coefficients.pack)."""
        if len(set(values)) <= 1:
            return float(values[0]) if values else 0.0
        return torch.from_numpy(np.asarray(values, np.float64)[self.group_of])


def run_pass(bucket, rule, flags, P, G, mask, coeffs, aligned):
    """One engine call of ``rule`` over ``bucket``'s chunks with the param column ``P`` and
    the gradient column ``G`` (the bucket's, or a stack's: Stacks.U) and state slots
    ``mask`` (flags.Update) of the bucket's own state tables; ``coeffs`` by name, a float
    or a float64 tensor per param each.  The bucket's non-contiguous params are stepped
    through their copies, as bucket.run does.  ``aligned``: every address in P, G and the
    bucket's tables is 16-byte aligned (the Triton engine's vector loads)."""
    row = pack(rule, coeffs)
    uniform = not any(torch.is_tensor(c) for c in row)
    dts = (bucket.dtype, bucket.sdtype)
    for _, p, w in bucket.work:
        w.copy_(p)
    if bucket.backend == "numba":
        if uniform:
            C = np.array([row], dtype=bucket.Cn.dtype)
        else:
            C = bucket.Cn
            for j, c in enumerate(row):
                C[:, j] = c.numpy() if torch.is_tensor(c) else c
        _numba().run(rule, flags, dts, mask, P, G, bucket.S, C, bucket.numel, bucket.tid,
                     bucket.cs, bucket.ce, bucket.numel, bucket.Q)
    else:
        if not uniform:
            for j, c in enumerate(row):
                if torch.is_tensor(c):
                    bucket.C[:, j].copy_(c)
                else:
                    bucket.C[:, j].fill_(c)
        if isinstance(G, np.ndarray):  # the grads' table, uploaded when it changed
            if bucket._gkey is None or not np.array_equal(bucket._gkey, G):
                bucket._gkey, bucket._gdev = G, on_device(G, bucket.device)
            G = bucket._gdev
        _triton().run(rule, flags, dts, mask, P, G, bucket.S, bucket.C, bucket.tid, bucket.tid,
                      bucket.cs, bucket.ce, aligned, None, row if uniform else None, bucket.Q)
    for _, p, w in bucket.work:
        p.copy_(w)
