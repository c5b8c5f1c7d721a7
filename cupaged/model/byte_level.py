"""Incremental detokenization for byte-level BPE tokenizers (GPT-2's scheme: SmolLM2, Llama 3, Qwen) in
pure Python: every token id maps to fixed bytes, so a token's text is its bytes through an incremental
UTF-8 decoder: a list lookup and one C call, cheaper than a DecodeStream step through the bindings
(`cupaged bench overhead` measures the output phase that this serves; docs/results.md).

It applies only when the tokenizer's decoder is exactly `ByteLevel`; `byte_table` returns None for any
other, and the caller uses `tokenizers`' DecodeStream instead. tests/model/test_detokenizer.py checks
the table against `Tokenizer.decode` for every id of the vocabulary and random streams against full
decodes.
"""
from __future__ import annotations

import functools


@functools.cache
def unicode_to_byte() -> dict[str, int]:
    """The inverse of byte-level BPE's byte -> printable character map: the printable Latin-1 bytes map
    to themselves, and the other 68 bytes (controls, space, 0x7F-0xA0, 0xAD) to U+0100 onwards, in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(0x100 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def token_bytes(token: str) -> bytes:
    """A byte-level token's bytes (a character outside the map, as in an added token, as its UTF-8)."""
    table = unicode_to_byte()
    out = bytearray()
    for c in token:
        b = table.get(c)
        if b is None:
            out += c.encode("utf-8")
        else:
            out.append(b)
    return bytes(out)


def byte_table(hf_tokenizer, skip_special_tokens: bool) -> list[bytes] | None:
    """bytes per token id (b"" for ids the decode drops: unknown, or special when skipped), or None if
    the tokenizer does not decode byte-level."""
    from tokenizers import decoders

    if type(hf_tokenizer.decoder) is not decoders.ByteLevel:
        return None
    vocab = hf_tokenizer.get_vocab(with_added_tokens=True)
    table = [b""] * (max(vocab.values()) + 1)
    special = {i for i, t in hf_tokenizer.get_added_tokens_decoder().items() if t.special}
    for token, i in vocab.items():
        if not (skip_special_tokens and i in special):
            table[i] = token_bytes(token)
    return table
