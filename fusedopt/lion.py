"""Lion (Chen et al., 2023, "Symbolic Discovery of Optimization Algorithms"), which torch
does not have: ``LionForLoop`` is its one-tensor-at-a-time form in torch ops, in the op
order of the lion-pytorch package, and plays the part torch.optim's classes play for the
others (constructor, validation, state format, the anchor of the parity tests, the
fallback for params the engines do not take); ``Lion`` is the fused step."""
import torch

from . import reference
from .arith import decoupled
from .optimizer import FusedOptimizer, closure_loss
from .options import signature_with
from .spec import Spec


class LionForLoop(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-4, betas=(0.9, 0.99), weight_decay=0.0, *,
                 maximize=False, foreach=None, differentiable=False):
        if isinstance(lr, torch.Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
        if not 0.0 <= lr:
            raise ValueError(f"Invalid learning rate: {lr}")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {beta}")
        if not 0.0 <= weight_decay:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      maximize=maximize, foreach=foreach,
                                      differentiable=differentiable))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            lr, (beta1, beta2), wd = float(group["lr"]), group["betas"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Lion does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                g, m = -p.grad if group["maximize"] else p.grad, state["exp_avg"]
                if p.is_complex():
                    p, g, m = map(torch.view_as_real, (p, g, m))
                p.mul_(1 - lr * wd)  # decoupled weight decay
                p.add_(m.mul(beta1).add_(g, alpha=1 - beta1).sign_(), alpha=-lr)
                m.mul_(beta2).add_(g, alpha=1 - beta2)
        return loss


class Lion(FusedOptimizer, LionForLoop):
    """Lion (Chen et al., 2023), which torch lacks: ``lr=1e-4, betas=(0.9, 0.99),
    weight_decay=0.0, *, maximize=False``; state ``exp_avg``; decoupled weight decay, then
    ``p -= lr * sign(beta1 * m + (1 - beta1) * g)`` and ``m = beta2 * m + (1 - beta2) * g``.
    Its twin is ``fusedopt.lion.LionForLoop`` (one tensor at a time, in the op order of the
    ``lion-pytorch`` package, which the tests check it against); one fused multi-tensor step
    per (device, dtype) group (Numba on CPU, Triton on CUDA). Extra keyword-only arguments:
    ``backend``, ``l1``, ``max_grad_norm``, ``state_dtype`` (``torch.float32``, or
    ``torch.uint8`` for 8-bit or ``torch.uint4`` for 4-bit state), ``master_weights``, ``stochastic_rounding``, ``kahan_sum``,
    ``flat``, ``gradient_release``; each is described on the Options page of the documentation
    (``docs/options.md``)."""
    _rule = "lion"
    _sparse_error = "Lion does not support sparse gradients"
    _has_step = False  # Lion keeps no step counter

    def _inplace_updates(self, group):
        return 2  # its twin's p.mul_ (even by 1) and p.add_, as lion-pytorch

    def _slots(self, group):
        return ("exp_avg", None, None)

    def _flags(self, group):
        return {"DECOUPLED": True}

    def _coefficients(self, group, step, f64):
        lr, (beta1, beta2) = group["lr"], group["betas"]
        return dict(decay=decoupled(lr, group["weight_decay"]), lr=lr, beta1=beta1,
                    beta1_rest=1 - beta1, beta2=beta2, beta2_rest=1 - beta2, one=1.0,
                    l1=group["l1"])

    spec = Spec(reference=reference.lion, source="lion-pytorch",
                cases=({}, dict(betas=(0.5, 0.9))),
                group_hp=(dict(lr=1e-3), dict(lr=3e-4, betas=(0.8, 0.95)), dict(lr=2e-3),
                          dict(lr=1e-4)),
                test_hp=dict(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1),
                program_hp=dict(lr=1e-3, weight_decay=0.1), bench_hp=dict(lr=1e-4),
                traffic=(3, 2), aot=(dict(DECOUPLED=True), 1))


Lion.__signature__ = signature_with(LionForLoop)
