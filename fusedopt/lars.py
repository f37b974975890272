"""LARS (You, Gitman and Ginsburg, 2017, "Large Batch Training of Convolutional Networks"):
SGD whose gradient is scaled per tensor by ``trust_coefficient * |p| / (|g| + wd * |p|)``,
as the pytorch-optimizer package has it (``pytorch_optimizer.LARS``, 4.1), which torch
lacks.  ``LARSForLoop`` is that class's per-tensor step in torch ops and its constructor,
defaults, state (``momentum_buffer`` where momentum > 0; the counter in ``group["step"]``)
and errors.  Params of one dim (biases, norms' scales) take plain SGD: no weight decay, no
ratio.  ``LARS`` is the fused step: one reduce pass for |p| and |g| of every tensor, one
update pass (Spec.trust).

Differences from the package: ``p.grad`` is left as it was (the package negates it under
``maximize``, adds ``weight_decay * p`` and scales it in place); a group's own
``"maximize"`` key overrides the constructor's; the norms are correctly rounded (float64
sums of squares: the package's ``torch.linalg.norm`` sums in float32).
"""
import torch

from .ademamix import NegativeLRError, NoSparseGradientError
from .optimizer import closure_loss
from .options import signature_with
from .reference import _regularize
from .spec import Spec
from .trust import TrustOptimizer


def ratio(pn, gn, wd, tc):
    """The package's trust ratio from the norms (tensors): tc * |p| / (|g| + wd * |p|), 1
    where |p| or the denominator is 0."""
    den = gn + wd * pn
    one = torch.ones_like(pn)
    return torch.where(pn > 0.0, torch.where(den > 0.0, tc * pn / den, one), one)


class LARSForLoop(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, weight_decay=0.0, momentum=0.9, dampening=0.0,
                 trust_coefficient=1e-3, nesterov=False, foreach=None, maximize=False, **kwargs):
        if lr is not None and lr < 0.0:
            raise NegativeLRError(lr)
        for name, x, top in (("weight_decay", weight_decay, None), ("momentum", momentum, 1.0),
                             ("dampening", dampening, 1.0),
                             ("trust_coefficient", trust_coefficient, None)):
            if top is not None and not 0.0 <= x < top:
                raise ValueError(f"{name} must be in the range [0.0, 1.0)")
            if top is None and x is not None and x < 0.0:
                raise ValueError(f"{name} must be non-negative")
        self.foreach, self.maximize = foreach, maximize
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      dampening=dampening, trust_coefficient=trust_coefficient,
                                      nesterov=nesterov, foreach=foreach))

    def __str__(self):
        return "Lars"

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            for p in live:  # the package's init_group
                if p.grad.is_sparse:
                    raise NoSparseGradientError("Lars")
                if group["momentum"] > 0.0 and "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            group["step"] = group.get("step", 0) + 1
            wd, mo = group["weight_decay"], group["momentum"]
            for p in live:
                g = -p.grad if group.get("maximize", self.maximize) else p.grad
                if p.ndim > 1:
                    r = ratio(torch.linalg.norm(p), torch.linalg.norm(g), wd,
                              group["trust_coefficient"])
                    g = g.add(p, alpha=wd).mul_(r)
                if mo > 0.0:
                    mb = self.state[p]["momentum_buffer"]
                    mb.mul_(mo).add_(g, alpha=1.0 - group["dampening"])
                    g = g.add(mb, alpha=mo) if group["nesterov"] else mb
                p.add_(g, alpha=-group["lr"])
        return loss


def reference(p, g, st, lr=1e-3, weight_decay=0.0, momentum=0.9, dampening=0.0,
              trust_coefficient=1e-3, nesterov=False, maximize=False, **hp):
    """The paper's Algorithm 1 in float64 (the local rate eta * |w| / (|g| + beta * |w|)
    on params of 2 or more dims), with the package's momentum (a buffer from zero,
    dampened) and Nesterov."""
    g = _regularize(p, g, dict(hp, maximize=maximize), coupled=False)
    if p.dim() > 1:
        pn, gn = p.norm(), g.norm()
        den = gn + weight_decay * pn
        r = trust_coefficient * pn / den if pn > 0 and den > 0 else 1.0
        g = (g + weight_decay * p) * r
    if momentum > 0:
        b = st["momentum_buffer"] = momentum * st.get("momentum_buffer", 0 * p) \
            + (1 - dampening) * g
        g = g + momentum * b if nesterov else b
    p.sub_(lr * g)


class LARS(TrustOptimizer, LARSForLoop):
    """LARS (You, Gitman and Ginsburg, 2017), a drop-in for ``pytorch_optimizer.LARS``:
    ``lr=1e-3, weight_decay=0.0, momentum=0.9, dampening=0.0, trust_coefficient=1e-3,
    nesterov=False``, the package's errors and state (``momentum_buffer``; the counter in
    ``group["step"]``). Params of 2 or more dims: ``g = (g + wd * p) * tc * |p| / (|g| +
    wd * |p|)``; all: momentum, then ``p -= lr * g``. Per (device, dtype) group: one
    engine pass summing |p|**2 and |g|**2 of every tensor, one update pass (Numba on CPU,
    Triton on CUDA). Unlike the package it leaves ``p.grad`` as it was. Extra
    keyword-only arguments: ``backend``, ``l1``, ``max_grad_norm``, ``master_weights``,
    ``stochastic_rounding``, ``flat``, ``state_dtype`` (float32; 8-bit state is refused):
    the Options page (``docs/options.md``)."""
    _rule = "lars"
    _OWN = TrustOptimizer._OWN + ("maximize", "foreach")

    def _slots(self, group):
        return ("momentum_buffer" if group["momentum"] > 0.0 else None, None, None)

    def _flags(self, group):
        return {"DECOUPLED": True, "MOMENTUM": group["momentum"] > 0.0,
                "NESTEROV": bool(group["nesterov"])}

    def _maximize(self, group):
        return bool(group.get("maximize", self.maximize))

    def _sparse_step(self, group, params):
        raise NoSparseGradientError("Lars")

    def _coefficients(self, group, step, f64):
        return dict(wd=group["weight_decay"], l1=group["l1"], ratio=1.0, adapt=0.0,
                    momentum=group["momentum"], take=1.0 - group["dampening"], lr=group["lr"])

    def _trust(self, group, bucket, sums, co):
        pn, gn = self._norms(bucket, sums)
        adapt = torch.as_tensor(bucket.ndim > 1, device=pn.device)
        r = ratio(pn, gn, group["weight_decay"], group["trust_coefficient"])
        return {**co, "ratio": torch.where(adapt, r, 1.0), "adapt": adapt.to(pn.dtype)}

    spec = Spec(reference=reference, source="pytorch_optimizer.LARS",
                cases=({}, dict(nesterov=True), dict(momentum=0.0), dict(dampening=0.3)),
                group_hp=(dict(lr=1e-2), dict(lr=0.1, trust_coefficient=0.02),
                          dict(lr=3e-2, momentum=0.5), dict(lr=1e-2, trust_coefficient=1.0)),
                test_hp=dict(lr=1e-2, weight_decay=0.1, nesterov=True, trust_coefficient=0.02),
                program_hp=dict(lr=1e-2, weight_decay=0.05), bench_hp=dict(lr=1e-3),
                traffic=((3, 0), (3, 2)), complex_params=False, trust=True, ulp=64,
                aot=(dict(MOMENTUM=True, NESTEROV=True, L1=True), 1))


LARS.__signature__ = signature_with(LARSForLoop)
