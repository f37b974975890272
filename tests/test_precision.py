"""Mixed precision for bfloat16/float16 params: float32 state (state_dtype=), float32
master weights (master_weights=True), and stochastic rounding (stochastic_rounding=True)."""
import copy

import pytest
import torch

import fusedopt
from fusedopt import arith, reference
from harness import BACKENDS, HP, NAMES

SHAPES = [(5, 3), (7,), (65537,), (1,), (0,)]
LOW = [torch.bfloat16, torch.float16]


def make(dtype, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def grads(ps, step):
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=gen).to(p.dtype) for p in ps]


def give(ps, gs):
    for p, g in zip(ps, gs):
        p.grad = g.clone()


def side_by_side(name, dtype, backend, rounded_twin, **kw):
    """8 steps of fusedopt on low-precision params and of torch.optim (for-loop) on float32
    twins with the same gradients; rounded_twin: the twins are rounded to ``dtype`` after
    each step (the param only exists in its own dtype).  Checks the params agree bit for
    bit after each step when rounded_twin; returns (params, opt, twins, torch opt, float64
    reference params, which follow the twins unrounded)."""
    ours = make(dtype)
    opt = getattr(fusedopt, name)(ours, backend=backend, **kw, **HP[name])
    twin = [torch.nn.Parameter(p.detach().float()) for p in ours]
    ref = getattr(fusedopt, name).twin()(twin, foreach=False, **HP[name])
    exact, exact_state = [p.detach().double() for p in ours], [{} for _ in ours]
    for s in range(8):
        gs = grads(ours, s)
        give(ours, gs)
        give(twin, [g.float() for g in gs])
        opt.step()
        with arith.replay():  # torch's op order, each op correctly rounded (fusedopt/arith.py)
            ref.step()
        reference.step(name.lower(), exact, gs, exact_state, **HP[name])
        if rounded_twin:
            with torch.no_grad():
                for p, t in zip(ours, twin):
                    t.copy_(t.to(dtype))
                    assert torch.equal(p, t.to(dtype)), (s, (p.float() - t).abs().max())
    return ours, opt, twin, ref, exact


# Adafactor's state is its row and column factors, which its matrix kernel does not keep
# in another dtype; schedule-free's z is a second copy of the weights: they refuse these
# options (test_refusing_optimizers_refuse_mixed_precision)
OPTIONS = ("state_dtype", "master_weights", "stochastic_rounding")
MIXED = [n for n in NAMES if not set(OPTIONS) & set(getattr(fusedopt, n)._refuses)]
REFUSING = [n for n in NAMES if n not in MIXED]


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("name", REFUSING)
def test_refusing_optimizers_refuse_mixed_precision(name, option):
    value = torch.float32 if option == "state_dtype" else True
    with pytest.raises(ValueError, match=f"fusedopt.{name} does not support {option}"):
        getattr(fusedopt, name)(make(torch.bfloat16), **{option: value})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", MIXED)
def test_float32_state(name, dtype, backend):
    """state_dtype=float32: each step is torch's float32 step on the param read as float32,
    rounded back to the param's dtype; the state is float32 and never rounded."""
    ours, opt, twin, ref, _ = side_by_side(name, dtype, backend, True, state_dtype=torch.float32)
    for p, t in zip(ours, twin):
        for k, v in ref.state[t].items():
            # (optimi's eps_sq: a scalar in the param's dtype, as optimi keeps it; its
            # kahan_comp: None)
            if k not in ("step", "eps_sq") and v is not None:
                assert opt.state[p][k].dtype == torch.float32
                torch.testing.assert_close(opt.state[p][k], v)  # float32 tolerance


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("name", MIXED)
def test_master_weights(name, dtype, backend):
    """master_weights=True: the float32 master copy follows torch's float32 training, no
    further from the float64 reference than torch's float32 run is, and the param is the
    master rounded to nearest."""
    ours, opt, twin, _, exact = side_by_side(name, dtype, backend, False, master_weights=True)
    for p, t, x in zip(ours, twin, exact):
        if p.numel():
            ours_err = (opt.state[p]["master"].double() - x).abs().max()
            torch_err = (t.detach().double() - x).abs().max()
            assert ours_err <= 1.25 * torch_err + 1e-7, (ours_err, torch_err)
        # float32 parity as everywhere (bitwise for most elements, a few ulp where torch's
        # for-loop rounds differently)
        torch.testing.assert_close(opt.state[p]["master"], t.detach())
        assert torch.equal(p, opt.state[p]["master"].to(dtype))


def test_master_weights_leave_wide_params_alone():
    p32, p16 = make(torch.float32, shapes=[(9,)])[0], make(torch.bfloat16, shapes=[(9,)])[0]
    opt = fusedopt.Adam([p32, p16], master_weights=True)
    give([p32, p16], grads([p32, p16], 0))
    opt.step()
    assert "master" not in opt.state[p32] and opt.state[p32]["exp_avg"].dtype == torch.float32
    assert opt.state[p16]["master"].dtype == torch.float32


def _mlp(dtype):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 1)).to(dtype)


def _train(dtype, steps=200, **kw):
    model = _mlp(dtype)
    opt = fusedopt.Adam(model.parameters(), lr=1e-4, **kw)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 1, generator=gen)
    for _ in range(steps):
        x = torch.randn(64, 32, generator=gen)
        loss = ((model(x.to(dtype)).float() - torch.sin(x @ w)) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.cat([p.detach().float().reshape(-1) for p in model.parameters()])


def test_master_weights_track_float32_training():
    """A bfloat16 MLP trained 200 steps (Adam, lr 1e-4: each update is below half a bfloat16
    ulp of most weights).  Measured (torch 2.13 CPU): distance to the float32 run / its
    norm 2.45e-3 with master weights, 5.29e-2 for plain bfloat16 Adam: 21.6x closer."""
    ref = _train(torch.float32)
    dist = lambda x: float((x - ref).norm() / ref.norm())  # noqa: E731
    plain, master = dist(_train(torch.bfloat16)), dist(_train(torch.bfloat16, master_weights=True))
    print(f"plain {plain:.3g} master {master:.3g} ratio {plain / master:.3g}")
    assert master * 10 < plain and master < 5e-3


def test_state_dict_keeps_float32_state_and_master():
    """Saved and restored, fp32 moments and master copies stay float32 (torch casts all
    state to the param's dtype on load); training continues bit for bit.  A torch.optim
    state_dict without master copies loads too: the master starts from the param."""
    def run(opt, ps, steps, first):
        for s in range(first, first + steps):
            give(ps, grads(ps, s))
            opt.step()

    a = make(torch.bfloat16)
    opt_a = fusedopt.Adam(a, lr=1e-2, master_weights=True)
    run(opt_a, a, 3, 0)
    sd = copy.deepcopy(opt_a.state_dict())
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_b = fusedopt.Adam(b, lr=1e-2, master_weights=True)
    opt_b.load_state_dict(sd)
    assert all(opt_b.state[p][k].dtype == torch.float32 for p in b
               for k in ("exp_avg", "exp_avg_sq", "master"))
    run(opt_a, a, 3, 3)
    run(opt_b, b, 3, 3)
    assert all(torch.equal(opt_a.state[p]["master"], opt_b.state[q]["master"]) for p, q in zip(a, b))
    assert all(map(torch.equal, a, b))

    c = make(torch.bfloat16)
    torch_opt = torch.optim.Adam(c, lr=1e-2)
    run(torch_opt, c, 2, 0)
    opt_c = fusedopt.Adam(c, lr=1e-2, master_weights=True)
    opt_c.load_state_dict(torch_opt.state_dict())
    before = [p.detach().clone() for p in c]
    run(opt_c, c, 1, 2)
    for p, p0 in zip(c, before):
        st = opt_c.state[p]
        assert st["master"].dtype == st["exp_avg"].dtype == torch.float32
        assert int(st["step"]) == 3 and not torch.equal(p, p0) or p.numel() == 0
    # and back: torch.optim reads our state_dict (moments cast to bfloat16 by torch)
    torch.optim.Adam(make(torch.bfloat16), lr=1e-2).load_state_dict(opt_c.state_dict())


def test_options_are_validated():
    p = make(torch.bfloat16)
    with pytest.raises(ValueError, match="state_dtype"):
        fusedopt.Adam(p, state_dtype=torch.float16)
    with pytest.raises(ValueError, match="exclude each other"):
        fusedopt.SGD(p, lr=0.1, master_weights=True, stochastic_rounding=True)


# -- stochastic rounding --------------------------------------------------------------

def _shrink(backend, sr, n=1 << 20, lr=1e-3):
    """One SGD step p <- p - lr * (wd * p) with wd = 1: the float32 result lies between
    bfloat16 neighbours, a fraction lr of an ulp-ish below p.  Returns (bf16 result,
    exact float32 value in float64)."""
    gen = torch.Generator().manual_seed(3)
    p = torch.nn.Parameter(torch.randn(n, generator=gen).to(torch.bfloat16))
    x = p.detach().double()
    lr32 = float(torch.tensor(lr, dtype=torch.float32))
    exact = (x - lr32 * x).float().double()  # one fma, rounded once to float32
    opt = fusedopt.SGD([p], lr=lr, weight_decay=1.0, backend=backend, stochastic_rounding=sr)
    p.grad = torch.zeros_like(p)
    opt.step()
    return p.detach(), exact


@pytest.mark.parametrize("backend", BACKENDS)
def test_stochastic_rounding_is_unbiased(backend):
    """Mean rounding error over 2^20 elements within 5 standard deviations of 0, the
    variance computed per element from its distance to its two bfloat16 neighbours;
    round-to-nearest fails the same bound (nearly every element rounds back to where
    it was)."""
    got, exact = _shrink(backend, True)
    # the bfloat16 neighbours of each float32 value: its bits truncated, and one ulp further
    # from zero (in magnitude, which is what the rounding acts on)
    bits = exact.float().view(torch.int32)
    down = (bits & -65536).view(torch.float32).double()
    up = ((bits & -65536) + 65536).view(torch.float32).double()
    assert ((got.double() == down) | (got.double() == up)).all()
    f = (exact.abs() - down.abs()) / (up.abs() - down.abs())
    assert (f > 0).float().mean() > 0.9  # nearly every value lies between two neighbours
    sigma = float(((up - down) ** 2 * f * (1 - f)).sum().sqrt() / exact.numel())
    # the error measured away from zero: every value shrank, so a rounding that ignores
    # the shrink has its bias there (signed errors of both signs would cancel)
    mean = float(((got.double() - exact) * exact.sign()).mean())
    assert abs(mean) < 5 * sigma, (mean, sigma)
    nearest, _ = _shrink(backend, False)
    assert float(((nearest.double() - exact) * exact.sign()).mean()) > 20 * sigma


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_stochastic_rounding_same_bits_on_both_engines_and_after_restore(name):
    """The stream is keyed by (seed, step, place of the param, element index): Numba and
    Triton draw the same bits; a restored checkpoint continues the stream; another seed
    draws other bits."""
    hp = dict(HP[name], stochastic_rounding=True)

    def run(backend, steps, opt=None, ps=None, first=0, seed=None):
        ps = ps or make(torch.bfloat16)
        opt = opt or getattr(fusedopt, name)(ps, backend=backend, **hp)
        if seed is not None:
            opt.param_groups[0]["sr_seed"] = seed
        for s in range(first, first + steps):
            give(ps, grads(ps, s))
            opt.step()
        return opt, ps

    _, a = run("numba", 6)
    _, b = run("triton", 6)
    assert all(torch.equal(x.view(torch.int16), y.view(torch.int16)) for x, y in zip(a, b))
    _, nearest = run("numba", 6, opt=getattr(fusedopt, name)(make(torch.bfloat16), **HP[name]))
    assert not all(map(torch.equal, a, nearest))
    opt, c = run("numba", 3)
    sd = copy.deepcopy(opt.state_dict())
    d = [torch.nn.Parameter(p.detach().clone()) for p in c]
    fresh = getattr(fusedopt, name)(d, **dict(hp, stochastic_rounding=True))
    fresh.param_groups[0]["sr_seed"] = 12345  # overwritten by the checkpoint's seed
    fresh.load_state_dict(sd)
    run("numba", 3, opt=fresh, ps=d, first=3)
    if name != "SGD":  # SGD keeps no step count in its state: see docs/options.md
        assert all(map(torch.equal, a, d))
    _, e = run("numba", 6, seed=7)
    assert not all(map(torch.equal, a, e))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (bench/gpu.sh runs it)")
@pytest.mark.parametrize("kw", [dict(master_weights=True), dict(stochastic_rounding=True),
                                dict(kahan_sum=True), dict(master_weights="remainder")],
                         ids=["master", "stochastic", "kahan", "remainder"])
def test_cuda_matches_cpu(kw):
    """The Triton engine on CUDA params (compiled, under bench/gpu.sh) gives the Numba
    engine's bits: IEEE division and square root, explicit fmas, no contraction."""
    cpu = make(torch.bfloat16)
    gpu = [torch.nn.Parameter(p.detach().cuda()) for p in cpu]
    ours = [fusedopt.Adam(ps, lr=1e-2, **kw) for ps in (cpu, gpu)]
    ours[1].param_groups[0]["sr_seed"] = ours[0].param_groups[0].get("sr_seed", 0)
    for s in range(5):
        gs = grads(cpu, s)
        give(cpu, gs)
        give(gpu, [g.cuda() for g in gs])
        for opt in ours:
            opt.step()
    for a, b in zip(cpu, gpu):
        assert torch.equal(a, b.cpu())
        for k in ("master", "kahan_comp", "remainder"):
            if k in ours[0].state[a]:
                assert torch.equal(ours[0].state[a][k], ours[1].state[b][k].cpu())
