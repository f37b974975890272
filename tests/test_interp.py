"""Parity that holds on every triton fusedopt admits (kernels/triton_interp.py): the
interpreter's ops are measured and, where they are not correctly rounded (triton 3.8's
tl.fma rounds twice), replayed correctly rounded during the engine's launches; the parity
check still fails on a real 1-ulp error in the Triton engine, whether this install's
interpreter rounds its fma once or twice (simulated both ways); and the installed torch
and triton are within the ranges pyproject.toml declares."""
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from fusedopt import versions
from fusedopt.kernels import triton_installed

pytestmark = pytest.mark.skipif(not triton_installed(), reason="triton is not installed")
HERE = os.path.dirname(__file__)


def _fma_twice(self, x, y, z):  # triton 3.8's InterpreterBuilder.create_fma
    from triton.runtime.interpreter import TensorHandle
    return TensorHandle(x.data * y.data + z.data, z.dtype.scalar)


def test_probe_finds_and_replay_corrects_an_fma_rounded_twice(monkeypatch):
    """The interpreter's fma rounded twice (triton 3.8's): the probe says so, and within
    replay() tl.fma is correctly rounded again; outside, the interpreter's own."""
    from triton.runtime.interpreter import InterpreterBuilder
    from fusedopt import arith
    from fusedopt.kernels import triton_interp
    monkeypatch.setattr(InterpreterBuilder, "create_fma", _fma_twice)
    found = triton_interp.probe()
    assert set(found) == {("fma", "float32"), ("fma", "float64")}, found
    assert all(0.1 < frac < 0.35 for frac, _ in found.values())
    assert "tl.fma (float32)" in triton_interp.describe()[0]
    kernel = triton_interp._kernel()
    gen = torch.Generator().manual_seed(5)
    for dtype in (torch.float32, torch.float64):
        a, b, c = (torch.randn(1024, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
        outs = [torch.empty_like(a) for _ in range(3)]
        with triton_interp.replay():
            kernel[(1,)](a, b, c, *outs, N=1024)
        assert torch.equal(outs[0], arith.fma(a, b, c))
        kernel[(1,)](a, b, c, *outs, N=1024)
        assert not torch.equal(outs[0], arith.fma(a, b, c))
    assert InterpreterBuilder.create_fma is _fma_twice


def test_replay_keeps_ops_that_are_correctly_rounded(monkeypatch):
    """An interpreter whose fma rounds once (triton 3.9's; simulated, so that this holds
    on 3.8 too): the probe finds nothing wrong and replay() leaves its fma in place."""
    from triton.runtime.interpreter import InterpreterBuilder, TensorHandle
    from fusedopt import arith
    from fusedopt.kernels import triton_interp

    def fma_once(self, x, y, z):
        return TensorHandle(triton_interp._exact("fma", (x.data, y.data, z.data)), z.dtype.scalar)
    monkeypatch.setattr(InterpreterBuilder, "create_fma", fma_once)
    assert not any(op == "fma" for op, _ in triton_interp.probe())
    with triton_interp.replay():
        assert InterpreterBuilder.create_fma is fma_once


SGD = ["SGD", {"momentum": 0}]


def _mutants(mutation):
    # (the shared numba cache: these mutations leave the Numba engine's kernels as they are)
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, os.path.join(HERE, "helpers", "mutants.py"), mutation,
                          "native", json.dumps([SGD]), "float32", "numba,triton",
                          "native,fma-twice"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return [json.loads(line) for line in out.stdout.splitlines()]


@pytest.mark.parametrize("mutation", ["none", "triton-fma"])
def test_parity_check_catches_a_1ulp_error_in_the_triton_engine(mutation):
    """The Triton engine's multiply-adds 1 ulp off on ~20 % of elements: the parity check
    fails, under this install's interpreter and under one whose fma rounds twice (triton
    3.8's, replayed); unmutated, SGD -- the issue's case -- passes under both."""
    results = _mutants(mutation)
    assert [r["interp"] for r in results] == ["native", "fma-twice"]
    assert any("tl.fma (float32)" in line for line in results[1]["interp_ops_off"])
    for r in results:
        if mutation == "none":
            assert r["ok"], r["failures"]
            assert r["ulp_between_engines"] == 0 and r["ulp_vs_torch"] == 0
        else:
            assert not r["ok"] and r["ulp_between_engines"] > 2, r


def _bounds(req):
    """(lower, upper) of a requirement 'name>=a,<b' (an environment marker ignored)."""
    lo, hi = re.search(r">=([\d.]+),<([\d.]+)", req).groups()
    return lo, hi


def test_pyproject_bounds_name_the_tested_ranges():
    """pyproject's torch and triton bounds are versions.TESTED's (the pairs CI runs), and
    the torch and triton installed here lie within them."""
    tomllib = pytest.importorskip("tomllib")
    with open(os.path.join(HERE, "..", "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["gpu"] \
        + project["optional-dependencies"]["test"]
    for name in ("torch", "triton"):
        found = {_bounds(r) for r in reqs if re.match(rf"{name}(?![-\w])", r)}  # (not torch-optimi)
        assert found == {versions.bounds(name)}, (name, found)
    assert versions.untested() == []
    assert versions.untested({"torch": "2.15.0", "triton": "3.8.0"}) == ["torch 2.15.0"]
