"""Request traces for the KV-memory replay (`cupaged bench memory`): synthetic or from a JSONL file.

A trace is a list of `TraceRequest`s sorted by arrival. The file format is one JSON object a line:

    {"arrival": 0.25, "input_len": 180, "output_len": 320}
    {"arrival": 0.31, "input_len": 90, "output_len": 40, "n": 4}
    {"arrival": 0.40, "input_len": 600, "output_len": 200, "prefix_id": "system-a", "prefix_len": 512}

`arrival` is in seconds from the trace's start; `n` (default 1) is the number of parallel samples that
share the prompt; requests with the same `prefix_id` share their first `prefix_len` prompt tokens
(e.g. a system prompt). Blank lines and lines starting with '#' are skipped.

The synthetic trace draws lengths from log-normal distributions shaped like ShareGPT conversations
(mean input ~160, mean output ~340 tokens, long tails), capped so that input + output fits
max_model_len, and Poisson arrivals at a given rate.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cupaged.errors import TraceError

SHAREGPT_MEAN_INPUT = 160
SHAREGPT_MEAN_OUTPUT = 340
_FIELDS = {"arrival", "input_len", "output_len", "n", "prefix_id", "prefix_len"}


@dataclass(frozen=True)
class TraceRequest:
    arrival: float                 # seconds from the start of the trace
    input_len: int                 # prompt tokens
    output_len: int                # generated tokens (per sample)
    n: int = 1                     # parallel samples sharing the prompt
    prefix_id: str | None = None   # requests with the same id share their first prefix_len prompt tokens
    prefix_len: int = 0


def lognormal_lengths(rng: np.random.Generator, mean: float, sigma: float, size: int) -> np.ndarray:
    """Integer lengths >= 1 from a log-normal with the given mean (before capping) and log-space sigma."""
    mu = math.log(mean) - sigma**2 / 2
    return np.maximum(1, np.rint(rng.lognormal(mu, sigma, size))).astype(np.int64)


def synthetic_trace(num_requests: int, rate: float, max_model_len: int, n: int = 1, prefix_len: int = 0,
                    prefix_groups: int = 4, mean_input: float = SHAREGPT_MEAN_INPUT,
                    mean_output: float = SHAREGPT_MEAN_OUTPUT, sigma: float = 1.0, seed: int = 0,
                    ) -> list[TraceRequest]:
    """ShareGPT-like requests arriving as a Poisson process of `rate` per second (inf: all at 0).

    With prefix_len > 0 each prompt starts with one of `prefix_groups` shared prefixes of that length
    (drawn uniformly), followed by its own log-normal part. Lengths are capped so that
    input + output <= max_model_len.
    """
    if num_requests < 1 or rate <= 0 or n < 1 or prefix_len < 0 or prefix_groups < 1:
        raise TraceError("num_requests, rate, n and prefix_groups must be positive, prefix_len >= 0")
    if prefix_len + 2 > max_model_len:
        raise TraceError(f"prefix_len {prefix_len} leaves no room in max_model_len {max_model_len}")
    rng = np.random.default_rng(seed)
    gaps = np.zeros(num_requests) if math.isinf(rate) else rng.exponential(1 / rate, num_requests)
    arrivals = np.cumsum(gaps) - gaps[0]                                     # [R] seconds, first at 0
    inputs = prefix_len + lognormal_lengths(rng, mean_input, sigma, num_requests)
    inputs = np.minimum(inputs, max_model_len - 1)                          # [R]
    outputs = np.minimum(lognormal_lengths(rng, mean_output, sigma, num_requests), max_model_len - inputs)
    groups = rng.integers(0, prefix_groups, num_requests)
    return [TraceRequest(float(arrivals[i]), int(inputs[i]), int(outputs[i]), n,
                         f"prefix-{groups[i]}" if prefix_len else None, prefix_len)
            for i in range(num_requests)]


def load_trace(path: str | Path, max_model_len: int) -> list[TraceRequest]:
    """Read a JSONL trace, check every line, and return its requests sorted by arrival.
    Raises TraceError naming the file and line of the first problem."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise TraceError(f"cannot read trace {path}: {e.strerror or e}") from e
    requests = []
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            requests.append(parse_trace_line(line, max_model_len, f"{path.name} line {number}"))
    if not requests:
        raise TraceError(f"{path}: the trace has no requests")
    return sorted(requests, key=lambda r: r.arrival)


def parse_trace_line(line: str, max_model_len: int, where: str) -> TraceRequest:
    """One JSONL line -> TraceRequest; `where` ('trace.jsonl line 3') starts every error message."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise TraceError(f"{where}: not valid JSON ({e.msg})") from None
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    missing = sorted({"arrival", "input_len", "output_len"} - obj.keys())
    if missing:
        raise TraceError(f"{where}: missing {', '.join(repr(k) for k in missing)}")
    unknown = sorted(obj.keys() - _FIELDS)
    if unknown:
        raise TraceError(f"{where}: unknown field {unknown[0]!r} (known: {', '.join(sorted(_FIELDS))})")
    arrival = obj["arrival"]
    if isinstance(arrival, bool) or not isinstance(arrival, (int, float)) or not 0 <= arrival < math.inf:
        raise TraceError(f"{where}: 'arrival' must be a finite number of seconds >= 0, got {arrival!r}")
    input_len, output_len = _count(obj, "input_len", where, 1), _count(obj, "output_len", where, 1)
    n, prefix_len = _count(obj, "n", where, 1, default=1), _count(obj, "prefix_len", where, 0, default=0)
    prefix_id = obj.get("prefix_id")
    if prefix_id is not None and not isinstance(prefix_id, (str, int)):
        raise TraceError(f"{where}: 'prefix_id' must be a string or integer, got {prefix_id!r}")
    if prefix_len and prefix_id is None:
        raise TraceError(f"{where}: 'prefix_len' needs a 'prefix_id' (which requests share the prefix)")
    if prefix_len > input_len:
        raise TraceError(f"{where}: 'prefix_len' {prefix_len} is longer than 'input_len' {input_len}")
    if input_len + output_len > max_model_len:
        raise TraceError(f"{where}: input_len + output_len = {input_len + output_len} exceeds max_model_len "
                         f"{max_model_len}")
    return TraceRequest(float(arrival), input_len, output_len, n, None if prefix_id is None else str(prefix_id),
                        prefix_len)


def _count(obj: dict, key: str, where: str, low: int, default: int | None = None) -> int:
    value = obj.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise TraceError(f"{where}: {key!r} must be an integer >= {low}, got {value!r}")
    return value
