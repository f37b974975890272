"""Adagrad: torch.optim.Adagrad with a fused multi-tensor step.

Sparse gradients (``nn.Embedding(sparse=True)``) are handed to torch's own Adagrad
(``torch.optim.adagrad.adagrad``) for those params: the update touches only the rows
present, which a dense kernel cannot do cheaply, and this gives exactly torch's result.
"""
import torch
from torch.optim.adagrad import adagrad as torch_adagrad

from .bucket import scalar_dtype
from . import reference
from .optimizer import FusedOptimizer
from .options import signature_with
from .spec import Spec


class Adagrad(FusedOptimizer, torch.optim.Adagrad):
    """Drop-in for ``torch.optim.Adagrad`` (sparse gradients go to torch's own Adagrad): the
    same constructor, defaults, errors and ``state_dict``, with one fused multi-tensor step
    per (device, dtype) group (Numba on CPU, Triton on CUDA). Extra keyword-only arguments:
    ``backend``, ``l1``, ``max_grad_norm``, ``state_dtype`` (``torch.float32``, or
    ``torch.uint8`` for 8-bit or ``torch.uint4`` for 4-bit state), ``master_weights``, ``stochastic_rounding``, ``kahan_sum``,
    ``flat``, ``gradient_release``; each is described on the Options page of the documentation
    (``docs/options.md``)."""
    _rule = "adagrad"

    def _slots(self, group):
        return ("sum", None, None)

    def _init_state(self, group, p, state):
        state["step"] = torch.tensor(0.0, dtype=scalar_dtype())
        init = group["initial_accumulator_value"]
        state["sum"] = torch.full_like(p, complex(init, init) if p.is_complex() else init,
                                       memory_format=torch.preserve_format)

    def _coefficients(self, group, step, f64):
        clr = group["lr"] / (1 + (step - 1) * group["lr_decay"])
        return dict(clr=clr, eps=group["eps"], wd=group["weight_decay"], l1=group["l1"])

    def _sparse_step(self, group, params):
        if group["l1"]:
            raise RuntimeError("l1 is not supported with sparse gradients")
        states = []
        for p in params:
            if len(self.state[p]) == 0:
                self._init_state(group, p, self.state[p])
            states.append(self.state[p])
        torch_adagrad(params, [p.grad for p in params], [s["sum"] for s in states],
                      [s["step"] for s in states], lr=group["lr"], weight_decay=group["weight_decay"],
                      lr_decay=group["lr_decay"], eps=group["eps"], has_sparse_grad=True,
                      foreach=False, maximize=group["maximize"], differentiable=False,
                      has_complex=False)

    spec = Spec(reference=reference.adagrad, source="torch.optim.Adagrad",
                cases=tuple(dict(lr_decay=d, initial_accumulator_value=a)
                            for d in (0, 0.01) for a in (0, 0.1)),
                group_hp=(dict(lr=1e-2), dict(lr=3e-2, eps=1e-6), dict(lr=2e-3), dict(lr=5e-2)),
                torch_fused=True, test_hp=dict(lr=1e-2, lr_decay=0.01),
                program_hp=dict(lr=1e-2), unsigned=frozenset({"sum"}),
                bench_hp=dict(lr=1e-3), traffic=(3, 2),
                aot=(dict(L1=True), 1))


Adagrad.__signature__ = signature_with(torch.optim.Adagrad)
