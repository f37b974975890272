"""SGD: torch.optim.SGD with a fused multi-tensor step.

torch creates a momentum buffer as a copy of the first gradient; here it is created as
zeros and the first step uses momentum 0 and dampening 0 (0 * 0 + 1 * g == g), so the
buffer exists in the state exactly when torch's does and holds the same values.
Sparse gradients go to torch's own SGD for those params.
"""
import torch
from torch.optim.sgd import sgd as torch_sgd

from . import reference
from .optimizer import FusedOptimizer
from .options import signature_with
from .spec import Spec


class SGD(FusedOptimizer, torch.optim.SGD):
    """Drop-in for ``torch.optim.SGD`` (momentum, dampening, nesterov; sparse gradients go
    to torch's own SGD): the same constructor, defaults, errors and ``state_dict``, with one
    fused multi-tensor step per (device, dtype) group (Numba on CPU, Triton on CUDA). Extra
    keyword-only arguments: ``backend``, ``l1``, ``max_grad_norm``, ``state_dtype``
    (``torch.float32``, or ``torch.uint8`` for 8-bit or ``torch.uint4`` for 4-bit state), ``master_weights``,
    ``stochastic_rounding``, ``kahan_sum``, ``flat``, ``gradient_release``; each is described on the
    Options page of the documentation (``docs/options.md``)."""
    _rule = "sgd"
    _has_step = False

    def _slots(self, group):
        return ("momentum_buffer" if group["momentum"] != 0 else None, None, None)

    def _flags(self, group):
        return {"MOMENTUM": group["momentum"] != 0, "NESTEROV": bool(group["nesterov"])}

    def _coefficients(self, group, step, f64):
        momentum, take = group["momentum"], 1 - group["dampening"]
        if isinstance(step, torch.Tensor):
            first = step == 1  # step: float64, so keep and take stay float64
            keep = torch.full_like(step, momentum).masked_fill_(first, 0.0)
            take = torch.full_like(step, take).masked_fill_(first, 1.0)
        elif step == 1:
            keep, take = 0.0, 1.0
        else:
            keep = momentum
        return dict(lr=group["lr"], wd=group["weight_decay"], l1=group["l1"], keep=keep,
                    take=take, momentum=momentum)

    def _sparse_step(self, group, params):
        if group["l1"]:
            raise RuntimeError("l1 is not supported with sparse gradients")
        bufs = [self.state[p].get("momentum_buffer") for p in params] if group["momentum"] \
            else [None] * len(params)
        torch_sgd(params, [p.grad for p in params], bufs, weight_decay=group["weight_decay"],
                  momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                  nesterov=group["nesterov"], maximize=group["maximize"], has_sparse_grad=True,
                  foreach=False)
        if group["momentum"]:
            for p, b in zip(params, bufs):
                self.state[p]["momentum_buffer"] = b

    spec = Spec(reference=reference.sgd, source="torch.optim.SGD",
                cases=(dict(momentum=0), dict(momentum=0.9), dict(momentum=0.9, dampening=0.1),
                       dict(momentum=0.9, nesterov=True)),
                group_hp=(dict(lr=1e-2), dict(lr=3e-2), dict(lr=2e-3), dict(lr=5e-2)),
                torch_fused=True, test_hp=dict(lr=1e-2, momentum=0.9, nesterov=True),
                program_hp=dict(lr=1e-2, momentum=0.9),
                bench_hp=dict(lr=1e-3, momentum=0.9), traffic=(3, 2),
                aot=(dict(MOMENTUM=True, NESTEROV=True), 1))


SGD.__signature__ = signature_with(torch.optim.SGD)
