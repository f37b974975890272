"""AdEMAMix (Pagliardini, Ablin and Grangier, 2024, "The AdEMAMix Optimizer: Better, Faster,
Older"): Adam whose update adds ``alpha`` times a slow momentum (``beta3``) to the fast one,
as the pytorch-optimizer package has it (``pytorch_optimizer.AdEMAMix``, 4.1), which torch
lacks.  ``AdEMAMixForLoop`` is that class's one-tensor-at-a-time step in torch ops and its
constructor, defaults, state format (``exp_avg``, ``exp_avg_sq``, ``exp_avg_slow``; the step
counter in ``group["step"]``, an int) and errors; it plays the part torch.optim's classes
play for the others (parity anchor, fallback).  ``AdEMAMix`` is the fused step.

Differences from the package: ``p.grad`` is left as it was (the package negates it in place
under ``maximize`` and adds ``weight_decay * p`` to it under coupled weight decay); a
group's own ``"maximize"`` key (which the package ignores) overrides the constructor's; its
``cautious``, ``stable_adamw`` (per-tensor reductions) and ``capturable`` (the counter is a
Python int) are refused.  float32 arithmetic: the package's per-tensor path, which its
default foreach path runs op for op on CPU (fusedopt/ademamix.py tests both)."""
import math

import torch

from .arith import decoupled
from .optimizer import FusedOptimizer, closure_loss
from .options import signature_with
from .reference import _regularize
from .spec import Spec


class NoSparseGradientError(Exception):  # pytorch_optimizer.base.exception's, by name and text
    def __init__(self, optimizer_name):
        super().__init__(f"{optimizer_name} does not support sparse gradient.")


class NoComplexParameterError(Exception):
    def __init__(self, optimizer_name):
        super().__init__(f"{optimizer_name} does not support complex parameter.")


class NegativeLRError(Exception):
    def __init__(self, lr):
        super().__init__(f"learning rate must be positive. ({lr} > 0)")


def schedules(group, step):
    """(bias_correction1, sqrt(bias_correction2), alpha_t, beta3_t) as the package computes
    them for ``step`` (its debias, schedule_alpha and schedule_beta3), in float64."""
    (beta1, beta2, beta3), alpha, t = group["betas"], group["alpha"], group["t_alpha_beta3"]
    if t is not None:
        alpha = min(step * alpha / t, alpha)
        lb1, lb3 = math.log(beta1), math.log(beta3)
        beta3 = min(math.exp(lb1 * lb3 / ((1.0 - step / t) * lb3 + (step / t) * lb1)), beta3)
    return 1.0 - math.pow(beta1, step), math.sqrt(1.0 - math.pow(beta2, step)), alpha, beta3


class AdEMAMixForLoop(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999, 0.9999), weight_decay=0.0,
                 weight_decouple=False, fixed_decay=False, alpha=5.0, t_alpha_beta3=None,
                 eps=1e-8, maximize=False, foreach=None, **kwargs):
        if lr is not None and lr < 0.0:
            raise NegativeLRError(lr)
        for i, beta in enumerate(betas[:3]):  # beta3 may be 1
            if beta is not None and not (0.0 <= beta < 1.0 or i == 2 and beta == 1.0):
                raise ValueError(f"beta{i + 1} must be in the range [0.0, 1.0{')]'[i == 2]}")
        for name, x in (("alpha", alpha), ("t_alpha_beta3", t_alpha_beta3),
                        ("weight_decay", weight_decay), ("eps", eps)):
            if x is not None and x < 0.0:
                raise ValueError(f"{name} must be non-negative")
        for k in ("cautious", "stable_adamw", "capturable"):
            if kwargs.get(k):
                raise ValueError(f"fusedopt.AdEMAMix does not support {k}=True")
        self.maximize, self.foreach = maximize, foreach
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      weight_decouple=weight_decouple, fixed_decay=fixed_decay,
                                      alpha=alpha, t_alpha_beta3=t_alpha_beta3, eps=eps,
                                      foreach=foreach, **kwargs))

    def __str__(self):
        return "AdEMAMix"

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        for group in self.param_groups:
            live = [p for p in group["params"] if p.grad is not None]
            for p in live:  # the package's init_group
                if p.grad.is_sparse:
                    raise NoSparseGradientError("AdEMAMix")
                if torch.is_complex(p):
                    raise NoComplexParameterError("AdEMAMix")
                if not self.state[p]:
                    for k in ("exp_avg", "exp_avg_sq", "exp_avg_slow"):
                        self.state[p][k] = torch.zeros_like(p)
            group["step"] = step = group.get("step", 0) + 1
            (beta1, beta2, _), lr, wd = group["betas"], group["lr"], group["weight_decay"]
            bc1, bc2_sqrt, alpha, beta3 = schedules(group, step)
            for p in live:
                g = -p.grad if group.get("maximize", self.maximize) else p.grad
                if wd != 0.0 and group["weight_decouple"]:
                    p.mul_(1.0 - wd * (1.0 if group["fixed_decay"] else lr))
                elif wd != 0.0:
                    g = g.add(p, alpha=wd)
                m, v, s = (self.state[p][k] for k in ("exp_avg", "exp_avg_sq", "exp_avg_slow"))
                m.lerp_(g, weight=1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                s.lerp_(g, weight=1.0 - beta3)
                denom = v.sqrt().div_(bc2_sqrt).add_(group["eps"])
                update = m.div(bc1).add_(s, alpha=alpha)
                if p.dtype in (torch.float16, torch.bfloat16):
                    p.add_(update.div_(denom), alpha=-lr)
                else:
                    p.addcdiv_(update, denom, value=-lr)
        return loss


def reference(p, g, st, lr=1e-3, betas=(0.9, 0.999, 0.9999), weight_decay=0.0,
              weight_decouple=False, fixed_decay=False, alpha=5.0, t_alpha_beta3=None,
              eps=1e-8, **hp):
    """The paper's Algorithm 1 in float64, with its alpha and beta3 warmups (alpha linear,
    beta3 linear in half-life) and the package's weight decay (coupled, or p scaled by
    1 - lr * wd, or by 1 - wd with fixed_decay)."""
    beta1, beta2, beta3 = betas
    t = st["step"] = st.get("step", 0) + 1
    if t_alpha_beta3 is not None:
        f, (l1, l3) = t / t_alpha_beta3, (math.log(beta1), math.log(beta3))
        alpha, beta3 = min(f * alpha, alpha), min(math.exp(l1 * l3 / ((1 - f) * l3 + f * l1)), beta3)
    if weight_decouple:
        p.mul_(1 - weight_decay * (1 if fixed_decay else lr))
    g = _regularize(p, g, {**hp, "weight_decay": 0 if weight_decouple else weight_decay})
    m = st["exp_avg"] = beta1 * st.get("exp_avg", 0 * p) + (1 - beta1) * g
    v = st["exp_avg_sq"] = beta2 * st.get("exp_avg_sq", 0 * p) + (1 - beta2) * g * g
    s = st["exp_avg_slow"] = beta3 * st.get("exp_avg_slow", 0 * p) + (1 - beta3) * g
    p.sub_(lr * (m / (1 - beta1 ** t) + alpha * s) / ((v / (1 - beta2 ** t)).sqrt() + eps))


class AdEMAMix(FusedOptimizer, AdEMAMixForLoop):
    """AdEMAMix (Pagliardini, Ablin and Grangier, 2024), a drop-in for
    ``pytorch_optimizer.AdEMAMix``: ``lr=1e-3, betas=(0.9, 0.999, 0.9999),
    weight_decay=0.0, weight_decouple=False, fixed_decay=False, alpha=5.0,
    t_alpha_beta3=None, eps=1e-8``, the package's errors and state_dict (``exp_avg``,
    ``exp_avg_sq``, ``exp_avg_slow``; the counter in ``group["step"]``). Adam's moments plus
    a slow one; the update ``(m / bc1 + alpha * m_slow) / (sqrt(v) / sqrt(bc2) + eps)``, with
    ``alpha`` and ``beta3`` warmed up over ``t_alpha_beta3`` steps. Its twin is
    ``fusedopt.ademamix.AdEMAMixForLoop`` (the package's per-tensor step). Unlike the
    package it leaves ``p.grad`` as it was and honours a group's own ``maximize``; it refuses
    ``cautious``, ``stable_adamw`` and ``capturable`` by name. One fused multi-tensor step
    per (device, dtype) group (Numba on CPU, Triton on CUDA). Extra keyword-only arguments:
    ``backend``, ``l1``, ``max_grad_norm``, ``state_dtype``, ``master_weights``,
    ``stochastic_rounding``, ``kahan_sum``, ``flat``, ``gradient_release``: the Options page
    of the documentation (``docs/options.md``)."""
    _rule = "ademamix"
    _has_step = False  # its counter is group["step"], as the package's
    _OWN = FusedOptimizer._OWN + ("maximize", "foreach")  # (pickled: the package loses them)

    def _slots(self, group):
        return ("exp_avg", "exp_avg_sq", "exp_avg_slow")

    def _flags(self, group):
        return {"DECOUPLED": bool(group["weight_decouple"])}

    def _maximize(self, group):
        return bool(group.get("maximize", self.maximize))

    def _inplace_updates(self, group):  # p.mul_ for decoupled weight decay, then p.addcdiv_
        return 2 if group["weight_decouple"] and group["weight_decay"] != 0 else 1

    def _sparse_step(self, group, params):
        raise NoSparseGradientError("AdEMAMix")

    def _step_group(self, group, amp=(None, None, False), plans=None):
        if self._gradient_release and plans is None and all(p.grad is None for p in group["params"]):
            return  # step() after a released backward: its buckets moved the count (release.py)
        super()._step_group(group, amp, plans)  # (the fallback's twin counts on a copy of group)
        group["step"] = group.get("step", 0) + 1

    def _coefficients(self, group, step, f64):
        lr, (beta1, beta2, _), wd = group["lr"], group["betas"], group["weight_decay"]
        bc1, bc2_sqrt, alpha, beta3 = schedules(group, group.get("step", 0) + 1)
        if group["weight_decouple"]:
            wd = decoupled(1.0 if group["fixed_decay"] else lr, wd)
        return dict(wd=wd, l1=group["l1"], w=1.0 - beta1, beta2=beta2, beta2_rest=1.0 - beta2,
                    w3=1.0 - beta3, bc1=bc1, bc2_sqrt=bc2_sqrt, eps=group["eps"], alpha=alpha,
                    lr=lr, one=1.0)

    spec = Spec(reference=reference, source="pytorch_optimizer.AdEMAMix",
                cases=({}, dict(weight_decouple=True), dict(weight_decouple=True, fixed_decay=True)),
                group_hp=(dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.99, 0.999), t_alpha_beta3=8),
                          dict(lr=2e-3, betas=(0.3, 0.9, 0.4), alpha=2.0),
                          dict(lr=1e-2, betas=(0.5, 0.95, 0.99), t_alpha_beta3=30, eps=1e-6)),
                fp16_eps=True, test_hp=dict(lr=1e-2, weight_decay=0.1, t_alpha_beta3=10),
                program_hp=dict(lr=1e-2, t_alpha_beta3=5), bench_hp=dict(lr=1e-3),
                unsigned=frozenset({"exp_avg_sq"}), traffic=(5, 4), complex_params=False,
                aot=(dict(L1=True), 7))


AdEMAMix.__signature__ = signature_with(AdEMAMixForLoop)
