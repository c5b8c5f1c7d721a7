"""Tokenizer (HF `tokenizers`), chat templates (jinja2), and incremental detokenization.

`IncrementalDetokenizer` turns a growing list of token ids into text deltas:
- a multi-byte UTF-8 character split across tokens is held back until it is complete
  (the incremental UTF-8 decode, or `tokenizers`' DecodeStream, yields nothing until it is);
- a tail of text that could still become a stop string is held back too, so stop strings
  are never emitted, even when they span tokens.
"""
from __future__ import annotations

import codecs
import copy
import json
from datetime import datetime
from pathlib import Path

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.decoders import DecodeStream

from cupaged.errors import WeightsError
from cupaged.model.byte_level import byte_table


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise WeightsError(f"{model_dir}: no tokenizer.json")
        try:
            self._tok = self.hf = HFTokenizer.from_file(str(path))
        except Exception as e:  # the bindings raise a bare Exception with serde's message
            raise WeightsError(f"{path}: not a tokenizer the tokenizers library can read: {e}") from e
        self.config = _read_json(model_dir / "tokenizer_config.json")
        self.chat_template = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # [{"name": "default", "template": ...}, ...]
            self.chat_template = next((t["template"] for t in self.chat_template if t.get("name") == "default"), None)
        jinja_file = model_dir / "chat_template.jinja"
        if self.chat_template is None and jinja_file.is_file():
            self.chat_template = jinja_file.read_text()
        self.eos_token_ids = self._special_ids(model_dir)
        self.vocab_size = self._tok.get_vocab_size()
        self._byte_tables: dict[bool, list[bytes] | None] = {}
        self._text_tables: dict[bool, list[str | None] | None] = {}

    def _special_ids(self, model_dir: Path) -> set[int]:
        ids = set()
        for source in (self.config.get("eos_token"),):
            token = source.get("content") if isinstance(source, dict) else source
            if token and self._tok.token_to_id(token) is not None:
                ids.add(self._tok.token_to_id(token))
        gen = _read_json(model_dir / "generation_config.json").get("eos_token_id")
        gen = [] if gen is None else [gen] if isinstance(gen, int) else gen
        if not (isinstance(gen, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in gen)):
            raise WeightsError(f"{model_dir / 'generation_config.json'}: eos_token_id must be a token id or a "
                               f"list of them, got {gen!r}")
        ids.update(gen)
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def byte_table(self, skip_special_tokens: bool) -> list[bytes] | None:
        """Bytes per token id for a byte-level tokenizer (model/byte_level.py), else None; made once."""
        key = bool(skip_special_tokens)
        if key not in self._byte_tables:
            self._byte_tables[key] = byte_table(self.hf, key)
        return self._byte_tables[key]

    def text_table(self, skip_special_tokens: bool) -> list[str | None] | None:
        """For a byte-level tokenizer, each token id's text where its bytes are whole UTF-8 characters
        (None where they are not: part of a character), else None; made once."""
        key = bool(skip_special_tokens)
        if key not in self._text_tables:
            table = self.byte_table(key)
            self._text_tables[key] = None if table is None else [_whole_utf8(data) for data in table]
        return self._text_tables[key]

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render the model's own chat template (as transformers does) to a prompt string."""
        if not self.chat_template:
            raise WeightsError("this model has no chat template; use generate() with a plain prompt")
        return _compile(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            bos_token=_token_str(self.config.get("bos_token")), eos_token=_token_str(self.config.get("eos_token")),
        )


def _whole_utf8(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _token_str(token) -> str:
    return (token.get("content") if isinstance(token, dict) else token) or ""


def _read_json(path: Path) -> dict:
    """A JSON object from path ({} if there is no such file); anything else is a WeightsError naming it."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightsError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise WeightsError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent, ensure_ascii=False)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


class IncrementalDetokenizer:
    """Text deltas for one sequence, with stop strings held back and cut off.

    Each token costs O(1): for a byte-level tokenizer, its bytes (model/byte_level.py) through an
    incremental UTF-8 decoder; for any other, one step of `tokenizers`' DecodeStream (primed with the
    prompt's last tokens, their text dropped, so a first output token's leading space survives where a
    decoder strips it at the start of a text). Never a decode of the text so far.
    """

    CONTEXT = 6  # tokens of context a DecodeStream fork or the prompt primes a stream with

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], stop: list[str] | None = None,
                 skip_special_tokens: bool = True):
        self.tok, self.stop, self.skip = tokenizer, stop or [], skip_special_tokens
        self.max_stop = max((len(s) for s in self.stop), default=0)
        self._firsts = frozenset(s[0] for s in self.stop)   # a held-back tail starts with one of these
        self._lasts = frozenset(s[-1] for s in self.stop)   # a stop string completed now ends with one
        self._bytes = tokenizer.byte_table(skip_special_tokens)
        self._texts = tokenizer.text_table(skip_special_tokens)  # a token's text when nothing is pending
        if self._bytes is not None:
            self._pending = b""  # the start of a character whose last bytes have not come yet
        else:
            self.ids = list(prompt_ids[-self.CONTEXT:])  # the last tokens seen (a fork's context)
            self._stream = self._primed(self.ids)
        self.text = ""        # output text so far (stop string excluded once found)
        self.emitted = 0      # characters of self.text already handed out
        self.stopped = False

    def _primed(self, ids: list[int]) -> DecodeStream:
        stream = DecodeStream(skip_special_tokens=self.skip)
        for token_id in ids:
            stream.step(self.tok.hf, token_id)
        return stream

    def add(self, token_id: int) -> None:
        """Take one new token; updates self.text and self.stopped."""
        if self._bytes is not None:
            chunk = None
            if not self._pending:  # the common case: a token of whole characters, its text from a table
                try:
                    chunk = self._texts[token_id]
                except IndexError:  # an id past the tokenizer's vocabulary (a padded embedding): no text
                    chunk = ""
            if chunk is None:
                chunk = self._decode_bytes(token_id)
        else:
            self.ids.append(token_id)
            if len(self.ids) > 4 * self.CONTEXT:
                del self.ids[:-self.CONTEXT]
            chunk = self._stream.step(self.tok.hf, token_id)
        if not chunk:
            return  # an incomplete UTF-8 character, or nothing visible yet
        if self.stop and not self._lasts.isdisjoint(chunk):
            start = len(self.text) - self.max_stop
            self.text += chunk
            self._cut_at_stop(max(0, start))
        else:
            self.text += chunk

    def _decode_bytes(self, token_id: int) -> str:
        """A token's bytes after any pending ones, through an incremental UTF-8 decode."""
        try:
            data = self._bytes[token_id]
        except IndexError:
            data = b""
        if self._pending:
            data = self._pending + data
        chunk, used = codecs.utf_8_decode(data, "replace", False)
        self._pending = data[used:] if used < len(data) else b""
        return chunk

    def fork(self) -> IncrementalDetokenizer:
        """A copy that goes on decoding on its own (a beam's continuation)."""
        clone = copy.copy(self)
        if self._bytes is None:
            clone.ids = self.ids[-self.CONTEXT:]
            clone._stream = self._primed(clone.ids)
        return clone

    def _cut_at_stop(self, start: int) -> None:
        cut = -1
        for stop in self.stop:
            at = self.text.find(stop, start)
            if at >= 0 and (cut < 0 or at < cut):
                cut = at
        if cut >= 0:
            self.text = self.text[:cut]
            self.stopped = True

    def delta(self, final: bool = False) -> str:
        """Text not handed out yet; a tail that may start a stop string waits unless final."""
        text, emitted = self.text, self.emitted
        if emitted == len(text):
            return ""
        end = len(text)
        if self.stop and not (final or self.stopped or self._firsts.isdisjoint(text[-self.max_stop:])):
            end -= self._held_back()  # the tail may start a stop string
        if end <= emitted:
            return ""
        self.emitted = end
        return text[emitted:end]

    def _held_back(self) -> int:
        """Characters at the end of the text that could still begin a stop string: the longest tail
        that some stop string starts with (only tails starting with a stop string's first character
        are tried, so this is a few `find`s per stop string)."""
        text, longest = self.text, 0
        for stop in self.stop:
            at = text.find(stop[0], max(0, len(text) - len(stop)))
            while at != -1 and len(text) - at > longest:
                if stop.startswith(text[at:]):
                    longest = len(text) - at
                    break
                at = text.find(stop[0], at + 1)
        return longest
