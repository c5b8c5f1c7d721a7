"""Options and helpers shared by the `cupaged` commands (main.py, serve.py)."""
from __future__ import annotations

import functools
import logging
import math
import sys

import click

from cupaged.weights.catalog import DEFAULT_MODEL

BACKENDS = click.Choice(["auto", "cpu", "cuda"])


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def _fail(e: Exception) -> None:
    raise click.ClickException(str(e)) from e


class CleanErrors(click.Group):
    """A command group whose commands end a CupagedError (unknown model, no GPU, a prompt over the
    context...) with one `Error:` line and exit code 1, as click does for its own errors, not a traceback."""

    def invoke(self, ctx: click.Context):
        from cupaged.errors import CupagedError
        try:
            return super().invoke(ctx)
        except CupagedError as e:
            raise click.ClickException(str(e)) from e


def parse_memory(text: str) -> dict:
    """'auto', '0.1' (a share of RAM), '2GiB', '512MiB' or a byte count -> the EngineConfig field it sets
    ({}, {"kv_cache_fraction": 0.1} or {"kv_cache_memory": bytes})."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "kb": 10**3, "mb": 10**6, "gb": 10**9, "b": 1}
    lower = text.strip().lower()
    if lower == "auto":
        return {}
    scale = next((units[u] for u in units if lower.endswith(u)), None)
    try:
        value = float(lower[:-len(next(u for u in units if lower.endswith(u)))] if scale else lower)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise click.BadParameter(f"{text!r} is not a share of RAM (0.1) or a size (2GiB, 512MiB)")
    if scale is None and value <= 1:
        return {"kv_cache_fraction": value}
    return {"kv_cache_memory": int(value * (scale or 1))}


def model_options(f):
    f = click.option("--dtype", type=click.Choice(["auto", "float32", "float16", "bfloat16", "q8_0"]), default="auto",
                     show_default=True, help="auto is float32 on the CPU, float16 on CUDA. On the CPU, bfloat16 stores the "
                     "weight matrices in bf16 (half the memory and bytes per step) and q8_0 in 8 bits with a scale per 32 "
                     "(Q8_0-style, 28% of float32's bytes); both compute in float32.")(f)
    f = click.option("--swap-space", type=click.FloatRange(min=0), default=4, show_default=True,
                     help="GiB of host memory for swapped-out KV blocks (with --preemption-mode swap).")(f)
    f = click.option("--preemption-mode", type=click.Choice(["recompute", "swap"]), default="recompute",
                     show_default=True, help="When KV blocks run out: recompute the newest request later, or "
                     "swap its blocks to host memory.")(f)
    f = click.option("--enable-prefix-caching/--no-enable-prefix-caching", default=True, show_default=True,
                     help="Reuse the KV blocks of prompt prefixes seen before.")(f)
    f = click.option("--enforce-eager", is_flag=True, help="CUDA: do not capture decode steps as CUDA graphs.")(f)
    f = click.option("--gpu-memory-utilization", type=click.FloatRange(0, 1, min_open=True), default=0.9,
                     show_default=True, help="CUDA: share of GPU memory for weights, activations and the KV "
                     "cache (used when --kv-cache-memory is auto).")(f)
    f = click.option("--kv-cache-memory", default="auto", show_default=True, callback=lambda c, p, v: parse_memory(v),
                     help="KV cache budget: a fraction of RAM (0.1), a size (2GiB, 512MiB), or auto "
                     "(0.1 of RAM on the CPU; measured GPU memory on CUDA).")(f)
    f = click.option("--backend", type=BACKENDS, default="auto", show_default=True,
                     help="Compute backend: cuda when CuPy finds a GPU, else cpu.")(f)
    f = click.option("--model", "-m", default=DEFAULT_MODEL, show_default=True,
                     help="Catalog name, local HF-layout directory, .gguf file, or pulled org/repo.")(f)
    f = click.option("--max-model-len", type=click.IntRange(min=2), default=None,
                     help="Context length (default: the model's).")(f)
    f = click.option("--verbose", "-v", is_flag=True,
                     help="Log engine details to stderr, and prefix-cache reuse after each answer.")(f)
    return f


def _sampling_value(ctx: click.Context, param: click.Parameter, value):
    """Check one sampling option with SamplingParams' own rules as it is parsed, before a model loads."""
    from cupaged.errors import InvalidRequestError
    from cupaged.sampling_params import SamplingParams
    try:
        SamplingParams(**{param.name: value})
    except InvalidRequestError as e:
        raise click.BadParameter(str(e)) from e
    return value


SAMPLING_NAMES = ("temperature", "top_p", "top_k", "max_tokens", "seed", "frequency_penalty", "repetition_penalty")
# Chat defaults measured on the default model: `python benchmarks/chat_defaults.py` (docs/results.md)
DEFAULTS = {"temperature": 0.2, "top_p": 0.9, "frequency_penalty": 0.3, "repetition_penalty": 1.0}


def sampling_options(f):
    """The sampling options, handed to the command as one `sampling` dict of SamplingParams fields."""
    @functools.wraps(f)
    def command(*args, **kwargs):
        sampling = {name: kwargs.pop(name) for name in SAMPLING_NAMES}
        return f(*args, sampling=sampling, **kwargs)

    option = functools.partial(click.option, show_default=True, callback=_sampling_value)
    command = click.option("--seed", type=int, default=None, callback=_sampling_value,
                           help="Sampling seed (same seed, same output).")(command)
    command = click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True,
                           help="Most tokens to generate per answer.")(command)
    command = option("--repetition-penalty", type=float, default=DEFAULTS["repetition_penalty"],
                     help="Above 1 discourages tokens already in the prompt or answer (1: off).")(command)
    command = option("--frequency-penalty", type=float, default=DEFAULTS["frequency_penalty"],
                     help="Subtracted per earlier use of a token in the answer: curbs loops (0: off).")(command)
    command = option("--top-k", type=int, default=-1, help="Keep the k likeliest tokens (-1: all).")(command)
    command = option("--top-p", type=float, default=DEFAULTS["top_p"], help="Nucleus sampling mass, in (0, 1].")(command)
    command = option("--temperature", "-t", type=float, default=DEFAULTS["temperature"],
                     help="Sampling temperature; 0 is greedy.")(command)
    return command
