"""RMSprop: torch.optim.RMSprop with a fused multi-tensor step (torch has no fused RMSprop)."""
import torch

from . import reference
from .arith import lerp_rest
from .optimizer import FusedOptimizer
from .options import signature_with
from .spec import Spec


class RMSprop(FusedOptimizer, torch.optim.RMSprop):
    """Drop-in for ``torch.optim.RMSprop`` (centered and momentum included; torch has no
    fused RMSprop): the same constructor, defaults, errors and ``state_dict``, with one
    fused multi-tensor step per (device, dtype) group (Numba on CPU, Triton on CUDA). Extra
    keyword-only arguments: ``backend``, ``l1``, ``max_grad_norm``, ``state_dtype``
    (``torch.float32``, or ``torch.uint8`` for 8-bit or ``torch.uint4`` for 4-bit state), ``master_weights``,
    ``stochastic_rounding``, ``kahan_sum``, ``flat``, ``gradient_release``; each is described on the
    Options page of the documentation (``docs/options.md``)."""
    _rule = "rmsprop"
    _sparse_error = "RMSprop does not support sparse gradients"

    def _slots(self, group):
        return ("square_avg", "momentum_buffer" if group["momentum"] > 0 else None,
                "grad_avg" if group["centered"] else None)

    def _flags(self, group):
        return {"CENTERED": bool(group["centered"]), "MOMENTUM": group["momentum"] > 0}

    def _coefficients(self, group, step, f64):
        alpha = group["alpha"]
        return dict(lr=group["lr"], alpha=alpha, alpha_rest=1 - alpha,
                    w_rest=lerp_rest(1 - alpha, f64), eps=group["eps"],
                    momentum=group["momentum"], wd=group["weight_decay"], l1=group["l1"])

    spec = Spec(reference=reference.rmsprop, source="torch.optim.RMSprop",
                cases=tuple(dict(centered=c, momentum=m) for c in (False, True) for m in (0, 0.9)),
                group_hp=(dict(lr=1e-2), dict(lr=3e-3, alpha=0.9, eps=1e-6),
                          dict(lr=2e-3, alpha=0.3), dict(lr=1e-3, alpha=0.5)),
                fp16_eps=True, test_hp=dict(lr=1e-3, momentum=0.9, centered=True),
                program_hp=dict(lr=1e-3, momentum=0.9, centered=True),
                unsigned=frozenset({"square_avg"}), bench_hp=dict(lr=1e-3), traffic=(3, 2),
                aot=(dict(CENTERED=True, MOMENTUM=True), 7))


RMSprop.__signature__ = signature_with(torch.optim.RMSprop)
