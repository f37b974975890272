"""Parity that holds on any CPU (fusedopt/arith.py): torch's elementary ops are measured
on this machine and, where they are not correctly rounded, replayed correctly rounded;
the parity check still fails on a real 1-ulp error in our kernels, whether this machine's
torch is correctly rounded or not (simulated both ways); and a parity subset passes under
other dispatch settings of torch and numba than this machine's own."""
import json
import os
import subprocess
import sys
from fractions import Fraction

import numpy as np
import pytest
import torch

from fusedopt import arith
import mutants

HERE = os.path.dirname(__file__)
HELPERS = os.path.join(HERE, "helpers")


def _nearest(x, dtype):
    """The Fraction x rounded to nearest even in dtype (float(): correctly rounded to float64)."""
    f = float(x)
    if dtype == torch.float64:
        return f
    near = np.float32(f)
    cands = [np.nextafter(near, np.float32(-np.inf)), near, np.nextafter(near, np.float32(np.inf))]
    return float(min(cands, key=lambda c: (abs(Fraction(float(c)) - x), int(c.view(np.int32)) & 1)))


@pytest.mark.parametrize("dtype", arith.DTYPES)
def test_fma_is_correctly_rounded(dtype):
    """Against exact rational arithmetic: random operands, sums that cancel, and sums
    built to land next to a halfway point of the dtype (where rounding twice goes wrong)."""
    gen = torch.Generator().manual_seed(3)
    n = 1500
    a, b, c = (torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    c[n // 3:] = -(a * b)[n // 3:]  # cancellation: what is left is the product's rounding error
    eps = torch.finfo(dtype).eps
    k = torch.randint(1, 1 << 10, (n,), generator=gen).to(dtype)
    a[2 * n // 3:] = (1 + k * eps)[2 * n // 3:]  # (1 + k eps)(1 + eps/2): the product's bits run
    b[2 * n // 3:] = 1 + eps / 2 if dtype == torch.float64 else 1 + eps  # past the dtype's
    c[2 * n // 3:] = -1
    out = arith.fma(a, b, c)
    for i in range(n):
        exact = Fraction(a[i].item()) * Fraction(b[i].item()) + Fraction(c[i].item())
        assert out[i].item() == _nearest(exact, dtype), (i, a[i], b[i], c[i])


def test_probe_finds_and_replay_corrects_a_simulated_bad_sqrt(monkeypatch):
    """torch's sqrt 1 ulp high on a random 20 % (as measured on AMD EPYC): the probe says
    so, and within replay() torch's sqrt is correctly rounded again; outside, torch's own."""
    sqrt, sqrt_ = mutants.torch_sqrt("off")
    monkeypatch.setattr(torch.Tensor, "sqrt", sqrt)
    monkeypatch.setattr(torch.Tensor, "sqrt_", sqrt_)
    monkeypatch.setattr(torch, "sqrt", sqrt)
    found = arith.probe()
    frac, ulps = found[("sqrt", "float32")]
    assert 0.15 < frac < 0.25 and ulps == 1
    assert "sqrt (float32)" in arith.describe()[0]
    x = torch.rand(1000, dtype=torch.float64).float()
    exact = torch.from_numpy(np.sqrt(x.numpy()))
    with arith.replay():
        assert torch.equal(x.sqrt(), exact) and torch.equal(torch.sqrt(x), exact)
        assert torch.equal(x.clone().sqrt_(), exact)
    assert torch.Tensor.sqrt is sqrt and not torch.equal(x.sqrt(), exact)


def test_replay_keeps_ops_that_are_correctly_rounded(monkeypatch):
    """A machine whose sqrt is correctly rounded (simulated): the probe finds nothing
    wrong with it and replay() leaves torch's sqrt in place."""
    sqrt, sqrt_ = mutants.torch_sqrt("exact")
    monkeypatch.setattr(torch.Tensor, "sqrt", sqrt)
    monkeypatch.setattr(torch.Tensor, "sqrt_", sqrt_)
    monkeypatch.setattr(torch, "sqrt", sqrt)
    assert not any(op == "sqrt" for op, _ in arith.probe())
    with arith.replay():
        assert torch.Tensor.sqrt is sqrt and torch.sqrt is sqrt


RMSPROP = ["RMSprop", {"centered": True, "momentum": 0.9}]
ADAM = ["Adam", {"amsgrad": False, "decoupled_weight_decay": False}]


def _mutants(mutation, cases, tmp_path):
    # a private numba cache: a mutated kernel has the same cache key as the real one
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    out = subprocess.run([sys.executable, os.path.join(HELPERS, "mutants.py"), mutation,
                          "exact,off", json.dumps(cases), "float32"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.parametrize("mutation", ["none", "sqrt", "fma"])
def test_parity_check_catches_a_1ulp_error_in_our_kernels(mutation, tmp_path):
    """Our kernels' sqrt 1 ulp high on ~20 % of elements, or their multiply-adds rounded
    twice: the parity check fails, on a machine whose torch sqrt is correctly rounded and
    on one where it is 1 ulp off on a random 20 %; unmutated, it passes on both."""
    results = _mutants(mutation, [RMSPROP, ADAM] if mutation == "none" else [RMSPROP], tmp_path)
    assert [r["torch_sqrt"] for r in results][::len(results) // 2] == ["exact", "off"]
    for r in results:
        off = any("sqrt (float32)" in line for line in r["torch_ops_off"])
        assert off == (r["torch_sqrt"] == "off")
        if mutation == "none":
            assert r["ok"], r["failures"]
            assert r["ulp_vs_torch"] == 0  # torch's op order, correctly rounded: bit for bit
        else:
            assert not r["ok"] and r["ulp_vs_torch"] > 64, r


# optimizers whose rules together use every kind of op torch may round differently (sqrt,
# division, multiply-adds, max, lerp's two branches, decoupled decay): the fewer, the less
# CI time the generic-CPU subprocess spends compiling kernels afresh (~18 s each)
SUBSET = ["adam", "adamw", "adamax", "rmsprop"]
DISPATCH = {"aten-default+numba-generic": dict(ATEN_CPU_CAPABILITY="default", NUMBA_CPU_NAME="generic"),
            "aten-avx2": dict(ATEN_CPU_CAPABILITY="avx2")}


@pytest.mark.parametrize("setting", list(DISPATCH))
def test_parity_subset_under_other_dispatch(setting, tmp_path):
    """torch without its vector kernels (its multiply-adds then round twice) and numba
    compiling for a generic CPU, or torch's AVX2 kernels: the flag-richest case of every
    optimizer, float32 and float64, still passes (the machine's own setting runs the whole
    matrix in test_parity.py).  On a CPU without AVX2 torch falls back by itself."""
    env = dict(os.environ, **DISPATCH[setting])
    if "NUMBA_CPU_NAME" in DISPATCH[setting]:  # kernels compiled for another CPU: a cache apart
        env["NUMBA_CACHE_DIR"] = str(tmp_path / "numba")
    out = subprocess.run([sys.executable, "-m", "fusedopt", "parity", "--quick", "--backends",
                          "numba", "--dtypes", "float32,float64", "--steps", "20",
                          "--optim", ",".join(SUBSET)],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    # --quick: one case of each optimizer, float32 and float64
    n = 2 * len(SUBSET)
    assert f"{n}/{n} cases pass" in out.stdout, out.stdout[-2000:]
    assert "torch's" in out.stdout.split("cases pass")[1]  # the lines on torch's own ops
