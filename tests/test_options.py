"""fusedopt's own keywords (fusedopt/options.py): each bad value refused with an error naming
it, an engine that cannot run here named with what it needs, a missing extra named."""
import os
import subprocess
import sys

import pytest
import torch

import fusedopt


def test_clear_errors_for_fusedopts_own_keywords_and_engines():
    p = [torch.nn.Parameter(torch.randn(3))]
    for kw, kind, word in [(dict(l1="x"), TypeError, "l1"), (dict(l1=-1.0), ValueError, "l1"),
                           (dict(max_grad_norm="x"), TypeError, "max_grad_norm"),
                           (dict(state_dtype=torch.int8), ValueError, "state_dtype"),
                           (dict(backend="cuda"), ValueError, "backend")]:
        with pytest.raises(kind, match=word):
            fusedopt.Adam(p, **kw)
    # the Triton engine on CPU tensors without the interpreter: in a process of its own,
    # since triton first imported without TRITON_INTERPRET stays compiled-mode for the
    # process (this one's later interpreted kernels failed after it)
    code = ("import torch, fusedopt\n"
            "p = [torch.nn.Parameter(torch.randn(3))]\n"
            "opt = fusedopt.Adam(p, backend='triton')\n"
            "p[0].grad = torch.ones(3)\n"
            "try:\n    opt.step()\nexcept RuntimeError as e:\n    print(e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "TRITON_INTERPRET=1" in out.stdout and "backend='numba'" in out.stdout


def test_bench_plot_without_matplotlib_names_the_extra(tmp_path):
    code = ("import sys; sys.modules['matplotlib'] = None; from fusedopt.cli import main; "
            f"sys.argv = ['fusedopt', 'bench', '--sizes', '10x10', '--repeats', '1', '--quick', "
            f"'--plot', r'{tmp_path / 'x.png'}']; main()")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "fusedopt[plot]" in out.stderr and "Traceback" not in out.stderr
