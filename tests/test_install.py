"""A CPU install has no triton (pyproject.toml declares it only for the GPU and the tests):
the CPU path must import, step, clip and run the CLI without it, and the Triton engine must
say what to install.  Each check runs in a fresh interpreter where ``import triton`` raises
ModuleNotFoundError, as on a machine without it."""
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# installed before fusedopt is imported: any import of triton (or a submodule) fails there
NO_TRITON = """
import sys
class _NoTriton:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] == "triton":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, _NoTriton())
"""

STEPS = """
import torch
import fusedopt

def params(seed):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(7,), (33, 5), (1,), (4, 3, 2)]]
    return ps, [torch.randn(p.shape, generator=g) for p in ps]

cases = [("AdamW", dict(lr=1e-2, weight_decay=0.1)), ("SGD", dict(lr=1e-2, momentum=0.9)),
         ("Adafactor", dict(lr=1e-2))]
for name, hp in cases:
    ours, grads = params(0)
    theirs, _ = params(0)
    a = getattr(fusedopt, name)(ours, **hp)
    b = getattr(torch.optim, name)(theirs, **hp, foreach=False)
    for step in range(3):
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g * (step + 1), g * (step + 1)
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)

ours, grads = params(1)
theirs, _ = params(1)
for p, q, g in zip(ours, theirs, grads):
    p.grad, q.grad = g.clone(), g.clone()
norm = fusedopt.clip_grad_norm_(ours, 0.5)
torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(theirs, 0.5, foreach=False))
for p, q in zip(ours, theirs):
    torch.testing.assert_close(p.grad, q.grad)

try:
    fusedopt.AdamW(ours, backend="triton").step()
except ModuleNotFoundError as e:
    assert "pip install 'fusedopt[gpu]'" in str(e) and "triton" in str(e), e
else:
    raise AssertionError("backend='triton' ran without triton")
loaded = [m for m in sys.modules if m.partition(".")[0] == "triton"]
assert not loaded, loaded
print("ok")
"""

CLI = """
from fusedopt.cli import main
assert main(["parity", "--quick", "--optim", "sgd", "--dtypes", "float32", "--steps", "2"]) == 0
assert main(["bench", "--quick", "--optim", "adam", "--sizes", "300x7,100,5", "--repeats", "1"]) == 0
print("ok")
"""


def run_without_triton(code):
    # TRITON_INTERPRET=1: backend="triton" on CPU tensors then gets as far as importing
    # triton (without it, it refuses CPU tensors before that); the CPU path ignores it
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", NO_TRITON + code], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
    return r


def test_cpu_path_without_triton():
    run_without_triton(STEPS)


def test_cli_without_triton():
    r = run_without_triton(CLI)
    assert "triton is not installed: the Triton engine's rows are skipped" in r.stderr
    assert "engines: numba" in r.stdout and "fusedopt" in r.stdout


def test_triton_is_not_a_dependency_of_a_cpu_install():
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def reqs(specs):
        return {r.name: r for r in map(Requirement, specs)}

    base, extras = reqs(project["dependencies"]), project["optional-dependencies"]
    assert {"torch", "numba", "numpy", "ninja"} <= set(base)
    for system, machine in [("Linux", "x86_64"), ("Linux", "aarch64"), ("Darwin", "arm64"),
                            ("Windows", "AMD64")]:
        where = dict(platform_system=system, platform_machine=machine,
                     sys_platform={"Linux": "linux", "Darwin": "darwin"}.get(system, "win32"))
        t = base.get("triton")
        assert t is None or (t.marker is not None and not t.marker.evaluate(where)), \
            f"a CPU install on {system} {machine} would pull triton: {t}"
    for extra in ("test", "gpu"):  # the tests run the Triton engine in its interpreter
        t = reqs(extras[extra]).get("triton")
        assert t is not None, f"fusedopt[{extra}] lacks triton"
        assert t.marker is None or t.marker.evaluate(
            dict(platform_system="Linux", platform_machine="x86_64", sys_platform="linux"))
