"""torch.optim's closure convention, which every class's step shares."""
import torch


def closure_loss(closure):
    """step(closure)'s loss, as torch.optim computes it: the closure run with grad enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()
