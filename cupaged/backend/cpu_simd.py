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
in the reference (`Q8Matrix.dequantize` then a float32 dot), summed in another order. The same
generator makes the float32 and bf16 row kernels (`dot_rows1/4`, one-stream GEMV) and, for AVX-512,
the GEMM's 6 x 4 tile (`tile`).

A caveat for whoever edits this file: Numba's disk cache knows a function by its own source file,
so kernels that inline these intrinsics (cpu_gemm.py, cpu_quant.py, cpu_kernels.py) keep their cached
code when only this file, cpu_vnni.py or cpu_simd_attn.py changes. Delete their
cupaged/backend/__pycache__/*.nbi/*.nbc files (or touch them) after such a change. An installed wheel
is not affected (new files, new cache).
"""
from __future__ import annotations

import llvmlite.binding as llvm
import numba
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload


def wide_vectors() -> bool:
    """Whether Numba's code here has AVX-512's 32 vector registers: the host's features, or where
    NUMBA_CPU_NAME names another CPU (to time AVX2 code on an AVX-512 host, say), NUMBA_CPU_FEATURES."""
    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":
        return "+avx512f" in (numba.config.CPU_FEATURES or "")
    return bool(llvm.get_host_cpu_features().get("avx512f"))


LANES = 16
TILE_LANES, TILE_M, TILE_N = (16, 6, 4) if wide_vectors() else (8, 4, 2)  # see _codegen_tile
QBLOCK = 32
_F32, _I8, _I16, _I32, _I64 = ir.FloatType(), ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_VF = ir.VectorType(_F32, LANES)


def _vec(elem, lanes: int = LANES) -> ir.VectorType:
    return ir.VectorType(elem, lanes)


def _fmuladd(builder: ir.IRBuilder, a, b, c):
    """a * b + c on float vectors, fused where the CPU has FMA (llvm.fmuladd)."""
    name = f"llvm.fmuladd.v{a.type.count}f32"
    fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(a.type, [a.type] * 3), name)
    return builder.call(fn, [a, b, c])


def _splat(builder: ir.IRBuilder, s):
    """A float as <16 x float> of it."""
    v = builder.insert_element(ir.Constant(_VF, ir.Undefined), s, ir.Constant(ir.IntType(32), 0))
    return builder.shuffle_vector(v, ir.Constant(_VF, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), LANES),
                                                                                  [0] * LANES))


def _hsum(builder: ir.IRBuilder, v, combine=None):
    """The sum of a float vector's lanes, by halving (16: 8 + 4 + 2 + 1); with combine(lo, hi), that
    reduction instead of the sum (the max, say)."""
    combine = combine or builder.fadd
    n = v.type.count
    while n > 1:
        n //= 2
        lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), n), list(range(n))))
        hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), n), list(range(n, 2 * n))))
        v = combine(lo, hi)
    return builder.extract_element(v, ir.Constant(ir.IntType(32), 0))


def _transpose_sum(builder: ir.IRBuilder, vs):
    """n float vectors of LANES lanes (n a power of 2 <= LANES) -> one <n x float>, lane j = the sum of
    vs[j]'s lanes. Each level adds the two halves of every group of lanes of a pair of vectors side by
    side (groups of 16 -> 8 -> 4 ... lanes, one vector holding n groups), then halves the groups within
    that vector down to one lane each: 15 adds for 16 vectors, where 16 _hsum take 64 (and as many
    shuffles). The GEMM tile's per-row sums and decode attention's scores come out this way."""
    n = len(vs)

    def pair(a, b, lo, off):
        idx = ir.VectorType(ir.IntType(32), len(lo))
        return builder.fadd(builder.shuffle_vector(a, b, ir.Constant(idx, lo)),
                            builder.shuffle_vector(a, b, ir.Constant(idx, [x + off for x in lo])))
    w = LANES // 2
    while len(vs) > 1:
        lo = [g * 2 * w + i for g in range(LANES // w) for i in range(w)]
        vs = [pair(a, b, lo, w) for a, b in zip(vs[0::2], vs[1::2])]
        w //= 2
    v, g = vs[0], LANES // n  # vector j's partial sums in lanes g j .. g j + g - 1
    while g > 1:
        v = pair(v, v, [j * g + i for j in range(n) for i in range(g // 2)], g // 2)
        g //= 2
    return v


def _load(builder: ir.IRBuilder, base, offset, vtype, align: int):
    ptr = builder.gep(base, [offset])
    return builder.load(builder.bitcast(ptr, vtype.as_pointer()), align=align)


def _row_ptr(builder: ir.IRBuilder, base, stride, r: int, elem):
    return builder.inttoptr(builder.add(base, builder.mul(stride, ir.Constant(_I64, r))), elem.as_pointer())


def _widened(builder: ir.IRBuilder, kind: str, row, off, lanes: int = LANES):
    """`lanes` weights of a row from element `off` on, as a float32 vector."""
    vf = _vec(_F32, lanes)
    if kind == "q8":
        return builder.sitofp(_load(builder, row, off, _vec(_I8, lanes), 1), vf)
    if kind == "bf16":  # the top half of a float32: zero-extend, shift left 16, bitcast
        bits = builder.zext(_load(builder, row, off, _vec(_I16, lanes), 2), _vec(_I32, lanes))
        return builder.bitcast(builder.shl(bits, ir.Constant(_vec(_I32, lanes), [16] * lanes)), vf)
    return _load(builder, row, off, vf, 4)


PREFETCH_ROWS = 4  # how far ahead the row kernels prefetch: the same place, this many rows on


def _prefetch(builder: ir.IRBuilder, row, off, w_stride, elem) -> None:
    """Ask for the cache line PREFETCH_ROWS rows below row[off] (llvm.prefetch: a hint, never a fault,
    so past the matrix's end is harmless). Weights come from memory one row after the next; with more
    work per byte (bf16, int8) the core's own lookahead covers too few lines to keep memory busy."""
    name = "llvm.prefetch.p0i8"  # typed-pointer name; LLVM upgrades it where pointers are opaque
    i8p, i32 = _I8.as_pointer(), ir.IntType(32)
    fn = builder.module.globals.get(name) or ir.Function(
        builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), name)
    here = builder.bitcast(builder.gep(row, [off]), i8p)
    ahead = builder.gep(here, [builder.mul(w_stride, ir.Constant(_I64, PREFETCH_ROWS))])
    builder.call(fn, [ahead, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])


def _accumulate(builder: ir.IRBuilder, count, step: int, n_acc: int, vtype, body) -> list:
    """The loop every kernel here is: for i = 0, step, 2 step, ... < count, accumulators = body(i,
    accumulators), all kept in registers (phi nodes), starting from zeros. Returns their final values
    (zeros when count <= 0), with the builder after the loop."""
    zero = ir.Constant(vtype, None)
    entry = builder.block
    loop = builder.append_basic_block("simd.loop")
    done = builder.append_basic_block("simd.done")
    builder.cbranch(builder.icmp_signed(">", count, ir.Constant(_I64, 0)), loop, done)
    builder.position_at_end(loop)
    i = builder.phi(_I64)
    accs = [builder.phi(vtype) for _ in range(n_acc)]
    new = body(i, accs)
    i_next = builder.add(i, ir.Constant(_I64, step))
    tail = builder.block
    builder.cbranch(builder.icmp_signed("<", i_next, count), loop, done)
    i.add_incoming(ir.Constant(_I64, 0), entry)
    i.add_incoming(i_next, tail)
    for acc, nxt in zip(accs, new):
        acc.add_incoming(zero, entry)
        acc.add_incoming(nxt, tail)
    builder.position_at_end(done)
    finals = [builder.phi(vtype) for _ in new]  # phis first: LLVM wants them at the block's top
    for final, nxt in zip(finals, new):
        final.add_incoming(zero, entry)
        final.add_incoming(nxt, tail)
    return finals


def _codegen_rows(rows: int, kind: str):
    """IR of `rows` dot products over nb blocks of 32 (see the module docstring). q8: one accumulator
    per row, each block's 32 products scaled by the block's scale; bf16 and f32: two per row (one per
    16 lanes), so two FMA chains run side by side."""
    elem = {"q8": _I8, "bf16": _I16, "f32": _F32}[kind]

    def codegen(context, builder, signature, args):
        xp, wp, w_stride, sp, s_stride, nb, outp = args
        x = builder.inttoptr(xp, _F32.as_pointer())
        ws = [_row_ptr(builder, wp, w_stride, r, elem) for r in range(rows)]
        ss = [_row_ptr(builder, sp, s_stride, r, _F32) for r in range(rows)] if kind == "q8" else []
        per_row = 1 if kind == "q8" else 2

        def body(b, accs):
            off = builder.mul(b, ir.Constant(_I64, QBLOCK))
            off2 = builder.add(off, ir.Constant(_I64, LANES))
            x0, x1 = _load(builder, x, off, _VF, 4), _load(builder, x, off2, _VF, 4)
            new = []
            for r in range(rows):
                _prefetch(builder, ws[r], off, w_stride, elem)
                if kind == "f32":  # 32 float32 weights span two cache lines
                    _prefetch(builder, ws[r], off2, w_stride, elem)
                w0, w1 = _widened(builder, kind, ws[r], off), _widened(builder, kind, ws[r], off2)
                if kind == "q8":
                    t = _fmuladd(builder, x1, w1, builder.fmul(x0, w0))
                    s = builder.load(builder.gep(ss[r], [b]), align=4)
                    new.append(_fmuladd(builder, t, _splat(builder, s), accs[r]))
                else:
                    new += [_fmuladd(builder, x0, w0, accs[2 * r]), _fmuladd(builder, x1, w1, accs[2 * r + 1])]
            return new

        finals = _accumulate(builder, nb, 1, rows * per_row, _VF, body)
        out = builder.inttoptr(outp, _F32.as_pointer())
        for r in range(rows):
            v = finals[r] if per_row == 1 else builder.fadd(finals[2 * r], finals[2 * r + 1])
            builder.store(_hsum(builder, v), builder.gep(out, [ir.Constant(_I64, r)]), align=4)
        return context.get_dummy_value()
    return codegen


def _make(rows: int, kind: str):
    @intrinsic
    def dot_rows(typingctx, xp, wp, w_stride, sp, s_stride, nb, outp):
        """out[r] = x . row r of w, r < rows: x float32 [nb * 32] at xp; row r's weights (int8, bf16
        bits or float32, by kind) at wp + r * w_stride and, for q8, its float32 scales at sp + r *
        s_stride (strides in bytes; sp and s_stride unused otherwise); out float32 at outp."""
        args = (xp, wp, w_stride, sp, s_stride, nb, outp)
        if not all(isinstance(a, types.Integer) and a.bitwidth == 64 for a in args):
            return None
        return types.void(*args), _codegen_rows(rows, kind)
    return dot_rows


q8_rows1, q8_rows4 = _make(1, "q8"), _make(4, "q8")
bf16_rows1, bf16_rows4 = _make(1, "bf16"), _make(4, "bf16")
f32_rows1, f32_rows4 = _make(1, "f32"), _make(4, "f32")


def _codegen_tile(mr: int, nr: int, kind: str, lanes: int):
    """IR of an mr x nr tile, out[m, n] = x[m] . w[n] over K (a multiple of lanes): mr x nr vector
    accumulators, each K step loading mr vectors of x and one widened vector of each w row, summed
    across lanes once at the end. 6 x 4 x 16 lanes fills AVX-512's 32 registers to 31 (24 accumulators,
    6 of x, 1 of w: 10 loads per 24 FMAs); 4 x 2 x 8 lanes would fill AVX2's 16 to 13."""
    elem = {"bf16": _I16, "f32": _F32}[kind]
    vf = _vec(_F32, lanes)

    def codegen(context, builder, signature, args):
        xp, x_stride, wp, w_stride, steps, outp, o_stride = args
        xs = [_row_ptr(builder, xp, x_stride, m, _F32) for m in range(mr)]
        ws = [_row_ptr(builder, wp, w_stride, n, elem) for n in range(nr)]

        def body(i, accs):
            off = builder.mul(i, ir.Constant(_I64, lanes))
            xv = [_load(builder, xs[m], off, vf, 4) for m in range(mr)]
            new = [None] * (mr * nr)
            for n in range(nr):
                wv = _widened(builder, kind, ws[n], off, lanes)
                for m in range(mr):
                    new[m * nr + n] = _fmuladd(builder, xv[m], wv, accs[m * nr + n])
            return new

        finals = _accumulate(builder, steps, 1, mr * nr, vf, body)
        for m in range(mr):
            row = _row_ptr(builder, outp, o_stride, m, _F32)
            accs = finals[m * nr:(m + 1) * nr]
            if nr == 4 and lanes == LANES:  # one tree for the row's 4 sums, one 16-byte store
                builder.store(_transpose_sum(builder, accs),
                              builder.bitcast(row, ir.VectorType(_F32, 4).as_pointer()), align=4)
                continue
            for n in range(nr):
                builder.store(_hsum(builder, accs[n]), builder.gep(row, [ir.Constant(_I64, n)]), align=4)
        return context.get_dummy_value()
    return codegen


def tile(w, xp, x_stride, wp, w_stride, steps, outp, o_stride):
    """out[0:TILE_M, 0:TILE_N] = x[0:TILE_M] . w[0:TILE_N] over steps * TILE_LANES elements of K
    (strides in bytes; x float32, w float32 or bf16 bits by w's dtype, out float32)."""
    raise NotImplementedError("compiled only")


def _tile_for(kind: str):
    @intrinsic
    def tile_kernel(typingctx, xp, x_stride, wp, w_stride, steps, outp, o_stride):
        args = (xp, x_stride, wp, w_stride, steps, outp, o_stride)
        if not all(isinstance(a, types.Integer) and a.bitwidth == 64 for a in args):
            return None
        return types.void(*args), _codegen_tile(TILE_M, TILE_N, kind, TILE_LANES)
    return tile_kernel


_tiles = {types.float32: _tile_for("f32"), types.uint16: _tile_for("bf16")}


@overload(tile, inline="always")
def _tile(w, xp, x_stride, wp, w_stride, steps, outp, o_stride):
    fn = _tiles.get(w.dtype)
    if fn is None:
        return None
    return lambda w, xp, x_stride, wp, w_stride, steps, outp, o_stride: fn(xp, x_stride, wp, w_stride, steps, outp,
                                                                            o_stride)


def dot_rows4(w, xp, wp, w_stride, nb, outp):
    """f32_rows4 or bf16_rows4 by w's dtype (float32 or bf16 bits), for code generic over both."""
    raise NotImplementedError("compiled only")


def dot_rows1(w, xp, wp, w_stride, nb, outp):
    """f32_rows1 or bf16_rows1 by w's dtype."""
    raise NotImplementedError("compiled only")


def _by_dtype(four: bool):
    def typer(w, xp, wp, w_stride, nb, outp):
        kernel = {types.float32: (f32_rows1, f32_rows4), types.uint16: (bf16_rows1, bf16_rows4)}.get(w.dtype)
        if kernel is None:
            return None
        fn = kernel[1] if four else kernel[0]
        return lambda w, xp, wp, w_stride, nb, outp: fn(xp, wp, w_stride, 0, 0, nb, outp)
    return typer


overload(dot_rows4, inline="always")(_by_dtype(True))
overload(dot_rows1, inline="always")(_by_dtype(False))


SCORE_CHAINS = 4  # partial sums per score, over d = 0, 1, 2, 3 (mod 4): 4x shorter float32 chains
PV_OUTS = 8  # output dims per P @ V call: 8 independent FMA chains, 9 loads per 8 FMAs


def _codegen_bcast(outs: int, chains: int, scaled: bool):
    """IR of out_o[0:16] (+)= sum over i < n of a_i[0:16] * b_o[i], o < outs: a 16-row vector against
    `outs` broadcast scalars per step i, no sum across lanes. The attention kernels keep query rows
    as vector lanes: the scores are s_j = sum over d of qT[d] * k_j[d] (a = qT, b_j = key j), P @ V is
    accT[d] = alpha * accT[d] + sum over keys i of P[i] * v_i[d] (a = P, b_d = column d of V).
    Each output keeps `chains` partial sums (i mod chains), added pairwise at the end: one chain of
    64 float32 FMAs per score lost the float64 reference's 1e-5 at scores of a few hundred. n must be
    a multiple of chains. scaled: out_o = out_o * alpha + sum (alpha a 16-row vector), else out_o = sum."""
    def codegen(context, builder, signature, args):
        ap, a_stride, bp, b_out, b_step, n, outp, o_stride, alphap = args
        bs = [_row_ptr(builder, bp, b_out, o, _I8) for o in range(outs)]

        def body(i, accs):
            new = []
            for c in range(chains):
                ic = builder.add(i, ir.Constant(_I64, c))
                av = builder.load(builder.inttoptr(builder.add(ap, builder.mul(ic, a_stride)), _VF.as_pointer()),
                                  align=4)
                for o in range(outs):
                    at = builder.bitcast(builder.gep(bs[o], [builder.mul(ic, b_step)]), _F32.as_pointer())
                    new.append(_fmuladd(builder, av, _splat(builder, builder.load(at, align=4)), accs[c * outs + o]))
            return new

        finals = _accumulate(builder, n, chains, outs * chains, _VF, body)
        alpha = builder.load(builder.inttoptr(alphap, _VF.as_pointer()), align=4) if scaled else None
        for o in range(outs):
            parts = [finals[c * outs + o] for c in range(chains)]
            while len(parts) > 1:  # pairwise
                parts = [builder.fadd(parts[i], parts[i + 1]) for i in range(0, len(parts), 2)]
            at = builder.inttoptr(builder.add(outp, builder.mul(o_stride, ir.Constant(_I64, o))), _VF.as_pointer())
            total = _fmuladd(builder, builder.load(at, align=4), alpha, parts[0]) if scaled else parts[0]
            builder.store(total, at, align=4)
        return context.get_dummy_value()
    return codegen


def _make_bcast(outs: int, chains: int, scaled: bool):
    @intrinsic
    def bcast(typingctx, ap, a_stride, bp, b_out, b_step, n, outp, o_stride, alphap):
        """out_o[0:16] = (out_o * alpha if scaled) + sum over i < n of a_i[0:16] * b_o[i] for o < outs:
        a_i float32 [16] at ap + i * a_stride, b_o[i] float32 at bp + o * b_out + i * b_step, out_o float32
        [16] at outp + o * o_stride, alpha float32 [16] at alphap (unused unless scaled); bytes."""
        args = (ap, a_stride, bp, b_out, b_step, n, outp, o_stride, alphap)
        if not all(isinstance(a, types.Integer) and a.bitwidth == 64 for a in args):
            return None
        return types.void(*args), _codegen_bcast(outs, chains, scaled)
    return bcast


scores1, scores4 = _make_bcast(1, SCORE_CHAINS, False), _make_bcast(4, SCORE_CHAINS, False)
pv_rows = _make_bcast(PV_OUTS, 1, True)
