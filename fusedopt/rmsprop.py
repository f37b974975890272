"""RMSprop: torch.optim.RMSprop with a fused multi-tensor step (torch has no fused RMSprop)."""
import torch

from .optimizer import FusedOptimizer, lerp_rest, lerp_small
from .options import signature_with


class RMSprop(FusedOptimizer, torch.optim.RMSprop):
    """Drop-in for ``torch.optim.RMSprop`` (centered and momentum included; torch has no
    fused RMSprop): the same constructor, defaults, errors and ``state_dict``, with one
    fused multi-tensor step per (device, dtype) group (Numba on CPU, Triton on CUDA). Extra
    keyword-only arguments: ``backend``, ``l1``, ``max_grad_norm``, ``state_dtype``
    (``torch.float32``, or ``torch.uint8`` for 8-bit state), ``master_weights``,
    ``stochastic_rounding``, ``flat``; each is described on the Options page of the
    documentation (``docs/options.md``)."""
    _rule = "rmsprop"
    _sparse_error = "RMSprop does not support sparse gradients"

    def _slots(self, group):
        return ("square_avg", "momentum_buffer" if group["momentum"] > 0 else None,
                "grad_avg" if group["centered"] else None)

    def _flags(self, group):
        return {"CENTERED": bool(group["centered"]), "MOMENTUM": group["momentum"] > 0,
                "LERP_SMALL": lerp_small(1 - group["alpha"])}

    def _coefficients(self, group, step, f64):
        alpha = group["alpha"]
        return dict(lr=group["lr"], alpha=alpha, alpha_rest=1 - alpha,
                    w_rest=lerp_rest(1 - alpha, f64), eps=group["eps"],
                    momentum=group["momentum"], wd=group["weight_decay"], l1=group["l1"])


RMSprop.__signature__ = signature_with(torch.optim.RMSprop)
