"""Lion (not in torch) against the lion-pytorch package on the same data: its
one-tensor-at-a-time step is the algorithm's public implementation, and its op order is
the one fusedopt.lion.LionForLoop (the parity tests' anchor for Lion) and the rule follow."""
import pytest
import torch

import fusedopt
from fusedopt import parity
from harness import BACKENDS, max_ulp
from twins import train

lion_pytorch = pytest.importorskip("lion_pytorch", reason="lion-pytorch (a test extra) is not installed")

SHAPES = [(0,), (1,), (7,), (33, 17), (2, 3, 4), (65537,)]




@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hp", [dict(lr=1e-3), dict(lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1)],
                         ids=["default", "weight_decay"])
def test_lion_steps_as_lion_pytorch(backend, dtype, hp):
    theirs, init = train(lion_pytorch.Lion, dtype, hp, SHAPES)[:2]
    ours, _ = train(fusedopt.Lion, dtype, hp, SHAPES, backend=backend)[:2]
    loop, _ = train(fusedopt.lion.LionForLoop, dtype, hp, SHAPES)[:2]
    assert max_ulp(loop, theirs) == 0  # the twin is lion-pytorch's arithmetic
    # each param moved by about lr per step: the unit is an ulp of the param or the update
    assert max_ulp(ours, theirs, init, floor=hp["lr"]) <= 2
    assert any(not torch.equal(a, b) for a, b in zip(ours, init) if a.numel())


def test_lion_with_maximize_is_lion_on_the_negated_gradient():
    hp = dict(lr=1e-3, weight_decay=0.1)
    params, grads = parity.make_data(5, torch.float64, 5, SHAPES)
    a = [torch.nn.Parameter(p.clone()) for p in params]
    b = [torch.nn.Parameter(p.clone()) for p in params]
    ours, theirs = fusedopt.Lion(a, maximize=True, **hp), lion_pytorch.Lion(b, **hp)
    for gs in grads:
        for p, q, g in zip(a, b, gs):
            p.grad, q.grad = g.clone(), -g
        ours.step()
        theirs.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))
