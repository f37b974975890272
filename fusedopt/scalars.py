"""torch.optim's Python-side conventions the classes share: the closure's loss, and the
scalars of torch's lerp (its formula switch and its 1 - w in the math dtype)."""
import numpy as np
import torch


def closure_loss(closure):
    """step(closure)'s loss, as torch.optim computes it: the closure run with grad enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def lerp_rest(w, f64):
    """1 - w as torch's lerp computes it: in the tensor's math dtype (float32 unless float64)."""
    w = float(w)
    return 1 - w if f64 else float(np.float32(1) - np.float32(w))


def lerp_small(w):
    # torch's lerp switches formula at |w| = 0.5
    return abs(float(w)) < 0.5

