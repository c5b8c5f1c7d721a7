"""Ops.host_zeros and Ops.swap_blocks on the CPU backend and on CudaOps (emulation device; with
`pytest -m gpu`, a real one), for every KV dtype, against NumPy fancy indexing of the same data.

Both pools start full of random bits (never zeros), so a block copied to the wrong place, a block
left out, or a neighbour overwritten all show. Values are compared as raw storage bits.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from cupaged.backend.cpu import CpuOps
from cupaged.backend.cuda import CudaOps, block_runs

pytest.importorskip("tests.emu.harness")
from tests.emu.device import EmuDevice  # noqa: E402

NB, NH, BS, HK, D = 16, 12, 4, 2, 64   # device blocks, host blocks, block size, KV heads, head dim
OUT = [(5, 0), (6, 1), (7, 2), (12, 3), (2, 9)]   # (device, host): runs 5..7 -> 0..2, then two singles
IN = [(3, 10), (0, 4), (1, 5), (2, 6), (9, 0)]    # (host, device): run 0..2 -> 4..6, then two singles
KINDS = ["cpu", "emu-float16", "emu-bfloat16",
         pytest.param("gpu-float16", marks=pytest.mark.gpu), pytest.param("gpu-bfloat16", marks=pytest.mark.gpu)]


def make_ops(kind: str):
    if kind == "cpu":
        return CpuOps()
    where, dtype = kind.split("-")
    if where == "emu":
        return CudaOps(EmuDevice(), dtype=dtype)
    from tests.emu.gpu import gpu_skip_reason
    if (why := gpu_skip_reason()) is not None:
        pytest.skip(f"gpu: {why}")
    from cupaged.backend.cupy_device import CupyDevice
    return CudaOps(CupyDevice(), dtype=dtype)


@pytest.fixture(params=KINDS)
def ops(request):
    return make_ops(request.param)


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def storage(ops) -> np.dtype:
    return np.dtype(np.float32) if ops.name == "cpu" else ops.storage


def random_bits(rng, shape, dtype: np.dtype) -> np.ndarray:
    """Random bit patterns of dtype (NaNs included: compared as bits, not values)."""
    return rng.integers(0, 256, size=(*shape, dtype.itemsize), dtype=np.uint8).view(dtype).reshape(shape)


def host_bits(ops, a) -> np.ndarray:
    """The raw stored bits of a pool, on the host (a device array is copied back). On a GPU the
    device is synchronised first: the swap copies into host memory are asynchronous."""
    if ops.name == "cuda" and ops.xp is not np:
        ops.xp.cuda.Device().synchronize()
    a = a if isinstance(a, np.ndarray) else a.get()
    return a.view(np.uint8).copy()


def pools(ops, rng):
    """A device KV cache and a host pool per K and V, all random; plus their host copies."""
    dt = storage(ops)
    dev_np = [random_bits(rng, (NB, BS, HK, D), dt) for _ in range(2)]
    dev = [ops.xp.asarray(x) if ops.name == "cuda" else x.copy() for x in dev_np]
    host = [ops.host_zeros((NH, BS, HK, D), ops.dtype) for _ in range(2)]
    for h in host:
        h[...] = random_bits(rng, h.shape, dt)
    return dev, host, dev_np, [h.copy() for h in host]


def test_host_zeros_is_host_memory_of_the_kv_dtype(ops):
    a = ops.host_zeros((3, BS, HK, D), ops.dtype)
    assert isinstance(a, np.ndarray) and a.dtype == storage(ops) and a.flags.c_contiguous
    assert a.shape == (3, BS, HK, D) and not a.view(np.uint8).any()


def test_swap_out_moves_exactly_the_named_blocks(ops, rng):
    (dk, dv), (hk, hv), (dk0, dv0), (hk0, hv0) = pools(ops, rng)
    pairs = np.array(OUT, dtype=np.int32)
    ops.swap_blocks(dk, dv, hk, hv, pairs)
    for got, host0, dev0 in ((hk, hk0, dk0), (hv, hv0, dv0)):
        want = host0.copy()
        want[pairs[:, 1]] = dev0[pairs[:, 0]]
        assert np.array_equal(host_bits(ops, got), want.view(np.uint8))
    assert np.array_equal(host_bits(ops, dk), dk0.view(np.uint8)), "the source is left as it was"


def test_swap_in_moves_exactly_the_named_blocks(ops, rng):
    (dk, dv), (hk, hv), (dk0, dv0), (hk0, hv0) = pools(ops, rng)
    ops.swap_blocks(hk, hv, dk, dv, IN)  # a list of pairs works too
    pairs = np.array(IN)
    for got, dev0, host0 in ((dk, dk0, hk0), (dv, dv0, hv0)):
        want = dev0.copy()
        want[pairs[:, 1]] = host0[pairs[:, 0]]
        assert np.array_equal(host_bits(ops, got), want.view(np.uint8))


def test_a_round_trip_restores_the_blocks(ops, rng):
    (dk, dv), (hk, hv), (dk0, _), _ = pools(ops, rng)
    ops.swap_blocks(dk, dv, hk, hv, [(5, 7), (6, 8)])
    ops.swap_blocks(hk, hv, dk, dv, [(7, 0), (8, 1)])   # blocks 5, 6 come back as 0, 1
    got = host_bits(ops, dk).view(dk0.dtype)
    assert np.array_equal(got[[0, 1]].view(np.uint8), dk0[[5, 6]].view(np.uint8))
    assert np.array_equal(got[2:].view(np.uint8), dk0[2:].view(np.uint8))


def test_cuda_swap_copies_one_chunk_per_run():
    ops = CudaOps(EmuDevice(), dtype="float16")
    rng = np.random.default_rng(0)
    (dk, dv), (hk, hv), _, _ = pools(ops, rng)
    block_bytes = BS * HK * D * 2
    ops.swap_blocks(dk, dv, hk, hv, np.array(OUT))
    # runs: 2 -> 9 (1 block), 5..7 -> 0..2 (3 blocks), 12 -> 3 (1 block); each for K and for V
    assert ops.device.copies == [block_bytes, block_bytes, 3 * block_bytes, 3 * block_bytes, block_bytes, block_bytes]
    assert ops.device.launches == [], "no kernel: the copy engine moves the blocks"
    ops.swap_blocks(dk, dv, hk, hv, np.zeros((0, 2), np.int32))
    assert len(ops.device.copies) == 6


def test_block_runs_group_consecutive_ids_in_any_order():
    naive = np.array([(7, 2), (5, 0), (12, 3), (6, 1), (2, 9), (13, 5)])
    assert block_runs(naive) == [(2, 9, 1), (5, 0, 3), (12, 3, 1), (13, 5, 1)]
    assert block_runs(np.array([(0, 0), (1, 1), (2, 2)])) == [(0, 0, 3)]
    assert block_runs(np.array([(0, 3), (1, 2)])) == [(0, 3, 1), (1, 2, 1)], "dst must ascend too"
    assert block_runs(np.zeros((0, 2), np.int64)) == []
    # every pair is covered exactly once
    rng = np.random.default_rng(1)
    pairs = np.stack([rng.permutation(40)[:25], rng.permutation(40)[:25]], axis=1)
    covered = sorted((s + i, d + i) for s, d, n in block_runs(pairs) for i in range(n))
    assert covered == sorted(map(tuple, pairs.tolist()))


@pytest.mark.parametrize("kind", ["cpu", "emu-bfloat16"])
def test_bad_swaps_are_refused_with_the_reason(kind):
    ops = make_ops(kind)
    (dk, dv), (hk, hv), _, _ = pools(ops, np.random.default_rng(2))
    with pytest.raises(ValueError, match=f"src block {NB} is outside"):
        ops.swap_blocks(dk, dv, hk, hv, [(NB, 0)])
    with pytest.raises(ValueError, match=f"dst block {NH} is outside"):
        ops.swap_blocks(dk, dv, hk, hv, [(0, NH)])
    with pytest.raises(ValueError, match="dst block repeats"):
        ops.swap_blocks(dk, dv, hk, hv, [(0, 1), (2, 1)])
    with pytest.raises(ValueError, match=r"\[P, 2\]"):
        ops.swap_blocks(dk, dv, hk, hv, np.zeros((2, 3), np.int32))
    small = ops.host_zeros((NH, BS, HK, D // 2), ops.dtype)
    with pytest.raises(ValueError, match="differ"):
        ops.swap_blocks(dk, dv, small, small, [(0, 0)])
