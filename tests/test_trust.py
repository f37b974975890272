"""The per-tensor trust-ratio algorithms (Spec.trust: a reduce pass, then the update) against
the packages they are drop-ins for: LARS (pytorch_optimizer.LARS), StableAdamW
(optimi.StableAdamW), and LAMB (Apex's FusedLAMB, not installable here: its twin is written
from Apex's algorithm, and compared with pytorch_optimizer.Lamb where the two coincide)."""
import copy
import functools

import pytest
import torch

import fusedopt
from fusedopt import arith, parity
from fusedopt import lamb as lamb_mod
from harness import BACKENDS, max_ulp
from twins import agree, outcome, same, same_outcome, set_grads, step_both, train, twins

pytorch_optimizer = pytest.importorskip(
    "pytorch_optimizer", reason="pytorch-optimizer (a test extra) is not installed")

SHAPES = [(0,), (1,), (7,), (33, 17), (2, 3, 4), (65537,), (5, 0)]
CASES = {  # (fused class, its twin's source package class or None, hyperparameters)
    "lars": ("LARS", lambda: pytorch_optimizer.LARS,
             dict(lr=1e-2, weight_decay=0.1, trust_coefficient=0.02)),
    "lars-nesterov-maximize": ("LARS", lambda: pytorch_optimizer.LARS,
                               dict(lr=1e-2, nesterov=True, maximize=True, dampening=0.2)),
    "lars-no-momentum": ("LARS", lambda: pytorch_optimizer.LARS,
                         dict(lr=1e-2, momentum=0.0, weight_decay=0.05)),
    "stableadamw": ("StableAdamW", lambda: pytest.importorskip("optimi").StableAdamW,
                    dict(lr=1e-2, weight_decay=0.1)),
    "stableadamw-decouple": ("StableAdamW", lambda: pytest.importorskip("optimi").StableAdamW,
                             dict(lr=1e-2, betas=(0.3, 0.9), decouple_lr=True, max_lr=2e-2)),
    "lamb": ("LAMB", None, dict(lr=1e-2, weight_decay=0.1)),  # clipped (max_grad_norm=1)
    "lamb-l2-nvlamb": ("LAMB", None, dict(lr=1e-2, adam_w_mode=False, use_nvlamb=True,
                                          weight_decay=0.0, bias_correction=False)),
}


def _theirs(case):
    name, pkg, hp = CASES[case]
    if pkg is None:
        return getattr(fusedopt, name).twin(), hp, {}
    # their per-tensor paths (optimi's triton=None picks its Triton kernels where Triton
    # is installed, its interpreter on a CPU)
    return pkg(), hp, ({"foreach": False} if name == "LARS" else {"triton": False})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", CASES)
def test_steps_as_the_package(backend, dtype, case):
    name = CASES[case][0]
    cls, hp, kw = _theirs(case)
    theirs, init, _ = train(cls, dtype, hp, SHAPES, **kw)
    loop, _, _ = train(getattr(fusedopt, name).twin(), dtype, hp, SHAPES)
    ours, _, _ = train(getattr(fusedopt, name), dtype, hp, SHAPES, backend=backend)
    assert max_ulp(loop, theirs) == 0  # the twin is the package's arithmetic
    agree(ours, theirs, init, dtype, hp["lr"])
    # bitwise where the norms are ours on both sides (the packages' float32 norms and
    # means are not correctly rounded: an ulp of a ratio now and then)
    if backend == "numba" and name == "LAMB" and dtype == torch.float32:
        assert max_ulp(ours, theirs) == 0
    assert any(not torch.equal(a, b) for a, b in zip(ours, init) if a.numel())


def test_lamb_is_pytorch_optimizers_lamb_where_they_coincide():
    """beta1 = 0, no bias correction, no weight decay or clipping, trust ratio 1 (Apex
    applies none without weight decay; pytorch_optimizer with adam=True): bit for bit."""
    hp = dict(lr=1e-2, betas=(0.0, 0.999))
    theirs, init, _ = train(pytorch_optimizer.Lamb, torch.float32, hp, SHAPES, adam=True,
                            foreach=False)
    ours, _, _ = train(fusedopt.LAMB, torch.float32, hp, SHAPES, bias_correction=False,
                       weight_decay=0.0, max_grad_norm=0.0)
    assert max_ulp(ours, theirs) == 0


def test_lamb_clip_off_by_an_ulp_is_caught(monkeypatch):
    """The mutation check: the global norm's factor one ulp larger fails the comparison."""
    hp = CASES["lamb"][2]
    theirs, init, _ = train(fusedopt.LAMB.twin(), torch.float32, hp, SHAPES)
    right = lamb_mod.LAMBForLoop._clip_factors

    def off(opt, grads, inv=1.0):
        return [torch.nextafter(c, c + 1) if torch.is_tensor(c) else c
                for c in right(opt, grads, inv)]
    monkeypatch.setattr(lamb_mod.LAMBForLoop, "_clip_factors", off)
    ours, _, _ = train(fusedopt.LAMB, torch.float32, hp, SHAPES, backend="numba")
    assert max_ulp(ours, theirs) > 0
    with pytest.raises(AssertionError):
        agree(ours, theirs, init, torch.float32, hp["lr"] / 100)


raised = functools.partial(outcome, message=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lamb_global_norm_is_over_the_params_the_groups_hold_now(backend):
    """(random programs, seed 208) group["params"] reassigned between steps: the global
    norm that clips is over the params the groups hold now, as the twin's; the param left
    out keeps its grad (the largest: had it counted, the clip would differ ~100-fold)."""
    ps, opts = twins("LAMB", backend=backend, max_grad_norm=1.0)
    set_grads(ps, 1)
    step_both(opts)
    for side, opt in zip(ps, opts):
        opt.param_groups[0]["params"] = [side[0], side[1], side[3]]
    set_grads(ps, 2)
    step_both(opts)
    same(ps)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("clip", [1.0, 0.0])
def test_lamb_takes_an_integer_grad_as_its_twin(backend, clip):
    """(random programs, seed 184) a float32 grad's bytes read as int32: with clipping the
    global norm raises torch's error on both sides (get_total_norm's); without, the twin
    steps it (the fused step hands it to the twin)."""
    ps, opts = twins("LAMB", backend=backend, max_grad_norm=clip)
    set_grads(ps, 1)
    for side in ps:
        side[1].grad.data = side[1].grad.data.view(torch.int32)
    assert same_outcome(ps, opts) is (RuntimeError if clip else None)
    if clip:  # (nothing was stepped) the same text too
        assert raised(opts[0].step) == raised(opts[1].step)




@pytest.mark.parametrize("kw", [dict(lr=-1.0), dict(weight_decay=-0.1), dict(momentum=1.0),
                                dict(dampening=-0.1), dict(trust_coefficient=-1.0)])
def test_lars_constructor_errors_are_the_packages(kw):
    p = [torch.nn.Parameter(torch.zeros(3))]
    want = raised(lambda: pytorch_optimizer.LARS(p, **kw))
    assert want is not None and raised(lambda: fusedopt.LARS(p, **kw)) == want


@pytest.mark.parametrize("kw", [dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(betas=(0.9, -0.1)),
                                dict(eps=-1.0), dict(weight_decay=-1.0),
                                dict(decouple_lr=True, max_lr=-1.0)])
def test_stableadamw_constructor_errors_are_optimis(kw):
    optimi = pytest.importorskip("optimi")
    p = [torch.nn.Parameter(torch.zeros(3))]
    kw = {"lr": 1e-3, **kw}
    want = raised(lambda: optimi.StableAdamW(p, **kw))
    assert want is not None and raised(lambda: fusedopt.StableAdamW(p, **kw)) == want


@pytest.mark.parametrize("cls, kw", [("StableAdamW", dict(lr=1e-3, kahan_sum=True)),
                                     ("StableAdamW", dict(lr=1e-3, triton=True)),
                                     ("StableAdamW", dict(lr=1e-3, foreach=True)),
                                     ("StableAdamW", dict(lr=1e-3, gradient_release=True)),
                                     ("LAMB", dict(state_dtype=torch.uint8)),
                                     ("LARS", dict(state_dtype=torch.uint8))])
def test_options_it_lacks_are_refused_by_name(cls, kw):
    name = [k for k in kw if k != "lr"][0]
    with pytest.raises(ValueError, match=f"does not support {name}"):
        getattr(fusedopt, cls)([torch.nn.Parameter(torch.zeros(3))], **kw)


def test_lamb_amsgrad_and_sparse_errors_are_apexs():
    p = [torch.nn.Parameter(torch.zeros(4))]
    with pytest.raises(RuntimeError, match="does not support the AMSGrad variant"):
        fusedopt.LAMB(p, amsgrad=True)
    p[0].grad = torch.eye(4)[0].to_sparse()
    assert raised(fusedopt.LAMB(p).step) == raised(fusedopt.LAMB.twin()(p).step)


@pytest.mark.parametrize("case", ["lars", "stableadamw", "lamb"])
def test_state_dict_continues_in_the_twin_both_ways(case):
    name, _, hp = CASES[case]
    params, grads = parity.make_data(4, torch.float32, 6, SHAPES)
    cls = getattr(fusedopt, name)

    def make(c):
        return c([torch.nn.Parameter(p.clone()) for p in params], **hp)

    def steps(opt, gs):
        for g in gs:
            for p, x in zip(opt.param_groups[0]["params"], g):
                p.grad = x.clone()
            with arith.replay():
                opt.step()

    a, b = make(cls.twin()), make(cls)
    steps(a, grads[:3])
    steps(b, grads[:3])
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    assert all(sa["state"][k].keys() == sb["state"][k].keys() for k in sa["state"])
    c, d = make(cls), make(cls.twin())
    for opt in (c, d):
        for p, q in zip(opt.param_groups[0]["params"], a.param_groups[0]["params"]):
            p.data.copy_(q)
    c.load_state_dict(copy.deepcopy(sa))
    d.load_state_dict(copy.deepcopy(sb))
    for opt in (a, b, c, d):
        steps(opt, grads[3:])
    final = [[p.detach() for p in o.param_groups[0]["params"]] for o in (a, b, c, d)]
    bound = 0 if name == "LAMB" else 2
    assert all(max_ulp(final[0], f, params, floor=hp["lr"]) <= bound for f in final[1:])


def _trust_off(cls, key, rel):
    """Mutant: the per-tensor factor the trust pass hands the update (LAMB's step, LARS's
    ratio, StableAdamW's lr) off by the relative ``rel``."""
    class Off(cls):
        def _trust(self, group, bucket, sums, co):
            co = super()._trust(group, bucket, sums, co)
            return {**co, key: co[key] * (1 + rel)}
    return Off


class _LARSWithoutDecay(fusedopt.LARS):
    """Mutant: weight decay left out of the ratio's denominator (|g| for |g| + wd |p|)."""

    def _trust(self, group, bucket, sums, co):
        return super()._trust({**group, "weight_decay": 0.0}, bucket, sums, co)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,key", [("LAMB", "step"), ("LARS", "ratio"), ("StableAdamW", "lr")])
def test_looser_ulp_bound_catches_a_trust_factor_off(name, key, dtype):
    """The trust classes' ulp bound (Spec.ulp=64: the engines' float64 sums differ in
    order) still catches a trust factor 1000 ulp of its dtype off (a relative 1.2e-4 in
    float32, 2.2e-13 in float64): 400-2000 ulp of the params in 5 steps (the same cases
    unmutated pass within it: test_parity.py)."""
    cls, bound = getattr(fusedopt, name), getattr(fusedopt, name).spec.ulp
    mutant = _trust_off(cls, key, 1000 * torch.finfo(dtype).eps)
    bad = parity.check(name, cls.spec.cases[0], dtype, backends=["numba"], steps=5, cls=mutant)
    assert bad["ulp_vs_torch"] > 4 * bound, bad["ulp_vs_torch"]
    if name == "LARS":
        bad = parity.check(name, dict(weight_decay=0.1), dtype, backends=["numba"], steps=5,
                           cls=_LARSWithoutDecay)
        assert bad["ulp_vs_torch"] > 1000 * bound, bad["ulp_vs_torch"]
