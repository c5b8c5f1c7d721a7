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
    first = detok.delta()  # the space may come out at once; the half of 東 may not
    assert first in ("", " ")
    for t in ids[1:]:
        detok.add(t)
    assert first + detok.delta() == " 東京"


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


# --- random streams (hypothesis) ---------------------------------------------------------------------
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# ASCII, spaces and newlines, accented Latin, Greek/Cyrillic, CJK, emoji (4-byte UTF-8, often split).
ALPHABET = st.sampled_from(list("abcXYZ019 ,.!?\n\t") + list("éàüßøñ") + list("ελПж") + list("東京日本語")
                           + list("🙂🚀✨🎉👩"))


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from cupaged.model.tokenizer import Tokenizer
    return Tokenizer(smollm2_dir)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(ALPHABET, min_size=0, max_size=12), text=st.text(ALPHABET, min_size=1, max_size=40),
       fork_at=st.integers(0, 60))
def test_random_streams_give_the_full_decode(tokenizer, prompt, text, fork_at):
    """Deltas add up to a full decode of the output ids for random multi-byte text, and a fork taken
    at any token (as beam search takes them) goes on to give the same text as the original."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(tokenizer, tokenizer.encode(prompt, add_special_tokens=False))
    out, fork = [], None
    for i, t in enumerate(ids):
        if i == fork_at:
            fork = detok.fork()
        detok.add(t)
        if fork is not None:
            fork.add(t)
        out.append(detok.delta())
        assert "\ufffd" not in out[-1]
    out.append(detok.delta(final=True))
    assert "".join(out) == detok.text == tokenizer.decode(ids)
    if fork is not None:
        assert fork.text == detok.text


@settings(max_examples=1000, deadline=None)
@given(text=st.text("ab#<>", max_size=12), stops=st.lists(st.text("ab#<>", min_size=1, max_size=5), min_size=1,
                                                          max_size=3))
def test_held_back_tail_is_the_longest_prefix_of_a_stop_string(text, stops):
    """Against the naive rule: the largest n with text[-n:] a prefix of some stop string."""
    detok = object.__new__(IncrementalDetokenizer)
    detok.text, detok.stop, detok.max_stop = text, stops, max(map(len, stops))
    detok._firsts = frozenset(s[0] for s in stops)
    naive = next((n for n in range(min(detok.max_stop, len(text)), 0, -1)
                  if any(s.startswith(text[-n:]) for s in stops)), 0)
    assert detok._held_back() == naive


def test_byte_table_matches_decode_for_every_token(tokenizer):
    """Each id's bytes, where they are valid UTF-8 alone, decode to what tokenizers' decode gives."""
    for skip in (True, False):
        table = tokenizer.byte_table(skip)
        assert table is not None and len(table) >= tokenizer.vocab_size
        for i in range(tokenizer.vocab_size):
            try:
                text = table[i].decode("utf-8")
            except UnicodeDecodeError:
                continue  # a piece of a multi-byte character: the random-stream tests cover those
            assert text == tokenizer.decode([i], skip_special_tokens=skip), i


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 49151), min_size=1, max_size=30), skip=st.booleans())
def test_random_token_ids_give_the_full_decode(tokenizer, ids, skip):
    """Any ids, also byte pieces that never form a character: the text matches a full decode up to a
    trailing incomplete character, which is held back (the full decode shows it as U+FFFD)."""
    detok = IncrementalDetokenizer(tokenizer, [], skip_special_tokens=skip)
    for t in ids:
        detok.add(t)
    full = tokenizer.decode(ids, skip_special_tokens=skip)
    assert full.startswith(detok.text) and set(full[len(detok.text):]) <= {"\ufffd"}


def test_a_decoder_that_is_not_byte_level_uses_decode_stream(tokenizer, monkeypatch):
    monkeypatch.setattr(tokenizer, "byte_table", lambda skip: None)
    ids = tokenizer.encode(TEXTS[2], add_special_tokens=False)
    deltas, last, detok = run(tokenizer, ids, tokenizer.encode(PROMPT))
    assert "".join(deltas) + last == TEXTS[2] and detok._bytes is None
    fork = detok.fork()
    fork.add(ids[0])
    assert fork.text == TEXTS[2] + tokenizer.decode(ids[:1])


def test_text_table_is_each_tokens_decode_where_it_is_whole_characters(smol_llm):
    """The detokenizer's table of whole-character texts, against the tokenizer's own decode of every id."""
    tok = smol_llm.tokenizer
    texts, raw = tok.text_table(True), tok.byte_table(True)
    assert len(texts) == len(raw)
    split = 0
    for token_id, text in enumerate(texts):
        if text is None:  # part of a character: its bytes alone are not UTF-8
            split += 1
            with pytest.raises(UnicodeDecodeError):
                raw[token_id].decode("utf-8")
        else:
            assert text == tok.decode([token_id]), token_id
    assert 0 < split < len(texts) // 10
