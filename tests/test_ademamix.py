"""AdEMAMix (not in torch) against the pytorch-optimizer package it is a drop-in for: the same
steps (float32 and float64, both engines, both weight-decay modes, the alpha/beta3 warmup),
constructor errors and state_dict.  fusedopt.ademamix.AdEMAMixForLoop (the parity tests'
anchor for AdEMAMix) is the package's arithmetic bit for bit."""
import copy
import functools

import pytest
import torch

import fusedopt
from fusedopt import arith, parity
from fusedopt import ademamix as mod
from harness import BACKENDS, max_ulp
from twins import agree, outcome, train

pytorch_optimizer = pytest.importorskip(
    "pytorch_optimizer", reason="pytorch-optimizer (a test extra) is not installed")
Theirs = pytorch_optimizer.AdEMAMix

SHAPES = [(0,), (1,), (7,), (33, 17), (2, 3, 4), (65537,)]
HPS = {  # each: a weight-decay mode, and the warmup or beta1 < 0.5 / beta3 < 0.5 (lerp's formulas)
    "coupled-warmup": dict(lr=3e-3, betas=(0.8, 0.99, 0.999), weight_decay=0.1, t_alpha_beta3=10),
    "decoupled-maximize": dict(lr=3e-3, betas=(0.3, 0.9, 0.4), weight_decay=0.1,
                               weight_decouple=True, maximize=True),
    "fixed-decay-warmup": dict(lr=1e-2, weight_decay=0.01, weight_decouple=True,
                               fixed_decay=True, t_alpha_beta3=30),
}






@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hp", HPS.values(), ids=HPS.keys())
def test_ademamix_steps_as_pytorch_optimizer(backend, dtype, hp):
    theirs, init, _ = train(Theirs, dtype, hp, SHAPES, foreach=False)  # its per-tensor path
    loop, _, _ = train(mod.AdEMAMixForLoop, dtype, hp, SHAPES)
    ours, _, _ = train(fusedopt.AdEMAMix, dtype, hp, SHAPES, backend=backend)
    assert max_ulp(loop, theirs) == 0  # the twin is the package's arithmetic
    agree(ours, theirs, init, dtype, hp["lr"])
    if backend == "numba":  # IEEE ops in torch's order, multiply-adds fused where torch's
        assert max_ulp(ours, theirs) == 0
    assert any(not torch.equal(a, b) for a, b in zip(ours, init) if a.numel())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_packages_default_foreach_path_is_its_per_tensor_arithmetic(dtype):
    # (on this machine's own torch ops: arith.replay patches the per-tensor ops only)
    hp = HPS["decoupled-maximize"]
    a = train(Theirs, dtype, hp, SHAPES, replay=False)[0]
    b = train(Theirs, dtype, hp, SHAPES, replay=False, foreach=False)[0]
    assert max_ulp(a, b) == 0


def test_a_beta3_schedule_one_step_off_is_caught(monkeypatch):
    """The mutation check: the comparison above fails on a real error."""
    right = mod.schedules

    def ahead(group, step):
        return (*right(group, step)[:3], right(group, step + 1)[3])

    hp = HPS["fixed-decay-warmup"]
    theirs, init, _ = train(Theirs, torch.float32, hp, SHAPES, foreach=False)
    monkeypatch.setattr(mod, "schedules", ahead)
    ours, _, _ = train(fusedopt.AdEMAMix, torch.float32, hp, SHAPES, backend="numba")
    with pytest.raises(AssertionError):
        agree(ours, theirs, init, torch.float32, hp["lr"])



raised = functools.partial(outcome, message=True)


@pytest.mark.parametrize("kw", [dict(lr=-1.0), dict(betas=(1.0, 0.9, 0.9)),
                                dict(betas=(0.9, -0.1, 0.9)), dict(betas=(0.9, 0.9, 1.5)),
                                dict(betas=(0.9, 0.99, 1.0)), dict(alpha=-1.0),
                                dict(t_alpha_beta3=-1.0), dict(weight_decay=-0.1),
                                dict(eps=-1e-8)])
def test_constructor_errors_are_the_packages(kw):
    p = [torch.nn.Parameter(torch.zeros(3))]
    want = raised(lambda: Theirs(p, **kw))
    assert want is None or want[0] != "TypeError"
    assert raised(lambda: fusedopt.AdEMAMix(p, **kw)) == want
    assert raised(lambda: mod.AdEMAMixForLoop(p, **kw)) == want


@pytest.mark.parametrize("case", ["sparse", "complex"])
def test_step_errors_are_the_packages(case):
    def run(cls):
        if case == "sparse":
            p = torch.nn.Parameter(torch.zeros(4))
            p.grad = torch.eye(4)[0].to_sparse()
        else:
            p = torch.nn.Parameter(torch.zeros(4, dtype=torch.complex64))
            p.grad = torch.ones(4, dtype=torch.complex64)
        return raised(cls([p]).step)
    want = run(Theirs)
    assert want is not None and run(fusedopt.AdEMAMix) == want


@pytest.mark.parametrize("option", ["cautious", "stable_adamw", "capturable"])
def test_options_it_lacks_are_refused_by_name(option):
    with pytest.raises(ValueError, match=f"does not support {option}"):
        fusedopt.AdEMAMix([torch.nn.Parameter(torch.zeros(3))], **{option: True})


def test_state_dict_is_the_packages_both_ways():
    """Same keys (the step counter in group["step"]); a checkpoint of either continues in
    the other, to the bit."""
    hp = HPS["coupled-warmup"]
    params, grads = parity.make_data(4, torch.float32, 6, SHAPES)

    def make(cls, **kw):
        return cls([torch.nn.Parameter(p.clone()) for p in params], **hp, **kw)

    def steps(opt, gs):
        for g in gs:
            for p, x in zip(opt.param_groups[0]["params"], g):
                p.grad = x.clone()
            with arith.replay():
                opt.step()

    a, b = make(Theirs, foreach=False), make(fusedopt.AdEMAMix)
    steps(a, grads[:3])
    steps(b, grads[:3])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    assert all(sa["state"][k].keys() == sb["state"][k].keys()
               == {"exp_avg", "exp_avg_sq", "exp_avg_slow"} for k in sa["state"])
    ga, gb = sa["param_groups"][0], sb["param_groups"][0]
    assert ga["step"] == gb["step"] == 3 and set(ga) <= set(gb)
    assert set(gb) - set(ga) == {"l1", "state_dtype", "master_weights", "flat",
                                 "stochastic_rounding", "kahan_sum"}  # fusedopt's options
    # cross-load (the params as a checkpoint's model holds them), then all continue
    c, d = make(fusedopt.AdEMAMix), make(Theirs, foreach=False)
    for opt in (c, d):
        for p, q in zip(opt.param_groups[0]["params"], a.param_groups[0]["params"]):
            p.data.copy_(q)
    c.load_state_dict(copy.deepcopy(sa))  # (torch's loading may keep the very tensors)
    d.load_state_dict(copy.deepcopy(sb))
    d.param_groups[0]["foreach"] = False  # (a group's foreach comes with the checkpoint)
    for opt in (a, b, c, d):
        steps(opt, grads[3:])
    final = [[p.detach() for p in o.param_groups[0]["params"]] for o in (a, b, c, d)]
    assert all(max_ulp(final[0], f) == 0 for f in final[1:])
    assert c.param_groups[0]["step"] == d.param_groups[0]["step"] == 6
