"""cuda/paged_attention.cu (decode) and cuda/paged_prefill.cu, run from their exact source by
the host emulator (tests/emu) -- and on a device through CuPy with `pytest -m gpu` (`kernel_module`,
conftest.py) -- against the float64 reference that walks the block table.

K/V of each sequence sit in randomly permuted cache blocks; every slot that holds no token
is NaN, so a kernel that reads past a sequence's end poisons its output. Outputs (and the
decode partials) are poisoned with NaN before launch and checked to be fully written.
The decode tests use a 64-token partition, so contexts over 64 take the split path
(partials + reduction) while the shorter sequences of the same batch take the single pass.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from tests.kernels import reference as ref

emu = pytest.importorskip("tests.emu.harness")

PARTITION = 64           # decode keys per partition (512 on a GPU)
THREADS = 128
TOL = {"f16": (1e-2, 1e-3), "bf16": (1e-2, 4e-3)}  # (rtol, atol) against float64


@pytest.fixture(scope="module")
def decode_mod(kernel_module):
    return kernel_module("cuda/paged_attention.cu", asan=False)


@pytest.fixture(scope="module")
def prefill_mod(kernel_module):
    return kernel_module("cuda/paged_prefill.cu", asan=False)


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def to_device(x, dtype):
    """float32 -> (device array, the float32 values it holds). bf16 is uint16 bit patterns; NaN stays NaN."""
    if dtype == "f16":
        dev = x.astype(np.float16)
        return dev, dev.astype(np.float32)
    dev = np.asarray(emu.to_bf16(x), dtype=np.uint16)
    dev[np.isnan(x)] = 0x7FC0
    return dev, np.asarray(emu.from_bf16(dev), dtype=np.float32)


def to_float(x, dtype):
    return x.astype(np.float32) if dtype == "f16" else np.asarray(emu.from_bf16(x), dtype=np.float32)


def poison(shape, dtype):
    """An output buffer full of NaN in the device dtype."""
    if dtype == "f16":
        return np.full(shape, np.nan, np.float16)
    return np.full(shape, 0x7FC0, np.uint16)


def make_batch(rng, q_lens, seq_lens, hq, hk, d, bs, dtype):
    """Random q [T, Hq, D] and a paged cache holding each sequence's seq_len tokens."""
    ks = [rng.standard_normal((n, hk, d)).astype(np.float32) for n in seq_lens]
    vs = [rng.standard_normal((n, hk, d)).astype(np.float32) for n in seq_lens]
    kc, vc, tables = ref.scatter_to_blocks(rng, ks, vs, bs)
    q = rng.standard_normal((sum(q_lens), hq, d)).astype(np.float32)
    q_dev, q32 = to_device(q, dtype)
    kc_dev, kc32 = to_device(kc, dtype)
    vc_dev, vc32 = to_device(vc, dtype)
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    lens = np.asarray(seq_lens, np.int32)
    return dict(q=q_dev, kc=kc_dev, vc=vc_dev, tables=tables, lens=lens, qsl=qsl, q32=q32, kc32=kc32, vc32=vc32)


def reference(batch, d, window):
    return ref.paged_attention(batch["q32"], batch["kc32"], batch["vc32"], batch["tables"], batch["lens"],
                               batch["qsl"], 1.0 / np.sqrt(d), window=window)


def check(out, want, dtype):
    got = to_float(out, dtype)
    assert np.isfinite(got).all(), f"{np.count_nonzero(~np.isfinite(got))} outputs not written (or NaN)"
    rtol, atol = TOL[dtype]
    np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)


# --- decode ---------------------------------------------------------------------------
def heads_per_block(g):
    """The decode kernel's GP: the smallest of 1, 2, 4, 8 that is >= min(G, 8)."""
    return next(p for p in (1, 2, 4, 8) if p >= min(g, 8))


def run_decode(mod, batch, hq, hk, d, bs, dtype, window, partition=PARTITION, schedule="interleaved"):
    b = len(batch["lens"])
    g = hq // hk
    gp = heads_per_block(g)
    span = [min(n, window) if window > 0 else n for n in batch["lens"]]
    parts = max(1, -(-max(span) // partition))
    out = poison((b, hq, d), dtype)
    part_max = np.full((b, hq, parts), np.nan, np.float32)
    part_sum = np.full((b, hq, parts), np.nan, np.float32)
    part_out = np.full((b, hq, parts, d), np.nan, np.float32)
    scale = np.float32(1.0 / np.sqrt(d))
    mod.launch(f"paged_decode_{dtype}_d{d}_g{gp}", grid=(hk * -(-g // gp), b, parts), block=(THREADS,),
               args=[out, batch["q"], batch["kc"], batch["vc"], batch["tables"], batch["lens"],
                     part_max, part_sum, part_out, np.int32(hq), np.int32(hk),
                     np.int32(batch["tables"].shape[1]), np.int32(bs), np.int32(partition), scale,
                     np.int32(window)],
               shared_mem=4 * gp * (d + 2) * 4, schedule=schedule)
    if parts > 1:
        mod.launch(f"paged_decode_reduce_{dtype}", grid=(hq, b), block=(THREADS,),
                   args=[out, part_max, part_sum, part_out, batch["lens"], np.int32(hq), np.int32(d),
                         np.int32(parts), np.int32(partition), np.int32(window)],
                   shared_mem=parts * 4, schedule=schedule)
    return out, parts


DECODE_CASES = [
    # d, bs, hq, hk, seq_lens, window
    (64, 16, 2, 2, [1, 17, 16, 150], 0),      # G=1: length 1, partial block, boundary, 3 partitions
    (128, 8, 8, 2, [1, 8, 13, 200], 0),       # G=4
    (128, 32, 8, 1, [33, 64, 130], 0),        # G=8, exactly one partition, 3 partitions
    (128, 16, 8, 2, [20, 64], 0),             # every sequence in one partition: single pass only
    (80, 16, 4, 1, [5, 70], 0),               # D=80: lanes past D/8 idle
    (96, 8, 4, 2, [9, 100], 0),               # D=96
    (256, 32, 2, 2, [40, 129], 0),            # D=256
    (64, 16, 6, 2, [20, 99], 0),              # G=3: a padded head row
    (64, 8, 16, 1, [30, 80], 0),              # G=16: two blocks per KV head
    (128, 16, 8, 2, [5, 50, 200], 70),        # sliding window across partitions
    (64, 8, 4, 1, [1, 16, 9, 41], 16),        # window of two blocks
]


# Adversarial thread orders of the emulator: "warp_serial" runs each warp as far as it can
# before the next, which exposes a missing barrier that the interleaved order hides.
SCHEDULES = ["interleaved", "warp_serial"]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("d,bs,hq,hk,seq_lens,window", DECODE_CASES)
def test_decode(kernel_module, decode_mod, rng, dtype, d, bs, hq, hk, seq_lens, window, schedule):
    if schedule != "interleaved":
        kernel_module.emu_only("thread schedules exist only in the emulator")
    batch = make_batch(rng, [1] * len(seq_lens), seq_lens, hq, hk, d, bs, dtype)
    out, _ = run_decode(decode_mod, batch, hq, hk, d, bs, dtype, window, schedule=schedule)
    check(out, reference(batch, d, window), dtype)


def test_decode_split_matches_single_pass(decode_mod, rng):
    """The same batch with one partition per sequence and with 32-key partitions."""
    d, bs, hq, hk = 64, 16, 4, 2
    batch = make_batch(rng, [1, 1], [70, 150], hq, hk, d, bs, "f16")
    single, parts = run_decode(decode_mod, batch, hq, hk, d, bs, "f16", 0, partition=256)
    assert parts == 1
    split, parts = run_decode(decode_mod, batch, hq, hk, d, bs, "f16", 0, partition=32)
    assert parts == 5
    np.testing.assert_allclose(split.astype(np.float32), single.astype(np.float32), rtol=1e-2, atol=1e-3)
    check(split, reference(batch, d, 0), "f16")


# --- prefill / chunked prefill / mixed --------------------------------------------------
PREFILL_TILE_ROWS = {64: 64, 80: 64, 96: 64, 128: 64, 256: 32}


def run_prefill(mod, batch, hq, hk, d, bs, dtype, window, schedule="interleaved"):
    q_lens = np.diff(batch["qsl"])
    g = hq // hk
    rows_per_tile = PREFILL_TILE_ROWS[d]
    keys_per_tile = 16 if d > 128 else 32
    smem = (rows_per_tile + 2 * keys_per_tile) * (d + 8) * 2 + rows_per_tile * (keys_per_tile + 1) * 4
    out = poison((int(batch["qsl"][-1]), hq, d), dtype)
    mod.launch(f"paged_prefill_{dtype}_d{d}", grid=(-(-int(q_lens.max()) * g // rows_per_tile), hk, len(q_lens)),
               block=(THREADS,),
               args=[out, batch["q"], batch["kc"], batch["vc"], batch["tables"], batch["lens"], batch["qsl"],
                     np.int32(hq), np.int32(hk), np.int32(batch["tables"].shape[1]), np.int32(bs),
                     np.float32(1.0 / np.sqrt(d)), np.int32(window)],
               shared_mem=smem, schedule=schedule)
    return out


PREFILL_CASES = [
    # d, bs, hq, hk, (q_len, seq_len) per sequence, window
    (64, 16, 2, 2, [(5, 5), (1, 40), (20, 37), (1, 1)], 0),   # prefill, decodes, a chunk after a cached prefix
    (128, 8, 8, 2, [(17, 17), (1, 9), (9, 70)], 0),           # G=4: several row tiles
    (80, 32, 4, 2, [(12, 50), (1, 33)], 0),                   # D=80, block boundary + 1
    (96, 16, 8, 1, [(10, 30), (1, 16)], 0),                   # D=96, G=8
    (256, 16, 4, 2, [(7, 40), (1, 17)], 0),                   # D=256 (32-row, 16-key tiles)
    (64, 8, 4, 1, [(30, 60), (1, 45), (3, 3)], 12),           # sliding window inside a chunk
    (64, 16, 6, 2, [(25, 25), (1, 100)], 0),                  # G=3: tokens straddle tile rows
    (128, 32, 4, 4, [(40, 40)], 0),                           # one long prefill: many key tiles, causal
]


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("dtype", ["f16", "bf16"])
@pytest.mark.parametrize("d,bs,hq,hk,seqs,window", PREFILL_CASES)
def test_prefill(kernel_module, prefill_mod, rng, dtype, d, bs, hq, hk, seqs, window, schedule):
    if schedule != "interleaved":
        kernel_module.emu_only("thread schedules exist only in the emulator")
    q_lens, seq_lens = zip(*seqs)
    batch = make_batch(rng, list(q_lens), list(seq_lens), hq, hk, d, bs, dtype)
    out = run_prefill(prefill_mod, batch, hq, hk, d, bs, dtype, window, schedule=schedule)
    check(out, reference(batch, d, window), dtype)


def test_prefill_decode_rows_match_decode_kernel(decode_mod, prefill_mod, rng):
    """A pure decode batch through both kernels."""
    d, bs, hq, hk = 128, 16, 8, 2
    batch = make_batch(rng, [1, 1, 1], [3, 64, 130], hq, hk, d, bs, "bf16")
    dec, _ = run_decode(decode_mod, batch, hq, hk, d, bs, "bf16", 0)
    pre = run_prefill(prefill_mod, batch, hq, hk, d, bs, "bf16", 0)
    np.testing.assert_allclose(to_float(dec, "bf16"), to_float(pre, "bf16"), rtol=1e-2, atol=8e-3)


# --- AddressSanitizer (the launch runs in a child process with libasan preloaded): no access
# past a block table row, a cache, q, the partial buffers or the documented shared size ------
@pytest.mark.parametrize("kernel", ["decode", "prefill"])
def test_asan(rng, kernel):
    d, bs, hq, hk = 80, 8, 4, 1
    if kernel == "decode":
        batch = make_batch(rng, [1, 1], [9, 150], hq, hk, d, bs, "bf16")
        mod = emu.load_module("cuda/paged_attention.cu", asan=True)
        out, _ = run_decode(mod, batch, hq, hk, d, bs, "bf16", 0)
    else:
        batch = make_batch(rng, [7, 1], [20, 33], hq, hk, d, bs, "bf16")
        mod = emu.load_module("cuda/paged_prefill.cu", asan=True)
        out = run_prefill(mod, batch, hq, hk, d, bs, "bf16", 0)
    check(out, reference(batch, d, 0), "bf16")
