"""Plumbing between an optimizer and the engines: the params of a group, sorted into
buckets (one per device and dtype), each with pointer tables to params and state, the
chunk table, and one tensor holding every param's step counter, of which each
``state["step"]`` is a 0-d view (so 20000 counters advance in one op, not 20000).

Mixed precision lives here too: the dtype each param's state is kept in, the float32
master copy (or its remainder) or the Kahan compensation of a low-precision param, and the
keys of the stochastic-rounding stream.
"""
import operator
import os

import numpy as np
import torch

from . import quant, remainder
from .dtensor import dtensor_class as _dtensor, local as _local, whole_norms
from .kernels.coefficients import NCOEF
from .kernels.flags import (UPDATE_A, UPDATE_B, UPDATE_C, UPDATE_KAHAN, UPDATE_MASTER,
                            UPDATE_REMAINDER, update_mask)

_GRAD = operator.attrgetter("grad")
_VERSION = operator.attrgetter("_version")
_PTR = torch.Tensor.data_ptr
_CONTIG = torch.Tensor.is_contiguous

_REAL = {torch.complex64: torch.float32, torch.complex128: torch.float64}


def scalar_dtype():
    # torch.optim's dtype for step counters
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _numba():
    from .kernels import numba_engine
    return numba_engine


def _triton():
    from .kernels import triton_engine
    return triton_engine


_LOW = (torch.float16, torch.bfloat16)
_M32 = 0xFFFFFFFF


def state_dtype(group, p):
    """The dtype of p's state: uint8 (8-bit codes, quant.py) when the group asks for it
    and quant.takes(p); uint4 (4-bit codes) likewise, or uint8 where p cannot take
    4-bit codes but 8-bit ones (quant.takes); float32 for a float16/bfloat16 param when the group asks for
    float32 or 8-bit state or master weights; else the param's own (as torch)."""
    want = group.get("state_dtype")
    if want == torch.uint4 and quant.takes(p, 4):
        return torch.uint4
    if want in (torch.uint8, torch.uint4) and quant.takes(p):
        return torch.uint8
    if p.dtype in _LOW and (want is not None or group.get("master_weights")):
        return torch.float32
    return p.dtype


_QTABLE = {}


def qtable(device):
    """quant.engine_table() for the engines: numpy for Numba, a tensor on the device."""
    t = _QTABLE.get(device)
    if t is None:
        t = _QTABLE[device] = quant.engine_table().numpy() if device is None \
            else quant.engine_table().to(device)
    return t


def has_master(group, p):
    """A float32 master copy of p in ``state["master"]`` (master_weights=True)."""
    return group.get("master_weights") is True and p.dtype in _LOW


KAHAN = "kahan_comp"  # the state key of the compensation buffer (optimi's name)


def has_kahan(group, p):
    """kahan_sum=True and a float16/bfloat16 param: its update is a compensated sum, with
    ``state[KAHAN]`` in its dtype (float32 and float64 params: none, as optimi)."""
    return bool(group.get("kahan_sum")) and p.dtype in _LOW


def extra_name(group, p):
    """The state key the update kernels' fourth table points into for p: "master",
    remainder.KEY, KAHAN, or None (they exclude each other: options.exclusive)."""
    return "master" if has_master(group, p) else remainder.KEY if remainder.held(group, p) \
        else KAHAN if has_kahan(group, p) else None


def _name(dtype):
    return str(_REAL.get(dtype, dtype)).replace("torch.", "")


def backend_for(choice, device):
    """The engine for tensors on ``device``: "auto" is Numba on the CPU, Triton elsewhere."""
    return choice if choice != "auto" else ("numba" if device.type == "cpu" else "triton")


def on_device(a, device):
    """A host table as an int64/float tensor on ``device`` (the Triton engine's tables)."""
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def one_buffer(vs, dtype=None, device=None):
    """The tensors ``vs`` (of ``dtype`` and on ``device`` where given) as one flat view,
    where they already lie one after another in one storage (as a plan built before left
    them), else None.  A new plan then keeps the very tensors the state holds, which a
    user may hold too (a grad may be a view of one), as torch's state stays the same
    tensors step after step."""
    if not all(torch.is_tensor(v) for v in vs):
        return None
    v0 = vs[0]
    if (dtype is not None and v0.dtype != dtype) or (device is not None and v0.device != device):
        return None
    at = v0.storage_offset()
    for v in vs:
        if not (v.is_contiguous() and v.dtype == v0.dtype and v.device == v0.device
                and v.untyped_storage().data_ptr() == v0.untyped_storage().data_ptr()
                and v.storage_offset() == at):
            return None
        at += v.numel()
    return v0.detach().as_strided((at - v0.storage_offset(),), (1,), v0.storage_offset())


def _stacked(states, name, device):
    # the 0-d state entries ``name`` of a bucket (step counters, NAdam's mu_product) as
    # one buffer, each entry a view of it: the buffer they lie in already (one_buffer), or
    # a new stack (not read through float(): no host sync, even on the first step)
    buf = one_buffer([st[name] for st in states], scalar_dtype(), device)
    if buf is None:
        buf = torch.stack([torch.as_tensor(st[name]).to(device, scalar_dtype())
                           for st in states])
        for k, st in enumerate(states):
            st[name] = buf[k]
    return buf


class _Bucket:
    """The params of one group that share device and dtype, ready for one engine call.
    ``spec``: the group's plan.GroupSpec; ``states``: the params' state dicts (None where
    the algorithm keeps none); ``index``: the params' places in their group."""

    tables = factors = None  # a factored state's (matrix.factors)
    stacks = None  # a stacked update's (stacked.Stacks)

    def __init__(self, spec, group, params, states, fresh, index, buffers=None):
        self.params = params
        slots = spec.slots
        self.device = params[0].device
        self.dtype = _name(params[0].dtype)
        sdt = state_dtype(group, params[0])
        q = sdt in (torch.uint8, torch.uint4)  # coded slots: the math, a master in float32
        self.sdtype = "float32" if q else _name(sdt)
        extra = extra_name(group, params[0])
        master = extra is not None  # a master copy or a compensation: the fourth table's
        used = [bool(name) for name in slots]
        self.mask = update_mask(used, extra in ("master", remainder.KEY), used if q else (),
                                [bool(name) and quant.signed(name) for name in slots],
                                kahan=extra == KAHAN, remainder=extra == remainder.KEY,
                                four=sdt == torch.uint4)
        self.backend = backend_for(spec.backend, self.device)
        if self.backend == "triton" and self.device.type == "cpu" \
                and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "backend='triton' runs on CUDA tensors; these params are on the CPU. Use "
                "backend='numba' (or 'auto'), or, to test the Triton kernels on the CPU, set "
                "TRITON_INTERPRET=1 before triton is imported (its interpreter: slow)")
        states = states if states is not None else [{}] * len(params)
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
        cols.append([st[extra] for st in states] if master else cols[0])
        self.master_col = len(cols) - 1
        for name in slots:  # the blocks' absmax of 8-bit slots
            cols.append([_local(st[name + quant.ABSMAX]) for st in states] if q and name
                        else cols[0])
        self.tensors = cols
        self.pver = None  # master weights: the params' versions after the last step
        # the storages behind the pointer tables, held: while this plan lives none of its
        # addresses can be freed and handed to another tensor (a param's storage replaced
        # by `p.data = ...` stays allocated until the check before the next step notices)
        self.storages = [t.untyped_storage() for col in cols for t in col] \
            + [p.untyped_storage() for _, p, _ in self.work]
        self.numel = np.array([t.numel() for t in cols[0]], dtype=np.int64)
        self.ndim = np.array([p.dim() for p in params], dtype=np.int64)  # (LARS: 1-D or not)
        self.whole = np.array([p.numel() for p in params], dtype=np.int64)  # (a DTensor's all)
        # step counters on the CPU unless capturable, as torch's non-capturable steps keep
        # them: the coefficients are then Python floats, passed to the kernel as scalars
        self.capturable = bool(group.get("capturable", False))
        cdev = self.device if self.capturable else torch.device("cpu")
        if spec.has_step:
            steps = _stacked(states, "step", cdev)
        else:  # a private count: 0 for state created by this plan, so step 1 is its first
            steps = torch.tensor([0.0 if id(p) in fresh else 1.0 for p in params],
                                 dtype=torch.float64, device=cdev)
        self.steps = steps
        self.steps_np = steps.numpy() if steps.device.type == "cpu" else None  # shares memory
        # other per-param scalars of the state (NAdam's mu_product): stacked likewise, each
        # state entry a 0-d view, advanced in one op per step by the class
        self.scalars = {}
        for name in spec.scalars:
            self.scalars[name] = _stacked(states, name, cdev)
        # numpy views of the CPU ones (sharing memory): read as numbers without a torch op
        self.scalars_np = {n: b.numpy() for n, b in self.scalars.items() if b.device.type == "cpu"}
        # the state tensors as the optimizer's state holds them, whose facts are re-read
        # before every step: `state[p][k].data = t` changes no mapping but must be noticed
        names = [n for n in slots if n] + [extra] * master + ["step"] * spec.has_step \
            + list(spec.scalars) + [n + quant.ABSMAX for n in slots if n and q]
        self.watched = [_local(st[n]) for st in states for n in names if n in st]
        math_dtype = torch.float64 if self.dtype == "float64" else torch.float32
        self.C = torch.zeros(len(params), NCOEF, dtype=math_dtype, device=self.device)
        ptrs = np.array([[t.data_ptr() for t in col] for col in cols], dtype=np.int64)
        self.aligned = bool(((ptrs % 16) == 0).all())
        tid, cs, ce = _chunks(self.backend, self.numel)
        # the stochastic-rounding stream of a param depends on its place in the optimizer,
        # never on which other params have gradients
        self.place = torch.tensor([(spec.index << 20 ^ i) * 0x85EBCA77 & _M32 for i in index],
                                  dtype=torch.int64, device=cdev)
        self.buffers, self.flat = buffers, None
        if buffers is not None:
            # the one-range tables: each column's buffer as a single tensor
            bufs = [buffers.param] + [buffers.state[n] if n else buffers.param for n in slots] \
                + [buffers.state[extra] if master else buffers.param]
            total = np.array([buffers.numel], dtype=np.int64)
            fptrs = np.array([[b.data_ptr()] for b in bufs], dtype=np.int64)
            self.flat = (fptrs, np.array([buffers.grad.data_ptr()], dtype=np.int64), total,
                         *_chunks(self.backend, total))
        self.Q = qtable(None if self.backend == "numba" else self.device) if q else None
        if self.backend == "numba":
            self.P, self.S = ptrs[0], list(ptrs[1:])
            self.tid, self.cs, self.ce = tid, cs, ce
            self.Cn = self.C.numpy()
        else:
            self.P, *self.S = (on_device(a, self.device) for a in ptrs)
            self.tid, self.cs, self.ce = (on_device(a, self.device) for a in (tid, cs, ce))
            self._gkey, self._gdev = None, None
            if self.flat is not None:
                self.flat = tuple(on_device(a, self.device) for a in self.flat)

    def reseed_masters(self):
        """A param written in place from outside since the last step (its version moved
        by more than the optimizer's own updates): its master copy starts again from it,
        rather than overwriting the change; its compensation (kahan_sum) or its remainder
        (master_weights="remainder": the master is then the param) starts again from zero,
        as what it carried belonged to the value overwritten.  Buckets with one only."""
        local = [_local(p) for p in self.params]
        ver = np.fromiter(map(_VERSION, local), np.int64, len(local))
        if self.pver is not None:
            for k in np.flatnonzero(ver != self.pver):
                w = self.tensors[self.master_col][k]
                if w.dtype == torch.float32:
                    w.copy_(local[k])
                else:
                    w.zero_()
        return ver

    def stream_keys(self, seed):
        """Per param, the key of this step's stochastic-rounding stream: a function of the
        seed, the param's place and its step count (so a restored checkpoint continues
        the stream); the engines hash it with each element's index."""
        k = (self.steps.to(torch.int64) * 0x9E3779B1 + self.place + (seed & _M32) * 0x27D4EB2F)
        k = k & _M32
        return k.numpy() if self.backend == "numba" else k.to(self.device)

    def step_value(self, capturable, found_inf=None):
        """The step counters after this step's increment: a float if they all agree and
        live on the CPU (torch computes its bias corrections from a Python float),
        else (or when capturable) a float64 tensor, one value per param.  With a
        found_inf flag on the device, the increment is 1 - found_inf."""
        if found_inf is None:
            self.steps += 1
        else:
            self.steps += 1 - found_inf.to(self.steps.device, self.steps.dtype)
        if self.steps_np is not None and not capturable and found_inf is None:
            s = self.steps_np
            if s.size and s.min() == s.max():
                return float(s[0])
        return self.steps.double()

    def scalar_value(self, name):
        """A per-param scalar of the state: a float where all agree on the CPU, else a
        float64 tensor, one value per param (as step_value)."""
        v = self.scalars_np.get(name)
        if v is not None and not self.capturable and v.size and v.min() == v.max():
            return float(v[0])
        return self.scalars[name].double()

    def _table(self, coeffs, uniform):
        # coeffs: the engines' row (coefficients.pack), a float or a tensor per slot.  The
        # same coefficients for every tensor (Python floats, the usual case): passed as one
        # row (Numba) or as scalar arguments (Triton), the table is not written
        C, Cn = self.C, self.Cn if self.backend == "numba" else None
        if uniform and self.backend == "numba":
            Cn = np.array([coeffs], dtype=self.Cn.dtype)  # rounds double to float32 as C would
        elif not uniform:
            for j, c in enumerate(coeffs):
                if isinstance(c, torch.Tensor):  # a device op: no host sync
                    C[:, j].copy_(c)
                elif self.backend == "numba":  # cheaper than fill_; rounds alike
                    Cn[:, j] = c
                else:
                    C[:, j].fill_(c)
        return C, Cn

    def reduce(self, rule, flags, gptr, coeffs, found_inf=None):
        """Per tensor, the two sums of products of the rule's outputs (p * a, b * c: the
        engines' reduce kernels, flag REDUCE in ``flags``) over this bucket, nothing
        written: a (tensors, 2) float64 tensor on the params' device.  The tables and the
        proven grads' addresses are ``run``'s; no 8-bit slots.  A trust ratio's norms (Spec.trust) in one call per bucket."""
        # a Kahan compensation is the update's alone: the rule reads the param as without it
        mask = self.mask & ~UPDATE_KAHAN
        if mask & ~(UPDATE_A | UPDATE_B | UPDATE_C | UPDATE_MASTER | UPDATE_REMAINDER):
            raise NotImplementedError("reduce passes over 8-bit state")
        C, Cn = self._table(coeffs, False)  # (the Triton kernel reads the table)
        for i, p, w in self.work:
            w.copy_(p)
        if self.backend == "numba":
            part = torch.from_numpy(_numba().reduce(rule, flags, (self.dtype, self.sdtype),
                                                    mask, self.P, gptr, self.S, Cn,
                                                    self.tid, self.cs, self.ce, self.numel))
            tid = torch.from_numpy(self.tid)
        else:
            G = on_device(gptr, self.device)
            part = _triton().reduce(rule, flags, (self.dtype, self.sdtype), mask, self.P,
                                    G, self.S, C, self.tid, self.cs, self.ce, found_inf)
            tid = self.tid
        sums = part.new_zeros(len(self.params), 2).index_add_(0, tid, part)
        return whole_norms(self.params, sums, 1.0)  # (a DTensor's: the whole param's)

    def run(self, rule, flags, gptr, coeffs, found_inf=None, keys=None):
        uniform = not any(isinstance(c, torch.Tensor) for c in coeffs)
        C, Cn = self._table(coeffs, uniform)
        for i, p, w in self.work:
            w.copy_(p)
        aligned = self.aligned and not (gptr % 16).any()
        if self.flat is not None and uniform and keys is None \
                and np.array_equal(gptr, self.buffers.grad_ptrs):
            # every grad where the plan put it: one range per buffer (stochastic rounding
            # keeps per-tensor tables: its stream is a function of each tensor's place)
            fptrs, fgrad, total, tid, cs, ce = self.flat
            eng = _numba() if self.backend == "numba" else _triton()
            if self.backend == "numba":
                eng.run(rule, flags, (self.dtype, self.sdtype), self.mask, fptrs[0], fgrad,
                        list(fptrs[1:]), Cn, total, tid, cs, ce, total)
            else:
                eng.run(rule, flags, (self.dtype, self.sdtype), self.mask, fptrs[0], fgrad,
                        list(fptrs[1:]), C, tid, tid, cs, ce, True, found_inf, coeffs)
            return
        if self.backend == "numba":
            _numba().run(rule, flags, (self.dtype, self.sdtype), self.mask, self.P, gptr, self.S,
                         Cn, self.numel if keys is None else keys, self.tid, self.cs,
                         self.ce, self.numel, self.Q)
        else:
            if self._gkey is None or not np.array_equal(self._gkey, gptr):
                host = torch.from_numpy(gptr)
                if self.device.type == "cuda":
                    host = host.pin_memory()
                self._gkey, self._gdev = gptr, host.to(self.device, non_blocking=True)
            _triton().run(rule, flags, (self.dtype, self.sdtype), self.mask, self.P, self._gdev,
                          self.S, C, self.tid if keys is None else keys, self.tid, self.cs,
                          self.ce, aligned, found_inf, coeffs if uniform else None, self.Q)
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
