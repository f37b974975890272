"""``master_weights="remainder"``: a float32 master weight held as the bfloat16 param plus an
int16 remainder (the scheme of Apex's ``store_param_remainders``), exactly.  The engines
join and split in their update pass (kernels: ``join_master``, ``split_master``); here are
the same maps in torch, for the state_dict (which holds the float32 master, as
``master_weights=True`` writes it) and for loading one.

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

from . import options
from .dtensor import local

KEY = "remainder"  # the state key of the int16 remainder
_M16 = 0xFFFF


def held(group, p):
    """master_weights="remainder" and a bfloat16 param: its float32 master is the param and
    an int16 ``state[KEY]``.  A float16 param is refused (options.exclusive says so when
    the group is added; this, for a param cast since)."""
    if group.get("master_weights") != "remainder" or p.dtype not in (torch.bfloat16,
                                                                     torch.float16):
        return False
    if p.dtype == torch.float16:
        raise ValueError(options.REMAINDER_FP16)
    return True


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


def rounds_to(master, param):
    """Whether the float32 ``master`` rounds to ``param`` (a local float16/bfloat16 tensor of
    its shape) by round-to-nearest-even (``master_weights=True``'s param) or, for bfloat16,
    by this scheme (``"remainder"``'s): a master either mode wrote belongs to the param.
    Bit for bit: a NaN is its own (torch.equal calls no NaN equal), -0.0 is not 0.0."""
    if master.shape != param.shape:
        return False
    dt, want = param.dtype, param.detach().view(torch.int16)
    master = master.to(param.device)
    if torch.equal(master.to(dt).view(torch.int16), want):
        return True
    return dt == torch.bfloat16 and torch.equal(split(master)[0].view(torch.int16), want)


def adopt(st, p):
    """p's remainder for state dict ``st`` at a plan's build: from a float32 ``st["master"]``
    that rounds to p (a state_dict, of either mode; ``st["master"]`` is then dropped and p
    set to the split's param, which differs from round-to-nearest-even at its ties), else
    ``st[KEY]`` where it is an int16 tensor of p's shape and device (the master is the
    param with those low bits), else zeros (the master is the param)."""
    m = st.get("master")
    if m is not None:
        del st["master"]
        if torch.is_tensor(m) and rounds_to(m, p):
            hi, r = split(m.to(p.device))
            if not torch.equal(hi, p):
                p.copy_(hi)
            return r.contiguous()
    r = st.get(KEY)
    if torch.is_tensor(r) and r.dtype == torch.int16 and r.shape == p.shape \
            and r.device == p.device and r.is_contiguous():
        return r
    return torch.zeros(p.shape, dtype=torch.int16, device=p.device)


def export(state_dict, groups):
    """In ``state_dict`` (torch's, its per-param states plain dicts; ``groups``: the
    optimizer's param groups) each remainder replaced by the float32 master it makes with
    its param, under ``master_weights=True``'s key: one format for both modes."""
    ids = [i for g in state_dict["param_groups"] for i in g["params"]]
    for i, p in zip(ids, (p for g in groups for p in g["params"])):
        st = state_dict["state"].get(i)
        if st is not None and torch.is_tensor(st.get(KEY)):
            st["master"] = join(local(p).detach(), st.pop(KEY))


def keep_form(forms, groups):
    """After torch's load_state_dict, which takes each group's keys from the state dict:
    ``master_weights`` back to ``forms`` (the groups' own, before) where both are masters
    (True, "remainder"): the two are one float32 master stored two ways, and a checkpoint
    of either mode loads into the other, which keeps its own way of storing it."""
    for g, own in zip(groups, forms):
        if own and g.get("master_weights"):
            g["master_weights"] = own


def _as16(u):
    # an int64 holding 16 bits -> int16 with those bits
    return torch.where(u >= 0x8000, u - 0x10000, u).to(torch.int16)


def _as32(u):
    # an int64 holding 32 bits -> int32 with those bits
    return torch.where(u >= 0x80000000, u - 0x100000000, u).to(torch.int32)
