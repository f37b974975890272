"""The facts the per-step proof compares (fusedopt/host.py): the C++ helper and the Python
reader each notice every change that moves a kernel's address, size, dtype, device or
layout; and the changes the first wave's fast path missed now reach torch's result."""
import numpy as np
import pytest
import torch

from fusedopt import host
from harness import NAMES
from twins import same, same_outcome, set_grads, step_both, twins


def _helper(monkeypatch):
    # built here also where this process reads in Python (FUSEDOPT_HOST=python); CI
    # machines have a compiler, so the fast path they test is the helper's
    monkeypatch.delenv("FUSEDOPT_HOST", raising=False)
    monkeypatch.setattr(host, "_native", None)
    helper = host.native()
    assert helper is not None, "the C++ helper did not build on this machine"
    return helper


@pytest.fixture(params=["native", "python"])
def reader(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setattr(host, "_native", False)
    else:
        _helper(monkeypatch)
    return request.param


def _with_grads():
    ps = [torch.nn.Parameter(torch.randn(s)) for s in ((6, 4), (6, 4), (24,))]
    for p in ps:
        p.grad = torch.randn(p.shape)
    return ps


def _no_grad(fn, *args):
    with torch.no_grad():
        fn(*args)


# each change to the tensor at index 1; which table it must show in
CHANGES = {
    "param replaced": ("P", lambda ps, w: setattr(ps[1], "data", ps[1].data.clone())),
    "param narrowed in place": ("P", lambda ps, w: setattr(ps[1], "data", ps[1].data[:3])),
    "param same bytes, other dtype": ("P", lambda ps, w: setattr(
        ps[1], "data", ps[1].data.view(torch.complex64))),
    "param transposed": ("P", lambda ps, w: setattr(ps[1], "data", ps[1].data.t())),
    "param set_": ("P", lambda ps, w: _no_grad(ps[1].set_, torch.zeros(6, 4))),
    "param storage resized": ("P", lambda ps, w: ps[1].data.untyped_storage().resize_(0)),
    "grad replaced": ("G", lambda ps, w: setattr(ps[1], "grad", ps[1].grad.clone())),
    "grad None": ("G", lambda ps, w: setattr(ps[1], "grad", None)),
    "grad sparse": ("G", lambda ps, w: setattr(ps[1], "grad", ps[1].grad.to_sparse())),
    "grad of another size": ("G", lambda ps, w: setattr(ps[1].grad, "data", torch.ones(4))),
    "grad same bytes, other dtype": ("G", lambda ps, w: setattr(
        ps[1].grad, "data", ps[1].grad.data.view(torch.int32))),
    "grad non-contiguous": ("G", lambda ps, w: setattr(ps[1], "grad",
                                                       torch.randn(4, 6).t())),
    "state swapped in place": ("W", lambda ps, w: setattr(w[1], "data", w[1].data.clone())),
    "state narrowed in place": ("W", lambda ps, w: setattr(w[1], "data", w[1].data[:2])),
}


@pytest.mark.parametrize("change", CHANGES)
def test_each_change_shows_in_its_row_only(reader, change):
    ps = _with_grads()
    watched = [torch.zeros_like(p) for p in ps]
    before = host.read(ps, watched)
    table, do = CHANGES[change]
    do(ps, watched)
    after = host.read(ps, watched)
    for name, b, a in zip("PGW", before, after):
        differs = [i for i in range(len(b)) if not np.array_equal(a[i], b[i])]
        assert differs == ([1] if name == table else []), (name, differs)


def test_unchanged_tensors_read_alike_every_time(reader):
    ps = _with_grads()
    watched = [torch.zeros_like(p) for p in ps]
    for a, b in zip(host.read(ps, watched), host.read(list(ps), tuple(watched))):
        np.testing.assert_array_equal(a, b)


def test_bump_moves_versions_and_refuses_inference_tensors_as_an_inplace_update(reader):
    ps = _with_grads()
    host.bump(ps, 2)
    assert [p._version for p in ps] == [2, 2, 2]
    with torch.inference_mode():
        t = torch.ones(3)
    with pytest.raises(RuntimeError, match="inference tensor"):
        host.bump([t], 1) if reader == "native" else t.add_(1)


def test_the_helper_refuses_tables_of_the_wrong_size(monkeypatch):
    helper = _helper(monkeypatch)
    ps = _with_grads()
    good = np.empty((3, host.COLS), np.int64)
    with pytest.raises(ValueError, match="wrong size"):
        helper.read(ps, [], good, np.empty((2, host.COLS), np.int64), good[:0])
    with pytest.raises(ValueError, match="wrong size"):
        helper.read(ps, [], good, good.astype(np.int32), good[:0])
    with pytest.raises(TypeError):
        helper.read(tuple(ps), [], good, good, good[:0])
    with pytest.raises(TypeError):
        helper.bump([1.0], 1)
    facts = np.empty((2, host.COLS), np.int64)
    helper.read([ps[0], "not a tensor"], [], facts, facts.copy(), good[:0])
    assert (facts[1] == -1).all()
    with pytest.raises(ValueError, match="int64 pairs"):
        helper.read(ps, [], good, good.copy(), good[:0], np.zeros((2, 2)))
    with pytest.raises(ValueError, match="int64 pairs"):
        helper.read(ps, [], good, good.copy(), good[:0], np.zeros(3, np.int64))


def test_grads_meeting_written_memory_are_flagged_alike_by_both_readers(reader):
    """host.read's MEETS: exactly the grads whose memory (their bytes; a non-contiguous
    one's storage) meets a written range; a fresh grad skips the search only where every
    written tensor is an allocation of its own (a DLPack alias is not)."""
    buf, w0, gbuf, under = torch.zeros(100), torch.zeros(10), torch.zeros(40), torch.randn(10)
    written = [buf[:50], w0, torch.from_dlpack(under)]
    grads = {"fresh": (torch.randn(10), False), "straddles a range's end": (buf[45:55], True),
             "same storage, outside the ranges": (buf[60:70], False),
             "a written tensor": (w0, True), "flat, first": (gbuf[:10], False),
             "flat, second": (gbuf[10:20], False),
             "non-contiguous, storage meets": (buf[50:70:2], True),
             "fresh, under a DLPack alias": (under, True), "empty": (buf[10:10], False)}
    ps = [torch.nn.Parameter(torch.zeros(g.shape)) for g, _ in grads.values()]
    for p, (g, _) in zip(ps, grads.values()):
        p.grad = g
    _, G, _ = host.read(ps, [], None, host.ranges(*host.spans(written)), host.owned(written))
    assert dict(zip(grads, (G[:, -1] & host.MEETS) != 0)) == {k: m for k, (_, m) in grads.items()}
    _, G0, _ = host.read(ps, [])
    np.testing.assert_array_equal(G0, G & ~host.MEETS)  # nothing else differs
    assert not host.owned(written) and host.owned(written[:2]) == (reader == "native")


# the three changes the first wave's fast path did not notice (docs/architecture.md, Safety)
@pytest.mark.parametrize("name", NAMES)
def test_grad_of_the_same_width_but_another_dtype_gives_torchs_outcome(name):
    ps, opts = twins(name, shapes=((5, 3), (7,)), ours={})
    for side in ps:
        for p in side:
            p.data = p.data.half()
    set_grads(ps, 0)
    step_both(opts)
    set_grads(ps, 1)
    for side in ps:
        side[1].grad.data = side[1].grad.data.view(torch.bfloat16)
    # float16: torch rounds after every op, the kernel once per step: an ulp apart
    same_outcome(ps, opts, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name", NAMES)
def test_param_narrowed_in_place_gives_torchs_outcome(name):
    ps, opts = twins(name, shapes=((9,), (7,)))
    set_grads(ps, 0)
    step_both(opts)
    for side in ps:
        side[0].data = side[0].data[:4]  # the same address, fewer bytes
    set_grads(ps, 1)
    same_outcome(ps, opts)


@pytest.mark.parametrize("name", NAMES)
def test_state_swapped_in_place_is_used_as_torch_uses_it(name):
    ps, opts = twins(name)
    set_grads(ps, 0)
    step_both(opts)
    for key, t in opts[1].state[ps[1][0]].items():
        if key != "step" and torch.is_tensor(t) and t.shape == ps[1][0].shape:
            # each slot's storage swapped; values changed too, where they may (a doubled
            # grad_avg could make RMSprop's centered variance negative)
            new = t * (1 if key == "grad_avg" else 2)
            for opt, side in zip(opts, ps):
                opt.state[side[0]][key].data = new.clone()
    for s in range(1, 3):
        set_grads(ps, s)
        step_both(opts)
        same(ps)


def test_ranges_merge_what_overlaps_or_touches_and_drop_what_is_empty():
    start = np.array([50, 0, 10, 30, 5, 70, 90, 90], np.int64)
    end = np.array([60, 10, 20, 40, 8, 75, 90, 95], np.int64)
    np.testing.assert_array_equal(host.ranges(start, end),
                                  [[0, 20], [30, 40], [50, 60], [70, 75], [90, 95]])
    assert host.ranges(start[:0], end[:0]).shape == (0, 2)
    # meets: half-open ranges, an empty query meets nothing
    w = host.ranges(start, end)
    q0, q1 = np.array([20, 19, 40, 41, 0, 55, 92]), np.array([30, 21, 50, 45, 0, 55, 93])
    assert host.meets(w, q0, q1).tolist() == [False, True, False, False, False, False, True]
