"""int8 activations for the q8_0 GEMV of a few decode streams, on CPUs with AVX-512 VNNI.

The float row kernel (`cpu_simd.q8_rows`) widens every int8 weight to float32 and spends one FMA per
weight: ~66 GF/s at best on the Intel Xeon of docs/results.md, short of the bandwidth bf16 weights get
(`benchmarks/cpu_gemm.py --rows 1 --cold`). Here x is quantized too, per block of 32 along K, as
llama.cpp's Q8_0 does for its activations:

    x ~= xq * dx[k // 32]          xq int8 in [-127, 127], dx = max |x| / 127 per block

and 64 int8 products are summed into 16 int32 lanes by one `vpdpbusd` (4 products a lane; lanes 0-7
hold block 2p, lanes 8-15 block 2p + 1). vpdpbusd multiplies unsigned by signed bytes, so it takes
|xq| and the weights with xq's sign moved onto them (w * sign(xq)); |w| <= 127, so the negation never
overflows. Each step then turns the lanes to float32 and applies both blocks' scales dw * dx with one
FMA into a float32 accumulator, so int32 sums never span more than 32 products (|sum| < 2**19).

Per 64 weights and row: one load, a masked negate, vpdpbusd, a conversion, the scales' load and
permute, a multiply and an FMA, against 4 loads, 4 widenings, 4 conversions and 4 FMAs (plus scales)
in the float kernel. The rounding of x adds an error of up to dx / 2 per element, as in llama.cpp; the
quality gates of tests/model compare greedy tokens and perplexity with float32.
"""
from __future__ import annotations

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

from cupaged.backend.cpu_simd import (_F32, _I8, _I32, _I64, _VF, QBLOCK, _accumulate, _fmuladd, _hsum, _load,
                                      _prefetch, _row_ptr)

STEP = 2 * QBLOCK  # int8 products per vpdpbusd: two blocks


def has_vnni() -> bool:
    """Whether Numba's code here may use AVX-512 VNNI (vpdpbusd on 512-bit registers): the host's
    features, or NUMBA_CPU_FEATURES where NUMBA_CPU_NAME names another CPU."""
    if numba.config.CPU_NAME and numba.config.CPU_NAME != "host":
        features = numba.config.CPU_FEATURES or ""
        return all(f"+{f}" in features for f in ("avx512f", "avx512bw", "avx512vnni"))
    host = llvm.get_host_cpu_features()
    return all(host.get(f) for f in ("avx512f", "avx512bw", "avx512vnni"))


VNNI = has_vnni()


def _vpdpbusd(builder: ir.IRBuilder, acc, a, b):
    """acc + the sums of 4 products a[4i + j] * b[4i + j] per int32 lane (a unsigned, b signed bytes)."""
    v16 = ir.VectorType(_I32, 16)
    name = "llvm.x86.avx512.vpdpbusd.512"
    fn = builder.module.globals.get(name) or ir.Function(builder.module, ir.FunctionType(v16, [v16] * 3), name)
    return builder.call(fn, [acc, builder.bitcast(a, v16), builder.bitcast(b, v16)])


def _codegen_rows(rows: int):
    """IR of `rows` dot products xq . w_r over `steps` steps of 64 (see the module docstring)."""
    v64 = ir.VectorType(_I8, 64)
    zero8, zero32 = ir.Constant(v64, None), ir.Constant(ir.VectorType(_I32, 16), None)
    halves = ir.Constant(ir.VectorType(ir.IntType(32), 16), [0] * 8 + [1] * 8)

    def codegen(context, builder, signature, args):
        xqp, dxp, wp, w_stride, sp, s_stride, steps, outp = args
        xq, dx = builder.inttoptr(xqp, _I8.as_pointer()), builder.inttoptr(dxp, _F32.as_pointer())
        ws = [_row_ptr(builder, wp, w_stride, r, _I8) for r in range(rows)]
        ss = [_row_ptr(builder, sp, s_stride, r, _F32) for r in range(rows)]

        def body(p, accs):
            off = builder.mul(p, ir.Constant(_I64, STEP))
            xv = _load(builder, xq, off, v64, 1)
            neg = builder.icmp_signed("<", xv, zero8)
            ax = builder.select(neg, builder.sub(zero8, xv), xv)
            dxv = _load(builder, dx, builder.mul(p, ir.Constant(_I64, 16)), _VF, 4)
            new = []
            for r in range(rows):
                _prefetch(builder, ws[r], off, w_stride, _I8)
                w = _load(builder, ws[r], off, v64, 1)
                dots = _vpdpbusd(builder, zero32, ax, builder.select(neg, builder.sub(zero8, w), w))
                pair = _load(builder, ss[r], builder.mul(p, ir.Constant(_I64, 2)), ir.VectorType(_F32, 2), 4)
                dw = builder.shuffle_vector(pair, ir.Constant(pair.type, ir.Undefined), halves)
                new.append(_fmuladd(builder, builder.sitofp(dots, _VF), builder.fmul(dw, dxv), accs[r]))
            return new

        finals = _accumulate(builder, steps, 1, rows, _VF, body)
        out = builder.inttoptr(outp, _F32.as_pointer())
        for r in range(rows):
            builder.store(_hsum(builder, finals[r]), builder.gep(out, [ir.Constant(_I64, r)]), align=4)
        return context.get_dummy_value()
    return codegen


def _make(rows: int):
    @intrinsic
    def vnni_rows(typingctx, xqp, dxp, wp, w_stride, sp, s_stride, steps, outp):
        """out[r] = sum over blocks of dx * dw_r * (xq . w_r), r < rows: xq int8 [steps * 64] at xqp, dx
        float32 [steps * 16] at dxp (each block's scale 8 times, see quantize_x), row r's int8 weights
        at wp + r * w_stride and float32 scales at sp + r * s_stride (bytes); out float32 at outp."""
        args = (xqp, dxp, wp, w_stride, sp, s_stride, steps, outp)
        if not all(isinstance(a, types.Integer) and a.bitwidth == 64 for a in args):
            return None
        return types.void(*args), _codegen_rows(rows)
    return vnni_rows


vnni_rows1, vnni_rows4 = _make(1), _make(4)


@numba.njit(cache=True, nogil=True)
def quantize_x(x, xq, dx):
    """x [M, K] float32 -> xq [M, K] int8 = round(x / d), d = max |x| / 127 per block of 32, and
    dx [M, K / 4] float32: for each pair of blocks, the first's d 8 times, then the second's 8 times
    (the lane order of vnni_rows' int32 sums). K a multiple of 64."""
    for m in range(x.shape[0]):
        for b in range(x.shape[1] // QBLOCK):
            k0 = b * QBLOCK
            amax = np.float32(0.0)
            for j in range(QBLOCK):
                amax = max(amax, abs(x[m, k0 + j]))
            d = amax / np.float32(127.0)
            inv = np.float32(127.0) / amax if amax > 0 else np.float32(0.0)
            for j in range(QBLOCK):
                xq[m, k0 + j] = np.int8(np.rint(x[m, k0 + j] * inv))
            for e in range(8):
                dx[m, (b // 2) * 16 + (b % 2) * 8 + e] = d
