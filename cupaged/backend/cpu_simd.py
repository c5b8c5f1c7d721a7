"""Explicit SIMD for the CPU GEMV of q8_0 weights: the loop over a row's blocks written as LLVM IR.

Numba leaves vectorization to LLVM, and LLVM does badly with the q8_0 dot product: the 32 products
of a block must be summed before its scale applies, and with 32 known at compile time LLVM unrolls
the block into scalar code; read at run time, it vectorizes the block but then sums it across the
register once per block. Either way one decode stream ran at ~11 GF/s on an AVX-512 Xeon, compute
bound, where the weights stream in at ~25 GB/s.

`q8_rows(R)` is an intrinsic that computes R dot products x . w_r for R rows of a Q8Matrix in one
pass over x, keeping everything in vector registers across blocks:

    for each block b of 32:            acc_r += (x[b] * float(q_r[b])) * scale_r[b]     (lane-wise)
    at the end:                        out[r] = sum of acc_r's 16 lanes

x is read once for the R rows. The vectors are <16 x float>: one register with AVX-512, two with
AVX2 (LLVM splits them), so one source serves both. The products are float32 with float32 sums, as
in the reference (`Q8Matrix.dequantize` then a float32 dot), summed in another order.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

LANES = 16
QBLOCK = 32
_F32, _I8, _I64 = ir.FloatType(), ir.IntType(8), ir.IntType(64)
_VF, _VB = ir.VectorType(_F32, LANES), ir.VectorType(_I8, LANES)


def _fmuladd(builder: ir.IRBuilder, a, b, c):
    """a * b + c, fused where the CPU has FMA (llvm.fmuladd)."""
    name = f"llvm.fmuladd.v{LANES}f32"
    fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(_VF, [_VF] * 3), name)
    return builder.call(fn, [a, b, c])


def _splat(builder: ir.IRBuilder, s):
    """A float as <16 x float> of it."""
    v = builder.insert_element(ir.Constant(_VF, ir.Undefined), s, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(_VF, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), LANES),
                                                                                  [0] * LANES))


def _hsum(builder: ir.IRBuilder, v):
    """The sum of a <16 x float>'s lanes, by halving (8 + 4 + 2 + 1)."""
    n = LANES
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), n), list(range(n, 2 * n))))
        v = builder.fadd(lo, hi)
    return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))


def _load(builder: ir.IRBuilder, base, offset, vtype, align: int):
    ptr = builder.gep(base, [offset])
    return builder.load(builder.bitcast(ptr, vtype.as_pointer()), align=align)


def _codegen_rows(rows: int):
    def codegen(context, builder, signature, args):
        xp, qp, q_stride, sp, s_stride, nb, outp = args
        x = builder.inttoptr(xp, _F32.as_pointer())
        qs = [builder.inttoptr(builder.add(qp, builder.mul(q_stride, ir.Constant(_I64, r))), _I8.as_pointer())
              for r in range(rows)]
        ss = [builder.inttoptr(builder.add(sp, builder.mul(s_stride, ir.Constant(_I64, r))), _F32.as_pointer())
              for r in range(rows)]
        zero = ir.Constant(_VF, None)
        entry = builder.block
        loop = builder.append_basic_block("q8.loop")
        done = builder.append_basic_block("q8.done")
        builder.cbranch(builder.icmp_signed(">", nb, ir.Constant(_I64, 0)), loop, done)

        builder.position_at_end(loop)
        b = builder.phi(_I64)
        accs = [builder.phi(_VF) for _ in range(rows)]
        off = builder.mul(b, ir.Constant(_I64, QBLOCK))
        off2 = builder.add(off, ir.Constant(_I64, LANES))
        x0, x1 = _load(builder, x, off, _VF, 4), _load(builder, x, off2, _VF, 4)
        new = []
        for r in range(rows):
            q0 = builder.sitofp(_load(builder, qs[r], off, _VB, 1), _VF)
            q1 = builder.sitofp(_load(builder, qs[r], off2, _VB, 1), _VF)
            t = _fmuladd(builder, x1, q1, builder.fmul(x0, q0))
            s = builder.load(builder.gep(ss[r], [b]), align=4)
            new.append(_fmuladd(builder, t, _splat(builder, s), accs[r]))
        b_next = builder.add(b, ir.Constant(_I64, 1))
        tail = builder.block
        builder.cbranch(builder.icmp_signed("<", b_next, nb), loop, done)
        b.add_incoming(ir.Constant(_I64, 0), entry)
        b.add_incoming(b_next, tail)
        for acc, nxt in zip(accs, new):
            acc.add_incoming(zero, entry)
            acc.add_incoming(nxt, tail)

        builder.position_at_end(done)
        finals = [builder.phi(_VF) for _ in range(rows)]  # phis first: LLVM wants them at the block's top
        for final, nxt in zip(finals, new):
            final.add_incoming(zero, entry)
            final.add_incoming(nxt, tail)
        out = builder.inttoptr(outp, _F32.as_pointer())
        for r, final in enumerate(finals):
            builder.store(_hsum(builder, final), builder.gep(out, [ir.Constant(_I64, r)]), align=4)
        return context.get_dummy_value()
    return codegen


def _make(rows: int):
    @intrinsic
    def q8_rows(typingctx, xp, qp, q_stride, sp, s_stride, nb, outp):
        """out[r] = x . dequantized row r, r < rows: x float32 [nb * 32] at xp; the rows' int8 values
        at qp + r * q_stride and float32 scales at sp + r * s_stride (bytes); out float32 at outp."""
        args = (xp, qp, q_stride, sp, s_stride, nb, outp)
        if not all(isinstance(a, types.Integer) and a.bitwidth == 64 for a in args):
            return None
        return types.void(*args), _codegen_rows(rows)
    return q8_rows


q8_rows1, q8_rows2, q8_rows4 = _make(1), _make(2), _make(4)
