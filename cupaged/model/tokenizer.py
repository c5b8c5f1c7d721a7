"""Tokenizer (HF `tokenizers`), chat templates (jinja2), and incremental detokenization.

`IncrementalDetokenizer` turns a growing list of token ids into text deltas:
- a multi-byte UTF-8 character split across tokens is held back until it is complete
  (a decode that ends in U+FFFD is not emitted yet);
- a tail of text that could still become a stop string is held back too, so stop strings
  are never emitted, even when they span tokens.
"""
from __future__ import annotations

import copy
import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from cupaged.errors import WeightsError


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise WeightsError(f"{model_dir}: no tokenizer.json")
        self._tok = HFTokenizer.from_file(str(path))
        self.config = _read_json(model_dir / "tokenizer_config.json")
        self.chat_template = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)
        jinja_file = model_dir / "chat_template.jinja"
        if self.chat_template is None and jinja_file.is_file():
            self.chat_template = jinja_file.read_text()
        self.eos_token_ids = self._special_ids(model_dir)
        self.vocab_size = self._tok.get_vocab_size()

    def _special_ids(self, model_dir: Path) -> set[int]:
        ids = set()
        for source in (self.config.get("eos_token"),):
            token = source.get("content") if isinstance(source, dict) else source
            if token and self._tok.token_to_id(token) is not None:
                ids.add(self._tok.token_to_id(token))
        gen = _read_json(model_dir / "generation_config.json").get("eos_token_id")
        ids.update([gen] if isinstance(gen, int) else (gen or []))
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_str(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the model's own chat template (as transformers does) to a prompt string."""
        if not self.chat_template:
            raise WeightsError("this model has no chat template; use generate() with a plain prompt")
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=_token_str(self.config.get("bos_token")), eos_token=_token_str(self.config.get("eos_token")),
        )


def _token_str(token) -> str:
    return (token.get("content") if isinstance(token, dict) else token) or ""


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class IncrementalDetokenizer:
    """Text deltas for one sequence, with stop strings held back and cut off."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str] | None = None,
                 skip_special_tokens: bool = True):
        self.tok, self.stop, self.skip = tokenizer, stop or [], skip_special_tokens
        # Decode from a few prompt tokens back, so a leading space of the first output token survives.
        self.ids = list(prompt_ids[-5:])
        self.prefix_offset, self.read_offset = 0, len(self.ids)
        self.text = ""        # output text so far (stop string excluded once found)
        self.emitted = 0      # characters of self.text already handed out
        self.stopped = False

    def add(self, token_id: int) -> None:
        """Take one new token; updates self.text and self.stopped."""
        self.ids.append(token_id)
        prefix = self.tok.decode(self.ids[self.prefix_offset:self.read_offset], self.skip)
        full = self.tok.decode(self.ids[self.prefix_offset:], self.skip)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return  # an incomplete UTF-8 character, or nothing visible yet
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0))
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._cut_at_stop(start)

    def fork(self) -> IncrementalDetokenizer:
        """A copy that goes on decoding on its own (a beam's continuation)."""
        clone = copy.copy(self)
        clone.ids = list(self.ids)
        return clone

    def _cut_at_stop(self, start: int) -> None:
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def delta(self, final: bool = False) -> str:
        """Text not handed out yet; a tail that may start a stop string waits unless final."""
        end = len(self.text) if final or self.stopped else len(self.text) - self._held_back()
        out = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return out

    def _held_back(self) -> int:
        for n in range(min(max((len(s) for s in self.stop), default=0), len(self.text)), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stop):
                return n
        return 0
