"""Block-wise 8-bit and 4-bit quantization of optimizer state, as in Dettmers et al., "8-bit
Optimizers via Block-wise Quantization" (ICLR 2022), the method behind bitsandbytes' and
torchao's 8-bit optimizers, and Li et al., "Memory Efficient Optimizers with 4-bit States"
(NeurIPS 2023), behind torchao's 4-bit ones: the definition behind ``state_dtype=torch.uint8``
(8-bit state in the engines) and ``state_dtype=torch.uint4`` (4-bit state).

A state tensor is cut into blocks of ``BLOCK`` elements (the last may be shorter); each
block keeps one float32 ``absmax`` (the largest magnitude in it) and one uint8 code per
element, the index of the value of the *dynamic (tree) map* nearest to ``x / absmax``.
The map spends its bits like a float of base 10: a run of zero bits after the sign is
the exponent (10^-6 ... 10^0), a one ends it, and the remaining bits cut [0.1, 1] into
equal parts whose midpoints are the map's values.  Signed maps (first moments) keep the
sign bit: 127 positive values, their negatives, 0 and 1.  Unsigned maps (second moments,
never negative) use the sign bit as one more fraction bit: 254 positive values, 0 and 1.
Small values thus keep their relative precision: the map's gaps grow with the value.

4-bit state (``BITS == 4``) packs two codes per byte (the even element in the low nibble)
and keeps one absmax per ``BLOCK4 = 128`` elements, as torchao's AdamW4bit.  Its signed map
(first moments) is torchao's, the dynamic map of 3 exponent bits (10^-2 ... 10^0: 7
positive values, their negatives, 0 and 1).  Its unsigned map (second moments,
``log_map``) is not torchao's linear k / 16: it is 10^(-k/5), k = 15 ... 0, evenly spaced
in log over 3 decades, without 0 (Li et al.'s "zero-point problem": a v coded as 0 turns
m / (sqrt(v) + eps) into a huge step), a value coded as the nearest in log (geometric
``midpoints``).  The step divides by sqrt(v), so v's relative error is what counts: the
log map's is the same (at most 10^(1/10), 1.26x) from absmax down to absmax / 1000, where
the linear map reads every v under absmax / 32 as absmax / 16 and damps those steps.
scikit-learn's digits (tests/test_4bit.py, AdamW, 300 steps): final loss 0.0649 against
0.0647 with float32 state (+0.4 %; torchao's maps +21 %; docs/8bit.md, bench/maps_4bit.py).
The codes are a uint8
tensor of shape ``(*p.shape[:-1], p.shape[-1] // 2)``: params whose last dim is odd,
and DTensor params, take 8-bit state instead (``takes``), so that the codes' shape gives
the param's.

Params with fewer than ``MIN_NUMEL`` elements keep float32 state (the codes and absmax
would save little and cost precision where it is cheapest): decided on the full param's
size, never a shard's, so that every rank of a sharded param decides alike.

DTensor params (FSDP2's ``fully_shard``: Shard(0) on the mesh) hold contiguous ranges of
rows on each rank.  Where a row's element count r = numel / shape[0] is a multiple of
``BLOCK``, blocks of ``BLOCK`` laid over each rank's flattened local shard never cross a
row, so they are the very blocks of the whole param, whatever the world size: the codes
are a uint8 DTensor of the param's shape and placements, the absmax a float32 DTensor of
shape (shape[0], r / BLOCK) with the same placements (its local shard holds exactly the
blocks of the param's local shard; no rank's codes depend on another's).  A distributed
checkpoint (torch.distributed.checkpoint) then reshards both like any DTensor, into any
world size, bit for bit: no re-quantization (which would not even give the codes back:
the signed map has no -1, so a block whose largest magnitude is negative would come back
with a smaller absmax and codes moved).  DTensor params whose rows are not whole
blocks, 1-D ones, and ones placed other than Shard(0) / Replicate keep float32 state
(DTensors laid like the param), decided on the global shape, so every rank alike.
"""
from math import inf

import torch

from . import spec
from .kernels import qmap

BLOCK = qmap.QBLOCK
BLOCK4 = qmap.QBLOCK4
MIN_NUMEL = 4096
_EXPONENTS = 7  # 10^-6 ... 10^0 (8 bits; 4 bits: 3)


def bits(state_dtype):
    """The bits per code of a quantized state dtype: 4 for torch.uint4, else 8."""
    return 4 if state_dtype == torch.uint4 else 8


def block(nbits):
    """Elements per absmax: BLOCK for 8-bit codes, BLOCK4 for 4-bit ones."""
    return BLOCK4 if nbits == 4 else BLOCK
ABSMAX = "_absmax"  # state[name + ABSMAX]: the float32 absmax of each block of state[name]


def dynamic_map(signed, nbits=8):
    """The 2^nbits values of the map, sorted, in float32: the dynamic map (computed in
    float32 as bitsandbytes' create_dynamic_map computes them, so that codes mean the same
    there: nbits - 1 exponents), but for the unsigned 4-bit map, ``log_map()`` (see the
    module's docstring)."""
    if nbits == 4 and not signed:
        return log_map()
    exps = nbits - 1
    values = [0.0, 1.0]
    for i in range(exps):
        parts = 2 ** i if signed else 2 ** (i + 1)
        edges = torch.linspace(0.1, 1, parts + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0 * 10.0 ** (i - (exps - 1))
        values += mids.tolist() + ((-mids).tolist() if signed else [])
    assert len(values) == 2 ** nbits
    return torch.tensor(sorted(values), dtype=torch.float32)


def log_map():
    """The unsigned 4-bit map: 16 values evenly spaced in log over 3 decades,
    10^(-k/5) for k = 15 ... 0 (0.001 ... 1, each 10^(1/5) = 1.585x the one below), no 0."""
    return (10.0 ** (-torch.arange(15, -1, -1, dtype=torch.float64) / 5)).float()


def midpoints(qmap):
    """The boundaries between neighbouring values of a map, in float64: a value codes as
    the count of them below it.  Arithmetic (the nearest value), but for a map of positive
    values only (``log_map``), geometric (the nearest value in log: the same relative
    error up as down)."""
    q = qmap.double()
    if bool((q > 0).all()):
        return (q[:-1] * q[1:]).sqrt()
    return (q[:-1] + q[1:]) / 2


def quantize(x, qmap, size=BLOCK):
    """(codes, absmax) of ``x`` (any shape; flattened, in float64): per block of ``size``
    elements the largest magnitude as float32, per element the count of the map's
    ``midpoints`` below x / absmax, computed in float64 (the nearest value; ties to the
    smaller).  A block of zeros has absmax 0 and code 0 (the value 0, or for a map without
    0 its smallest, which times absmax 0 is 0)."""
    flat = x.detach().reshape(-1).double()
    pad = (-flat.numel()) % size
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, size)
    absmax = blocks.abs().amax(dim=1).float()
    scale = absmax.double().unsqueeze(1)
    normed = torch.where(scale > 0, blocks / scale.clamp(min=torch.finfo(torch.float64).tiny),
                         0.0)
    codes = torch.searchsorted(midpoints(qmap), normed.contiguous())  # (midpoints < normed)
    return codes.reshape(-1)[:flat.numel()].to(torch.uint8).view(x.shape), absmax


def dequantize(codes, absmax, qmap, dtype=torch.float32, size=BLOCK):
    """The values the codes (one per element, unpacked) stand for: map[code] * absmax of
    its block of ``size``, in ``dtype`` (float64 for the reference: both factors exact, one
    rounding at most)."""
    flat = codes.reshape(-1).long()
    scale = absmax.to(dtype).repeat_interleave(size)[:flat.numel()]
    return (qmap.to(dtype)[flat] * scale).view(codes.shape)


def signed(name):
    """Whether state slot ``name`` takes the signed map: all but the slots a spec declares
    unsigned (second moments, sums of squares, step sizes: never negative)."""
    return name not in spec.unsigned_slots()


def zero_code(is_signed, nbits=8):
    """The code of 0 (or, for the unsigned 4-bit map, which has none, of its smallest
    value, 0 under an absmax of 0): the middle of the signed map, the first of the unsigned."""
    return (2 ** (nbits - 1) - 1) if is_signed else 0


def nblocks(numel, size=BLOCK):
    return (numel + size - 1) // size


def pack(codes):
    """4-bit codes (uint8 < 16, an even count per last dim) two per byte, the even element
    in the low nibble: shape (*codes.shape[:-1], codes.shape[-1] // 2)."""
    c = codes.reshape(*codes.shape[:-1], -1, 2)
    return c[..., 0] | (c[..., 1] << 4)


def unpack(packed):
    """The inverse of ``pack``: one code per element, shape (..., 2 * packed.shape[-1])."""
    return torch.stack([packed & 15, packed >> 4], -1).reshape(*packed.shape[:-1], -1)


def bits_of(codes, absmax):
    """The bits per code of a state's codes, from their count and their absmax's: 4-bit
    codes of n elements are n / 2 bytes with n / BLOCK4 absmax, 8-bit ones n bytes with
    n / BLOCK (distinct for every n over MIN_NUMEL)."""
    return 4 if absmax.numel() > nblocks(codes.numel()) else 8


def _dtensor(t):
    from .dtensor import dtensor_class
    return isinstance(t, dtensor_class())


def _local(t):
    from .dtensor import local
    return local(t)


def takes(p, nbits=8):
    """Whether param p's state is quantized under state_dtype=torch.uint8: float32,
    float16 and bfloat16 params of at least MIN_NUMEL elements (the full param's count:
    a DTensor's numel is the global one) and, for a DTensor, rows of whole blocks
    (``row_blocks``); float64 and complex params keep their dtype.  With ``nbits=4``
    (torch.uint4): those of them that are not DTensors and whose last dim is even."""
    if nbits == 4:
        return takes(p) and not _dtensor(p) and p.shape[-1] % 2 == 0
    return p.dtype in (torch.float32, torch.float16, torch.bfloat16) \
        and p.numel() >= MIN_NUMEL and (not _dtensor(p) or row_blocks(p) is not None)


def row_blocks(p):
    """For a DTensor param: the blocks in each of its rows, where its 8-bit state can be
    laid like it (2-D or more, rows of whole blocks, each placement Shard(0) or
    Replicate: every rank holds whole rows), else None.  From the global shape only."""
    from torch.distributed.tensor import Replicate, Shard
    if p.dim() < 2 or p.shape[0] == 0 or (p.numel() // p.shape[0]) % BLOCK:
        return None
    if not all(isinstance(pl, Replicate) or (type(pl) is Shard and pl.dim == 0)
               for pl in p.placements):
        return None
    return p.numel() // p.shape[0] // BLOCK


def absmax_shape(p):
    """The (global) shape of the absmax of param p's 8-bit state: (blocks,), or for a
    DTensor (rows, blocks per row)."""
    if _dtensor(p) and p.dim() and p.shape[0]:
        return (p.shape[0], nblocks(p.numel() // p.shape[0]))
    return (nblocks(p.numel()),)


def _laid_like(p, codes, absmax):
    """Codes and absmax of p's local shard as DTensors laid like p (see the module's
    docstring); for a plain p, as they are."""
    if not _dtensor(p):
        return codes, absmax
    mesh, places = p.device_mesh, p.placements
    rows, per = absmax_shape(p)
    stride = torch.empty(p.shape, device="meta").stride()
    return (type(p).from_local(codes, mesh, places, shape=p.shape, stride=stride),
            type(p).from_local(absmax.view(-1, per), mesh, places, shape=(rows, per),
                               stride=(per, 1)))


def codes_shape(p, nbits=8):
    """The shape of param p's codes: p's (local) shape, the last dim halved for 4 bits."""
    shape = _local(p).shape
    return shape if nbits == 8 else (*shape[:-1], shape[-1] // 2)


def zeros(p, is_signed, nbits=8):
    """(codes, absmax) of a state of zeros for param p (DTensors laid like a DTensor p)."""
    local = _local(p)
    z = zero_code(is_signed, nbits)
    codes = torch.full(codes_shape(p, nbits), z if nbits == 8 else z | z << 4,
                       dtype=torch.uint8, device=local.device)
    absmax = torch.zeros(nblocks(local.numel(), block(nbits)), dtype=torch.float32,
                         device=local.device)
    return _laid_like(p, codes, absmax)


def engine_table():
    """What the engines quantize with: float32 [qmap.ROWS, qmap.TABLE] (row 0 the unsigned
    8-bit map, row 1 the signed one; rows 2 and 3 the 4-bit maps, see below).  Columns 0-255 are the map's values (dequantization:
    value[code] * absmax).  The rest describe the map's structure (kernels/qmap.py), so
    that a code is computed without a search or a table lookup per element:

    - y = |x| * (1 / absmax) lies in [0, 1] (an ulp above 1 at most);
    - its decade d (0-6) counts the boundaries ``LOW[1..6]`` below y (``LOW[i]`` is the
      midpoint between decade i's first value and the value below it);
    - decade d has ``parts = PARTS[d] = 2^(d+u)`` values (u = 0 for the signed map, 1 for
      the unsigned), the midpoints of equal parts of [0.1, 1] * 10^(d-6), counted from
      ``K = parts - u`` (codes count from the code of 0: 0 unsigned, 127 signed);
    - the part is ``floor(parts * fma(y, P[d], -1/9))`` with ``P[d] = 10^(6-d) / 0.9``,
      kept within [0, parts - 1];
    - above ``TOP_MID`` (between the largest value and 1) the code is 1's; at or under
      ``LOW[0]`` (half the smallest value) it is 0's.

    Columns ``PLANES`` on hold the 256 values again as bytes (plane p: byte p of every
    value), for the CPU engine's dequantization by byte permutes, and ``EXP_D``,
    ``EXP_LOW`` (the decade by y's binary exponent) and ``PA`` ... ``PM`` (the decade's
    constants) for its codes by permutes (numba_quant, kernels/qmap.py).

    A 4-bit row holds the map's 16 values (columns 0-15) and its 15 ``midpoints`` as
    float32 (``MID4`` on; geometric for the log map): a code is the count of midpoints
    below y = x * (1 / absmax), signed for the signed map, 15 compares an engine vectorizes.

    Every step is a float32 operation both engines perform alike, so their codes are
    equal; a code can differ from ``quantize``'s (float64, exact midpoints) only where y
    lies within rounding of a midpoint."""
    out = torch.zeros(qmap.ROWS, qmap.TABLE, dtype=torch.float32)
    for row, is_signed in ((2, False), (3, True)):
        q = dynamic_map(is_signed, 4)
        out[row, :16] = q
        out[row, qmap.MID4:qmap.MID4 + 15] = midpoints(q).float()
    ints = out.view(torch.int32)  # (the columns the CPU engine reads as int32)
    for row, is_signed in enumerate((False, True)):
        q = dynamic_map(is_signed)
        out[row, :256] = q
        pos = q[zero_code(is_signed):].double()  # 0, the positive values, 1
        first = 1  # index in pos of decade i's first value
        for i in range(_EXPONENTS):
            out[row, qmap.LOW + i] = (pos[first - 1] + pos[first]) / 2
            out[row, qmap.P + i] = 10.0 ** (_EXPONENTS - 1 - i) / 0.9
            out[row, qmap.PARTS + i] = parts = 2 ** i if is_signed else 2 ** (i + 1)
            first += parts
        out[row, qmap.NINTH] = 1 / 9
        out[row, qmap.TOP_MID] = (pos[-2] + pos[-1]) / 2
        out[row, qmap.TOP_K] = len(pos) - 1
        planes = q.view(torch.uint8).view(256, 4).t().contiguous()  # (little-endian bytes)
        out[row, qmap.PLANES:qmap.PLANES + 256] = planes.view(-1).view(torch.float32)
        # the boundaries between decades, and TOP_MID: "decade 7", whose code is 1's
        low = torch.cat([out[row, qmap.LOW + 1:qmap.LOW + 7], out[row, qmap.TOP_MID:][:1]])
        assert out[row, qmap.LOW] > 2.0 ** -31
        for b in range(32):
            lo, hi = 2.0 ** (b - 31), 2.0 ** (b - 30) if b < 31 else inf
            inside = low[(low >= lo) & (low < hi)]
            assert len(inside) <= 1
            ints[row, qmap.EXP_D + b] = int((low < lo).sum())
            out[row, qmap.EXP_LOW + b] = inside[0] if len(inside) else inf
        parts = out[row, qmap.PARTS:qmap.PARTS + 7]
        out[row, qmap.PA:qmap.PA + 7] = parts * out[row, qmap.P:qmap.P + 7]
        out[row, qmap.PB:qmap.PB + 7] = parts * out[row, qmap.NINTH]
        ints[row, qmap.PK:qmap.PK + 7] = parts.int() - (0 if is_signed else 1)
        ints[row, qmap.PM:qmap.PM + 7] = parts.int() - 1
        ints[row, qmap.PK + 7] = len(pos) - 1  # decade 7: t = 0, PM = 0, the code of 1
    return out


def fit(state, name, p, nbits=8):
    """Make state[name] ``nbits`` codes of param p with their absmax beside them (DTensors
    laid like a DTensor p, see the module's docstring): zeros where it is missing
    (returns {id(p)}: fresh state), quantized where it holds values (a torch.optim
    state_dict loaded, or state_dtype changed: codes of the other width are dequantized
    first)."""
    t = state.get(name)
    if t is None:
        state[name], state[name + ABSMAX] = zeros(p, signed(name), nbits)
        return {id(p)}
    if t.dtype == torch.uint8 and bits_of(_local(t), _local(state[name + ABSMAX])) != nbits:
        t = state[name] = dequantize_state(state, name)
    if t.dtype != torch.uint8:  # a DTensor's local shard alone: its blocks are the param's
        codes, absmax = quantize(_local(t), dynamic_map(signed(name), nbits), block(nbits))
        if nbits == 4:
            codes = pack(codes)
        state[name], state[name + ABSMAX] = _laid_like(p, codes.to(t.device),
                                                       absmax.to(t.device))
    return set()


def dequantize_state(state, name):
    """state[name] (codes) as float32 values (a DTensor laid like DTensor codes), its
    absmax entry removed from the state."""
    absmax = _local(state.pop(name + ABSMAX))
    codes = state[name]
    local = _local(codes)
    nbits = bits_of(local, absmax)
    values = dequantize(unpack(local) if nbits == 4 else local, absmax.to(local.device),
                        dynamic_map(signed(name), nbits).to(local.device), size=block(nbits))
    if not _dtensor(codes):
        return values
    return type(codes).from_local(values, codes.device_mesh, codes.placements,
                                  shape=codes.shape, stride=codes.stride())


def float_state_dict(state_dict):
    """A copy of an optimizer state_dict with every 8- or 4-bit state entry (codes and
    absmax) replaced by its float32 values: what torch.optim loads (``torch.optim.AdamW(...)
    .load_state_dict(fusedopt.quant.float_state_dict(opt.state_dict()))``), or a fusedopt
    optimizer without quantized state.  4-bit codes of other maps are refused (check_maps)."""
    check_maps(state_dict)
    out = dict(state_dict)
    out["state"] = {}
    for i, st in state_dict["state"].items():
        st = dict(st)
        for name in [k for k in st if k + ABSMAX in st]:
            st[name] = dequantize_state(st, name)
        out["state"][i] = st
    return out


# a state_dict's group holding unsigned 4-bit codes says which map made them (log_map: 2);
# fusedopt's before 2026-12-08 (torchao's linear map) have no such key, and are refused
MAPS4 = "uint4_maps"
MAPS4_VERSION = 2


def _holds_4bit(st):  # unsigned 4-bit codes: the map changed (the signed one is torchao's)
    return any(torch.is_tensor(v) and v.dtype == torch.uint8 and not signed(k)
               and torch.is_tensor(st.get(k + ABSMAX))
               and bits_of(_local(v), _local(st[k + ABSMAX])) == 4
               for k, v in st.items())


def mark_maps(state_dict):
    """Mark each group of ``state_dict`` whose params' state holds unsigned 4-bit codes
    with the map they are codes of (``group[MAPS4] = MAPS4_VERSION``); returns it."""
    for g in state_dict["param_groups"]:
        if any(_holds_4bit(state_dict["state"].get(i, {})) for i in g["params"]):
            g[MAPS4] = MAPS4_VERSION
    return state_dict


def check_maps(state_dict):
    """Refuse (RuntimeError) a state_dict whose unsigned 4-bit codes were made with
    another map than ``log_map`` (``mark_maps``): before 2026-12-08 fusedopt's took
    torchao's linear map, whose codes would be read as other values here."""
    for g in state_dict["param_groups"]:
        if g.get(MAPS4) != MAPS4_VERSION and any(
                _holds_4bit(state_dict["state"].get(i, {})) for i in g["params"]):
            raise RuntimeError(
                f"loaded state dict holds 4-bit second moments (state_dtype=torch.uint4) "
                f"coded with another map ({MAPS4}={g.get(MAPS4)!r}, this one is "
                f"{MAPS4_VERSION}: fusedopt before 2026-12-08 used torchao's linear map, "
                f"whose codes mean other values); load it with the fusedopt that saved "
                f"it and save fusedopt.quant.float_state_dict(opt.state_dict()), which "
                f"loads here (quantized again at the next step)")
