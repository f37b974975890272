"""RAdam: torch.optim.RAdam with a fused multi-tensor step (torch has no fused one)."""
import torch

from . import reference
from .adam import ADAM_GROUPS, Adam
from .arith import decoupled, lerp_rest
from .optimizer import FusedOptimizer
from .options import signature_with
from .spec import Spec


class RAdam(FusedOptimizer, torch.optim.RAdam):
    """Drop-in for ``torch.optim.RAdam`` (torch has no fused RAdam): the same constructor,
    defaults, errors and ``state_dict``, with one fused multi-tensor step per (device,
    dtype) group (Numba on CPU, Triton on CUDA). Extra keyword-only arguments: ``backend``,
    ``l1``, ``max_grad_norm``, ``state_dtype`` (``torch.float32``, or ``torch.uint8`` for
    8-bit or ``torch.uint4`` for 4-bit state), ``master_weights``, ``stochastic_rounding``, ``kahan_sum``, ``flat``,
    ``gradient_release``; each is described on the Options page of the documentation
    (``docs/options.md``)."""
    _rule = "radam"
    _sparse_error = "RAdam does not support sparse gradients"
    _inplace_updates = Adam._inplace_updates

    def _slots(self, group):
        return ("exp_avg", "exp_avg_sq", None)

    def _flags(self, group):
        return {"DECOUPLED": bool(group["decoupled_weight_decay"])}

    def _coefficients(self, group, step, f64):
        # torch's _single_tensor_radam, scalar by scalar; rect = 0 marks the unrectified
        # steps (rho_t <= 5), per param where the counters differ
        lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
        bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2 ** step) / bc2
        ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
        if torch.is_tensor(step):
            rect = torch.where(rho_t > 5, ratio.clamp(min=0) ** 0.5, 0.0)
            bc2_sqrt = bc2.sqrt()
        else:
            rect, bc2_sqrt = (ratio ** 0.5 if rho_t > 5 else 0.0), bc2 ** 0.5
        if group["decoupled_weight_decay"]:
            wd = decoupled(lr, wd)
        return dict(lr=lr, bc1=bc1, bc2_sqrt=bc2_sqrt, w=1 - beta1,
                    w_rest=lerp_rest(1 - beta1, f64), beta2=beta2, beta2_rest=1 - beta2,
                    eps=group["eps"], wd=wd, l1=group["l1"], rect=rect)

    spec = Spec(reference=reference.radam, source="torch.optim.RAdam",
                cases=(dict(decoupled_weight_decay=False), dict(decoupled_weight_decay=True)),
                group_hp=ADAM_GROUPS, fp16_eps=True,
                test_hp=dict(lr=2e-3, betas=(0.8, 0.95), decoupled_weight_decay=True,
                             weight_decay=0.1),
                program_hp=dict(lr=1e-2, weight_decay=0.05), unsigned=frozenset({"exp_avg_sq"}),
                bench_hp=dict(lr=1e-3), traffic=(4, 3),
                aot=(dict(DECOUPLED=True), 3))


RAdam.__signature__ = signature_with(torch.optim.RAdam)
