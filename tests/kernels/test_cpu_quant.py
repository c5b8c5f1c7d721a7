"""Q8_0-style weights on the CPU: quantization error within half a step of its block's scale, and
matmul_q8 against float64 on the dequantized weights (so only its float32 arithmetic is under test),
over shapes that are not multiples of its tiles, 1-3 threads; the ops take such weights in linear
and embedding. With int8 activations (cpu_vnni, AVX-512 VNNI hosts), x is quantized as llama.cpp's
Q8_0 does and the reference is float64 on both dequantized sides."""
from __future__ import annotations

import numpy as np
import pytest

from cupaged.backend.cpu import CpuOps
from cupaged.backend.cpu_quant import QBLOCK, SIMD_ROWS, Q8Matrix, matmul_q8, quantize_q8_0
from cupaged.backend.cpu_vnni import VNNI, quantize_x

F32 = np.float32


def test_quantize_is_within_half_a_step():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((37, 96)).astype(F32) * rng.uniform(0.01, 10, (37, 1)).astype(F32)
    w[3, 32:64] = 0  # an all-zero block: scale 0, values 0
    m = quantize_q8_0(w, chunk_rows=8)
    assert m.q.dtype == np.int8 and m.scale.shape == (37, 3) and np.abs(m.q.astype(int)).max() <= 127
    step = np.repeat(m.scale, QBLOCK, axis=1)
    assert np.all(np.abs(m.dequantize() - w) <= step / 2 + 1e-7)
    assert m.scale[3, 1] == 0 and not m.q[3, 32:64].any()
    np.testing.assert_allclose(m.scale, np.abs(w.reshape(37, 3, 32)).max(axis=2) / 127, rtol=1e-6)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_q8_0(np.ones((4, 40), F32))


def x_as_int8(x):
    """x [M, K] as the int8 activations see it, in float64: per block of 32, d = max |x| / 127 and
    round(x * (127 / max |x|)) * d (the scale's reciprocal in float32, as the kernel takes it)."""
    blocks = x.reshape(x.shape[0], -1, QBLOCK)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    inv = np.divide(F32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    return (np.rint(blocks * inv).astype(np.float64) * (amax.astype(np.float64) / 127)).reshape(x.shape)


def test_quantize_x_is_within_half_a_step_and_lays_scales_out_by_lane():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 192)).astype(F32) * F32(4)
    x[1, 64:96] = 0  # an all-zero block: scale 0, values 0
    xq, dx = np.empty(x.shape, np.int8), np.empty((3, 48), F32)
    quantize_x(x, xq, dx)
    d = np.abs(x.reshape(3, 6, 32)).max(axis=2) / 127
    np.testing.assert_allclose(dx.reshape(3, 3, 2, 8), np.broadcast_to(d.reshape(3, 3, 2, 1), (3, 3, 2, 8)), rtol=1e-6)
    assert np.abs(xq.astype(int)).max() <= 127 and not xq[1, 64:96].any()
    assert np.all(np.abs(xq.reshape(3, 6, 32) * d[..., None] - x.reshape(3, 6, 32)) <= d[..., None] / 2 + 1e-6)
    np.testing.assert_allclose(xq.reshape(3, 6, 32) * d[..., None], x_as_int8(x).reshape(3, 6, 32), atol=1e-6)


INT8_X = [False, pytest.param(True, marks=pytest.mark.skipif(not VNNI, reason="int8 activations need AVX-512 VNNI"))]


@pytest.mark.parametrize("m,k,n", [(1, 32, 1), (1, 576, 963), (2, 64, 5), (3, 96, 7), (4, 64, 9), (5, 576, 130),
                                   (16, 1536, 577), (37, 128, 33), (3, 1536, 7), (4, 576, 130)])
@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("int8_x", INT8_X)
def test_matmul_q8(m, k, n, threads, int8_x):
    rng = np.random.default_rng(m * 1000 + n)
    x = rng.standard_normal((m, k)).astype(F32)
    w = quantize_q8_0(rng.standard_normal((n, k)).astype(F32))
    out = np.full((m, n), np.nan, F32)
    matmul_q8(x, w.q, w.scale, out, threads, int8_x)
    # int8 x only for a decode's few rows, two blocks a step; float32 x otherwise (K = 96, say)
    xs = x_as_int8(x) if int8_x and m <= SIMD_ROWS and k % 64 == 0 else x.astype(np.float64)
    np.testing.assert_allclose(out, xs @ w.dequantize().astype(np.float64).T, rtol=1e-4, atol=1e-4)


def test_q8_matrix_refuses_a_layout_the_simd_walk_cannot_read():
    m = quantize_q8_0(np.ones((8, 64), F32))
    with pytest.raises(ValueError, match="C-contiguous"):
        Q8Matrix(np.asfortranarray(m.q), m.scale)
    with pytest.raises(ValueError, match="scale float32"):
        Q8Matrix(m.q, m.scale[:, :1].copy())


def test_q8_weights_through_the_ops():
    rng = np.random.default_rng(1)
    ops = CpuOps(weights="q8_0")
    w = ops.asarray(rng.standard_normal((70, 64)).astype(F32), ops.weight_dtype)
    assert ops.dtype_name == "float32, q8_0 weights" and w.shape == (70, 64) and w.nbytes == 70 * 64 + 70 * 2 * 4
    x, b = rng.standard_normal((SIMD_ROWS + 1, 64)).astype(F32), rng.standard_normal(70).astype(F32)
    w64 = w.dequantize().astype(np.float64)
    np.testing.assert_allclose(ops.linear(x, w, b), x.astype(np.float64) @ w64.T + b, rtol=1e-4, atol=1e-4)
    few = x[:SIMD_ROWS]  # a decode's few rows: int8 activations where the CPU has VNNI
    want = (x_as_int8(few) if VNNI else few.astype(np.float64)) @ w64.T + b
    np.testing.assert_allclose(ops.linear(few, w, b), want, rtol=1e-4, atol=1e-4)
    ids = np.array([3, 0, 69, 3], np.int32)
    np.testing.assert_array_equal(ops.embedding(ids, w), w.dequantize()[ids])
