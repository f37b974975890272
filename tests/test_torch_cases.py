"""Single-process cases where fusedopt once differed from torch.optim (values or errors):
each compares against torch.optim's for-loop (foreach=False) on fresh random data."""
import pytest
import torch

import fusedopt
from harness import BACKENDS

SHAPES = [(7,), (1023,), (5, 3)]


def _params(gen, shapes, dtype=torch.float32, memory_format=None):
    ps = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    if memory_format is not None:
        ps = [p.to(memory_format=memory_format) if p.dim() == 4 else p for p in ps]
    return [torch.nn.Parameter(p) for p in ps]


def _twins(ps):
    return [torch.nn.Parameter(p.detach().clone(memory_format=torch.preserve_format))
            for p in ps]


# --- 1. max_grad_norm after the param groups changed between steps -----------------------

def _change_groups(opt, change, new):
    if change == "reassign":
        opt.param_groups[0]["params"] = new
    else:
        del opt.param_groups[1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("change", ["reassign", "delete"])
def test_max_grad_norm_reads_current_param_groups(change, backend):
    """max_grad_norm clips by the norm over the params of the groups as they are at the
    step: after ``group["params"]`` is reassigned or a group deleted, as torch's
    clip_grad_norm_ over the current groups' params followed by torch.optim's step."""
    gen = torch.Generator().manual_seed(11)
    first, second, new = (_params(gen, s) for s in (SHAPES, [(33,), (4, 6)], [(9,), (1023,)]))
    sides = []
    for make in (lambda ps: ps, _twins):
        sides.append([make(ps) for ps in (first, second, new)])
    ours = fusedopt.AdamW([{"params": sides[0][0]}, {"params": sides[0][1]}], lr=1e-2,
                          max_grad_norm=1.0, backend=backend)
    theirs = torch.optim.AdamW([{"params": sides[1][0]}, {"params": sides[1][1]}], lr=1e-2,
                               foreach=False)
    for s in range(4):
        if s == 1:
            for opt, (_, _, n) in zip((ours, theirs), sides):
                _change_groups(opt, change, n)
        # every param has a grad, so a stale list would put the wrong ones into the norm
        for k, p in enumerate(p for ps in sides[0] for p in ps):
            g = torch.randn(p.shape, generator=gen) * 10
            p.grad = g
            [q for ps in sides[1] for q in ps][k].grad = g.clone()
        current = [p for g in theirs.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(current, 1.0, foreach=False)
        ours.step()
        theirs.step()
        assert norm > 1.0  # the factor is in use
        # the total norm is a float32 reduction whose order is torch's choice (it varies
        # with the CPU's vector width): a few ulp of it, far below what a missing or an
        # extra tensor changes
        torch.testing.assert_close(ours.grad_norm, norm, rtol=1e-6, atol=0)
        for a, b in zip(*([p for g in o.param_groups for p in g["params"]]
                          for o in (ours, theirs))):
            # the norm's few ulp pass into the clip factor; Adam's update divides the
            # factor out but for eps, so they move a param by far less than an ulp of lr
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --- 2. GradScaler with non-contiguous grads ----------------------------------------------

AMP_SHAPES = [(7,), (1023,), (6, 5), (2, 3, 4, 5)]


def _scaler_steps(opt, ps, gen_seed, steps=3):
    """GradScaler steps over a linear loss (its grads do not depend on the params, so any
    two optimizers see the same grads); the 4-D param is channels_last (so is its grad),
    the 2-D param's grad is a transposed, non-contiguous copy."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    gen = torch.Generator().manual_seed(gen_seed)
    for _ in range(steps):
        opt.zero_grad()
        ws = [torch.randn(p.shape, generator=gen) for p in ps]
        scaler.scale(sum((p.float() * w).sum() for p, w in zip(ps, ws))).backward()
        for p in ps:
            if p.dim() == 2:
                p.grad = p.grad.t().contiguous().t()
        assert not all(p.grad.is_contiguous() for p in ps)
        scaler.step(opt)
        scaler.update()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD", "Adafactor"])
def test_gradscaler_non_contiguous_grads(name, backend):
    """After scaler.step the grads hold the unscaled values, as torch's unscale_ leaves
    them in place, for channels_last and transposed grads; the params are torch's."""
    hp = dict(lr=1e-2, momentum=0.9) if name == "SGD" else dict(lr=1e-2)
    gen = torch.Generator().manual_seed(5)
    ours_p = _params(gen, AMP_SHAPES, memory_format=torch.channels_last)
    theirs_p = _twins(ours_p)
    ours = getattr(fusedopt, name)(ours_p, backend=backend, **hp)
    theirs = getattr(torch.optim, name)(theirs_p, foreach=False, **hp)
    _scaler_steps(ours, ours_p, 6)
    _scaler_steps(theirs, theirs_p, 6)
    for a, b in zip(ours_p, theirs_p):
        assert a.grad.stride() == b.grad.stride()
        # the unscale is one float32 multiply on both sides
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
        # the for-loop's op order is the kernel's: equal bit for bit; but Adafactor's row
        # and column means, float32 reductions in an order of torch's choosing (ours sum
        # in float64), leave its params a few ulp apart (the Adafactor spec's ulp)
        tol = dict(rtol=4e-6, atol=4e-7) if name == "Adafactor" else dict(rtol=0, atol=0)
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("option", [dict(master_weights=True), dict(state_dtype=torch.uint8),
                                    dict(flat=True)], ids=["master", "8bit", "flat"])
def test_gradscaler_non_contiguous_grads_options(option, backend):
    """The same write-back with master weights (bfloat16 params), 8-bit state and flat
    buffers: the grads end as torch's unscale_ leaves them (torch.optim has none of the
    three options, so only the grads are compared)."""
    dtype = torch.bfloat16 if "master_weights" in option else torch.float32
    gen = torch.Generator().manual_seed(8)
    ours_p = _params(gen, AMP_SHAPES, dtype, memory_format=torch.channels_last)
    theirs_p = _twins(ours_p)
    ours = fusedopt.AdamW(ours_p, lr=1e-2, backend=backend, **option)
    theirs = torch.optim.AdamW(theirs_p, lr=1e-2, foreach=False)
    _scaler_steps(ours, ours_p, 9)
    _scaler_steps(theirs, theirs_p, 9)
    for a, b in zip(ours_p, theirs_p):
        # both unscale in float32 and round once to the grad's dtype
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


# --- 3. the extra keywords' errors name the argument ---------------------------------------

EXTRA_BAD = [("l1", None), ("l1", "0.1"), ("l1", [0.1]),
             ("max_grad_norm", "1.0"), ("max_grad_norm", [1.0]),
             ("state_dtype", "float32"), ("state_dtype", [torch.float32]),
             ("master_weights", None), ("master_weights", "yes"), ("master_weights", [True]),
             ("stochastic_rounding", None), ("stochastic_rounding", "yes"),
             ("stochastic_rounding", [True]),
             ("flat", None), ("flat", "yes"), ("flat", [True]),
             ("backend", None), ("backend", "cuda"), ("backend", ["numba"])]


@pytest.mark.parametrize("name", ["Adam", "SGD", "Adafactor"])
@pytest.mark.parametrize("key,value", EXTRA_BAD, ids=[f"{k}={v!r}" for k, v in EXTRA_BAD])
def test_extra_keyword_errors_name_the_argument(name, key, value):
    """A None (where None means nothing) or a value of the wrong type for one of
    fusedopt's keywords is a ValueError or TypeError whose message names it (torch.optim
    has no such keywords: there the whole call is refused)."""
    ps = [torch.nn.Parameter(torch.randn(7))]
    with pytest.raises((TypeError, ValueError), match=rf"\b{key}\b"):
        getattr(fusedopt, name)(ps, lr=1e-2, **{key: value})
    with pytest.raises(TypeError):
        getattr(torch.optim, name)(ps, lr=1e-2, **{key: value})


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_extra_keywords_none_where_none_is_off(name):
    """max_grad_norm=None (no clipping) and state_dtype=None (the param's dtype) are the
    defaults: accepted, and the step is torch.optim's."""
    gen = torch.Generator().manual_seed(3)
    ps = _params(gen, SHAPES)
    qs = _twins(ps)
    ours = getattr(fusedopt, name)(ps, lr=1e-2, max_grad_norm=None, state_dtype=None)
    theirs = getattr(torch.optim, name)(qs, lr=1e-2, foreach=False)
    for p, q in zip(ps, qs):
        p.grad = torch.randn(p.shape, generator=gen)
        q.grad = p.grad.clone()
    ours.step()
    theirs.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradscaler_skipped_step_unscales_grads(dtype, backend):
    """A step the scaler skips (an inf in a grad): torch's unscale_ ran before the skip, so
    the grads are left unscaled (inf stays inf); params and state untouched on both sides."""
    gen = torch.Generator().manual_seed(9)
    ours_p = _params(gen, AMP_SHAPES, dtype)
    theirs_p = _twins(ours_p)
    sides = [(fusedopt.AdamW(ours_p, lr=1e-2, backend=backend), ours_p),
             (torch.optim.AdamW(theirs_p, lr=1e-2, foreach=False), theirs_p)]
    ws = [torch.randn(p.shape, generator=gen) for p in ours_p]
    for opt, ps in sides:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        opt.zero_grad()
        scaler.scale(sum((p.float() * w).sum() for p, w in zip(ps, ws))).backward()
        ps[1].grad[3] = float("inf")
        scaler.step(opt)
        assert not opt.state  # skipped: no state made
    for a, b in zip(ours_p, theirs_p):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)


def test_gradscaler_step_without_grads():
    """GradScaler.step over an optimizer none of whose params has a grad (all frozen): the
    scaler hands over found_inf as the int 0 (a sum over no devices); torch's fused Adam
    steps nothing, and so does fusedopt (torch's for-loop meets the scaler's own assert)."""
    ps = [torch.nn.Parameter(torch.randn(n)) for n in (3, 7)]
    before = [p.detach().clone() for p in ps]
    for opt in (fusedopt.Adam(ps, lr=0.1), torch.optim.Adam(ps, lr=0.1, fused=True)):
        scaler = torch.amp.GradScaler("cpu")
        scaler.scale(torch.ones(()))
        scaler.step(opt)  # (its update() then asserts that no inf check was recorded)
        assert not opt.state
    assert all(torch.equal(a, b) for a, b in zip(ps, before))
