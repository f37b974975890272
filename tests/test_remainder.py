"""master_weights="remainder": the float32 master of a bfloat16 param held as the param plus
an int16 remainder (fusedopt/remainder.py's scheme), joined and split in the engines' update
pass.  What holds, against master_weights=True on the same gradients: the master joined from
(param, remainder) is its master bit for bit at every step, and the param is that master
split, which is its param but at the ties of an even upper half (one ulp further from zero);
the state_dict is master_weights=True's, both ways; 2 bytes of master per param, not 4."""
import copy

import pytest
import torch

import fusedopt
from fusedopt import remainder
from harness import BACKENDS, HP, NAMES
from precision_mlp import state_bytes

KEY = remainder.KEY
SHAPES = [(5, 3), (7,), (1,), (0,), (130,)]
# Adam with amsgrad (three slots), SGD with Nesterov momentum, LAMB (its reduce pass reads
# the master too)
NAMED = ["Adam", "SGD", "LAMB"]
REFUSING = [n for n in NAMES if "master_weights" in getattr(fusedopt, n)._refuses]


def make(dtype=torch.bfloat16, seed=0, shapes=SHAPES):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]


def give(ps, step):
    gen = torch.Generator().manual_seed(100 + step)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


def run(opt, ps, first, steps):
    for s in range(first, first + steps):
        give(ps, s)
        opt.step()


def master_of(opt, p):
    st = opt.state[p]
    return st["master"] if KEY not in st else remainder.join(p.detach(), st[KEY])


def bits(t):
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


def check_same(opt_a, a, opt_b, b):
    """opt_a: master_weights=True, opt_b: "remainder" over the same gradients.  Returns
    the number of params that differ (all at ties)."""
    differ = 0
    for p, q in zip(a, b):
        m = opt_a.state[p]["master"]
        assert KEY in opt_b.state[q] and "master" not in opt_b.state[q]
        assert opt_b.state[q][KEY].dtype == torch.int16
        assert torch.equal(bits(master_of(opt_b, q)), bits(m))
        assert torch.equal(bits(q.detach()), bits(remainder.split(m)[0]))
        u = m.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        tie_even = ((u & 0xFFFF) == 0x8000) & ((u >> 16) & 1 == 0)
        assert torch.equal(bits(p.detach())[~tie_even], bits(q.detach())[~tie_even])
        differ += int((bits(p.detach()) != bits(q.detach())).sum())
        for k, v in opt_a.state[p].items():  # moments, step: the same
            if k != "master":
                assert torch.equal(opt_b.state[q][k], v), k
    return differ


@pytest.fixture
def small_blocks(monkeypatch, request):
    """Triton's interpreter runs each program's block as numpy arrays of BLOCK elements
    (CHUNK, 65536, by default): blocks of 128 make a step over these small params ~10x
    cheaper.  The kernel's code is the same; only its vector width differs."""
    if request.node.callspec.params.get("backend") == "triton":
        from fusedopt.kernels import triton_engine
        monkeypatch.setattr(triton_engine, "BLOCK", 128)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMED)
def test_200_steps_bit_for_bit_master_weights(name, backend, small_blocks):
    """200 steps on fixed gradients, checked after each 20: the masters agree bit for bit,
    the state too, and the params but at the ties (check_same)."""
    # (a full block and a tail, and one element: few programs, for the interpreter)
    a, b = make(shapes=[(5, 27), (1,)]), make(shapes=[(5, 27), (1,)])
    opt_a = getattr(fusedopt, name)(a, backend=backend, master_weights=True, **HP[name])
    opt_b = getattr(fusedopt, name)(b, backend=backend, master_weights="remainder", **HP[name])
    for first in range(0, 200, 20):
        run(opt_a, a, first, 20)
        run(opt_b, b, first, 20)
        check_same(opt_a, a, opt_b, b)
    assert any(opt_b.state[q][KEY].any() for q in b)  # the remainders do carry something


@pytest.mark.parametrize("backend", BACKENDS)
def test_params_differ_at_even_ties(backend):
    """A master exactly between two bfloat16 values whose lower is even: 1.5 + 2**-8
    between 1.5 (0x3FC0) and 1.5078125 (0x3FC1).  master_weights=True's param rounds to
    even (1.5), the remainder scheme's away from zero (0x3FC1), and the master is the same;
    an odd lower neighbour (1.0 - 2**-9, 0x3F7F below) rounds up in both."""
    runs = []
    for mw in (True, "remainder"):
        ps = [torch.nn.Parameter(torch.tensor([1.5, 1.0], dtype=torch.bfloat16))]
        opt = fusedopt.SGD(ps, lr=1.0, backend=backend, master_weights=mw)
        ps[0].grad = torch.tensor([-2.0 ** -8, 2.0 ** -9], dtype=torch.bfloat16)
        opt.step()
        runs.append((bits(ps[0].detach()).tolist(), master_of(opt, ps[0]).tolist()))
    assert runs[0][1] == runs[1][1] == [1.5 + 2 ** -8, 1.0 - 2 ** -9]
    assert runs[0][0] == [0x3FC0, 0x3F80] and runs[1][0] == [0x3FC1, 0x3F80]


def test_state_dict_both_ways_with_master_weights():
    """The state_dict holds the float32 master under "master" (no remainder): the keys,
    dtypes and values of master_weights=True's.  Each mode loads the other's and continues
    bit for bit as an uninterrupted master_weights=True run (the remainder run's params set
    to its split of the master, its ties included)."""
    a = make()
    ref = fusedopt.AdamW(a, lr=1e-2, master_weights=True)
    b = make()
    opt_b = fusedopt.AdamW(b, lr=1e-2, master_weights="remainder")
    run(ref, a, 0, 3)
    run(opt_b, b, 0, 3)
    sd_a, sd_b = copy.deepcopy(ref.state_dict()), copy.deepcopy(opt_b.state_dict())
    for i in sd_a["state"]:
        assert list(sd_b["state"][i]) == list(sd_a["state"][i])
        for k, v in sd_a["state"][i].items():
            assert sd_b["state"][i][k].dtype == v.dtype and torch.equal(sd_b["state"][i][k], v)
    assert all(KEY in opt_b.state[q] for q in b)  # (the live state keeps its remainder)
    # master_weights=True's checkpoint into "remainder", and back
    c = [torch.nn.Parameter(p.detach().clone()) for p in a]
    opt_c = fusedopt.AdamW(c, lr=1e-2, master_weights="remainder")
    opt_c.load_state_dict(sd_a)
    d = [torch.nn.Parameter(q.detach().clone()) for q in b]
    opt_d = fusedopt.AdamW(d, lr=1e-2, master_weights=True)
    opt_d.load_state_dict(sd_b)
    # each keeps its own way of storing the master
    assert opt_c.param_groups[0]["master_weights"] == "remainder"
    assert opt_d.param_groups[0]["master_weights"] is True
    run(ref, a, 3, 4)
    for opt, ps in ((opt_b, b), (opt_c, c)):
        run(opt, ps, 3, 4)
        check_same(ref, a, opt, ps)
    run(opt_d, d, 3, 4)
    for p, q in zip(a, d):
        assert torch.equal(ref.state[p]["master"], opt_d.state[q]["master"])
        assert torch.equal(bits(p.detach()), bits(q.detach()))
    # a torch.optim state_dict (no master): the master starts from the param, remainder 0
    e = make()
    opt_e = fusedopt.AdamW(e, lr=1e-2, master_weights="remainder")
    torch_opt = torch.optim.AdamW(make(), lr=1e-2)
    run(torch_opt, list(torch_opt.param_groups[0]["params"]), 0, 1)
    opt_e.load_state_dict(torch_opt.state_dict())
    run(opt_e, e, 1, 1)
    torch.optim.AdamW(make(), lr=1e-2).load_state_dict(opt_e.state_dict())


def test_two_bytes_per_param_of_master():
    """State bytes per param (precision_mlp.state_bytes, step counters left out): AdamW
    with master_weights=True keeps 12 (float32 moments and master), "remainder" 10."""
    counts = {}
    for mw in (True, "remainder"):
        ps = make(shapes=[(64, 33), (7,)])
        opt = fusedopt.AdamW(ps, lr=1e-3, master_weights=mw)
        run(opt, ps, 0, 1)
        counts[mw] = state_bytes(opt)
    assert counts == {True: 12.0, "remainder": 10.0}


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_written_from_outside_restarts_the_master(backend):
    """A param written in place between steps: its remainder restarts from zero (the master
    is the written param), as master_weights=True's master restarts from it; and the two
    runs stay bit for bit.  Wide params (float32) in the group keep no remainder."""
    runs = []
    for mw in (True, "remainder"):
        ps = make(shapes=[(5, 3), (130,)]) + make(torch.float32, shapes=[(9,)])
        opt = fusedopt.AdamW(ps, lr=1e-2, backend=backend, master_weights=mw)
        run(opt, ps, 0, 2)
        with torch.no_grad():
            ps[1].mul_(0.5)
        if mw == "remainder":
            assert opt.state[ps[1]][KEY].any()
        run(opt, ps, 2, 2)
        assert KEY not in opt.state[ps[2]] and "master" not in opt.state[ps[2]]
        runs.append((opt, ps))
    check_same(*runs[0], runs[1][0], runs[1][1][:2])
    assert torch.equal(runs[0][1][2], runs[1][1][2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_flat_buffers_give_the_same_bits(backend):
    """flat=True: the remainders in one int16 buffer; the same bits as per-tensor tables."""
    out = []
    for fl in (False, True):
        ps = make(shapes=[(5, 3), (7,), (130,)])
        opt = fusedopt.AdamW(ps, lr=1e-2, backend=backend, master_weights="remainder", flat=fl)
        for s in range(3):
            give(ps, s)
            opt.step()
            opt.zero_grad(set_to_none=False)
        out.append([master_of(opt, p) for p in ps])
    assert all(torch.equal(bits(x), bits(y)) for x, y in zip(*out))


def test_refused_where_it_makes_no_sense():
    """A ValueError naming the argument: a float16 param (its float32 master is not its
    upper half plus 16 bits), with kahan_sum or stochastic_rounding (they keep the param
    honest their own way), a value other than True, False, "remainder"; the classes
    without master weights refuse it as they refuse True."""
    with pytest.raises(ValueError, match="master_weights='remainder' takes bfloat16 params"):
        fusedopt.AdamW(make(torch.float16), master_weights="remainder")
    opt = fusedopt.AdamW(make(), master_weights="remainder")
    with pytest.raises(ValueError, match="master_weights='remainder' takes bfloat16 params"):
        opt.add_param_group({"params": make(torch.float16, shapes=[(3,)])})
    for other in ("kahan_sum", "stochastic_rounding"):
        with pytest.raises(ValueError, match="master_weights.*exclude each other"):
            fusedopt.AdamW(make(), master_weights="remainder", **{other: True})
    with pytest.raises(ValueError, match="master_weights must be True, False or 'remainder'"):
        fusedopt.AdamW(make(), master_weights="fp32")
    with pytest.raises(TypeError, match="master_weights must be True, False or 'remainder'"):
        fusedopt.AdamW(make(), master_weights=1)
    for name in REFUSING:
        with pytest.raises(ValueError, match=f"fusedopt.{name} does not support master_weights"):
            getattr(fusedopt, name)(make(), master_weights="remainder")
    # a param cast to float16 after the optimizer was built: refused at the step
    ps = make(shapes=[(3,)])
    opt = fusedopt.AdamW(ps, master_weights="remainder")
    ps[0].data = ps[0].data.half()
    ps[0].grad = torch.ones(3, dtype=torch.float16)
    with pytest.raises(ValueError, match="master_weights='remainder' takes bfloat16 params"):
        opt.step()


@pytest.mark.parametrize("backend", BACKENDS)
def test_8bit_state(backend):
    """8-bit moments (the 65537-element param: coded) with remainder masters: bit for bit
    master_weights=True's, as with float32 state."""
    shapes = [(65537,), (7,)]
    a, b = make(shapes=shapes), make(shapes=shapes)
    kw = dict(lr=1e-2, backend=backend, state_dtype=torch.uint8)
    opt_a = fusedopt.AdamW(a, master_weights=True, **kw)
    opt_b = fusedopt.AdamW(b, master_weights="remainder", **kw)
    run(opt_a, a, 0, 3)
    run(opt_b, b, 0, 3)
    check_same(opt_a, a, opt_b, b)


# -- the scheme itself, over every low half of a slice of float32 bit patterns --------------

# upper halves: a stride through all 65536 (signs, exponents, mantissas), and the edges:
# zeros and subnormals, 1, the largest finite floats, inf, NaN of both signs
EDGES = [0x0000, 0x0001, 0x007F, 0x0080, 0x3F7F, 0x3F80, 0x7F7E, 0x7F7F, 0x7F80, 0x7F81,
         0x7FBF, 0x7FC0, 0x7FFF]
HI = sorted(set(range(0, 1 << 16, 1021)) | {e | s for e in EDGES for s in (0, 0x8000)})


def _masters():
    hi = torch.tensor(HI, dtype=torch.int64)
    lo = torch.arange(1 << 16, dtype=torch.int64)
    m = ((hi[:, None] << 16) | lo[None, :]).reshape(-1)
    return torch.where(m >= 1 << 31, m - (1 << 32), m).to(torch.int32).view(torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_engines_split_and_join_every_master(backend):
    """The engines' join and split (SGD at lr 0: the master read and written back as it
    is) and remainder.py's agree on every master of the slice, NaNs included; join
    inverts split for every non-NaN master; the param is master.to(bfloat16) (round to
    nearest even) except at the ties that round to an even param, one ulp further from
    zero there.  Mutant: a join without the carry undone is wrong at half the masters."""
    m = _masters()
    if backend == "triton":
        m = m[::16]  # (the interpreter: a sample)
    p, r = remainder.split(m)
    q = torch.nn.Parameter(torch.zeros_like(p))
    opt = fusedopt.SGD([q], lr=0.0, backend=backend, master_weights="remainder")
    opt.load_state_dict({"state": {0: {"master": m}},
                         "param_groups": opt.state_dict()["param_groups"]})
    with torch.no_grad():
        q.copy_(p)  # the param the master rounds to: the master is adopted as it is
    q.grad = torch.zeros_like(q)
    opt.step()
    assert torch.equal(bits(q.detach()), bits(p)) and torch.equal(opt.state[q][KEY], r)
    back = remainder.join(p, r)
    nan = torch.isnan(m)
    assert torch.equal(bits(back)[~nan], bits(m)[~nan])
    assert torch.isnan(back[nan]).all() and torch.isnan(p[nan].float()).all()
    u = m.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    tie_even = ((u & 0xFFFF) == 0x8000) & ((u >> 16) & 1 == 0) & ~nan
    rne = m.to(torch.bfloat16)
    assert torch.equal(bits(p)[~tie_even & ~nan], bits(rne)[~tie_even & ~nan])
    away = (bits(p).to(torch.int64) & 0xFFFF) - (bits(rne).to(torch.int64) & 0xFFFF)
    assert (away[tie_even] == 1).all() and int(tie_even.sum()) > 0
    wrong = ((bits(p).to(torch.int64) & 0xFFFF) << 16) | (r.to(torch.int64) & 0xFFFF)
    assert torch.equal((wrong != u) & ~nan, ((u & 0xFFFF) >= 0x8000) & ~nan)
