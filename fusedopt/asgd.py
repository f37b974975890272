"""ASGD: torch.optim.ASGD with a fused multi-tensor step (torch has no fused one)."""
import torch

from .bucket import scalar_dtype
from . import reference
from .optimizer import FusedOptimizer
from .options import signature_with
from .spec import Spec


class ASGD(FusedOptimizer, torch.optim.ASGD):
    """Drop-in for ``torch.optim.ASGD`` (torch has no fused ASGD): the same constructor,
    defaults, errors and ``state_dict``, with one fused multi-tensor step per (device,
    dtype) group (Numba on CPU, Triton on CUDA). Extra keyword-only arguments: ``backend``,
    ``l1``, ``max_grad_norm``, ``state_dtype`` (``torch.float32``, or ``torch.uint8`` for
    8-bit or ``torch.uint4`` for 4-bit state), ``master_weights``, ``stochastic_rounding``, ``kahan_sum``, ``flat``,
    ``gradient_release``; each is described on the Options page of the documentation
    (``docs/options.md``)."""
    _rule = "asgd"
    _sparse_error = "ASGD does not support sparse gradients"
    _scalars = ("eta", "mu")
    _advance_first = False  # torch's step uses the eta and mu of the step before

    def _slots(self, group):
        return ("ax", None, None)

    def _inplace_updates(self, group):
        return 2  # torch's for-loop: param.mul_, then param.add_

    def _init_state(self, group, p, state):
        state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
        # torch's first eta is the lr (a tensor lr read without a host sync)
        state["eta"] = torch.as_tensor(group["lr"]).to(scalar_dtype()).detach().clone()
        state["mu"] = torch.tensor(1.0, dtype=scalar_dtype())

    def _coefficients(self, group, step, f64, eta, mu):
        # torch's _single_tensor_asgd: p * (1 - lambd * eta), p - eta * g; the average is
        # a copy where mu is 1 unless capturable (NaN equals nothing: always the blend)
        copy_at = float("nan") if group["capturable"] else 1.0
        return dict(decay=1 - group["lambd"] * eta, eta=eta, mu=mu, copy_at=copy_at,
                    wd=group["weight_decay"], l1=group["l1"])

    def _advance(self, group, bucket, step, found_inf):
        # after the update: eta = lr / (1 + lambd * lr * step) ** alpha, mu = 1 / max(1,
        # step - t0), in float64 (torch: Python floats; capturable: the counters' dtype),
        # stored in the state's scalar dtype; a skipped step (found_inf) leaves them
        lr, lambd, alpha, t0 = group["lr"], group["lambd"], group["alpha"], group["t0"]
        eta = lr / ((1 + lambd * lr * step) ** alpha)
        mu = 1 / torch.clamp(step - t0, min=1) if torch.is_tensor(step) else 1 / max(1, step - t0)
        for name, new in (("eta", eta), ("mu", mu)):
            buf = bucket.scalars[name]
            if found_inf is not None:
                new = torch.where(found_inf.to(buf.device) != 0, buf, new)
            buf.copy_(new) if torch.is_tensor(new) else buf.fill_(new)

    # t0 at its default (1e6) the average is a copy of the params; small, a running mean
    spec = Spec(reference=reference.asgd, source="torch.optim.ASGD",
                cases=({}, dict(t0=5), dict(t0=2, lambd=1e-2, alpha=0.6)),
                group_hp=(dict(lr=1e-2), dict(lr=3e-2), dict(lr=2e-3), dict(lr=5e-2)),
                test_hp=dict(lr=1e-2, t0=3, lambd=1e-3, weight_decay=0.05),
                program_hp=dict(lr=1e-2, t0=2), bench_hp=dict(lr=1e-3), traffic=(3, 2),
                aot=(dict(), 1))


ASGD.__signature__ = signature_with(torch.optim.ASGD)
