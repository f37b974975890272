"""Schedule-Free AdamW and SGD (not in torch) against the schedulefree package they are
drop-ins for: the same steps and train()/eval() swaps (float32 and float64, both engines,
warmup, r, weight_lr_power, beta1 on both sides of lerp's 0.5), constructor and step errors,
state_dict both ways, refused options.  fusedopt.schedulefree's <Name>ForLoop (the parity
tests' anchor) is the package's arithmetic bit for bit."""
import contextlib
import copy
import functools

import pytest
import torch

import fusedopt
from fusedopt import arith, parity
from fusedopt import schedulefree as mod
from harness import BACKENDS, max_ulp
from twins import agree, outcome

schedulefree = pytest.importorskip(
    "schedulefree", reason="schedulefree (a test extra) is not installed")

SHAPES = [(0,), (1,), (7,), (33, 17), (2, 3, 4), (65537,)]
HPS = {  # (name, hyperparameters): each a warmup or weighting, and a beta1 side of 0.5
    "adamw-warmup-decay": ("AdamW", dict(lr=1e-2, weight_decay=0.1, warmup_steps=5)),
    "adamw-r-small-beta1": ("AdamW", dict(lr=3e-3, betas=(0.3, 0.99), r=1.0, eps=1e-6)),
    "adamw-no-lr-weight": ("AdamW", dict(lr=2e-2, weight_lr_power=0.0, warmup_steps=30)),
    "sgd-warmup-decay": ("SGD", dict(lr=1e-2, weight_decay=0.1, warmup_steps=5)),
    "sgd-r-small-momentum": ("SGD", dict(lr=5e-2, momentum=0.4, r=2.0)),
}


def _classes(name):
    return (getattr(schedulefree, f"{name}ScheduleFree"),
            getattr(mod, f"{name}ScheduleFreeForLoop"), getattr(fusedopt, f"{name}ScheduleFree"))


def _train(cls, dtype, hp, steps=20, replay=True, **kw):
    """(params after ``steps`` steps, the same after eval(), the initial params, opt).
    replay: torch's ops rounded once, on any CPU (see parity.py)."""
    ctx = arith.replay if replay else contextlib.nullcontext
    params, grads = parity.make_data(3, dtype, steps, SHAPES)
    ps = [torch.nn.Parameter(p.clone()) for p in params]
    opt = cls(ps, **hp, **kw)
    opt.train()
    for gs in grads:
        for p, g in zip(ps, gs):
            p.grad = g.clone()
        with ctx():
            opt.step()
    y = [p.detach().clone() for p in ps]
    with ctx():
        opt.eval()
    return y, [p.detach().clone() for p in ps], params, opt




@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", HPS, ids=HPS.keys())
def test_steps_and_eval_as_the_package(backend, dtype, case):
    name, hp = HPS[case]
    Theirs, Loop, Ours = _classes(name)
    ty, tx, init, topt = _train(Theirs, dtype, hp, foreach=False)  # its per-tensor path
    ly, lx, _, _ = _train(Loop, dtype, hp)
    oy, ox, _, oopt = _train(Ours, dtype, hp, backend=backend)
    assert max_ulp(ly, ty) == 0 and max_ulp(lx, tx) == 0  # the twin is the package's arithmetic
    for ours, theirs in ((oy, ty), (ox, tx)):
        agree(ours, theirs, init, dtype, hp["lr"])
        if backend == "numba":  # IEEE ops in torch's order, multiply-adds fused where torch's
            assert max_ulp(ours, theirs) == 0
    assert any(not torch.equal(a, b) for a, b in zip(ox, init) if a.numel())
    keys = ("k", "weight_sum", "lr_max", "scheduled_lr", "train_mode")
    assert [oopt.param_groups[0][k] for k in keys] == [topt.param_groups[0][k] for k in keys]


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_the_packages_default_foreach_path_is_its_per_tensor_arithmetic(name):
    hp = HPS[f"{name.lower()}-warmup-decay"][1]
    # (on this machine's own torch ops: arith.replay patches the per-tensor ops only)
    a = _train(_classes(name)[0], torch.float32, hp, replay=False)
    b = _train(_classes(name)[0], torch.float32, hp, replay=False, foreach=False)
    assert max_ulp(a[0], b[0]) == 0 and max_ulp(a[1], b[1]) == 0


def test_a_ckp1_one_step_off_is_caught(monkeypatch):
    """The mutation check: the comparison above fails on a real error (the average's weight
    of the next step)."""
    right = mod.schedule

    def ahead(group):
        keys, lr, _ = right(group)
        return keys, lr, right({**group, **keys, "k": group["k"] + 1})[2]

    _, hp = HPS["adamw-warmup-decay"]
    ty, _, init, _ = _train(schedulefree.AdamWScheduleFree, torch.float32, hp, foreach=False)
    monkeypatch.setattr(mod, "schedule", ahead)
    oy, _, _, _ = _train(fusedopt.AdamWScheduleFree, torch.float32, hp, backend="numba")
    with pytest.raises(AssertionError):
        agree(oy, ty, init, torch.float32, hp["lr"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_train_and_eval_are_one_engine_pass(backend, monkeypatch):
    """The swaps go through the engine (torch's lerp_ is not called), move the version
    counter as lerp_ does, and toggle only where the mode changes (as the package's)."""
    _, _, _, opt = _train(fusedopt.SGDScheduleFree, torch.float32, HPS["sgd-warmup-decay"][1],
                          steps=3, backend=backend)
    ps = opt.param_groups[0]["params"]
    x = [p.detach().clone() for p in ps]
    versions = [p._version for p in ps]

    def refuse(*a, **k):
        raise AssertionError("torch's lerp_ was called")
    monkeypatch.setattr(torch.Tensor, "lerp_", refuse)
    opt.eval()  # already in eval mode: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(ps, x))
    opt.train()
    assert [p._version for p in ps] == [v + 1 for v in versions]
    assert not all(torch.equal(a, b) for a, b in zip(ps, x))
    opt.eval()
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(ps, x))



raised = functools.partial(outcome, message=True)


@pytest.mark.parametrize("name,kw", [("SGD", dict(lr=-1.0)), ("SGD", dict(weight_decay=-0.1)),
                                     ("SGD", dict(momentum=0.0)), ("SGD", dict(momentum=1.0)),
                                     ("AdamW", dict(lr=-1.0)), ("AdamW", dict(betas=(1.5, 0.9)))])
def test_constructor_errors_are_the_packages(name, kw):
    p = [torch.nn.Parameter(torch.zeros(3))]
    Theirs, Loop, Ours = _classes(name)
    want = raised(lambda: Theirs(p, **kw))
    assert raised(lambda: Ours(p, **kw)) == want
    assert raised(lambda: Loop(p, **kw)) == want


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
@pytest.mark.parametrize("case", ["not-training", "sparse", "sparse-decay"])
def test_step_errors_are_the_packages(name, case):
    def run(cls):
        p = torch.nn.Parameter(torch.zeros(4))
        opt = cls([p], weight_decay=0.1 if case == "sparse-decay" else 0)
        p.grad = torch.eye(4)[0].to_sparse() if case.startswith("sparse") else torch.ones(4)
        if case != "not-training":
            opt.train()
        return raised(opt.step) or p.detach().clone()

    want = run(_classes(name)[0])
    for cls in _classes(name)[1:]:
        got = run(cls)
        assert torch.equal(got, want) if torch.is_tensor(want) else got == want


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
def test_state_dict_both_ways(name):
    """Same keys; a checkpoint of either (saved in eval mode, as the package asks)
    continues in the other as the package alone does."""
    Theirs, _, Ours = _classes(name)
    hp = HPS[f"{name.lower()}-warmup-decay"][1]
    params, grads = parity.make_data(5, torch.float32, 12, SHAPES)

    def make(cls, **kw):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        return ps, cls(ps, **hp, **kw)

    def steps(pairs, rng):
        for ps, opt in pairs:
            opt.train()
            for s in rng:
                for p, g in zip(ps, grads[s]):
                    p.grad = g.clone()
                opt.step()
            opt.eval()

    alone, theirs, ours = make(Theirs), make(Theirs), make(Ours)
    steps([alone, theirs], range(4))
    for src, dst, rng in ((theirs, ours, range(4, 8)), (ours, theirs, range(8, 12))):
        with torch.no_grad():
            for a, b in zip(dst[0], src[0]):
                a.copy_(b)
        dst[1].load_state_dict(copy.deepcopy(src[1].state_dict()))
        steps([dst, alone], rng)
        sd, want = dst[1].state_dict(), alone[1].state_dict()
        assert list(sd["state"][3]) == list(want["state"][3])
        assert {k: v for k, v in sd["param_groups"][0].items() if k in want["param_groups"][0]} \
            == want["param_groups"][0]
        for a, b in zip(dst[0], alone[0]):
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["AdamW", "SGD"])
@pytest.mark.parametrize("kw", [dict(state_dtype=torch.uint8), dict(state_dtype=torch.float32),
                                dict(master_weights=True), dict(stochastic_rounding=True)])
def test_options_it_cannot_offer_are_refused_by_name(name, kw):
    with pytest.raises(ValueError, match=f"fusedopt.{name}ScheduleFree does not support "
                                         f"{list(kw)[0]}"):
        _classes(name)[2]([torch.nn.Parameter(torch.zeros(3))], **kw)


def test_a_group_in_eval_mode_steps_as_the_packages():
    """The package checks group 0's mode alone: a group added after train() (in eval mode)
    still steps, the params the twin steps for the engines too (AdamW's complex params)."""
    def run(cls):
        a = torch.nn.Parameter(torch.linspace(-1, 1, 5))
        c = torch.nn.Parameter(torch.ones(2, dtype=torch.complex64))
        opt = cls([a], lr=0.1, foreach=False)
        opt.train()
        opt.add_param_group({"params": [c]})
        for s in range(3):
            a.grad = torch.linspace(0, 1, 5) - s
            c.grad = torch.full((2,), 0.5 + 0.25j * s, dtype=torch.complex64)
            opt.step()
        return torch.cat([a.detach(), torch.view_as_real(c.detach()).flatten()])

    assert torch.allclose(run(fusedopt.AdamWScheduleFree), run(schedulefree.AdamWScheduleFree),
                          rtol=1e-6, atol=1e-7)
