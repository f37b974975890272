"""What every Triton kernel shares: the launch settings, the pointer tables' reads, dtype IO
(bfloat16 moved as uint16 and rounded to nearest even by hand: ``.to(tl.bfloat16)``
truncates in the interpreter), stochastic rounding, the coefficients' row, and the binding
of a rule and its helpers into a kernel's globals (``bind_rule``, ``rebind``).

triton_engine (the update and norm kernels), triton_quant (8-bit slots) and triton_matrix
import from here and never from each other, except triton_engine from triton_quant.
Triton's own cache keys a compiled kernel by its source and the sources and constexprs of
every function and global it reaches, so it needs no key of ours.
"""
import contextlib
import os
import types
import weakref

from . import coefficients, import_triton, rules, triton_interp, triton_ops
from .coefficients import NCOEF, SLOTS
from .flags import CONSTANTS

triton = import_triton()
tl, JITFunction = triton.language, triton.runtime.jit.JITFunction

# the interpreter runs programs one after another in Python: few large blocks are faster
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CHUNK = 1 << 16 if INTERPRET else 1 << 14  # elements per program of the update kernels
BLOCK = CHUNK if INTERPRET else 1024
NUM_WARPS = 4
KINDS = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}
SCALARS = [f"H{j}" for j in range(NCOEF)]  # the row passed as scalar arguments (given_row)
kernels = {}  # the kernels built in this process


def block_for(CS, CE):
    """The BLOCK of a launch over the chunks [CS, CE): BLOCK compiled; in the interpreter
    the smallest power of two, at least 256 (whole 8-bit blocks), that holds the longest
    chunk.  Each chunk is still one block, as at BLOCK = CHUNK, but a 3-element tensor no
    longer drives 65536-lane numpy arrays through every op of the rule (Adam's parity
    case, the interpreted engine's 20 steps: 5.3 s before, 2.4 s after)."""
    if not INTERPRET or CS.numel() == 0:
        return BLOCK
    return min(BLOCK, max(256, longest(CS, CE)))


_LONGEST = {}  # id of a table's tensor -> (a weak reference to it, its block): see longest


def longest(starts, ends):
    """The next power of two of the longest range [starts, ends) of two CPU tables (the
    interpreter's), read once per table (through numpy: no torch op, no tensor read as a
    Python int at a step).  A table is built once and then only read; were it written, the
    block would merely be slow, not wrong: the kernels loop over the blocks of a chunk."""
    ref, n = _LONGEST.get(id(ends), (None, None))
    if ref is None or ref() is not ends:  # (keyed by id: a tensor's == is elementwise)
        n = triton.next_power_of_2(int((ends.numpy() - starts.numpy()).max()))
        ref = weakref.ref(ends, lambda _, k=id(ends): _LONGEST.pop(k, None))
        _LONGEST[id(ends)] = ref, n
    return n


def launching():
    """The context of every launch: in the interpreter, its ops that are not correctly
    rounded on this triton version replayed correctly rounded, as compiled Triton computes
    them (kernels/triton_interp.py); compiled, nothing."""
    return triton_interp.replay() if INTERPRET else contextlib.nullcontext()


@triton.jit
def tensor_ptr(table, t, KIND: tl.constexpr, ALIGNED: tl.constexpr):
    # KIND: 0 float32, 1 float64, 2 float16, 3 bfloat16 (moved as uint16), 4 uint8 (codes)
    if KIND == 4:
        ptr = tl.load(table + t).to(tl.pointer_type(tl.uint8))
    elif KIND == 0:
        ptr = tl.load(table + t).to(tl.pointer_type(tl.float32))
    elif KIND == 1:
        ptr = tl.load(table + t).to(tl.pointer_type(tl.float64))
    elif KIND == 2:
        ptr = tl.load(table + t).to(tl.pointer_type(tl.float16))
    else:
        ptr = tl.load(table + t).to(tl.pointer_type(tl.uint16))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def widen(x, KIND: tl.constexpr):
    # storage -> math dtype
    if KIND == 1:
        return x
    elif KIND == 3:
        return (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def narrow(x, KIND: tl.constexpr):
    # math -> storage dtype
    if KIND == 2:
        y = x.to(tl.float16)
    elif KIND == 3:  # round to nearest even; NaN becomes torch's 0x7FC0
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        y = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r).to(tl.uint16)
    else:
        y = x
    return y


@triton.jit
def fmix32(h):
    # murmur3's finalizer (uint32 arithmetic wraps as numba_base.fmix32's masked int64)
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def narrow_stochastic(x, offs, key):
    # as numba_base.f32_to_bf16_stochastic: add 16 random bits from (key, index), truncate
    u = x.to(tl.uint32, bitcast=True)
    r = fmix32(fmix32(offs.to(tl.uint32)) ^ key) & 0xFFFF
    y = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, (u + r) >> 16)
    return y.to(tl.uint16)


@triton.jit
def join_master(h, r):
    # numba_base.join_master: the float32 master of a bfloat16 param's bits h and its
    # remainder's r (uint16 both); a negative remainder marks the split's carry, taken back
    u = ((h.to(tl.uint32) - (r >> 15).to(tl.uint32)) & 0xFFFF) << 16
    return (u | r.to(tl.uint32)).to(tl.float32, bitcast=True)


@triton.jit
def split_master(x):
    # numba_base.split_master: the upper half rounded to nearest, ties away from zero, and
    # the low half as the remainder; NaN: torch's 0x7FC0 and 0
    u = x.to(tl.uint32, bitcast=True)
    lo = u & 0xFFFF
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    h = tl.where(nan, 0x7FC0, ((u >> 16) + (lo >> 15)) & 0xFFFF)
    return h.to(tl.uint16), tl.where(nan, 0, lo).to(tl.uint16)


@triton.jit
def load_raw(ptr, offs, end, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptr + offs, mask=offs < end, other=0)
    else:
        x = tl.load(ptr + offs)
    return x


@triton.jit
def load(ptr, offs, end, KIND: tl.constexpr, MASKED: tl.constexpr):
    if MASKED:
        x = tl.load(ptr + offs, mask=offs < end, other=0)
    else:
        x = tl.load(ptr + offs)
    return widen(x, KIND)


@triton.jit
def store_raw(ptr, offs, end, y, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + offs, y, mask=offs < end)
    else:
        tl.store(ptr + offs, y)


@triton.jit
def store(ptr, offs, end, x, KIND: tl.constexpr, MASKED: tl.constexpr):
    store_raw(ptr, offs, end, narrow(x, KIND), MASKED)


@triton.jit
def coef(bits, C):
    # a coefficient passed as a scalar argument: float64 bits in an int64, rounded once to
    # the math dtype (C's), as a float64 written into C would be
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(C.dtype.element_ty)


@triton.jit
def given_row(C, H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15,
              H16):
    # the row passed as scalars (coefficients.NCOEF of them)
    return (coef(H0, C), coef(H1, C), coef(H2, C), coef(H3, C), coef(H4, C), coef(H5, C),
            coef(H6, C), coef(H7, C), coef(H8, C), coef(H9, C), coef(H10, C),
            coef(H11, C), coef(H12, C), coef(H13, C), coef(H14, C), coef(H15, C),
            coef(H16, C))


@triton.jit
def loaded_row(C, t):
    # tensor t's row of the table C (coefficients.NCOEF per row)
    r = C + t * NCOEF
    return (tl.load(r), tl.load(r + 1), tl.load(r + 2), tl.load(r + 3), tl.load(r + 4),
            tl.load(r + 5), tl.load(r + 6), tl.load(r + 7), tl.load(r + 8), tl.load(r + 9),
            tl.load(r + 10), tl.load(r + 11), tl.load(r + 12), tl.load(r + 13),
            tl.load(r + 14), tl.load(r + 15), tl.load(r + 16))


HELPERS = (tensor_ptr, widen, narrow, fmix32, narrow_stochastic, join_master, split_master,
           load_raw, load, store_raw, store, coef, given_row, loaded_row)


def rebind(fn, gl, interpret, launch=False):
    """A copy of ``fn`` (a plain function or a JITFunction) whose globals are ``gl``.
    Under the interpreter, helpers stay plain Python: each nested jit call would re-patch
    triton.language, which made the interpreted tests several times slower."""
    orig = getattr(fn, "fn", fn)
    py = types.FunctionType(orig.__code__, gl, orig.__name__, orig.__defaults__)
    # a launch reads which parameters are constexpr from the annotations; without them
    # every flag became a runtime argument on the GPU (the AOT path names them itself)
    py.__annotations__ = dict(orig.__annotations__)
    if not interpret:
        # coefficient bits change every step: never specialise on their values
        return JITFunction(py, do_not_specialize=[a for a in SCALARS
                                                  if a in py.__code__.co_varnames])
    return triton.jit(py) if launch else py


def bind_rule(rule, flags, interpret):
    """Globals for a kernel running ``rule``: a copy of the rule with ``ops`` = triton_ops
    and each flag a constexpr, the coefficients' slots and the mask bits as constexprs,
    and this module's helpers."""
    ops = types.ModuleType(triton_ops.__name__)
    for name in ("div", "sqrt", "maximum", "where", "abs", "fma"):
        setattr(ops, name, rebind(getattr(triton_ops, name), {"tl": tl, "__name__": ops.__name__},
                                  interpret))
    gl = {"__name__": rules.__name__, "ops": ops, "tl": tl,
          **{n: tl.constexpr(v) for n, v in flags}}
    for f in (*rules.HELPERS, coefficients.positional(rules.RULES[rule])):
        gl[f.__name__] = rebind(f, gl, interpret)
    kgl = {"__name__": __name__, "tl": tl, "triton": triton, "NCOEF": tl.constexpr(NCOEF),
           "rule": rebind(coefficients.adapter(rule), gl, interpret),
           **{n: tl.constexpr(v) for n, v in SLOTS.items()},
           # (the interpreter's MASK is an int, which has no & with a constexpr)
           **{n: v if interpret else tl.constexpr(v) for n, v in CONSTANTS.items()},
           **{n: tl.constexpr(v) for n, v in flags if n in ("SCALE_GRAD", "WRITE_GRAD",
                                                             "FOUND_INF", "STOCH_ROUND",
                                                             "REDUCE")}}
    for f in HELPERS:
        kgl[f.fn.__name__] = rebind(f, kgl, interpret)
    return kgl


