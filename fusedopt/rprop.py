"""Rprop: torch.optim.Rprop with a fused multi-tensor step (torch has no fused one)."""
import torch

from .bucket import scalar_dtype, state_dtype
from . import reference
from .optimizer import FusedOptimizer
from .options import signature_with
from .spec import Spec


class Rprop(FusedOptimizer, torch.optim.Rprop):
    """Drop-in for ``torch.optim.Rprop`` (torch has no fused Rprop): the same constructor,
    defaults, errors and ``state_dict``, with one fused multi-tensor step per (device,
    dtype) group (Numba on CPU, Triton on CUDA). Extra keyword-only arguments: ``backend``,
    ``l1``, ``max_grad_norm``, ``state_dtype`` (``torch.float32``, or ``torch.uint8`` for
    8-bit or ``torch.uint4`` for 4-bit state), ``master_weights``, ``stochastic_rounding``, ``kahan_sum``, ``flat``,
    ``gradient_release``; each is described on the Options page of the documentation
    (``docs/options.md``)."""
    _rule = "rprop"
    _sparse_error = "Rprop does not support sparse gradients"

    def _slots(self, group):
        return ("prev", "step_size", None)

    def _init_state(self, group, p, state):
        # as torch: each element's step size starts at the lr of the first step (a complex
        # param's real and imaginary parts alike), in the state's dtype, read without a
        # host sync when lr is a tensor
        state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
        state["prev"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        lr = torch.as_tensor(group["lr"], dtype=torch.float64)
        fill = torch.complex(lr, lr) if p.is_complex() else lr
        sdt = state_dtype(group, p)  # (8-bit state: quantized by the plan from float32)
        state["step_size"] = torch.empty_like(
            p, dtype=torch.float32 if sdt in (torch.uint8, torch.uint4) else sdt).copy_(
                fill.expand(p.shape))

    def _coefficients(self, group, step, f64):
        (etaminus, etaplus), (lo, hi) = group["etas"], group["step_sizes"]
        return dict(etaplus=etaplus, etaminus=etaminus, lo=lo, hi=hi, one=1.0, wd=0.0,
                    l1=group["l1"])

    spec = Spec(reference=reference.rprop, source="torch.optim.Rprop",
                cases=(dict(etas=(0.5, 1.2)), dict(etas=(0.3, 1.5), step_sizes=(1e-4, 0.02))),
                group_hp=(dict(lr=1e-2), dict(lr=3e-3), dict(lr=2e-2), dict(lr=1e-3)),
                weight_decay=False, test_hp=dict(lr=1e-2, etas=(0.4, 1.3)),
                program_hp=dict(lr=1e-2), unsigned=frozenset({"step_size"}),
                bench_hp=dict(lr=1e-3), traffic=(4, 3), aot=(dict(L1=True), 3))


Rprop.__signature__ = signature_with(torch.optim.Rprop)
