"""The tokenizer rebuilt from the default model's GGUF: llama.cpp parity, digits, round trips, chat template."""

from __future__ import annotations

import json

import jinja2
import pytest
from tokenizers import Tokenizer

# Token ids produced by llama.cpp itself (llama-cpp-python 0.3.36, vocab_only, special=True,
# add_bos=False) on SmolLM2-135M-Instruct.Q4_1.gguf. transformers' GGUF loader gets the
# non-ASCII numeral cases wrong; llama.cpp splits every \p{N} code point on its own.
LLAMA_CPP_IDS = {
    "Hello world": [19556, 905],
    "12³ ½ ①٣": [33, 34, 39050, 216, 16738, 216, 173, 235, 250, 164, 113],
    "2024-11-25 12:30:45": [34, 32, 34, 36, 29, 33, 33, 29, 34, 37, 216, 33, 34, 42, 35, 32, 42, 36, 37],
    "x² + y² = z²": [104, 19133, 1232, 329, 19133, 446, 1892, 19133],
    "٠١٢٣ ۰۱۲": [164, 250, 164, 111, 164, 112, 164, 113, 216, 166, 125, 166, 126, 166, 127],
    "Ⅻ ⅷ ↉ ⁵ ₇ ¾ ⑳ 〇 〡": [173, 223, 121, 216, 173, 223, 132, 216, 23227, 227, 216, 32571, 130, 216, 25699, 225,
                         216, 43124, 216, 173, 235, 128, 216, 12109, 225, 216, 12109, 111],
    "I'm don't we'll they've she'd it's I'M DON'T": [57, 5248, 1326, 982, 392, 3060, 502, 3543, 1041, 6737, 357,
                                                     506, 339, 23, 61, 422, 2154, 23, 68],
    "   leading spaces": [256, 2899, 5600],
    "trailing   ": [4861, 4966, 333],
    "a\n\nb\r\n c\t\td": [81, 198, 198, 82, 2738, 265, 197, 197, 84],
    "naïve café résumé": [3546, 46494, 37366, 412, 2756, 5422, 2756],
    "日本語のテキスト 123": [23274, 115, 40993, 179, 120, 248, 26453, 11100, 224, 10391, 251, 10391, 134, 11100,
                      226, 216, 33, 34, 35],
    "emoji 🚀🔥 👍🏽": [391, 33777, 15107, 244, 218, 10813, 238, 115, 15107, 235, 231, 10813, 233, 138],
    "def f(x):\n    return x**2  # square\n": [1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 5222, 198],
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n": [1, 4093, 198, 1780, 314, 216, 34, 27,
                                                                       34, 47, 2, 198, 1, 520, 9531, 198],
    "a<|im_end|>b": [81, 2, 82],
    "\u00a0non-breaking\u2009thin\u3000ideographic": [15442, 9033, 29, 11194, 321, 227, 39200, 12109, 218, 489, 4551],
    "$1,234.56 €99 £3": [20, 33, 28, 34, 35, 36, 30, 37, 38, 24927, 41, 41, 10257, 35],
    "ﬁ ligature Ａ１２": [27141, 13042, 906, 216, 8083, 111, 8083, 235, 8083, 236],
    "𝟙𝟚𝟛 mathematical digits": [23159, 249, 243, 23159, 249, 244, 23159, 249, 245, 7132, 18638],
    "1.5e-10 0x1F 0b1010": [33, 30, 37, 85, 29, 33, 32, 216, 32, 104, 33, 54, 216, 32, 82, 33, 32, 33, 32],
}


@pytest.fixture(scope="module")
def tok(smollm2_dir) -> Tokenizer:
    return Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))


@pytest.mark.parametrize("text", list(LLAMA_CPP_IDS))
def test_matches_llama_cpp(tok, text):
    assert tok.encode(text, add_special_tokens=False).ids == LLAMA_CPP_IDS[text]


NUMERALS = ["0123456789", "²³¹⁴⁵", "½¼¾⅓", "①②⑳", "٠١٢٣٤٥٦٧٨٩", "۰۱۲", "Ⅻⅷ", "१२३", "１２３"]


@pytest.mark.parametrize("numerals", NUMERALS)
def test_every_numeral_is_its_own_piece(tok, numerals):
    pieces = tok.pre_tokenizer.pre_tokenize_str("x" + numerals + "y")
    texts = [bytes(_byte_decoder()[c] for c in piece).decode("utf-8") for piece, _ in pieces]
    assert texts == ["x", *numerals, "y"]


def test_digits_split_in_ids(tok):
    enc = tok.encode("12³ ½ ①٣", add_special_tokens=False)
    decoded = [tok.decode([i]) for i in enc.ids]
    assert decoded[:3] == ["1", "2", "³"]
    assert "½" in decoded and tok.decode(enc.ids) == "12³ ½ ①٣"


@pytest.mark.parametrize("text", [
    "Hello, world!", "  two  spaces\tand\ttabs\n\n", "naïve café 日本語 🚀", "x = [1, 2, 3]  # list\r\n",
    "mixed ٣ ½ ① digits 2024", "\u200b\u00a0\u3000", "", "<not special> <|im_start>",
])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_special_tokens(tok, smollm2_dir):
    assert tok.token_to_id("<|im_start|>") == 1 and tok.token_to_id("<|im_end|>") == 2
    assert tok.decode([1, 19556, 2], skip_special_tokens=True) == "Hello"
    assert tok.encode("Hello", add_special_tokens=True).ids == [19556]  # add_bos_token is false
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    specials = (config["bos_token"], config["eos_token"], config["pad_token"])
    assert specials == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert config["add_bos_token"] is False


def test_chat_template(smollm2_dir):
    config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    template = jinja2.Environment().from_string(config["chat_template"])
    text = template.render(messages=[{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level alphabet: stand-in character -> byte value."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[chr(b)] = b
        else:
            mapping[chr(256 + extra)] = b
            extra += 1
    return mapping
