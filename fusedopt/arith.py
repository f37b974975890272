"""torch's own CPU arithmetic on this machine: measured, and replayed correctly rounded.

The parity anchor is torch.optim's for-loop: its op order, each op rounded once.  torch's
CPU ops do not round the same on every machine: on AMD EPYC (Zen 4) torch's float32 and
float64 ``sqrt`` are 1 ulp off in ~20 % and ~1.4 % of elements (every
ATEN_CPU_CAPABILITY alike), and with ATEN_CPU_CAPABILITY=default its multiply-adds
(addcmul, lerp, add(alpha=)) round twice where the vectorized builds round once.  Our
kernels compute each op correctly rounded (IEEE sqrt and division, fused multiply-adds)
on every CPU.  A test that compared them to this machine's torch would encode one
machine's arithmetic.

So ``probe()`` measures, per op and dtype, how often torch's result differs from the
correctly rounded one (the exact op, rounded once), and ``replay()`` runs torch.optim
with exactly those ops replaced by their correctly rounded versions: on a machine whose
torch is correctly rounded it changes nothing, and the parity bounds stay as tight as
they are there.  Correctly rounded here: numpy's sqrt (IEEE), torch's own +, *, / (IEEE),
and a fused multiply-add emulated exactly (``fma``).
"""
import contextlib
import math

import numpy as np
import torch

DTYPES = (torch.float32, torch.float64)
_SPLIT = 2.0 ** 27 + 1  # Dekker's splitter for float64


def fma(a, b, c):
    """a * b + c rounded once, elementwise (tensors of one float dtype, broadcast):
    Boldo and Melquiond's emulation ("Emulation of FMA and correctly rounded sums",
    IEEE TC 2008): the exact product as a sum of two doubles, the sum of three rounded
    to odd, then once to nearest.  float32 operands multiply exactly in float64."""
    if a.dtype != torch.float64:
        return _odd(a.double() * b.double(), c.double()).to(a.dtype)
    p = a * b
    ah, bh = _hi(a), _hi(b)
    err = ((ah * bh - p) + ah * (b - bh) + (a - ah) * bh) + (a - ah) * (b - bh)  # a*b = p + err
    high, low = _two_sum(c, p)
    return high + _odd(low, err)


def _hi(x):
    y = x * _SPLIT
    return y - (y - x)


def _two_sum(x, y):
    # x + y == s + e exactly (Knuth)
    s = x + y
    v = s - x
    return s, (x - (s - v)) + (y - v)


def _odd(x, y):
    """x + y (float64) rounded to odd: inexact results get an odd last bit, which keeps
    the sticky bit, so that one more rounding to nearest (to float32, or in a sum) is the
    correct rounding of the exact value."""
    s, e = _two_sum(x, y)
    even = (s.view(torch.int64) & 1) == 0
    return torch.where((e != 0) & even, torch.nextafter(s, e * math.inf), s)


def _like(x, v):
    # a Python or 0-d scalar as torch rounds it for x's op math (float32 unless float64)
    return torch.as_tensor(v.item() if torch.is_tensor(v) else v, dtype=x.dtype)


def sqrt(x):
    return torch.from_numpy(np.asarray(np.sqrt(x.detach().numpy())))


def addcmul(x, t1, t2, value=1):
    # torch: x + (value * t1) * t2, the product with t2 fused into the add
    return fma(t1 * _like(x, value), t2, x)


def addcdiv(x, t1, t2, value=1):
    return x + (t1 * _like(x, value)) / t2


def lerp(x, end, weight):
    # torch switches formula at |weight| = 0.5; each branch is one multiply-add
    w = _like(x, weight)
    diff = end - x
    if abs(w.item()) < 0.5:
        return fma(w.expand_as(diff), diff, x)
    return fma((w - 1).expand_as(diff), diff, end)


def add(x, other, alpha=1):
    if isinstance(other, (int, float)):
        other = _like(x, other)
    return fma(_like(x, alpha).expand_as(other), other, x)


def norm(x, p="fro", dim=None, keepdim=False):
    """The 2-norm (whole tensor, or along ``dim``) rounded once: the squares summed
    exactly (float64 squares split into two doubles, math.fsum), then the square root.
    torch's CPU norms sum in the dtype (float32: several ulp off on long vectors)."""
    d = x.detach().double()
    sq = d * d
    err = torch.zeros_like(sq)
    if x.dtype == torch.float64:  # d*d = sq + err exactly (Dekker)
        h = _hi(d)
        err = ((h * h - sq) + 2 * h * (d - h)) + (d - h) * (d - h)
    dims = list(range(x.dim())) if dim is None else [dim] if isinstance(dim, int) else list(dim)
    dims = [k % max(x.dim(), 1) for k in dims]
    rest = [k for k in range(x.dim()) if k not in dims]
    shape = [x.shape[k] for k in rest]
    both = torch.stack([sq, err], -1).permute(*rest, *dims, x.dim()).reshape(
        int(np.prod(shape, dtype=np.int64)), -1)
    sums = torch.tensor([math.sqrt(math.fsum(r)) for r in both.tolist()], dtype=torch.float64)
    out = sums.reshape(shape)
    if keepdim:
        for k in sorted(dims):
            out = out.unsqueeze(k)
    return out.to(x.dtype)


def _sample(dtype, n=(1 << 14) + 7):  # + 7: torch's scalar tail after its vector loop
    gen = torch.Generator().manual_seed(7)
    a, b, c = (torch.randn(n, generator=gen, dtype=torch.float64).to(dtype) for _ in range(3))
    return a, b, c


# op -> (its correctly rounded version, its probe's inputs from three sample tensors)
OPS = {
    "sqrt": (sqrt, lambda a, b, c: (a.abs(),)),
    "addcmul": (addcmul, lambda a, b, c: (a, b, c, 0.3)),
    "addcdiv": (addcdiv, lambda a, b, c: (a, b, c.abs() + 0.5, -0.3)),
    "lerp": (lerp, lambda a, b, c: (a, b, 0.1)),
    "lerp, weight >= 0.5": (lerp, lambda a, b, c: (a, b, 0.9)),
    "add(alpha=)": (add, lambda a, b, c: (a, b, 0.3)),
    "norm": (norm, lambda a, b, c: (a[:1 << 14].reshape(64, 256), 2, -1)),
}
_CALL = {"addcmul": lambda f, a: f(*a[:3], value=a[3]), "addcdiv": lambda f, a: f(*a[:3], value=a[3]),
         "add(alpha=)": lambda f, a: f(*a[:2], alpha=a[2])}
# the torch function (torch.<first>) and methods replay() replaces, per op
_PATCH = {"sqrt": ("sqrt", "sqrt_"), "addcmul": ("addcmul", "addcmul_"),
          "addcdiv": ("addcdiv", "addcdiv_"), "lerp": ("lerp", "lerp_"), "add(alpha=)": ("add", "add_"),
          "norm": ("norm",)}


def _base(op):
    # "lerp, weight >= 0.5" is a second probe of lerp
    return op.split(",")[0]
_cache = {}


def _ulp(x):
    return torch.nextafter(x.abs(), torch.full_like(x, float("inf"))) - x.abs()


def probe():
    """{(op, dtype name): (fraction of elements off, largest difference in ulp)} for every
    op of OPS where this machine's torch is not correctly rounded; {} where it is.
    Measured once per set of torch functions (a monkeypatched op is measured anew)."""
    # the functions themselves, not their ids: the cache keeps them alive, so a patched
    # function freed after a test cannot lend its id to the next one's (a stale result)
    key = tuple(getattr(torch.Tensor, m) for ms in _PATCH.values() for m in ms) \
        + tuple(getattr(torch, ms[0]) for ms in _PATCH.values())
    if key not in _cache:
        found = {}
        for dtype in DTYPES:
            sample = _sample(dtype)
            for op, (exact, args) in OPS.items():
                a = args(*sample)
                call = _CALL.get(op, lambda f, a: f(*a))
                theirs, ours = call(getattr(torch, _PATCH[_base(op)][0]), a), call(exact, a)
                off = theirs != ours
                if off.any():
                    ulps = ((theirs - ours).abs() / _ulp(ours)).max().item()
                    found[(op, str(dtype)[6:])] = (off.double().mean().item(), ulps)
        _cache[key] = found
    return _cache[key]


def describe(found=None):
    """One line per op found off, for people comparing numbers: which side is off."""
    found = probe() if found is None else found
    return [f"torch's {op} ({dt}) on this machine is not correctly rounded: {frac:.1%} of "
            f"elements differ, by up to {ulps:.0f} ulp of the result; parity compares with "
            f"torch.optim replayed with a correctly rounded {op}"
            for (op, dt), (frac, ulps) in found.items()]


@contextlib.contextmanager
def replay():
    """Within: torch's ops that probe() found off compute correctly rounded results (in
    the dtypes found off; other dtypes and ops are torch's own)."""
    found = probe()
    off = {}
    for op, dt in found:
        off.setdefault(_base(op), set()).add(getattr(torch, dt))
    saved = []
    for op, dtypes in off.items():
        exact = OPS[op][0]
        for meth in _PATCH[op]:
            orig = getattr(torch.Tensor, meth)
            saved.append((torch.Tensor, meth, orig))
            setattr(torch.Tensor, meth, _replaced(orig, exact, dtypes, meth.endswith("_"), op))
        fn = _PATCH[op][0]
        saved.append((torch, fn, getattr(torch, fn)))
        setattr(torch, fn, _replaced(getattr(torch, fn), exact, dtypes, False, op))
    try:
        yield found
    finally:
        for owner, name, orig in reversed(saved):
            setattr(owner, name, orig)


def _replaced(orig, exact, dtypes, inplace, op):
    def fn(x, *args, **kw):
        if not (torch.is_tensor(x) and x.dtype in dtypes and x.device.type == "cpu") \
                or (op == "add(alpha=)" and kw.get("alpha", 1) == 1 and len(args) < 2) \
                or (op == "norm" and (kw.get("p", args[0] if args else 2) not in (2, "fro")
                                      or "dtype" in kw or "out" in kw)):
            return orig(x, *args, **kw)
        out = exact(x, *args, **kw)
        if inplace:
            return x.copy_(out)
        return out
    return fn


def lerp_rest(w, f64):
    """1 - w as torch's lerp computes it: in the tensor's math dtype (float32 unless float64)."""
    w = float(w)
    return 1 - w if f64 else float(np.float32(1) - np.float32(w))


def decoupled(lr, wd):
    """The factor of decoupled weight decay, 1 - lr * wd, and exactly 1 where wd is 0 (the
    rules multiply by it unconditionally: one compiled variant with and without decay,
    where torch skips the multiply; 1 - lr * 0 would be NaN for an infinite lr)."""
    return 1 - lr * wd if wd != 0 else 1.0
