"""Gradient release (fusedopt/release.py): params bit for bit the normal step's, at most one
bucket's gradients alive during a backward (counted inside the hooks), each refusal with
its message, remove_gradient_release, the state_dict round trip, and mutants of the
trigger and of the end-of-backward step that these tests catch."""
import copy

import pytest
import torch

import fusedopt
from fusedopt import release
from harness import HP, NAMES

# (name, hyperparameters): AdamW, SGD with momentum, NAdam (per-param scalar state),
# AdEMAMix (a key the step writes into its group), Adafactor (factored state)
CASES = [("AdamW", dict(lr=1e-2, weight_decay=0.1)),
         ("SGD", dict(lr=1e-2, momentum=0.9, nesterov=True)),
         ("NAdam", dict(lr=1e-2)),
         ("AdEMAMix", dict(lr=1e-2, t_alpha_beta3=4)),
         ("Adafactor", dict(lr=1e-2))]


class Net(torch.nn.Module):
    """mid is used twice (its grad is two parts added up), frozen takes no gradient, side
    only on odd steps (on even ones its bucket is stepped at the end of the backward)."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.emb = torch.nn.Linear(7, 16)
        self.mid = torch.nn.Linear(16, 16)
        self.frozen = torch.nn.Linear(16, 16)
        self.frozen.requires_grad_(False)
        self.side = torch.nn.Linear(16, 3)
        self.out = torch.nn.Linear(16, 3)
        self.to(dtype)

    def forward(self, x, side):
        h = torch.relu(self.emb(x))
        h = self.frozen(self.mid(torch.relu(self.mid(h))))
        return self.out(h) + self.side(h) if side else self.out(h)


def _groups(model):
    first = [*model.emb.parameters(), *model.mid.parameters()]
    rest = [p for p in model.parameters() if all(p is not q for q in first)]
    return [dict(params=first), dict(params=rest, lr=3e-3)]


def _train(model, opt, steps, seed=0, sched=None, check=True):
    """Under release, step() and zero_grad() are called on odd steps only (optional, as
    torch-optimi's): a gradient a backward left behind would be added to the next one's."""
    released = hasattr(model, "_gradient_release")
    gen = torch.Generator().manual_seed(seed)
    for k in range(steps):
        x = torch.randn(4, 7, generator=gen).to(next(model.parameters()).dtype)
        model(x, k % 2 == 1).square().mean().backward()
        if released and check:
            assert all(p.grad is None for p in model.parameters()), "a gradient left alive"
        if not released or k % 2 == 1:
            opt.step()
            opt.zero_grad()
        if sched is not None and k % 2 == 1:
            sched.step()


def _pair(name, hp, backend, dtype=torch.float32, bucket_mb=0.0005, **kw):
    """(normal model, optimizer, scheduler), (released ...), from one initial model."""
    torch.manual_seed(0)
    model = Net(dtype)
    out = []
    for rel in (False, True):
        m = copy.deepcopy(model)
        opt = getattr(fusedopt, name)(_groups(m), backend=backend, gradient_release=rel,
                                      **hp, **kw)
        if rel:
            fusedopt.prepare_for_gradient_release(m, opt, bucket_mb=bucket_mb)
        out.append((m, opt, torch.optim.lr_scheduler.StepLR(opt, 2, gamma=0.5)))
    return out


def _same(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("name,hp", CASES, ids=[c[0] for c in CASES])
def test_released_params_are_bitwise_the_normal_steps(name, hp, backend):
    (m0, o0, s0), (m1, o1, s1) = _pair(name, hp, backend)
    assert len(m1._gradient_release.buckets) > 2  # several buckets, one group each
    for steps in (1, 4):
        _train(m0, o0, steps, seed=steps, sched=s0)
        _train(m1, o1, steps, seed=steps, sched=s1)
        assert _same(m0, m1)
    assert o0.param_groups[1]["lr"] == o1.param_groups[1]["lr"] == 3e-3 * 0.5
    sd0, sd1 = o0.state_dict(), o1.state_dict()
    assert sd0["param_groups"] == sd1["param_groups"]  # (AdEMAMix's group "step" too)
    for i, st in sd0["state"].items():
        assert st.keys() == sd1["state"][i].keys()
        assert all(torch.equal(torch.as_tensor(v), torch.as_tensor(sd1["state"][i][k]))
                   for k, v in st.items())


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_stochastic_rounding_keeps_each_params_place_in_its_group(backend):
    # the stream is a function of the param's place in its group, not in its bucket
    (m0, o0, _), (m1, o1, _) = _pair("AdamW", dict(lr=1e-2), backend, torch.bfloat16,
                                     stochastic_rounding=True)
    _train(m0, o0, 3)
    _train(m1, o1, 3)
    assert _same(m0, m1)


def _live(model, seen):
    # after fusedopt's own hook (registered first): the gradients alive at that moment
    def count(p):
        seen.append(sum(q.grad.numel() * q.grad.element_size() for q in model.parameters()
                        if q.grad is not None))
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(count)


def _live_during_backward(bucket_mb=33400 / 2 ** 20):
    """(the largest bucket's bytes, the gradients' bytes alive at each hook with release,
    the same without): an MLP of 8 equal layers, buckets of two layers (a limit between
    two and three layers: buckets end between modules)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(8)])
    base = copy.deepcopy(model)
    opt = fusedopt.AdamW(model.parameters(), lr=1e-3, gradient_release=True)
    fusedopt.prepare_for_gradient_release(model, opt, bucket_mb=bucket_mb)
    buckets = model._gradient_release.buckets
    largest = max(sum(p.numel() * 4 for p in b.params) for b in buckets)
    assert len(buckets) == 4 and largest == 2 * (64 * 64 + 64) * 4
    seen, whole = [], []
    _live(model, seen)
    _live(base, whole)
    x = torch.randn(5, 64)
    model(x).sum().backward()
    base(x).sum().backward()
    assert len(seen) == 16 and all(p.grad is None for p in model.parameters())
    return largest, seen, whole


@pytest.mark.parametrize("bucket_mb", [33400 / 2 ** 20, 0.04])
def test_at_most_one_buckets_gradients_are_alive_during_backward(bucket_mb):
    largest, seen, whole = _live_during_backward(bucket_mb)
    assert max(seen) <= largest
    assert max(whole) == 8 * (64 * 64 + 64) * 4  # the normal backward: every gradient


def test_refusals_name_the_option():
    p = [torch.nn.Parameter(torch.randn(3))]
    with pytest.raises(ValueError, match="gradient_release and max_grad_norm"):
        fusedopt.AdamW(p, gradient_release=True, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="gradient_release and flat"):
        fusedopt.AdamW(p, gradient_release=True, flat=True)
    with pytest.raises(TypeError, match="gradient_release must be True or False"):
        fusedopt.AdamW(p, gradient_release=1)
    with pytest.raises(ValueError, match="AdamWScheduleFree does not support gradient_release"):
        fusedopt.AdamWScheduleFree(p, gradient_release=True)
    model = torch.nn.Linear(3, 2)
    with pytest.raises(TypeError, match="fusedopt optimizer"):
        fusedopt.prepare_for_gradient_release(model, torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match="gradient_release=True"):
        fusedopt.prepare_for_gradient_release(model, fusedopt.AdamW(model.parameters()))
    opt = fusedopt.AdamW(model.parameters(), gradient_release=True)
    h = model.weight.register_post_accumulate_grad_hook(lambda p: None)
    with pytest.raises(ValueError, match="ignore_existing_hooks=True"):
        fusedopt.prepare_for_gradient_release(model, opt)
    h.remove()
    fusedopt.prepare_for_gradient_release(model, opt)
    with pytest.raises(ValueError, match="already prepared"):
        fusedopt.prepare_for_gradient_release(model, opt)
    model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="clip_grad_norm_ over params prepared"):
        fusedopt.clip_grad_norm_(model.parameters(), 1.0)
    scaler = torch.amp.GradScaler("cpu")
    scaler.scale(model(torch.randn(4, 3)).sum()).backward()
    with pytest.raises(RuntimeError, match="does not take torch.amp.GradScaler"):
        scaler.step(opt)


def test_dtensor_params_are_refused(monkeypatch):
    # (no process group here: every param is taken for a DTensor)
    monkeypatch.setattr(release, "dtensor_class", lambda: torch.nn.Parameter)
    model = torch.nn.Linear(3, 2)
    opt = fusedopt.AdamW(model.parameters(), gradient_release=True)
    with pytest.raises(RuntimeError, match="DTensor"):
        fusedopt.prepare_for_gradient_release(model, opt)


def test_remove_gradient_release_restores_the_normal_step():
    (m0, o0, _), (m1, o1, _) = _pair("AdamW", dict(lr=1e-2), "numba")
    _train(m0, o0, 2)
    _train(m1, o1, 2)
    fusedopt.remove_gradient_release(m1)
    x = torch.randn(4, 7)
    m1(x, True).sum().backward()
    assert all(p.grad is not None for p in m1.parameters() if p.requires_grad)
    o1.zero_grad()
    _train(m0, o0, 3, seed=5)
    _train(m1, o1, 3, seed=5)
    assert _same(m0, m1)
    fusedopt.clip_grad_norm_(m1.parameters(), 1.0)  # no longer refused
    with pytest.warns(UserWarning, match="does not have any gradient release"):
        fusedopt.remove_gradient_release(m1)


def test_state_dict_round_trip_continues_bitwise():
    (m0, o0, _), (m1, o1, _) = _pair("AdamW", dict(lr=1e-2), "numba")
    _train(m0, o0, 5)
    _train(m1, o1, 2)
    sd, weights = copy.deepcopy(o1.state_dict()), copy.deepcopy(m1.state_dict())
    torch.manual_seed(1)
    m2 = Net()
    m2.load_state_dict(weights)
    o2 = fusedopt.AdamW(_groups(m2), lr=1.0, gradient_release=True)
    fusedopt.prepare_for_gradient_release(m2, o2, bucket_mb=0.0005)
    o2.load_state_dict(sd)  # new group dicts: the buckets are cut again at the next backward
    _train(m2, o2, 3, seed=0)  # (the seed's first two steps were taken before the save)
    _train(m1, o1, 3, seed=0)
    assert _same(m1, m2)
    # a checkpoint of released training loads into a normal optimizer, and back
    o3 = fusedopt.AdamW(_groups(m2), lr=1.0)
    o3.load_state_dict(o2.state_dict())
    assert o3.state_dict()["state"][0]["step"] == 5


@pytest.mark.parametrize("mutant", ["late", "no_flush", "places"])
def test_mutants_are_caught(monkeypatch, mutant):
    """late: a bucket stepped only at the end of the backward, not when its last gradient
    arrives (every gradient alive at once); no_flush: what a backward left in incomplete
    buckets (side is unused on even steps) not stepped at its end (their gradients alive
    after it, then met by the next backward: torch's in-place error, or other params);
    places: each param's place counted in its bucket, not its group (stochastic
    rounding's stream)."""
    if mutant == "late":
        monkeypatch.setattr(release, "_EARLY", -1)
        largest, seen, _ = _live_during_backward()
        assert max(seen) > largest
        return
    if mutant == "places":
        init = release._Part.__init__
        monkeypatch.setattr(release._Part, "__init__", lambda self, ps, g, places:
                            init(self, ps, g, range(len(ps))))
        with pytest.raises(AssertionError):
            test_stochastic_rounding_keeps_each_params_place_in_its_group("numba")
        return
    monkeypatch.setattr(release, "_FLUSH", False)
    (m0, o0, _), (m1, o1, _) = _pair("AdamW", dict(lr=1e-2), "numba")
    _train(m0, o0, 4)
    with pytest.raises(AssertionError, match="a gradient left alive"):
        _train(m1, o1, 4)
    m2, o2, _ = _pair("AdamW", dict(lr=1e-2), "numba")[1]
    try:
        _train(m2, o2, 4, check=False)
        assert not _same(m0, m2)
    except RuntimeError as e:
        assert "modified by an inplace operation" in str(e)


@pytest.mark.parametrize("reentrant", [True, False])
def test_checkpointed_segments_step_bitwise(reentrant):
    # reentrant checkpointing runs a backward inside the backward: its end steps what it
    # completed, the outer end the rest
    from torch.utils.checkpoint import checkpoint
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(torch.nn.Linear(16, 16) for _ in range(4))
    models = [copy.deepcopy(layers) for _ in range(2)]
    opts = [fusedopt.AdamW(m.parameters(), lr=1e-2, gradient_release=r)
            for m, r in zip(models, (False, True))]
    fusedopt.prepare_for_gradient_release(models[1], opts[1], bucket_mb=0.001)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        x = torch.randn(4, 16, generator=gen, requires_grad=True)
        for m, o in zip(models, opts):
            h = x
            for k, layer in enumerate(m):
                h = checkpoint(layer, h, use_reentrant=reentrant) if k in (1, 2) else layer(h)
            h.square().sum().backward()
            o.step()
            o.zero_grad()
    assert all(torch.equal(p, q) for p, q in zip(models[0].parameters(), models[1].parameters()))


def test_params_outside_the_model_or_the_optimizer():
    # the optimizer's param that is not the model's: stepped by step(); the model's param
    # that is not the optimizer's: its gradient accumulates as usual
    torch.manual_seed(0)
    model, extra = torch.nn.Linear(5, 4), torch.nn.Parameter(torch.randn(4))
    base, base_extra = copy.deepcopy(model), extra.detach().clone().requires_grad_()
    opts = [fusedopt.SGD([m.weight, e], lr=0.1, momentum=0.9, gradient_release=r)
            for m, e, r in ((base, base_extra, False), (model, extra, True))]
    fusedopt.prepare_for_gradient_release(model, opts[1])
    for m, e, o in ((base, base_extra, opts[0]), (model, extra, opts[1])):
        for _ in range(2):
            (m(torch.ones(2, 5)) * e).sum().backward()
            assert e.grad is not None and (m.weight.grad is None) == (m is model)
            o.step()
            o.zero_grad()
    assert torch.equal(model.bias.grad, base.bias.grad)  # two backwards' worth
    assert torch.equal(model.weight, base.weight) and torch.equal(extra, base_extra)


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("option", ["master_weights", "kahan_sum"])
def test_low_precision_options_bitwise(backend, option):
    (m0, o0, _), (m1, o1, _) = _pair("AdamW", dict(lr=1e-2), backend, torch.bfloat16,
                                     **{option: True})
    _train(m0, o0, 3)
    _train(m1, o1, 3)
    assert _same(m0, m1)
    key = "master" if option == "master_weights" else "kahan_comp"
    # (by param, in the models' order: a released optimizer's state fills bucket by bucket)
    states = [[o.state[p].get(key) for p in m.parameters()] for m, o in ((m0, o0), (m1, o1))]
    assert any(v is not None for v in states[0])  # (the option is in use)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(*states))


def test_8bit_state_bitwise():
    (m0, o0, _), (m1, o1, _) = _pair("AdamW", dict(lr=1e-2), "numba",
                                     state_dtype=torch.uint8)
    _train(m0, o0, 3)
    _train(m1, o1, 3)
    assert _same(m0, m1)


def test_ddp_models_are_refused():
    # (no process group here: an unbuilt DistributedDataParallel is enough for the check)
    ddp = torch.nn.parallel.DistributedDataParallel
    model = ddp.__new__(ddp)
    opt = fusedopt.AdamW([torch.nn.Parameter(torch.randn(2))], gradient_release=True)
    with pytest.raises(RuntimeError, match="DistributedDataParallel"):
        fusedopt.prepare_for_gradient_release(model, opt)


@pytest.mark.parametrize("name", [n for n in NAMES if "ScheduleFree" not in n])
def test_every_optimizer_is_bitwise_the_normal_step(name):
    # each with its flag-rich hyperparameters (tests/helpers/harness.py)
    (m0, o0, _), (m1, o1, _) = _pair(name, HP[name], "numba")
    _train(m0, o0, 3)
    _train(m1, o1, 3)
    assert _same(m0, m1)


def test_a_node_that_still_needs_a_stepped_param_raises_torchs_inplace_error():
    # h * w.detach() saves w; its node runs after w's gradient is complete and w stepped
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 4, bias=False)
    h = torch.randn(4, 4, requires_grad=True)
    opt = fusedopt.SGD(model.parameters(), lr=0.1, gradient_release=True)
    fusedopt.prepare_for_gradient_release(model, opt)
    y = (h * model.weight.detach()).sum() + model(torch.randn(2, 4)).sum()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()
