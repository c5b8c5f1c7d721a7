"""Ctrl-C during an answer stops that answer, keeps what was said, and frees the request."""
from __future__ import annotations

from cupaged.cli import chat
from cupaged.outputs import CompletionOutput, RequestOutput


class InterruptedLLM:
    """Stands in for LLM: streams two outputs, then the user presses Ctrl-C."""

    class engine:
        max_model_len = 100

    def __init__(self):
        self.closed = False

    def chat_prompt(self, history):
        return {"prompt_token_ids": [1, 2, 3]}

    def stream_outputs(self, prompt, params):
        try:
            for text, ids in (("Hel", [5]), ("Hello", [5, 6])):
                yield RequestOutput("0", None, [1, 2, 3], [CompletionOutput(0, text, ids, delta=text[-3:])])
            raise KeyboardInterrupt
        finally:
            self.closed = True  # LLM.stream_outputs aborts the request here


def test_ctrl_c_keeps_partial_answer_and_closes_stream(capsys):
    llm = InterruptedLLM()
    answer = chat._answer(llm, [{"role": "user", "content": "hi"}], params=None, verbose=False)
    assert answer == "Hello"
    assert llm.closed
    assert "[stopped]" in capsys.readouterr().out
