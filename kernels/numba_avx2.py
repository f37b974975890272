"""The 8-bit codes with AVX2 instructions (8 lanes of float32), for CPUs without AVX-512:
AMD Zen 2/3, Intel before Ice Lake.  numba_quant uses ``coded8`` when numba compiles for a
CPU with AVX2 and FMA but not AVX-512 (its own intrinsics run 16 lanes and byte permutes).

``coder`` computes what numba_quant's portable loop (qcode) computes, bit for bit
(tests/test_quant.py compares them, and the whole 8-bit kernel compiled for each kind of
CPU), eight values at a time.  The decade is the count of the map's boundaries (LOW[1..6],
TOP_MID) below y: seven compares, each lane mask added up, where the loop runs six compares
and twelve selects per element.  A decade is 0..7, so each of its four constants (qmap.PA,
PB, PK, PM) is one 8-entry permute (vpermps).  The step's figures per kind of CPU:
bench/cpu_kinds_8bit.py.

The map's values stay a load per code on these CPUs: an AVX2 gather (vgatherdps) of the
map measured 3x slower than the loads on this Intel Xeon compiled for haswell.
"""
import numba
from llvmlite import ir
from numba import types as nt
from numba.core import cgutils
from numba.extending import intrinsic

from . import qmap
from .numba_base import JIT

# a kind of x86 CPU for each of numba_quant's paths, as NUMBA_CPU_NAME and
# NUMBA_CPU_FEATURES (what tests and bench/cpu_kinds_8bit.py compile for): the portable
# loops, this module, AVX-512 codes with a load per value (no VBMI)
CPU_KINDS = {"portable": ("nehalem", "+sse4.2,+popcnt"),
             "avx2": ("haswell", "+avx,+avx2,+fma,+sse4.2,+popcnt,+bmi,+bmi2,+f16c"),
             "avx512": ("skylake-avx512", "+avx,+avx2,+fma,+sse4.2,+popcnt,+bmi,+bmi2,+f16c,"
                        "+avx512f,+avx512bw,+avx512dq,+avx512vl,+avx512cd")}

_I8, _I32, _F32 = ir.IntType(8), ir.IntType(32), ir.FloatType()
_V8F, _V8I = ir.VectorType(_F32, 8), ir.VectorType(_I32, 8)


def data_ptrs(context, builder, sig, args, n):
    # the data pointers of the intrinsic's first n arguments (arrays)
    return [cgutils.create_struct_proxy(sig.args[k])(context, builder, value=args[k]).data
            for k in range(n)]


def splat(builder, x, vtype):
    # a vector of type vtype with x in every lane
    return builder.shuffle_vector(
        builder.insert_element(ir.Constant(vtype, None), x, ir.Constant(_I32, 0)),
        ir.Constant(vtype, None), ir.Constant(ir.VectorType(_I32, vtype.count), [0] * vtype.count))


def _call(builder, name, ret, *args):
    fn = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(ret, [a.type for a in args]), name)
    return builder.call(fn, args)


def _coders(groups):
    # codes[j:j+8*groups] of f[j:j+8*groups]: numba_quant.qcode's float32 operations in the
    # same order (as numba_quant's AVX-512 coder, whose comments give the int32 formula)
    @intrinsic
    def coder(typingctx, codes, f, T, sc, inv, j, signed):
        sig = nt.void(codes, f, T, sc, inv, j, signed)

        def codegen(context, builder, sig, args):
            ptr = data_ptrs(context, builder, sig, args, 3)
            entry = lambda c: builder.load(  # noqa: E731
                builder.gep(ptr[2], [ir.Constant(_I32, c)]))
            bcast = lambda x: splat(builder, x, _V8F)  # noqa: E731
            const = lambda x: ir.Constant(_V8F, float(x))  # noqa: E731
            bounds = [bcast(entry(qmap.LOW + i)) for i in range(1, 7)]
            bounds.append(bcast(entry(qmap.TOP_MID)))
            low = bcast(entry(qmap.LOW))
            cols = {c: builder.load(builder.bitcast(builder.gep(ptr[2], [ir.Constant(_I32, c)]),
                                                    _V8F.as_pointer()), align=4)
                    for c in (qmap.PA, qmap.PB, qmap.PK, qmap.PM)}
            zero = ir.Constant(_V8I, 0)
            z = builder.select(builder.icmp_signed("!=", args[6], ir.Constant(args[6].type, 0)),
                               ir.Constant(_V8I, [127] * 8), zero)  # the code of 0
            for g in range(groups):
                at = builder.add(args[5], ir.Constant(args[5].type, 8 * g))
                x = builder.load(builder.bitcast(builder.gep(ptr[1], [at]), _V8F.as_pointer()),
                                 align=4)
                ax = _call(builder, "llvm.fabs.v8f32", _V8F, x)
                y = builder.fmul(builder.fmul(ax, bcast(args[3])), bcast(args[4]))
                d = zero  # the decade: how many boundaries lie below y (NaN: none)
                for bnd in bounds:
                    d = builder.sub(d, builder.sext(builder.fcmp_ordered(">", y, bnd), _V8I))
                pick = lambda c, d=d: _call(  # noqa: E731
                    builder, "llvm.x86.avx2.permps", _V8F, cols[c], d)
                ipick = lambda c: builder.bitcast(pick(c), _V8I)  # noqa: E731
                t = _call(builder, "llvm.fma.v8f32", _V8F, y, pick(qmap.PA),
                          builder.fneg(pick(qmap.PB)))
                t = builder.select(builder.fcmp_ordered(">", t, const(0)), t, const(0))
                ti = builder.fptosi(t, _V8I)  # (t in [0, ~2 PARTS]: defined)
                pm = ipick(qmap.PM)
                ti = builder.select(builder.icmp_signed("<", pm, ti), pm, ti)
                k = builder.add(ipick(qmap.PK), ti)
                k = builder.select(builder.fcmp_ordered(">", y, low), k, zero)
                kz = builder.select(builder.icmp_signed("<", z, k), z, k)  # min(k, z)
                pos = builder.or_(builder.fcmp_ordered(">=", x, const(0)),
                                  builder.icmp_signed("==", z, zero))
                code = builder.select(pos, builder.add(z, k), builder.sub(z, kz))
                out = builder.trunc(code, ir.VectorType(_I8, 8))
                builder.store(out, builder.bitcast(builder.gep(ptr[0], [at]),
                                                   ir.VectorType(_I8, 8).as_pointer()), align=1)
            return context.get_dummy_value()
        return sig, codegen
    return coder


assert qmap.QBLOCK % 64 == 0
codes8, codes_block = _coders(1), _coders(qmap.QBLOCK // 8)


@numba.njit(inline="always", **JIT)
def coded8(codes, f, T, sc, inv, lo, hi, signed):
    # codes[lo:hi] of f[lo:hi], hi - lo a multiple of 8: a whole block by codes_block (its
    # tables loaded once), else eight at a time
    if hi - lo == qmap.QBLOCK:
        codes_block(codes, f, T, sc, inv, lo, signed)
        return
    for j in range(lo, hi, 8):
        codes8(codes, f, T, sc, inv, j, signed)
