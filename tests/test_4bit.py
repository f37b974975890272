"""4-bit state (state_dtype=torch.uint4): the maps against torchao's, the engines'
one-pass dequantize -> rule -> requantize against the float64 reference and against each
other, bytes per param and the fallbacks, state_dict both ways, every code and midpoint,
and training on a real data set against float32 state."""
import copy

import pytest
import torch

import fusedopt
from fusedopt import quant, reference

from digits import final_loss
from harness import HP, NAMES, coded_params, coded_trained, random_grads as _grads

MOMENTS = [n for n in NAMES if fusedopt.spec.offers_8bit(getattr(fusedopt, n))]
# blocks cut short (23400 = 182 * 128 + 104), two chunks, under the threshold
SHAPES = [(300, 78), (4096,), (70000,), (100,)]


def _params(seed=0, shapes=SHAPES):
    return coded_params(seed, shapes)


def _trained(name, backend="numba", steps=4, shapes=SHAPES):
    return coded_trained(name, torch.uint4, shapes, backend, steps)


@pytest.mark.parametrize("name", [n for n, c in fusedopt.spec.REGISTRY.items()
                                  if not fusedopt.spec.offers_4bit(c)])
def test_classes_without_4bit_state_refuse_it_by_name(name):
    """What the README's table says "no" for refuses state_dtype=torch.uint4 at
    construction with a ValueError naming state_dtype."""
    p = [torch.nn.Parameter(torch.zeros(4, 4))]
    with pytest.raises(ValueError, match="does not support state_dtype"):
        fusedopt.spec.REGISTRY[name](p, lr=1e-3, state_dtype=torch.uint4)


def test_maps():
    """The signed map is torchao's, the 3-exponent dynamic map (7 positive values from
    0.0055, their negatives, 0 and 1); the unsigned one is 10^(-k/5), k = 15 ... 0, without
    0, its midpoints geometric (torchao's is k / 16: docs/8bit.md says why not)."""
    s, u = quant.dynamic_map(True, 4).double(), quant.dynamic_map(False, 4).double()
    assert s.numel() == u.numel() == 16 and torch.all(s[1:] > s[:-1])
    assert s[quant.zero_code(True, 4)] == 0 and s[-1] == 1
    assert torch.equal(-s[:7].flip(0), s[8:15]) and s[8] == pytest.approx(0.0055)
    want = 10.0 ** (-torch.arange(15, -1, -1, dtype=torch.float64) / 5)
    assert torch.equal(u, want.float().double()) and u[0] == pytest.approx(1e-3)
    torch.testing.assert_close(quant.midpoints(u), (u[1:] * u[:-1]).sqrt(), rtol=0, atol=0)
    torch.testing.assert_close(quant.midpoints(s), (s[1:] + s[:-1]) / 2, rtol=0, atol=0)
    try:
        from torchao.optim import subclass_4bit as ao
    except Exception:  # (torchao is a test extra; its absence or a broken build: the above)
        return
    assert torch.equal(quant.dynamic_map(True, 4), torch.tensor(ao.get_qmap_signed()))


def test_pack_round_trip():
    codes = torch.randint(0, 16, (6, 10), dtype=torch.uint8)
    packed = quant.pack(codes)
    assert packed.shape == (6, 5) and torch.equal(packed[0, 0], codes[0, 0] | codes[0, 1] << 4)
    assert torch.equal(quant.unpack(packed), codes)


def _unpacked_state(opt, p):
    """p's state as reference.step_8bit takes it: (unpacked codes, absmax) per coded slot."""
    st = {}
    for k, v in opt.state[p].items():
        if k.endswith(quant.ABSMAX):
            continue
        absmax = opt.state[p].get(k + quant.ABSMAX)
        st[k] = (quant.unpack(v), absmax.clone()) if absmax is not None else v.double().clone()
    return st


@pytest.mark.parametrize("name", MOMENTS)
def test_one_step_matches_float64_reference(name):
    """From the same 4-bit state, one engine step against reference.step_8bit(nbits=4):
    codes differ only where the float32 value lies within rounding of a midpoint (then by
    one code, in at most 0.01 % of elements; measured: none, for every optimizer), absmax
    and params within float32 rounding."""
    ps, opt, gen = _trained(name)
    _grads(ps, gen)
    ws = [p.detach().double() for p in ps]
    states = [_unpacked_state(opt, p) for p in ps]
    for st in states:
        group = opt.param_groups[0]
        if "step" not in st and "step" in group:  # a group's counter (AdEMAMix's)
            st["step"] = group["step"]
    signed = {k: quant.signed(k) for st in states for k, v in st.items() if isinstance(v, tuple)}
    assert signed
    reference.step_8bit(name.lower(), ws, [p.grad for p in ps], states, signed, nbits=4,
                        **HP[name])
    opt.step()
    total = wrong = 0
    for p, w, st in zip(ps, ws, states):
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)
        for k, v in st.items():
            if isinstance(v, tuple):
                codes, absmax = v
                torch.testing.assert_close(opt.state[p][k + quant.ABSMAX], absmax, rtol=1e-5,
                                           atol=0)
                diff = (quant.unpack(opt.state[p][k]).long() - codes.long()).abs()
                assert diff.max() <= 1, (k, diff.max())
                total += codes.numel()
                wrong += int((diff > 0).sum())
    print(f"{name}: {wrong} of {total} codes differ from the float64 reference")
    assert total > 0 and wrong <= 1e-4 * total


@pytest.mark.parametrize("name", MOMENTS)
def test_engines_write_equal_codes(name):
    """Numba and Triton (its interpreter here) write the same packed codes, absmax and
    params, bit for bit."""
    runs = []
    for backend in ("numba", "triton"):
        ps, opt, _ = _trained(name, backend, steps=3)
        runs.append((ps, opt.state_dict()["state"]))
    (pa, sa), (pb, sb) = runs
    for x, y in zip(pa, pb):
        assert torch.equal(x, y)
    assert any(v.dtype == torch.uint8 for v in sa[0].values())
    for i in sa:
        assert sa[i].keys() == sb[i].keys()
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)


def test_master_weights_are_the_float32_run_bitwise():
    """bfloat16 params with master_weights=True (Triton's interpreter) and float32 params
    (Numba) from the same values, on the same bfloat16 grads, 3 steps of 4-bit state: the
    masters are the float32 params bit for bit, the params them rounded, the codes equal."""
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(128, 64, generator=gen), torch.randn(128, generator=gen)]
    grads = [[torch.randn(t.shape, generator=gen).bfloat16() for t in start] for _ in range(3)]
    runs = []
    for dtype, backend, kw in ((torch.float32, "numba", {}),
                               (torch.bfloat16, "triton", dict(master_weights=True))):
        ps = [torch.nn.Parameter(t.bfloat16().to(dtype)) for t in start]
        opt = fusedopt.AdamW(ps, lr=1e-2, state_dtype=torch.uint4, backend=backend, **kw)
        for gs in grads:
            for p, g in zip(ps, gs):
                p.grad = g.to(dtype)
            opt.step()
        runs.append((ps, opt))
    (ps, opt), (bs, bopt) = runs
    assert bopt.state[bs[0]]["exp_avg_sq"].shape == (128, 32)  # (4-bit codes)
    for p, b in zip(ps, bs):
        assert torch.equal(bopt.state[b]["master"], p) and torch.equal(b, p.bfloat16())
        for k, v in opt.state[p].items():
            assert torch.equal(bopt.state[b][k], v), k


def test_gradient_release_is_the_normal_step_bitwise():
    """Gradient release (prepare_for_gradient_release) with 4-bit state: params and state
    bit for bit the normal step's after 3 steps (Numba, float32)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 64))  # (64 x 128: 4-bit codes)
    runs = []
    for rel in (False, True):
        m = copy.deepcopy(model)
        opt = fusedopt.AdamW(m.parameters(), lr=1e-2, state_dtype=torch.uint4,
                             gradient_release=rel)
        if rel:
            fusedopt.prepare_for_gradient_release(m, opt)
        gen = torch.Generator().manual_seed(1)
        for _ in range(3):
            m(torch.randn(8, 16, generator=gen)).square().mean().backward()
            opt.step()
            opt.zero_grad()
        runs.append((list(m.parameters()), opt))
    (ps, opt), (qs, ropt) = runs
    assert ropt.state[qs[2]]["exp_avg"].shape == (64, 64)  # (4-bit codes)
    for p, q in zip(ps, qs):
        assert torch.equal(p, q)
        for k, v in opt.state[p].items():
            assert torch.equal(ropt.state[q][k], v), k


def test_bytes_per_param_and_fallbacks():
    """AdamW's state of a param over the threshold is two nibbles and two absmax per 128
    elements: 1.0625 bytes per param (float32: 8; 8-bit: 2.03); a param whose last dim is
    odd takes 8-bit state, a small one float32 state."""
    ps = _params(shapes=[(768, 3072), (4096, 3), (4095,)])
    opt = fusedopt.AdamW(ps, state_dtype=torch.uint4)
    for p in ps:
        p.grad = torch.randn_like(p)
    opt.step()
    big, odd, small = (opt.state[p] for p in ps)
    assert big["exp_avg"].shape == (768, 1536) and big["exp_avg_absmax"].shape == (18432,)
    nbytes = sum(v.numel() * v.element_size() for k, v in big.items() if k != "step")
    per = nbytes / ps[0].numel()
    print(f"AdamW 4-bit state: {per:.4f} bytes per param (float32: 8)")
    assert per == pytest.approx(2 * (0.5 + 4 / 128)) and per <= 1.2
    assert odd["exp_avg"].shape == (4096, 3) and odd["exp_avg_absmax"].shape == (48,)
    assert small["exp_avg"].dtype == torch.float32


def test_state_dict_both_ways():
    """A 4-bit state_dict continues bit for bit in a new optimizer; float_state_dict turns
    it into one torch.optim loads (close to ours a step later); torch.optim's float state
    and 8-bit state load into a 4-bit optimizer (quantized at its next step), and 4-bit
    state into an 8-bit one."""
    ps, opt, gen = _trained("AdamW")
    sd = copy.deepcopy(opt.state_dict())
    twin = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    again = fusedopt.AdamW(twin, **HP["AdamW"], state_dtype=torch.uint4)
    again.load_state_dict(copy.deepcopy(sd))
    tps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    plain = torch.optim.AdamW(tps, **HP["AdamW"])
    plain.load_state_dict(quant.float_state_dict(sd))
    assert plain.state[tps[0]]["exp_avg"].shape == ps[0].shape
    _grads(ps, gen)
    for a, b, c in zip(ps, twin, tps):
        b.grad, c.grad = a.grad.clone(), a.grad.clone()
    for o in (opt, again, plain):
        o.step()
    for a, b, c in zip(ps, twin, tps):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, rtol=0, atol=2e-4)
    for src, sdt, shape in ((plain.state_dict(), torch.uint4, (300, 39)),
                            (quant.float_state_dict(sd), torch.uint4, (300, 39)),
                            (sd, torch.uint8, (300, 78))):
        back_ps = [torch.nn.Parameter(p.detach().clone()) for p in ps]
        back = fusedopt.AdamW(back_ps, **HP["AdamW"], state_dtype=sdt)
        back.load_state_dict(copy.deepcopy(src))
        back.param_groups[0]["state_dtype"] = sdt
        _grads(back_ps, gen)
        back.step()
        st = back.state[back_ps[0]]
        assert st["exp_avg"].dtype == torch.uint8 and st["exp_avg"].shape == shape


def test_state_dict_of_the_old_map_refused():
    """A state_dict's groups with unsigned 4-bit codes carry the map's version
    (quant.MAPS4); one without it (fusedopt's before 2026-12-08: torchao's linear map) is
    refused by load_state_dict and float_state_dict, rather than read as other values."""
    ps, opt, _ = _trained("AdamW")
    sd = opt.state_dict()
    assert [g[quant.MAPS4] for g in sd["param_groups"]] == [quant.MAPS4_VERSION]
    del sd["param_groups"][0][quant.MAPS4]
    again = fusedopt.AdamW([torch.nn.Parameter(p.detach().clone()) for p in ps],
                           state_dtype=torch.uint4)
    for load in (again.load_state_dict, quant.float_state_dict):
        with pytest.raises(RuntimeError, match="coded with another map"):
            load(copy.deepcopy(sd))


def _probe_values(qmap):
    """Per block of 128: 1 (absmax 1, y = x), then every map value and every midpoint
    moved 0.1 % toward each neighbour; zeros pad to quant.MIN_NUMEL."""
    q = qmap.double()
    mids = quant.midpoints(qmap)
    vals = torch.cat([q, mids - 1e-3 * mids.abs(), mids + 1e-3 * mids.abs()]).float()
    out = torch.zeros(quant.MIN_NUMEL // 128, 128)
    out[:, 0] = 1
    out[0, 1:1 + len(vals)] = vals
    return out.reshape(-1)


@pytest.mark.parametrize("backend", ["numba", "triton"])
def test_every_code_and_midpoint_of_both_maps(backend):
    """The engines' code (a count of midpoints below y) against quant.quantize's nearest
    value (float64) on both sides of every midpoint of both maps: equal everywhere.  The
    signed map through SGD's momentum buffer, the unsigned through Adagrad's sum."""
    for signed, cls, kw, name in ((True, fusedopt.SGD, dict(momentum=0.9), "momentum_buffer"),
                                  (False, fusedopt.Adagrad, {}, "sum")):
        qmap = quant.dynamic_map(signed, 4)
        want = _probe_values(qmap)
        if not signed:
            want = want.clamp(min=0)
        p = torch.nn.Parameter(torch.zeros_like(want))
        opt = cls([p], lr=0.1, state_dtype=torch.uint4, backend=backend, **kw)
        p.grad = want.clone() if signed else want.sqrt()
        stored = p.grad if signed else p.grad * p.grad
        opt.step()
        ref, absmax = quant.quantize(stored, qmap, quant.BLOCK4)
        assert torch.equal(opt.state[p][name + quant.ABSMAX], absmax)
        codes = quant.unpack(opt.state[p][name])
        bad = (codes != ref).nonzero().flatten()
        assert len(bad) == 0, (signed, bad[:5].tolist(), codes[bad[:5]].tolist())
        assert set(codes.tolist()) == set(range(16))


_FINALS = {}


def _digits_final_loss(state_dtype, mutant=None):
    """digits.final_loss on seed 0, float32 state's kept for the next caller."""
    pytest.importorskip("sklearn.datasets", reason="scikit-learn is a test extra")
    if (state_dtype, mutant) not in _FINALS:
        _FINALS[state_dtype, mutant] = final_loss(state_dtype)
    return _FINALS[state_dtype, mutant]


def test_digits_training_loss_near_float32():
    """The digits run's final loss with 4-bit state within LOSS_GAP (3 %, the issue's
    bound) of float32 state's.  Measured (docs/8bit.md): float32 0.0647, 8-bit 0.0641,
    4-bit 0.0649 (+0.4 %).  Not a lucky seed, but not a wide margin either: on seeds 1-3
    (bench/maps_4bit.py engine) 4-bit ends +4.0, -2.0, +3.6 % off, 8-bit -0.7, +0.4,
    -4.0 %: 3 % is about the run's own spread."""
    f32, four = _digits_final_loss(None), _digits_final_loss(torch.uint4)
    print(f"final loss: float32 state {f32:.4f}, 4-bit {four:.4f} ({four / f32 - 1:+.2%})")
    assert abs(four - f32) <= LOSS_GAP * f32


def _mutant(name, log_map, midpoints):
    """(unsigned 4-bit map, midpoints) of a mutant, from the true ones: torchao's (k / 16,
    the nearest value), or the log map's values one code high (its codes unchanged)."""
    if name == "linear":
        return (lambda: torch.arange(1, 17, dtype=torch.float32) / 16,
                lambda q: (q.double()[:-1] + q.double()[1:]) / 2)
    return lambda: log_map() * 10 ** 0.2, lambda q: midpoints(q / q[-1])


@pytest.mark.parametrize("mutant", ["linear", "one code high"])
def test_digits_bound_catches_a_wrong_map(mutant, monkeypatch):
    """Mutation check of LOSS_GAP: torchao's linear second-moment map (measured 0.0783,
    +21 %), and the log map's codes read one value high (each step's v 1.58x the last's:
    0.8922, training stalls) end outside it."""
    from fusedopt import bucket
    log_map, midpoints = _mutant(mutant, quant.log_map, quant.midpoints)
    monkeypatch.setattr(quant, "log_map", log_map)
    monkeypatch.setattr(quant, "midpoints", midpoints)
    monkeypatch.setattr(bucket, "_QTABLE", {})
    f32, four = _digits_final_loss(None), _digits_final_loss(torch.uint4, mutant)
    print(f"{mutant}: final loss {four:.4f} against float32 state's {f32:.4f} "
          f"({four / f32 - 1:+.2%})")
    assert abs(four - f32) > LOSS_GAP * f32


LOSS_GAP = 0.03
