"""The two sides of a random program (tests/programs.py): fusedopt and its torch.optim
twin on equal params, and the comparison made after every operation."""
import copy
import os
import traceback

import torch

os.environ.setdefault("TRITON_INTERPRET", "1")  # the Triton engine on CPU tensors
import fusedopt  # noqa: E402
from fusedopt import arith, spec  # noqa: E402

# (not an algorithm of 2-D params alone, Spec.stacked: these programs step 1-D to 4-D params)
NAMES = [n for n in spec.names() if not spec.spec(n).stacked]
HP = {name: spec.spec(name).program_hp for name in NAMES}  # fusedopt/spec.py
SHAPES = [(5, 3), (7,), (1,), (33,), (2, 3, 4, 5)]


class Twin:
    """fusedopt and torch.optim on equal params; ``both(fn)`` applies fn to each side."""

    def __init__(self, rng, name, backend):
        self.rng, self.name = rng, name
        gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
        init = [torch.randn(s, generator=gen) for s in SHAPES]
        self.p = [[torch.nn.Parameter(t.clone()) for t in init] for _ in range(2)]
        self.flat = rng.random() < 0.5  # params, grads and state in flat buffers
        # fusedopt's max_grad_norm= against torch's clip_grad_norm_ before each step
        self.max_norm = rng.choice([0.5, 4.0, 1e3]) if rng.random() < 0.15 else None
        cls = getattr(fusedopt, name)
        # (LAMB: max_grad_norm is its twin's own argument, Apex's clipping inside the step,
        # not clip_grad_norm_ before it)
        self.own_clip = cls._own_clip and self.max_norm is not None
        theirs = dict(max_grad_norm=self.max_norm) if self.own_clip else {}
        self.opt = [spec.ready(cls(self.p[0], backend=backend, flat=self.flat,
                                   max_grad_norm=self.max_norm, **HP[name])),
                    spec.ready(cls.twin()(self.p[1], foreach=False, **HP[name], **theirs))]
        self.scaler = None
        self.low = False
        self.meets = []  # params whose grad is memory the step writes (op_grad_meets)

    def params(self, k):
        return [p for g in self.opt[k].param_groups for p in g["params"]]

    def grads(self, scale=1.0, inf=False):
        gen = torch.Generator().manual_seed(self.rng.randrange(1 << 30))
        gs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) * scale
              for p in self.params(1)]
        if inf and gs:
            gs[self.rng.randrange(len(gs))].view(-1)[0] = float("inf")
        # one draw for both sides: a grad that aliases memory the step writes (op_grad_meets)
        # must be written through, or replaced, alike on both
        into = [self.rng.random() < 0.7 for _ in gs]
        for ps in (self.params(0), self.params(1)):
            for p, g, keep in zip(ps, gs, into):
                if not (p.requires_grad and g.shape == p.shape):
                    continue
                if p.grad is not None and p.grad.shape == g.shape and p.grad.dtype == g.dtype \
                        and p.grad.layout is torch.strided and keep:
                    p.grad.copy_(g)  # as a backward accumulates into a zeroed grad
                else:
                    p.grad = g.clone()

    def step(self, run=lambda t, k: t.opt[k].step(), load=None, scaled=False):
        """Each side's step (or ``run``: ``scaled`` when it is a GradScaler's), after
        ``load`` if given; raises Raised with both sides' exception types when either
        raised."""
        kinds, at_load = [], None
        for k in range(2):
            try:
                if load is not None:
                    try:
                        self.opt[k].load_state_dict(copy.deepcopy(load))
                    except RuntimeError:
                        at_load = at_load or k == 0
                        raise
                if k:
                    with arith.replay():  # torch's op order, each op correctly rounded
                        self.clip_theirs(scaled)
                        run(self, k)
                else:
                    run(self, k)
                kinds.append(None)
            except Exception as e:  # noqa: BLE001
                if os.environ.get("PROGRAMS_TRACE"):
                    traceback.print_exc()
                kinds.append(type(e).__name__)
        if any(kinds):
            raise Raised(*kinds, ours_at_load=at_load)


    def clip_theirs(self, scaled):
        """torch's side of max_grad_norm: clip_grad_norm_ over the params as they are now
        (the groups' current lists), on unscaled grads under a GradScaler."""
        if self.max_norm is None or self.own_clip:
            return
        if scaled:
            self.scaler[1].unscale_(self.opt[1])
        torch.nn.utils.clip_grad_norm_(self.params(1), self.max_norm)


class Raised(Exception):
    def __init__(self, ours, theirs, ours_at_load=False):
        super().__init__(ours, theirs)
        self.ours, self.theirs, self.ours_at_load = ours, theirs, ours_at_load


def compare(t, where, grads=False):
    """The params agree (or, with ``grads``, the grads, where both sides have one)."""
    for a, b in zip(t.params(0), t.params(1)):
        if grads:
            a, b = a.grad, b.grad
            if a is None or b is None:
                assert a is b, (where, "a grad on one side only")
                continue
        assert a.dtype == b.dtype and a.shape == b.shape, \
            (where, a.dtype, b.dtype, a.shape, b.shape)
        # float16: torch rounds after every op, the kernels once per step (parity.py measures
        # which is nearer float64); here only "the same program, the same update" counts
        tol = dict(rtol=2e-2, atol=2e-2) if t.low else dict(rtol=1e-5, atol=1e-6)
        a, b = a.detach(), b.detach()
        if t.low:  # torch's eps=1e-8 rounds to 0 in float16: inf or NaN
            a, b = a[b.isfinite()], b[b.isfinite()]
        # (NaN where both are: a grad that is a second moment's memory, op_grad_meets,
        # can make it negative for both)
        torch.testing.assert_close(a, b, **tol, equal_nan=True, msg=lambda m: f"{where}: {m}")
