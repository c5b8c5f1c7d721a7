"""`cupaged bench overhead`: what the engine's own Python costs per step, with the model stubbed out.

The engine is the real one (scheduler, block manager, runner planning and upload, sampler, output
processor with the real SmolLM2 tokenizer); only the forward pass is replaced. The stub returns at once
a [S, 1] "logits" array holding each sampling row's next token, and `StubOps.sample` hands those tokens
back as a device would hand back its argmax: the sampler's host work (per-row parameters, seeded
draws, the copy of the token ids) runs, the vocabulary-wide argmax (device work) does not. Tokens follow
a fixed text stream of ASCII words, multi-byte characters split across tokens, runs of spaces and
fragments of the requests' stop strings, so detokenization and stop-string hold-back do real work.

Each request streams to its own queue in "delta" mode, as a server's streams do (in "cumulative" mode
every output also copies the request's text and token ids so far, which grows with the output).

Rows: N running decodes for N in --running, then a mixed step (the decodes plus one 2,048-token prefill
chunk). Each row gives ms per step by phase, median and p10-p90 over --steps steps. Then the same
decode steps through `CudaOps` on a null device (every launch checked, recorded and counted, nothing
executed; cuBLAS stubbed) with SmolLM2's 30 layers: launches per step and microseconds of Python per
launch, the cost of an eager CUDA step.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import click
import numpy as np

from cupaged.backend.cpu import CpuOps
from cupaged.backend.kernels import Device
from cupaged.engine.output_processor import RequestQueue

PHASES = ("schedule", "plan", "sample", "update", "outputs")
STREAM_TEXT = ("The paged cache keeps  keys in blocks: café, naïve, 東京 and 🙂 emoji, \"quoted\" words, "
               "tabs\tand ### half stops ## and <|im_end|> markers, then plain English again. ")
STOP = ["###!", "\n\nUser:"]  # partly matched often ("###", "##"), never whole: every stream keeps going


class StubOps(CpuOps):
    """CpuOps whose "logits" are [S, 1] next-token ids (the stub forward's output)."""

    name = "cpu"

    def sample(self, logits, temperature, top_k, top_p, uniform):
        return logits[:, 0].astype(np.int32)


def stub_forward(stream: np.ndarray):
    """A forward that, for each sampling row, returns the stream's token after that row's position."""
    def forward(input_ids, meta, kv_caches):
        positions = np.asarray(meta.positions)[np.asarray(meta.logits_indices)]
        return stream[(positions + 1) % len(stream)].astype(np.float32)[:, None]
    return forward


@contextmanager
def timed(obj, name: str, bucket: list[float]):
    """Add the wall time of every call of obj.name to bucket[0] while in the block."""
    fn, own = getattr(obj, name), name in vars(obj)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            bucket[0] += time.perf_counter() - t0

    setattr(obj, name, wrapper)
    try:
        yield
    finally:
        setattr(obj, name, fn) if own else delattr(obj, name)


def phase_hooks(engine) -> list[tuple[object, str, str]]:
    """(object, method, phase) for the methods that exist in this engine."""
    hooks = [(engine.scheduler, "schedule", "schedule"), (engine.runner, "plan", "plan"),
             (engine.runner, "_upload", "plan"), (engine.sampler, "sample", "sample"),
             (engine.model, "forward", "forward")]
    for name in ("output_processor", "outputs"):
        proc = getattr(engine, name, None)
        if proc is not None and hasattr(proc, "process"):
            hooks.append((proc, "process", "outputs"))
    for name in ("_update_text", "_output"):  # the engine before it had an output processor
        if hasattr(engine, name):
            hooks.append((engine, name, "outputs"))
    return hooks


def timed_steps(engine, steps: int, before_step=None) -> dict[str, list[float]]:
    """Run steps engine steps; per step the seconds of each phase ("update" is the rest, "total" all)."""
    from contextlib import ExitStack
    per: dict[str, list[float]] = {p: [] for p in (*PHASES, "total")}
    buckets = {p: [0.0] for p in (*PHASES, "forward")}
    with ExitStack() as stack:
        for obj, method, phase in phase_hooks(engine):
            stack.enter_context(timed(obj, method, buckets[phase]))
        for _ in range(steps):
            if before_step:
                before_step()
            for b in buckets.values():
                b[0] = 0.0
            t0 = time.perf_counter()
            engine.step()
            total = time.perf_counter() - t0 - buckets["forward"][0]
            for p in PHASES[:-2] + ("outputs",):
                per[p].append(buckets[p][0])
            per["update"].append(total - sum(buckets[p][0] for p in PHASES if p != "update"))
            per["total"].append(total)
    return per


def make_engine(model_dir: Path, max_num_seqs: int):
    from cupaged.config import EngineConfig
    from cupaged.engine.engine import LLMEngine
    config = EngineConfig(model=str(model_dir), backend="cpu", max_num_seqs=max_num_seqs,
                          max_num_batched_tokens=2048 + max_num_seqs, kv_cache_memory=2 * 2**30,
                          max_model_len=8192, progress=False)
    engine = LLMEngine(config, ops=StubOps())
    stream = np.array(engine.tokenizer.encode(STREAM_TEXT * 4, add_special_tokens=False), np.int64)
    engine.model.forward = stub_forward(stream)
    return engine, stream


class Sink(RequestQueue):
    """A streaming caller that reads each output at once (so none pile up)."""

    def put(self, out) -> None:
        self.finished = self.finished or out.finished


def fill(engine, stream, n: int, seed: int = 0) -> None:
    """n running decodes, each streamed to its own queue as a server streams them (output_kind "delta"):
    a third greedy, a third seeded top-p, a third top-k at temperature 0.7; all with STOP, none ends
    before the run does."""
    from cupaged.sampling_params import SamplingParams
    rng = np.random.default_rng(seed)
    kinds = [dict(temperature=0), dict(temperature=0.8, top_p=0.95, seed=7), dict(temperature=0.7, top_k=40)]
    for i in range(n):
        start = int(rng.integers(0, len(stream) - 40))
        engine.add_request(f"d{i}", {"prompt_token_ids": stream[start:start + 24].tolist()},
                           SamplingParams(max_tokens=100_000, ignore_eos=True, stop=STOP, output_kind="delta",
                                          **kinds[i % 3]), queue=Sink())
    while any(seq.num_output_tokens == 0 for seq in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()


def summary(per: dict[str, list[float]]) -> dict:
    out = {}
    for p, xs in per.items():
        ms = np.array(xs) * 1e3
        out[p] = {"median": float(np.median(ms)), "p10": float(np.percentile(ms, 10)),
                  "p90": float(np.percentile(ms, 90))}
    return out


def decode_rows(model_dir: Path, running: list[int], steps: int) -> list[dict]:
    rows = []
    for n in running:
        engine, stream = make_engine(model_dir, max(n, 1))
        fill(engine, stream, n)
        timed_steps(engine, 3)  # warm
        rows.append({"row": f"{n} decodes", "running": n, **summary(timed_steps(engine, steps))})
    return rows


def mixed_row(model_dir: Path, n: int, steps: int) -> dict:
    """n decodes plus a fresh 2,048-token prompt each step (aborted once its chunk ran)."""
    from cupaged.sampling_params import SamplingParams
    engine, stream = make_engine(model_dir, n + 1)
    fill(engine, stream, n)
    long = np.resize(stream, 2048).tolist()
    count = iter(range(10**9))

    def add_long():
        for rid in [r for r in engine.requests if r.startswith("p")] if hasattr(engine, "requests") else []:
            engine.abort(rid)
        engine.add_request(f"p{next(count)}", {"prompt_token_ids": long},
                           SamplingParams(max_tokens=1, temperature=0, output_kind="delta"),
                           cache_salt=f"s{next(count)}", queue=Sink())

    timed_steps(engine, 2, add_long)
    return {"row": f"{n} decodes + 2048-token chunk", "running": n, **summary(timed_steps(engine, steps, add_long))}


class NullDevice(Device):
    """Launches are checked (by CudaOps and `launch`), recorded and counted, never run; cuBLAS returns an
    uninitialised array of the right shape; arrays are NumPy."""

    name = "null"
    xp = np
    max_shared_mem = 227 * 1024

    def __init__(self):
        self.launches = 0

    def run(self, kernel, grid, block, args, shared_mem) -> None:
        self.launches += 1

    def gemm(self, x, w, bias=None, bf16: bool = False):
        self.launches += 1
        return np.empty((x.shape[0], w.shape[0]), x.dtype)


def null_device_row(model_dir: Path, n: int, steps: int) -> dict:
    """Decode steps of n sequences through CudaOps on the null device, SmolLM2's 30 layers (zero weights)."""
    from cupaged.backend.cuda import CudaOps
    from cupaged.engine.model_runner import ModelRunner
    from cupaged.engine.scheduler import ScheduledBatch
    from cupaged.engine.sequence import Sequence
    from cupaged.model.config import ModelConfig
    from cupaged.model.llama import LlamaModel, expected_tensors
    from cupaged.sampling_params import SamplingParams

    cfg = ModelConfig.from_dir(model_dir)
    cfg.num_layers = 30
    device = NullDevice()
    ops = CudaOps(device, dtype="float16")
    zeros = {k: np.zeros(s, np.float16) for k, s in expected_tensors(cfg).items()}
    model = LlamaModel(cfg, ops, zeros)
    runner = ModelRunner(model, ops, num_blocks=n * 8, block_size=16)
    seqs = []
    for i in range(n):
        seq = Sequence(str(i), list(range(1, 101)), SamplingParams())
        seq.block_table = list(range(i * 8, i * 8 + 7))
        seq.num_computed_tokens = 99
        seqs.append(seq)
    batch = ScheduledBatch(seqs, [1] * n)
    times, launches = [], []
    for _ in range(steps + 5):
        device.launches = 0
        t0 = time.perf_counter()
        ids, meta = runner.prepare(batch)
        model.forward(ids, meta, runner.kv_caches)
        times.append(time.perf_counter() - t0)
        launches.append(device.launches)
    times = times[5:]  # warm-up
    med = statistics.median(times)
    return {"row": f"CudaOps on a null device, {n} decodes, 30 layers", "running": n,
            "launches_per_step": launches[-1], "ms_per_step": med * 1e3,
            "us_per_launch": med * 1e6 / launches[-1],
            "p10_ms": float(np.percentile(times, 10)) * 1e3, "p90_ms": float(np.percentile(times, 90)) * 1e3}


def stub_model_dir(root: Path) -> Path:
    """SmolLM2's tokenizer and shape with one layer of random weights (the forward is stubbed anyway)."""
    from cupaged.weights.catalog import DEFAULT_MODEL
    from cupaged.weights.random_model import build_random_model
    from cupaged.weights.store import resolve_model
    return build_random_model(resolve_model(DEFAULT_MODEL, progress=False), root / "stub", overrides={"num_hidden_layers": 1})


def python_call_ns(calls: int = 200_000) -> float:
    """This host's speed at plain Python: ns per call of a one-attribute method, best of 5 (a shared
    host's speed moves between days by up to 2x; this says where a run stood)."""
    class Box:
        __slots__ = ("x",)

        def __init__(self):
            self.x = 0

        def bump(self, n):
            self.x += n

    box, best = Box(), float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for i in range(calls):
            box.bump(i)
        best = min(best, time.perf_counter() - t0)
    return best * 1e9 / calls


def print_table(rows: list[dict], machine: str, call_ns: float) -> None:
    click.echo(f"engine host overhead per step (model stubbed) on {machine}; a small Python method call "
               f"takes {call_ns:.0f} ns here")
    click.echo("ms per step, median [p10-p90]; update = the rest of step() (post-step bookkeeping)")
    click.echo(f"{'':31}" + "".join(f"{p:>19}" for p in (*PHASES, "total")) + f"{'us/seq':>8}")
    for r in rows:
        if "total" in r:
            cells = [f"{r[p]['median']:.2f} [{r[p]['p10']:.2f}-{r[p]['p90']:.2f}]" for p in (*PHASES, "total")]
            per_seq = r["total"]["median"] * 1e3 / max(r["running"], 1)
            click.echo(f"{r['row']:31}" + "".join(f"{c:>19}" for c in cells) + f"{per_seq:8.1f}")
    for r in rows:
        if "launches_per_step" in r:
            click.echo(f"{r['row']}: {r['launches_per_step']} launches per step, {r['ms_per_step']:.2f} ms "
                       f"[{r['p10_ms']:.2f}-{r['p90_ms']:.2f}], {r['us_per_launch']:.2f} us per launch")
    click.echo("(null device: at 1 sequence the time is Python's; at more, NumPy also does the arrays' work)")


@click.command()
@click.option("--running", default="1,16,64,256,512", show_default=True, help="Running decodes per row, comma-separated.")
@click.option("--steps", type=click.IntRange(min=3), default=30, show_default=True, help="Timed steps per row.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def overhead(running, steps, as_json):
    """The engine's host cost per step with the model stubbed: ms by phase at 1-512 running decodes and
    a mixed step, then launches and us of Python per launch of an eager CUDA step on a null device."""
    from cupaged.cli.bench import machine_name
    try:
        counts = [int(x) for x in running.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(f"{running!r} is not a comma-separated list of integers", param_hint="--running")
    if not counts or min(counts) < 1:
        raise click.BadParameter("give at least one count, each >= 1", param_hint="--running")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = stub_model_dir(Path(tmp))
        rows = decode_rows(model_dir, counts, steps)
        rows.append(mixed_row(model_dir, max(c for c in counts if c <= 256) if min(counts) <= 256 else counts[0], steps))
        rows += [null_device_row(model_dir, n, steps) for n in sorted({1, min(256, max(counts))})]
    if as_json:
        click.echo(json.dumps({"machine": machine_name(), "python_call_ns": python_call_ns(), "rows": rows}))
    else:
        print_table(rows, machine_name(), python_call_ns())
