"""Muon (Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks"):
torch.optim.Muon with a fused multi-tensor step, and MuonWithAuxAdam, the way it is used
(Muon for the hidden 2-D weights, AdamW for the rest, in one optimizer object).

A step per bucket (Spec.stacked, fusedopt/stacked.py): one engine pass over every param
(momentum, then the Nesterov blend: rules.muon_momentum) writes each update into a stack
of its shape; torch's Newton-Schulz iteration runs on each stack as a batch (bfloat16
matmuls, as torch's, one per stack and iteration instead of one per param); one engine
pass applies the decoupled weight decay and the update (rules.muon_update).
"""
import math

import torch

from .optimizer import FusedOptimizer
from .options import signature_with
from .spec import Spec
from .stacked import run_pass


def newton_schulz(stack, coefficients, steps, eps):
    """torch's ``_zeropower_via_newtonschulz`` on a (batch, rows, cols) stack: the same
    bfloat16 ops in the same order, batched (``bmm``/``baddbmm`` where torch calls ``mm``/
    ``addmm`` per matrix; transposed where rows > cols, as torch), its errors.  On CPU the
    batched matmuls and norms give torch's per-matrix results bit for bit
    (tests/test_muon.py checks)."""
    if steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = coefficients
    x = stack.bfloat16()
    tall = stack.size(-2) > stack.size(-1)
    if tall:
        x = x.mT
    x.div_(x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps))
    if min(x.shape[-2:]) > 1:
        x = _iterate(x, a, b, c, steps)
    else:  # a row or column: torch's 2-D ops take other kernels (gemv, dot) than a batch's
        x = torch.stack([_iterate(m, a, b, c, steps) for m in x])
    return x.mT if tall else x


def _iterate(x, a, b, c, steps):
    # torch's iteration, on one matrix (mm, addmm) or a batch (bmm, baddbmm)
    mm, addmm = (torch.mm, torch.addmm) if x.dim() == 2 else (torch.bmm, torch.baddbmm)
    for _ in range(steps):
        gram = mm(x, x.mT)
        gram = addmm(gram, gram, gram, beta=b, alpha=c)
        x = addmm(x, gram, x, beta=a)
    return x


def adjusted_lr(lr, adjust_lr_fn, shape):
    """torch's ``_adjust_lr``: lr scaled for the update's RMS by the matrix's shape."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * (0.2 * math.sqrt(max(rows, cols)))
    return lr * 1.0


def reference(p, g, st, lr=1e-3, weight_decay=0.1, momentum=0.95, nesterov=True,
              ns_coefficients=(3.4445, -4.7750, 2.0315), eps=1e-7, ns_steps=5,
              adjust_lr_fn=None, **hp):
    """Muon in float64, from the paper: B = mu B + (1 - mu) g (torch's lerp form of
    momentum), the Nesterov blend, ns_steps quintic Newton-Schulz steps (no bfloat16),
    decoupled weight decay and the shape-adjusted lr."""
    buf = st["momentum_buffer"] = momentum * st.get("momentum_buffer", 0 * g) + (1 - momentum) * g
    u = (1 - momentum) * g + momentum * buf if nesterov else buf
    x = u.T if u.shape[0] > u.shape[1] else u
    x = x / max(float(x.norm()), eps)
    a, b, c = ns_coefficients
    for _ in range(ns_steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    p.mul_(1 - lr * weight_decay).sub_(adjusted_lr(lr, adjust_lr_fn, p.shape)
                                       * (x.T if u.shape[0] > u.shape[1] else x))


class Muon(FusedOptimizer, torch.optim.Muon):
    """Drop-in for ``torch.optim.Muon`` (2-D params only; ``nesterov``, ``ns_coefficients``,
    ``eps``, ``ns_steps``, ``adjust_lr_fn`` as torch): the same constructor, defaults,
    errors and ``state_dict`` (``momentum_buffer``).  A step: one fused engine pass for the
    momentum and Nesterov blend over all params, torch's bfloat16 Newton-Schulz iteration
    batched over same-shape params (bit for bit torch's on CPU), one fused pass for weight
    decay and the update.  Extra keyword-only arguments: ``backend``, ``max_grad_norm``,
    ``flat``; ``l1``, ``state_dtype``, ``master_weights``, ``stochastic_rounding``,
    ``kahan_sum`` and ``gradient_release`` are refused (``ValueError`` naming them)."""
    _rule = "muon_momentum"
    _sparse_error = "Muon does not support sparse gradients"
    _has_step = False  # torch keeps the momentum buffer alone
    _refuses = ("l1", "master_weights", "stochastic_rounding", "state_dtype", "kahan_sum",
                "gradient_release")

    def _slots(self, group):
        return ("momentum_buffer", None, None)

    def _flags(self, group):
        return {"NESTEROV": bool(group["nesterov"])}

    def _inplace_updates(self, group):
        return 2  # torch: param.mul_ (always), param.add_

    def _pass_flags(self, group, **engine):
        # the group's flags and the pass's own
        fl = dict(self._all_flags(group), **engine)
        return tuple(sorted(fl.items()))

    def _stacked_step(self, bucket, group, gptr, amp):
        inv, _, scaled = amp  # (GradScaler's 1 / scale and clipping: in the first pass)
        st, mom, lr = bucket.stacks, group["momentum"], group["lr"]
        if torch.is_tensor(lr):  # torch's _to_scalar: its coefficients in the tensor's dtype
            lr = lr.squeeze()
        co = dict(w=1 - mom, m=mom, one=1.0)
        if inv is not None:
            co["grad_scale"] = float(inv) if inv.device.type == "cpu" else inv.to(bucket.device)
        aligned = bucket.aligned and st.aligned and not (gptr % 16).any()
        run_pass(bucket, "muon_momentum", self._pass_flags(group, SCALE_GRAD=inv is not None,
                 WRITE_GRAD=scaled), st.U, gptr, bucket.mask, co, aligned)
        for _, _, buf in st.groups:
            buf.copy_(newton_schulz(buf, group["ns_coefficients"], group["ns_steps"],
                                    group["eps"]))
        step = st.per_param([-float(adjusted_lr(lr, group["adjust_lr_fn"], s))
                             for s, _, _ in st.groups])
        run_pass(bucket, "muon_update", self._pass_flags(group, NESTEROV=False), bucket.P, st.U,
                 0, dict(decay=float(1 - lr * group["weight_decay"]), step=step), aligned)

    spec = Spec(reference=reference, source="torch.optim.Muon", stacked=True, maximize=False,
                complex_params=False,
                cases=({}, dict(nesterov=False), dict(adjust_lr_fn="match_rms_adamw"),
                       dict(momentum=0.3, ns_steps=3)),
                group_hp=(dict(lr=2e-2), dict(lr=1e-2, momentum=0.9), dict(lr=5e-3),
                          dict(lr=2e-2, adjust_lr_fn="original")),
                shapes=([(1, 1), (7, 3), (3, 7), (7, 3)], [(64, 32), (33, 17)],
                        [(5, 5), (300, 2), (1, 300)], [(4, 3)] * 8),
                test_hp=dict(lr=2e-2, weight_decay=0.05), program_hp=dict(lr=2e-2),
                bench_hp=dict(lr=2e-2), traffic=(3, 2), ulp=2, ulp_dtype=torch.bfloat16,
                aot=(dict(NESTEROV=True), 1))


Muon.__signature__ = signature_with(torch.optim.Muon)


# KellerJordan/Muon's MuonWithAuxAdam defaults, per kind of group
MUON_DEFAULTS = dict(lr=0.02, momentum=0.95, weight_decay=0.0)
ADAM_DEFAULTS = dict(lr=3e-4, betas=(0.9, 0.95), eps=1e-10, weight_decay=0.0)


class MuonWithAuxAdam(torch.optim.Optimizer):
    """Muon for the groups marked ``use_muon=True``, AdamW for the others, stepped as one
    optimizer (as KellerJordan/Muon's ``MuonWithAuxAdam``; ``muon_param_groups`` makes the
    groups): a ``fusedopt.Muon`` and a ``fusedopt.AdamW`` inside, each one fused step.  A
    Muon group's keys are ``torch.optim.Muon``'s (defaults lr=0.02, momentum=0.95,
    weight_decay=0), an AdamW group's ``torch.optim.AdamW``'s (defaults lr=3e-4,
    betas=(0.9, 0.95), eps=1e-10, weight_decay=0); ``options`` (``backend``,
    ``max_grad_norm``, ``flat``) go to both.  ``param_groups`` are the groups in the order
    given (schedulers see them all); ``state_dict`` is torch's format over them, each
    group keeping ``use_muon``.  With ``max_grad_norm`` each part clips by its own
    gradients' norm."""
    _step_supports_amp_scaling = True  # GradScaler's unscale: in each part's kernel

    def __init__(self, param_groups, **options):
        from .adam import AdamW
        groups = [dict(g) for g in param_groups]
        for g in groups:
            if "use_muon" not in g:
                raise ValueError("MuonWithAuxAdam: every param group needs use_muon=True or False")
            for k, v in (MUON_DEFAULTS if g["use_muon"] else ADAM_DEFAULTS).items():
                g.setdefault(k, v)
        # the parts, and each group's place in one of them
        self._order = [(bool(g["use_muon"]), sum(h["use_muon"] == g["use_muon"] for h in groups[:i]))
                       for i, g in enumerate(groups)]
        muon = [g for g in groups if g["use_muon"]]
        adam = [g for g in groups if not g["use_muon"]]
        self.muon = Muon(muon, **options) if muon else None
        self.adam = AdamW(adam, **options) if adam else None
        self.defaults = {}
        self._optimizer_step_pre_hooks, self._optimizer_step_post_hooks = {}, {}
        self._optimizer_state_dict_pre_hooks, self._optimizer_state_dict_post_hooks = {}, {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}
        self._zero_grad_profile_name = "Optimizer.zero_grad#MuonWithAuxAdam.zero_grad"

    def _parts(self):
        return [o for o in (self.muon, self.adam) if o is not None]

    def _part(self, use_muon):
        return self.muon if use_muon else self.adam

    @property
    def param_groups(self):
        return [self._part(m).param_groups[j] for m, j in self._order]

    @property
    def state(self):
        return {p: s for o in self._parts() for p, s in o.state.items()}

    @torch.no_grad()
    def step(self, closure=None):
        """One step of both parts (``closure``: as torch.optim's, run once)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        amp = {k: self.__dict__[k] for k in ("grad_scale", "found_inf") if k in self.__dict__}
        for o in self._parts():
            o.__dict__.update(amp)
            try:
                o.step()
            finally:
                for k in amp:
                    o.__dict__.pop(k, None)
        return loss

    def zero_grad(self, set_to_none=True):
        for o in self._parts():
            o.zero_grad(set_to_none)

    def state_dict(self):
        """torch.optim's format over the groups in their order (param ids counted across
        them), each group with its ``use_muon``."""
        sds = {m: self._part(m).state_dict() for m in (True, False) if self._part(m)}
        out, k = {"state": {}, "param_groups": []}, 0
        for m, j in self._order:
            g = dict(sds[m]["param_groups"][j])
            ids = list(range(k, k + len(g["params"])))
            for old, new in zip(g["params"], ids):
                if old in sds[m]["state"]:
                    out["state"][new] = sds[m]["state"][old]
            out["param_groups"].append({**g, "params": ids, "use_muon": m})
            k += len(ids)
        return out

    def load_state_dict(self, state_dict):
        """Load what ``state_dict`` made (its groups in this optimizer's order)."""
        gs = state_dict["param_groups"]
        if len(gs) != len(self._order) or any(
                bool(g.get("use_muon")) != m for g, (m, _) in zip(gs, self._order)):
            raise ValueError("loaded state dict's groups do not match this optimizer's "
                             "(their number or their use_muon)")
        for m in (True, False):
            if self._part(m) is None:
                continue
            mine = [g for g, (u, _) in zip(gs, self._order) if u == m]
            ids, k = [], 0
            groups = []
            for g in mine:
                new = list(range(k, k + len(g["params"])))
                ids += list(zip(g["params"], new))
                groups.append({**g, "params": new})
                k += len(new)
            state = {new: state_dict["state"][old] for old, new in ids if old in state_dict["state"]}
            self._part(m).load_state_dict({"state": state, "param_groups": groups})

    def __repr__(self):
        return f"MuonWithAuxAdam(\n muon={self.muon!r},\n adam={self.adam!r})"


def muon_param_groups(model, exclude=("embed", "wte", "wpe", "lm_head", "head"), muon=None,
                      adam=None):
    """``model``'s params as MuonWithAuxAdam's groups: Muon for the hidden 2-D weights (the
    weights of its body's layers), AdamW for the rest (embeddings: an ``nn.Embedding``'s
    weight, params whose name contains one of ``exclude``: the head, the input embedding;
    and every param of other than 2 dims: gains, biases), as KellerJordan/Muon splits
    them.  ``muon``, ``adam``: each group's hyperparameters (a dict).  A param shared by
    two modules (tied embeddings) is counted once."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    hidden, rest = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        body = p.ndim == 2 and id(p) not in embeddings and not any(e in name for e in exclude)
        (hidden if body else rest).append(p)
    return [g for g in (dict(params=hidden, use_muon=True, **(muon or {})),
                        dict(params=rest, use_muon=False, **(adam or {}))) if g["params"]]
