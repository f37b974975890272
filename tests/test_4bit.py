"""4-bit state (state_dtype=torch.uint4): the maps against torchao's, the engines'
one-pass dequantize -> rule -> requantize against the float64 reference and against each
other, bytes per param and the fallbacks, state_dict both ways, every code and midpoint,
and training on a real data set against float32 state."""
import copy

import pytest
import torch

import fusedopt
from fusedopt import quant, reference

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
    0, its midpoints geometric (torchao's is k / 16: the README's training figures)."""
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
    one code, in at most 0.01 % of elements), absmax and params within float32 rounding.
    Rprop's step sizes climb a ladder (map values times powers of its etas) whose rungs
    land on the linear map's midpoints exactly: measured 43 of 194992 codes, each value
    within one float32 ulp of 5/32 or 25/32; it is held to 0.05 %."""
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
    assert total > 0 and wrong <= (5e-4 if name == "Rprop" else 1e-4) * total


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
    """An MLP (64-256-256-10) on scikit-learn's digits (1797 8x8 images), AdamW lr 1e-3,
    300 steps of 64: the mean of the last 20 losses (float32 state's kept for the next
    caller)."""
    datasets = pytest.importorskip("sklearn.datasets", reason="scikit-learn is a test extra")
    if (state_dtype, mutant) in _FINALS:
        return _FINALS[state_dtype, mutant]
    d = datasets.load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16, torch.tensor(d.target)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 256), torch.nn.ReLU(),
                                torch.nn.Linear(256, 10))
    opt = fusedopt.AdamW(model.parameters(), lr=1e-3, state_dtype=state_dtype)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(300):
        idx = torch.randint(0, len(x), (64,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = _FINALS[state_dtype, mutant] = sum(losses[-20:]) / 20
    return final


def test_digits_training_loss_near_float32():
    """The digits run's final loss with 4-bit state within LOSS_GAP (3 %, the issue's
    bound) of float32 state's.  Measured (docs/8bit.md): float32 0.0647, 8-bit 0.0641,
    4-bit 0.0640 (-1.1 %); torchao's maps (the mutant below) 0.0783 (+21 %).  On two
    other seeds of the float64 simulation (bench/maps_4bit.py) the gap is +4.0 % and
    -1.3 %, 8-bit state's -1.8 % and +0.1 %: 3 % is about the run's own spread."""
    f32, four = _digits_final_loss(None), _digits_final_loss(torch.uint4)
    print(f"final loss: float32 state {f32:.4f}, 4-bit {four:.4f} ({four / f32 - 1:+.2%})")
    assert abs(four - f32) <= LOSS_GAP * f32


# torchao's unsigned map (k / 16, nearest value), and the log map read one code high
MUTANTS = {"linear": (lambda: torch.arange(1, 17, dtype=torch.float32) / 16, True),
           "one code high": (lambda: (10.0 ** (-torch.arange(14, -2, -1, dtype=torch.float64)
                                                / 5)).float(), False)}


@pytest.mark.parametrize("mutant", MUTANTS)
def test_digits_bound_catches_a_wrong_map(mutant, monkeypatch):
    """Mutation check of LOSS_GAP: torchao's linear second-moment map (+21 % measured), and
    the log map's codes read one value high (every second moment 10^(1/5) = 1.58x too large,
    +?? % measured), end outside it."""
    from fusedopt import bucket
    log_map, arithmetic = MUTANTS[mutant]
    midpoints = quant.midpoints
    monkeypatch.setattr(quant, "log_map", log_map)
    if arithmetic:
        monkeypatch.setattr(quant, "midpoints",
                            lambda q: (q.double()[:-1] + q.double()[1:]) / 2)
    elif mutant == "one code high":  # (the codes as the log map's: midpoints unscaled)
        monkeypatch.setattr(quant, "midpoints", lambda q: midpoints(q / q[-1]))
    monkeypatch.setattr(bucket, "_QTABLE", {})
    f32, four = _digits_final_loss(None), _digits_final_loss(torch.uint4, mutant)
    print(f"{mutant}: final loss {four:.4f} against float32 state's {f32:.4f} "
          f"({four / f32 - 1:+.2%})")
    assert abs(four - f32) > LOSS_GAP * f32


LOSS_GAP = 0.03
