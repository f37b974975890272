"""Memory safety and torch.optim's semantics under ordinary PyTorch calls made between
steps (issue: cached addresses are a cache, never the truth).  Each class of case has a
named test here; tests/helpers/programs.py interleaves them at random, in a subprocess with
glibc's heap checking on, so that a stray write aborts it and a crash fails the test."""
import copy
import os
import pickle
import subprocess
import sys

import pytest
import torch

import fusedopt
from fusedopt import arith
from harness import NAMES
from twins import outcome, same, same_outcome, set_grads, step_both, twins

HERE = os.path.dirname(__file__)
HELPERS = os.path.join(HERE, "helpers")
HEAP_CHECK = dict(MALLOC_CHECK_="3", MALLOC_PERTURB_="165")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("how", ["data_clone", "set_", "vector_to_parameters", "channels_last"])
def test_param_storage_replaced_after_a_step(name, how):
    """p.data = ..., p.set_(...), vector_to_parameters, a new memory format: the param's
    storage moved; the next steps update it where it now lives, as torch's do."""
    ps, opts = twins(name, shapes=((5, 3), (7,), (2, 3, 4, 5), (1,)))
    set_grads(ps, 0)
    step_both(opts)
    for side in ps:
        if how == "data_clone":
            for p in side:
                p.data = p.data.clone()
        elif how == "set_":
            with torch.no_grad():
                side[0].set_(side[0].detach().clone())
        elif how == "vector_to_parameters":
            torch.nn.utils.vector_to_parameters(torch.arange(float(sum(p.numel() for p in side))), side)
        else:
            side[2].data = side[2].data.to(memory_format=torch.channels_last)
    for s in range(1, 4):
        set_grads(ps, s)
        step_both(opts)
        same(ps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_module_dtype_change_after_a_step_raises_as_torch(dtype):
    """The issue's crash: model.half() after a step.  torch's Adam then raises (its float32
    state against the new grads); so does fusedopt, with torch's error, and nothing is
    written out of bounds."""
    ms = [torch.nn.Linear(16, 16) for _ in range(2)]
    ms[1].load_state_dict(ms[0].state_dict())
    opts = [fusedopt.Adam(ms[0].parameters(), lr=1e-3), torch.optim.Adam(ms[1].parameters(), lr=1e-3)]
    x = torch.randn(4, 16)
    errs = []
    for m, o in zip(ms, opts):
        m(x).sum().backward()
        o.step()
        o.zero_grad()
        m.to(dtype)
        m(x.to(dtype)).float().sum().backward()
        try:
            o.step()
            errs.append(None)
        except RuntimeError as e:
            errs.append(str(e))
    assert errs[0] == errs[1]


@pytest.mark.parametrize("name", NAMES)
def test_state_reset_is_honoured(name):
    """state.clear(), del state[p], a replaced state tensor: torch.optim honours each at
    the next step, and so does fusedopt (its tables are rebuilt, not reused)."""
    ps, opts = twins(name)
    for s, change in enumerate(["clear", "del", "replace", None]):
        set_grads(ps, s)
        step_both(opts)
        same(ps)
        for o, side in zip(opts, ps):
            if change == "clear":
                o.state.clear()
            elif change == "del":
                del o.state[side[1]]
            elif change == "replace":
                st = o.state[side[0]]
                for k in [k for k in st if k != "step" and torch.is_tensor(st[k])]:
                    st[k] = torch.full_like(st[k], 0.25)
    set_grads(ps, 9)
    step_both(opts)
    same(ps)


def test_load_state_dict_of_wrong_shape_raises_naming_param_and_key():
    ps, (ours, theirs) = twins("Adam")
    set_grads(ps, 0)
    theirs.step()
    sd = copy.deepcopy(theirs.state_dict())
    sd["state"][2]["exp_avg"] = torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"state\[2\]\['exp_avg'\] of shape \(3,\).*param 2"):
        ours.load_state_dict(sd)


def test_load_state_dict_with_a_scalar_of_another_shape_raises_naming_it():
    """(found by CI's random programs) a step counter or NAdam's mu_product that is not one
    element is refused at the load, as a moment of the wrong shape is."""
    ps, opts = twins("NAdam")
    set_grads(ps, 0)
    step_both(opts)
    for key in ("step", "mu_product"):
        sd = copy.deepcopy(opts[0].state_dict())
        sd["state"][1][key] = torch.zeros(2)
        with pytest.raises(RuntimeError, match=rf"state\[1\]\['{key}'\] of shape \(2,\), "
                                               "but it is a scalar"):
            opts[0].load_state_dict(sd)


@pytest.mark.parametrize("name", ["Adam", "RMSprop", "Adagrad"])
def test_load_state_dict_with_a_missing_key_raises_torchs_keyerror(name):
    ps, opts = twins(name)
    set_grads(ps, 0)
    opts[1].step()
    sd = copy.deepcopy(opts[1].state_dict())
    del sd["state"][1][[k for k in sd["state"][1] if k != "step"][0]]
    kinds = []
    for o in opts:
        o.load_state_dict(copy.deepcopy(sd))
        set_grads(ps, 1)
        kinds.append(outcome(o.step))
    assert kinds[0] is kinds[1] is KeyError


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_reordered_group_params_pair_each_grad_with_its_param(name, scaled):
    ps, opts = twins(name)
    set_grads(ps, 0)
    step_both(opts)
    for o in opts:
        o.param_groups[0]["params"].reverse()
    if scaled:
        scalers = [torch.amp.GradScaler("cpu", init_scale=4.0) for _ in opts]
        for sc in scalers:
            sc.scale(torch.ones(()))
    for s in range(1, 3):
        set_grads(ps, s)
        if scaled:
            scalers[0].step(opts[0])
            with arith.replay():
                scalers[1].step(opts[1])
            for sc in scalers:
                sc.update()
        else:
            step_both(opts)
        same(ps)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("how", ["size", "dtype"])
def test_grad_of_another_size_or_dtype_gives_torchs_result_or_error(name, how):
    """A grad whose bytes are not the param's: torch's own for-loop steps that param
    (torch's result, e.g. SGD's type promotion, or torch's error); never a read past it."""
    ps, opts = twins(name)
    set_grads(ps, 0)
    for side in ps:
        g = side[1].grad
        g.data = torch.ones(4) if how == "size" else g.data.double()
    same_outcome(ps, opts)


def test_version_counters_move_as_torchs_so_autograd_sees_the_update():
    for name in NAMES:
        ps, opts = twins(name) if name in ("Adamax", "Rprop") else twins(name, weight_decay=0.1)
        set_grads(ps, 0)
        step_both(opts)
        assert [p._version for p in ps[0]] == [p._version for p in ps[1]], name
    w = torch.nn.Parameter(torch.randn(3))
    opt = fusedopt.SGD([w], lr=0.1)
    loss = (w * w).sum()  # saves w for backward
    w.grad = torch.ones(3)
    opt.step()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", NAMES)
def test_copied_optimizer_steps_like_the_original(name, how):
    ps, (ours, _) = twins(name, ours=dict(max_grad_norm=1.0))
    set_grads(ps, 0)
    ours.step()
    twin = copy.deepcopy(ours) if how == "deepcopy" else pickle.loads(pickle.dumps(ours))
    mine = twin.param_groups[0]["params"]
    for s in range(1, 3):
        set_grads([ps[0], mine], s)
        ours.step()
        twin.step()
    assert all(torch.equal(a, b) for a, b in zip(ps[0], mine))


def test_duplicate_params_step_as_torchs_for_loop():
    """A param given twice in a group (torch warns, then steps it twice): the engines
    would update it from two threads at once; fusedopt hands it to torch's for-loop."""
    ps, _ = twins("Adam")
    with pytest.warns(UserWarning):
        opts = [fusedopt.Adam([ps[0][0], ps[0][1], ps[0][0]], lr=1e-2),
                torch.optim.Adam([ps[1][0], ps[1][1], ps[1][0]], lr=1e-2, foreach=False)]
    for s in range(3):
        set_grads(ps, s)
        step_both(opts)
        same(ps)


def test_non_float_params_and_tensor_hyperparameters_behave_as_torch():
    kinds = []
    for cls in (fusedopt.SGD, torch.optim.SGD):
        q = torch.zeros(3, dtype=torch.int32)
        q.grad = torch.ones(3, dtype=torch.int32)
        kinds.append(outcome(cls([q], lr=0.1).step))
    assert kinds[0] is kinds[1] is not None
    ps, opts = twins("SGD", momentum=torch.tensor(0.9))
    for s in range(3):
        set_grads(ps, s)
        step_both(opts)
    same(ps)


def test_meta_params_step_as_torch():
    for cls in (fusedopt.Adam, torch.optim.Adam):
        m = torch.nn.Linear(4, 4, device="meta")
        for p in m.parameters():
            p.grad = torch.empty_like(p)
        opt = cls(m.parameters())
        opt.step()
        assert opt.state[m.weight]["exp_avg"].device.type == "meta"


def test_no_cache_grows_and_memory_stays_flat():
    """2,000 steps, a param's storage replaced at every step (a rebuild each time): one
    plan per group, and the resident set no larger after than after warm-up (+ noise)."""
    ps, (ours, _) = twins("Adam", shapes=((64, 64), (64,)))

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    for s in range(2000):
        if s == 200:
            warm = rss()
        ps[0][0].data = ps[0][0].data.clone()
        for p in ps[0]:
            p.grad = torch.ones_like(p)
        ours.step()
    assert len(ours._plans) == 1
    assert rss() - warm < 4 << 20


@pytest.mark.parametrize("first,count,reader", [(0, 200, "native"), (200, 60, "python")])
def test_random_programs_under_heap_checking(first, count, reader):
    """260 random programs (tests/programs.py), both engines, glibc heap checks on; the
    last 60 with the facts read in Python (host.py: a machine without a compiler)."""
    env = dict(os.environ, **HEAP_CHECK, FUSEDOPT_HOST=reader)
    out = subprocess.run([sys.executable, os.path.join(HELPERS, "programs.py"), str(first),
                          str(count), "both"],
                         capture_output=True, text=True, env=env, timeout=1200)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert len(out.stdout.splitlines()) == count


@pytest.mark.skipif(os.environ.get("MALLOC_CHECK_") == "3", reason="is the run under heap checks")
def test_these_tests_under_heap_checking():
    # and with the facts read in Python (host.py), as on a machine without a compiler
    env = dict(os.environ, **HEAP_CHECK, FUSEDOPT_HOST="python")
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                          "test_host.py", "test_aliasing.py",
                          "-k", "not random_programs and not heap_checking"],
                         capture_output=True, text=True, env=env, timeout=1200, cwd=HERE)
    assert out.returncode == 0, out.stdout[-3000:]


def _child_step(opt, params, queue):
    opt.step()
    # numpy copies: torch's own multi-threaded ops (a clone of 65537 elements) hang in a
    # child forked after the parent used them (GNU OpenMP), with or without fusedopt
    queue.put([p.detach().numpy().copy() for p in params])


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_forked_child_steps_like_the_parent(name):
    """multiprocessing's default fork, after the parent stepped (numba's OpenMP pool in
    use): the child steps on serial kernels, with the parent's bits."""
    import multiprocessing as mp
    ps, (ours, _) = twins(name)
    set_grads(ps, 0)
    ours.step()
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    child = ctx.Process(target=_child_step, args=(ours, ps[0], queue))
    child.start()
    got = queue.get(timeout=120)
    child.join(60)
    assert child.exitcode == 0
    ours.step()
    assert all(torch.equal(torch.from_numpy(a), b) for a, b in zip(got, ps[0]))


@pytest.mark.parametrize("how", ["in_place", "data", "none"])
def test_master_weights_follow_a_param_changed_from_outside(how):
    """master_weights=True keeps a float32 copy that the step rounds into the bfloat16
    param; a param written from outside (model.load_state_dict copies in place, p.data =
    ...) is noticed, and the master copy starts again from it instead of overwriting it."""
    p = torch.nn.Parameter(torch.randn(1000).bfloat16())
    opt = fusedopt.Adam([p], lr=1e-3, master_weights=True)
    for s in range(2):
        p.grad = torch.ones_like(p)
        opt.step()
    new = torch.full_like(p, 3.0)
    if how == "in_place":
        with torch.no_grad():
            p.copy_(new)
    elif how == "data":
        p.data = new.clone()
    before = p.detach().clone()
    p.grad = torch.ones_like(p)
    opt.step()
    moved = (p.detach().float() - before.float()).abs().max().item()
    assert moved < 0.05, moved  # one Adam step of lr 1e-3 (bfloat16 near 3: ulp 1/64)
    assert torch.equal(opt.state[p]["master"].bfloat16(), p.detach())
    if how != "none":
        assert (p.detach().float() - 3.0).abs().max() < 0.05


def test_param_stepped_by_torch_is_clipped_and_its_grad_left_as_given():
    """max_grad_norm folds clipping into the step; a param handed to torch's for-loop (its
    grad is float64, allowed by grad_dtype=None) is clipped by the same factor, and its
    gradient is not written (as for the params the kernel takes)."""
    ps, _ = twins("SGD")
    for side in ps:
        side[1].grad_dtype = None
    opts = [fusedopt.SGD(ps[0], lr=0.1, max_grad_norm=0.5),
            torch.optim.SGD(ps[1], lr=0.1, foreach=False)]
    set_grads(ps, 0)
    for side in ps:
        side[1].grad = side[1].grad.double()
    given = [p.grad.clone() for p in ps[0]]
    opts[0].step()
    torch.nn.utils.clip_grad_norm_(ps[1], 0.5)
    with arith.replay():
        opts[1].step()
    same(ps)
    assert all(torch.equal(p.grad, g) for p, g in zip(ps[0], given))
