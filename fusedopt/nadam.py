"""NAdam: torch.optim.NAdam with a fused multi-tensor step (torch has no fused one)."""
import torch

from . import reference
from .adam import ADAM_GROUPS
from .arith import decoupled, lerp_rest
from .bucket import scalar_dtype
from .optimizer import FusedOptimizer
from .options import signature_with
from .spec import Spec


class NAdam(FusedOptimizer, torch.optim.NAdam):
    """Drop-in for ``torch.optim.NAdam`` (torch has no fused NAdam): the same constructor,
    defaults, errors and ``state_dict``, with one fused multi-tensor step per (device,
    dtype) group (Numba on CPU, Triton on CUDA). Extra keyword-only arguments: ``backend``,
    ``l1``, ``max_grad_norm``, ``state_dtype`` (``torch.float32``, or ``torch.uint8`` for
    8-bit or ``torch.uint4`` for 4-bit state), ``master_weights``, ``stochastic_rounding``, ``kahan_sum``, ``flat``,
    ``gradient_release``; each is described on the Options page of the documentation
    (``docs/options.md``)."""
    _rule = "nadam"
    _sparse_error = "NAdam does not support sparse gradients"
    _scalars = ("mu_product",)

    def _slots(self, group):
        return ("exp_avg", "exp_avg_sq", None)

    def _flags(self, group):
        return {"DECOUPLED": bool(group["decoupled_weight_decay"])}

    def _inplace_updates(self, group):
        # torch's for-loop: param.mul_ for decoupled weight decay, then two addcdiv_
        return 3 if group["decoupled_weight_decay"] and group["weight_decay"] != 0 else 2

    def _init_state(self, group, p, state):
        state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
        state["mu_product"] = torch.tensor(1.0, dtype=scalar_dtype())

    def _mu(self, group, step):
        return group["betas"][0] * (1.0 - 0.5 * (0.96 ** (step * group["momentum_decay"])))

    def _advance(self, group, bucket, step, found_inf):
        # torch: mu_product *= mu, in the counters' dtype (a skipped step leaves it)
        buf = bucket.scalars["mu_product"]
        mu = self._mu(group, step)
        if torch.is_tensor(mu):
            mu = mu.to(buf.dtype)
            if found_inf is not None:
                mu = torch.where(found_inf.to(buf.device) != 0, 1.0, mu)
        buf *= mu

    def _coefficients(self, group, step, f64, mu_product):
        # torch's _single_tensor_nadam, scalar by scalar, with mu_product as it was rounded
        lr, (beta1, beta2), wd = group["lr"], group["betas"], group["weight_decay"]
        mu, mu_next = self._mu(group, step), self._mu(group, step + 1)
        bc2 = 1 - beta2 ** step
        c_grad = -lr * (1.0 - mu) / (1.0 - mu_product)
        c_avg = (-lr * mu_next) / (1.0 - mu_product * mu_next)
        if group["decoupled_weight_decay"]:
            wd = decoupled(lr, wd)
        return dict(w=1 - beta1, w_rest=lerp_rest(1 - beta1, f64), beta2=beta2,
                    beta2_rest=1 - beta2, bc2=bc2, eps=group["eps"], c_grad=c_grad,
                    c_avg=c_avg, wd=wd, l1=group["l1"])

    spec = Spec(reference=reference.nadam, source="torch.optim.NAdam",
                cases=(dict(decoupled_weight_decay=False), dict(decoupled_weight_decay=True),
                       dict(momentum_decay=0.02)),
                group_hp=ADAM_GROUPS, fp16_eps=True,
                test_hp=dict(lr=2e-3, momentum_decay=0.01, weight_decay=0.05),
                program_hp=dict(lr=1e-2), unsigned=frozenset({"exp_avg_sq"}),
                bench_hp=dict(lr=1e-3), traffic=(4, 3),
                aot=(dict(DECOUPLED=True), 3))


NAdam.__signature__ = signature_with(torch.optim.NAdam)
