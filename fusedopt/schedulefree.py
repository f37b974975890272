"""Schedule-Free AdamW and SGD (Defazio et al., 2024, "The Road Less Scheduled"), as the
schedulefree package (1.4) has them (``schedulefree.AdamWScheduleFree``,
``schedulefree.SGDScheduleFree``), which torch lacks.  The param holds y, the point the
gradient is taken at; the state holds z (``"z"``, the SGD/Adam iterate) and, for AdamW,
``"exp_avg_sq"``; x, the average evaluated in ``eval()``, is never stored: ``eval()`` moves
the param from y to x, ``train()`` back.  The per-group schedule (``k``, ``weight_sum``,
``lr_max``, ``scheduled_lr``, ``train_mode``) lives in the param groups, as the package's.

``<Name>ForLoop`` is the package's per-tensor step in torch ops (its constructor, defaults,
errors, state format; the parity anchor and the fallback), ``<Name>`` the fused step.
Differences from the package: ``p.grad`` is left as it was (the package divides it by the
denominator and adds the weight decay to it in place); a group's own ``"maximize"`` key
(which the package ignores) negates the gradient; ``state_dtype``, ``master_weights`` and
``stochastic_rounding`` are refused (z is a second copy of the weights: 8-bit codes of it
would quantize the iterate itself, and master weights would need a master copy of z and a
swap through both).
"""
import numpy as np
import torch

from . import host
from .bucket import _Bucket
from .kernels import rules
from .kernels.coefficients import pack
from .optimizer import FusedOptimizer, closure_loss
from .options import signature_with
from .plan import GroupSpec, _memory, _sharing, _unfit
from .reference import _regularize
from .spec import Spec

NOT_TRAINING = ("Optimizer was not in train mode when step is called. Please insert .train() "
                "and .eval() calls on the optimizer. See documentation for details.")
_FOREACH = hasattr(torch, "_foreach_mul_")  # the package's default for foreach


def schedule(group):
    """(the group keys this step sets, lr with warmup, ckp1), in float64 as the package
    computes them; ``group["k"]`` is the count of steps before this one."""
    k, warmup = group["k"], group["warmup_steps"]
    lr = group["lr"] * ((k + 1) / warmup if k < warmup else 1.0)
    if torch.is_tensor(lr):  # the package's max(), without its host sync (a tensor's bool)
        lr_max = torch.maximum(lr, torch.as_tensor(group["lr_max"], dtype=lr.dtype,
                                                   device=lr.device))
    else:
        lr_max = max(lr, group["lr_max"])
    weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
    weight_sum = group["weight_sum"] + weight
    try:
        ckp1 = weight / weight_sum
    except ZeroDivisionError:  # lr 0 so far: no weight yet, y stays put
        ckp1 = 0
    return dict(scheduled_lr=lr, lr_max=lr_max, weight_sum=weight_sum), lr, ckp1


class _ScheduleFreeForLoop(torch.optim.Optimizer):
    """The package's train()/eval() and mode check; subclasses: ``_beta1`` and ``_update``."""

    @torch.no_grad()
    def eval(self):
        for group in self.param_groups:
            if group["train_mode"]:
                for p in group["params"]:
                    if "z" in self.state[p]:  # the package's: x = y + (1 - 1/beta1)(z - y)
                        p.lerp_(end=self.state[p]["z"].to(p.device),
                                weight=1 - 1 / self._beta1(group))
                group["train_mode"] = False

    @torch.no_grad()
    def train(self):
        for group in self.param_groups:
            if not group["train_mode"]:
                for p in group["params"]:
                    if "z" in self.state[p]:  # y = x + (1 - beta1)(z - x)
                        p.lerp_(end=self.state[p]["z"].to(p.device), weight=1 - self._beta1(group))
                group["train_mode"] = True

    @torch.no_grad()
    def step(self, closure=None):
        if not self.param_groups[0]["train_mode"]:
            raise Exception(NOT_TRAINING)
        loss = closure_loss(closure)
        for group in self.param_groups:
            keys, lr, ckp1 = schedule(group)
            group.update(keys)
            live = [p for p in group["params"] if p.grad is not None]
            for p in live:
                if "z" not in self.state[p]:
                    self._init(p, self.state[p])
            for p in live:
                g = -p.grad if group.get("maximize", False) else p.grad
                self._update(group, p, g, self.state[p], lr, ckp1)
            group["k"] = group["k"] + 1
        return loss

    def _init(self, p, st):
        st["z"] = torch.clone(p, memory_format=torch.preserve_format)


class AdamWScheduleFreeForLoop(_ScheduleFreeForLoop):
    def __init__(self, params, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                 warmup_steps=0, r=0.0, weight_lr_power=2.0, foreach=_FOREACH):
        super().__init__(params, dict(
            lr=lr, betas=betas, eps=eps, r=r, k=0, warmup_steps=warmup_steps, train_mode=False,
            weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0, weight_lr_power=weight_lr_power,
            weight_decay=weight_decay, foreach=foreach))

    @staticmethod
    def _beta1(group):
        return group["betas"][0]

    def _init(self, p, st):
        super()._init(p, st)
        st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)

    def _update(self, group, y, g, st, lr, ckp1):
        (beta1, beta2), decay = group["betas"], group["weight_decay"]
        z, v = st["z"], st["exp_avg_sq"]
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        denom = v.div(1 - beta2 ** (group["k"] + 1)).sqrt_().add_(group["eps"])
        g = g.div(denom)  # (the package divides p.grad in place)
        if decay != 0:
            g.add_(y, alpha=decay)  # weight decay at y
        y.lerp_(end=z, weight=ckp1)
        y.add_(g, alpha=lr * (beta1 * (1 - ckp1) - 1))
        z.add_(g, alpha=-lr)  # the package's z.sub_(g, alpha=lr): torch's same op


class SGDScheduleFreeForLoop(_ScheduleFreeForLoop):
    def __init__(self, params, lr=1.0, momentum=0.9, weight_decay=0, warmup_steps=0, r=0.0,
                 weight_lr_power=2, foreach=_FOREACH):
        if lr < 0.0:
            raise ValueError("Invalid learning rate: {}".format(lr))
        if weight_decay < 0.0:
            raise ValueError("Invalid weight_decay value: {}".format(weight_decay))
        if momentum <= 0 or momentum >= 1:
            raise ValueError("Momentum must be between 0 and 1 exclusive: {}".format(momentum))
        super().__init__(params, dict(
            lr=lr, momentum=momentum, r=r, k=0, warmup_steps=warmup_steps, train_mode=False,
            weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0, weight_lr_power=weight_lr_power,
            weight_decay=weight_decay, foreach=foreach))

    @staticmethod
    def _beta1(group):
        return group["momentum"]

    def _update(self, group, y, g, st, lr, ckp1):
        momentum, decay, z = group["momentum"], group["weight_decay"], st["z"]
        if decay != 0:
            g = g.add(y, alpha=decay)  # (the package adds it to p.grad in place)
        y.lerp_(end=z, weight=ckp1)
        y.add_(g, alpha=lr * (momentum * (1 - ckp1) - 1))
        z.add_(g, alpha=-lr)


def _weights(st, lr, warmup_steps, r, weight_lr_power):
    # the paper's c_{t+1} = w_t / sum(w), w_t = t**r * max(lr so far)**weight_lr_power
    t = st["k"] = st.get("k", 0) + 1
    lr = lr * min(1.0, t / warmup_steps) if warmup_steps else lr
    lr_max = st["lr_max"] = max(lr, st.get("lr_max", -1.0))
    w = t ** r * lr_max ** weight_lr_power
    total = st["weight_sum"] = st.get("weight_sum", 0.0) + w
    return t, lr, (w / total if total else 0.0)


def _average(p, st, u, lr, c, beta):
    # z -= lr * u; x = (1 - c) x + c z; the param is y = (1 - beta) z + beta x
    if "z" not in st:
        st["z"], st["x"] = p.clone(), p.clone()
    st["z"] = st["z"] - lr * u
    st["x"] = (1 - c) * st["x"] + c * st["z"]
    p.copy_((1 - beta) * st["z"] + beta * st["x"])


def reference_adamw(p, g, st, lr=0.0025, betas=(0.9, 0.999), eps=1e-8, weight_decay=0,
                    warmup_steps=0, r=0.0, weight_lr_power=2.0, **hp):
    """Schedule-Free AdamW (the paper's Algorithm 1 with Adam's normalization, warmup and
    lr-weighted averaging as the package has them) in float64, x and z kept explicitly."""
    t, lr, c = _weights(st, lr, warmup_steps, r, weight_lr_power)
    g = _regularize(p, g, {**hp, "weight_decay": 0})
    v = st["exp_avg_sq"] = betas[1] * st.get("exp_avg_sq", 0 * p) + (1 - betas[1]) * g * g
    u = g / ((v / (1 - betas[1] ** t)).sqrt() + eps) + weight_decay * p
    _average(p, st, u, lr, c, betas[0])


def reference_sgd(p, g, st, lr=1.0, momentum=0.9, weight_decay=0, warmup_steps=0, r=0.0,
                  weight_lr_power=2, **hp):
    """Schedule-Free SGD in float64, x and z kept explicitly."""
    _, lr, c = _weights(st, lr, warmup_steps, r, weight_lr_power)
    _average(p, st, _regularize(p, g, {**hp, "weight_decay": weight_decay}), lr, c, momentum)


class _ScheduleFree(FusedOptimizer):
    """The fused step and the fused train()/eval() swap (one engine call per device and
    dtype); the schedule is computed per group on the host, as the package does."""
    _has_step = False  # the counter is group["k"], as the package's
    # gradient_release: the schedule (k, weight_sum, lr_max) is one per group, moved once
    # per step, and step() checks train mode: a bucket stepped from a hook has neither
    _refuses = ("master_weights", "state_dtype", "stochastic_rounding", "kahan_sum",
                "gradient_release")
    _now = None  # this group's step's coefficients (lr with warmup, ckp1, ...)

    def _inplace_updates(self, group):
        return 2  # y.lerp_, y.add_

    def _sparse_step(self, group, params):
        self._torch_step(group, params, None, None, False)  # the package's result or error

    def _torch_step(self, group, params, *amp):
        # the twin checks the mode of its first group, which is this one alone here: the
        # package checks group 0's once per step (done), whatever this group's mode
        super()._torch_step({**group, "train_mode": True}, params, *amp)

    @torch.no_grad()
    def step(self, closure=None):
        # before the closure, as the package; under torch.compile in the opaque step
        # (_eager_step): reading param_groups in the traced code would guard on them
        if not torch.compiler.is_compiling() and not self.param_groups[0]["train_mode"]:
            raise Exception(NOT_TRAINING)
        return super().step(closure)

    def _eager_step(self):
        if not self.param_groups[0]["train_mode"]:
            raise Exception(NOT_TRAINING)
        super()._eager_step()

    def _step_group(self, group, amp=(None, None, False)):
        keys, lr, ckp1 = schedule(group)
        self._now = self._scalars_of(group, lr, ckp1)
        self._fill(group)
        # (the fallback's twin steps a copy of group, from the keys as they were)
        super()._step_group(group, amp)
        group.update(keys)
        group["k"] = group["k"] + 1

    def _fill(self, group):
        # z starts as a copy of the param (the plan makes zeros): made here, before a plan
        # is built; a plan still valid for every param of the group was built after it
        params, plan = group["params"], self._plans.get(id(group))
        if plan is not None and plan.valid(self.state, group, params, None, self._slots(group)):
            return
        for p in params:
            if p.grad is not None and "z" not in self.state[p]:
                self._init(p, self.state[p])

    def _coefficients(self, group, step, f64):
        return dict(self._now, wd=group["weight_decay"], l1=group["l1"], one=1.0)

    @torch.no_grad()
    def eval(self):
        self._swap(False)

    @torch.no_grad()
    def train(self):
        self._swap(True)

    def _swap(self, to_train):
        for group in self.param_groups:
            if bool(group["train_mode"]) == to_train:
                continue
            beta1 = self._beta1(group)
            w = 1 - beta1 if to_train else 1 - 1 / beta1
            params = [p for p in group["params"] if "z" in self.state[p]]
            if params:
                self._swap_params(group, params, w)
            group["train_mode"] = to_train

    def _swap_params(self, group, params, w):
        """p.lerp_(z, w) for every param: one engine call per device and dtype; a param the
        engines cannot take (its z on another device, of another dtype or shape, memory
        shared with another param) through torch's own lerp_."""
        spec = GroupSpec(name=type(self).__name__, slots=("z", None, None), has_step=False,
                         scalars=(), needs_state=True, init_state=None, factored=False,
                         real_only=False, backend=self._backend,
                         index=next(i for i, g in enumerate(self.param_groups) if g is group))
        states = [self.state[p] for p in params]
        bad = {i for i, (p, st) in enumerate(zip(params, states)) if _unfit(spec, group, p, p, st)}
        idx = [i for i in range(len(params)) if i not in bad]
        for k in _sharing(idx, _memory(self.state, params, idx, True)):
            bad.add(idx[k])
        order = {}
        for i in range(len(params)):
            if i not in bad:
                order.setdefault((params[i].device, params[i].dtype), []).append(i)
        flags = tuple((k, False) for k in sorted(rules.FLAGS))  # the swap has none
        for idx in order.values():
            bucket = _Bucket(spec, group, [params[i] for i in idx], [states[i] for i in idx],
                             set(), idx)
            host.bump([params[i] for i in idx], 1)
            gptr = np.array([t.data_ptr() for t in bucket.tensors[0]], dtype=np.int64)
            bucket.run("schedulefree_swap", flags, gptr, pack("schedulefree_swap",
                                                                dict(w=w, one=1.0)))
        for i in sorted(bad):
            params[i].lerp_(end=states[i]["z"].to(params[i].device), weight=w)


_GROUPS = (dict(lr=1e-2), dict(lr=3e-3, warmup_steps=8, r=1.0), dict(lr=2e-2, weight_lr_power=0.0),
           dict(lr=5e-3, warmup_steps=30))


class AdamWScheduleFree(_ScheduleFree, AdamWScheduleFreeForLoop):
    """Schedule-Free AdamW (Defazio et al., 2024), a drop-in for
    ``schedulefree.AdamWScheduleFree``: ``lr=0.0025, betas=(0.9, 0.999), eps=1e-8,
    weight_decay=0, warmup_steps=0, r=0.0, weight_lr_power=2.0``; call ``train()`` before
    training and ``eval()`` before evaluating or saving (``step`` raises the package's error
    outside train mode).  State ``z``, ``exp_avg_sq``; the schedule in the group keys ``k``,
    ``weight_sum``, ``lr_max``, ``scheduled_lr``, ``train_mode``.  Its twin is
    ``fusedopt.schedulefree.AdamWScheduleFreeForLoop``.  Unlike the package it leaves
    ``p.grad`` as it was and honours a group's own ``maximize``; it refuses ``state_dtype``,
    ``master_weights`` and ``stochastic_rounding``.  One fused multi-tensor step, and one
    fused ``train()``/``eval()`` swap, per (device, dtype) group (Numba on CPU, Triton on
    CUDA).  Extra keyword-only arguments: ``backend``, ``l1``, ``max_grad_norm``, ``flat``
    (``docs/options.md``)."""
    _rule = "schedulefree_adamw"

    def _slots(self, group):
        return ("z", "exp_avg_sq", None)

    def _flags(self, group):
        return {"DECOUPLED": True}  # weight decay at y, after the normalization: in the rule

    def _scalars_of(self, group, lr, ckp1):
        beta1, beta2 = group["betas"]
        return dict(beta2=beta2, beta2_rest=1 - beta2, bc2=1 - beta2 ** (group["k"] + 1),
                    eps=group["eps"], ckp1=ckp1, y_step=lr * (beta1 * (1 - ckp1) - 1), lr=lr)

    spec = Spec(reference=reference_adamw, source="schedulefree.AdamWScheduleFree",
                cases=({}, dict(betas=(0.3, 0.99))), group_hp=_GROUPS, fp16_eps=True,
                test_hp=dict(lr=1e-2, weight_decay=0.1, warmup_steps=3),
                program_hp=dict(lr=1e-2, warmup_steps=3), bench_hp=dict(lr=2.5e-3),
                unsigned=frozenset({"exp_avg_sq"}), traffic=(4, 3), complex_params=False,
                train_mode=True,
                aot=(dict(L1=True, DECOUPLED=True), 3))


class SGDScheduleFree(_ScheduleFree, SGDScheduleFreeForLoop):
    """Schedule-Free SGD (Defazio et al., 2024), a drop-in for
    ``schedulefree.SGDScheduleFree``: ``lr=1.0, momentum=0.9, weight_decay=0,
    warmup_steps=0, r=0.0, weight_lr_power=2``, the package's errors; ``train()`` /
    ``eval()`` as ``AdamWScheduleFree``.  State ``z``; group keys as the package's.  Its
    twin is ``fusedopt.schedulefree.SGDScheduleFreeForLoop``; differences from the package
    and refused options as ``AdamWScheduleFree``'s."""
    _rule = "schedulefree_sgd"

    def _slots(self, group):
        return ("z", None, None)

    def _scalars_of(self, group, lr, ckp1):
        return dict(ckp1=ckp1, y_step=lr * (group["momentum"] * (1 - ckp1) - 1), lr=lr)

    spec = Spec(reference=reference_sgd, source="schedulefree.SGDScheduleFree",
                cases=({}, dict(momentum=0.4)), group_hp=_GROUPS,
                test_hp=dict(lr=1e-2, weight_decay=0.1, warmup_steps=3),
                program_hp=dict(lr=1e-2, warmup_steps=3), bench_hp=dict(lr=1.0),
                traffic=(3, 2), train_mode=True,
                aot=(dict(L1=True), 1))


AdamWScheduleFree.__signature__ = signature_with(AdamWScheduleFreeForLoop)
SGDScheduleFree.__signature__ = signature_with(SGDScheduleFreeForLoop)
