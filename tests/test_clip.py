"""fusedopt.clip_grad_norm_ against torch.nn.utils.clip_grad_norm_ and float64, and the
optimizers' max_grad_norm= (clipping folded into the update pass)."""
import math

import pytest
import torch

import fusedopt
from fusedopt.spec import ready  # (schedule-free steps in train mode only)
from harness import BACKENDS, NAMES

SIZES = [0, 1, 7, 1023, 65537]
ORDERS = [2.0, 1.0, math.inf, 3.5, 0.0, -math.inf]


def grads_pair(sizes, dtype, seed=0, scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    ours, theirs = [], []
    for n in sizes:
        g = (torch.randn(n, generator=gen, dtype=torch.float64) * scale).to(dtype)
        for out in (ours, theirs):
            p = torch.nn.Parameter(torch.zeros(n, dtype=dtype))
            p.grad = g.clone()
            out.append(p)
    return ours, theirs


def check(a, b, ours, theirs, exact, dtype):
    """ours (norm a, grads) against torch (norm b, grads) and the float64 norm: within
    rounding of the float64 norm and no further from it than torch (whose float32 CPU
    norms are off by 27 ulp over 65537 elements, 7e-4 relative over 2**24: measured
    here); the clipped gradients differ from torch's only as the two norms do."""
    eps = torch.finfo(dtype).eps if dtype != torch.float64 else 1e-13
    assert a.dtype == b.dtype and a.shape == b.shape == ()
    err, torch_err = abs(a.double() - exact), abs(b.double() - exact)
    assert err <= 4 * eps * exact or err <= torch_err, (a, b, exact)
    assert err <= torch_err + eps * exact, (a, b, exact)
    rel = (abs(a.double() - b.double()) / exact).item() if exact else 0.0
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, rtol=rel + 8 * eps, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("order", ORDERS)
def test_matches_torch(order, dtype, backend):
    # torch refuses the (-)inf norm of an empty tensor (tested below)
    sizes = [n for n in SIZES if n or math.isfinite(order)]
    ours, theirs = grads_pair(sizes, dtype)
    exact = torch.linalg.vector_norm(torch.cat([p.grad.double() for p in ours]), order)
    a = fusedopt.clip_grad_norm_(ours, 1.0, order, backend=backend)
    b = torch.nn.utils.clip_grad_norm_(theirs, 1.0, order)
    check(a, b, ours, theirs, exact, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_cases(backend):
    # no gradients at all
    assert torch.equal(fusedopt.clip_grad_norm_([], 1.0), torch.nn.utils.clip_grad_norm_([], 1.0))
    assert fusedopt.clip_grad_norm_([torch.nn.Parameter(torch.ones(3))], 1.0).item() == 0
    # one huge tensor, then 20000 tiny ones (fewer through the interpreter, which runs
    # one program at a time in Python)
    for sizes in ([(1 << 24) + 3], [5] * (20000 if backend == "numba" else 1000)):
        ours, theirs = grads_pair(sizes, torch.float32, seed=len(sizes), scale=1e-3)
        exact = torch.linalg.vector_norm(torch.cat([p.grad.double() for p in ours]))
        a = fusedopt.clip_grad_norm_(ours, 0.5, backend=backend)
        b = torch.nn.utils.clip_grad_norm_(theirs, 0.5)
        check(a, b, ours, theirs, exact, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [math.inf, math.nan])
@pytest.mark.parametrize("order", [2.0, 1.0, math.inf, 3.5])
def test_non_finite(order, bad, backend):
    """error_if_nonfinite raises torch's error exactly when torch does; without it the
    norm and the scaled gradients are torch's (inf or NaN alike)."""
    ours, theirs = grads_pair([7, 1023], torch.float32)
    for ps in (ours, theirs):
        ps[1].grad[5] = bad
    with pytest.raises(RuntimeError) as mine:
        fusedopt.clip_grad_norm_(ours, 1.0, order, error_if_nonfinite=True, backend=backend)
    with pytest.raises(RuntimeError) as torchs:
        torch.nn.utils.clip_grad_norm_(theirs, 1.0, order, error_if_nonfinite=True)
    assert str(mine.value) == str(torchs.value)
    a = fusedopt.clip_grad_norm_(ours, 1.0, order, backend=backend)
    b = torch.nn.utils.clip_grad_norm_(theirs, 1.0, order)
    torch.testing.assert_close(a, b, equal_nan=True)
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.grad, q.grad, equal_nan=True)
    with pytest.raises(RuntimeError, match="infinity norm on an empty tensor"):
        fusedopt.clip_grad_norm_(grads_pair([0, 3], torch.float32)[0], 1.0, math.inf)




def _loop(opt, clip_first, scaler=None, steps=5):
    ps = opt.param_groups[0]["params"]
    gen = torch.Generator().manual_seed(3)
    for s in range(steps):
        opt.zero_grad()
        ws = [torch.randn(p.shape, generator=gen) * (1 + 10 * (s % 2)) for p in ps]
        loss = sum((p.float() * w).sum() for p, w in zip(ps, ws))
        if scaler is None:
            loss.backward()
            if clip_first:
                clip_first(ps, 1.0)
            opt.step()
        else:
            scaler.scale(loss).backward()
            if clip_first:
                scaler.unscale_(opt)
                clip_first(ps, 1.0)
            scaler.step(opt)
            scaler.update()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("amp", [False, True], ids=["plain", "gradscaler"])
@pytest.mark.parametrize("name", NAMES)
def test_max_grad_norm(name, amp, backend):
    """max_grad_norm=1.0 gives bit for bit clip_grad_norm_ (ours) followed by the step,
    and torch's clip + step within rounding; under GradScaler too (the clipped norm is
    the unscaled gradients')."""
    if getattr(fusedopt, name)._own_clip:
        pytest.skip("max_grad_norm is the twin's own argument (LAMB: Apex's clipping, "
                    "tests/test_trust.py)")
    def make(**kw):
        gen = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (7, 1023, 65537)]
        return ps, kw
    scaler = (lambda: torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)) if amp else (lambda: None)
    folded = ready(getattr(fusedopt, name)(make()[0], lr=1e-2, backend=backend, max_grad_norm=1.0))
    separate = ready(getattr(fusedopt, name)(make()[0], lr=1e-2, backend=backend))
    theirs = ready(getattr(fusedopt, name).twin()(make()[0], lr=1e-2, foreach=False))
    _loop(folded, None, scaler())
    _loop(separate, lambda ps, m: fusedopt.clip_grad_norm_(ps, m, backend=backend), scaler())
    _loop(theirs, torch.nn.utils.clip_grad_norm_, scaler())
    assert folded.grad_norm is not None and folded.grad_norm.item() > 1.0
    for a, b, c in zip(*(o.param_groups[0]["params"] for o in (folded, separate, theirs))):
        assert torch.equal(a, b)
        if amp:  # the gradient the step used is written back, as the scaler's unscale does
            assert torch.equal(a.grad, b.grad)
    if not amp:  # clipping alone leaves the gradients as they were: their norm is the one
        # the step clipped by (b's, clipped in place by clip_grad_norm_, have norm <= 1)
        grads = [p.grad for p in folded.param_groups[0]["params"]]
        assert torch.equal(fusedopt.clip.total_norm(grads), folded.grad_norm)
        torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-6)


def test_max_grad_norm_validation():
    with pytest.raises(ValueError, match="Invalid max_grad_norm value: -1"):
        fusedopt.Adam([torch.nn.Parameter(torch.ones(2))], max_grad_norm=-1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_mixed_dtypes(low, backend):
    """Grads of two dtypes: torch combines a float32 norm and multiplies the low-precision
    grads by that float32 factor unrounded (rounding the product only).  The norm is
    checked as above; the grads must be bit for bit torch's scaling by the same norm (a
    factor rounded to bfloat16 first moves ~18 % of them by one ulp)."""
    sizes = [7, 1023, 65537, 33]
    ours, theirs = grads_pair(sizes, torch.float32, seed=3)
    for i in (0, 2):
        for out in (ours, theirs):
            out[i].data, out[i].grad = out[i].data.to(low), out[i].grad.to(low)
    exact = torch.linalg.vector_norm(torch.cat([p.grad.double() for p in ours]))
    a = fusedopt.clip_grad_norm_(ours, 1.0, backend=backend)
    b = torch.nn.utils.clip_grad_norm_([p for p in theirs], 1.0)
    assert a.dtype == b.dtype == torch.float32
    err, torch_err = abs(a.double() - exact), abs(b.double() - exact)
    assert err <= 4 * torch.finfo(low).eps * exact or err <= torch_err, (a, b, exact)
    again = grads_pair(sizes, torch.float32, seed=3)[1]
    for i in (0, 2):
        again[i].data, again[i].grad = again[i].data.to(low), again[i].grad.to(low)
    torch.nn.utils.clip_grads_with_norm_(again, 1.0, a)
    for p, q in zip(ours, again):
        assert p.grad.dtype == q.grad.dtype and torch.equal(p.grad, q.grad), p.grad.dtype


def test_meta_grads():
    """Grads on the meta device (a model built without memory) go through torch's ops: the
    same meta result as torch's."""
    ps = [torch.nn.Parameter(torch.empty(n, device="meta")) for n in (3, 1023)]
    for p in ps:
        p.grad = torch.empty_like(p)
    a = fusedopt.clip_grad_norm_(ps, 1.0)
    b = torch.nn.utils.clip_grad_norm_(ps, 1.0)
    assert (a.device, a.dtype, a.shape) == (b.device, b.dtype, b.shape)
    assert all(p.grad.device.type == "meta" for p in ps)
