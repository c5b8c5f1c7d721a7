"""`cupaged serve`: the OpenAI-compatible HTTP server (cupaged/server/app.py) on the default model or
any other, bound to 127.0.0.1 unless --host says otherwise."""
from __future__ import annotations

import logging

import click

from cupaged.cli.options import _fail, model_options


@click.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to bind (0.0.0.0 serves every interface: set --api-key then).")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", default=None, envvar="CUPAGED_API_KEY", show_envvar=True,
              help="Require 'Authorization: Bearer KEY' on every endpoint but /health.")
@click.option("--served-model-name", default=None, help="The model name clients send (default: --model).")
@click.option("--max-waiting-requests", type=click.IntRange(min=1), default=1024, show_default=True,
              help="Refuse new requests with 503 while this many wait for the engine.")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=4 << 20, show_default=True,
              help="Largest request body accepted.")
@click.option("--allowed-origins", default=None, help="Comma-separated CORS origins (default: no CORS).")
@click.option("--status-every", type=click.FloatRange(min=0), default=5.0, show_default=True,
              help="Seconds between status lines (running, waiting, tok/s, KV usage) while busy; 0: none.")
@click.option("--shutdown-grace", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Seconds running requests get to finish on SIGINT/SIGTERM before they are aborted.")
def serve(model, backend, max_model_len, kv_cache_memory, dtype, verbose, host, port, api_key, served_model_name,
          max_waiting_requests, max_body_bytes, allowed_origins, status_every, shutdown_grace, **engine):
    """Serve a model over the OpenAI API: /v1/chat/completions, /v1/completions (with streaming),
    /v1/models, /health, /metrics, /tokenize, /detokenize, /version."""
    import uvicorn

    from cupaged.async_llm import AsyncLLM
    from cupaged.cli.main import compile_kernels
    from cupaged.config import EngineConfig
    from cupaged.errors import CupagedError
    from cupaged.server.app import Server, build_app

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("cupaged.server").setLevel(logging.INFO)  # the status line while busy, as vLLM logs it
    options = dict(max_model_len=max_model_len, dtype=dtype, **kv_cache_memory, **engine)
    try:  # bad options are refused now; the model loads once the server is up (/health: "loading")
        EngineConfig(model=model, backend=backend, **options)
    except CupagedError as e:
        _fail(e)
    name = served_model_name or model
    server = Server(None, name, max_waiting_requests)
    origins = [o.strip() for o in allowed_origins.split(",") if o.strip()] if allowed_origins else None
    failed: list[Exception] = []
    uv: list = []

    def load() -> AsyncLLM:
        llm = AsyncLLM(model=model, backend=backend, **options)
        compile_kernels(llm.warm_up, backend=llm.engine.ops.name)  # before /health says "ok"
        click.echo(f"serving {name} on http://{host}:{port}/v1 ({llm.engine.ops.name} backend, max_model_len "
                   f"{llm.engine.max_model_len}); Ctrl-C stops", err=True)
        return llm

    def load_failed(e: Exception) -> None:
        failed.append(e)
        uv[0].should_exit = True

    app = build_app(server, api_key=api_key or None, max_body_bytes=max_body_bytes, allowed_origins=origins,
                    shutdown_grace_s=shutdown_grace, loader=load, on_load_error=load_failed,
                    status_every_s=status_every)
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        click.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    click.echo(f"loading {model} (http://{host}:{port}/health says 'loading' until it is ready)", err=True)
    config = uvicorn.Config(app, host=host, port=port, log_level="info" if verbose else "warning",
                            timeout_graceful_shutdown=int(shutdown_grace) + 5)
    run_gracefully(config, uv)
    if failed:
        _fail(failed[0])


def run_gracefully(config, holder: list) -> None:
    """uvicorn's server, except that after a graceful stop on SIGINT/SIGTERM the process exits 0
    instead of re-raising the signal (uvicorn re-raises it so that the default handler runs). The
    server object is put in holder (so a loader thread can stop it)."""
    import uvicorn

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            getattr(self, "_captured_signals", []).clear()

    holder.append(GracefulServer(config))
    holder[0].run()
