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
