"""IncrementalDetokenizer on the real SmolLM2 tokenizer: deltas add up to tokenizer.decode, never
carry a half UTF-8 character, and never emit a stop string, even one spanning tokens."""
from __future__ import annotations

import pytest

from cupaged.model.tokenizer import IncrementalDetokenizer

TEXTS = [
    " Café naïve résumé, déjà vu à l'hôtel.",
    " 東京タワーは高いです。日本語のテキスト",
    " Emoji: 🙂🚀✨ and 👩‍💻 done",
    " Привет мир — ελληνικά — עברית",
    " mixed ascii, 中文, and 🎉 at the end 🎉",
]
PROMPT = "Here is some text:"


def run(tok, ids, prompt_ids, stop=None):
    """Feed ids one by one; return (deltas after each token, final delta, detokenizer)."""
    detok = IncrementalDetokenizer(tok, prompt_ids, stop)
    deltas = []
    for t in ids:
        detok.add(t)
        deltas.append(detok.delta())
        if detok.stopped:
            break
    return deltas, detok.delta(final=True), detok


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_deltas_add_up_to_decode(smol_llm, text):
    tok = smol_llm.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    deltas, last, detok = run(tok, ids, tok.encode(PROMPT))
    assert "".join(deltas) + last == tok.decode(ids) == text
    assert detok.text == text and not detok.stopped
    assert not any("\ufffd" in d for d in deltas + [last])


def test_texts_really_split_characters_across_tokens(smol_llm):
    tok = smol_llm.tokenizer
    split = [t for text in TEXTS for t in tok.encode(text, add_special_tokens=False) if "\ufffd" in tok.decode([t])]
    assert len(split) >= 10, "the texts must contain tokens that are incomplete UTF-8 pieces"


def test_an_incomplete_character_is_held_back(smol_llm):
    tok = smol_llm.tokenizer
    ids = tok.encode(" 東京", add_special_tokens=False)
    assert tok.decode(ids[:1]).endswith("\ufffd")
    detok = IncrementalDetokenizer(tok, tok.encode(PROMPT))
    detok.add(ids[0])
    assert detok.delta() == ""
    for t in ids[1:]:
        detok.add(t)
    assert detok.delta() == " 東京"


def test_empty_prompt_context(smol_llm):
    tok = smol_llm.tokenizer
    ids = tok.encode(TEXTS[2], add_special_tokens=False)
    deltas, last, _ = run(tok, ids, [])
    assert "".join(deltas) + last == TEXTS[2]


def token_spans(tok, ids):
    """(start, end) character span of each token's text in decode(ids)."""
    ends = [len(tok.decode(ids[:k + 1])) for k in range(len(ids))]
    return list(zip([0] + ends[:-1], ends))


@pytest.mark.parametrize("text", [" The quick brown fox jumps over the lazy dog", TEXTS[0], TEXTS[1]],
                         ids=["ascii", "accents", "cjk"])
def test_stop_spanning_tokens_is_never_emitted(smol_llm, text):
    tok = smol_llm.tokenizer
    ids = tok.encode(text, add_special_tokens=False)
    spans = token_spans(tok, ids)
    # A stop string made of the last character of one token and the first of the next, with both
    # tokens complete text (not UTF-8 fragments), somewhere in the middle.
    k = next(k for k in range(len(ids) // 2, len(ids))
             if spans[k - 1][1] - spans[k - 1][0] >= 1 and spans[k][1] - spans[k][0] >= 1
             and "\ufffd" not in tok.decode(ids[:k]) and text[spans[k][0] - 1:spans[k][0] + 1].strip()
             and text.find(text[spans[k][0] - 1:spans[k][0] + 1]) == spans[k][0] - 1)
    cut = spans[k][0] - 1
    stop = text[cut:cut + 2]
    deltas, last, detok = run(tok, ids, tok.encode(PROMPT), stop=["zzz-unused", stop])
    emitted = "".join(deltas) + last
    assert detok.stopped and emitted == detok.text == text[:cut], f"stop {stop!r}"
    assert len(deltas) == k + 1, "the detokenizer stops at the token that completes the stop string"
    assert not any(stop in d or "\ufffd" in d for d in deltas)
    for i in range(len(deltas)):  # nothing past the cut is ever handed out, at any step
        assert text[:cut].startswith("".join(deltas[:i + 1]))


def test_held_back_tail_is_released_at_the_end(smol_llm):
    tok = smol_llm.tokenizer
    text = " The quick brown fox jumps over the lazy dog"
    ids = tok.encode(text, add_special_tokens=False)
    deltas, last, detok = run(tok, ids, tok.encode(PROMPT), stop=[" dogs!"])
    assert "".join(deltas) == text[:-len(" dog")], "a tail that may start the stop string waits"
    assert last == " dog" and not detok.stopped
    assert "".join(deltas) + last == text


def test_stop_at_the_very_start(smol_llm):
    tok = smol_llm.tokenizer
    ids = tok.encode(" Hello world", add_special_tokens=False)
    deltas, last, detok = run(tok, ids, tok.encode(PROMPT), stop=["Hel"])
    assert detok.stopped and "".join(deltas) + last == " "
