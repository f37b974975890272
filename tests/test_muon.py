"""Muon against torch.optim.Muon (its twin) and the float64 reference, both engines.

What the bounds are, and why:
* the fused passes (rules.muon_momentum: torch's two lerps; rules.muon_update: torch's
  mul_ then add_(alpha=), one fma) are torch's ops in torch's order: with the same
  Newton-Schulz function in both (torch's own, per matrix) float32 and float64 params step
  bit for bit as torch's for-loop, on both engines (``_same_ns``);
* the batched Newton-Schulz (muon.newton_schulz: bmm/baddbmm on a same-shape stack) runs
  torch's bfloat16 ops in torch's order, but a batched matmul may take another kernel
  (blocking, summation order) than one matrix's: its output differs from torch's by at
  most one bfloat16 ulp (of the matrix's largest entry) here, mostly not at all (measured
  on this CPU: 400 shapes, about 1 in 10 differ, in a few entries).  Through a step that
  is adjusted_lr x that ulp, so the params after N steps are held within 2 bfloat16 ulp
  of their magnitude (parity's unit with Spec.ulp_dtype): a real error (the Nesterov
  blend, the shape's lr adjustment) lands far outside (test_a_mutated_*);
* bfloat16 params: torch rounds the buffer before the Nesterov blend and the param after
  its decay, the engines once: accuracy against float64, as test_parity's.
"""

import contextlib

import pytest
import torch

import fusedopt
from fusedopt import muon as mod
from fusedopt import arith
from harness import BACKENDS, max_ulp
from twins import outcome

BF16 = dict(unit=torch.bfloat16)

SHAPES = [(1, 1), (7, 3), (3, 7), (7, 3), (33, 17), (300, 2), (1, 300), (64, 32), (0, 4)]
HPS = {
    "default": dict(lr=2e-2),
    "no-nesterov-wd": dict(lr=1e-2, nesterov=False, weight_decay=0.3, momentum=0.9),
    "match-rms-adamw": dict(lr=5e-3, adjust_lr_fn="match_rms_adamw", momentum=0.3),
    "original-ns3": dict(lr=2e-2, adjust_lr_fn="original", ns_steps=3, eps=1e-3),
}


def _data(dtype, steps, shapes=SHAPES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
             for _ in range(steps)]
    return init, grads


def _train(cls, dtype, hp, steps=8, shapes=SHAPES, **kw):
    init, grads = _data(dtype, steps, shapes)
    ps = [torch.nn.Parameter(p.clone()) for p in init]
    opt = cls(ps, **hp, **kw)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        with arith.replay() if cls is torch.optim.Muon else contextlib.nullcontext():
            opt.step()  # (torch's ops rounded once, as on any CPU: fusedopt.arith)
    return [p.detach() for p in ps], init, opt


def _per_matrix(stack, coefficients, steps, eps):
    from torch.optim._muon import _zeropower_via_newtonschulz
    return torch.stack([_zeropower_via_newtonschulz(m, coefficients, steps, eps)
                        for m in stack])


def _within(ours, theirs, init, hp, bound=2):
    assert max_ulp(ours, theirs, init, floor=float(hp.get("lr", 1e-3)), **BF16) <= bound


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hp", HPS.values(), ids=HPS.keys())
def test_fused_passes_are_torchs_bit_for_bit(backend, dtype, hp, monkeypatch):
    theirs, init, topt = _train(torch.optim.Muon, dtype, hp)
    ours, _, opt = _train(fusedopt.Muon, dtype, hp, backend=backend)
    _within(ours, theirs, init, hp)  # the batched NS: within its bound
    for p, q in zip(opt.param_groups[0]["params"], topt.param_groups[0]["params"]):
        assert torch.equal(opt.state[p]["momentum_buffer"], topt.state[q]["momentum_buffer"])
    monkeypatch.setattr(mod, "newton_schulz", _per_matrix)  # torch's NS in both: bitwise
    ours, _, _ = _train(fusedopt.Muon, dtype, hp, backend=backend)
    assert max_ulp(ours, theirs) == 0
    assert any(not torch.equal(a, b) for a, b in zip(ours, init) if a.numel())


@pytest.mark.parametrize("shape", [(128, 128), (1024, 256), (256, 1024), (33, 17), (16, 64),
                                   (2, 8), (1, 9), (9, 1)])
def test_batched_newton_schulz_within_a_bfloat16_ulp_of_torchs(shape):
    gen = torch.Generator().manual_seed(1)
    stack = torch.randn((4, *shape), generator=gen)
    for coef in ((3.4445, -4.7750, 2.0315), (3.4, -4.7, 2.0)):
        ours = mod.newton_schulz(stack, coef, 5, 1e-7)
        theirs = _per_matrix(stack, coef, 5, 1e-7)
        assert ours.dtype == torch.bfloat16 and ours.shape == stack.shape
        top = theirs.float().abs().amax(dim=(-2, -1), keepdim=True)
        ulp = torch.ldexp(torch.ones_like(top), torch.frexp(top)[1] - 1) * 2 ** -7
        assert ((ours.float() - theirs.float()).abs() <= ulp).all()


def _reference(hp, dtype=torch.float32, steps=8):
    init, grads = _data(dtype, steps)
    ps = [p.double() for p in init]
    states = [{} for _ in ps]
    for gs in grads:
        for p, g, st in zip(ps, gs, states):
            mod.reference(p, g.double(), st, **hp)
    return ps


def _errors(xs, ref):
    d = torch.cat([(x.double() - r).flatten() for x, r in zip(xs, ref)])
    return d.pow(2).mean().sqrt().item()


@pytest.mark.parametrize("hp", HPS.values(), ids=HPS.keys())
def test_accuracy_against_the_float64_reference(hp):
    """The reference's NS is float64: torch's bfloat16 NS is off from it by ~1 % of the
    update; ours is torch's, so as accurate; and the reference is that close to torch."""
    ref = _reference(hp)
    theirs, init, _ = _train(torch.optim.Muon, torch.float32, hp)
    ours, _, _ = _train(fusedopt.Muon, torch.float32, hp, backend="numba")
    moved = _errors(theirs, init)
    assert _errors(ours, ref) <= 1.1 * _errors(theirs, ref) < 0.05 * moved


def test_a_mutated_reference_or_class_is_caught(monkeypatch):
    """The mutation checks: the comparisons above fail on real errors (the Nesterov
    blend's weight swapped, the lr not adjusted for the shape)."""
    hp = HPS["default"]
    theirs, init, _ = _train(torch.optim.Muon, torch.float32, hp)
    moved = _errors(theirs, init)
    # the reference without Nesterov: far outside its 5 % of the move to torch
    assert _errors(theirs, _reference({**hp, "nesterov": False})) > 0.05 * moved
    monkeypatch.setattr(mod, "adjusted_lr", lambda lr, fn, shape: lr)
    ours, _, _ = _train(fusedopt.Muon, torch.float32, hp, backend="numba")
    with pytest.raises(AssertionError):
        _within(ours, theirs, init, hp, bound=20)  # 10x the bound
    monkeypatch.undo()
    monkeypatch.setattr(fusedopt.Muon, "_flags", lambda self, group: {"NESTEROV": False})
    ours, _, _ = _train(fusedopt.Muon, torch.float32, hp, backend="numba")
    with pytest.raises(AssertionError):
        _within(ours, theirs, init, hp, bound=20)


# -- torch's own corpus for Muon (torch.testing._internal.common_optimizers.optim_db) --------

def _optim_info():
    pytest.importorskip("expecttest", reason="torch's optimizer test corpus needs expecttest")
    from torch.testing._internal import common_optimizers as co
    return co, next(i for i in co.optim_db if i.optim_cls is torch.optim.Muon)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torchs_optim_inputs(backend):
    co, info = _optim_info()
    for inp in info.optim_inputs_func("cpu", torch.float32):
        theirs, init, _ = _train(torch.optim.Muon, torch.float32, inp.kwargs, steps=3)
        ours, _, _ = _train(fusedopt.Muon, torch.float32, inp.kwargs, steps=3, backend=backend)
        _within(ours, theirs, init, inp.kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torchs_error_inputs(backend):
    """Each of torch's error inputs raises the same type and text (construction or step)."""
    co, info = _optim_info()
    for err in info.optim_error_inputs_func("cpu", torch.float32):
        inp = err.optimizer_error_input
        ps = inp.params if inp.params is not None else [torch.nn.Parameter(torch.randn(3, 2))]
        for cls, kw in ((torch.optim.Muon, {}), (fusedopt.Muon, dict(backend=backend))):
            with (pytest.warns(err.error_type, match=err.error_regex)
                  if issubclass(err.error_type, Warning) else
                  pytest.raises(err.error_type, match=err.error_regex)):
                opt = cls(ps, **inp.kwargs, **kw)
                if err.error_on == co.OptimizerErrorEnum.STEP_ERROR:
                    opt.step()


# -- errors and options ----------------------------------------------------------------------

def _one(cls, shape=(4, 3), **kw):
    p = torch.nn.Parameter(torch.randn(shape))
    p.grad = torch.randn(shape)
    return p, cls([p], **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_errors_are_torchs(backend):
    for hp in (dict(ns_steps=100), dict(ns_coefficients=(1.0, 2.0))):
        got = [outcome(_one(cls, **hp, **kw)[1].step, message=True)
               for cls, kw in ((torch.optim.Muon, {}), (fusedopt.Muon, dict(backend=backend)))]
        assert got[0] == got[1] and got[0][0] == "ValueError"
    for make in (lambda p: p.grad.to_sparse(),):  # sparse grads
        got = []
        for cls, kw in ((torch.optim.Muon, {}), (fusedopt.Muon, dict(backend=backend))):
            p, opt = _one(cls, **kw)
            p.grad = make(p)
            got.append(outcome(opt.step, message=True))
        assert got[0] == got[1] == ("RuntimeError", "Muon does not support sparse gradients")
    got = []  # a param made 3-D after construction: torch's step error, by torch's loop
    for cls, kw in ((torch.optim.Muon, {}), (fusedopt.Muon, dict(backend=backend))):
        p, opt = _one(cls, **kw)
        p.data = torch.randn(2, 3, 2)
        p.grad = torch.randn(2, 3, 2)
        got.append(outcome(opt.step, message=True))
    assert got[0] == got[1] == ("ValueError", "Param gradient must be a 2D matrix")


def test_options_that_do_not_fit_are_refused_by_name():
    for kw in (dict(l1=0.1), dict(state_dtype=torch.float32), dict(state_dtype=torch.uint8),
               dict(master_weights=True), dict(stochastic_rounding=True), dict(kahan_sum=True),
               dict(gradient_release=True)):
        with pytest.raises(ValueError, match=f"fusedopt.Muon does not support {next(iter(kw))}"):
            _one(fusedopt.Muon, **kw)
    for kw in (dict(capturable=True), dict(foreach=True), dict(fused=True)):  # torch's own
        assert outcome(lambda: _one(torch.optim.Muon, **kw), True) == \
            outcome(lambda: _one(fusedopt.Muon, **kw), True)
        assert outcome(lambda: _one(fusedopt.Muon, **kw)) is TypeError


@pytest.mark.parametrize("backend", BACKENDS)
def test_max_grad_norm_flat_and_noncontiguous_params(backend):
    """max_grad_norm: torch's clip_grad_norm_ then torch's step (the norm's last ulp is a
    summation order's: a few ulp of the params); flat=True and a transposed (non-contiguous)
    param: bit for bit."""
    hp = HPS["default"]
    theirs = _train(fusedopt.Muon, torch.float32, hp, backend=backend)[0]
    ours = _train(fusedopt.Muon, torch.float32, hp, backend=backend, flat=True)[0]
    assert max_ulp(ours, theirs) == 0
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(5, 9, generator=gen)
    sides = [[torch.nn.Parameter(base.clone().T), torch.nn.Parameter(base.clone())]
             for _ in range(2)]
    opts = [fusedopt.Muon(sides[0], lr=0.02, max_grad_norm=1.0, backend=backend),
            torch.optim.Muon(sides[1], lr=0.02)]
    for _ in range(3):
        gs = [torch.randn(p.shape, generator=gen) for p in sides[0]]
        for side in sides:
            for p, g in zip(side, gs):
                p.grad = g.clone()
        torch.nn.utils.clip_grad_norm_(sides[1], 1.0, foreach=False)
        for o in opts:
            o.step()
    assert not sides[0][0].is_contiguous()
    for a, b in zip(*sides):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * 0.02)


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_scaler(backend):
    """GradScaler: the kernel unscales (a power of 2: exact), an inf step is skipped."""
    init = _data(torch.float32, 0)[0]
    sides = [[torch.nn.Parameter(t.clone()) for t in init] for _ in range(2)]
    opts = [fusedopt.Muon(sides[0], lr=0.02, backend=backend), torch.optim.Muon(sides[1], lr=0.02)]
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) for _ in range(2)]
    gen = torch.Generator().manual_seed(5)
    for s in range(4):
        gs = [torch.randn(p.shape, generator=gen) for p in sides[0]]
        if s == 2:
            gs[1][0, 0] = float("inf")
        for side, opt, sc in zip(sides, opts, scalers):
            loss = sum((p * g).sum() for p, g in zip(side, gs))
            sc.scale(loss).backward()
            sc.step(opt)
            sc.update()
            opt.zero_grad()
    _within([p.detach() for p in sides[0]], [p.detach() for p in sides[1]], init, {"lr": 0.02})


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trips_with_torch(backend):
    hp = HPS["no-nesterov-wd"]
    init, grads = _data(torch.float32, 6)
    sides = [[torch.nn.Parameter(p.clone()) for p in init] for _ in range(2)]
    make = [lambda ps: fusedopt.Muon(ps, **hp, backend=backend),
            lambda ps: torch.optim.Muon(ps, **hp)]
    opts = [make[0](sides[0]), make[1](sides[1])]
    for s, gs in enumerate(grads):
        if s == 3:  # each continues from the other's checkpoint
            sd = [o.state_dict() for o in opts]
            assert sd[0]["state"].keys() == sd[1]["state"].keys()
            assert all(set(v) == {"momentum_buffer"} for v in sd[0]["state"].values())
            opts = [make[0](sides[0]), make[1](sides[1])]
            opts[0].load_state_dict(sd[1])
            opts[1].load_state_dict(sd[0])
        for side in sides:
            for p, g in zip(side, gs):
                p.grad = g.clone()
        for o in opts:
            o.step()
    _within([p.detach() for p in sides[0]], [p.detach() for p in sides[1]], init, hp)


def test_compiled_step_is_the_eager_step():
    """Under torch.compile the step is fusedopt's registered custom op: the same params."""
    hp = HPS["default"]
    theirs, _, _ = _train(fusedopt.Muon, torch.float32, hp, steps=3, backend="numba")
    init, grads = _data(torch.float32, 3)
    ps = [torch.nn.Parameter(p.clone()) for p in init]
    opt = fusedopt.Muon(ps, **hp, backend="numba")
    step = torch.compile(opt.step)
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        step()
    assert max_ulp([p.detach() for p in ps], theirs) == 0


# -- MuonWithAuxAdam --------------------------------------------------------------------------

class _Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(20, 8)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(),
                                        torch.nn.LayerNorm(16), torch.nn.Linear(16, 8))
        self.head = torch.nn.Linear(8, 20, bias=False)

    def forward(self, x):
        return self.head(self.body(self.embed(x)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_muon_with_aux_adam_is_muon_plus_adamw(backend):
    torch.manual_seed(0)
    models = [_Tiny(), _Tiny()]
    models[1].load_state_dict(models[0].state_dict())
    groups = fusedopt.muon_param_groups(models[0], muon=dict(lr=0.01))
    assert [g["use_muon"] for g in groups] == [True, False]
    assert [tuple(p.shape) for p in groups[0]["params"]] == [(16, 8), (8, 16)]
    opt = fusedopt.MuonWithAuxAdam(groups, backend=backend)
    ref = fusedopt.muon_param_groups(models[1])
    torch_opts = [torch.optim.Muon(ref[0]["params"], lr=0.01, weight_decay=0.0),
                  torch.optim.AdamW(ref[1]["params"], lr=3e-4, betas=(0.9, 0.95), eps=1e-10,
                                    weight_decay=0.0, foreach=False)]
    gen = torch.Generator().manual_seed(2)
    for s in range(5):
        x = torch.randint(0, 20, (4, 6), generator=gen)
        for m in models:
            m.zero_grad()
            m(x).square().mean().backward()
        if s == 3:  # a checkpoint, loaded into a new one
            sd = opt.state_dict()
            assert [g["use_muon"] for g in sd["param_groups"]] == [True, False]
            opt = fusedopt.MuonWithAuxAdam(fusedopt.muon_param_groups(models[0]), backend=backend)
            opt.load_state_dict(sd)
        opt.step()
        for o in torch_opts:
            o.step()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)  # schedulers see both parts' groups
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.005, 1.5e-4]
    assert opt.muon.param_groups[0]["lr"] == 0.005
    with pytest.raises(ValueError, match="use_muon"):
        fusedopt.MuonWithAuxAdam([dict(params=list(models[0].parameters()))])
