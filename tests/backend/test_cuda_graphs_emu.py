"""CUDA graphs for decode, KV pool sizing and pinned uploads: the CUDA backend's Python layer in emulation.

The emulation device's graphs (tests/emu/device.py `EmuGraph`) replay by running the step again and
asserting that every launch is the same as at capture: kernel, grid, block, shared memory, scalars, and
the persistent buffer and offset of every pointer into one. A replay that would read this step's data
anywhere but the static buffers, or launch a different geometry, fails.
"""
from __future__ import annotations

import numpy as np
import pytest

from cupaged.backend.cuda import CudaOps
from cupaged.backend.kernels import launch
from cupaged.engine.cuda_graphs import capture_sizes
from cupaged.llm import LLM
from cupaged.sampling_params import SamplingParams
from tests.emu.device import EmuDevice
from tests.model.tiny_models import VOCAB, build_tiny_model

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_hd64(tmp_path_factory, smollm2_dir):
    return build_tiny_model("llama-hd64", tmp_path_factory.mktemp("hd64"), smollm2_dir)


def emu_llm(model_dir, graphs: bool, **kwargs) -> LLM:
    ops = CudaOps(EmuDevice(graphs=graphs), dtype="float16", partition_size=32)
    return LLM(model=str(model_dir), backend=ops, max_num_seqs=4, max_model_len=128,
               kv_cache_memory=kwargs.pop("kv_cache_memory", 2 * 2**20), enforce_eager=not graphs, progress=False,
               **kwargs)


def prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [{"prompt_token_ids": rng.integers(3, VOCAB, n).tolist()} for n in lengths]


def test_capture_sizes():
    assert capture_sizes(1) == [1]
    assert capture_sizes(2) == [1, 2]
    assert capture_sizes(24) == [1, 2, 4, 8, 16, 24]
    assert capture_sizes(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]


def test_graphs_give_the_eager_tokens(tiny_hd64):
    graphed, eager = emu_llm(tiny_hd64, graphs=True), emu_llm(tiny_hd64, graphs=False)
    runner = graphed.engine.runner
    assert runner.graphs is not None and sorted(runner.graphs.graphs) == [1, 2, 4]
    assert eager.engine.runner.graphs is None
    device = graphed.engine.ops.device
    device.persistent += [c for pair in runner.kv_caches for c in pair]  # pointers into the KV pool are baked
    work = prompts([5, 17, 40])  # three at once: padded to the graph of 4, then fewer as they finish
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (3, 9, 6)]
    params[1] = SamplingParams(temperature=0.8, top_k=20, seed=7, max_tokens=9, ignore_eos=True)
    ours = [o.outputs[0].token_ids for o in graphed.generate(work, params)]
    theirs = [o.outputs[0].token_ids for o in eager.generate(work, params)]
    assert ours == theirs
    replays = {size: g.replays for size, g in runner.graphs.graphs.items()}
    assert replays[4] > 0 and replays[1] > 0, replays  # padded (3 -> 4) and exact batches both replayed


def test_replay_refuses_a_step_dependent_launch():
    """The emulated graph catches what a real one would silently get wrong: a value of this step baked in."""
    ops = CudaOps(EmuDevice(graphs=True), dtype="float16")
    x = ops.asarray(np.ones((4, 64), np.float32), ops.dtype)
    w = ops.asarray(np.ones(64, np.float32), ops.dtype)
    rows = [4]

    def step():
        out = ops.xp.empty_like(x)
        launch(ops._kernel("layernorm.cu", "rms_norm_f16"), grid=(rows[0],), block=(256,),
               args=[out, x, w, np.float32(1e-6), np.int32(64)], shared_mem=0)
        return out

    graph = ops.capture_graph(step)
    graph.replay()
    rows[0] = 2
    with pytest.raises(AssertionError, match="replay launched differently"):
        graph.replay()


class MemoryDevice(EmuDevice):
    """An emulation device with scripted memory: `used` grows by what the profile step 'allocates'."""

    total = 8 * 2**30

    def __init__(self, used: int):
        super().__init__()
        self.used, self.released = used, 0

    def memory_info(self):
        return self.total - self.used, self.total

    def release_cached(self):
        self.released += 1


def test_profile_budget_is_utilization_minus_peak_plus_scratch():
    dev = MemoryDevice(used=2 * 2**30)
    ops = CudaOps(dev, dtype="float16")

    def profile():
        dev.used += 3 * 2**30 // 2  # weights were 2 GiB; the peak step holds 1.5 GiB more, 0.5 of it scratch KV
        return 2**29

    budget = ops.profile_kv_budget(profile, 0.9)
    assert budget == int(0.9 * dev.total) - (2 * 2**30 + 3 * 2**30 // 2) + 2**29
    assert dev.released == 2
    assert CudaOps(EmuDevice(), dtype="float16").profile_kv_budget(profile, 0.9) is None  # no device memory


def test_engine_sizes_its_pool_from_the_profile(tiny_hd64):
    class Scripted(MemoryDevice):
        total = 64 * 2**20

    dev = Scripted(used=20 * 2**20)
    llm = LLM(model=str(tiny_hd64), backend=CudaOps(dev, dtype="float16", partition_size=32), max_num_seqs=4,
              max_num_batched_tokens=64, max_model_len=128, gpu_memory_utilization=0.5, enforce_eager=True,
              progress=False)
    engine = llm.engine
    per_block = engine.config.block_size * engine.model_config.kv_bytes_per_token(2)
    scratch = 4 * per_block  # the profile step: 64 tokens over max_num_seqs = 4 sequences, one block each
    expected = (int(0.5 * dev.total) - dev.used + scratch) // per_block
    assert engine.block_manager.num_blocks == expected
    out = llm.generate(prompts([9])[0], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3


def test_upload_into_a_persistent_buffer():
    ops = CudaOps(EmuDevice(), dtype="float16")
    host = np.arange(12, dtype=np.int32)
    static = ops.upload(np.zeros(12, np.int32))
    same = ops.upload(host, out=static)
    assert same is static and (ops.to_numpy(static) == host).all()
    with pytest.raises(TypeError, match="dtype"):
        ops.upload(host.astype(np.float32), out=static)
