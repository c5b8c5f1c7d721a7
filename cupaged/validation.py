"""Type checks at the boundary (SamplingParams, EngineConfig, prompts): bools are bools, ints are ints
(NumPy's too, never floats or bools), numbers are finite. Each error names the field and the value."""
from __future__ import annotations

import math
import numbers

import numpy as np

from cupaged.errors import InvalidRequestError


def is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def is_int(value) -> bool:
    """An int, NumPy's included, but not a bool."""
    return isinstance(value, numbers.Integral) and not is_bool(value)


def is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not is_bool(value)


def is_finite(value) -> bool:
    return is_number(value) and math.isfinite(value)


def check(name: str, value, ok: bool, what: str) -> None:
    """Raise InvalidRequestError "<name> must be <what>, got <value> (<type>)" unless ok."""
    if not ok:
        raise InvalidRequestError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")


PROMPT_KEYS = ("prompt", "prompt_token_ids", "cache_salt")
ROLES = ("system", "user", "assistant", "tool")


def check_token_ids(name: str, ids, vocab_size: int) -> list[int]:
    """A list (tuple, 1-D integer array) of ints in [0, vocab_size) -> list[int]; anything else is refused
    by name: bytes, floats, bools, strings, nested lists, out-of-vocabulary ids."""
    if isinstance(ids, np.ndarray):
        ok = ids.ndim == 1 and (ids.dtype.kind in "iu" or ids.size == 0)
        check(name, ids, ok, "a 1-D integer array of token ids")
        ids = ids.tolist()
    check(name, ids, isinstance(ids, (list, tuple)), "a list of token ids (ints)")
    for i, t in enumerate(ids):
        if not is_int(t):
            raise InvalidRequestError(f"{name}[{i}] must be a token id (an int), got {t!r} ({type(t).__name__})")
        if not 0 <= t < vocab_size:
            raise InvalidRequestError(f"{name}[{i}] = {t} is not a token id of this model: they are in [0, {vocab_size})")
    return [int(t) for t in ids]


def check_messages(messages) -> list[dict]:
    """Chat messages: a non-empty list of {"role": system | user | assistant | tool, "content": str}
    (other keys, e.g. "name", are passed to the template as they are)."""
    check("messages", messages, isinstance(messages, (list, tuple)) and len(messages) > 0,
          "a non-empty list of {'role': ..., 'content': ...} dicts")
    for i, m in enumerate(messages):
        check(f"messages[{i}]", m, isinstance(m, dict), "a dict with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in m:
                raise InvalidRequestError(f"messages[{i}] has no {key!r}: {m!r}")
        if m["role"] not in ROLES:
            raise InvalidRequestError(f"messages[{i}]['role'] must be one of {', '.join(ROLES)}, got {m['role']!r}")
        check(f"messages[{i}]['content']", m["content"], isinstance(m["content"], str), "a str")
    return list(messages)


def parse_prompt(prompt, tokenizer, vocab_size: int, max_model_len: int) -> tuple[str | None, list[int]]:
    """A prompt (str, token ids, or a dict of PROMPT_KEYS) -> (its text or None, its token ids), refused
    with an InvalidRequestError naming the problem when it is malformed, empty or leaves no room to
    generate within max_model_len."""
    if isinstance(prompt, dict):
        unknown = sorted(set(prompt) - set(PROMPT_KEYS))
        if unknown:
            raise InvalidRequestError(f"unknown prompt key(s) {unknown}: a prompt dict takes {', '.join(PROMPT_KEYS)}")
        text, ids = prompt.get("prompt"), prompt.get("prompt_token_ids")
        if ids is None and text is None:
            raise InvalidRequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
        check("prompt", text, text is None or isinstance(text, str), "a str")
        ids = tokenizer.encode(text) if ids is None else check_token_ids("prompt_token_ids", ids, vocab_size)
    elif isinstance(prompt, str):
        text, ids = prompt, tokenizer.encode(prompt) if prompt else []
    elif isinstance(prompt, (list, tuple, np.ndarray)):
        text, ids = None, check_token_ids("prompt token ids", prompt, vocab_size)
    else:
        raise InvalidRequestError(f"a prompt must be a str, a list of token ids or a dict, got "
                                  f"{type(prompt).__name__} {prompt!r:.60}")
    if not ids:
        raise InvalidRequestError("the prompt is empty")
    if len(ids) >= max_model_len:
        raise InvalidRequestError(
            f"the prompt is {len(ids)} tokens, but the context length is {max_model_len} "
            f"(the prompt must leave room for at least one generated token)")
    return text, ids


def cache_salt_of(prompt, default: str | None) -> str | None:
    """The prompt dict's own cache_salt, else default; a salt must be a non-empty string."""
    salt = prompt.get("cache_salt") if isinstance(prompt, dict) else None
    salt = default if salt is None else salt
    if salt is not None and (not isinstance(salt, str) or not salt):
        raise InvalidRequestError(f"cache_salt must be a non-empty string, got {salt!r}")
    return salt
