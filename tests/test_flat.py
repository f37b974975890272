"""flat=True: params, grads and state as aliases of one buffer per bucket, the kernel over
one range; torch.optim's results and semantics kept, whatever the zero_grad pattern."""
import copy

import numpy as np
import pytest
import torch

import fusedopt
from fusedopt import arith, bucket, spec
from fusedopt.spec import ready  # (schedule-free steps in train mode only)
from harness import HP, NAMES
from test_host_ops import _Count  # records every torch op dispatched


@pytest.fixture
def ranges(monkeypatch):
    """Counts the engine calls that ran over one range (the flat tables)."""
    seen = {"flat": 0, "tables": 0, "log": []}
    run = bucket._Bucket.run

    def counted(self, rule, flags, gptr, coeffs, *a):
        one = self.flat is not None and np.array_equal(gptr, self.buffers.grad_ptrs) \
            and not any(torch.is_tensor(c) for c in coeffs)
        seen["flat" if one else "tables"] += 1
        seen.setdefault("log", []).append(one)
        return run(self, rule, flags, gptr, coeffs, *a)
    monkeypatch.setattr(bucket._Bucket, "run", counted)
    return seen


def _models(seed=0):
    torch.manual_seed(seed)
    ms = [torch.nn.Sequential(torch.nn.Linear(13, 31), torch.nn.Tanh(), torch.nn.Linear(31, 5),
                              torch.nn.Linear(5, 3)) for _ in range(2)]
    ms[1].load_state_dict(ms[0].state_dict())
    return ms


def _backward(m, x, y, skip_last=False):
    h = m[2](m[1](m[0](x)))
    out = h[:, :3] if skip_last else m[3](h)  # skip_last: the last layer gets no grad
    ((out - y) ** 2).mean().backward()


def _same(ms):
    for a, b in zip(ms[0].parameters(), ms[1].parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-6, atol=1e-7)


# each step's zero_grad before backward: set_to_none True/False, or the module's own
PATTERN = [False, False, True, False, "model", False, False, True, True, False]


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("name", NAMES)
def test_flat_steps_as_torch_whatever_zeroes_the_grads(name, backend, ranges):
    ms = _models()
    opts = [ready(getattr(fusedopt, name)(ms[0].parameters(), backend=backend, flat=True,
                                          **HP[name])),
            ready(getattr(fusedopt, name).twin()(ms[1].parameters(), foreach=False, **HP[name]))]
    gen = torch.Generator().manual_seed(1)
    for k, how in enumerate(PATTERN):
        x, y = torch.randn(17, 13, generator=gen), torch.randn(17, 3, generator=gen)
        for m, o in zip(ms, opts):
            m.zero_grad() if how == "model" else o.zero_grad(set_to_none=how)
            _backward(m, x, y, skip_last=k == 7)  # after set_to_none: skipped, as torch
        opts[0].step()
        with arith.replay():
            opts[1].step()
        _same(ms)
    # steps after zero_grad(set_to_none=False) run over one range, and so do steps whose
    # plan was rebuilt (the live params changed: re-homed); fresh grads over tables
    # (Adafactor's matrix kernel runs over each param's rows and columns, a trust ratio's
    # update takes a coefficient per tensor: tables)
    if not (spec.spec(name).factored or spec.spec(name).trust):
        assert ranges["flat"] >= 5 and ranges["tables"] >= 1, ranges
    assert len({p.untyped_storage().data_ptr() for p in ms[0].parameters()}) == 1


def test_zero_grad_without_set_to_none_is_one_fill():
    params = [torch.nn.Parameter(torch.randn(5)) for _ in range(40)]
    opt = fusedopt.Adam(params, flat=True)
    for p in params:
        p.grad = torch.randn(5)
    opt.step()
    opt.zero_grad(set_to_none=False)
    with _Count() as count:
        opt.zero_grad(set_to_none=False)
    assert [op for op in count.ops if not op.startswith("profiler.")] == ["aten.zero_.default"]
    assert all(p.grad is not None and not p.grad.any() for p in params)
    opt.zero_grad()  # torch's default: None, as torch
    assert all(p.grad is None for p in params)


def test_param_replaced_after_a_step_is_rehomed_and_stepped_as_torch(ranges):
    ms = _models()
    opts = [fusedopt.Adam(ms[0].parameters(), flat=True, lr=1e-2),
            torch.optim.Adam(ms[1].parameters(), foreach=False, lr=1e-2)]
    x, y = torch.randn(8, 13), torch.randn(8, 3)
    for k in range(4):
        for m, o in zip(ms, opts):
            o.zero_grad(set_to_none=False)
            if k == 2:
                m[0].weight.data = m[0].weight.data.clone() * 0.5
            _backward(m, x, y)
        opts[0].step()
        with arith.replay():
            opts[1].step()
        _same(ms)
    storages = {p.untyped_storage().data_ptr() for p in ms[0].parameters()}
    assert len(storages) == 1  # the replaced param lives in the rebuilt buffer again


@pytest.mark.parametrize("name", NAMES)
def test_flat_state_dict_round_trips_with_torch_both_ways(name):
    ms = _models()
    ours = ready(getattr(fusedopt, name)(ms[0].parameters(), flat=True, **HP[name]))
    theirs = ready(getattr(fusedopt, name).twin()(ms[1].parameters(), foreach=False, **HP[name]))
    x, y = torch.randn(8, 13), torch.randn(8, 3)
    for m, o in zip(ms, (ours, theirs)):
        _backward(m, x, y)
        o.step()
    theirs.load_state_dict(copy.deepcopy(ours.state_dict()))
    ours.load_state_dict(copy.deepcopy(theirs.state_dict()))
    for m, o in zip(ms, (ours, theirs)):
        o.zero_grad(set_to_none=False)
        _backward(m, x, y)
    ours.step()
    with arith.replay():
        theirs.step()
    _same(ms)
    for st in ours.state_dict()["state"].values():
        for k, v in st.items():  # (optimi's kahan_comp is None, as optimi's own)
            assert type(v) is torch.Tensor or (v is None and k == "kahan_comp")


OPTIONS = [dict(max_grad_norm=0.05), dict(master_weights=True), dict(state_dtype=torch.float32),
           dict(scaler=True)]


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: next(iter(o)))
def test_flat_is_bitwise_the_per_tensor_step_with_fusedopts_options(opts, backend, ranges):
    opts = dict(opts)
    scaler = opts.pop("scaler", False)
    low = "master_weights" in opts or "state_dtype" in opts
    ms = _models()
    if low:
        ms = [m.bfloat16() for m in ms]
    optims = [fusedopt.AdamW(m.parameters(), lr=1e-2, backend=backend, flat=f, **opts)
              for m, f in zip(ms, (True, False))]
    scalers = [torch.amp.GradScaler("cpu", init_scale=64.0) for _ in ms] if scaler else None
    gen = torch.Generator().manual_seed(2)
    for k in range(5):
        x, y = torch.randn(9, 13, generator=gen), torch.randn(9, 3, generator=gen)
        if low:
            x, y = x.bfloat16(), y.bfloat16()
        for i, (m, o) in enumerate(zip(ms, optims)):
            o.zero_grad(set_to_none=False)
            if scaler:
                h = m(x)
                scalers[i].scale(((h - y) ** 2).mean() * (float("inf") if k == 3 else 1)).backward()
                scalers[i].step(o)
                scalers[i].update()
            else:
                _backward(m, x, y)
                o.step()
        for a, b in zip(ms[0].parameters(), ms[1].parameters()):
            if "max_grad_norm" in opts:
                # the norm over one buffer sums in another order than over each grad (both
                # in float64): the clip factors may differ in the last float32 bit
                torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=f"{k} {opts}")
            else:
                assert torch.equal(a, b), (k, opts)
        if "max_grad_norm" in opts:
            torch.testing.assert_close(optims[0].grad_norm, optims[1].grad_norm, rtol=1e-6,
                                       atol=0)
    assert ranges["flat"] >= 3, ranges


def test_flat_must_be_a_bool():
    with pytest.raises(TypeError, match="flat"):
        fusedopt.Adam([torch.nn.Parameter(torch.ones(2))], flat=1)


def _alias_grads(opts, seed):
    # as a backward after zero_grad(set_to_none=False): into the grads in place
    gen = torch.Generator().manual_seed(seed)
    ps = [p for p in opts[0].param_groups[0]["params"]]
    gs = [torch.randn(p.shape, generator=gen) for p in ps]
    for o in opts:
        for p, g in zip(o.param_groups[0]["params"], gs):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in ((5, 3), (7,), (33,))]


def test_flat_step_compiles_into_one_graph_bitwise_the_eager_one(ranges):
    from torch._dynamo.utils import counters
    compiled, eager = (fusedopt.AdamW(_params(), lr=1e-2, flat=True) for _ in range(2))
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(compiled.step, fullgraph=True)
    for s in range(4):
        _alias_grads([compiled, eager], s)
        step()
        eager.step()
        for a, b in zip(compiled.param_groups[0]["params"], eager.param_groups[0]["params"]):
            assert torch.equal(a, b), s
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert ranges["flat"] >= 4, ranges


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_flat_capturable_is_bitwise_the_per_tensor_capturable_step(backend):
    # capturable coefficients are device tensors, one per param: per-tensor tables over
    # the buffers' aliases
    opts = [fusedopt.Adam(_params(), lr=torch.tensor(1e-2), capturable=True, flat=f,
                          backend=backend) for f in (True, False)]
    for s in range(4):
        _alias_grads(opts, s)
        for o in opts:
            o.step()
        for a, b in zip(*(o.param_groups[0]["params"] for o in opts)):
            assert torch.equal(a, b), s
    assert opts[0]._plans[id(opts[0].param_groups[0])].buckets[0][1].buffers is not None


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_zero_grad_after_the_params_changed_dtype_is_torchs(dtype):
    """(found by the soak) fresh grads of the plan's dtype, then the params re-typed with
    `p.data =`: zero_grad(set_to_none=False) zeroes the grads in place as torch does (the
    buffer's aliases, of the old dtype, are not put in their place)."""
    ms = _models()
    opts = [fusedopt.SGD(ms[0].parameters(), lr=1e-2, momentum=0.9, flat=True),
            torch.optim.SGD(ms[1].parameters(), lr=1e-2, momentum=0.9, foreach=False)]
    x, y = torch.randn(8, 13), torch.randn(8, 3)
    for m, o in zip(ms, opts):
        _backward(m, x, y)
        o.step()
        for p in m.parameters():
            p.grad = torch.ones_like(p)  # fresh, float32
            p.data = p.data.to(dtype)
        o.zero_grad(set_to_none=False)
    for a, b in zip(ms[0].parameters(), ms[1].parameters()):
        assert a.dtype == b.dtype == dtype and a.grad.dtype == b.grad.dtype == torch.float32
        assert not a.grad.any() and not b.grad.any()
