"""torch.amp.GradScaler with the unscale in the kernel: the scaler hands the optimizer
grad_scale and found_inf, the kernel unscales (writing the unscaled gradient back) in the
update pass, and an inf/NaN step changes nothing, the first step included."""
import math

import pytest
import torch

import fusedopt
from fusedopt.spec import ready  # (schedule-free steps in train mode only)
from harness import BACKENDS, HP, NAMES

SHAPES = [(5, 3), (7,), (65537,), (1,)]
INF_STEPS = {0, 3}  # the first step is one of them


def params(dtype):
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def raw(opt):
    """Every byte of params and state."""
    out = [p.detach().view(torch.uint8).clone() for g in opt.param_groups for p in g["params"]]
    for st in opt.state.values():
        out += [v.detach().reshape(-1).view(torch.uint8).clone() for k, v in sorted(st.items())
                if isinstance(v, torch.Tensor)]
    return out


def train(opt, steps=6, check_skips=True):
    """A GradScaler loop over a linear loss (fresh weights each step) with an inf in one
    gradient at INF_STEPS; returns the scales used."""
    ps = [p for g in opt.param_groups for p in g["params"]]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    gen = torch.Generator().manual_seed(1)
    scales = []
    for s in range(steps):
        opt.zero_grad()
        ws = [torch.randn(p.shape, generator=gen) for p in ps]
        loss = sum((p.float() * w).sum() for p, w in zip(ps, ws))
        scaler.scale(loss).backward()
        if s in INF_STEPS:
            ps[2].grad.view(-1)[1234] = math.inf
        before = raw(opt)
        scales.append(scaler.get_scale())
        scaler.step(opt)
        scaler.update()
        if s in INF_STEPS and check_skips:
            after = raw(opt)
            assert len(after) == len(before) and all(map(torch.equal, before, after)), s
    return scales


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_unscale_in_kernel(name, dtype, backend):
    """Bit for bit what the scaler's own unscale pass followed by the step gives; within
    rounding of torch.optim's for-loop under the same scaler; skipped steps leave every
    byte alone (the first step creates no state)."""
    fused = ready(getattr(fusedopt, name)(params(dtype), backend=backend, **HP[name]))
    assert fused._step_supports_amp_scaling
    separate = ready(getattr(fusedopt, name)(params(dtype), backend=backend, **HP[name]))
    separate._step_supports_amp_scaling = False  # GradScaler unscales in a pass of its own
    theirs = ready(getattr(fusedopt, name).twin()(params(dtype), foreach=False, **HP[name]))
    scales = train(fused)
    assert train(separate) == scales and train(theirs, check_skips=False) == scales
    assert len(set(scales)) > 1  # the scale moved: backed off at inf, grew in between
    for a, b, c in zip(*(([p for p in o.param_groups[0]["params"]]) for o in
                         (fused, separate, theirs))):
        assert torch.equal(a, b)
        assert torch.equal(a.grad, b.grad)  # the unscaled gradient is written back
        tol = dict(rtol=2e-6, atol=2e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        if name == "Adafactor" and dtype == torch.bfloat16:
            # torch rounds its variance estimate and update to bfloat16 at every op (the
            # kernel: once per step), and the update is normalized: a few ulp apart
            tol = dict(rtol=4e-2, atol=6e-2)
        if name == "StableAdamW" and dtype == torch.bfloat16:
            # optimi's step in bfloat16 rounds v, g**2 / max(v, eps**2) and its mean to
            # bfloat16 at every op (the kernel: float32 math, one rounding of p): the
            # RMS-clipped rate moves by a few % now and then, 4 ulp of a param near 2
            tol = dict(rtol=4e-2, atol=8e-2)
        torch.testing.assert_close(a, c, **tol)
        assert int(fused.state[a].get("step", 4)) == 4  # 6 steps, 2 skipped


@pytest.mark.parametrize("backend", BACKENDS)
def test_float16_params_match_torch_fused(backend):
    """float16 params: torch's for-loop cannot run under GradScaler (unscale_ refuses
    float16 gradients); its fused Adam can, and ours does the same."""
    ours = fusedopt.Adam(params(torch.float16), lr=1e-2, eps=1e-4, backend=backend)
    theirs = torch.optim.Adam(params(torch.float16), lr=1e-2, eps=1e-4, fused=True)
    train(ours)
    train(theirs, check_skips=False)
    for a, b in zip(ours.param_groups[0]["params"], theirs.param_groups[0]["params"]):
        torch.testing.assert_close(a, b, rtol=2e-3, atol=2e-3)


def test_found_inf_read_by_the_kernel():
    """The GPU path: found_inf stays on the device and the Triton kernel reads it (driven
    here on CPU tensors through the interpreter): set, nothing is written and the step
    counters stay; clear, the step equals an ordinary one."""
    opts = [fusedopt.Adam(params(torch.float32), lr=1e-2, backend="triton") for _ in range(2)]
    for opt in opts:
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.ones_like(p)
        opt.step()
        for p in opt.param_groups[0]["params"]:
            p.grad = torch.full_like(p, -0.5)
    ours, plain = opts
    (_, bucket), = ours._plans[id(ours.param_groups[0])].buckets
    gptr = torch.tensor([p.grad.data_ptr() for p in bucket.params]).numpy()
    before = raw(ours)
    ours._run(bucket, ours.param_groups[0], gptr, (None, torch.ones(()), False))
    assert all(map(torch.equal, before, raw(ours)))
    ours._run(bucket, ours.param_groups[0], gptr, (None, torch.zeros(()), False))
    plain.step()
    assert all(map(torch.equal, raw(ours), raw(plain)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_master_weights_under_gradscaler(backend):
    """bfloat16 params with float32 master copies: inf steps leave params, moments and
    master copies byte for byte (train() compares), the others update the master."""
    ps = params(torch.bfloat16)
    opt = fusedopt.AdamW(ps, lr=1e-2, master_weights=True, backend=backend)
    train(opt)
    for p in ps:
        st = opt.state[p]
        assert st["master"].dtype == torch.float32 and int(st["step"]) == 4
        assert torch.equal(p, st["master"].to(torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_8bit_state_under_gradscaler(backend):
    """8-bit state (state_dtype=torch.uint8): the kernel's unscale gives bit for bit what
    the scaler's own unscale pass and the step give; inf steps leave params, codes and
    absmax byte for byte (train() compares)."""
    opts = [fusedopt.AdamW(params(torch.float32), lr=1e-2, state_dtype=torch.uint8,
                           backend=backend) for _ in range(2)]
    opts[1]._step_supports_amp_scaling = False  # GradScaler unscales in a pass of its own
    assert train(opts[0]) == train(opts[1])
    pa, pb = (o.param_groups[0]["params"] for o in opts)
    assert opts[0].state[pa[2]]["exp_avg"].dtype == torch.uint8  # 65537 elements: 8-bit
    for a, b in zip(pa, pb):
        assert torch.equal(a, b)
        for k, v in opts[0].state[a].items():
            assert torch.equal(v, opts[1].state[b][k]), k
