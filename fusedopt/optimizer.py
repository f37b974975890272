"""The shared optimizer machinery: state, mixed precision options, and dispatch.

Each fusedopt class subclasses its torch.optim twin, so the constructor, defaults,
validation errors, ``__setstate__`` and state_dict format are torch's own; this mixin
replaces ``step``.  Per param group it keeps a plan (bucket.py): the params sorted into
buckets by device and dtype, rebuilt only when the set of params with gradients
changes, or after load_state_dict / add_param_group: per step the host reads the
gradients' addresses, computes the coefficients and makes one engine call per bucket.
What the plan needs of the algorithm it gets as data (plan.GroupSpec, ``_describe``).
"""
import functools
import inspect
import weakref

import numpy as np
import torch

from . import clip, compiled, flat, host, matrix, remainder, spec
from .bucket import _GRAD, _PTR, _local, scalar_dtype
from .options import SCALER_REFUSAL, exclusive, validate
from .plan import GroupSpec, _Plan, refuse_torch
from .quant import mark_maps
from .state import State, check_loaded, keep_dtypes
from .kernels import rules
from .kernels.coefficients import pack
from .kernels.flags import Update
from .scalars import closure_loss, scaler_inputs


_SKIP = object()  # _amp(): the scaler found an inf on the CPU, nothing to do


class FusedOptimizer:
    """Mixin placed before a torch.optim class: ``class Adam(FusedOptimizer, torch.optim.Adam)``.

    Subclasses define ``_rule`` (a name in kernels/rules.py), ``_sparse_error`` and
    ``_slots``, ``_flags``, ``_coefficients`` (a new dict of the rule's coefficients by
    name: kernels/coefficients.py); ``_init_state`` only where a state entry
    starts as something other than zeros (the plan creates the slots, in the state dtype);
    a factored algorithm (Spec.factored) ``_matrix_step``, a stacked one (Spec.stacked)
    ``_stacked_step``; a trust-ratio one (Spec.trust) derives from trust.TrustOptimizer.
    """

    _rule = _sparse_error = None
    _gradient_release = False  # (an optimizer pickled before the keyword existed)
    spec = None  # fusedopt.spec.Spec: declared in each algorithm's own class body

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "spec" in cls.__dict__:
            spec.register(cls)
    # GradScaler.step then hands us grad_scale and found_inf instead of unscaling the
    # gradients in a pass of its own: the kernel unscales them (see _amp)
    _step_supports_amp_scaling = True
    _has_step = True  # torch keeps state["step"] (all but SGD)
    _refuses = ()  # of the options (master_weights, state_dtype, ...): those it lacks
    _own_clip = False  # max_grad_norm is the twin's own argument (Apex's FusedLAMB's)

    def _init_state(self, group, p, state):
        # torch's first entry; the slots are created by the plan (zeros of the state dtype)
        state["step"] = torch.tensor(0.0, dtype=scalar_dtype())

    _scalars = ()  # per-param 0-d state besides "step" (bucket.scalars)
    # whether _advance moves them before the update reads them (NAdam's mu_product, as
    # torch) or after (ASGD's eta and mu: torch's step uses last step's, then updates them)
    _advance_first = True

    def _advance(self, group, bucket, step, found_inf):
        """Move the per-param scalars of the state (``_scalars``) for this step."""

    def _describe(self, group):
        """What the plan of ``group`` needs of this algorithm (plan.GroupSpec).  Its
        state initializer holds the optimizer weakly: a plan keeps no optimizer alive."""
        slots = self._slots(group)
        init = functools.partial(type(self)._init_state, weakref.proxy(self), group)
        whole = getattr(group, "parent", group)  # a gradient-release bucket's (release._Part)
        return GroupSpec(
            name=type(self).__name__, slots=slots, has_step=self._has_step,
            scalars=tuple(self._scalars), init_state=init,
            needs_state=self._has_step or any(slots) or bool(group.get("master_weights")
                                                             or group.get("kahan_sum")),
            factored=self._is_factored(), backend=self._backend,
            real_only=self.spec is not None and not self.spec.complex_params,
            stacked=getattr(self.spec, "stacked", False), trust=getattr(self.spec, "trust", False),
            index=next(i for i, g in enumerate(self.param_groups) if g is whole),
            places=getattr(group, "places", None))

    @classmethod
    def _is_factored(cls):
        return cls.spec is not None and cls.spec.factored

    def __init__(self, *args, backend="auto", l1=0.0, max_grad_norm=None, state_dtype=None,
                 master_weights=False, stochastic_rounding=False, kahan_sum=False, flat=False,
                 gradient_release=False, **kwargs):
        if kwargs.get("differentiable"):
            raise NotImplementedError(
                f"fusedopt.{type(self).__name__} does not implement differentiable=True; "
                f"use torch.optim.{type(self).__name__} for differentiable optimizer steps")
        if self._own_clip and max_grad_norm is not None:  # the twin's own argument
            kwargs["max_grad_norm"], max_grad_norm = max_grad_norm, None
        validate(type(self).__name__, self._refuses, backend=backend, l1=l1,
                 max_grad_norm=max_grad_norm, state_dtype=state_dtype,
                 master_weights=master_weights, stochastic_rounding=stochastic_rounding,
                 kahan_sum=kahan_sum, flat=flat, gradient_release=gradient_release)
        # group keys, so that they go into state_dict and can differ between groups
        extras = dict(l1=l1, state_dtype=state_dtype, master_weights=master_weights, flat=flat,
                      stochastic_rounding=stochastic_rounding, kahan_sum=kahan_sum)
        if stochastic_rounding:  # the stream's seed: set group["sr_seed"] to change it
            extras["sr_seed"] = torch.initial_seed() & 0xFFFFFFFF
        self._max_grad_norm = max_grad_norm
        self._gradient_release = gradient_release  # release.py: steps from backward's hooks
        self.grad_norm = None  # with max_grad_norm: the last step's total gradient norm
        self._backend, self._extras = backend, extras
        super().__init__(*args, **kwargs)
        self.defaults.update(extras)
        self._register()

    @classmethod
    def twin(cls):
        """The one-tensor-at-a-time class this one replaces: torch.optim's (for Lion, which
        torch lacks, fusedopt.lion.LionForLoop).  Its step is the fallback for params the
        engines do not take, and the parity tests' anchor."""
        mro = cls.__mro__
        return mro[mro.index(FusedOptimizer) + 1]

    def _register(self):
        self._handle = compiled.register(self)
        self._reset()

    def _reset(self):
        """Forget the plans (rebuilt at the next step) after the groups or state changed."""
        if not isinstance(self.state, State):
            self.state = State(self.state)
        self._plans = {}
        self._param_lists = [g["params"] for g in self.param_groups]

    def _with_grads(self):
        # from _param_lists, not param_groups: under torch.compile dynamo guards on every
        # value in param_groups, lr included (the eager step renews the lists, see
        # _current_lists; a compiled step then sees them changed and retraces once)
        return [p for ps in self._param_lists for p in ps if p.grad is not None]

    def _current_lists(self):
        """Renew _param_lists where ``group["params"]`` was reassigned or a group deleted
        or added behind add_param_group's back (compared by identity: one read per group;
        a list changed in place is the same list), and drop the plans of groups gone."""
        groups = self.param_groups
        if len(groups) == len(self._param_lists) and all(
                a is g["params"] for a, g in zip(self._param_lists, groups)):
            return
        self._param_lists = [g["params"] for g in groups]
        alive = {id(g) for g in groups}
        self._plans = {k: v for k, v in self._plans.items() if k in alive}

    def zero_grad(self, set_to_none=True):
        # flat=True: grads still aliases of a plan's buffer are zeroed in one fill each
        # (torch zeroes them one by one); set_to_none is torch's (grads become None)
        if not set_to_none and self._plans:
            rest = [g for g in self.param_groups
                    if not flat.zero(self._plans.get(id(g)), g, self.state, self._slots(g))]
            if not rest:
                return
        super().zero_grad(set_to_none)

    def add_param_group(self, param_group):
        for k, v in getattr(self, "_extras", {}).items():
            param_group.setdefault(k, v)
        if param_group.get("differentiable"):
            raise NotImplementedError("fusedopt does not implement differentiable=True")
        exclusive(param_group)  # (a group's own precision options, as the constructor's)
        super().add_param_group(param_group)
        self._reset()

    def load_state_dict(self, state_dict):
        shape = matrix.state_shape if self._is_factored() else self._state_shape
        check_loaded(state_dict, [p for g in self.param_groups for p in g["params"]],
                     self._scalars, shape)
        forms = [g.get("master_weights") for g in self.param_groups]
        super().load_state_dict(state_dict)
        remainder.keep_form(forms, self.param_groups)
        for group in self.param_groups:
            # a torch.optim state_dict has no l1 (torch's math: 0) and no precision options
            # (kept as this optimizer was built with)
            group.setdefault("l1", 0.0)
            for k, v in self._extras.items():
                group.setdefault(k, v)
        keep_dtypes(state_dict, self.param_groups, self.state)
        self._reset()

    def state_dict(self):
        # plain dicts, as torch's: loads with torch.load(weights_only=True), without fusedopt
        sd = super().state_dict()
        sd["state"] = {k: dict(v) for k, v in sd["state"].items()}
        remainder.export(sd, self.param_groups)  # (a remainder: its float32 master)
        return mark_maps(sd)  # (4-bit codes: which maps made them)

    _OWN = ("_max_grad_norm", "_backend", "_extras", "grad_norm", "_gradient_release")

    def __getstate__(self):
        # torch pickles defaults, state and param_groups only; the plans are rebuilt
        return {**super().__getstate__(), **{k: getattr(self, k) for k in self._OWN}}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._register()

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure_loss(closure)
        if torch.compiler.is_compiling():
            live = self._with_grads()
            compiled.step_op(self._handle, live, [p.grad for p in live])
        else:
            self._eager_step()
        return loss

    def _eager_step(self):
        self._current_lists()
        amp = self._amp()
        if amp is _SKIP:
            return
        mult, found = amp
        scaled = mult is not None
        if self._max_grad_norm is not None:
            # clip_grad_norm_ folded into the update: the norm here (one read of the
            # grads), the factor applied by the kernel with the unscale
            # flat=True, every grad its buffer's alias: the norm over the buffers (one
            # range each), not over each grad
            flats = [flat.buffers_of(self._plans.get(id(g)), g, self.state, self._slots(g))
                     for g in self.param_groups]
            grads = [b.grad for b, aliased in flats] if all(a for _, a in flats) \
                else [p.grad for p in self._with_grads()]
            norm = _local(clip.total_norm(grads, 2.0, self._backend))  # a DTensor's: every rank's
            if mult is not None:  # the norm of the unscaled grads (the scale is a power of 2)
                norm = norm * mult.to(norm.device)
            self.grad_norm = norm
            factor = clip.clip_factor(norm, self._max_grad_norm)
            mult = factor if mult is None else mult.to(factor.device) * factor
        for group in self.param_groups:
            self._step_group(group, (mult, found, scaled))

    def _amp(self):
        """(1 / scale or None, found_inf or None) from what GradScaler.step left here, or
        _SKIP for a step it skips (scalars.scaler_inputs says which)."""
        scale, found = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if self._gradient_release and (scale is not None or found is not None):
            raise RuntimeError(SCALER_REFUSAL)
        inv, found, skip = scaler_inputs(scale, found,
                                         any(g.get("capturable") for g in self.param_groups))
        if not skip:
            return inv, found
        if inv is not None:  # the twin's unscale_ ran before the skip: grads unscaled
            clip.scale_([p.grad for p in self._with_grads()], inv, self._backend)
        return _SKIP

    def _step_group(self, group, amp=(None, None, False), plans=None):
        params, plans = group["params"], self._plans if plans is None else plans  # release's
        plan = plans.get(id(group))
        if plan is not None and plan.single and plan.valid(self.state, group, params, None,
                                                           self._slots(group)):
            # fast path: no per-param Python beyond the attribute reads and their check
            gptr = plan.grad_ptrs(params)
            if gptr is not None:
                # before the kernel: the params' headers are still in cache from the check
                self._bump_versions(group, params, plan)
                self._run(plan.buckets[0][1], group, gptr, amp)
                return
        grads = list(map(_GRAD, params))
        live = [i for i, g in enumerate(grads) if g is not None]
        sparse = [i for i in live if grads[i].is_sparse]
        if sparse:
            if amp[0] is not None:  # the scaler left unscaling to us
                for i in sparse:
                    grads[i]._values().mul_(amp[0].to(grads[i].device))
            changes = self.state.changes
            self._sparse_step(group, [params[i] for i in sparse])
            if plan is not None and plan.changes == changes:  # our own writes, for other params
                plan.changes = self.state.changes
            live = [i for i in live if not grads[i].is_sparse]
        if not live:
            return
        if plan is None or not plan.valid(self.state, group, params, live, self._slots(group)) \
                or not plan.proven(params):
            plan = plans[id(group)] = _Plan(self._describe(group), self.state, group,
                                                  params, live, grads)
            if group.get("flat"):  # the grads were re-homed into the plan's buffer
                grads = list(map(_GRAD, params))
        if plan.fallback:
            # first: an error of torch's there ends the step before the engines ran (no
            # param, grad or state of the two sets shares memory: the order is free)
            refuse_torch(plan.spec, self.state, group, [params[i] for i in plan.fallback])
            self._torch_step(group, [params[i] for i in plan.fallback], *amp)
        self._bump_versions(group, [params[i] for i in plan.take], plan)
        for idx, bucket in plan.buckets:
            given = [_local(grads[i]) for i in idx]
            keep = [g.contiguous() for g in given]
            self._run(bucket, group, np.fromiter(map(_PTR, keep), np.int64, len(keep)), amp)
            if amp[2]:  # WRITE_GRAD wrote a non-contiguous grad's copy: the unscale goes home
                for g, k in zip(given, keep):
                    if k is not g:
                        g.copy_(k)

    def _torch_step(self, group, params, mult, found, scaled):
        """Step ``params`` with the twin's own for-loop (foreach=False): torch's result,
        or torch's error, for what the engines do not take (see plan._unfit)."""
        if found is not None and found.item():  # a GPU scaler's inf: the step is skipped
            return
        # what GradScaler's unscale or the clipping would have done: written back under a
        # scaler (as its unscale), else undone after the step (in place: a grad set
        # through .data may not pass a grad assignment's checks)
        given = [p.grad.clone() for p in params] if mult is not None and not scaled else []
        if mult is not None:
            for p in params:
                p.grad.mul_(mult.to(p.grad.device))
        saved = self.param_groups
        # the scaler's grad_scale and found_inf were for our kernels; the grads are unscaled
        scaler = {k: self.__dict__.pop(k) for k in ("grad_scale", "found_inf") if k in self.__dict__}
        self.param_groups = [{**group, "params": params, "foreach": False, "fused": False}]
        try:
            inspect.unwrap(self.twin().step)(self)
        finally:
            self.param_groups = saved
            self.__dict__.update(scaler)
            for p, g in zip(params, given):
                p.grad.copy_(g)

    def _bump_versions(self, group, params, plan):
        # autograd's in-place check: a param's version moves as torch's in-place updates
        # move it (so a backward through a graph that saved it raises, as after torch's step)
        masters = [(b, b.reseed_masters()) for _, b in plan.buckets
                   if b.mask & (Update.MASTER | Update.KAHAN)]
        n = self._inplace_updates(group)
        host.bump(params, n)
        for b, ver in masters:
            b.pver = ver + n

    def _inplace_updates(self, group):
        return 1

    _state_shape = staticmethod(lambda name, p: p.shape)  # (load_state_dict's check)

    def _run(self, bucket, group, gptr, amp):
        if bucket.factors is not None:  # a factored state (Spec.factored): its own passes
            return self._matrix_step(bucket, group, gptr, amp)
        if bucket.stacks is not None:  # a stacked update (Spec.stacked): its own passes
            return self._stacked_step(bucket, group, gptr, amp)
        # the gradient's factor (1 / scale, clipping), the inf flag, whether a scaler is in it
        inv, found, amp_scaled = amp
        if found is not None:
            found = found.to(bucket.device, torch.float32, non_blocking=True)
        step = bucket.step_value(group.get("capturable", False), found)
        if torch.is_tensor(step) and not torch.is_tensor(group["lr"]):
            # float / tensor is reciprocal-then-multiply in torch (two roundings): lr as a
            # tensor makes lr / bias_correction one correctly rounded division
            group = {**group, "lr": torch.full((), group["lr"], dtype=step.dtype, device=step.device)}
        if self._advance_first:
            self._advance(group, bucket, step, found)
        scalars = {name: bucket.scalar_value(name) for name in self._scalars}
        coeffs = self._coefficients(group, step, bucket.dtype == "float64", **scalars)
        if inv is not None:  # a CPU tensor read costs nothing: one float for every tensor
            coeffs["grad_scale"] = float(inv) if inv.device.type == "cpu" \
                else inv.to(bucket.device, non_blocking=True)
        if self._maximize(group):  # (a value, not a flag: coefficients.ENGINE)
            coeffs["maximize"] = 1.0
        # bfloat16 params without a master copy or compensation only
        sr = bool(group.get("stochastic_rounding")) and bucket.dtype == "bfloat16" \
            and not bucket.mask & (Update.MASTER | Update.KAHAN)
        keys = bucket.stream_keys(group.get("sr_seed", 0)) if sr else None
        # the gradient is written back under GradScaler (unscaled, as its own pass leaves
        # it); clipping alone leaves the gradients as they were (a write pass saved)
        flags = self._all_flags(group, SCALE_GRAD=inv is not None, FOUND_INF=found is not None,
                                WRITE_GRAD=amp_scaled, STOCH_ROUND=sr)
        if self.spec is not None and self.spec.trust:
            # per-tensor factors: the rule's sums from a reduce pass (nothing written)
            reduce = tuple(sorted(dict(flags, REDUCE=True, WRITE_GRAD=False).items()))
            sums = bucket.reduce(self._rule, reduce, gptr, pack(self._rule, coeffs), found)
            coeffs = self._trust(group, bucket, sums, coeffs)  # (trust.TrustOptimizer)
        bucket.run(self._rule, flags, gptr, pack(self._rule, coeffs), found, keys)
        if not self._advance_first:
            self._advance(group, bucket, step, found)

    def _maximize(self, group):
        """Whether the gradient is negated (torch's ``maximize``): the engines' ``maximize``
        slot, not a flag, so that groups of both signs share one compiled variant."""
        return bool(group.get("maximize", False))

    def _sparse_step(self, group, params):
        raise RuntimeError(self._sparse_error)

    def _flags(self, group):  # the rule's flags beyond L1 (rules.FLAGS), by name
        return {}

    def _all_flags(self, group, **engine):
        flags = dict(dict.fromkeys(rules.FLAGS, False), **engine, L1=group.get("l1", 0) != 0)
        flags.update(self._flags(group))
        # a tensor-valued hyperparameter (momentum=torch.tensor(0.9)) gives tensor flags
        return tuple(sorted((k, bool(v)) for k, v in flags.items()))
