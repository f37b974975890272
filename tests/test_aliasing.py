"""Memory safety (continued from test_safety.py): a param or grad reshaped in place, state
tensors that share memory or are not tensors.  The plan must notice each and hand the
param to torch's for-loop: torch's result or error, never a silent step over memory
laid out as the plan last saw it."""
import pytest
import torch

import fusedopt
from fusedopt import spec
from harness import HP, NAMES
from twins import same, same_outcome, set_grads, step_both, twins


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("what", ["param", "grad"])
def test_reshaped_in_place_after_a_step_gives_torchs_result_or_error(name, what):
    """p.data = p.data.view(...) (or the grad's): the same address and bytes, another
    shape.  The plan notices (the facts hold a digest of the sizes) and torch's for-loop
    decides: torch's error where the state keeps the old shape, as torch's own step
    raises; never a silent step over the old layout."""
    ps, opts = twins(name)
    set_grads(ps, 0)
    step_both(opts)
    set_grads(ps, 1)
    for side in ps:
        t = side[0] if what == "param" else side[0].grad
        t.data = t.data.view(3, 5)
        if what == "param":
            side[0].grad = side[0].grad.view(3, 5)
    same_outcome(ps, opts)


def _state_cases():
    # (name, how) for each optimizer's state: its step counter (shared between two
    # params, or a Python number), its param-shaped moments (one the param itself, two
    # one tensor); read from torch's twin after one step
    cases = []
    for name in NAMES:
        p = torch.nn.Parameter(torch.zeros(5, 3))
        p.grad = torch.ones(5, 3)
        opt = spec.ready(getattr(fusedopt, name).twin()([p], **HP[name]))
        opt.step()
        st = opt.state[p]
        moments = [k for k, v in st.items() if torch.is_tensor(v) and v.shape == p.shape]
        hows = ["step_shared", "step_number"] * ("step" in st) + ["moment_is_param"] * \
            (len(moments) > 0) + ["moments_shared"] * (len(moments) > 1)
        cases += [(name, how) for how in hows]
    return cases


@pytest.mark.parametrize("name,how", _state_cases())
def test_state_sharing_memory_or_not_a_tensor_gives_torchs_result_or_error(name, how):
    """State a user made odd between steps: one step counter for two params (torch
    counts it up once per param), a moment that is the param's own memory or another
    moment, a step that is a Python number.  The engines update all of a param's tensors
    at once, so the plan hands such params to torch's for-loop: torch's result or error."""
    ps, opts = twins(name)
    set_grads(ps, 0)
    step_both(opts)
    for side, opt in zip(ps, opts):
        st = opt.state[side[0]]
        moments = sorted(k for k, v in st.items() if torch.is_tensor(v) and v.shape == side[0].shape)
        if how == "step_shared":
            opt.state[side[1]]["step"] = st["step"]
        elif how == "step_number":
            st["step"] = float(st["step"])
        elif how == "moment_is_param":
            st[moments[0]] = side[0].data
        else:
            st[moments[1]] = st[moments[0]]
    for s in range(1, 3):
        set_grads(ps, s)
        # (a moment that is another can take a root of < 0: NaN on both sides)
        if same_outcome(ps, opts, equal_nan=True) is not None:
            break


MEETING = ["earlier_param", "later_param", "own_param", "own_moment", "other_moment",
           "numpy_view_of_param", "own_param_via_dlpack"]


def _meet(how, side, opt):
    # side: the five params of one twin; a grad made to meet memory its step writes
    if how == "earlier_param":  # torch updates p2 before reading it as p4's grad
        side[4].grad = side[2].detach()
    elif how == "later_param":  # ... and reads p4 as p2's grad before updating it
        side[2].grad = side[4].detach()
    elif how == "own_param":  # (AdamW decays p before reading its grad)
        side[2].grad = side[2].detach()
    elif how == "numpy_view_of_param":  # another storage over the same memory
        side[4].grad = torch.from_numpy(side[2].detach().numpy())
    elif how == "own_param_via_dlpack":
        # a step later (the plan rebuilt for the new param by then), a grad that is an
        # allocation of its own, its storage held by nothing else (DLPack holds the
        # tensor), under its param's memory (as own_param, this differs from torch's
        # deterministically with AdamW's decay)
        if not hasattr(side[2], "_under"):
            side[2]._under = side[2].detach().clone()
            side[2].data = torch.from_dlpack(side[2]._under)
        else:
            side[2].grad = side[2]._under
    else:
        st = opt.state[side[2]]
        moments = sorted(k for k, v in st.items() if torch.is_tensor(v) and v.shape == side[2].shape)
        if not moments:
            return False
        (side[2] if how == "own_moment" else side[4]).grad = st[moments[0]]
    return True


@pytest.mark.parametrize("how", MEETING)
@pytest.mark.parametrize("name", NAMES)
def test_a_grad_that_meets_memory_the_step_writes_gives_torchs_result(name, how):
    """A grad that is another param's memory (`p1.grad = p0.detach()`), its own param's,
    a moment's, or a storage of its own over such memory (numpy): torch reads it before
    or after that tensor's update, by param order; the engines update every chunk at
    once.  The plan notices (each step, host.read's MEETS) and torch's for-loop steps
    those params: torch's result, also the steps after."""
    ps, opts = twins(name, shapes=((5, 3), (7,), (65537,), (1,), (65537,)))
    set_grads(ps, 0)
    step_both(opts)
    for s in range(1, 4):
        set_grads(ps, s)
        if not all(_meet(how, side, opt) for side, opt in zip(ps, opts)):
            pytest.skip(f"{name} keeps no param-shaped moment")
        same_outcome(ps, opts, replay_ours=True)


def test_a_grad_meeting_written_memory_with_8bit_state_is_a_clear_error():
    """torch.optim has no 8-bit state to step such a param with: a RuntimeError naming
    the params and why, before any memory is touched."""
    ps = [torch.nn.Parameter(torch.randn(8192)) for _ in range(3)]
    for p in ps:
        p.grad = torch.randn(8192)
    opt = fusedopt.Adam(ps, state_dtype=torch.uint8)
    opt.step()
    ps[2].grad = ps[0].detach()
    before = [p.detach().clone() for p in ps]
    with pytest.raises(RuntimeError, match=r"params \[.0 \(.*grad.*, .2 \(.*grad.*\] cannot be fused"):
        opt.step()
    for p, b in zip(ps, before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("name", NAMES)
def test_state_tensors_a_user_holds_stay_the_state_across_plan_rebuilds(name):
    """torch's state stays the same tensors step after step; a plan rebuilt (here by
    another param's `p.data = ...`) keeps them too (found by the random programs: Adafactor
    moved its factors into a new buffer at every plan build, and a grad that was a view
    of one stopped being the state)."""
    ps, opts = twins(name)
    set_grads(ps, 0)
    step_both(opts)
    set_grads(ps, 1)
    step_both(opts)  # (Adafactor's factors are one buffer from here)
    held = [(st, k, v) for p in ps[0] for st in [opts[0].state[p]] for k, v in st.items()
            if torch.is_tensor(v)]
    for side in ps:
        side[1].data = side[1].data.clone()
    set_grads(ps, 2)
    step_both(opts)
    assert all(st[k] is v for st, k, v in held)
    same(ps)
