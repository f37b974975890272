"""numba_base's float16/bfloat16 conversions against torch's, over all 65536 patterns."""
import numba
import numpy as np
import torch

from fusedopt.kernels import numba_base as ne


@numba.njit
def _widen(h, kind):
    out = np.empty(h.size, np.float32)
    for i in range(h.size):
        out[i] = ne.f16_to_f32(h[i]) if kind == 0 else ne.bf16_to_f32(h[i])
    return out


@numba.njit
def _narrow(f, kind):
    out = np.empty(f.size, np.uint16)
    for i in range(f.size):
        out[i] = ne.f32_to_f16(f[i]) if kind == 0 else ne.f32_to_bf16(f[i])
    return out


ALL = np.arange(1 << 16, dtype=np.uint16)


def _narrow_inputs():
    """Every value the 16-bit format holds, the midpoints between neighbours (ties), the
    points just off them, values past the largest finite one, and random float32s."""
    x = torch.from_numpy(ALL.view(np.int16)).view(torch.float16).float()
    gen = torch.Generator().manual_seed(0)
    rand = torch.randn(1 << 18, generator=gen) * torch.exp2(torch.randint(-30, 30, (1 << 18,), generator=gen).float())
    finite = x[x.isfinite()].sort().values
    mid = (finite[1:].double() + finite[:-1].double()) / 2
    near = torch.cat([mid.float(), torch.nextafter(mid.float(), torch.tensor(np.inf)),
                      torch.nextafter(mid.float(), torch.tensor(-np.inf))])
    big = torch.tensor([65504.0, 65519.99, 65520.0, 70000.0, 1e30, np.inf, -np.inf, np.nan, 1e-8, -1e-8, 6e-8, 3e-8])
    return torch.cat([x, near, rand, big, torch.from_numpy(ALL.astype(np.int32) << 16).view(torch.float32)])


def _check(kind, tdtype):
    bits = torch.from_numpy(ALL.view(np.int16))
    ours = torch.from_numpy(_widen(ALL, kind))
    theirs = bits.view(tdtype).float()
    assert torch.equal(ours.isnan(), theirs.isnan())
    ok = ~theirs.isnan()
    assert torch.equal(ours[ok].view(torch.int32), theirs[ok].view(torch.int32))  # -0.0 too
    f = _narrow_inputs()
    ours = torch.from_numpy(_narrow(f.numpy(), kind).view(np.int16)).view(tdtype)
    # torch converts elementwise in a plain loop for 1-element tensors, vectorized else: check both
    theirs = f.to(tdtype)
    assert torch.equal(ours.isnan(), theirs.isnan())
    ok = ~theirs.isnan()
    assert torch.equal(ours[ok].view(torch.int16), theirs[ok].view(torch.int16))
    sample = f[:: max(1, f.numel() // 4000)]
    one = torch.stack([s.reshape(1).to(tdtype)[0] for s in sample])
    mine = torch.from_numpy(_narrow(sample.numpy(), kind).view(np.int16)).view(tdtype)
    ok = ~one.isnan()
    assert torch.equal(mine[ok].view(torch.int16), one[ok].view(torch.int16))


def test_float16_all_patterns():
    _check(0, torch.float16)


def test_bfloat16_all_patterns():
    _check(1, torch.bfloat16)
