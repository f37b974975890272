"""Host work per step is constant in the number of tensors: a steady-state step
dispatches the same small number of torch ops for 3 tensors as for 300 (the coefficients
are Python floats passed to the kernel as scalars, not a table written per step), on
both engines (Triton through its interpreter on CPU tensors)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fusedopt
from fusedopt.kernels import triton_engine, triton_matrix
from fusedopt.spec import ready  # (schedule-free steps in train mode only)
from harness import HP, NAMES


class _Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _Launches:
    """triton_engine.build's kernels, each launch counted, not run: the host's ops are
    what is counted (Triton's interpreter would add torch ops of its own, a copy of every
    argument, which a GPU launch does not make; and it runs 300 programs one by one in
    Python, minutes of CI for these tests).  What the kernels compute is tested elsewhere."""

    def __init__(self, build):
        self.build, self.count = build, 0

    def __call__(self, *args, **kwargs):
        self.build(*args, **kwargs)  # built as a launch would, never run
        outer = self

        class Launcher:
            def __getitem__(self, grid):
                def launch(*a, **k):
                    outer.count += 1
                return launch
        return Launcher()


def _ops_per_step(name, backend, n, monkeypatch):
    launches = _Launches(triton_engine.build)
    monkeypatch.setattr(triton_engine, "build", launches)
    matrix = _Launches(triton_matrix.build_matrix)  # Adafactor's kernel
    monkeypatch.setattr(triton_matrix, "build_matrix", matrix)
    params = [torch.nn.Parameter(torch.randn(7)) for _ in range(n)]
    opt = ready(getattr(fusedopt, name)(params, backend=backend, **HP[name]))
    for _ in range(3):  # the plan built, the first steps' special cases over
        for p in params:
            p.grad = torch.randn(7)
        opt.step()
    launches.count = matrix.count = 0
    with _Count() as count:
        opt.step()
    assert len(opt._plans) == 1
    # one launch per bucket (Adafactor: one per pass)
    assert launches.count + matrix.count == (backend == "triton") * (3 if name == "Adafactor" else 1)
    return count.ops


@pytest.mark.parametrize("backend", ["numba", "triton"])
@pytest.mark.parametrize("name", NAMES)
def test_ops_per_step_do_not_grow_with_the_tensor_count(name, backend, monkeypatch):
    few = _ops_per_step(name, backend, 3, monkeypatch)
    many = _ops_per_step(name, backend, 300, monkeypatch)
    assert few == many
    # torch ops on Adafactor's row and column factors, on a trust ratio's per-tensor sums
    # (Spec.trust: a few on one vector per bucket): as many for 3 tensors as for 300
    if name == "Adafactor" or fusedopt.spec.spec(name).trust:
        return
    # the step counters' increment (and one op per other scalar of the state: NAdam's
    # mu_product multiplied, ASGD's eta and mu filled), nothing per coefficient (no table
    # fill or copy); torch.optim's step wrapper adds its profiler record_function enter and exit
    ops = [op for op in many if not op.startswith("profiler.")]
    assert ops[0] == "aten.add_.Tensor" and len(ops) == 1 + len(getattr(fusedopt, name)._scalars)
    assert set(ops[1:]) <= {"aten.mul_.Tensor", "aten.fill_.Scalar"}, ops
