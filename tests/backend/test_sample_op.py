"""Ops.sample: CpuOps against a float64 reference of cuda/sampling.cu's semantics, CudaOps in emulation
(fp16, bf16, float32 logits) against CpuOps, and the Sampler's fast path through the engine.

The reference: greedy rows (temperature <= 0) take the argmax (lowest index on ties, NaN as -inf).
Sampled rows keep the top-k logits (ties at the k-th kept), then of those the largest logits whose
softmax(logits / T) mass first reaches top_p * mass(top-k set) (ties at the threshold kept), and pick
the first allowed index, in index order (the kernel's walk), whose cumulative mass exceeds u * total.
Each u is placed mid-way through its token's CDF interval and each top_p mid-way between two
steps of the mass, so float32 (kernel, fp32 __expf) and float64 (reference) cannot disagree.
"""
from __future__ import annotations

import zlib

import numpy as np
import pytest

from cupaged.backend.cpu import CpuOps
from cupaged.backend.cuda import CudaOps
from cupaged.engine.sampler import Sampler
from cupaged.engine.sequence import Sequence
from cupaged.sampling_params import SamplingParams
from tests.backend.test_cuda_emu_ops import DEVICES, launched, make_device

pytest.importorskip("tests.emu.harness")

CPU = CpuOps()


@pytest.fixture
def rng(request):
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


# --- the reference, deliberately naive -------------------------------------------------------------
def reference_weights(row: np.ndarray, t: float, k: int, p: float) -> np.ndarray:
    """float64 unnormalised probabilities of the allowed set (0 outside it) for a sampled row."""
    l = np.where(np.isnan(row), -np.inf, row.astype(np.float64))
    w = np.exp((l - l.max()) / t)
    allowed = np.ones(l.size, bool)
    if 0 < k < l.size:
        kth = sorted(l.tolist(), reverse=True)[k - 1]
        allowed = l >= kth
    if p < 1.0:
        z, acc = w[allowed].sum(), 0.0
        for v in sorted(set(l[allowed].tolist()), reverse=True):  # distinct values, largest first
            acc += w[allowed & (l == v)].sum()
            if acc >= p * z:
                allowed &= l >= v
                break
    return np.where(allowed, w, 0.0)


def reference_sample(row: np.ndarray, t: float, k: int, p: float, u: float) -> int:
    l = np.where(np.isnan(row), -np.inf, row.astype(np.float64))
    if t <= 0 or l.max() == -np.inf:
        return next(i for i, v in enumerate(l) if v == l.max())
    w = reference_weights(row, t, k, p)
    target, acc = u * w.sum(), 0.0
    for i, wi in enumerate(w):
        acc += wi
        if wi > 0 and acc > target:
            return i
    raise AssertionError("u * total not reached")


def make_case(rng, s: int, v: int, greedy_rows=(0,)):
    """float32 logits [s, v] and per-row parameters with unambiguous answers: (logits, temperature,
    top_k, top_p, uniform, expected). Row 0 ties at its maximum; row 1 has NaNs."""
    logits = rng.normal(0.0, 3.0, (s, v)).astype(np.float32)
    logits[0, [v - 1, v // 2]] = logits[0].max() + 1.0
    if s > 1:
        logits[1, rng.choice(v, 3, replace=False)] = np.nan
    temp = rng.uniform(0.5, 1.5, s).astype(np.float32)
    temp[list(greedy_rows)] = 0.0
    top_k = rng.integers(0, v + 5, s).astype(np.int32)
    top_p = rng.uniform(0.3, 1.2, s).astype(np.float32)
    if s > 3:
        top_k[2], top_k[3], top_p[3] = 1, 0, 1.0
    return logits, temp, top_k, top_p


def choose(rng, logits, temp, top_k, top_p):
    """Place top_p and u mid-step for every sampled row (in place); return the expected tokens."""
    uniform = np.zeros(len(logits), np.float32)
    want = np.zeros(len(logits), np.int64)
    for b, row in enumerate(logits):
        if temp[b] > 0 and top_p[b] < 1.0:
            w = np.sort(reference_weights(row, float(temp[b]), int(top_k[b]), 1.0))[::-1]
            n, cum = int(np.count_nonzero(w)), np.cumsum(w)
            if n > 1:
                c = int(rng.integers(0, n - 1))
                top_p[b] = (cum[c] + cum[c + 1]) / 2 / cum[-1]
        if temp[b] > 0:
            w = reference_weights(row, float(temp[b]), int(top_k[b]), float(top_p[b]))
            cum = np.cumsum(w)
            j = int(rng.choice(np.flatnonzero(w > 1e-3 * cum[-1])))
            uniform[b] = (cum[j] - w[j] / 2) / cum[-1]
        else:
            uniform[b] = rng.uniform(0, 1)
        want[b] = reference_sample(row, float(temp[b]), int(top_k[b]), float(top_p[b]), float(uniform[b]))
    return uniform, want


# --- CpuOps against the reference -----------------------------------------------------------------
@pytest.mark.parametrize("s,v", [(1, 1), (6, 7), (12, 50), (12, 777), (5, 4099)])
def test_cpu_sample_matches_reference(rng, s, v):
    logits, temp, top_k, top_p = make_case(rng, s, v)
    uniform, want = choose(rng, logits, temp, top_k, top_p)
    got = CPU.sample(logits, temp, top_k, top_p, uniform)
    assert got.dtype == np.int32 and got.shape == (s,)
    assert got.tolist() == want.tolist()
    if v > 3:
        assert got[0] == v // 2, "greedy ties go to the lowest index"


def test_cpu_sample_reaches_every_allowed_token_in_index_order():
    """Sweeping u over [0, 1) walks the allowed tokens in index order, each for its share of the mass."""
    logits = np.float32([[0.5, 2.0, -1.0, 1.0, 1.9, -3.0]])
    t, k, p = np.float32([1.0]), np.int32([4]), np.float32([1.0])
    w = reference_weights(logits[0], 1.0, 4, 1.0)
    us = (np.arange(1000) + 0.5) / 1000
    got = [int(CPU.sample(logits, t, k, p, np.float32([u]))[0]) for u in us]
    assert got == sorted(got) and set(got) == set(np.flatnonzero(w))
    np.testing.assert_allclose(np.bincount(got, minlength=6) / 1000, w / w.sum(), atol=2e-3)


# --- CudaOps (emulation; the GPU with -m gpu) against CpuOps --------------------------------------
@pytest.fixture(params=DEVICES)
def device_kind(request) -> str:
    return request.param


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("s,v", [(6, 7), (12, 777), (3, 2500)])
def test_cuda_sample_matches_cpu(rng, device_kind, dtype, s, v):
    ops = CudaOps(make_device(device_kind), dtype=dtype)
    logits, temp, top_k, top_p = make_case(rng, s, v, greedy_rows=(0, s - 1))
    dev = ops.asarray(logits, ops.dtype)
    stored = np.asarray(ops.to_numpy(dev), np.float32)  # the fp16/bf16-rounded values both backends see
    uniform, want = choose(rng, stored, temp, top_k, top_p)
    got = ops.sample(dev, temp, top_k, top_p, uniform)
    assert ops.device.is_array(got) and got.dtype == np.int32 and got.shape == (s,)
    assert np.asarray(ops.to_numpy(got)).tolist() == CPU.sample(stored, temp, top_k, top_p, uniform).tolist() \
        == want.tolist()
    if launched(ops) is not None:
        assert launched(ops) == [f"sample_top_k_top_p_{ops.sfx}"]


def test_cuda_sample_float32_logits_and_device_parameters(rng, device_kind):
    ops = CudaOps(make_device(device_kind), dtype="bfloat16")
    logits, temp, top_k, top_p = make_case(rng, 8, 300)
    uniform, want = choose(rng, logits, temp, top_k, top_p)
    args = [ops.asarray(a) for a in (temp, top_k, top_p, uniform)]
    got = ops.sample(ops.asarray(logits, np.float32), *args)
    assert np.asarray(ops.to_numpy(got)).tolist() == want.tolist()
    if launched(ops) is not None:
        assert launched(ops) == ["sample_top_k_top_p_f32"]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_cuda_all_greedy_takes_argmax(rng, device_kind, dtype):
    ops = CudaOps(make_device(device_kind), dtype=dtype)
    logits = rng.normal(0.0, 3.0, (5, 1000)).astype(np.float32)
    logits[0, [7, 900]] = 50.0
    logits[2, :10] = np.nan
    dev = ops.asarray(logits, ops.dtype)
    stored = np.asarray(ops.to_numpy(dev), np.float32)
    zeros, ks, ones = np.zeros(5, np.float32), np.full(5, 3, np.int32), np.ones(5, np.float32)
    got = np.asarray(ops.to_numpy(ops.sample(dev, zeros, ks, ones, rng.uniform(0, 1, 5).astype(np.float32))))
    want = np.argmax(np.where(np.isnan(stored), -np.inf, stored), axis=1)
    assert got.tolist() == want.tolist() and got[0] == 7
    assert CPU.sample(stored, zeros, ks, ones, zeros).tolist() == want.tolist()
    if launched(ops) is not None:
        assert launched(ops) == [f"argmax_{ops.sfx}"]


def test_cuda_sample_checks_shapes_and_dtypes(device_kind):
    ops = CudaOps(make_device(device_kind), dtype="float16")
    one = np.ones(2, np.float32)
    with pytest.raises(TypeError, match="dtype"):
        ops.sample(ops.xp.zeros((2, 8), np.int32), one, np.ones(2, np.int32), one, one)
    with pytest.raises(ValueError, match="shape"):
        ops.sample(ops.asarray(np.ones((2, 8)), ops.dtype), one, np.ones(3, np.int32), one, one)
    assert ops.sample(ops.zeros((0, 8), ops.dtype), one[:0], np.ones(0, np.int32), one[:0], one[:0]).shape == (0,)


# --- the Sampler's fast path ---------------------------------------------------------------------
def seq_with(params: SamplingParams, index: int = 0) -> Sequence:
    return Sequence("s", [0], params, index=index)


LOGITS5 = np.array([1.0, 0.8, 0.5, -1.0, 0.0], np.float32)


def softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


@pytest.mark.parametrize("kw,allowed", [(dict(temperature=0.7), [0, 1, 2, 3, 4]), (dict(top_k=2), [0, 1]),
                                        (dict(top_p=0.5), [0, 1]), (dict(top_k=3, top_p=0.7), [0, 1])])
def test_fast_path_distribution(kw, allowed):
    """The fast path draws from the same distribution as the host path (chi-square, 20k draws)."""
    n = 20_000
    params = SamplingParams(**{"temperature": 1.0, **kw})
    sampler = Sampler(seed=7, ops=CPU)
    seq = seq_with(params)
    tokens, logprobs = sampler.sample(np.tile(LOGITS5, (n, 1)), [seq] * n)
    assert logprobs == [None] * n
    target = np.zeros(5)
    target[allowed] = softmax(LOGITS5 / params.temperature)[allowed]
    target /= target.sum()
    freq = np.bincount(tokens, minlength=5)
    assert set(np.flatnonzero(freq)) == set(allowed)
    chi2 = (((freq - n * target)[allowed]) ** 2 / (n * target[allowed])).sum()
    assert chi2 < 25.0, f"chi-square {chi2:.1f} with {freq} against {n * target}"


def test_fast_path_seed_is_per_sequence():
    """A seeded sequence's tokens do not depend on the rows beside it; greedy rows draw nothing."""
    logits = np.tile(np.float32([0.3, 0.1, 0.2, 0.25]), (3, 1))
    seeded = SamplingParams(temperature=1.0, seed=5)
    a = Sampler(seed=1, ops=CPU)
    s = seq_with(seeded)
    steps_alone = [a.sample(logits[:1], [s])[0][0] for _ in range(30)]
    b = Sampler(seed=2, ops=CPU)
    s2 = seq_with(seeded)
    others = [seq_with(SamplingParams(temperature=1.0)), seq_with(SamplingParams(temperature=0))]
    steps_batch = [b.sample(logits, [others[0], s2, others[1]])[0][1] for _ in range(30)]
    assert steps_alone == steps_batch
    assert len(set(steps_alone)) > 1


# --- through the engine --------------------------------------------------------------------------
def count_paths(monkeypatch, sampler) -> dict[str, int]:
    calls = {"device": 0, "host": 0}
    for name, key in (("sample_on_device", "device"), ("sample_on_host", "host")):
        real = getattr(sampler, name)

        def counted(*a, _real=real, _key=key):
            calls[_key] += 1
            return _real(*a)
        monkeypatch.setattr(sampler, name, counted)
    return calls


def test_engine_takes_fast_path_unless_host_features(smol_llm, monkeypatch):
    prompt = "The capital of France is"
    sampler = smol_llm.engine.sampler
    assert sampler.ops is smol_llm.engine.ops
    calls = count_paths(monkeypatch, sampler)
    fast = smol_llm.generate([prompt, prompt], [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                                                SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=3,
                                                               max_tokens=6, ignore_eos=True)])
    assert calls["device"] >= 6 and calls["host"] == 0
    for kw in (dict(logprobs=2), dict(repetition_penalty=1.2), dict(presence_penalty=0.5), dict(min_p=0.1)):
        calls.update(device=0, host=0)
        smol_llm.generate([prompt, prompt], [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                                             SamplingParams(temperature=0.8, max_tokens=3, ignore_eos=True, **kw)])
        assert calls["device"] >= 3 and calls["host"] >= 3, kw  # each row on its own path (batch invariance)

    # Greedy tokens are the same as on the host path (the sampler before the fast path).
    monkeypatch.setattr(sampler, "ops", None)
    host = smol_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    assert fast[0].outputs[0].token_ids == host[0].outputs[0].token_ids
