"""First use: the line on stderr while a compile runs long (fusedopt/notice.py), silence
while it is quick, `fusedopt warmup`, and the host helper's direct load (no cpp_extension,
so no "No CUDA runtime is found" from a CUDA build of torch on a CPU machine)."""
import os
import subprocess
import sys
import time
import types

import pytest
import torch

from fusedopt import host, notice
from fusedopt.cli import main


@pytest.fixture
def quick(monkeypatch):
    """A threshold of 50 ms: "slow" work sleeps a few tenths of a second, not seconds."""
    monkeypatch.setattr(notice, "AFTER", 0.05)
    monkeypatch.delenv("FUSEDOPT_QUIET", raising=False)


def test_slow_work_is_announced_and_timed(quick, capsys):
    with notice.slow("building the thing"):
        time.sleep(0.3)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert err[0].startswith("fusedopt: building the thing (first use") and "fusedopt warmup" in err[0]
    assert err[1].startswith("fusedopt: building the thing: done in ")


def test_quick_work_prints_nothing(quick, capsys):
    with notice.slow("building the thing"):
        time.sleep(0.01)
    time.sleep(0.15)  # past the threshold: the timer was cancelled, not just late
    assert capsys.readouterr().err == ""


def test_quiet_prints_nothing(quick, capsys, monkeypatch):
    monkeypatch.setenv("FUSEDOPT_QUIET", "1")
    with notice.slow("building the thing"):
        time.sleep(0.2)
    assert capsys.readouterr().err == ""


def test_a_burst_of_short_compiles_is_one_notice(quick, capsys):
    """Each compile below the threshold, together above it: one line, one time."""
    n = notice.Notice(gap=0.2)
    for _ in range(4):
        n.start("compiling the CPU kernels for X")
        time.sleep(0.03)
        n.end()
        time.sleep(0.01)
    n.flush()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2, err
    assert "compiling the CPU kernels for X (first use" in err[0] and "done in" in err[1]
    assert n.count == 4


class _Stepping(torch.optim.Optimizer):
    """An optimizer whose step "compiles" a kernel of fusedopt's for ``seconds``."""

    def __init__(self, seconds):
        super().__init__([torch.zeros(1, requires_grad=True)], {})
        self.seconds = seconds

    def step(self, closure=None):
        from numba.core import event
        kernel = types.SimpleNamespace(py_func=types.SimpleNamespace(
            __module__="fusedopt.kernels.numba_engine", __qualname__="kernel_adam_1f"))
        with event.trigger_event("numba:compile", data=dict(dispatcher=kernel, args=(),
                                                            return_type=None)):
            time.sleep(self.seconds)


@pytest.mark.parametrize("seconds", [0.3, 0.0])
def test_numba_compile_in_a_step_is_announced_when_slow(quick, capsys, seconds):
    notice.install()  # (done by `import fusedopt`)
    before = notice.COMPILES.count
    _Stepping(seconds).step()
    notice.COMPILES.flush()
    err = capsys.readouterr().err
    assert notice.COMPILES.count == before + 1
    if seconds:
        assert "fusedopt: compiling the CPU kernels for _Stepping (first use" in err, err
        assert "done in" in err
    else:
        assert err == ""


def test_warmup_one_optimizer(capsys):
    assert main(["warmup", "--optim", "sgd"]) == 0
    out = capsys.readouterr().out
    assert "sgd float32" in out and "warmup took" in out
    if os.environ.get("FUSEDOPT_HOST") != "python":
        assert "host helper" in out and "ready" in out
    assert main(["warmup", "--optim", "nosuch"]) == 2


def _run(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, **env), timeout=300)


def test_built_helper_loads_without_cpp_extension(monkeypatch):
    monkeypatch.delenv("FUSEDOPT_HOST", raising=False)
    monkeypatch.setattr(host, "_native", None)
    assert host.native() is not None  # built (or found) here first
    out = _run("import sys, fusedopt; from fusedopt import host;"
               "print(host.native() is not None, 'torch.utils.cpp_extension' in sys.modules)",
               FUSEDOPT_HOST="")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"], out.stdout


NO_CUDA = """
import os, torch
torch.cuda._is_compiled = lambda: True  # as a CUDA build of torch, on a machine without a GPU
torch.version.cuda = "12.4"
torch.cuda.is_available = lambda: False
{}
"""


def test_cuda_runtime_notice_silenced(tmp_path):
    env = dict(CUDA_HOME=str(tmp_path))
    plain = _run(NO_CUDA.format("from torch.utils import cpp_extension"), **env)
    assert "No CUDA runtime is found" in plain.stderr  # what the simulation shows unsilenced
    ours = _run(NO_CUDA.format("from fusedopt import host; host._cpp_extension()"), **env)
    assert ours.returncode == 0, ours.stderr
    assert "No CUDA runtime" not in ours.stderr, ours.stderr


def test_direct_load_only_of_a_finished_build(tmp_path):
    """The shortcut takes the library only while it is the file the last finished build
    stamped: no stamp (a build under way or failed) or another file (rebuilt since) goes
    through cpp_extension.load and its lock."""
    lib = tmp_path / host.LIB
    lib.write_bytes(b"not a library")
    assert host._load_built(str(tmp_path)) is None
    (tmp_path / host.READY).write_text("1 2")
    assert host._load_built(str(tmp_path)) is None
