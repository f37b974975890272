"""The host-side inputs every class's step shares: torch.optim's closure convention and
what torch.amp.GradScaler leaves on the optimizer."""
import torch


def closure_loss(closure):
    """step(closure)'s loss, as torch.optim computes it: the closure run with grad enabled."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def scaler_inputs(scale, found, capturable):
    """What torch.amp.GradScaler.step left on the optimizer (it does, since the classes set
    _step_supports_amp_scaling): ``(inv, found, skip)``.  ``inv``: 1 / scale as torch's
    unscale_ computes it (the reciprocal in float64, rounded to float32), or None.
    ``skip``: found_inf is set, so no param or state is touched, no state created, no step
    counted, the grads unscaled (the for-loop's skipped step).  found_inf is read on the
    host where the counters are (not capturable: a GPU's flag costs one sync, as in torch's
    for-loop path); where a group is capturable, one on a GPU is returned for the kernel to
    read (no host sync)."""
    inv = None if scale is None else scale.double().reciprocal().float()
    if found is not None and not torch.is_tensor(found):  # the int 0: no grads at all
        found = None
    if found is not None and (found.device.type == "cpu" or not capturable):
        return inv, None, bool(found.item())
    return inv, found, False
