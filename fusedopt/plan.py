"""The engine calls for one param group (``_Plan``): which params go to which bucket
(bucket.py), which to torch's own for-loop, and the proof, before every step, that every
address the buckets' tables cached is still right.  The state a plan needs is created
here too: zeros in the state dtype, 8-bit codes (quant.py), master copies, factors.
Everything the plan needs of the algorithm comes in a ``GroupSpec``: it never calls the
optimizer.
"""
import operator
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from . import flat, host, matrix, quant, remainder, stacked
from .dtensor import mesh_dims
from .bucket import (KAHAN, _Bucket, _dtensor, _local, extra_name, has_kahan, has_master,
                     state_dtype)

_ENGINE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64,
                  torch.complex128)


@dataclass(frozen=True)
class GroupSpec:
    """What a plan and its buckets need of one param group's algorithm, resolved by the
    optimizer when it builds the plan (FusedOptimizer._describe).

    name: the optimizer's class name (for messages).
    slots: the state names of the rule's three slots (None: a slot the rule leaves unused).
    has_step: torch keeps ``state["step"]`` (all but SGD and Lion).
    scalars: the other per-param 0-d state entries (NAdam's mu_product), stacked per bucket.
    needs_state: whether the step keeps any state at all.
    init_state: ``init_state(p, state)``: the first entries of an empty state (the plan
        makes the missing slots: zeros of the state dtype).
    factored: the state of a matrix param is row and column factors (Spec.factored; their
        shapes, checks and buffers: matrix.py).
    real_only: complex params are left to the twin (Spec.complex_params is False).
    stacked: each bucket gets same-shape stacks of its updates (Spec.stacked: stacked.py);
        only 2-D params, not DTensors (their matmuls span the shards).
    trust: per-tensor factors from norms (Spec.trust): a DTensor's sums all-reduced over
        its mesh (a shard's sums are not the param's: dtensor.whole_norms).
    backend: the engine choice the optimizer was built with ("auto", "numba", "triton").
    index: the group's place among the optimizer's groups (stochastic rounding's stream).
    places: where ``group["params"]`` is a gradient-release bucket's slice of its group
        (release.py), each param's place in the whole group (the stream again); else None.
    """
    name: str
    slots: tuple
    has_step: bool
    scalars: tuple
    needs_state: bool
    init_state: Callable
    factored: bool
    real_only: bool
    backend: str
    index: int
    places: tuple = None
    stacked: bool = False
    trust: bool = False


def _unfit(spec, group, p, g, st):
    """Why the engines cannot take param p with grad g this step, or None.  Such a param
    is stepped by torch.optim's own for-loop instead: torch's result, or torch's error
    (a grad of another dtype or size, state that does not fit, a missing state key)."""
    if p.dtype not in _ENGINE_DTYPES or p.device.type not in ("cpu", "cuda"):
        return f"a {p.dtype} param on {p.device.type}"
    if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
        return f"a {g.dtype} grad of shape {tuple(g.shape)} for a {p.dtype} param of shape {tuple(p.shape)}"
    if spec.real_only and p.is_complex():
        return "a complex param"
    if spec.factored and isinstance(p, _dtensor()):  # (torch's ops all-reduce)
        return "a DTensor param of factored state (sums over the whole param)"
    if spec.trust and isinstance(p, _dtensor()) and mesh_dims(p) is None:
        # (a trust ratio's sums are all-reduced over the mesh dims that shard the param:
        # dtensor.whole_norms; a partial placement has no such dims)
        return "a DTensor param of a trust ratio, neither sharded nor replicated"
    if spec.stacked and (p.dim() != 2 or isinstance(p, _dtensor())):
        return "a param of a stacked update that is not a local 2-D tensor"
    if not spec.needs_state:
        return None
    for name in ("step", *spec.scalars) if spec.has_step else ():
        if name in st and not torch.is_tensor(st[name]):  # (a Python number: torch decides)
            return f"state {name!r} that is not a tensor"
    sdt = state_dtype(group, p)
    mixed = sdt != p.dtype
    for name in spec.slots:
        t = st.get(name) if name else None
        # (a state with entries but not this one: the twin decides, as torch's step does:
        # its KeyError, or the state it makes)
        if name and t is None and len(st):
            return f"state without {name!r}"
        # (a DTensor's state: the engines read its local shard, which must be the param's)
        x = st.get(name + quant.ABSMAX) if name else None
        four = torch.is_tensor(t) and torch.is_tensor(x) and t.dtype == torch.uint8 \
            and not isinstance(p, _dtensor()) and quant.bits_of(t, x) == 4
        if t is not None and (not torch.is_tensor(t) or t.device != p.device or (
                t.shape != quant.codes_shape(p, 4) if four else
                t.shape != p.shape or _local(t).shape != _local(p).shape)):
            return f"state {name!r} that does not fit the param"
        if t is not None and t.dtype == torch.uint8:
            # 8-bit or 4-bit codes (kept, or dequantized by the plan where they are not
            # asked for): only with an absmax of the right size beside them, locally too
            size = quant.block(4 if four else 8)
            if not torch.is_tensor(x) or (x.shape != quant.absmax_shape(p) and not four) \
                    or _local(x).numel() != quant.nblocks(_local(p).numel(), size) \
                    or x.dtype != torch.float32 or x.device != p.device:
                return f"8-bit state {name!r} without a fitting {name + quant.ABSMAX!r}"
        elif t is not None and t.dtype != p.dtype and not (mixed and t.is_floating_point()):
            return f"state {name!r} that does not fit the param"
    return matrix.unfit_factors(p, st) if spec.factored else None


def _compensation(t, p):
    """p's Kahan compensation (kahan_sum=True) from ``t``, the state's: t itself where it is
    a contiguous tensor of p's dtype, device and (local) shape (a user's replacement
    honoured, as torch honours replaced state), a copy that is where it is not, zeros
    where there is none (a fresh optimizer, a torch.optim state_dict) or it is not a
    tensor of that shape.  Like the master copy, a local tensor under FSDP2."""
    local = _local(p)
    if not torch.is_tensor(t) or _local(t).shape != local.shape:
        return torch.zeros_like(local, memory_format=torch.contiguous_format)
    t = _local(t)
    if t.dtype != p.dtype or t.device != local.device or not t.is_contiguous():
        return t.to(local.device, p.dtype, memory_format=torch.contiguous_format)
    return t


def _overlapping(start, end):
    """Indices of the [start, end) ranges that overlap another (a param given twice, views
    of one storage): the engines update all chunks at once, torch one param after
    another.  A sweep in order of start: a range that starts before the reach of those
    before it overlaps the one that reached furthest (and every overlapping one is found
    so, as each is either that one or starts inside it)."""
    keep = np.flatnonzero(end > start)
    order = keep[np.argsort(start[keep], kind="stable")]
    s, e = start[order], end[order]
    if len(s) < 2:
        return set()
    reach = np.maximum.accumulate(e)
    who = np.maximum.accumulate(np.where(e == reach, np.arange(len(e)), 0))
    q = np.flatnonzero(s[1:] < reach[:-1]) + 1
    return set(order[q].tolist()) | set(order[who[q - 1]].tolist())


def _memory(state, params, idx, need):
    """(tensors, owners, start, end): the params at ``idx`` and their ``state`` tensors
    (step counters included), each with the index of its param and the [start, end) of
    its memory (host.spans: empty where it has none)."""
    tensors, owner = [], []
    for i in idx:
        st = (state.get(params[i]) or {}) if need else {}
        for t in (params[i], *(v for v in st.values() if torch.is_tensor(v))):
            tensors.append(_local(t))
            owner.append(i)
    return (tensors, owner, *host.spans(tensors))


def _sharing(take, memory):
    """Positions in ``take`` of the params whose memory, or whose state tensors' (step
    counters included), overlaps another of these tensors: a param given twice, a step
    counter shared by two params (torch counts it up once per param), a moment that is
    the param itself or another moment.  torch's for-loop steps those params.
    ``memory``: _memory() of the live params, a superset of ``take``."""
    _, owner, start, end = memory
    pos = {i: k for k, i in enumerate(take)}
    sel = np.flatnonzero(np.isin(owner, take))
    return {pos[owner[sel[j]]] for j in _overlapping(start[sel], end[sel])}


def _meeting(params, live, memory, local):
    """Indices of the params whose grad meets memory the step writes (a live param's or
    its state's: `p1.grad = p0.detach()`), and of the params that memory belongs to:
    torch reads such a grad before or after that update, by param order; the engines
    update all at once.  torch's for-loop steps them all, in its order.  (The grads are
    checked by host.read, as at every step.)  ``memory``: _memory() of ``live``."""
    _, owner, start, end = memory
    G = host.read([params[i] for i in live], [], local, host.ranges(start, end))[1]
    out = set()
    for k in np.flatnonzero(G[:, -1] & host.MEETS):  # rare: the owners of what it meets
        s, e = host.span(_local(params[live[k]].grad))
        out.add(live[k])
        out.update(owner[j] for j in np.flatnonzero((start < e) & (s < end)))
    return out


class _Plan:
    """The engine calls for one group: which params go to which bucket, and which to
    torch's own for-loop (``fallback``).  What every cached address depends on is kept
    here (the facts of each param and watched state tensor: address, size in bytes, dtype,
    device, layout; the state's change count) and compared before every step (``valid``,
    then ``grad_ptrs`` on the fast path or ``proven`` on the general one); the plan also
    holds every storage its tables point into, so that no address it cached can be freed
    and reused while it lives."""

    def __init__(self, spec, state, group, params, live, grads):
        self.group, self.params, self.nparams, self.live = group, params, len(params), live
        self.spec, self.state_obj, self.slots = spec, state, spec.slots
        self.capturable = bool(group.get("capturable", False))  # where the counters live
        self.form = _form(group)
        need = spec.needs_state
        order, fresh, self.fallback = {}, set(), []
        take = []
        for i in live:
            p = params[i]
            st = state[p] if need else {}
            why = _unfit(spec, group, p, grads[i], st)
            (self.fallback if why else take).append(i)
        self.dist = any(isinstance(params[i], _dtensor()) for i in live)
        memory = _memory(state, params, live, need)  # (before state made here)
        for k in sorted(_sharing(take, memory), reverse=True):
            self.fallback.append(take.pop(k))
        meeting = _meeting(params, live, memory, _local if self.dist else None)
        self.fallback += [i for i in take if i in meeting]
        take = [i for i in take if i not in meeting]
        self.fallback.sort()
        for i in take:
            p = params[i]
            order.setdefault((p.device, p.dtype, state_dtype(group, p)), []).append(i)
            if not need:
                continue
            st = state[p]
            if len(st) == 0 and spec.has_step:
                spec.init_state(p, st)
            sdt = state_dtype(group, p)
            for name in self.slots:
                if name and sdt in (torch.uint8, torch.uint4):
                    fresh.update(quant.fit(st, name, p, quant.bits(sdt)))
                elif name and st.get(name) is None:
                    st[name] = torch.zeros_like(p, dtype=sdt, memory_format=torch.preserve_format)
                    fresh.add(id(p))
                elif name and st[name].dtype == torch.uint8:  # 8-bit state, now unwanted
                    st[name] = quant.dequantize_state(st, name).to(sdt)
                elif name and st[name].dtype != sdt:  # float32 state asked for, or given up
                    st[name] = st[name].to(sdt)
            if has_master(group, p) and (not torch.is_tensor(st.get("master")) or not
                                         remainder.rounds_to(st["master"], _local(p))):
                # a fresh optimizer, a state_dict without master copies, or a param changed
                # from outside (p.data = ..., model.load_state_dict): start from the param
                st["master"] = _local(p).detach().to(torch.float32, memory_format=torch.contiguous_format,
                                                      copy=True)
            if remainder.held(group, p):  # (a master loaded, of either mode: split)
                st[remainder.KEY] = remainder.adopt(st, _local(p))
            elif remainder.KEY in st:  # master_weights="remainder" given up
                del st[remainder.KEY]
            if has_kahan(group, p):
                st[KAHAN] = _compensation(st.get(KAHAN), p)
        if group.get("flat") and self.dist:
            raise RuntimeError("flat=True does not take DTensor params (FSDP2 shards them in "
                               "buffers of its own): build the optimizer without flat")
        flats = {}
        for key, idx in order.items():  # flat=True: each bucket re-homed into buffers
            ps = [params[i] for i in idx]
            if group.get("flat") and key[2] not in (torch.uint8, torch.uint4) \
                    and flat.eligible(ps, [grads[i] for i in idx]):  # 8-bit: per tensor
                extra = extra_name(group, ps[0])
                names = [n for n in self.slots if n] + [extra] * (extra is not None)
                flats[key] = flat.Buffers(ps, [state[p] for p in ps] if need else None,
                                          names)
        self.buckets = [(idx, _Bucket(spec, group, [params[i] for i in idx],
                                      [state[params[i]] for i in idx] if need else None,
                                      fresh, idx if spec.places is None
                                      else [spec.places[i] for i in idx], flats.get(key)))
                        for key, idx in order.items()]
        # a factored state's matrix tables and factor buffers, watched as the slots are
        for idx, b in self.buckets if spec.factored else ():
            b.tables, b.factors = matrix.factors(b, [state[params[i]] for i in idx])
        for _, b in self.buckets if spec.stacked else ():  # (held by the bucket alone)
            b.stacks = stacked.Stacks(b)
        self.all_live = len(live) == len(params)
        self.single = len(self.buckets) == 1 and self.all_live and not self.fallback
        self.take = take
        # the facts every cached address depends on (host.py), re-read before each step
        self.local = _local if self.dist else None
        self.watched = [t for _, b in self.buckets for t in b.watched]
        self.need = need
        self.record(params)
        self.changes = state.changes  # after this plan's own writes to the state

    def record(self, params):
        """Read and keep what the proof compares: the facts every cached address depends
        on (host.py), and the memory this group's step writes, which no grad may meet."""
        self.pfacts, _, self.wfacts = host.read([params[i] for i in self.take], self.watched,
                                                self.local)
        # a grad the engines read in place: its param's size, dtype, device and shape,
        # contiguous, not meeting written memory
        self.gwant = self.pfacts[:, 1:].copy()
        self.gwant[:, -1] |= host.CONTIGUOUS
        tensors, owner, start, end = _memory(self.state_obj, params, self.live, self.need)
        self.written, self.owned = host.ranges(start, end), host.owned(tensors)
        if self.fallback:
            # torch's for-loop writes these params and their state: their facts too, so
            # that the memory written stays as recorded; their grads must not meet what
            # the engines write (meeting each other's memory is why they are there:
            # torch steps them in its order)
            self.fparams = [params[i] for i in self.fallback]
            self.fwatched = [v for p in self.fparams for v in
                             ((self.state_obj.get(p) or {}) if self.need else {}).values()
                             if torch.is_tensor(v)]
            self.ffacts = host.read(self.fparams, self.fwatched, self.local)[::2]
            taken = np.isin(owner, self.take)
            self.engine_written = host.ranges(start[taken], end[taken])

    def grad_ptrs(self, params):
        """The fast path's proof and table: the grads' addresses, or None unless every
        param, grad and watched state tensor is where, as large, of the dtype, device and
        layout the plan recorded (grads: their param's, contiguous, not None or sparse,
        not meeting memory the step writes).  The general path then checks further and
        rebuilds."""
        P, G, W = host.read(params, self.watched, self.local, self.written, self.owned)
        if (np.array_equal(P, self.pfacts) and np.array_equal(G[:, 1:], self.gwant)
                and np.array_equal(W, self.wfacts)):
            return np.ascontiguousarray(G[:, 0])
        return None

    def proven(self, params):
        """The general path's proof: the params the engines take and the watched state
        tensors are as recorded, their grads of the param's size, dtype, device and
        shape (a non-contiguous grad is copied there), and no grad meets memory the
        step writes."""
        P, G, W = host.read([params[i] for i in self.take], self.watched, self.local,
                            self.written, self.owned)
        if self.fallback:
            FP, FG, FW = host.read(self.fparams, self.fwatched, self.local,
                                   self.engine_written, self.owned)
            if not (np.array_equal(FP, self.ffacts[0]) and np.array_equal(FW, self.ffacts[1])
                    and not (FG[:, -1] & host.MEETS).any()):
                return False
        return (np.array_equal(P, self.pfacts) and np.array_equal(W, self.wfacts)
                and np.array_equal(G[:, 1:4], self.pfacts[:, 1:4])
                and host.same_shapes(G, self.pfacts) and not (G[:, -1] & host.MEETS).any())

    def valid(self, state, group, params, live, slots):
        """Still right for this group, params and live indices (None: every param), its
        state slots as the algorithm now names them (``slots``), and the state unchanged
        since?"""
        live_ok = self.all_live if live is None else self.live == live
        return (self.group is group and self.state_obj is state
                and self.changes == state.changes
                and self.nparams == len(params) and live_ok
                and all(map(operator.is_, self.params, params))
                and self.slots == slots
                and self.capturable == bool(group.get("capturable", False))
                and self.form == _form(group))


def _form(group):
    """The group's options that decide how its state is held: a change (a user setting
    group["state_dtype"] between steps) rebuilds the plan, which converts the state."""
    return (group.get("state_dtype"), group.get("master_weights"), group.get("kahan_sum"),
            group.get("flat"))


def refuse_torch(spec, state, group, params):
    """torch.optim has no l1, master_weights, state_dtype or stochastic_rounding: params
    the engines do not take are then a RuntimeError naming them and why (before the
    engines run: no half-done step)."""
    if group.get("l1") or group.get("master_weights") or group.get("stochastic_rounding") \
            or group.get("state_dtype") is not None or group.get("kahan_sum"):
        why = [_unfit_reason(spec, state, group, p) for p in params]
        raise RuntimeError(
            f"fusedopt.{spec.name}: params {why} cannot be fused, and torch.optim has no l1, "
            f"master_weights, state_dtype, stochastic_rounding or kahan_sum to step them with")


def _unfit_reason(spec, state, group, p):
    # for the error message: the param's index in its group and why it went to torch
    why = _unfit(spec, group, p, p.grad, state.get(p, {})) or \
        "its memory, its state's or its grad's overlapping a param or state tensor"
    return f"{next(i for i, q in enumerate(group['params']) if q is p)} ({why})"
