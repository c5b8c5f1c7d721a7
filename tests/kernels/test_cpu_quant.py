"""Q8_0-style weights on the CPU: quantization error within half a step of its block's scale, and
matmul_q8 against float64 on the dequantized weights (so only its float32 arithmetic is under test),
over shapes that are not multiples of its tiles, 1-3 threads; the ops take such weights in linear
and embedding."""
from __future__ import annotations

import numpy as np
import pytest

from cupaged.backend.cpu import CpuOps
from cupaged.backend.cpu_quant import QBLOCK, Q8Matrix, matmul_q8, quantize_q8_0

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


@pytest.mark.parametrize("m,k,n", [(1, 32, 1), (1, 576, 963), (2, 64, 5), (3, 96, 7), (4, 64, 9), (5, 576, 130),
                                   (16, 1536, 577), (37, 128, 33)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matmul_q8(m, k, n, threads):
    rng = np.random.default_rng(m * 1000 + n)
    x = rng.standard_normal((m, k)).astype(F32)
    w = quantize_q8_0(rng.standard_normal((n, k)).astype(F32))
    out = np.full((m, n), np.nan, F32)
    matmul_q8(x, w.q, w.scale, out, threads)
    want = x.astype(np.float64) @ w.dequantize().astype(np.float64).T
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4)


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
    x, b = rng.standard_normal((4, 64)).astype(F32), rng.standard_normal(70).astype(F32)
    w64 = w.dequantize().astype(np.float64)
    np.testing.assert_allclose(ops.linear(x, w, b), x.astype(np.float64) @ w64.T + b, rtol=1e-4, atol=1e-4)
    ids = np.array([3, 0, 69, 3], np.int32)
    np.testing.assert_array_equal(ops.embedding(ids, w), w.dequantize()[ids])
