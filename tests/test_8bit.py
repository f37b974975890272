"""8-bit state (state_dtype=torch.uint8): the engines' one-pass dequantize -> rule ->
requantize against the float64 reference of the quantized algorithm, the two engines
against each other, state_dict both ways, the size threshold, bytes per param, the
safety checks, and real training against float32 state."""
import copy

import pytest
import torch

import fusedopt
from fusedopt import quant, reference

from harness import HP, NAMES, coded_params, coded_trained, random_grads as _grads

# every optimizer with moment state (Adafactor refuses state_dtype: its factors are its own;
# schedule-free: its z is a copy of the weights)
MOMENTS = [n for n in NAMES if fusedopt.spec.offers_8bit(getattr(fusedopt, n))]
SHAPES = [(300, 77), (4096,), (70000,), (100,)]  # blocks cut short, two chunks, under threshold


@pytest.mark.parametrize("name", [n for n, c in fusedopt.spec.REGISTRY.items()
                                  if not fusedopt.spec.offers_8bit(c)])
def test_classes_without_8bit_state_refuse_it_by_name(name):
    """What the README's table says "no" for refuses state_dtype=torch.uint8 at
    construction with a ValueError naming state_dtype, never silently keeping float state."""
    p = [torch.nn.Parameter(torch.zeros(4, 4))]
    with pytest.raises(ValueError, match="does not support state_dtype"):
        fusedopt.spec.REGISTRY[name](p, lr=1e-3, state_dtype=torch.uint8)


def _params(seed=0, shapes=SHAPES):
    return coded_params(seed, shapes)


def _trained(name, backend="numba", steps=4, shapes=SHAPES):
    return coded_trained(name, torch.uint8, shapes, backend, steps)


@pytest.mark.parametrize("name", MOMENTS)
def test_one_step_matches_float64_reference(name):
    """From the same 8-bit state, one engine step against reference.step_8bit (dequantize
    in float64, the float64 step, quantize to the nearest code): codes differ only where
    the float32 value lies within rounding of a decision boundary (then by one code, in
    at most 0.01 % of elements; measured: at most 2 of ~200,000), absmax and params within float32 rounding."""
    ps, opt, gen = _trained(name)
    _grads(ps, gen)
    wrong, total = _step_against_reference(name, ps, opt)
    print(f"{name}: {wrong} of {total} codes differ from the float64 reference")
    assert wrong <= 1e-4 * total


def _step_against_reference(name, ps, opt, hp=None):
    """One step of opt and of reference.step_8bit from opt's state: params and absmax
    compared, codes within one of the reference's; returns (codes differing, codes)."""
    ws = [p.detach().double() for p in ps]
    states = []
    for p in ps:
        st = {}
        for k, v in opt.state[p].items():
            if k.endswith(quant.ABSMAX):
                continue
            absmax = opt.state[p].get(k + quant.ABSMAX)
            st[k] = (v.clone(), absmax.clone()) if absmax is not None else v.double().clone()
        group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
        if "step" not in st and "step" in group:  # a group's counter (AdEMAMix's)
            st["step"] = group["step"]
        states.append(st)
    signed = {k: quant.signed(k) for st in states for k, v in st.items() if isinstance(v, tuple)}
    hp = dict(HP[name] if hp is None else hp)
    reference.step_8bit(name.lower(), ws, [p.grad for p in ps], states, signed, **hp)
    opt.step()
    total = wrong = 0
    for p, w, st in zip(ps, ws, states):
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)
        for k, v in st.items():
            if not isinstance(v, tuple):
                continue
            codes, absmax = v
            got = opt.state[p][k]
            torch.testing.assert_close(opt.state[p][k + quant.ABSMAX], absmax, rtol=1e-5, atol=0)
            diff = (got.long() - codes.long()).abs()
            assert diff.max() <= 1, (k, diff.max())
            total += codes.numel()
            wrong += int((diff > 0).sum())
    assert total > 0
    return wrong, total


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_tiny_and_subnormal_blocks(backend):
    """Blocks whose absmax is subnormal (second moments of vanishing grads: 1 / absmax
    overflows float32) or zero keep the reference's codes: no value is taken for 1.  (The
    grads are 0 and the moments within 2x of absmax, so that float32's own rounding of
    subnormal values stays far below the map's gaps.)"""
    gen = torch.Generator().manual_seed(3)
    ps = [torch.nn.Parameter(torch.randn(8192, generator=gen))]
    hp = dict(lr=1e-2, amsgrad=True)  # (no weight decay: it would make the moments large)
    opt = fusedopt.Adam(ps, **hp, state_dtype=torch.uint8, backend=backend)
    m = torch.randn(8192, generator=gen) * 1e-20
    v = (torch.rand(8192, generator=gen) + 1) * 5e-40  # subnormal
    m[4096:4352], v[4096:4352] = 0, 0  # a block of zeros
    sd = opt.state_dict()
    st = {"step": torch.tensor(5.0)}
    for k, x in (("exp_avg", m), ("exp_avg_sq", v), ("max_exp_avg_sq", v)):
        st[k], st[k + quant.ABSMAX] = quant.quantize(x, quant.dynamic_map(quant.signed(k)))
    sd["state"] = {0: st}
    opt.load_state_dict(sd)
    ps[0].grad = torch.zeros(8192)
    assert opt.state[ps[0]]["exp_avg_sq_absmax"].min() == 0
    assert 0 < opt.state[ps[0]]["exp_avg_sq_absmax"].max() < torch.finfo(torch.float32).tiny
    wrong, total = _step_against_reference("Adam", ps, opt, hp)
    assert wrong <= 1e-4 * total, (wrong, total)


@pytest.mark.parametrize("name", MOMENTS)
def test_engines_write_equal_codes(name):
    """Numba and Triton (its interpreter here) write the same codes, absmax and params,
    bit for bit, for every rule (Adam with amsgrad: three 8-bit slots, both maps)."""
    runs = []
    for backend in ("numba", "triton"):
        ps, opt, _ = _trained(name, backend, steps=3)
        runs.append((ps, opt.state_dict()["state"]))
    _assert_equal_runs(*runs)


def _assert_equal_runs(a, b):
    """Two runs' (params, state_dict state) equal bit for bit, entry by entry."""
    (pa, sa), (pb, sb) = a, b
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)


def test_threshold_and_bytes_per_param():
    """Params of at least quant.MIN_NUMEL elements hold codes (1 byte) and an absmax per
    256 (4 bytes): Adam's state is 2.03 bytes per param instead of 8; smaller params and
    float64 params keep their float32 / float64 state."""
    shapes = [(4095,), (4096,), (768, 3072)]
    ps = _params(shapes=shapes) + [torch.nn.Parameter(torch.randn(5000, dtype=torch.float64))]
    opt = fusedopt.Adam(ps, state_dtype=torch.uint8)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    st = [opt.state[p] for p in ps]
    assert st[0]["exp_avg"].dtype == torch.float32 and "exp_avg_absmax" not in st[0]
    assert st[1]["exp_avg"].dtype == torch.uint8 and st[1]["exp_avg_absmax"].shape == (16,)
    assert st[3]["exp_avg_sq"].dtype == torch.float64
    big = st[2]
    nbytes = sum(v.numel() * v.element_size() for k, v in big.items() if k != "step")
    per = nbytes / ps[2].numel()
    print(f"Adam 8-bit state: {per:.4f} bytes per param (float32: 8)")
    assert per == pytest.approx(2 * (1 + 4 / 256))


def test_state_dict_both_ways():
    """An 8-bit state_dict saves codes and absmax and continues bit for bit in a new
    optimizer; quant.float_state_dict turns it into one torch.optim loads (and continues
    close to ours); a group whose state_dtype is set back to None dequantizes it; a
    torch.optim state_dict loads into an 8-bit optimizer by quantizing."""
    ps, opt, gen = _trained("AdamW")
    sd = copy.deepcopy(opt.state_dict())  # as from a file: no tensor shared with opt
    twin_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    again = fusedopt.AdamW(twin_ps, **HP["AdamW"], state_dtype=torch.uint8)
    again.load_state_dict(copy.deepcopy(sd))
    assert again.state[twin_ps[0]]["exp_avg"].dtype == torch.uint8
    torch_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    plain = torch.optim.AdamW(torch_ps, **HP["AdamW"])
    plain.load_state_dict(quant.float_state_dict(sd))
    assert plain.state[torch_ps[0]]["exp_avg"].dtype == torch.float32
    _grads(ps, gen)
    for a, b, c in zip(ps, twin_ps, torch_ps):
        b.grad = a.grad.clone()
        c.grad = a.grad.clone()
    for o in (opt, again, plain):
        o.step()
    for a, b, c in zip(ps, twin_ps, torch_ps):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, rtol=0, atol=2e-4)
    # the groups' state_dtype comes with the state_dict (as torch restores every group
    # key); set back to None, the 8-bit state is dequantized at the next step
    flt_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    flt = fusedopt.AdamW(flt_ps, **HP["AdamW"])
    flt.load_state_dict(copy.deepcopy(sd))
    assert flt.param_groups[0]["state_dtype"] == torch.uint8
    flt.param_groups[0]["state_dtype"] = None
    for p in flt_ps:
        p.grad = torch.randn_like(p)
    flt.step()
    assert flt.state[flt_ps[0]]["exp_avg"].dtype == torch.float32
    assert "exp_avg_absmax" not in flt.state[flt_ps[0]]
    # torch.optim's float32 state into an 8-bit optimizer: quantized at its first step
    back_ps = [torch.nn.Parameter(p.detach().clone()) for p in torch_ps]
    back = fusedopt.AdamW(back_ps, **HP["AdamW"], state_dtype=torch.uint8)
    back.load_state_dict(plain.state_dict())
    for p in back_ps:
        p.grad = torch.randn_like(p)
    back.step()
    st = back.state[back_ps[0]]
    assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg_absmax"].dtype == torch.float32


@pytest.mark.parametrize("to", [None, torch.uint4], ids=["float", "4bit"])
def test_state_dtype_set_between_steps_takes_effect(to):
    """A group's state_dtype set on a live optimizer between steps holds from the next
    step (the plan is rebuilt, the state converted), bit for bit as a new optimizer that
    loads the state_dict with that state_dtype set."""
    ps, opt, gen = _trained("AdamW")
    sd = copy.deepcopy(opt.state_dict())
    sd["param_groups"][0]["state_dtype"] = to
    twin_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    twin = fusedopt.AdamW(twin_ps, **HP["AdamW"])
    twin.load_state_dict(sd)
    opt.param_groups[0]["state_dtype"] = to
    for _ in range(2):
        _grads(ps, gen)
        for a, b in zip(ps, twin_ps):
            b.grad = a.grad.clone()
        opt.step()
        twin.step()
    want = torch.float32 if to is None else torch.uint8
    assert opt.state[ps[2]]["exp_avg"].dtype == want  # (70000 elements: over the threshold)
    for a, b in zip(ps, twin_ps):
        assert torch.equal(a, b)
    for a, b in zip(ps, twin_ps):
        for k, v in twin.state[b].items():
            assert torch.equal(opt.state[a][k], v), k


def test_stale_absmax_is_refused():
    """An absmax replaced by one of the wrong size between steps (or loaded so) never
    reaches a kernel: a clear error, before any memory is touched."""
    ps, opt, gen = _trained("Adam", steps=1)
    opt.state[ps[0]]["exp_avg_absmax"] = torch.zeros(3)
    _grads(ps, gen)
    with pytest.raises(RuntimeError, match="cannot be fused"):
        opt.step()
    sd = _trained("Adam", steps=1)[1].state_dict()
    sd["state"][0]["exp_avg_absmax"] = torch.zeros(5)
    fresh = fusedopt.Adam(_params(), state_dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="exp_avg_absmax"):
        fresh.load_state_dict(sd)


def _text_batches(steps, batch=256, context=4, seed=0):
    """Deterministic 'text': a random 27-symbol Markov chain of order 2 (a fixed seed),
    cut into (context, next symbol) examples."""
    gen = torch.Generator().manual_seed(seed)
    trans = torch.softmax(torch.randn(27, 27, 27, generator=gen) * 3, dim=-1)
    n = steps * batch + context + 1
    seq = [0, 1]
    for _ in range(n):
        seq.append(int(torch.multinomial(trans[seq[-2], seq[-1]], 1, generator=gen)))
    seq = torch.tensor(seq)
    x = seq.unfold(0, context, 1)[:-1]
    y = seq[context:]
    return [(x[i * batch:(i + 1) * batch], y[i * batch:(i + 1) * batch]) for i in range(steps)]


def test_training_loss_within_one_percent_of_float32():
    """A small next-symbol model (embedding, two hidden layers: 8-bit and float32 params
    both) trained 300 steps with AdamW: the 8-bit run's final loss (mean of the last 20
    steps) within 1 % (relative) of the float32 run's."""
    data = _text_batches(300)
    finals = {}
    for state_dtype in (None, torch.uint8):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Embedding(27, 32), torch.nn.Flatten(),
                                    torch.nn.Linear(128, 256), torch.nn.ReLU(),
                                    torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                    torch.nn.Linear(256, 27))
        opt = fusedopt.AdamW(model.parameters(), lr=3e-3, state_dtype=state_dtype)
        losses = []
        for x, y in data:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        finals[state_dtype] = sum(losses[-20:]) / 20
        if state_dtype is not None:
            assert any(v.dtype == torch.uint8 for st in opt.state.values() for v in st.values())
    print(f"final loss: float32 state {finals[None]:.4f}, 8-bit state {finals[torch.uint8]:.4f}")
    assert abs(finals[torch.uint8] - finals[None]) <= 0.01 * finals[None]


@pytest.mark.parametrize("extra", [dict(master_weights=True, max_grad_norm=1.0),
                                   dict(stochastic_rounding=True, l1=1e-3)],
                         ids=["master-clip", "sr-l1"])
def test_bfloat16_params_with_8bit_state(extra):
    """bfloat16 params with 8-bit moments, together with a float32 master copy and
    clipping, or stochastic rounding and l1: both engines equal bit for bit, state kept as
    codes (master copy float32), and the params move as the float32-state run's do."""
    runs = []
    for backend, sdt in (("numba", torch.uint8), ("triton", torch.uint8), ("numba", torch.float32)):
        ps = [torch.nn.Parameter(p.detach().bfloat16()) for p in _params()]
        opt = fusedopt.AdamW(ps, lr=1e-2, state_dtype=sdt, backend=backend, **extra)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen).bfloat16()
            opt.step()
        runs.append((ps, opt))
    (pa, oa), (pb, ob), (pf, _) = runs
    for x, y, z in zip(pa, pb, pf):
        assert torch.equal(x, y)
        torch.testing.assert_close(x.float(), z.float(), rtol=0, atol=0.05)
    st = oa.state[pa[0]]
    assert st["exp_avg"].dtype == torch.uint8
    assert torch.equal(st["exp_avg"], ob.state[pb[0]]["exp_avg"])
    if extra.get("master_weights"):
        assert st["master"].dtype == torch.float32


@pytest.mark.parametrize("name", ["AdamW", "RMSprop"])
def test_torch_compile_equals_eager(name):
    """opt.step() under torch.compile(fullgraph=True) with 8-bit state: one graph, and
    codes, absmax and params equal to the eager step's, bit for bit."""
    from torch._dynamo.utils import counters
    shapes = [(300, 77), (100,)]
    opts = [getattr(fusedopt, name)(_params(shapes=shapes), **HP[name],
                                    state_dtype=torch.uint8) for _ in range(2)]
    torch._dynamo.reset()
    counters.clear()
    step = torch.compile(opts[0].step, fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for opt in opts:
            for p, g in zip(opt.param_groups[0]["params"], grads):
                p.grad = g.clone()
        step()
        opts[1].step()
    runs = [(o.param_groups[0]["params"], o.state_dict()["state"]) for o in opts]
    assert runs[0][1][0]["exp_avg" if name == "AdamW" else "square_avg"].dtype == torch.uint8
    _assert_equal_runs(*runs)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])


def _probe_values(qmap):
    """Per block of 256: 1 (so that absmax is 1, and y = |x|), then values that name every
    code: each map value, and each midpoint between neighbours moved 0.1 % down and up
    (the neighbours are >= 0.7 % apart: every value lies clearly on one side); zeros pad
    to quant.MIN_NUMEL."""
    q = qmap.double()
    mids = (q[:-1] + q[1:]) / 2
    vals = torch.cat([q, mids * 0.999, mids * 1.001]).float()
    blocks = vals.split(255)
    out = torch.zeros(max(len(blocks), quant.MIN_NUMEL // 256), 256)
    out[:, 0] = 1
    for i, b in enumerate(blocks):
        out[i, 1:1 + len(b)] = b
    return out.reshape(-1)


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_every_code_and_boundary_of_both_maps(backend):
    """The engines' computed code (no search: compares, selects, one fma) against the
    nearest map value (quant.quantize, float64) for values naming every code of both
    maps and lying on both sides of every midpoint: equal everywhere.  The signed map
    through SGD's momentum buffer (its first step stores the grad itself), the unsigned
    one through Adagrad's sum (0 + g * g: one float32 rounding, quantized here as stored)."""
    for signed, make, name in ((True, lambda ps: fusedopt.SGD(ps, lr=0.1, momentum=0.9,
                                                               state_dtype=torch.uint8,
                                                               backend=backend),
                                "momentum_buffer"),
                               (False, lambda ps: fusedopt.Adagrad(ps, lr=0.1,
                                                                   state_dtype=torch.uint8,
                                                                   backend=backend), "sum")):
        qmap = quant.dynamic_map(signed)
        want = _probe_values(qmap)
        p = torch.nn.Parameter(torch.zeros_like(want))
        opt = make([p])
        # the unsigned map's values arrive as squares: g = sqrt(v), and the stored value is
        # g * g rounded to float32 (within an ulp of v, far inside the 0.1 % margins)
        p.grad = want.clone() if signed else want.sqrt()
        stored = p.grad if signed else p.grad * p.grad
        opt.step()
        codes = opt.state[p][name]
        assert codes.dtype == torch.uint8
        ref, absmax = quant.quantize(stored, qmap)
        assert torch.equal(opt.state[p][name + quant.ABSMAX], absmax)
        bad = (codes != ref).nonzero().flatten()
        assert len(bad) == 0, (signed, bad[:5].tolist(), stored[bad[:5]].tolist(),
                               codes[bad[:5]].tolist(), ref[bad[:5]].tolist())
        assert set(codes.tolist()) == set(range(256))
