"""fusedopt and its torch twin on equal params (the safety tests' pairs): build them, give
both the same grads, step both, and compare params or outcomes (the same error type)."""
import contextlib

import torch

import fusedopt
from fusedopt import arith, parity
from fusedopt.spec import ready  # (schedule-free steps in train mode only)
from harness import HP, max_ulp


def twins(name, shapes=((5, 3), (7,), (65537,), (1,)), backend="numba", ours=None, **kw):
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen) for s in shapes]
    ps = [[torch.nn.Parameter(t.clone()) for t in init] for _ in range(2)]
    hp = {**HP[name], **kw}
    # (``ours`` overrides ``hp``: LAMB's max_grad_norm is an argument of its twin's)
    return ps, (ready(getattr(fusedopt, name)(ps[0], backend=backend, **{**hp, **(ours or {})})),
                ready(getattr(fusedopt, name).twin()(ps[1], foreach=False, **hp)))


def set_grads(ps, seed):
    gen = torch.Generator().manual_seed(seed)
    gs = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in ps[1]]
    for side in ps:
        for p, g in zip(side, gs):
            p.grad = g.clone()


def step_both(opts):
    opts[0].step()
    with arith.replay():
        opts[1].step()


def same(ps):
    for a, b in zip(*ps):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


def outcome(fn, message=False):
    """The type of the error fn() raises (with its text where ``message``), or None."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return (type(e).__name__, str(e)) if message else type(e)
    return None


def same_outcome(ps, opts, equal_nan=False, rtol=1e-6, atol=1e-7, replay_ours=False):
    """One step of each: the same error type, or (none) the same params.  Returns the
    error type.  ``replay_ours``: our step too under arith.replay (where it hands params
    to torch's for-loop, that loop then rounds as the twin's does on every CPU)."""
    with arith.replay() if replay_ours else contextlib.nullcontext():
        kinds = [outcome(opts[0].step)]
    with arith.replay():
        kinds.append(outcome(opts[1].step))
    assert kinds[0] is kinds[1]
    if kinds[0] is None:
        for a, b in zip(*ps):
            torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol,
                                       equal_nan=equal_nan)
    return kinds[0]


def train(cls, dtype, hp, shapes, steps=20, replay=True, **kw):
    """``steps`` steps of ``cls(params, **hp, **kw)`` on parity's random params and grads
    (float64-made, rounded to ``dtype``), torch's ops rounded once where ``replay``:
    (the params after, the params before, the optimizer)."""
    params, grads = parity.make_data(3, dtype, steps, shapes)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = cls(ps, **hp, **kw)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        with arith.replay() if replay else contextlib.nullcontext():
            opt.step()
    return [p.detach() for p in ps], params, opt


def agree(ours, theirs, init, dtype, lr):
    """The bound against a source package: float32 within 2 ulp of the param or the
    update; float64 within 1e-10 of the distance the params moved."""
    if dtype == torch.float32:
        assert max_ulp(ours, theirs, init, floor=lr) <= 2
    else:
        moved = max((t - i).abs().max().item() for t, i in zip(theirs, init) if t.numel())
        apart = max((o - t).abs().max().item() for o, t in zip(ours, theirs) if o.numel())
        assert moved > 0 and apart <= 1e-10 * moved
