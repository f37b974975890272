"""Triton's interpreter's arithmetic on this install: measured, and replayed correctly rounded.

On a GPU the Triton engine's ``tl.fma``, ``tl.div_rn`` and ``tl.sqrt_rn`` compile to
correctly rounded instructions (PTX ``fma.rn``, ``div.rn``, ``sqrt.rn``; float64 ``/`` and
``sqrt`` likewise).  On CPU the same kernels run in Triton's interpreter, which evaluates
each op with numpy, and its arithmetic differs between triton versions as torch's CPU
arithmetic differs between CPUs (fusedopt/arith.py): triton 3.8's interpreter computes
``tl.fma`` as ``x * y + z``, rounded twice (``triton/runtime/interpreter.py``,
``InterpreterBuilder.create_fma``: ``return TensorHandle(x.data * y.data + z.data,
z.dtype.scalar)``), so ~23 % of float32 and ~22 % of float64 results are 1 ulp off the
fused result, where an update cancels most of a param thousands of ulp of the param;
triton 3.9 rounds once (``_interpreter.fma_fp32`` / ``fma_fp64``).  That is the
interpreter's error, not the engine's: a test that compared the interpreted engine as is
would encode one triton version's interpreter.

So ``probe()`` measures, per op and dtype, how often the interpreter's result differs from
the correctly rounded one, and ``replay()`` runs the interpreter with exactly those ops
replaced by correctly rounded ones (an exact fma: ``arith.fma``; numpy's IEEE division and
square root): where the interpreter is right it changes nothing.  The engine launches its
kernels within ``replay()`` when it runs in the interpreter, so the interpreted engine
computes what the compiled one computes on every triton version fusedopt admits.  Only
the builder's methods change, for the launch's duration: the rules' own arithmetic (and
any error in it) is untouched.
"""
import contextlib

import numpy as np
import torch

from . import import_triton

# op -> (the interpreter builder's methods that compute it, the float dtypes probed)
METHODS = {"fma": ("create_fma",), "div": ("create_precise_divf", "create_fdiv"),
           "sqrt": ("create_precise_sqrt", "create_sqrt")}
_cache = {}


def _builder():
    from triton.runtime import interpreter
    return interpreter.InterpreterBuilder, interpreter.TensorHandle


def _exact(op, args):
    """The correctly rounded result of ``op`` on numpy arrays of one float dtype."""
    if op == "fma":
        from ..arith import fma
        a, b, c = (torch.from_numpy(np.array(x, copy=True)) for x in np.broadcast_arrays(*args))
        return fma(a, b, c).numpy()
    if op == "div":
        return np.divide(*args)
    return np.sqrt(*args)


def _kernel():
    triton = import_triton()
    tl = triton.language

    @triton.jit
    def probe_kernel(A, B, C, FMA, DIV, SQRT, N: tl.constexpr):
        i = tl.arange(0, N)
        a, b, c = tl.load(A + i), tl.load(B + i), tl.load(C + i)
        tl.store(FMA + i, tl.fma(a, b, c))
        if a.dtype == tl.float64:
            tl.store(DIV + i, a / tl.abs(c))
            tl.store(SQRT + i, tl.sqrt(tl.abs(a)))
        else:
            tl.store(DIV + i, tl.div_rn(a, tl.abs(c)))
            tl.store(SQRT + i, tl.sqrt_rn(tl.abs(a)))
    return probe_kernel


def probe():
    """{(op, dtype name): (fraction of elements off, largest difference in ulp)} for each
    of fma, div(_rn) and sqrt(_rn) where this interpreter is not correctly rounded; {}
    where it is.  Runs a kernel in the interpreter: call it only where the engine runs
    interpreted (TRITON_INTERPRET=1).  Measured once per set of builder methods (a
    monkeypatched method is measured anew)."""
    builder, _ = _builder()
    key = tuple(getattr(builder, m) for ms in METHODS.values() for m in ms)
    if key not in _cache:
        found, kernel, n = {}, _kernel(), 4096
        for dtype in (torch.float32, torch.float64):
            gen = torch.Generator().manual_seed(11)
            a, b, c = (torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
                       for _ in range(3))
            c = c + torch.where(c < 0, -0.5, 0.5).to(dtype)  # (|c| >= 0.5: a divisor)
            outs = {op: torch.empty_like(a) for op in METHODS}
            kernel[(1,)](a, b, c, outs["fma"], outs["div"], outs["sqrt"], N=n)
            want = {"fma": _exact("fma", (a.numpy(), b.numpy(), c.numpy())),
                    "div": _exact("div", (a.numpy(), np.abs(c.numpy()))),
                    "sqrt": _exact("sqrt", (np.abs(a.numpy()),))}
            for op, got in outs.items():
                ours = torch.from_numpy(want[op])
                off = got != ours
                if off.any():
                    ulp = torch.nextafter(ours.abs(), torch.full_like(ours, np.inf)) - ours.abs()
                    found[(op, str(dtype)[6:])] = (off.double().mean().item(),
                                                   ((got - ours).abs() / ulp).max().item())
        _cache[key] = found
    return _cache[key]


def describe(found=None):
    """One line per op found off, for people comparing numbers: which side is off."""
    found = probe() if found is None else found
    version = import_triton().__version__
    return [f"triton {version}'s interpreter computes tl.{op} ({dt}) not correctly rounded: "
            f"{frac:.1%} of elements differ, by up to {ulps:.0f} ulp (compiled Triton rounds "
            f"once); the Triton engine runs there with a correctly rounded {op}"
            for (op, dt), (frac, ulps) in found.items()]


@contextlib.contextmanager
def replay():
    """Within: the interpreter's ops that probe() found off compute correctly rounded
    results (in the dtypes found off; other dtypes keep the interpreter's own)."""
    found = probe()
    builder, handle = _builder()
    saved = []
    for op in METHODS:
        dtypes = {np.dtype(dt) for o, dt in found if o == op}
        for meth in METHODS[op] if dtypes else ():
            orig = builder.__dict__.get(meth, getattr(builder, meth))
            saved.append((meth, orig))
            setattr(builder, meth, _replaced(orig, op, dtypes, handle))
    try:
        yield found
    finally:
        for meth, orig in reversed(saved):
            setattr(builder, meth, orig)


def _replaced(orig, op, dtypes, handle):
    def method(self, *args):
        data = [a.data for a in args]
        if data[-1].dtype not in dtypes or any(d.dtype != data[-1].dtype for d in data):
            return orig(self, *args)
        return handle(np.asarray(_exact(op, data), dtype=data[-1].dtype), args[-1].dtype.scalar)
    return method
