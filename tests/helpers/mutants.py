"""Mutation runs for the parity criteria (run by test_arith.py in a subprocess, with a
private NUMBA_CACHE_DIR, since a mutated kernel must never reach the shared cache).

    python tests/mutants.py MUTATION TORCH_SQRT[,TORCH_SQRT...] CASES_JSON DTYPE

MUTATION: "none", "sqrt" (our kernels' sqrt 1 ulp high on ~20 % of elements) or "fma"
(our kernels' fused multiply-adds rounded twice, an extra rounding).
TORCH_SQRT: "native" (this machine's torch), "exact" (torch's sqrt made correctly
rounded: a machine like an Intel Xeon) or "off" (torch's sqrt 1 ulp high on a random
~20 % of elements: a machine like an AMD EPYC).
Prints the parity results (fusedopt.parity.check, Numba engine) as JSON lines.
"""
import json
import math
import sys

import numba
import numpy as np
import torch


def _sqrt_high():
    @numba.njit(inline="always")
    def sqrt(x):
        r = math.sqrt(x)
        if (r * 4096) % 5 < 1:  # ~20 % of elements, a function of the value
            return np.nextafter(r, r + r)
        return r
    return sqrt


def _fma_twice():
    @numba.njit(inline="always")
    def fma(a, b, c):
        return a * b + c  # numba does not contract this (no fastmath)
    return fma


def mutate(kind):
    from fusedopt.kernels import numba_ops
    if kind == "sqrt":
        numba_ops.sqrt = _sqrt_high()
    elif kind == "fma":
        numba_ops.fma = _fma_twice()


def torch_sqrt(kind):
    """torch's sqrt as TORCH_SQRT says: (function, in-place method), or None for "native"."""
    if kind == "native":
        return None
    gen = torch.Generator().manual_seed(1)

    def sqrt(x):
        r = torch.from_numpy(np.asarray(np.sqrt(x.detach().numpy())))
        if kind == "off":
            high = torch.rand(r.shape, generator=gen) < 0.2
            r = torch.where(high, torch.nextafter(r, torch.full_like(r, math.inf)), r)
        return r
    return sqrt, lambda x: x.copy_(sqrt(x))


def install(fns):
    if fns is not None:
        torch.Tensor.sqrt = torch.sqrt = fns[0]
        torch.Tensor.sqrt_ = fns[1]


def main(mutation, sqrt_kinds, cases, dtype):
    """One line of JSON per torch sqrt kind and case (a list of [name, case])."""
    mutate(mutation)
    from fusedopt import arith, parity
    native = torch.Tensor.sqrt, torch.Tensor.sqrt_, torch.sqrt
    for kind in sqrt_kinds.split(","):
        torch.Tensor.sqrt, torch.Tensor.sqrt_, torch.sqrt = native
        install(torch_sqrt(kind))
        for name, case in json.loads(cases):
            r = parity.check(name, case, getattr(torch, dtype), backends=["numba"])
            r.update(torch_sqrt=kind, torch_ops_off=arith.describe())
            print(json.dumps(r, default=str), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
