"""`-v` reports prefix-cache reuse after each answer; the numbers are worked out from the tokens."""
from __future__ import annotations

import re

from click.testing import CliRunner

from cupaged.cli.main import main
from cupaged.sampling_params import SamplingParams

GREEDY = ["--backend", "cpu", "--temperature", "0", "--max-tokens", "12", "-v"]
BS = 16  # the default block size


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_chat_verbose_shows_the_second_turn_reusing_the_first(smollm2_dir, smol_llm):
    turns = ["Say hello.", "What did I just ask you?"]
    result = CliRunner().invoke(main, ["chat", "--model", str(smollm2_dir), *GREEDY], input="\n".join(turns) + "\n")
    assert result.exit_code == 0, result.output
    reported = [tuple(map(int, m)) for m in re.findall(r"prefix cache: (\d+)/(\d+) prompt tokens reused", result.stderr)]
    # the same conversation through the API: turn 1's prompt and the tokens it computed
    params = SamplingParams(temperature=0, max_tokens=12)
    history = [{"role": "user", "content": turns[0]}]
    first = smol_llm.chat_prompt(history)["prompt_token_ids"]
    answer = smol_llm.chat(history, params).outputs[0]
    history += [{"role": "assistant", "content": answer.text}, {"role": "user", "content": turns[1]}]
    second = smol_llm.chat_prompt(history)["prompt_token_ids"]
    computed = first + answer.token_ids[:-1]  # the last sampled token is never computed
    reusable = min(common_prefix(computed, second), len(second) - 1) // BS * BS
    assert reusable > 0
    assert reported == [(0, len(first)), (reusable, len(second))]


def test_generate_verbose_shows_the_lookup(smollm2_dir):
    result = CliRunner().invoke(main, ["generate", "The capital of France is", "--model", str(smollm2_dir), *GREEDY])
    assert result.exit_code == 0, result.output
    assert re.search(r"prefix cache: 0/\d+ prompt tokens reused \(0%\)", result.stderr)
