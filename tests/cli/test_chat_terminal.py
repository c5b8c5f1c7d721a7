"""`cupaged chat` in a pseudo-terminal, where keys matter: line editing and history (readline), slash
commands that never reach the model, and the kernels compiled before the prompt appears."""
from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest

from cupaged.cli import chat
from cupaged.cli.main import compile_kernels

PROMPT = ">>> "
LEFT, UP = "\x1b[D", "\x1b[A"


class Terminal:
    """A child process on a pseudo-terminal; `expect` reads its output until a pattern appears."""

    def __init__(self, args: list[str]):
        self.master, slave = pty.openpty()
        env = {**os.environ, "TERM": "xterm", "NO_COLOR": "1"}
        self.proc = subprocess.Popen(args, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
        os.close(slave)
        self.seen = ""

    def expect(self, pattern: str, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.seen):
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} in:\n{self.seen}"
            if select.select([self.master], [], [], left)[0]:
                try:
                    self.seen += os.read(self.master, 4096).decode(errors="replace")
                except OSError:  # the child closed the terminal
                    break
        return self.seen

    def send(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def close(self) -> int:
        try:
            return self.proc.wait(timeout=30)
        finally:
            if self.master is not None:
                os.close(self.master)
                self.master = None


@pytest.fixture
def terminal(smollm2_dir):
    term = Terminal([sys.executable, "-m", "cupaged.cli.main", "chat", "--model", str(smollm2_dir),
                     "--backend", "cpu", "--temperature", "0", "--max-tokens", "8"])
    yield term
    if term.proc.poll() is None:
        term.proc.kill()
    term.close()


def test_keys_edit_and_recall_lines_and_slash_commands_stay_local(terminal):
    terminal.expect(PROMPT)
    # "/hlp", two steps left, "e": readline edits the line into "/help"
    terminal.send("/hlp" + LEFT + LEFT + "e\r")
    terminal.expect("start a new conversation")
    terminal.expect(PROMPT + r".*\Z")
    helps = terminal.seen.count("start a new conversation")
    terminal.send(UP + "\r")  # recalls "/help" from this session's history
    terminal.expect("(?s)" + "start a new conversation.*" * (helps + 1))
    assert "^[[" not in terminal.seen  # the arrows were keys, not text
    terminal.send("/foo\r")
    terminal.expect("(?s)unknown command /foo.*" + PROMPT)
    # no slash command was sent to the model: no answer's token report was printed
    assert "tok/s" not in terminal.seen
    terminal.send("/exit\r")
    assert terminal.close() == 0


def test_a_plain_line_is_answered(terminal):
    terminal.expect(PROMPT)
    terminal.send("Hi\r")
    terminal.expect(r"(?s)tokens, [\d.]+ tok/s.*" + PROMPT)
    terminal.send("\x04")  # Ctrl-D leaves
    assert terminal.close() == 0


class SlowWarmUp:
    """Stands in for a warm-up: it takes `seconds`, as a Numba compile would."""

    def __init__(self, seconds: float, log: list[str]):
        self.seconds, self.log = seconds, log

    def __call__(self):
        time.sleep(self.seconds)
        self.log.append("generated")


@pytest.mark.parametrize("cached, seconds, noted", [(False, 0.0, True), (True, 0.4, True), (True, 0.0, False)])
def test_kernels_compile_before_the_prompt_with_a_note_and_the_time(monkeypatch, capsys, cached, seconds, noted):
    monkeypatch.setattr("cupaged.backend.cpu.kernels_cached", lambda: cached)
    log: list[str] = []
    compile_kernels(SlowWarmUp(seconds, log), note_after_s=0.2)
    err = capsys.readouterr().err
    assert log == ["generated"]  # the warm-up ran before compile_kernels returned (before the prompt)
    assert ("compiling the CPU kernels" in err) == noted
    if noted:
        assert err.index("compiling") < err.index("kernels ready in")
        assert float(re.search(r"ready in ([\d.]+) s", err).group(1)) >= seconds - 0.05


def test_double_slash_sends_the_text(monkeypatch):
    sent = []
    lines = iter(["//usr is a folder", "/exit"])
    monkeypatch.setattr(chat, "_read_line", lambda interactive: next(lines))
    monkeypatch.setattr(chat, "_answer", lambda llm, history, params, verbose: sent.append(history[-1]["content"]))

    class Engine:
        config = type("C", (), {"model": "m"})
        ops = type("O", (), {"name": "cpu", "dtype_name": "float32"})

    llm = type("L", (), {"engine": Engine})
    chat.run_chat(llm, None, None, False)
    assert sent == ["/usr is a folder"]
