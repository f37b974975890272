"""A float32 master weight held as a bfloat16 param plus a 16-bit remainder (the scheme of
Apex's ``store_param_remainders``), exactly: ``split`` and ``join`` are inverse for every
float32 that is not NaN.  The groundwork of issue 34's ``master_weights="remainder"``
(2 bytes of master per param instead of 4); the engines do not use it yet.

The scheme, on the float32 master's bits ``M`` (hi = M >> 16, lo = M & 0xFFFF):

* param ``P = hi + (lo >= 0x8000)`` (mod 2**16): the upper 16 bits rounded to nearest,
  ties away from zero (a carry out of the mantissa moves the exponent, as rounding does;
  the largest finite floats round to inf, as round-to-nearest-even does);
* remainder ``R = lo`` read as a signed int16: negative exactly when there was a carry;
* ``M = ((P - (R < 0)) << 16) | (R & 0xFFFF)`` (mod 2**32): the carry undone.

Each P has exactly 2**16 masters (lo from 0x8000 below to 0x7FFF above), so (P, R) is a
bijection.  Round-to-nearest-even cannot be one: an even P would have 2**16 + 1 masters
(both ties), which 16 bits cannot tell apart; so the param differs from
``master.to(torch.bfloat16)`` exactly where lo == 0x8000 and hi is even (there it is one
ulp further from zero).  A NaN master becomes torch's bfloat16 NaN 0x7FC0 with remainder 0,
which joins to the float32 NaN 0x7FC00000 (its payload is not kept).
"""
import torch

_M16 = 0xFFFF


def split(master):
    """(bfloat16 param, int16 remainder) of a float32 ``master`` (any shape)."""
    m = master.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    hi, lo = m >> 16, m & _M16
    p = (hi + (lo >= 0x8000).to(torch.int64)) & _M16
    r = torch.where(lo >= 0x8000, lo - 0x10000, lo)
    nan = torch.isnan(master)
    p = torch.where(nan, torch.full_like(p, 0x7FC0), p)
    r = torch.where(nan, torch.zeros_like(r), r)
    return _as16(p).view(torch.bfloat16), r.to(torch.int16)


def join(param, remainder):
    """The float32 master of a bfloat16 ``param`` and its int16 ``remainder``."""
    p = param.contiguous().view(torch.int16).to(torch.int64) & _M16
    r = remainder.to(torch.int64)
    m = (((p - (r < 0).to(torch.int64)) & _M16) << 16) | (r & _M16)
    return _as32(m).view(torch.float32)


def _as16(u):
    # an int64 holding 16 bits -> int16 with those bits
    return torch.where(u >= 0x8000, u - 0x10000, u).to(torch.int16)


def _as32(u):
    # an int64 holding 32 bits -> int32 with those bits
    return torch.where(u >= 0x80000000, u - 0x100000000, u).to(torch.int32)
