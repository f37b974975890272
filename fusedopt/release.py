"""Gradient release: the optimizer step taken during the backward, bucket by bucket, each
gradient freed as soon as its bucket is stepped, so that a backward never holds a whole
model's gradients (the API is torch-optimi's: ``gradient_release=True`` on the optimizer,
``prepare_for_gradient_release(model, opt)``, ``remove_gradient_release(model)``).

The model's trainable params that the optimizer holds are cut into buckets in reverse
registration order (the order a backward usually produces their gradients), each within
one param group, a module's params kept together, of at most ``bucket_mb`` MiB (a module
larger than that is a bucket alone).  ``Tensor.register_post_accumulate_grad_hook`` tells
when a param's gradient is complete (a param used twice in the forward: after both parts
were added, which autograd sums before writing the gradient); when every param of a
bucket has told, the bucket is stepped with one fused call per device and dtype and its
gradients are set to None.  At the end of the backward (a callback queued on autograd's
engine) the buckets some of whose params got no gradient this time are stepped with the
params that did, as a normal step skips params without a gradient.  Only params whose
hook has told are ever stepped, so when a bucket is stepped changes memory, never values.

Each bucket is stepped by the optimizer's own ``_step_group`` on a view of its group
(``_Part``: the bucket's params, every other key read from the group at that moment, so
lr schedulers work) with a plan of its own: the plan proves every cached address before
each call as for a whole group (DESIGN.md, invariant 1), and keeps each param's place in
its group (stochastic rounding's stream).  Keys a step writes into its group (AdEMAMix's
``"step"``) are kept on the bucket's view until the backward ends, then written to the
group once.  Data flows down: the hooks call the optimizer; nothing below calls back here.
"""
import collections
import operator
import weakref

import torch

from .dtensor import dtensor_class

_EARLY = 0  # a bucket is stepped when this many of its params still lack a gradient
_FLUSH = True  # step what a backward left in incomplete buckets (tests make mutants of both)

# params prepared for release, by id (clip_grad_norm_ refuses them: their grads are gone)
_RELEASED = weakref.WeakValueDictionary()


def released(params):
    """Whether any of ``params`` is prepared for gradient release."""
    return any(_RELEASED.get(id(p)) is p for p in params)


class _Part(collections.ChainMap):
    """One bucket's view of its param group: ``"params"`` the bucket's, every other key the
    group's (``parent``); ``places``: each param's index in ``parent["params"]``."""

    def __init__(self, params, parent, places):
        super().__init__({"params": params}, parent)
        self.parent, self.places = parent, tuple(places)

    def write_back(self):
        # what the step wrote into the group (AdEMAMix's "step"), the same from each bucket
        mine = self.maps[0]
        for k in [k for k in mine if k != "params"]:
            self.parent[k] = mine.pop(k)


class _Bucket:
    """The params of one bucket, its view of their group, and those announced so far."""
    __slots__ = ("params", "part", "arrived")

    def __init__(self, params, part):
        self.params, self.part = params, part
        self.arrived = {}  # id -> param: those whose gradient is complete, not yet stepped


class _Release:
    """The hooks and buckets of one prepared model (``model._gradient_release``)."""

    def __init__(self, model, opt, bucket_mb):
        self.opt, self.limit = opt, int(bucket_mb * 2 ** 20)
        mine = {id(p) for g in opt.param_groups for p in g["params"]}
        # the model's trainable params the optimizer holds, in registration order, each
        # with the name of the module that registered it
        self.named = [(n.rpartition(".")[0], p) for n, p in model.named_parameters()
                      if p.requires_grad and id(p) in mine]
        self.params = [p for _, p in self.named]
        self.plans = {}  # the buckets' plans, by id of their _Part
        self.task = None  # the backward under way (autograd's graph task id)
        self.inner = set()  # backwards run inside it (reentrant checkpointing)
        self._layout()
        self.handles = [p.register_post_accumulate_grad_hook(self._arrived) for p in self.params]
        for p in self.params:
            _RELEASED[id(p)] = p

    def _current(self):
        """Whether the optimizer's groups, and the params in each, are those of the layout
        (compared by identity: one id per param, once per backward)."""
        groups = self.opt.param_groups
        return len(groups) == len(self.groups) and all(map(operator.is_, groups, self.groups)) \
            and [list(map(id, g["params"])) for g in groups] == self.ids

    def _layout(self):
        """Cut the params into buckets from the optimizer's groups as they are now: in
        reverse registration order, one open bucket per group, a module's params of one
        group never split (one backward node makes a module's gradients together: a
        bucket that ended inside a module would wait for a gradient made with its
        neighbour's, and hold both), a bucket closed before it would pass the limit."""
        self.groups = list(self.opt.param_groups)
        self.ids = [list(map(id, g["params"])) for g in self.groups]
        where = {i: (gi, k) for gi, ids in enumerate(self.ids) for k, i in enumerate(ids)}
        units = []  # (group index, module name) -> [(param, its place in the group)]
        for owner, p in reversed(self.named):
            at = where.get(id(p))
            if at is None:  # no longer the optimizer's: its gradient accumulates as usual
                continue
            if not units or units[-1][0] != (at[0], owner):
                units.append(((at[0], owner), []))
            units[-1][1].append((p, at[1]))
        cuts, open_ = [], {}  # open_: group index -> [items, bytes]
        for (gi, _), items in units:
            nbytes = sum(p.numel() * p.element_size() for p, _ in items)
            cut = open_.get(gi)
            if cut is None or (cut[1] and cut[1] + nbytes > self.limit):
                cut = open_[gi] = [[], 0]
                cuts.append(cut)
            cut[0].extend(items)
            cut[1] += nbytes
        self.buckets, self.bucket_of, self.plans = [], {}, {}
        for cut, _ in cuts:
            group = self.opt.param_groups[where[id(cut[0][0])][0]]
            ps = [p for p, _ in cut]
            b = _Bucket(ps, _Part(ps, group, [k for _, k in cut]))
            self.buckets.append(b)
            self.bucket_of.update((id(p), b) for p in ps)

    def _arrived(self, p):
        task = torch._C._current_graph_task_id()
        if task != self.task and task not in self.inner:
            self._begin(task)
        b = self.bucket_of.get(id(p))
        if b is None:
            return
        b.arrived[id(p)] = p
        if len(b.arrived) == len(b.params) - _EARLY:
            self._step(b)

    def _begin(self, task):
        # the first gradient of a backward: the layout checked against the optimizer's
        # groups (load_state_dict, add_param_group, group["params"] changed) where no
        # gradient waits on the old one, the end's callback queued
        if not self._current() and not any(b.arrived for b in self.buckets):
            self._layout()
        if self.task is None:
            self.task = task
        else:  # run inside the backward under way, or that one raised (its end never came)
            self.inner.add(task)
        if _FLUSH:
            torch.autograd.Variable._execution_engine.queue_callback(lambda: self._end(task))

    def _step(self, b):
        """Step the params of ``b`` whose gradient is complete, and free those gradients.
        A param of ``b`` holding a gradient its hook has not announced (left from before
        this backward) keeps it, out of this step."""
        arrived, b.arrived = b.arrived, {}
        hidden = [(p, p.grad) for p in b.params if id(p) not in arrived and p.grad is not None]
        for p, _ in hidden:
            p.grad = None
        try:
            with torch.no_grad():
                self.opt._step_group(b.part, plans=self.plans)
        finally:
            for p, g in hidden:
                p.grad = g
        for p in arrived.values():
            p.grad = None

    def _end(self, task):
        # a backward's end: the buckets it left incomplete (params that got no gradient)
        # stepped with the params that did; at the outermost one, what the steps wrote
        # into the groups written there
        for b in self.buckets:
            if b.arrived:
                self._step(b)
        if task == self.task:
            self.task = None
            self.inner.clear()
            self._write_back()
        self.inner.discard(task)

    def _write_back(self):
        for b in self.buckets:
            b.part.write_back()

    def remove(self):
        self._write_back()
        for h in self.handles:
            h.remove()
        for p in self.params:
            if _RELEASED.get(id(p)) is p:
                del _RELEASED[id(p)]


def prepare_for_gradient_release(model, optimizer, ignore_existing_hooks=False, bucket_mb=25):
    """Step ``optimizer`` during each backward of ``model``, bucket by bucket, and free each
    bucket's gradients right after (so the backward never holds every gradient at once).

    ``optimizer``: a fusedopt optimizer built with ``gradient_release=True``.  Each trainable
    param of ``model`` that the optimizer holds gets a post-accumulate-grad hook (torch's
    ``Tensor.register_post_accumulate_grad_hook``); the params are cut, in reverse
    registration order, into buckets of at most ``bucket_mb`` MiB within one param group
    (a module's params of one group kept together; a larger module is a bucket alone),
    and a bucket is stepped (one fused call per device and dtype) when its last param's
    gradient is complete.  Params are then bit for bit what a normal ``backward(); step()``
    gives.  ``optimizer.step()`` afterwards steps only params that still hold a gradient
    (none of the prepared ones) and ``zero_grad()`` finds theirs already None.

    Raises ``TypeError`` for an optimizer not fusedopt's, ``ValueError`` for one built
    without ``gradient_release=True`` or a model already holding post-accumulate-grad hooks
    (unless ``ignore_existing_hooks``), ``RuntimeError`` for DTensor (FSDP2) params or a
    DistributedDataParallel model (both untested).  See docs/options.md."""
    # (FusedOptimizer's class attribute: importing optimizer here would close a circle,
    # optimizer -> clip -> release)
    if not hasattr(type(optimizer), "_gradient_release"):
        raise TypeError("`optimizer` must be a fusedopt optimizer, got "
                        f"{type(optimizer).__name__}")
    if not optimizer._gradient_release:
        raise ValueError("`optimizer` must be built with gradient_release=True")
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        raise RuntimeError("gradient_release is not tested under DistributedDataParallel "
                           "(its own hooks all-reduce the gradients after the backward)")
    params = [p for p in model.parameters() if p.requires_grad]
    if any(isinstance(p, dtensor_class()) for p in params):
        raise RuntimeError("gradient_release is not tested with DTensor (FSDP2) params: "
                           "build the optimizer without gradient_release")
    if hasattr(model, "_gradient_release"):
        raise ValueError("`model` is already prepared for gradient release: call "
                         "remove_gradient_release(model) first")
    if not ignore_existing_hooks and any(p._post_accumulate_grad_hooks for p in params):
        raise ValueError("Model already has post_accumulate_grad_hooks. If this is expected, "
                         "rerun with `ignore_existing_hooks=True`.")
    if not isinstance(bucket_mb, (int, float)) or isinstance(bucket_mb, bool) or bucket_mb < 0:
        raise ValueError(f"bucket_mb must be a number >= 0, got {bucket_mb!r}")
    model._gradient_release = _Release(model, optimizer, bucket_mb)


def remove_gradient_release(model):
    """Remove the hooks ``prepare_for_gradient_release`` put on ``model``'s params: the
    optimizer steps in ``step()`` again (its state, step counts included, carries on).
    Warns, as torch-optimi does, when ``model`` was not prepared."""
    release = getattr(model, "_gradient_release", None)
    if release is None:
        import warnings
        warnings.warn("`model` does not have any gradient release post_accumulate_grad_hooks "
                      "to remove.")
        return
    release.remove()
    del model._gradient_release
