"""fusedopt/remainder.py: a float32 master as a bfloat16 param plus an int16 remainder,
checked over every low half of a slice of float32 bit patterns."""
import torch

from fusedopt import remainder

# upper halves: a stride through all 65536 (signs, exponents, mantissas), and the edges:
# zeros and subnormals, 1, the largest finite floats, inf, NaN of both signs
EDGES = [0x0000, 0x0001, 0x007F, 0x0080, 0x3F7F, 0x3F80, 0x7F7E, 0x7F7F, 0x7F80, 0x7F81,
         0x7FBF, 0x7FC0, 0x7FFF]
HI = sorted(set(range(0, 1 << 16, 1021)) | {e | s for e in EDGES for s in (0, 0x8000)})


def _masters():
    hi = torch.tensor(HI, dtype=torch.int64)
    lo = torch.arange(1 << 16, dtype=torch.int64)
    m = ((hi[:, None] << 16) | lo[None, :]).reshape(-1)
    return torch.where(m >= 1 << 31, m - (1 << 32), m).to(torch.int32).view(torch.float32)


def test_join_inverts_split_and_the_param_is_the_rounded_master():
    """Every non-NaN master comes back bit for bit; the param is master.to(bfloat16) (round
    to nearest even) except at the ties that round to an even param, where it is one ulp
    further from zero; a NaN master gives bfloat16's NaN and joins to a NaN."""
    m = _masters()
    p, r = remainder.split(m)
    assert p.dtype == torch.bfloat16 and r.dtype == torch.int16
    back = remainder.join(p, r)
    nan = torch.isnan(m)
    assert torch.equal(back[~nan].view(torch.int32), m[~nan].view(torch.int32))
    assert torch.isnan(back[nan]).all() and torch.isnan(p[nan]).all()
    rne = m.to(torch.bfloat16)
    bits = m.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    tie_even = ((bits & 0xFFFF) == 0x8000) & (((bits >> 16) & 1) == 0) & ~nan
    same = p.view(torch.int16) == rne.view(torch.int16)
    assert same[~tie_even & ~nan].all()
    # at those ties: one ulp further from zero than round-to-nearest-even's
    away = (p.view(torch.int16).to(torch.int64) & 0xFFFF) - (rne.view(torch.int16).to(torch.int64) & 0xFFFF)
    assert (away[tie_even] == 1).all() and int(tie_even.sum()) > 0


def test_mutant_without_the_carry_undone_fails():
    """join without undoing the rounding carry gives the wrong master exactly where
    lo >= 0x8000 (half of all masters): the check above would catch it."""
    m = _masters()
    p, r = remainder.split(m)
    pb = p.view(torch.int16).to(torch.int64) & 0xFFFF
    wrong = (((pb << 16) | (r.to(torch.int64) & 0xFFFF)) & 0xFFFFFFFF)
    bits = m.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nan = torch.isnan(m)
    assert torch.equal((wrong != bits) & ~nan, ((bits & 0xFFFF) >= 0x8000) & ~nan)
