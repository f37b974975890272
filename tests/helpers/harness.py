"""The tests use the package's parity harness (fusedopt.parity), the one `fusedopt parity` runs."""
import torch

import fusedopt  # noqa: F401  (defining the classes registers their specs)
from fusedopt import spec
from fusedopt.parity import (BACKENDS, DTYPES, SHAPES, errors, initial, max_ulp,  # noqa: F401
                             run)

# every algorithm, and one flag-rich hyperparameter set each: their specs (fusedopt/spec.py)
# (an algorithm of 2-D params alone, Spec.stacked, is left to its own tests: the shared
# ones step params of every shape)
NAMES = [n for n in spec.names() if not spec.spec(n).stacked]
HP = {name: spec.spec(name).test_hp for name in NAMES}


def mse_losses(model, opt, x, y, steps):
    """The loss of each of ``steps`` training steps of ``opt`` on ``model`` (mean squared
    error of model(x) against y), as a tensor."""
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return torch.tensor(losses)


# -- coded state (test_8bit, test_4bit): params, gradients, a few steps
def coded_params(seed, shapes):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


def random_grads(ps, gen):
    for p in ps:
        p.grad = torch.randn(p.shape, generator=gen)


def coded_trained(name, state_dtype, shapes, backend="numba", steps=4):
    """``steps`` steps of class ``name`` (its HP) with ``state_dtype`` on fresh params:
    (params, optimizer, the grads' generator, to go on with)."""
    ps = coded_params(0, shapes)
    opt = getattr(fusedopt, name)(ps, **HP[name], state_dtype=state_dtype, backend=backend)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        random_grads(ps, gen)
        opt.step()
    return ps, opt, gen
