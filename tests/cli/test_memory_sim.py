"""The KV-memory replay behind `cupaged bench memory`: each step's accounting against a naive recount
from the live block tables (paged: through the engine's own Scheduler and BlockManager), the life of
every request, the summary against a plain-Python recount, and the trace generator and parser with
their errors."""
from __future__ import annotations

import math

import pytest

from cupaged.cli.memory_sim import ContiguousMemory, Replay, SchedulerReplay, summarize_replay
from cupaged.cli.memory_trace import TraceRequest, load_trace, synthetic_trace
from cupaged.errors import TraceError
from cupaged.util import cdiv


def naive_paged(replay: SchedulerReplay) -> tuple[int, int, int]:
    """(reserved, used, saved blocks) recounted from the running sequences' block tables alone:
    a physical block counts once, holding the tokens of its fullest holder."""
    bs = replay.block_size
    filled: dict[int, int] = {}
    for seq in replay.running:
        for index, block in enumerate(seq.block_table):
            filled[block] = max(filled.get(block, 0), min(bs, seq.num_computed_tokens - index * bs))
    references = sum(len(seq.block_table) for seq in replay.running)
    return len(filled) * bs, sum(filled.values()), references - len(filled)


def drive(replay, check) -> dict[int, int]:
    """Run replay to the end, calling check() after each step; returns the most tokens each seq held."""
    most: dict[int, int] = {}
    while not replay.done():
        replay.step()
        check()
        for seq in replay.running:
            most[seq.seq_id] = max(most.get(seq.seq_id, 0), seq.num_computed_tokens)
    return most


def small_trace(n: int = 1, num: int = 40, seed: int = 3) -> list[TraceRequest]:
    return synthetic_trace(num, rate=50.0, max_model_len=256, n=n, mean_input=40, mean_output=30, seed=seed)


@pytest.mark.parametrize("block_size", [8, 16, 32])
@pytest.mark.parametrize("n", [1, 3])
def test_paged_accounting_matches_a_naive_recount(block_size, n):
    trace = small_trace(n)
    replay = SchedulerReplay(trace, 512, block_size, step_s=0.01)
    rec = replay.record

    def check():
        reserved, used, saved = naive_paged(replay)
        assert (rec.reserved_tokens[-1], rec.used_tokens[-1], rec.saved_blocks[-1]) == (reserved, used, saved)
        if n == 1:  # no sharing: waste is each sequence's unfilled tail of its last block
            assert reserved - used == sum(len(s.block_table) * block_size - s.num_computed_tokens
                                          for s in replay.running)
        assert rec.running_requests[-1] == len({s.request_id for s in replay.running})
        for seq in replay.running:  # as in the engine: the token sampled last is computed next step
            assert seq.num_computed_tokens == seq.num_tokens - 1
            assert len(seq.block_table) == cdiv(seq.num_computed_tokens, block_size)

    most = drive(replay, check)
    assert replay.num_preemptions > 0, "the pool was meant to be tight enough to preempt"
    # recorded after each step, a sequence holds at most target - 2 tokens: the step that computes
    # target - 1 samples its last token (never computed), which finishes and frees it
    assert sorted(most.values()) == sorted(r.input_len + r.output_len - 2 for r in trace for _ in range(r.n)
                                           if r.output_len > 1)
    assert replay.bm.num_free_blocks == replay.bm.num_blocks
    assert n == 1 or max(rec.saved_blocks) > 0


def test_contiguous_accounting_matches_a_naive_recount():
    trace = small_trace(n=2)
    replay = Replay(trace, ContiguousMemory(1024, max_model_len=256), step_s=0.01)

    def check():
        assert replay.record.reserved_tokens[-1] == 256 * len(replay.running) <= 1024
        assert replay.record.used_tokens[-1] == sum(s.num_tokens for s in replay.running)

    most = drive(replay, check)
    assert replay.num_preemptions == 0 and replay.memory.held == 0
    assert sorted(most.values()) == sorted(r.input_len + r.output_len for r in trace for _ in range(r.n))


def test_fork_saves_exactly_the_blocks_copies_would_add():
    # Ample memory: both runs take the same steps, so the copies' extra blocks are the fork's saving.
    trace = small_trace(n=4, num=12)
    fork = SchedulerReplay(trace, 1 << 16, 16, 0.01, share=True).run()
    copies = SchedulerReplay(trace, 1 << 16, 16, 0.01, share=False).run()
    assert fork.time_s == copies.time_s and fork.running_requests == copies.running_requests
    assert [c - f for c, f in zip(copies.reserved_tokens, fork.reserved_tokens)] == \
        [16 * s for s in fork.saved_blocks]
    # a token in a shared block is one K/V: copies hold it again, in their own blocks
    for f, c, saved in zip(fork.used_tokens, copies.used_tokens, fork.saved_blocks):
        assert f <= c and (f == c) == (saved == 0)
    assert max(fork.saved_blocks) > 0 and max(copies.saved_blocks) == 0


def test_summary_against_a_plain_recount():
    trace = small_trace()
    rec = SchedulerReplay(trace, 1024, 16, 0.01).run()
    s = summarize_replay(rec, 16)
    steps = [(r, u, q) for r, u, q in zip(rec.reserved_tokens, rec.used_tokens, rec.running_requests) if r]
    assert s["waste_mean_pct"] == pytest.approx(sum(100 * (r - u) / r for r, u, _ in steps) / len(steps))
    top = max(r for r, _, _ in steps)
    at_top = [100 * (r - u) / r for r, u, _ in steps if r == top]
    assert s["waste_peak_pct"] == pytest.approx(sum(at_top) / len(at_top))
    assert s["peak_requests"] == max(q for _, _, q in steps)
    assert s["mean_requests"] == pytest.approx(sum(q for _, _, q in steps) / len(steps))
    assert s["drain_s"] == rec.time_s[-1] and s["saved_blocks_peak"] == 0


def test_idle_gaps_are_skipped_and_arrivals_wait_for_their_time():
    trace = [TraceRequest(0.0, 10, 3), TraceRequest(5.0, 10, 3)]
    replay = SchedulerReplay(trace, 256, 16, step_s=0.1)
    rec = replay.run()
    # each: prefilled with its first token sampled, then 2 decodes; its third token finishes and frees it
    assert rec.time_s == pytest.approx([0.0, 0.1, 0.2, 5.0, 5.1, 5.2])
    assert rec.used_tokens == [10, 11, 0, 10, 11, 0]
    assert rec.reserved_tokens == [16, 16, 0, 16, 16, 0]


def test_a_prompt_as_large_as_the_pool_is_admitted_when_it_is_alone():
    replay = SchedulerReplay([TraceRequest(0.0, 250, 6), TraceRequest(0.0, 10, 2)], 256, 16, 0.01)
    rec = replay.run()
    assert rec.reserved_tokens[0] == 256 and rec.running_requests[:2] == [1, 1] and replay.done()


def test_a_request_that_can_never_run_is_named():
    with pytest.raises(TraceError, match="needs 20 blocks of 16, the pool has 16"):
        SchedulerReplay([TraceRequest(0.0, 300, 20)], 256, 16, 0.01)
    with pytest.raises(TraceError, match="exceed max_model_len 256"):
        Replay([TraceRequest(0.0, 250, 20)], ContiguousMemory(1024, 256), 0.01)
    with pytest.raises(TraceError, match="exceeds max_num_seqs 2"):
        SchedulerReplay([TraceRequest(0.0, 5, 5, n=3)], 1024, 16, 0.01, max_num_seqs=2)


def test_prefix_cache_hook_reuses_shared_prefixes():
    trace = synthetic_trace(30, rate=50.0, max_model_len=512, prefix_len=64, prefix_groups=2, mean_input=30,
                            mean_output=20, seed=1)
    replay = SchedulerReplay(trace, 4096, 16, 0.01, prefix_caching=True)

    def check():
        reserved, used, saved = naive_paged(replay)
        assert (replay.record.reserved_tokens[-1], replay.record.used_tokens[-1]) == (reserved, used)

    drive(replay, check)
    assert replay.bm.prefix_cache_hits > 0


def test_prefix_reuse_is_counted_once_per_admission_under_preemption():
    trace = synthetic_trace(40, rate=200.0, max_model_len=512, n=4, prefix_len=40, prefix_groups=3,
                            mean_input=30, mean_output=60, seed=2)
    replay = SchedulerReplay(trace, 1024, 16, 0.01, prefix_caching=True)
    drive(replay, lambda: None)
    reuse, bm = replay.bm.reuse, replay.bm
    assert replay.num_preemptions > 0 and reuse.readmitted_reused > 0  # the case that counted twice
    # one first admission per request (its samples fork from it), each looking up its prompt
    assert reuse.first_tokens == sum(r.input_len for r in trace)
    # a first admission can reuse only the whole blocks of its shared prefix (the rest of every
    # prompt is its own), leaving a token to compute
    assert reuse.first_reused <= sum(min(r.prefix_len, r.input_len - 1) // 16 * 16 for r in trace)
    assert 0 < reuse.first_reused <= reuse.first_tokens
    # every preemption by recompute comes back once, and the cache's counters are the sum of the two
    assert reuse.readmissions == replay.num_preemptions
    assert (bm.prefix_cache_queries, bm.prefix_cache_hits) == (reuse.first_tokens + reuse.readmitted_tokens,
                                                               reuse.first_reused + reuse.readmitted_reused)
    assert bm.prefix_cache_hits > reuse.first_tokens  # the cache's counters alone exceed the trace's prompts


def test_prefix_reuse_without_pressure_matches_a_hand_count():
    # a request every 10 steps, so each finds the earlier prompts of its group computed and cached;
    # 37 shared tokens make 2 whole blocks of 16
    trace = [TraceRequest(0.1 * i, 40 + i, 10, n=2, prefix_id=f"p{i % 3}", prefix_len=37) for i in range(12)]
    replay = SchedulerReplay(trace, 8192, 16, 0.01, prefix_caching=True)
    drive(replay, lambda: None)
    reuse = replay.bm.reuse
    assert replay.num_preemptions == reuse.readmissions == reuse.readmitted_tokens == 0
    assert reuse.first_tokens == sum(r.input_len for r in trace)
    assert reuse.first_reused == 32 * (len(trace) - 3)  # all but the first of each of the 3 groups


# ---- traces ---------------------------------------------------------------------------------------
def test_synthetic_trace_is_sharegpt_like_reproducible_and_capped():
    a = synthetic_trace(4000, rate=10.0, max_model_len=1 << 20, seed=7)
    assert a == synthetic_trace(4000, rate=10.0, max_model_len=1 << 20, seed=7)
    mean_in = sum(r.input_len for r in a) / len(a)
    mean_out = sum(r.output_len for r in a) / len(a)
    assert 140 < mean_in < 180 and 300 < mean_out < 380
    arrivals = [r.arrival for r in a]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0
    assert len(a) / arrivals[-1] == pytest.approx(10.0, rel=0.1)
    capped = synthetic_trace(2000, rate=math.inf, max_model_len=512, seed=7)
    assert all(r.arrival == 0 and r.input_len + r.output_len <= 512 and r.output_len >= 1 for r in capped)
    shared = synthetic_trace(50, rate=5.0, max_model_len=512, prefix_len=100, prefix_groups=3, n=2, seed=1)
    assert {r.prefix_id for r in shared} <= {"prefix-0", "prefix-1", "prefix-2"}
    assert all(r.input_len > 100 and r.n == 2 for r in shared)


def test_trace_file_is_parsed_and_sorted(tmp_path):
    path = tmp_path / "trace.jsonl"
    path.write_text("# a comment\n"
                    '{"arrival": 1.5, "input_len": 10, "output_len": 4}\n'
                    "\n"
                    '{"arrival": 0, "input_len": 20, "output_len": 5, "n": 2, "prefix_id": "sys", "prefix_len": 8}\n')
    assert load_trace(path, max_model_len=64) == [TraceRequest(0.0, 20, 5, 2, "sys", 8), TraceRequest(1.5, 10, 4)]


@pytest.mark.parametrize("line, problem", [
    ("{not json", "line 2: not valid JSON"),
    ("[1, 2]", "line 2: expected a JSON object, got list"),
    ('{"arrival": 0, "input_len": 5}', "line 2: missing 'output_len'"),
    ('{"arrival": 0, "input_len": 5, "output_len": 1, "color": 1}', "line 2: unknown field 'color'"),
    ('{"arrival": -1, "input_len": 5, "output_len": 1}', "line 2: 'arrival' must be a finite number"),
    ('{"arrival": "soon", "input_len": 5, "output_len": 1}', "line 2: 'arrival' must be a finite number"),
    ('{"arrival": 0, "input_len": 0, "output_len": 1}', "line 2: 'input_len' must be an integer >= 1, got 0"),
    ('{"arrival": 0, "input_len": 5.5, "output_len": 1}', "line 2: 'input_len' must be an integer >= 1"),
    ('{"arrival": 0, "input_len": 5, "output_len": true}', "line 2: 'output_len' must be an integer >= 1"),
    ('{"arrival": 0, "input_len": 5, "output_len": 1, "n": 0}', "line 2: 'n' must be an integer >= 1"),
    ('{"arrival": 0, "input_len": 5, "output_len": 1, "prefix_len": 2}', "line 2: 'prefix_len' needs a 'prefix_id'"),
    ('{"arrival": 0, "input_len": 5, "output_len": 1, "prefix_id": "a", "prefix_len": 6}',
     "line 2: 'prefix_len' 6 is longer than 'input_len' 5"),
    ('{"arrival": 0, "input_len": 60, "output_len": 5}',
     "line 2: input_len + output_len = 65 exceeds max_model_len 64"),
])
def test_trace_file_errors_name_the_line(tmp_path, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"arrival": 0, "input_len": 5, "output_len": 1}\n' + line + "\n")
    with pytest.raises(TraceError) as err:
        load_trace(path, max_model_len=64)
    assert str(err.value).startswith("bad.jsonl " + problem.split(":")[0]) and problem in str(err.value)


def test_empty_or_missing_trace_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n# nothing\n")
    with pytest.raises(TraceError, match="has no requests"):
        load_trace(tmp_path / "empty.jsonl", 64)
    with pytest.raises(TraceError, match="cannot read trace"):
        load_trace(tmp_path / "missing.jsonl", 64)
