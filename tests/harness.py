"""The tests use the package's parity harness (fusedopt.parity), the one `fusedopt parity` runs."""
import torch

from fusedopt.parity import (BACKENDS, DTYPES, SHAPES, errors, initial, max_ulp,  # noqa: F401
                             run)

NAMES = ["Adam", "AdamW", "Adamax", "RMSprop", "Adagrad", "SGD", "Adadelta", "Rprop", "RAdam",
         "NAdam", "ASGD", "Lion", "Adafactor"]
# one flag-rich hyperparameter set per optimizer, for the tests that run them all
HP = {"Adam": dict(lr=1e-2, amsgrad=True, weight_decay=0.1), "AdamW": dict(lr=1e-2),
      "Adamax": dict(lr=1e-2), "RMSprop": dict(lr=1e-3, momentum=0.9, centered=True),
      "Adagrad": dict(lr=1e-2, lr_decay=0.01), "SGD": dict(lr=1e-2, momentum=0.9, nesterov=True),
      "Adadelta": dict(lr=1.0, rho=0.8, weight_decay=0.05),
      "Rprop": dict(lr=1e-2, etas=(0.4, 1.3)),
      "RAdam": dict(lr=2e-3, betas=(0.8, 0.95), decoupled_weight_decay=True, weight_decay=0.1),
      "NAdam": dict(lr=2e-3, momentum_decay=0.01, weight_decay=0.05),
      "ASGD": dict(lr=1e-2, t0=3, lambd=1e-3, weight_decay=0.05),
      "Lion": dict(lr=1e-3, betas=(0.8, 0.95), weight_decay=0.1),
      "Adafactor": dict(lr=1e-2, beta2_decay=-0.7, d=1.5, weight_decay=0.05)}


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
