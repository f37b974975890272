"""Block-wise 8-bit quantization (fusedopt/quant.py): the dynamic map, nearest codes,
per-block absmax, the error bound, and the map against bitsandbytes' where installed."""
import pytest
import torch

from fusedopt import quant
from fusedopt.kernels import numba_quant as _NQ


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_shape(signed):
    q = quant.dynamic_map(signed).double()
    assert q.numel() == 256 and torch.all(q[1:] > q[:-1])  # 256 distinct values, sorted
    assert q[-1] == 1 and (q == 0).sum() == 1
    if signed:  # symmetric but for 1: 127 positive values and their negatives
        pos, neg = q[q > 0], q[q < 0]
        assert pos.numel() == 128 and torch.equal(-neg.flip(0), pos[:-1])
    else:
        assert q[0] == 0 and (q > 0).sum() == 255
    # base-10 exponents: smallest nonzero magnitude 10^-6 times a midpoint of [0.1, 1]
    small = q[q > 0].min().item()
    assert 1e-7 < small < 1e-6


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_is_bitsandbytes(signed):
    bnb = pytest.importorskip("bitsandbytes.functional",
                              reason="bitsandbytes is not installed (not a test extra)")
    assert torch.equal(quant.dynamic_map(signed), bnb.create_dynamic_map(signed))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("n", [1, 255, 256, 257, 4096 + 3])
def test_codes_are_nearest_per_block(signed, n):
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(n, generator=gen, dtype=torch.float64) * torch.rand(n, generator=gen) ** 6
    x = x if signed else x.abs()
    q = quant.dynamic_map(signed)
    codes, absmax = quant.quantize(x, q)
    assert codes.dtype == torch.uint8 and codes.shape == x.shape
    blocks = -(-n // quant.BLOCK)
    assert absmax.shape == (blocks,)
    for b in range(blocks):
        part = x[b * quant.BLOCK:(b + 1) * quant.BLOCK]
        assert absmax[b] == part.abs().max().float()
    scale = absmax.double().repeat_interleave(quant.BLOCK)[:n]
    normed = x / scale
    best = (q.double()[None, :] - normed[:, None]).abs().argmin(dim=1)
    assert torch.equal(codes.long(), best)
    # the error: at most half the gap to the neighbouring map value, times absmax; below
    # the signed map's lowest value (-0.99297) the whole way to -1
    back = quant.dequantize(codes, absmax, q, torch.float64)
    q = q.double()
    gaps = torch.diff(q) / 2
    down, up = torch.cat([gaps[:1], gaps]), torch.cat([gaps, gaps[-1:]])
    if signed:
        down[0] = q[0] + 1
    # (absmax is kept in float32: |x| / absmax may pass 1 by its rounding, 2^-24)
    bound = (torch.maximum(down, up)[codes.long()] + 2.0 ** -23) * scale
    assert torch.all((back - x).abs() <= bound)


def test_zero_block_and_extremes():
    q = quant.dynamic_map(True)
    x = torch.zeros(600, dtype=torch.float64)
    x[300], x[301] = -3.0, 3.0
    codes, absmax = quant.quantize(x, q)
    assert absmax[0] == 0 and absmax[1] == 3 and absmax[2] == 0
    back = quant.dequantize(codes, absmax, q, torch.float64)
    assert back[0] == 0 and back[300] == 3.0 * q[0].item() and back[301] == 3.0


def test_8bit_reference_adam_trains_as_float64_adam():
    """The float64 reference of 8-bit Adam (dequantize, step, quantize) against plain
    float64 Adam on a least-squares problem: the loss curves within 1 % of each other at
    every step (measured: 0.1 %; first moments quantized with the unsigned map, which
    drops their negative values, go 11.5 % off), its state really held as codes, and a
    param under the threshold keeping float64 state."""
    from fusedopt import reference
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(256, 64, generator=gen, dtype=torch.float64)
    y = torch.randn(256, generator=gen, dtype=torch.float64)
    shapes = [(64, 80), (80,)]  # 5120 elements: 8-bit; 80: float64

    def loss_and_grads(ws):
        w, b = (t.detach().requires_grad_() for t in ws)
        loss = ((A @ w @ torch.ones(80, dtype=torch.float64) / 80 + b.mean() - y) ** 2).mean()
        loss.backward()
        return loss.item(), [w.grad, b.grad]

    curves, states = {}, {}
    for eight in (False, True):
        ws = [torch.randn(s, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 0.1
              for s in shapes]
        st, curve = [{}, {}], []
        for _ in range(100):
            loss, gs = loss_and_grads(ws)
            curve.append(loss)
            if eight:
                reference.step_8bit("adam", ws, gs, st, {"exp_avg": True, "exp_avg_sq": False},
                                    lr=1e-2)
            else:
                reference.step("adam", ws, gs, st, lr=1e-2)
        curves[eight], states[eight] = torch.tensor(curve), st
    print("final loss float64", curves[False][-1].item(), "8-bit", curves[True][-1].item())
    assert ((curves[True] - curves[False]).abs() / curves[False]).max() <= 0.01
    codes, absmax = states[True][0]["exp_avg"]
    assert codes.dtype == torch.uint8 and absmax.shape == (5120 // quant.BLOCK,)
    assert states[True][1]["exp_avg"].dtype == torch.float64


def _edges_and_specials(signed):
    # every binary exponent's edges, every LOW and midpoint of the map and the floats beside
    # them, zeros of both signs, subnormals, inf and NaN, random magnitudes: float32 numpy,
    # a multiple of 64 long
    import numpy as np
    from fusedopt.kernels import qmap
    T = quant.engine_table().numpy()[int(signed)]
    q = quant.dynamic_map(signed).double()
    edges = torch.cat([2.0 ** torch.arange(-40, 2, dtype=torch.float64),
                       torch.from_numpy(T[qmap.LOW:qmap.LOW + 7]).double(),
                       (q[1:] + q[:-1]) / 2, q]).float()
    near = torch.cat([edges, torch.nextafter(edges, torch.tensor(0.0)),
                      torch.nextafter(edges, torch.tensor(2.0))])
    special = torch.tensor([0.0, -0.0, 1e-45, 1e-40, float("inf"), float("nan"), 1.0])
    gen = torch.Generator().manual_seed(1)
    wild = torch.randn(4096, generator=gen) * 10.0 ** torch.randint(-30, 2, (4096,),
                                                                    generator=gen)
    x = torch.cat([near, -near, special, -special, wild]).numpy()
    # |x| <= absmax, as in requantize (absmax is the block's largest |x|): y is at most
    # 1 + 2^-23, which _codes16 assumes (its bucket is the exponent field's low 5 bits)
    x = x[(np.abs(x) <= 1) | ~np.isfinite(x)]
    return np.concatenate([x, np.zeros((-len(x)) % 64, np.float32)])




@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("path,width", [("avx512", 16), ("avx512", 256), ("avx2", 8),
                                        ("avx2", 256)])
def test_vector_codes_equal_the_loop(signed, path, width):
    """The CPU engine's vector codes against its element-by-element loop (qcode), bit for
    bit, on _edges_and_specials in blocks whose absmax is 1, tiny (scaled by 2^64, as
    requantize does) or subnormal: AVX-512 permutes (numba_quant._permuted: 16 at a time
    or a whole block) and AVX2 (numba_avx2.coded8: 8 at a time or a whole block), each
    where this CPU has its instructions."""
    import numba
    import numpy as np
    from fusedopt.kernels import numba_avx2, qmap
    nq = _NQ
    if not (nq.AVX512 if path == "avx512" else nq.AVX2):
        pytest.skip(f"this CPU has no {path}: its path cannot run here")
    vector = nq._permuted if path == "avx512" else numba_avx2.coded8
    T = quant.engine_table().numpy()[int(signed)].copy()
    x = _edges_and_specials(signed)
    x = np.concatenate([x, np.zeros((-len(x)) % 256, np.float32)])

    @numba.njit
    def both(x, T, sc, inv, signed):
        a = np.empty(len(x), np.uint8)
        b = np.empty(len(x), np.uint8)
        nq._coded(a, x, T, sc, inv, 0, len(x), signed)
        for j in range(0, len(x), width):
            vector(b, x, T, sc, inv, j, j + width, signed)
        return a, b

    for absmax in (1.0, 1e-25, 1e-40):
        sc = np.float32(2.0 ** 64 if absmax < qmap.TINY else 1.0)
        inv = np.float32(1) / (np.float32(absmax) * sc)
        a, b = both((x * np.float32(absmax)).astype(np.float32), T, sc, inv, signed)
        assert np.array_equal(a, b), np.flatnonzero(a != b)[:5]
        assert len(set(a.tolist())) > 200  # (not vacuous: the codes span the map)


@pytest.mark.skipif(not _NQ.VBMI, reason="no AVX-512 VBMI on this CPU: no permute path for values")
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("width", [64, 256])
def test_permuted_values_equal_the_loads(signed, width):
    """The CPU engine's dequantization by byte permutes (numba_quant._permute64 and the
    whole block's _permute_block) against a load per code, bit for bit, every code, scales
    1, 1e-25, 1e-40."""
    import numba
    import numpy as np
    nq = _NQ
    T = quant.engine_table().numpy()[int(signed)].copy()
    permute = nq._permute64 if width == 64 else nq._permute_block

    @numba.njit
    def values(f, codes, T, absmax):
        for j in range(0, len(codes), width):
            permute(f, codes, T, absmax, j)

    codes = np.random.default_rng(0).integers(0, 256, 4096).astype(np.uint8)
    codes[:256] = np.arange(256)
    for absmax in (1.0, 1e-25, 1e-40):
        got = np.empty(len(codes), np.float32)
        values(got, codes, T, np.float32(absmax))
        want = T[codes] * np.float32(absmax)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_block_absmax_equals_the_loop():
    """requantize's absmax of a whole block (numba_quant4.absmax_bits, which block_scale
    uses for both widths: vector maxes of the magnitudes' bits) against the largest |x| by
    a loop: random blocks, and blocks with -0, subnormals, inf and NaN (which sticks) at
    every place the vector loads split."""
    import numba
    import numpy as np
    from fusedopt.kernels import numba_quant4
    from fusedopt.kernels.numba_base import f32_bits
    whole = numba_quant4.absmax_bits(256)

    @numba.njit
    def both(f):
        mx = np.uint32(0)
        for j in range(f.shape[0]):
            b = f32_bits(f[j]) & np.uint32(0x7FFFFFFF)
            mx = b if b > mx else mx
        return whole(f), mx

    rng = np.random.default_rng(0)
    blocks = [(rng.standard_normal(256) * 10.0 ** rng.integers(-40, 30, 256)).astype(np.float32)
              for _ in range(50)]
    for at in (0, 15, 16, 100, 255):
        for v in (-3e38, float("inf"), float("-inf"), float("nan"), -1e-44):
            b = (rng.standard_normal(256) * 1e-3).astype(np.float32)
            b[at] = v
            blocks.append(b)
    blocks.append(np.full(256, -0.0, np.float32))
    for b in blocks:
        got, want = both(b)
        assert got == want, (got, want)
    # (not vacuous: a mutant that drops the last vector load is caught)
    assert both(blocks[-3])[0] == np.float32(np.nan).view(np.uint32) & 0x7FFFFFFF


_STEPS_8BIT = """
import sys, torch, fusedopt
gen = torch.Generator().manual_seed(0)
shapes = [(300, 77), (4096,), (70000,), (5000,)]
ps = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
opt = fusedopt.AdamW(ps, lr=1e-2, amsgrad=True, state_dtype=torch.uint8, backend="numba")
for step in range(5):
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen) * 10.0 ** (-3 * step)
    opt.step()
torch.save({"params": [p.detach() for p in ps], "state": opt.state_dict()["state"]},
           sys.argv[1])
"""


def _run_8bit_steps(kind, where):
    # _STEPS_8BIT in a subprocess compiled for a kind of CPU (numba_avx2.CPU_KINDS, or
    # "native"): its result
    import os
    import subprocess
    import sys
    from fusedopt.kernels.numba_avx2 import CPU_KINDS
    env = dict(os.environ)
    if kind != "native":
        cpu, features = CPU_KINDS[kind]
        if not set(features.split(",")) <= _NQ._FEATURES:
            pytest.skip(f"this CPU cannot run code compiled for {cpu}")
        env.update(NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=features,
                   NUMBA_CACHE_DIR=str(where / "numba"))  # (another CPU: a cache apart)
    r = subprocess.run([sys.executable, "-c", _STEPS_8BIT, str(where / "out")],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(where / "out")


@pytest.fixture(scope="module")
def portable_8bit_steps(tmp_path_factory):
    return _run_8bit_steps("portable", tmp_path_factory.mktemp("portable"))


# one xdist group (the README's --dist loadgroup): the module fixture runs on one worker
@pytest.mark.xdist_group("portable_8bit_steps")
@pytest.mark.parametrize("kind", ["avx2", "avx512", "native"])
def test_each_cpu_path_gives_the_portable_codes(tmp_path, kind, portable_8bit_steps):
    """The whole 8-bit kernel compiled for each kind of CPU this one can run (numba_quant's
    paths: AVX2, AVX-512 without VBMI, this CPU's own) against the portable loops (a load
    per code, codes by compares): five AdamW (amsgrad) steps, three 8-bit slots, blocks
    cut short, moments shrinking by 10^3 a step, the same codes, absmax and params bit for
    bit."""
    a, b = portable_8bit_steps, _run_8bit_steps(kind, tmp_path)
    assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"]))
    codes = 0
    for i, st in a["state"].items():
        for k, v in st.items():
            assert torch.equal(v, b["state"][i][k]), (i, k)
            codes += v.numel() if v.dtype == torch.uint8 else 0
    assert codes == 3 * sum(p.numel() for p in a["params"])  # (every slot 8-bit)
