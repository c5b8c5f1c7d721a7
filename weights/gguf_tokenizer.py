"""Rebuild a GGUF's byte-level BPE tokenizer with the `tokenizers` library.

A GGUF with ``tokenizer.ggml.model = gpt2`` carries the vocabulary
(``tokenizer.ggml.tokens``), the merges, a type per token and the name of the
pre-tokenizer (``tokenizer.ggml.pre``). llama.cpp maps that name to a list of
regexes applied one after another, each refining the pieces left by the
previous one. We reproduce the same lists here:

- ``smollm`` (and starcoder, refact, command-r, codeshell, exaone, minerva):
  first ``\\p{N}`` alone, so every numeral of any script (``7``, ``²``, ``½``,
  ``①``, ``٣``) becomes its own piece, then the GPT-2 regex.
- ``gpt2`` (and mpt, olmo, jais, default): the GPT-2 regex only.

The GPT-2 regex is what ``pre_tokenizers.ByteLevel(use_regex=True)`` applies,
and it is equivalent to llama.cpp's hand-written GPT-2 splitter. Control
tokens (type 3) and unknown tokens (type 2) become special added tokens; user
defined tokens (type 4) become plain added tokens, matched in text as
llama.cpp does.
"""

from __future__ import annotations

import logging
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from cupaged.errors import UnsupportedModelError

log = logging.getLogger(__name__)

DIGIT_REGEX = r"\p{N}"

# tokenizer.ggml.pre -> the recipe for its pre-tokenizer (see module docstring).
PRE_TOKENIZER_RECIPES: dict[str, str] = {
    "smollm": "digits+gpt2",
    "starcoder": "digits+gpt2",
    "refact": "digits+gpt2",
    "command-r": "digits+gpt2",
    "codeshell": "digits+gpt2",
    "exaone": "digits+gpt2",
    "minerva-7b": "digits+gpt2",
    "gpt-2": "gpt2",
    "gpt2": "gpt2",
    "mpt": "gpt2",
    "olmo": "gpt2",
    "jais": "gpt2",
    "default": "gpt2",
}

# llama.cpp token types (enum llama_token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The `tokenizers` pre-tokenizer equivalent to llama.cpp's for ``pre``."""
    recipe = PRE_TOKENIZER_RECIPES.get(pre)
    if recipe is None:
        known = ", ".join(sorted(PRE_TOKENIZER_RECIPES))
        raise UnsupportedModelError(f"GGUF pre-tokenizer {pre!r} is not supported (known: {known})")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if recipe == "gpt2":
        return byte_level
    digits = pre_tokenizers.Split(Regex(DIGIT_REGEX), behavior="isolated")
    return pre_tokenizers.Sequence([digits, byte_level])


def _added_tokens(tokens: list[str], types: list[int]) -> list[AddedToken]:
    """Control, unknown and user-defined tokens, in id order."""
    added = []
    for text, kind in zip(tokens, types):
        if kind in (TOKEN_CONTROL, TOKEN_UNKNOWN):
            added.append(AddedToken(text, special=True, normalized=False))
        elif kind == TOKEN_USER_DEFINED:
            added.append(AddedToken(text, special=False, normalized=False))
    return added


def _token_name(tokens: list[str], meta: dict[str, Any], key: str) -> str | None:
    """The text of the token whose id is stored under ``tokenizer.ggml.<key>``."""
    idx = meta.get(f"tokenizer.ggml.{key}")
    if idx is None or not 0 <= int(idx) < len(tokens):
        return None
    return tokens[int(idx)]


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to llama.cpp's for this GGUF's metadata.

    ``meta`` maps GGUF keys to plain Python values (lists for arrays).
    Raises UnsupportedModelError for a non-BPE vocabulary or an unknown
    pre-tokenizer.
    """
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise UnsupportedModelError(
            f"GGUF tokenizer model {kind!r} is not supported; only byte-level BPE ('gpt2') is"
        )
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    vocab = {text: i for i, text in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre", "default"))
    tok.decoder = decoders.ByteLevel()
    added = _added_tokens(tokens, types)
    tok.add_special_tokens([t for t in added if t.special])
    tok.add_tokens([t for t in added if not t.special])
    tok.post_processor = _post_processor(tokens, meta)
    log.debug("rebuilt tokenizer: %d tokens, %d merges", len(tokens), len(merges))
    return tok


def _post_processor(tokens: list[str], meta: dict[str, Any]) -> processors.PostProcessor:
    """Prepend BOS when the GGUF asks for it; otherwise the plain byte-level one."""
    bos = _token_name(tokens, meta, "bos_token_id")
    if meta.get("tokenizer.ggml.add_bos_token") and bos is not None:
        bos_id = int(meta["tokenizer.ggml.bos_token_id"])
        return processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)]
        )
    return processors.ByteLevel(trim_offsets=False)


def tokenizer_config(meta: dict[str, Any], max_length: int) -> dict[str, Any]:
    """The HF ``tokenizer_config.json`` for this GGUF (special tokens, chat template)."""
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(max_length),
    }
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        text = _token_name(tokens, meta, key)
        if text is not None:
            config[name] = text
    template = meta.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return config
