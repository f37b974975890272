"""Adam, AdamW and Adamax: torch.optim's classes with a fused multi-tensor step."""
import torch

from . import reference
from .arith import decoupled, lerp_rest
from .optimizer import FusedOptimizer
from .options import signature_with
from .spec import Spec

# parity's four groups for the Adam family; beta1 < 0.5: torch's lerp switches formula
ADAM_GROUPS = (dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6),
               dict(lr=2e-3, betas=(0.3, 0.9)), dict(lr=1e-2, betas=(0.5, 0.95)))


class Adam(FusedOptimizer, torch.optim.Adam):
    """Drop-in for ``torch.optim.Adam`` (amsgrad, decoupled_weight_decay, capturable and the
    rest as torch): the same constructor, defaults, errors and ``state_dict``, with one
    fused multi-tensor step per (device, dtype) group (Numba on CPU, Triton on CUDA). Extra
    keyword-only arguments: ``backend``, ``l1``, ``max_grad_norm``, ``state_dtype``
    (``torch.float32``, or ``torch.uint8`` for 8-bit or ``torch.uint4`` for 4-bit state), ``master_weights``,
    ``stochastic_rounding``, ``kahan_sum``, ``flat``, ``gradient_release``; each is described on the
    Options page of the documentation (``docs/options.md``)."""
    _rule = "adam"
    _sparse_error = "Adam does not support sparse gradients, please consider SparseAdam instead"

    def _slots(self, group):
        return ("exp_avg", "exp_avg_sq", "max_exp_avg_sq" if group["amsgrad"] else None)

    def _flags(self, group):
        return {"AMSGRAD": bool(group["amsgrad"]),
                "DECOUPLED": bool(group["decoupled_weight_decay"])}

    def _inplace_updates(self, group):
        # torch's for-loop: param.mul_ for decoupled weight decay, then param.addcdiv_
        return 2 if group["decoupled_weight_decay"] and group["weight_decay"] != 0 else 1

    def _coefficients(self, group, step, f64):
        # torch's _single_tensor_adam, scalar by scalar
        lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
        bias_correction1 = 1 - beta1 ** step
        bias_correction2 = 1 - beta2 ** step
        step_size = lr / bias_correction1
        # on device counters, sqrt (correctly rounded) as torch's capturable path: CUDA's
        # pow(x, 0.5) is off by up to 2 ulp, which float64 parity on an H200 showed
        bc2_sqrt = bias_correction2.sqrt() if torch.is_tensor(step) else bias_correction2 ** 0.5
        if group["decoupled_weight_decay"]:
            wd = decoupled(lr, wd)
        return dict(step_size=step_size, bc2_sqrt=bc2_sqrt, w=1 - beta1,
                    w_rest=lerp_rest(1 - beta1, f64), beta2=beta2, beta2_rest=1 - beta2,
                    eps=group["eps"], wd=wd, l1=group["l1"])

    spec = Spec(reference=reference.adam, source="torch.optim.Adam",
                cases=tuple(dict(amsgrad=a, decoupled_weight_decay=d)
                            for a in (False, True) for d in (False, True)),
                group_hp=ADAM_GROUPS, fp16_eps=True, torch_fused=True,
                test_hp=dict(lr=1e-2, amsgrad=True, weight_decay=0.1),
                program_hp=dict(lr=1e-2, amsgrad=True),
                unsigned=frozenset({"exp_avg_sq", "max_exp_avg_sq"}),
                bench_hp=dict(lr=1e-3), traffic=(4, 3),
                aot=(dict(AMSGRAD=True, L1=True), 7))


class AdamW(Adam, torch.optim.AdamW):
    """Drop-in for ``torch.optim.AdamW`` (Adam with decoupled weight decay): the same
    constructor, defaults, errors and ``state_dict``, with one fused multi-tensor step per
    (device, dtype) group (Numba on CPU, Triton on CUDA). Extra keyword-only arguments:
    ``backend``, ``l1``, ``max_grad_norm``, ``state_dtype`` (``torch.float32``, or
    ``torch.uint8`` for 8-bit or ``torch.uint4`` for 4-bit state), ``master_weights``, ``stochastic_rounding``, ``kahan_sum``,
    ``flat``, ``gradient_release``; each is described on the Options page of the documentation
    (``docs/options.md``)."""

    spec = Spec(reference=reference.adamw, source="torch.optim.AdamW",
                cases=(dict(amsgrad=False), dict(amsgrad=True)), group_hp=ADAM_GROUPS,
                fp16_eps=True, torch_fused=True, test_hp=dict(lr=1e-2),
                program_hp=dict(lr=1e-2, weight_decay=0.1),
                unsigned=frozenset({"exp_avg_sq", "max_exp_avg_sq"}),
                bench_hp=dict(lr=1e-3), traffic=(4, 3))


class Adamax(FusedOptimizer, torch.optim.Adamax):
    """Drop-in for ``torch.optim.Adamax`` (torch has no fused Adamax): the same constructor,
    defaults, errors and ``state_dict``, with one fused multi-tensor step per (device,
    dtype) group (Numba on CPU, Triton on CUDA). Extra keyword-only arguments: ``backend``,
    ``l1``, ``max_grad_norm``, ``state_dtype`` (``torch.float32``, or ``torch.uint8`` for
    8-bit or ``torch.uint4`` for 4-bit state), ``master_weights``, ``stochastic_rounding``, ``kahan_sum``, ``flat``,
    ``gradient_release``; each is described on the Options page of the documentation
    (``docs/options.md``)."""
    _rule = "adamax"
    _sparse_error = "Adamax does not support sparse gradients"

    def _slots(self, group):
        return ("exp_avg", "exp_inf", None)

    def _coefficients(self, group, step, f64):
        lr, (beta1, beta2) = group["lr"], group["betas"]
        clr = lr / (1 - beta1 ** step)
        return dict(clr=clr, w=1 - beta1, w_rest=lerp_rest(1 - beta1, f64), beta2=beta2,
                    eps=group["eps"], wd=group["weight_decay"], l1=group["l1"])

    spec = Spec(reference=reference.adamax, source="torch.optim.Adamax",
                group_hp=ADAM_GROUPS, fp16_eps=True, test_hp=dict(lr=1e-2),
                program_hp=dict(lr=1e-2), unsigned=frozenset({"exp_inf"}),
                bench_hp=dict(lr=1e-3), traffic=(4, 3),
                aot=(dict(), 3))


for _cls, _twin in ((Adam, torch.optim.Adam), (AdamW, torch.optim.AdamW),
                    (Adamax, torch.optim.Adamax)):
    _cls.__signature__ = signature_with(_twin)
