"""The `cupaged` command line (click)."""
from __future__ import annotations

import json

import click

from cupaged.cli.options import CleanErrors, _fail, _setup_logging, model_options, sampling_options
from cupaged.weights.catalog import DEFAULT_MODEL


def make_llm(model: str, backend: str, max_model_len: int | None, kv_cache_memory: dict, dtype: str = "auto",
             **kwargs):
    from cupaged.errors import CupagedError
    from cupaged.llm import LLM
    try:
        llm = LLM(model=model, backend=backend, max_model_len=max_model_len, dtype=dtype, **kv_cache_memory,
                  **kwargs)
    except CupagedError as e:
        _fail(e)
    if llm.engine.ops.name == "cpu":
        from cupaged.engine.warm_up import warm_up
        compile_kernels(lambda: warm_up(llm.engine))
    return llm


def compile_kernels(run, note_after_s: float = 1.0, backend: str = "cpu") -> None:
    """Call run (a warm-up: one tiny request) now, so that the kernels are compiled (first run) or
    loaded before the prompt appears or the server says it is ready, rather than inside the first
    answer. Says so up front when the CPU kernel cache is cold, or once it has taken note_after_s (a
    dtype whose kernels were never compiled, a GPU's NVRTC compile), and then how long it took."""
    import threading
    import time

    from cupaged.backend.cpu import kernels_cached
    start = time.perf_counter()
    shown = threading.Event()

    def note() -> None:
        shown.set()
        click.echo(f"compiling the {backend.upper()} kernels for this machine (first run only; later runs load "
                   "them)...", err=True)

    timer = threading.Timer(0 if backend == "cpu" and not kernels_cached() else note_after_s, note)
    timer.start()
    try:
        run()
    finally:
        timer.cancel()
        timer.join()
    if shown.is_set():
        click.echo(f"kernels ready in {time.perf_counter() - start:.1f} s", err=True)


def make_params(**fields):
    from cupaged.errors import InvalidRequestError
    from cupaged.sampling_params import SamplingParams
    try:
        return SamplingParams(**fields)
    except InvalidRequestError as e:
        _fail(e)


@click.group(cls=CleanErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cupaged")
def main() -> None:
    """cupaged: chat with, serve (OpenAI-compatible HTTP) and benchmark LLMs on a paged KV cache, on a GPU
    (CuPy) or the CPU (NumPy/Numba)."""


@main.command()
@model_options
@sampling_options
@click.option("--system", "-s", default=None, help="System prompt for the conversation.")
def chat(model, backend, max_model_len, kv_cache_memory, dtype, verbose, sampling, system, **engine):
    """Chat with a model, streaming its answers.

    Type a message and press Enter; the arrow keys edit the line and recall earlier ones. /help lists
    the commands, /reset starts a new conversation, /exit (or Ctrl-D) leaves, //text sends text that
    starts with '/'. Ctrl-C stops the current answer and keeps the chat open. Input can also be piped:
    each line is one user turn.
    """
    from cupaged.cli.chat import run_chat  # imported here to keep `--help` fast
    _setup_logging(verbose)
    llm = make_llm(model, backend, max_model_len, kv_cache_memory, dtype, **engine)
    params = make_params(**sampling)
    run_chat(llm, params, system, verbose)


@main.command()
@click.argument("prompt")
@model_options
@sampling_options
@click.option("--chat/--no-chat", "use_chat", default=False, show_default=True,
              help="Wrap the prompt in the model's chat template (off: the prompt is plain text).")
@click.option("--stop", multiple=True, help="Stop string (repeatable); it is not included in the output.")
@click.option("--n", "n", type=click.IntRange(min=1), default=1, show_default=True, help="Number of completions.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def generate(prompt, model, backend, max_model_len, kv_cache_memory, dtype, verbose, sampling, use_chat, stop, n,
             as_json, **engine):
    """Generate a completion for PROMPT once and print it (PROMPT "-" reads it from stdin). With
    --n above 1 each completion is printed under a "--- completion i ---" header."""
    if prompt == "-":
        prompt = click.get_text_stream("stdin").read()
    if not prompt.strip():
        raise click.BadParameter("the prompt is empty", param_hint="PROMPT")
    _setup_logging(verbose)
    llm = make_llm(model, backend, max_model_len, kv_cache_memory, dtype, **engine)
    params = make_params(**sampling, stop=list(stop), n=n)
    from cupaged.cli.chat import prefix_cache_line
    from cupaged.errors import CupagedError
    cache_before = llm.engine.prefix_cache_stats()
    try:
        request = llm.chat_prompt([{"role": "user", "content": prompt}]) if use_chat else prompt
        out = llm.generate(request, params)[0]
    except CupagedError as e:
        _fail(e)
    if verbose:
        click.echo(prefix_cache_line(llm, cache_before), err=True)
    if as_json:
        click.echo(json.dumps({"prompt": prompt, "prompt_token_ids": out.prompt_token_ids, "outputs": [
            {"index": o.index, "text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason}
            for o in out.outputs]}, ensure_ascii=False))
    elif len(out.outputs) == 1:
        click.echo(out.outputs[0].text)
    else:
        for o in out.outputs:
            click.echo(f"--- completion {o.index + 1} of {len(out.outputs)} ({o.finish_reason}) ---")
            click.echo(o.text)


@main.command()
@click.argument("name", default=DEFAULT_MODEL)
def pull(name):
    """Fetch and convert a model: a catalog NAME, or an org/repo from the Hugging Face Hub (needs internet)."""
    from cupaged.errors import CupagedError
    from cupaged.weights.store import pull as pull_model
    _setup_logging(False)
    try:
        click.echo(pull_model(name, progress=True))
    except CupagedError as e:
        _fail(e)


@main.command()
def models():
    """List the models in the cache, and the catalog's names."""
    from cupaged.weights.catalog import catalog_names
    from cupaged.weights.store import cupaged_home, list_models
    rows = list_models()
    click.echo(f"cache: {cupaged_home()}")
    for row in rows:
        click.echo(f"  {row['name']:40s} {row['size'] / 2**20:8.1f} MiB  {row['path']}")
    if not rows:
        click.echo("  (empty)")
    click.echo("catalog: " + ", ".join(catalog_names()))


@main.command()
def env():
    """Show versions, whether CuPy and a GPU are usable, and what the CPU backend will use."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from cupaged.backend import cuda_available
    from cupaged.weights.store import cupaged_home
    click.echo(f"cupaged      {version('cupaged')}")
    click.echo(f"python       {platform.python_version()} ({platform.machine()})")
    for pkg in ("numpy", "numba", "safetensors", "tokenizers", "gguf"):
        try:
            click.echo(f"{pkg:12s} {version(pkg)}")
        except PackageNotFoundError:
            click.echo(f"{pkg:12s} not installed")
    cupy = [f"{pkg} {version(pkg)}" for pkg in ("cupy-cuda13x", "cupy-cuda12x", "cupy") if _installed(pkg)]
    no_cupy = "not installed (pip install \"cupaged[cuda]\" for the GPU backend)"
    click.echo(f"cupy         {', '.join(cupy) if cupy else no_cupy}")
    gpu = cuda_available()
    click.echo(f"gpu          {_gpu_name() if gpu else 'none found'}")
    click.echo(f"backend      {'cuda' if gpu else 'cpu'} (auto)")
    for name, value in _cpu_lines():
        click.echo(f"{name:12s} {value}")
    click.echo(f"cache        {cupaged_home()}")


def _installed(pkg: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return bool(version(pkg))
    except PackageNotFoundError:
        return False


def _cpu_lines() -> list[tuple[str, str]]:
    """What the CPU backend runs on: the CPU and its vector features, Numba's threads, the GEMM mode."""
    import os

    import numba
    from llvmlite import binding as llvm

    from cupaged.backend import cpu_math  # noqa: F401  (chooses Numba's threading layer, as a run would)
    from cupaged.backend.cpu_gemm import PANEL_ROWS
    from cupaged.cli.bench import machine_name
    features = llvm.get_host_cpu_features()
    wanted = ("avx2", "fma", "avx512f", "avx512bf16", "avx512vnni", "avxvnni")
    have = [f for f in wanted if features.get(f)]
    layer = numba.config.THREADING_LAYER
    if layer == "default":
        layer = "first found of " + ", ".join(numba.config.THREADING_LAYER_PRIORITY)
    gemm = os.environ.get("CUPAGED_CPU_GEMM") or "numba"
    tiles = f"panels of {PANEL_ROWS} weight rows, {'AVX-512' if PANEL_ROWS == 4 else 'AVX2'} tiles"
    return [("cpu", machine_name()), ("cpu features", ", ".join(have) or "none of " + ", ".join(wanted)),
            ("threads", f"{numba.config.NUMBA_NUM_THREADS} Numba threads (NUMBA_NUM_THREADS), layer: {layer}"),
            ("cpu gemm", f"{gemm} (CUPAGED_CPU_GEMM; " + (tiles if gemm == "numba" else "NumPy's BLAS") +
             "); weights float32, bfloat16 or q8_0 by --dtype")]


def _gpu_name() -> str:
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(0)
    return props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])


@main.command("clear-cache")
@click.argument("name", required=False)
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def clear_cache(name, yes):
    """Delete converted models from the cache (all of them, or NAME)."""
    from cupaged.weights.store import clear_cache as clear
    if not yes and not click.confirm(f"Delete {'model ' + name if name else 'every cached model'}?"):
        click.echo("nothing deleted")
        return
    removed = clear(name)
    if name is not None and not removed:
        raise click.ClickException(f"no cached model {name!r} (`cupaged models` lists what is cached)")
    if not removed:
        click.echo("the cache holds no models; nothing to delete")
        return
    click.echo(f"removed {len(removed)} cached model(s): {', '.join(p.name for p in removed)}")


from cupaged.cli.bench import bench  # noqa: E402  (registers `cupaged bench`)
from cupaged.cli.serve import serve  # noqa: E402

main.add_command(bench)
main.add_command(serve)

if __name__ == "__main__":
    main()
