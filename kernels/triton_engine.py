"""GPU engine: the same job as numba_engine in Triton, one launch per group and step.

Each program takes one chunk (tensor index, start, end) from the chunk table and reads
the tensor's addresses from int64 pointer tables.  Pointers loaded from memory carry no
alignment facts, so when the host has checked that every address is 16-byte aligned
(ALIGNED) the kernel asserts it with ``tl.multiple_of`` and full blocks load without a
mask: that is what lets the compiler emit 128-bit loads.  bfloat16 is moved as uint16
and rounded to nearest even by hand: ``.to(tl.bfloat16)`` truncates in the interpreter.
"""
import hashlib
import inspect
import os
import types

import triton
import triton.language as tl

from . import rules

CHUNK = 1 << 14
NCOEF = 10
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
BLOCK = 4096 if _INTERPRET else 1024
NUM_WARPS = 4


@triton.jit
def _load(table, t, offs, KIND: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
          end):
    # KIND: 0 float32, 1 float64, 2 float16, 3 bfloat16 (stored as uint16)
    if KIND == 0:
        ptr = tl.load(table + t).to(tl.pointer_type(tl.float32))
    elif KIND == 1:
        ptr = tl.load(table + t).to(tl.pointer_type(tl.float64))
    elif KIND == 2:
        ptr = tl.load(table + t).to(tl.pointer_type(tl.float16))
    else:
        ptr = tl.load(table + t).to(tl.pointer_type(tl.uint16))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    if MASKED:
        x = tl.load(ptr + offs, mask=offs < end, other=0)
    else:
        x = tl.load(ptr + offs)
    if KIND == 1:
        return x
    if KIND == 3:
        return (x.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def _store(table, t, offs, x, KIND: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
           end):
    if KIND == 0:
        ptr = tl.load(table + t).to(tl.pointer_type(tl.float32))
        y = x
    elif KIND == 1:
        ptr = tl.load(table + t).to(tl.pointer_type(tl.float64))
        y = x
    elif KIND == 2:
        ptr = tl.load(table + t).to(tl.pointer_type(tl.float16))
        y = x.to(tl.float16)
    else:
        ptr = tl.load(table + t).to(tl.pointer_type(tl.uint16))
        u = x.to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        y = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r).to(tl.uint16)
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    if MASKED:
        tl.store(ptr + offs, y, mask=offs < end)
    else:
        tl.store(ptr + offs, y)


@triton.jit
def _block(P, G, S0, S1, S2, t, offs, end, h0, h1, h2, h3, h4, h5, h6, h7, h8, h9,
           MASK: tl.constexpr, KIND: tl.constexpr, ALIGNED: tl.constexpr,
           MASKED: tl.constexpr):
    p = _load(P, t, offs, KIND, ALIGNED, MASKED, end)
    g = _load(G, t, offs, KIND, ALIGNED, MASKED, end)
    a = p
    b = p
    c = p
    if MASK & 1:
        a = _load(S0, t, offs, KIND, ALIGNED, MASKED, end)
    if MASK & 2:
        b = _load(S1, t, offs, KIND, ALIGNED, MASKED, end)
    if MASK & 4:
        c = _load(S2, t, offs, KIND, ALIGNED, MASKED, end)
    p, a, b, c = rule(p, g, a, b, c, h0, h1, h2, h3, h4, h5, h6, h7, h8, h9)
    _store(P, t, offs, p, KIND, ALIGNED, MASKED, end)
    if MASK & 1:
        _store(S0, t, offs, a, KIND, ALIGNED, MASKED, end)
    if MASK & 2:
        _store(S1, t, offs, b, KIND, ALIGNED, MASKED, end)
    if MASK & 4:
        _store(S2, t, offs, c, KIND, ALIGNED, MASKED, end)


@triton.jit
def _kernel(P, G, S0, S1, S2, C, TID, CS, CE, MASK: tl.constexpr, KIND: tl.constexpr,
            ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(TID + pid)
    start = tl.load(CS + pid)
    end = tl.load(CE + pid)
    h0 = tl.load(C + t * 10 + 0)
    h1 = tl.load(C + t * 10 + 1)
    h2 = tl.load(C + t * 10 + 2)
    h3 = tl.load(C + t * 10 + 3)
    h4 = tl.load(C + t * 10 + 4)
    h5 = tl.load(C + t * 10 + 5)
    h6 = tl.load(C + t * 10 + 6)
    h7 = tl.load(C + t * 10 + 7)
    h8 = tl.load(C + t * 10 + 8)
    h9 = tl.load(C + t * 10 + 9)
    nfull = (end - start) // BLOCK
    for i in range(nfull):
        offs = start + i * BLOCK + tl.arange(0, BLOCK)
        if ALIGNED:  # chunk starts are multiples of CHUNK, hence of BLOCK
            offs = tl.max_contiguous(tl.multiple_of(offs, BLOCK), BLOCK)
        _block(P, G, S0, S1, S2, t, offs, end, h0, h1, h2, h3, h4, h5, h6, h7, h8, h9,
               MASK, KIND, ALIGNED, False)
    tail = start + nfull * BLOCK
    if tail < end:
        offs = tail + tl.arange(0, BLOCK)
        _block(P, G, S0, S1, S2, t, offs, end, h0, h1, h2, h3, h4, h5, h6, h7, h8, h9,
               MASK, KIND, ALIGNED, True)


KINDS = {"float32": 0, "float64": 1, "float16": 2, "bfloat16": 3}
_SOURCE_HASH = hashlib.sha256(inspect.getsource(rules).encode()).hexdigest()
_kernels = {}


def _rebind(fn, gl):
    """A copy of ``fn`` (a plain function or a JITFunction) whose globals are ``gl``."""
    py = getattr(fn, "fn", fn)
    return triton.jit(types.FunctionType(py.__code__, gl, py.__name__, py.__defaults__))


def build(rule, flags):
    """The kernel for one rule and flag set: a copy of _kernel whose `rule` is a copy of
    the rule with ``ops`` = triton.language and each flag a constexpr."""
    k = (rule, flags)
    if k not in _kernels:
        gl = {"__name__": rules.__name__, "ops": tl, "tl": tl, **{n: tl.constexpr(v) for n, v in flags}}
        for f in (*rules.HELPERS, rules.RULES[rule]):
            gl[f.__name__] = _rebind(f, gl)
        kgl = {"__name__": __name__, "tl": tl, "triton": triton, "rule": gl[rule]}
        for f in (_load, _store):
            kgl[f.fn.__name__] = _rebind(f, kgl)
        kgl["_block"] = _rebind(_block, kgl)
        _kernels[k] = _rebind(_kernel, kgl)
    return _kernels[k]


def run(rule, flags, dtype, mask, P, G, S, C, TID, CS, CE, aligned):
    """Launch ``rule`` over one group: one program per chunk.  All tables are int64 tensors
    on the params' device; C is [n, NCOEF] in the math dtype."""
    if TID.numel() == 0:
        return
    kernel = build(rule, flags)
    kernel[(TID.numel(),)](P, G, S[0], S[1], S[2], C, TID, CS, CE, MASK=mask,
                           KIND=KINDS[dtype], ALIGNED=aligned, BLOCK=BLOCK,
                           num_warps=NUM_WARPS, enable_fp_fusion=False)
