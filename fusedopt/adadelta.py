"""Adadelta: torch.optim.Adadelta with a fused multi-tensor step (torch has no fused one)."""
import torch

from .optimizer import FusedOptimizer
from .options import signature_with


class Adadelta(FusedOptimizer, torch.optim.Adadelta):
    """Drop-in for ``torch.optim.Adadelta`` (torch has no fused Adadelta): the same
    constructor, defaults, errors and ``state_dict``, with one fused multi-tensor step per
    (device, dtype) group (Numba on CPU, Triton on CUDA). Extra keyword-only arguments:
    ``backend``, ``l1``, ``max_grad_norm``, ``state_dtype`` (``torch.float32``, or
    ``torch.uint8`` for 8-bit state), ``master_weights``, ``stochastic_rounding``, ``flat``;
    each is described on the Options page of the documentation (``docs/options.md``)."""
    _rule = "adadelta"
    _sparse_error = "Adadelta does not support sparse gradients"

    def _slots(self, group):
        return ("square_avg", "acc_delta", None)

    def _flags(self, group):
        return {}

    def _coefficients(self, group, step, f64):
        rho = group["rho"]
        return dict(lr=group["lr"], rho=rho, rho_rest=1 - rho, eps=group["eps"],
                    wd=group["weight_decay"], l1=group["l1"])


Adadelta.__signature__ = signature_with(torch.optim.Adadelta)
