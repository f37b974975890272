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
import operator

import numpy as np
import torch

from .kernels import rules

_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}
_GRAD = operator.attrgetter("grad")
_PTR = torch.Tensor.data_ptr


def _dense_grad_ptr(p):
    g = p.grad
    return g.data_ptr() if g.is_contiguous() else -1


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
        self.work = [(i, p, p.contiguous()) for i, p in enumerate(params) if not p.is_contiguous()]
        flat = [p for p in params]
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
                col.append(_as_real(t))
            cols.append(col)
        self.tensors = cols  # keeps the tensors behind the pointer tables alive
        self.numel = np.array([t.numel() for t in cols[0]], dtype=np.int64)
        if opt._has_step:
            steps = torch.tensor([float(st["step"]) for st in states], dtype=scalar_dtype(),
                                 device=self.device)
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

    def step_value(self):
        """The step counters after this step's increment: a float if they all agree and
        live on the CPU (torch computes its bias corrections from a Python float),
        else a float64 tensor (one value per param)."""
        self.steps += 1
        if self.device.type == "cpu":
            s = self.steps.numpy()
            if s.size and s.min() == s.max():
                return float(s[0])
        return self.steps.double()

    def run(self, rule, flags, gptr, coeffs):
        if self.backend == "numba":  # numpy stores round double to float32 as torch does
            for j, c in enumerate(coeffs):
                self.Cn[:, j] = c.detach().cpu().numpy() if isinstance(c, torch.Tensor) else c
        else:
            for j, c in enumerate(coeffs):
                if isinstance(c, torch.Tensor):
                    self.C[:, j].copy_(c)
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
                          self.C, self.tid, self.cs, self.ce, aligned)
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
        self.single = len(self.buckets) == 1 and self.all_live

    def valid(self, opt, group, params, live):
        """Still right for this group, params and live indices (None: every param)?"""
        live_ok = self.all_live if live is None else self.live == live
        return (self.group is group and self.state_obj is opt.state
                and self.nparams == len(params) and live_ok
                and all(map(operator.is_, self.params, params))
                and self.slots == opt._slots(group))


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

    def __init__(self, *args, backend="auto", l1=0.0, **kwargs):
        if kwargs.get("differentiable"):
            raise NotImplementedError(
                f"fusedopt.{type(self).__name__} does not implement differentiable=True; "
                f"use torch.optim.{type(self).__name__} for differentiable optimizer steps")
        if backend not in ("auto", "numba", "triton"):
            raise ValueError(f"backend must be 'auto', 'numba' or 'triton', got {backend!r}")
        if not 0.0 <= l1:
            raise ValueError(f"Invalid l1 value: {l1}")
        self._backend = backend
        self._l1 = l1
        super().__init__(*args, **kwargs)
        self.defaults["l1"] = l1
        # torch's fused path asks GradScaler to hand it grad_scale/found_inf; we unscale normally
        self._step_supports_amp_scaling = False
        self._plans = {}

    def add_param_group(self, param_group):
        param_group.setdefault("l1", getattr(self, "_l1", 0.0))
        if param_group.get("differentiable"):
            raise NotImplementedError("fusedopt does not implement differentiable=True")
        super().add_param_group(param_group)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            group.setdefault("l1", 0.0)
        self._plans = {}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._plans = {}

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
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group):
        params = group["params"]
        plan = self._plans.get(id(group))
        if plan is not None and plan.single and plan.valid(self, group, params, None):
            # fast path: one pass over the params (after the kernel has streamed the
            # memory, each pass over 5000 tensor objects is a pass of cache misses).  A None
            # grad raises AttributeError, a sparse one RuntimeError (no storage), and a
            # non-contiguous one gives -1: each sends the step down the general path.
            try:
                gptr = np.fromiter(map(_dense_grad_ptr, params), np.int64, len(params))
            except (AttributeError, RuntimeError):
                gptr = None
            if gptr is not None and (gptr >= 0).all():
                self._run(plan.buckets[0][1], group, gptr)
                return
        grads = list(map(_GRAD, params))
        live = [i for i, g in enumerate(grads) if g is not None]
        sparse = [i for i in live if grads[i].is_sparse]
        if sparse:
            self._sparse_step(group, [params[i] for i in sparse])
            live = [i for i in live if not grads[i].is_sparse]
        if not live:
            return
        if plan is None or not plan.valid(self, group, params, live):
            plan = self._plans[id(group)] = _Plan(self, group, params, live)
        for idx, bucket in plan.buckets:
            keep = [grads[i] if grads[i].is_contiguous() else grads[i].contiguous() for i in idx]
            self._run(bucket, group, np.fromiter(map(_PTR, keep), np.int64, len(keep)))

    def _run(self, bucket, group, gptr):
        step = bucket.step_value()
        coeffs = self._coefficients(group, step, bucket.dtype == "float64")
        bucket.run(self._rule, self._all_flags(group), gptr, coeffs)

    def _sparse_step(self, group, params):
        raise RuntimeError(self._sparse_error)

    def _all_flags(self, group):
        flags = dict.fromkeys(rules.FLAGS, False)
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


def signature_with(torch_cls, **extra):
    """torch_cls's constructor signature plus fusedopt's keyword-only extras."""
    sig = inspect.signature(torch_cls.__init__)
    params = list(sig.parameters.values())[1:]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v)
               for k, v in extra.items()]
    return sig.replace(parameters=params)
