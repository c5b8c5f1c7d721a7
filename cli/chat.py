"""The interactive loop behind `cupaged chat`."""
from __future__ import annotations

import sys
import time

import click

from cupaged.errors import InvalidRequestError

HELP = "/help lists the commands, /reset starts over, /exit or Ctrl-D leaves, Ctrl-C stops an answer."
COMMANDS = {
    "/help": "list these commands",
    "/reset": "start a new conversation (the system prompt stays)",
    "/exit": "leave (also /quit or Ctrl-D)",
}
COMMAND_HELP = "\n".join([f"  {name:8s} {what}" for name, what in COMMANDS.items()] + [
    "  //text   send a message that starts with '/' (the first '/' is dropped)",
    "  Ctrl-C stops an answer and keeps the chat open; the arrow keys edit the line and recall earlier ones"])


def run_chat(llm, params, system: str | None, verbose: bool) -> None:
    """Multi-turn chat: stream each answer, keep the history, report tokens/s."""
    interactive = sys.stdin.isatty()
    if interactive:
        _enable_line_editing()
    engine = llm.engine
    click.echo(f"cupaged chat: {llm.engine.config.model} on {engine.ops.name} ({engine.ops.dtype_name}). {HELP}", err=True)
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    while True:
        line = _read_line(interactive)
        if line is None:
            break
        line = line.strip()
        if not line:
            continue
        if line.startswith("/") and not line.startswith("//"):
            command = line.split()[0].lower()
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                history = history[:1] if system else []
                click.echo("(conversation reset)", err=True)
            elif command == "/help":
                click.echo(COMMAND_HELP, err=True)
            else:
                click.echo(f"unknown command {command} (/help lists them; //text sends text that starts with '/')",
                           err=True)
            continue
        history.append({"role": "user", "content": line[1:] if line.startswith("//") else line})
        answer = _answer(llm, history, params, verbose)
        if answer is None:
            history.pop()
        else:
            history.append({"role": "assistant", "content": answer})


def _read_line(interactive: bool) -> str | None:
    while True:
        try:
            if interactive:  # \001 and \002 tell readline the colour codes take no columns
                return input("\001" + click.style(">>> ", fg="green", bold=True).replace(">>> ", "\002>>> \001")
                             + "\002")
            line = sys.stdin.readline()
            return line if line else None
        except EOFError:
            return None
        except KeyboardInterrupt:
            click.echo("\n(" + HELP + ")", err=True)


def _enable_line_editing() -> None:
    """Importing readline gives input() line editing (arrow keys, Ctrl-A/E) and a history of this
    session's lines (up/down); where Python was built without it, lines are read plain."""
    try:
        import readline  # noqa: F401
    except ImportError:
        pass


def _answer(llm, history: list[dict], params, verbose: bool) -> str | None:
    """Stream one answer; returns its text (partial if interrupted), or None if refused."""
    try:
        prompt = _fit_prompt(llm, history)
    except InvalidRequestError as e:
        click.echo(f"error: {e}", err=True)
        return None
    start, first, n_tokens, text = time.perf_counter(), None, 0, ""
    cache_before = llm.engine.prefix_cache_stats() if verbose else None
    stream = llm.stream_outputs(prompt, params)
    try:
        for out in stream:
            first = first or time.perf_counter()
            n_tokens = len(out.outputs[0].token_ids)
            text = out.outputs[0].text
            click.echo(out.outputs[0].delta, nl=False)
    except KeyboardInterrupt:
        stream.close()  # aborts the request and frees its blocks
        click.echo(" [stopped]", nl=False)
    click.echo()
    _report(start, first, n_tokens, llm, verbose)
    if verbose:
        click.echo(click.style(prefix_cache_line(llm, cache_before), dim=True), err=True)
    return text


def _fit_prompt(llm, history: list[dict]) -> dict:
    """The templated prompt; drops the oldest turns when the conversation outgrows the context."""
    limit = llm.engine.max_model_len - 1
    while True:
        prompt = llm.chat_prompt(history)
        if len(prompt["prompt_token_ids"]) < limit:
            return prompt
        keep = 1 if history[0]["role"] == "system" else 0
        if len(history) - keep <= 1:
            raise InvalidRequestError(
                f"the message is {len(prompt['prompt_token_ids'])} tokens, over the context length {limit + 1}")
        del history[keep:keep + 2]
        click.echo("(context full: dropped the oldest turn)", err=True)


def prefix_cache_line(llm, before) -> str:
    """'prefix cache: 812/1024 prompt tokens reused (79%)' since the `before` snapshot."""
    if not llm.engine.config.enable_prefix_caching:
        return "prefix cache: off"
    delta = llm.engine.prefix_cache_stats() - before
    return f"prefix cache: {delta.hits}/{delta.queries} prompt tokens reused ({delta.hit_rate:.0%})"


def _report(start: float, first: float | None, n_tokens: int, llm, verbose: bool) -> None:
    end = time.perf_counter()
    if first is None or n_tokens == 0:
        return
    rate = (n_tokens - 1) / (end - first) if n_tokens > 1 and end > first else 0.0
    msg = f"[{n_tokens} tokens, {rate:.1f} tok/s, first token {1000 * (first - start):.0f} ms]"
    if verbose:
        msg += f" [KV blocks free {llm.engine.block_manager.num_free_blocks}/{llm.engine.block_manager.num_blocks}]"
    click.echo(click.style(msg, dim=True), err=True)
