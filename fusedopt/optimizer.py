"""The shared optimizer machinery: grouping, state, and dispatch to an engine.

Each fusedopt class subclasses its torch.optim twin, so the constructor, defaults,
validation errors, ``__setstate__`` and state_dict format are torch's own; this mixin
replaces ``step``.  Per param group and (device, dtype) it keeps a *bucket*: pointer
tables to params and state, the chunk table, and one float32 tensor holding every
param's step counter, of which each ``state["step"]`` is a 0-d view (so 20000 counters
advance in one op, not 20000).  Buckets are rebuilt only when the set of params with
gradients changes, or after load_state_dict / add_param_group: per step the host reads
the gradients' addresses, computes the coefficients and makes one engine call.
"""
import inspect
import itertools
import operator
import weakref

import numpy as np
import torch

from . import clip
from .kernels import rules

_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}
_GRAD = operator.attrgetter("grad")
_PTR = torch.Tensor.data_ptr


try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed
    DTensor = ()


def _local(t):
    """The shard a DTensor holds on this rank (the engine updates local shards), else t."""
    return t._local_tensor if isinstance(t, DTensor) else t


def _dense_grad_ptr(p):
    g = p.grad
    return g.data_ptr() if g.is_contiguous() else -1


def _dense_local_grad_ptr(p):
    return _dense_grad_ptr(_local(p))


def scalar_dtype():
    # torch.optim's dtype for step counters
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _numba():
    from .kernels import numba_engine
    return numba_engine


def _triton():
    from .kernels import triton_engine
    return triton_engine


class _Bucket:
    """The params of one group that share device and dtype, ready for one engine call."""

    def __init__(self, opt, group, params, slots, fresh):
        self.params = params
        self.device = params[0].device
        dtype = _REAL.get(params[0].dtype, params[0].dtype)
        self.dtype = str(dtype).replace("torch.", "")
        self.mask = sum(1 << i for i, name in enumerate(slots) if name)
        self.backend = opt._backend_for(self.device)
        states = [opt.state[p] for p in params] if opt._needs_state(group) else [{}] * len(params)
        # engines need contiguous memory: non-contiguous params are updated through a copy
        local = [_local(p) for p in params]
        self.work = [(i, p, p.contiguous()) for i, p in enumerate(local) if not p.is_contiguous()]
        flat = list(local)
        for i, _, w in self.work:
            flat[i] = w
        cols = [[_as_real(t) for t in flat]]
        for name in slots:
            if name is None:
                cols.append(cols[0])
                continue
            col = []
            for p, st in zip(params, states):
                t = st[name]
                if not t.is_contiguous():
                    t = st[name] = t.contiguous()
                col.append(_as_real(_local(t)))
            cols.append(col)
        self.tensors = cols  # keeps the tensors behind the pointer tables alive
        self.numel = np.array([t.numel() for t in cols[0]], dtype=np.int64)
        if opt._has_step:
            # stacked, not read through float(): no host sync, even on the first step
            steps = torch.stack([torch.as_tensor(st["step"]).to(self.device, scalar_dtype())
                                 for st in states])
            for k, st in enumerate(states):
                st["step"] = steps[k]
        else:  # a private count: 0 for state created by this plan, so step 1 is its first
            steps = torch.tensor([0.0 if id(p) in fresh else 1.0 for p in params],
                                 dtype=torch.float64, device=self.device)
        self.steps = steps
        math_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.C = torch.zeros(len(params), rules.NCOEF, dtype=math_dtype, device=self.device)
        ptrs = np.array([[t.data_ptr() for t in col] for col in cols], dtype=np.int64)
        self.aligned = bool(((ptrs % 16) == 0).all())
        tid, cs, ce = _chunks(self.backend, self.numel)
        if self.backend == "numba":
            self.P, self.S = ptrs[0], [ptrs[1], ptrs[2], ptrs[3]]
            self.tid, self.cs, self.ce = tid, cs, ce
            self.Cn = self.C.numpy()
        else:
            dev = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(self.device)  # noqa: E731
            self.P, self.S = dev(ptrs[0]), [dev(ptrs[1]), dev(ptrs[2]), dev(ptrs[3])]
            self.tid, self.cs, self.ce = dev(tid), dev(cs), dev(ce)
            self._gkey, self._gdev = None, None

    def step_value(self, capturable, found_inf=None):
        """The step counters after this step's increment: a float if they all agree and
        live on the CPU (torch computes its bias corrections from a Python float),
        else (or when capturable) a float64 tensor, one value per param.  With a
        found_inf flag on the device, the increment is 1 - found_inf."""
        if found_inf is None:
            self.steps += 1
        else:
            self.steps += 1 - found_inf.to(self.steps.dtype)
        if self.device.type == "cpu" and not capturable and found_inf is None:
            s = self.steps.numpy()
            if s.size and s.min() == s.max():
                return float(s[0])
        return self.steps.double()

    def run(self, rule, flags, gptr, coeffs, found_inf=None):
        for j, c in enumerate(coeffs):
            if isinstance(c, torch.Tensor):  # a device op: no host sync
                self.C[:, j].copy_(c)
            elif self.backend == "numba":  # cheaper than fill_; rounds double to float32 alike
                self.Cn[:, j] = c
            else:
                self.C[:, j].fill_(c)
        for i, p, w in self.work:
            w.copy_(p)
        aligned = self.aligned and not (gptr % 16).any()
        if self.backend == "numba":
            _numba().run(rule, flags, self.dtype, self.mask, self.P, gptr, self.S, self.Cn,
                         self.tid, self.cs, self.ce, self.numel)
        else:
            if self._gkey is None or not np.array_equal(self._gkey, gptr):
                host = torch.from_numpy(gptr)
                if self.device.type == "cuda":
                    host = host.pin_memory()
                self._gkey, self._gdev = gptr, host.to(self.device, non_blocking=True)
            _triton().run(rule, flags, self.dtype, self.mask, self.P, self._gdev, self.S,
                          self.C, self.tid, self.cs, self.ce, aligned, found_inf)
        for i, p, w in self.work:
            p.copy_(w)


def _as_real(t):
    return torch.view_as_real(t) if t.is_complex() else t


def _chunks(backend, numel):
    eng = _numba() if backend == "numba" else _triton()
    chunk = eng.CHUNK
    counts = (numel + chunk - 1) // chunk
    tid = np.repeat(np.arange(len(numel), dtype=np.int64), counts)
    first = np.repeat(np.cumsum(counts) - counts, counts)
    start = (np.arange(len(tid), dtype=np.int64) - first) * chunk
    end = np.minimum(start + chunk, numel[tid]) if len(tid) else start
    return tid, start, end


class _Plan:
    def __init__(self, opt, group, params, live):
        self.group, self.params, self.nparams, self.live = group, params, len(params), live
        self.state_obj = opt.state
        self.slots = opt._slots(group)
        order, fresh = {}, set()
        for i in live:
            p = params[i]
            order.setdefault((p.device, p.dtype), []).append(i)
            if not opt._needs_state(group):
                continue
            st = opt.state[p]
            if len(st) == 0 and opt._has_step:
                opt._init_state(group, p, st)
            for name in self.slots:
                if name and st.get(name) is None:
                    st[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    fresh.add(id(p))
        self.buckets = [(idx, _Bucket(opt, group, [params[i] for i in idx], self.slots, fresh))
                        for idx in order.values()]
        self.all_live = len(live) == len(params)
        dist = any(isinstance(params[i], DTensor) for i in live)
        self.grad_ptr = _dense_local_grad_ptr if dist else _dense_grad_ptr
        self.single = len(self.buckets) == 1 and self.all_live

    def valid(self, opt, group, params, live):
        """Still right for this group, params and live indices (None: every param)?"""
        live_ok = self.all_live if live is None else self.live == live
        return (self.group is group and self.state_obj is opt.state
                and self.nparams == len(params) and live_ok
                and all(map(operator.is_, self.params, params))
                and self.slots == opt._slots(group))


_SKIP = object()  # _amp(): the scaler found an inf on the CPU, nothing to do
_LIVE = weakref.WeakValueDictionary()  # handle -> optimizer, for the custom op
_HANDLES = itertools.count()


@torch.library.custom_op("fusedopt::step", mutates_args=("params", "grads"))
def _step_op(handle: int, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """The whole step as an opaque op, so torch.compile puts it in its graph: tracing
    never sees data_ptr tables, lr or the step counters, so changing them neither breaks
    the graph nor recompiles.  ``params`` are the params with grads (declared mutated, so
    the graph orders the step after whatever made the grads; the grads too, which the
    step unscales and clips in place); the step itself reads the optimizer's own tensors."""
    opt = _LIVE[handle]
    own = [p for ps in opt._param_lists for p in ps if p.grad is not None]
    # where the compiler handed us copies, the update goes through the originals
    moved = [(a, b) for a, b in zip(params, own) if a.data_ptr() != b.data_ptr()]
    for a, b in moved:
        b.copy_(a)
    opt._eager_step()
    for a, b in moved:
        a.copy_(b)


@_step_op.register_fake
def _(handle, params, grads):
    return None


class FusedOptimizer:
    """Mixin placed before a torch.optim class: ``class Adam(FusedOptimizer, torch.optim.Adam)``.

    Subclasses define ``_rule`` (a name in kernels/rules.py), ``_sparse_error`` and
    ``_slots``, ``_flags``, ``_coefficients``, ``_init_state``.
    """

    _rule = None
    _sparse_error = None
    _has_step = True  # torch keeps state["step"] (all but SGD)

    def _needs_state(self, group):
        return self._has_step or any(self._slots(group))

    def __init__(self, *args, backend="auto", l1=0.0, max_grad_norm=None, **kwargs):
        if kwargs.get("differentiable"):
            raise NotImplementedError(
                f"fusedopt.{type(self).__name__} does not implement differentiable=True; "
                f"use torch.optim.{type(self).__name__} for differentiable optimizer steps")
        if backend not in ("auto", "numba", "triton"):
            raise ValueError(f"backend must be 'auto', 'numba' or 'triton', got {backend!r}")
        if not 0.0 <= l1:
            raise ValueError(f"Invalid l1 value: {l1}")
        if max_grad_norm is not None and not 0.0 <= max_grad_norm:
            raise ValueError(f"Invalid max_grad_norm value: {max_grad_norm}")
        self._max_grad_norm = max_grad_norm
        self.grad_norm = None  # with max_grad_norm: the last step's total gradient norm
        self._backend = backend
        self._l1 = l1
        super().__init__(*args, **kwargs)
        self.defaults["l1"] = l1
        # GradScaler.step then hands us grad_scale and found_inf instead of unscaling the
        # gradients in a pass of its own: the kernel unscales them (see _amp)
        self._step_supports_amp_scaling = True
        self._register()

    def _register(self):
        self._handle = next(_HANDLES)
        _LIVE[self._handle] = self
        self._reset()

    def _reset(self):
        """Forget the plans (rebuilt at the next step) after the groups or state changed."""
        self._plans = {}
        self._param_lists = [g["params"] for g in self.param_groups]

    def add_param_group(self, param_group):
        param_group.setdefault("l1", getattr(self, "_l1", 0.0))
        if param_group.get("differentiable"):
            raise NotImplementedError("fusedopt does not implement differentiable=True")
        super().add_param_group(param_group)
        self._reset()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.setdefault("l1", 0.0)
        self._reset()

    def __setstate__(self, state):
        super().__setstate__(state)
        self._register()

    def _backend_for(self, device):
        if self._backend != "auto":
            return self._backend
        return "numba" if device.type == "cpu" else "triton"

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if torch.compiler.is_compiling():
            # not self.param_groups: dynamo guards on every value in it (lr included)
            live = [p for ps in self._param_lists for p in ps if p.grad is not None]
            _step_op(self._handle, live, [p.grad for p in live])
        else:
            self._eager_step()
        return loss

    def _eager_step(self):
        amp = self._amp()
        if amp is _SKIP:
            return
        mult, found = amp
        if self._max_grad_norm is not None:
            # clip_grad_norm_ folded into the update: the norm here (one read of the
            # grads), the factor applied by the kernel with the unscale
            grads = [p.grad for ps in self._param_lists for p in ps if p.grad is not None]
            norm = clip.total_norm(grads, 2.0, self._backend)
            if mult is not None:  # the norm of the unscaled grads (the scale is a power of 2)
                norm = norm * mult.to(norm.device)
            self.grad_norm = norm
            factor = clip.clip_factor(norm, self._max_grad_norm)
            mult = factor if mult is None else mult.to(factor.device) * factor
        for group in self.param_groups:
            self._step_group(group, (mult, found))

    def _amp(self):
        """What torch.amp.GradScaler.step left on the optimizer (it does, since
        _step_supports_amp_scaling is set): (1 / scale or None, found_inf or None), or _SKIP
        when found_inf is set and lives on the CPU: then nothing is touched, no state
        created, no step counted -- what the for-loop gives when the scaler skips step().
        A found_inf on a GPU is read by the kernel instead (no host sync)."""
        scale, found = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if found is not None and found.device.type == "cpu":
            if found.item():
                return _SKIP
            found = None
        # torch's unscale_: the reciprocal in float64, rounded to float32
        inv = None if scale is None else scale.double().reciprocal().float()
        return inv, found

    def _step_group(self, group, amp=(None, None)):
        params = group["params"]
        plan = self._plans.get(id(group))
        if plan is not None and plan.single and plan.valid(self, group, params, None):
            # fast path: one pass over the params (after the kernel has streamed the
            # memory, each pass over 5000 tensor objects is a pass of cache misses).  A None
            # grad raises AttributeError, a sparse one RuntimeError (no storage), and a
            # non-contiguous one gives -1: each sends the step down the general path.
            try:
                gptr = np.fromiter(map(plan.grad_ptr, params), np.int64, len(params))
            except (AttributeError, RuntimeError):
                gptr = None
            if gptr is not None and (gptr >= 0).all():
                self._run(plan.buckets[0][1], group, gptr, amp)
                return
        grads = list(map(_GRAD, params))
        live = [i for i, g in enumerate(grads) if g is not None]
        sparse = [i for i in live if grads[i].is_sparse]
        if sparse:
            if amp[0] is not None:  # the scaler left unscaling to us
                for i in sparse:
                    grads[i]._values().mul_(amp[0].to(grads[i].device))
            self._sparse_step(group, [params[i] for i in sparse])
            live = [i for i in live if not grads[i].is_sparse]
        if not live:
            return
        if plan is None or not plan.valid(self, group, params, live):
            plan = self._plans[id(group)] = _Plan(self, group, params, live)
        for idx, bucket in plan.buckets:
            keep = [_local(grads[i]).contiguous() for i in idx]
            self._run(bucket, group, np.fromiter(map(_PTR, keep), np.int64, len(keep)), amp)

    def _run(self, bucket, group, gptr, amp):
        inv, found = amp  # the gradient's factor (1 / scale, clipping) and the inf flag
        if found is not None:
            found = found.to(bucket.device, torch.float32, non_blocking=True)
        step = bucket.step_value(group.get("capturable", False), found)
        coeffs = self._coefficients(group, step, bucket.dtype == "float64")
        if inv is not None:
            coeffs = (*coeffs[:rules.NCOEF - 1], inv.to(bucket.device, non_blocking=True))
        flags = self._all_flags(group, SCALE_GRAD=inv is not None, FOUND_INF=found is not None)
        bucket.run(self._rule, flags, gptr, coeffs, found)

    def _sparse_step(self, group, params):
        raise RuntimeError(self._sparse_error)

    def _all_flags(self, group, **engine):
        flags = dict.fromkeys(rules.FLAGS, False)
        flags.update(engine)
        flags["MAXIMIZE"] = bool(group.get("maximize", False))
        flags["WEIGHT_DECAY"] = group.get("weight_decay", 0) != 0
        flags["L1"] = group.get("l1", 0) != 0
        flags.update(self._flags(group))
        return tuple(sorted(flags.items()))


def lerp_rest(w, f64):
    """1 - w as torch's lerp computes it: in the tensor's math dtype (float32 unless float64)."""
    w = float(w)
    return 1 - w if f64 else float(np.float32(1) - np.float32(w))


def lerp_small(w):
    # torch's lerp switches formula at |w| = 0.5
    return abs(float(w)) < 0.5


EXTRAS = dict(backend="auto", l1=0.0, max_grad_norm=None)  # FusedOptimizer.__init__'s


def signature_with(torch_cls):
    """torch_cls's constructor signature plus fusedopt's keyword-only extras."""
    sig = inspect.signature(torch_cls.__init__)
    params = list(sig.parameters.values())[1:]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
               for k, v in EXTRAS.items()]
    return sig.replace(parameters=params)
