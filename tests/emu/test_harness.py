"""Self-tests of the host emulation harness against small kernels (selftest_kernels.cu)."""
from __future__ import annotations

import os
import shutil
import subprocess
import time

import numpy as np
import pytest

from tests.emu.harness import (EmuArgError, EmuAsanError, EmuError, find_kernels, from_bf16, load_module,
                               poisoned, to_bf16)

SRC = "tests/emu/selftest_kernels.cu"
FULL = np.uint32(0xFFFFFFFF)
SCHEDULES = ["interleaved", "warp_serial", "reverse"]
os.environ["OPENBLAS_NUM_THREADS"] = "1"


@pytest.fixture(scope="module")
def mod():
    return load_module(SRC)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


# ---- barriers and shared memory ---------------------------------------------------------------------
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("threads", [32, 128, 1024])
def test_block_sum_with_barrier(mod, rng, threads, schedule):
    blocks = 7
    x = rng.standard_normal(blocks * threads - 5).astype(np.float32)
    out = poisoned(blocks, np.float32)
    mod.launch("block_sum", grid=(blocks,), block=(threads,), args=[x, out, np.int32(x.size)], schedule=schedule)
    ref = np.pad(x, (0, 5)).reshape(blocks, threads).astype(np.float64).sum(1)
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("schedule", ["interleaved", "warp_serial"])  # "reverse" happens to run it serially right
def test_block_sum_without_barrier_is_caught(rng, schedule):
    nb = load_module(SRC, defines={"NO_BARRIER": None})
    x = rng.standard_normal(16 * 128).astype(np.float32)
    out = poisoned(16, np.float32)
    nb.launch("block_sum", grid=(16,), block=(128,), args=[x, out, np.int32(x.size)], schedule=schedule)
    ref = x.reshape(16, 128).sum(1)
    bad = np.isnan(out) | ~np.isclose(out, ref, rtol=1e-4, atol=1e-4)
    assert bad.mean() > 0.8


def test_dynamic_shared_memory(mod, rng):
    x = rng.standard_normal(5 * 96).astype(np.float32)
    y = poisoned(x.shape, np.float32)
    mod.launch("dyn_reverse", grid=(5,), block=(96,), args=[x, y], shared_mem=96 * 4)
    np.testing.assert_array_equal(y, x.reshape(5, 96)[:, ::-1].ravel())


# ---- warp collectives against a Python model of CUDA's definitions -----------------------------------
def model_shuffle(v: np.ndarray, op: str, arg: int, width: int) -> np.ndarray:
    """CUDA programming guide semantics, one warp: logical lanes within segments of `width` lanes."""
    out = v.copy()
    for lane in range(32):
        seg, logical = lane // width, lane % width
        if op == "idx":
            out[lane] = v[seg * width + arg % width]
        elif op == "up" and logical - arg >= 0:
            out[lane] = v[lane - arg]
        elif op == "down" and logical + arg < width:
            out[lane] = v[lane + arg]
        elif op == "xor":
            src = lane ^ arg
            if src < 32 and src // width <= seg:  # earlier segments readable, later ones give own value
                out[lane] = v[src]
    return out


@pytest.mark.parametrize("width", [1, 2, 4, 8, 16, 32])
@pytest.mark.parametrize("src,delta,lane_mask", [(0, 1, 1), (3, 2, 5), (13, 7, 16), (31, 16, 31), (-1, 0, 9)])
def test_shuffles_match_model(mod, rng, width, src, delta, lane_mask):
    warps = 3
    x = rng.standard_normal(32 * warps).astype(np.float32)
    out = poisoned((4, x.size), np.float32)
    mod.launch("warp_shuffles", grid=(1,), block=(32 * warps,),
               args=[x, out, np.int32(x.size), np.int32(width), np.int32(src), np.uint32(delta), np.int32(lane_mask)])
    for w in range(warps):
        v = x[32 * w:32 * w + 32]
        for row, (op, arg) in enumerate([("idx", src), ("up", delta), ("down", delta), ("xor", lane_mask)]):
            np.testing.assert_array_equal(out[row, 32 * w:32 * w + 32], model_shuffle(v, op, arg, width),
                                          err_msg=f"{op} arg={arg} width={width}")


@pytest.mark.parametrize("mask", [0xFFFFFFFF, 0x0000FFFF, 0xAAAAAAAA, 0x80000001])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_votes_match_model(mod, rng, mask, schedule):
    pred = (rng.random(64) < 0.5).astype(np.int32)
    pred[32:] = 1  # second warp: all true among the mask
    out = np.zeros((3, 64), np.uint32)
    mod.launch("warp_votes", grid=(1,), block=(64,), args=[pred, out, np.int32(64), np.uint32(mask)], schedule=schedule)
    for w in range(2):
        lanes = [l for l in range(32) if mask >> l & 1]
        ballot = sum(1 << l for l in lanes if pred[32 * w + l])
        for l in lanes:
            assert out[:, 32 * w + l].tolist() == [ballot, int(ballot != 0), int(ballot == mask)]


def test_warp_sums(mod, rng):
    x = rng.standard_normal(4 * 64).astype(np.float32)
    out = poisoned(2 * 8, np.float32)
    mod.launch("warp_sums", grid=(4,), block=(64,), args=[x, out])
    ref = x.reshape(8, 32).astype(np.float64).sum(1)
    np.testing.assert_allclose(out[0::2], ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[1::2], ref, rtol=1e-5, atol=1e-5)


def test_shuffle_of_half2_and_bfloat162(mod, rng):
    x = rng.standard_normal(2 * 64).astype(np.float16)
    out, bout = poisoned(x.shape, np.float16), poisoned(x.shape, np.uint16)
    mod.launch("shfl_half2", grid=(2,), block=(32,), args=[x, out, bout])
    swapped = x.reshape(-1, 2, 2)[:, ::-1].ravel()  # pair i <-> pair i ^ 1
    np.testing.assert_array_equal(out, swapped)
    np.testing.assert_array_equal(bout, to_bf16(swapped.astype(np.float32)))


# ---- indices ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("grid,block,shape", [((5,), (64,), (300, 1, 1)), ((3, 4), (16, 8), (45, 30, 1)),
                                              ((2, 3, 2), (8, 4, 4), (13, 11, 7)), ((1, 1, 3), (4, 2, 64), (4, 2, 190))])
def test_indices_cover_every_element_once(mod, grid, block, shape):
    nx, ny, nz = shape
    count = np.zeros((nz, ny, nx), np.int32)
    mod.launch("index_cover", grid=grid, block=block, args=[count, np.int32(nx), np.int32(ny), np.int32(nz)])
    assert (count == 1).all()


# ---- argument and launch checks ---------------------------------------------------------------------
def test_signature(mod):
    assert mod.kernels["signature_probe"] == "ptr:f32,ptr:f16,ptr:bf16,f32,i32,i64,u32,f64"
    assert mod.kernels["block_sum"] == "ptr:f32,ptr:f32,i32"


@pytest.mark.parametrize("bad,match", [
    ({3: 1.5}, "expected np.float32 scalar, got builtins.float"),
    ({3: np.float64(1.5)}, "expected np.float32"),
    ({4: np.int64(3)}, "expected np.int32 scalar, got numpy.int64"),
    ({4: 3}, "expected np.int32"),
    ({7: 2.0}, "expected np.float64"),
    ({0: np.zeros((4, 4), np.float32)[:, 1]}, "not C-contiguous"),
    ({0: np.zeros(4, np.float64)}, "does not match pointee f32"),
    ({2: np.zeros(4, np.float32)}, "does not match pointee bf16"),
    ({1: [1.0]}, "expected a numpy array"),
])
def test_wrong_arguments_are_rejected(mod, bad, match):
    args = [np.zeros(4, np.float32), np.zeros(4, np.float16), np.zeros(4, np.uint16), np.float32(1),
            np.int32(1), np.int64(2), np.uint32(3), np.float64(4)]
    mod.launch("signature_probe", grid=(1,), block=(32,), args=args)
    for i, v in bad.items():
        args[i] = v
    with pytest.raises(EmuArgError, match=match):
        mod.launch("signature_probe", grid=(1,), block=(32,), args=args)


def test_null_pointer_and_argument_count(mod):
    mod.launch("signature_probe", grid=(1,), block=(1,), args=[None, None, None, np.float32(0), np.int32(0),
                                                                 np.int64(0), np.uint32(0), np.float64(0)])
    with pytest.raises(EmuArgError, match="takes 3 arguments"):
        mod.launch("block_sum", grid=(1,), block=(32,), args=[np.zeros(32, np.float32)])


@pytest.mark.parametrize("kw,match", [
    (dict(block=(1025,)), "exceeds 1024"), (dict(block=(32, 33)), "exceeds 1024"),
    (dict(shared_mem=227 * 1024 + 1), "227 KiB"), (dict(grid=(0,)), "positive"), (dict(grid=(1, 2, 3, 4)), "1 to 3"),
])
def test_bad_launch_configuration(mod, kw, match):
    launch = dict(grid=(1,), block=(32,), shared_mem=0) | kw
    x = np.zeros(32 * 1100, np.float32)
    with pytest.raises(EmuError, match=match):
        mod.launch("dyn_reverse", args=[x, x.copy()], **launch)


@pytest.mark.parametrize("kernel,match", [
    ("exit_before_barrier", r"wait at __syncthreads \(line \d+\) but thread 0 has exited"),
    ("divergent_barrier", r"divergent __syncthreads: thread \d+ waits at line \d+, thread \d+ at line \d+"),
    ("shfl_after_exit", r"__shfl_xor_sync .* for lane 0, which has exited"),
])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_rule_violations_are_reported(mod, kernel, match, schedule):
    with pytest.raises(EmuError, match=match):
        mod.launch(kernel, grid=(3,), block=(64,), args=[np.zeros(64, np.float32)], schedule=schedule)
    mod.launch("warp_sums", grid=(1,), block=(32,), args=[np.ones(32, np.float32), np.zeros(2, np.float32)])


# ---- fp16 / bf16 ------------------------------------------------------------------------------------
def test_half_and_bfloat16_arithmetic(mod, rng):
    n = 1000
    a, b = (rng.standard_normal(n).astype(np.float16) for _ in range(2))
    x, y = (to_bf16(rng.standard_normal(n).astype(np.float32)) for _ in range(2))
    c, d = poisoned(n, np.float16), poisoned(n, np.float16)
    z, w = poisoned(n, np.uint16), poisoned(n, np.uint16)
    mod.launch("half_ops", grid=(4,), block=(256,), args=[a, b, c, d, x, y, z, w, np.int32(n)])
    c_ref = (a.astype(np.float32) + b.astype(np.float32)).astype(np.float16)
    np.testing.assert_array_equal(c, c_ref)
    np.testing.assert_array_equal(d, (a.astype(np.float32) * b + c_ref.astype(np.float32)).astype(np.float16))
    np.testing.assert_array_equal(z, to_bf16(from_bf16(x) + from_bf16(y)))
    np.testing.assert_array_equal(w, to_bf16(from_bf16(x) * from_bf16(y)))


def test_denormals_flush_to_zero_as_under_cupy():
    """CuPy compiles with -ftz=true, so the emulator flushes float32 denormals for the launch, and only
    for the launch: NumPy in the calling thread keeps IEEE denormals."""
    tiny = np.finfo(np.float32).smallest_normal
    x = np.array([tiny / 4, tiny, 1.0, -tiny / 2], np.float32)
    out = poisoned(x.size, np.float32)
    mod = load_module(SRC)
    mod.launch("scale_f32", grid=(1,), block=(32,), args=[x, out, np.float32(0.5), np.int32(x.size)])
    np.testing.assert_array_equal(out, [0.0, 0.0, 0.5, 0.0])  # inputs flushed (DAZ), results flushed (FTZ)
    assert x[0] * np.float32(0.5) > 0  # the host's own float math is untouched


def test_bf16_helpers_round_to_nearest_even():
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0x7FC00001], np.uint32)
    assert to_bf16(bits.view(np.float32)).tolist() == [0x3F80, 0x3F82, 0x3F81, 0x7F80, 0x7FC0]
    v = np.array([1.0, -2.5, 3.140625], np.float32)
    np.testing.assert_array_equal(from_bf16(to_bf16(v)), v)


def test_find_kernels():
    src = '''// extern "C" __global__ void commented(int x) {}
    extern "C" __global__ void __launch_bounds__(128, 2) a(int* x) {}
    extern "C" __global__ __launch_bounds__(64) void b(const float* __restrict__ y);
    template <int N> __global__ void not_exported(int* x) {}
    __global__ void cpp_linkage(int* x) {}'''
    assert find_kernels(src) == ["a", "b"]


# ---- ASan -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def asan_mod():
    return load_module(SRC, asan=True)


def test_asan_reports_planted_out_of_bounds_read(asan_mod, rng):
    x = rng.standard_normal(4096).astype(np.float32)
    y = poisoned(x.shape, np.float32)
    with pytest.raises(EmuAsanError, match=r"(?s)heap-buffer-overflow.*READ of size 4.*selftest_kernels.cu"):
        asan_mod.launch("shift_read", grid=(32,), block=(128,), args=[x, y, np.int32(x.size)])


def test_asan_reports_dynamic_shared_memory_too_small(asan_mod, rng):
    x = rng.standard_normal(2 * 64).astype(np.float32)
    with pytest.raises(EmuAsanError, match=r"(?s)WRITE of size 4.*dyn_reverse"):
        asan_mod.launch("dyn_reverse", grid=(2,), block=(64,), args=[x, x.copy()], shared_mem=63 * 4)


def test_asan_passes_correct_kernels(asan_mod, rng):
    x = rng.standard_normal(4 * 256).astype(np.float32)
    out = poisoned(4, np.float32)
    asan_mod.launch("block_sum", grid=(4,), block=(256,), args=[x, out, np.int32(x.size)])
    np.testing.assert_allclose(out, x.reshape(4, 256).sum(1), rtol=1e-4, atol=1e-4)
    y = poisoned(x.shape, np.float32)
    asan_mod.launch("dyn_reverse", grid=(4,), block=(256,), args=[x, y], shared_mem=256 * 4)
    np.testing.assert_array_equal(y, x.reshape(4, 256)[:, ::-1].ravel())
    y2 = poisoned(x.size - 1, np.float32)  # n = size - 1: the shifted read stays inside x
    asan_mod.launch("shift_read", grid=(8,), block=(128,), args=[x, y2, np.int32(y2.size)])
    np.testing.assert_array_equal(y2, x[1:])


# ---- the source stays CUDA; speed -------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
@pytest.mark.parametrize("defines", [[], ["-DNO_BARRIER"]])
def test_selftest_kernels_compile_with_nvcc(tmp_path, defines):
    r = subprocess.run(["nvcc", "-arch=sm_80", *defines, "-c", SRC, "-o", str(tmp_path / "k.o")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_launch_speed(mod, rng):
    x = rng.standard_normal(64 * 128).astype(np.float32)
    out = np.zeros(64, np.float32)
    mod.launch("block_sum", grid=(64,), block=(128,), args=[x, out, np.int32(x.size)])
    t0 = time.perf_counter()
    for _ in range(5):
        mod.launch("block_sum", grid=(64,), block=(128,), args=[x, out, np.int32(x.size)])
    assert (time.perf_counter() - t0) / 5 < 0.25
