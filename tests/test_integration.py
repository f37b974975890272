"""Drop-in with the rest of a training stack: torch.compile, capturable steps, every LR
scheduler, optimizer hooks, state moved between devices."""
import functools
import inspect
import io
import types

import pytest
import torch
import torch.optim.lr_scheduler as sched
from torch._dynamo.utils import counters

import fusedopt
from fusedopt import parity
from fusedopt.spec import ready  # (schedule-free steps in train mode only)
from harness import NAMES

HP = {name: fusedopt.spec.spec(name).program_hp for name in NAMES}
SHAPES = [(5, 3), (7,), (1023,), (1,)]


def params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in SHAPES]


def twins(name, ours_kw=None, theirs_kw=None, **hp):
    """fusedopt.NAME and torch.optim.NAME (for-loop) over equal params."""
    hp = {**HP[name], **hp}
    a, b = params(), params()
    return (ready(getattr(fusedopt, name)(a, **hp, **(ours_kw or {}))),
            ready(getattr(fusedopt, name).twin()(b, foreach=False, **hp, **(theirs_kw or {}))))


def set_grads(opts, seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    grads = [torch.randn(s, generator=gen) for s in SHAPES]
    for opt in opts:
        for p, g in zip(opt.param_groups[0]["params"], grads):
            p.grad = g.clone()


def flat(opt):
    return [p.detach().clone() for g in opt.param_groups for p in g["params"]]


def assert_same(a, b, what=""):
    # float32 after a few steps: within a few ulp of torch.optim's for-loop (tests/test_parity)
    for x, y in zip(flat(a), flat(b)):
        torch.testing.assert_close(x, y, rtol=2e-6, atol=2e-7, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------- torch.compile

@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_compile_fullgraph_no_recompile(name, lr_kind):
    """opt.step() compiles into one graph (fullgraph: a graph break raises), changing lr
    every step does not recompile, and the results equal the eager step bit for bit."""
    lr = HP[name]["lr"]
    make = (lambda: torch.tensor(lr)) if lr_kind == "tensor" else (lambda: lr)
    compiled, eager = (ready(getattr(fusedopt, name)(params(), **{**HP[name], "lr": make()}))
                       for _ in range(2))
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(compiled.step, fullgraph=True)
    for s in range(4):
        set_grads([compiled, eager], s)
        for opt in (compiled, eager):
            new_lr = lr * (1 + s)
            if lr_kind == "tensor":
                opt.param_groups[0]["lr"].fill_(new_lr)
            else:
                opt.param_groups[0]["lr"] = new_lr
        step()
        eager.step()
        for x, y in zip(flat(compiled), flat(eager)):
            assert torch.equal(x, y), f"step {s}"
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"]


def test_compile_with_scheduler():
    """The step compiled before a scheduler wraps opt.step (as examples/train.py does):
    OneCycleLR rewrites lr and betas every step, still one graph, results as eager."""
    compiled, eager = (fusedopt.AdamW(params(), lr=1e-2) for _ in range(2))
    compiled.step = types.MethodType(torch.compile(type(compiled).step, fullgraph=True),
                                     compiled)
    scheds = [sched.OneCycleLR(o, max_lr=1e-2, total_steps=6) for o in (compiled, eager)]
    torch._dynamo.reset()
    counters.clear()
    for s in range(6):
        set_grads([compiled, eager], s)
        compiled.step()
        eager.step()
        for sc in scheds:
            sc.step()
        for x, y in zip(flat(compiled), flat(eager)):
            assert torch.equal(x, y), f"step {s}"
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def test_compile_op_registration():
    """torch.library's own checks of the op: schema (declared mutations), fake tensor
    implementation, dispatch under aot — on a throwaway optimizer (it really steps)."""
    opt = fusedopt.Adam(params(), lr=1e-2)
    set_grads([opt], 0)
    ps = opt.param_groups[0]["params"]
    torch.library.opcheck(torch.ops.fusedopt.step.default,
                          (opt._handle, ps, [p.grad for p in ps]))


# ---------------------------------------------------------------- capturable

CAPTURABLE = [n for n in NAMES if "capturable" in inspect.signature(getattr(fusedopt, n).twin()).parameters]


@pytest.mark.parametrize("name", CAPTURABLE)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_capturable_parity(name, dtype):
    """capturable=True (step counters and coefficients stay tensors) meets the parity
    criteria against torch.optim's for-loop and float64: both engines in float32, Numba
    in bfloat16 (the coefficients are the same tensors whatever the param dtype; each
    Triton-interpreter run costs CI ~5 s)."""
    cls = functools.partial(getattr(fusedopt, name), capturable=True)
    backends = parity.BACKENDS if dtype == torch.float32 else ["numba"]
    result = parity.check(name, {}, dtype, backends=backends, cls=cls)
    assert result["ok"], result["failures"]


@pytest.mark.parametrize("name", NAMES)
def test_capturable_step_has_no_host_sync(name, monkeypatch):
    """Not one .item(), .cpu(), .tolist() or Python conversion of a tensor in a capturable
    step, the first included (lr a tensor, so nothing is a Python float).  Where torch has
    capturable, no .numpy() either after the first step (which makes the CPU engine's views
    of its tables); without it, the CPU step reads its counters as numbers, as torch does."""
    kw = {"capturable": True} if name in CAPTURABLE else {}
    opt = ready(getattr(fusedopt, name)(params(), **{**HP[name], "lr": torch.tensor(1e-2)}, **kw))
    calls = []

    def forbid(meth):
        orig = getattr(torch.Tensor, meth)

        def spy(self, *a, **k):
            calls.append(meth)
            return orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, meth, spy)
    for s in range(3):
        set_grads([opt], s)
        if s == 0:
            for meth in ("item", "cpu", "tolist", "__float__", "__int__", "__bool__"):
                forbid(meth)
        if s == 1 and kw:
            forbid("numpy")
        opt.step()
    assert not calls, calls
    monkeypatch.undo()
    assert float(opt.state[opt.param_groups[0]["params"][0]].get("step", 3)) == 3


# ---------------------------------------------------------------- LR schedulers

def _schedulers():
    """A factory for every scheduler class torch.optim.lr_scheduler defines."""
    return {
        "LambdaLR": lambda o: sched.LambdaLR(o, lambda e: 0.9 ** e),
        "MultiplicativeLR": lambda o: sched.MultiplicativeLR(o, lambda e: 0.95),
        "StepLR": lambda o: sched.StepLR(o, step_size=2, gamma=0.5),
        "MultiStepLR": lambda o: sched.MultiStepLR(o, milestones=[2, 5], gamma=0.3),
        "ConstantLR": lambda o: sched.ConstantLR(o, factor=0.5, total_iters=3),
        "LinearLR": lambda o: sched.LinearLR(o, start_factor=0.2, total_iters=4),
        "ExponentialLR": lambda o: sched.ExponentialLR(o, gamma=0.8),
        "SequentialLR": lambda o: sched.SequentialLR(
            o, [sched.ConstantLR(o, factor=0.1, total_iters=2), sched.ExponentialLR(o, 0.9)],
            milestones=[2]),
        "CosineAnnealingLR": lambda o: sched.CosineAnnealingLR(o, T_max=5),
        "ChainedScheduler": lambda o: sched.ChainedScheduler(
            [sched.ConstantLR(o, factor=0.5, total_iters=3), sched.ExponentialLR(o, 0.9)]),
        "ReduceLROnPlateau": lambda o: sched.ReduceLROnPlateau(o, patience=0, factor=0.5),
        "CyclicLR": lambda o: sched.CyclicLR(o, base_lr=1e-3, max_lr=1e-2, step_size_up=2),
        "CosineAnnealingWarmRestarts": lambda o: sched.CosineAnnealingWarmRestarts(o, T_0=3),
        "OneCycleLR": lambda o: sched.OneCycleLR(o, max_lr=1e-2, total_steps=8),
        "PolynomialLR": lambda o: sched.PolynomialLR(o, total_iters=5, power=2.0),
    }


def test_every_scheduler_is_covered():
    defined = {n for n, c in inspect.getmembers(sched, inspect.isclass)
               if issubclass(c, (sched.LRScheduler, sched.ReduceLROnPlateau))
               and not n.startswith("_") and c not in (sched.LRScheduler,)}
    assert defined <= set(_schedulers()), defined - set(_schedulers())


@pytest.mark.parametrize("kind", sorted(_schedulers()))
@pytest.mark.parametrize("name", ["AdamW", "SGD", "RMSprop"])
def test_scheduler(kind, name):
    """Each scheduler drives fusedopt exactly as it drives the torch.optim twin (OneCycleLR
    and CyclicLR also rewrite betas / momentum)."""
    extra = {"lr": torch.tensor(1e-2)} if kind == "OneCycleLR" and name == "AdamW" else {}
    ours, theirs = twins(name, **extra)
    scheds = [_schedulers()[kind](o) for o in (ours, theirs)]
    for s in range(8):
        set_grads([ours, theirs], s)
        ours.step()
        theirs.step()
        for sc in scheds:
            sc.step(1.0) if kind == "ReduceLROnPlateau" else sc.step()
        for key in ("lr", "betas", "momentum"):
            if key in theirs.param_groups[0]:
                assert ours.param_groups[0][key] == theirs.param_groups[0][key], key
        assert_same(ours, theirs, f"{kind} step {s}")


# ---------------------------------------------------------------- hooks

def test_hooks_as_torch():
    """Step pre/post hooks (a pre hook may replace args), state_dict and load_state_dict
    hooks: called the same way, with the same effect, as on torch.optim."""
    logs = []
    for opt in twins("Adam"):
        log = []
        opt.register_step_pre_hook(lambda o, a, k: log.append(("pre", len(o.state))))
        opt.register_step_post_hook(lambda o, a, k: log.append(("post", len(o.state))))
        opt.register_state_dict_pre_hook(lambda o: log.append("sd_pre"))
        opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
        opt.register_load_state_dict_pre_hook(
            lambda o, sd: {k: v for k, v in sd.items() if k != "extra"})
        opt.register_load_state_dict_post_hook(lambda o: log.append("load_post"))
        set_grads([opt], 0)
        opt.step()
        sd = opt.state_dict()
        log.append(sorted(sd))
        opt.load_state_dict(sd)
        set_grads([opt], 1)
        opt.step()
        logs.append((log, flat(opt)))
    (ours, p_ours), (theirs, p_theirs) = logs
    assert ours == theirs
    assert ("post", 4) in ours and "load_post" in ours
    for x, y in zip(p_ours, p_theirs):
        torch.testing.assert_close(x, y, rtol=2e-6, atol=2e-7)


# ---------------------------------------------------------------- state between devices

@pytest.mark.parametrize("name", NAMES)
def test_state_through_map_location(name):
    """A state_dict saved, loaded with map_location="cpu" (step counters included) and
    loaded into a fresh optimizer continues exactly as the uninterrupted run."""
    run, resumed = ready(getattr(fusedopt, name)(params(), **HP[name])), None
    for s in range(3):
        set_grads([run], s)
        run.step()
    buf = io.BytesIO()
    torch.save(run.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, map_location="cpu")
    resumed = ready(getattr(fusedopt, name)(params(), **HP[name]))
    with torch.no_grad():
        for p, q in zip(flat(run), resumed.param_groups[0]["params"]):
            q.copy_(p)
    resumed.load_state_dict(sd)
    for s in range(3, 6):
        set_grads([run, resumed], s)
        run.step()
        resumed.step()
    for x, y in zip(flat(run), flat(resumed)):
        assert torch.equal(x, y)
    for p, q in zip(run.param_groups[0]["params"], resumed.param_groups[0]["params"]):
        assert {k: float(v) for k, v in run.state[p].items() if k == "step"} == \
               {k: float(v) for k, v in resumed.state[q].items() if k == "step"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_cpu_state_into_cuda_model(name):
    """State saved on the CPU loads into an optimizer over CUDA params (torch's fused
    path fails here on its CPU step counters) and continues as the CPU run does."""
    cpu = ready(getattr(fusedopt, name)(params(), **HP[name]))
    set_grads([cpu], 0)
    cpu.step()
    gpu_params = [torch.nn.Parameter(p.detach().cuda()) for p in flat(cpu)]
    gpu = ready(getattr(fusedopt, name)(gpu_params, **HP[name]))
    # through a file, as state is moved in practice: a live state_dict shares its CPU step
    # tensors with the optimizer that made it (torch.optim's load keeps them as they are)
    buf = io.BytesIO()
    torch.save(cpu.state_dict(), buf)
    buf.seek(0)
    gpu.load_state_dict(torch.load(buf, map_location="cpu"))
    set_grads([cpu], 1)
    for p, q in zip(cpu.param_groups[0]["params"], gpu_params):
        q.grad = p.grad.cuda()
    cpu.step()
    gpu.step()
    for x, y in zip(flat(cpu), flat(gpu)):
        torch.testing.assert_close(x, y.cpu(), rtol=2e-6, atol=2e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_capture_and_replay():
    """capturable=True: a whole training step captured in a CUDA graph and replayed
    gives what the same steps give eagerly."""
    torch.manual_seed(0)
    models = [torch.nn.Linear(64, 64).cuda() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [fusedopt.Adam(m.parameters(), lr=torch.tensor(1e-2, device="cuda"),
                          capturable=True) for m in models]
    x = torch.randn(32, 64, device="cuda")

    def train_step(m, o):
        o.zero_grad(set_to_none=False)
        m(x).pow(2).mean().backward()
        o.step()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up: state, plans and pointer tables built before capture
            train_step(models[0], opts[0])
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        train_step(models[0], opts[0])
    for _ in range(3):
        train_step(models[1], opts[1])
    for _ in range(5):
        graph.replay()
        train_step(models[1], opts[1])
    torch.cuda.synchronize()
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
