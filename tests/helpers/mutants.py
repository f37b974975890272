"""Mutation runs for the parity criteria (run by test_arith.py in a subprocess, with a
private NUMBA_CACHE_DIR, since a mutated kernel must never reach the shared cache).

    python tests/mutants.py MUTATION TORCH_SQRT[,TORCH_SQRT...] CASES_JSON DTYPE [BACKENDS [INTERP,...]]

MUTATION: "none", "sqrt" (our kernels' sqrt 1 ulp high on ~20 % of elements), "fma"
(our kernels' fused multiply-adds rounded twice, an extra rounding) or "triton-fma" (the
Triton engine's fused multiply-adds 1 ulp off on ~20 % of elements).
TORCH_SQRT: "native" (this machine's torch), "exact" (torch's sqrt made correctly
rounded: a machine like an Intel Xeon) or "off" (torch's sqrt 1 ulp high on a random
~20 % of elements: a machine like an AMD EPYC).
BACKENDS: the engines to check (default "numba"); INTERP (Triton's interpreter, with
TRITON_INTERPRET=1): "native" (this install's) or "fma-twice" (tl.fma rounded twice, as
triton 3.8's interpreter computes it).
Prints the parity results (fusedopt.parity.check) as JSON lines.
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


def _triton_fma_off(a, b, c):
    # (module level, no closure: the engine binds its own globals, ``tl`` among them)
    r = tl.fma(a, b, c)  # noqa: F821
    bits = r.to(tl.int64 if r.dtype == tl.float64 else tl.int32, bitcast=True)  # noqa: F821
    hit = (bits % 5 == 0) & (r - r == 0)  # ~20 % of finite elements, by value
    return tl.where(hit, (bits + 1).to(r.dtype, bitcast=True), r)  # noqa: F821 (1 ulp from 0)


def mutate(kind):
    from fusedopt.kernels import numba_ops
    if kind == "sqrt":
        numba_ops.sqrt = _sqrt_high()
    elif kind == "fma":
        numba_ops.fma = _fma_twice()
    elif kind == "triton-fma":
        from fusedopt.kernels import triton_ops
        triton_ops.fma = _triton_fma_off


def interpreter_fma(kind):
    """The interpreter's fma method as INTERP says (None: this install's own)."""
    if kind == "native":
        return None
    from triton.runtime.interpreter import TensorHandle

    def create_fma(self, x, y, z):  # triton 3.8's runtime/interpreter.py, line 664
        return TensorHandle(x.data * y.data + z.data, z.dtype.scalar)
    return create_fma


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


def main(mutation, sqrt_kinds, cases, dtype, backends="numba", interp_kinds="native"):
    """One line of JSON per torch sqrt kind, interpreter kind and case (a list of [name, case])."""
    mutate(mutation)
    from fusedopt import arith, parity
    native = torch.Tensor.sqrt, torch.Tensor.sqrt_, torch.sqrt
    if "triton" in backends:
        from triton.runtime.interpreter import InterpreterBuilder
        from fusedopt.kernels import triton_interp
        own_fma = InterpreterBuilder.create_fma
    for kind in sqrt_kinds.split(","):
        torch.Tensor.sqrt, torch.Tensor.sqrt_, torch.sqrt = native
        install(torch_sqrt(kind))
        for interp in interp_kinds.split(","):
            interp_off = []
            if "triton" in backends:
                InterpreterBuilder.create_fma = interpreter_fma(interp) or own_fma
                interp_off = triton_interp.describe()
            for name, case in json.loads(cases):
                r = parity.check(name, case, getattr(torch, dtype), backends=backends.split(","))
                r.update(torch_sqrt=kind, torch_ops_off=arith.describe(), interp=interp,
                         interp_ops_off=interp_off)
                print(json.dumps(r, default=str), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
