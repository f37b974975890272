"""Block-wise 8-bit quantization of optimizer state, as in Dettmers et al., "8-bit
Optimizers via Block-wise Quantization" (ICLR 2022), the method behind bitsandbytes' and
torchao's 8-bit optimizers: the foundation of 8-bit state (not yet wired into the engines).

A state tensor is cut into blocks of ``BLOCK`` elements (the last may be shorter); each
block keeps one float32 ``absmax`` (the largest magnitude in it) and one uint8 code per
element, the index of the value of the *dynamic (tree) map* nearest to ``x / absmax``.
The map spends its bits like a float of base 10: a run of zero bits after the sign is
the exponent (10^-6 ... 10^0), a one ends it, and the remaining bits cut [0.1, 1] into
equal parts whose midpoints are the map's values.  Signed maps (first moments) keep the
sign bit: 127 positive values, their negatives, 0 and 1.  Unsigned maps (second moments,
never negative) use the sign bit as one more fraction bit: 254 positive values, 0 and 1.
Small values thus keep their relative precision: the map's gaps grow with the value.

Params with fewer than ``MIN_NUMEL`` elements keep float32 state (the codes and absmax
would save little and cost precision where it is cheapest): decided on the full param's
size, never a shard's, so that every rank of a sharded param decides alike.
"""
import torch

BLOCK = 256
MIN_NUMEL = 4096
_EXPONENTS = 7  # 10^-6 ... 10^0


def dynamic_map(signed):
    """The 256 values of the dynamic map, sorted, in float32 (computed in float32 as
    bitsandbytes' create_dynamic_map computes them, so that codes mean the same there)."""
    values = [0.0, 1.0]
    for i in range(_EXPONENTS):
        parts = 2 ** i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1, parts + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0 * 10.0 ** (i - (_EXPONENTS - 1))
        values += mids.tolist() + ((-mids).tolist() if signed else [])
    assert len(values) == 256
    return torch.tensor(sorted(values), dtype=torch.float32)


def quantize(x, qmap):
    """(codes, absmax) of ``x`` (any shape; flattened, in float64): per block the largest
    magnitude as float32, per element the index of the map value nearest to x / absmax,
    computed in float64 (ties to the smaller value).  A block of zeros has absmax 0 and
    the code of 0."""
    flat = x.detach().reshape(-1).double()
    pad = (-flat.numel()) % BLOCK
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCK)
    absmax = blocks.abs().amax(dim=1).float()
    scale = absmax.double().unsqueeze(1)
    normed = torch.where(scale > 0, blocks / scale.clamp(min=torch.finfo(torch.float64).tiny),
                         0.0)
    q = qmap.double()
    # nearest by the midpoints between neighbouring map values: above a midpoint, the upper
    upper = torch.searchsorted(q, normed.contiguous()).clamp(1, q.numel() - 1)
    lower = upper - 1
    mid = (q[lower] + q[upper]) / 2
    codes = torch.where(normed > mid, upper, lower)
    return codes.reshape(-1)[:flat.numel()].to(torch.uint8).view(x.shape), absmax


def dequantize(codes, absmax, qmap, dtype=torch.float32):
    """The values the codes stand for: map[code] * absmax of its block, in ``dtype``
    (float64 for the reference: both factors exact, one rounding at most)."""
    flat = codes.reshape(-1).long()
    scale = absmax.to(dtype).repeat_interleave(BLOCK)[:flat.numel()]
    return (qmap.to(dtype)[flat] * scale).view(codes.shape)
