"""Adadelta: torch.optim.Adadelta with a fused multi-tensor step (torch has no fused one)."""
import torch

from . import reference
from .optimizer import FusedOptimizer
from .options import signature_with
from .spec import Spec


class Adadelta(FusedOptimizer, torch.optim.Adadelta):
    """Drop-in for ``torch.optim.Adadelta`` (torch has no fused Adadelta): the same
    constructor, defaults, errors and ``state_dict``, with one fused multi-tensor step per
    (device, dtype) group (Numba on CPU, Triton on CUDA). Extra keyword-only arguments:
    ``backend``, ``l1``, ``max_grad_norm``, ``state_dtype`` (``torch.float32``, or
    ``torch.uint8`` for 8-bit or ``torch.uint4`` for 4-bit state), ``master_weights``, ``stochastic_rounding``, ``kahan_sum``,
    ``flat``, ``gradient_release``; each is described on the Options page of the documentation
    (``docs/options.md``)."""
    _rule = "adadelta"
    _sparse_error = "Adadelta does not support sparse gradients"

    def _slots(self, group):
        return ("square_avg", "acc_delta", None)

    def _coefficients(self, group, step, f64):
        rho = group["rho"]
        return dict(lr=group["lr"], rho=rho, rho_rest=1 - rho, eps=group["eps"],
                    wd=group["weight_decay"], l1=group["l1"])

    spec = Spec(reference=reference.adadelta, source="torch.optim.Adadelta",
                group_hp=(dict(lr=1.0), dict(lr=0.5, rho=0.95, eps=1e-5), dict(lr=2.0, rho=0.3),
                          dict(lr=1.0, rho=0.6)),
                test_hp=dict(lr=1.0, rho=0.8, weight_decay=0.05),
                program_hp=dict(lr=1.0, rho=0.8),
                unsigned=frozenset({"square_avg", "acc_delta"}),
                bench_hp=dict(lr=1.0), traffic=(4, 3),
                aot=(dict(), 3))


Adadelta.__signature__ = signature_with(torch.optim.Adadelta)
