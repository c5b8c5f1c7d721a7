"""Explicit SIMD for decode attention: one query row against 16 keys of a cache block, written as LLVM IR.

The Numba loop it replaces (`cpu_kernels._attend_block`) sums each score across a vector, runs the
softmax a key at a time and reloads the accumulator for every 4 keys: ~11 GF/s, 29% of a 16-stream
q8_0 decode step on the Intel Xeon of docs/results.md (`benchmarks/decode_breakdown.py --batch 16`). `attend16` keeps the work in registers:

    scores    16 accumulators (one per key) of q[d:d+16] * k_j[d:d+16] over d, then one transpose-and-add
              tree (cpu_simd._transpose_sum) turns them into a single vector s, lane j = key j's score
    softmax   the block's max, the running max m and sum l updated once, p = exp(s - m) as a vector
    P @ V     acc[d:d+16] = alpha * acc[d:d+16] + sum over j of p_j * v_j[d:d+16], p_j broadcast from p

It takes a whole window of 16 valid keys: the caller sends a block's partial ends (a sequence's last
block, a sliding window's edge) through the Numba loop, so no lane is ever masked here and a stale
value in an unused slot of a block is never read. The online-softmax state (acc [D], (m, l)) is the
Numba loop's own, so the two interleave on one row. e**x is cpu_math.exp_f32's polynomial, on vectors.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from cupaged.backend.cpu_math import LOG2E
from cupaged.backend.cpu_simd import (_F32, _I32, _I64, _VF, LANES, _accumulate, _fmuladd, _hsum, _splat,
                                      _transpose_sum)

KEYS = 16  # keys per call: one vector of scores
# cpu_math.exp_f32's coefficients of 2**f on [-1/2, 1/2], highest degree first
EXP2_POLY = (1.5252733804059840e-5, 1.5403530393381606e-4, 1.3333558146428443e-3, 9.6181291076284772e-3,
             5.5504108664821580e-2, 2.4022650695910071e-1, 6.9314718055994531e-1, 1.0)


def _const(x: float):
    return ir.Constant(_VF, [float(x)] * LANES)


def _exp(builder: ir.IRBuilder, x):
    """e**x lane-wise, as cpu_math.exp_f32: 2**n * 2**f, arguments clamped to 2**+-125."""
    t = builder.fmul(x, _const(LOG2E))
    t = builder.select(builder.fcmp_ordered(">", t, _const(125.0)), _const(125.0), t)
    t = builder.select(builder.fcmp_ordered("<", t, _const(-125.0)), _const(-125.0), t)
    floor = builder.module.globals.get("llvm.floor.v16f32") or ir.Function(
        builder.module, ir.FunctionType(_VF, [_VF]), "llvm.floor.v16f32")
    n = builder.call(floor, [builder.fadd(t, _const(0.5))])
    f = builder.fsub(t, n)
    p = _const(EXP2_POLY[0])
    for c in EXP2_POLY[1:]:
        p = _fmuladd(builder, p, f, _const(c))
    vi = ir.VectorType(_I32, LANES)
    bits = builder.shl(builder.add(builder.fptosi(n, vi), ir.Constant(vi, [127] * LANES)),
                       ir.Constant(vi, [23] * LANES))
    return builder.fmul(p, builder.bitcast(bits, _VF))


def _hmax(builder: ir.IRBuilder, v):
    """The largest lane of a float vector."""
    return _hsum(builder, v, lambda lo, hi: builder.select(builder.fcmp_ordered(">", lo, hi), lo, hi))


def _vec_at(builder: ir.IRBuilder, base, offset):
    """The <16 x float> at byte address base + offset."""
    return builder.inttoptr(builder.add(base, offset), _VF.as_pointer())


def _codegen(context, builder, signature, args):
    qp, kp, k_stride, vp, v_stride, d_n, accp, mlp = args
    four = ir.Constant(_I64, 4)
    rows = [builder.mul(k_stride, ir.Constant(_I64, j)) for j in range(KEYS)]

    def scores(d, accs):
        off = builder.mul(d, four)
        qv = builder.load(_vec_at(builder, qp, off), align=4)
        return [_fmuladd(builder, qv, builder.load(_vec_at(builder, builder.add(kp, rows[j]), off), align=4),
                         accs[j]) for j in range(KEYS)]

    s = _transpose_sum(builder, _accumulate(builder, d_n, LANES, KEYS, _VF, scores))
    ml = builder.inttoptr(mlp, _F32.as_pointer())
    m_ptr, l_ptr = ml, builder.gep(ml, [ir.Constant(_I64, 1)])
    m_old, l_old, bm = builder.load(m_ptr, align=4), builder.load(l_ptr, align=4), _hmax(builder, s)
    mn = builder.select(builder.fcmp_ordered(">", bm, m_old), bm, m_old)
    alpha = _exp(builder, _splat(builder, builder.fsub(m_old, mn)))  # m_old = -inf: 2**-125, times l = 0
    p = _exp(builder, builder.fsub(s, _splat(builder, mn)))
    builder.store(mn, m_ptr, align=4)
    alpha0 = builder.extract_element(alpha, ir.Constant(ir.IntType(32), 0))
    builder.store(builder.fadd(builder.fmul(l_old, alpha0), _hsum(builder, p)), l_ptr, align=4)
    idx = ir.VectorType(ir.IntType(32), LANES)
    pj = [builder.shuffle_vector(p, p, ir.Constant(idx, [j] * LANES)) for j in range(KEYS)]
    vrows = [builder.mul(v_stride, ir.Constant(_I64, j)) for j in range(KEYS)]

    def pv(d, accs):
        off = builder.mul(d, four)
        at = _vec_at(builder, accp, off)
        a = builder.fmul(builder.load(at, align=4), alpha)
        for j in range(KEYS):
            a = _fmuladd(builder, pj[j], builder.load(_vec_at(builder, builder.add(vp, vrows[j]), off), align=4), a)
        builder.store(a, at, align=4)
        return []

    _accumulate(builder, d_n, LANES, 0, _VF, pv)
    return context.get_dummy_value()


@intrinsic
def attend16(typingctx, qp, kp, k_stride, vp, v_stride, d_n, accp, mlp):
    """One query row against KEYS keys, all visible, online-softmax update (see the module docstring):
    q float32 [d_n] at qp (pre-scaled), key j's float32 [d_n] at kp + j * k_stride, value j's at vp + j *
    v_stride (bytes), acc float32 [d_n] at accp and (running max, running sum) float32 at mlp, both
    updated in place. d_n a multiple of 16."""
    args = (qp, kp, k_stride, vp, v_stride, d_n, accp, mlp)
    if not all(isinstance(a, types.Integer) and a.bitwidth == 64 for a in args):
        return None
    return types.void(*args), _codegen
