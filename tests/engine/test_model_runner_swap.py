"""ModelRunner.move_blocks: the host pool it owns, and the order of one step's block moves.

One batch can name the same device block in several lists: a block swapped out is handed to a
swap-in, and a swapped-in block is the source of a copy-on-write. Only swap-outs, then swap-ins,
then copies give every block its right data; the expected pools here are built from that rule
with plain NumPy indexing, on both backends' Python paths (CPU, and CUDA in emulation).
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from cupaged.backend.cpu import CpuOps
from cupaged.backend.cuda import CudaOps
from cupaged.engine.model_runner import ModelRunner
from cupaged.engine.scheduler import ScheduledBatch

pytest.importorskip("tests.emu.harness")
from tests.emu.device import EmuDevice  # noqa: E402

CFG = SimpleNamespace(num_layers=2, num_kv_heads=2, head_dim=8)
NB, NH, BS = 6, 4, 2


@pytest.fixture(params=["cpu", "emu-bfloat16"])
def runner(request):
    ops = CpuOps() if request.param == "cpu" else CudaOps(EmuDevice(), dtype="bfloat16")
    runner = ModelRunner(SimpleNamespace(cfg=CFG), ops, NB, BS, num_host_blocks=NH)
    rng = np.random.default_rng(0)
    for pool in (*runner.kv_caches, *runner.host_caches):
        for a in pool:  # random bits, so every block is distinct (caches are NumPy arrays on both)
            a.view(np.uint8)[...] = rng.integers(0, 256, a.nbytes, dtype=np.uint8).reshape(a.view(np.uint8).shape)
    return runner


def test_the_runner_owns_a_host_pool_of_the_cache_layout(runner):
    assert len(runner.host_caches) == CFG.num_layers
    for (k, v), (hk, hv) in zip(runner.kv_caches, runner.host_caches):
        assert hk.shape == hv.shape == (NH, *k.shape[1:]) and hk.dtype == k.dtype
        assert isinstance(hk, np.ndarray)


def test_a_step_moves_swap_outs_then_swap_ins_then_copies(runner):
    batch = ScheduledBatch([], [], blocks_to_copy=[(3, 5)],
                           blocks_to_swap_out=[(3, 0), (4, 1)],      # device 3, 4 are freed ...
                           blocks_to_swap_in=[(2, 3), (3, 4)])       # ... and refilled from the host
    dev0 = [[a.copy() for a in kv] for kv in runner.kv_caches]
    host0 = [[a.copy() for a in kv] for kv in runner.host_caches]
    runner.move_blocks(batch)
    for layer in range(CFG.num_layers):
        for j in range(2):  # K, V
            dev, host = dev0[layer][j].copy(), host0[layer][j].copy()
            host[[0, 1]] = dev[[3, 4]]
            dev[[3, 4]] = host[[2, 3]]
            dev[5] = dev[3]
            assert np.array_equal(runner.host_caches[layer][j].view(np.uint8), host.view(np.uint8))
            assert np.array_equal(runner.kv_caches[layer][j].view(np.uint8), dev.view(np.uint8))
    assert runner.num_blocks_swapped_out == runner.num_blocks_swapped_in == 2


def test_no_swap_pool_without_host_blocks():
    runner = ModelRunner(SimpleNamespace(cfg=CFG), CpuOps(), NB, BS)
    assert runner.host_caches == []
    runner.move_blocks(ScheduledBatch([], []))  # nothing to move is fine


def test_touch_kv_blocks_zeroes_the_first_blocks_of_every_layer_and_stops_at_the_pool():
    runner = ModelRunner.__new__(ModelRunner)  # only the KV pool is under test
    runner.kv_caches = [(np.ones((5, 2, 1, 4), np.float32), np.ones((5, 2, 1, 4), np.float32)) for _ in range(2)]
    runner.touch_kv_blocks(-1)  # nothing, not all but the last block
    assert all((k == 1).all() and (v == 1).all() for k, v in runner.kv_caches)
    runner.touch_kv_blocks(3)
    for k, v in runner.kv_caches:
        assert not k[:3].any() and not v[:3].any() and (k[3:] == 1).all() and (v[3:] == 1).all()
    runner.touch_kv_blocks(99)
    assert not any(k.any() or v.any() for k, v in runner.kv_caches)
