"""RE2 and JRT prompt builders, alone and through a chat template."""

from __future__ import annotations

import pytest

import decoderlab
from decoderlab.errors import UserError
from decoderlab.prompting import chat, jrt, re2


def test_re2_layout_and_cot():
    q = "Roger has 5 balls. He buys 2 more. How many balls does he have?"
    assert re2(q) == f"Q: {q}\nRead the question again: {q}\nA:"
    expected = f"Q: {q}\nRead the question again: {q}\nA: The answer (arabic numerals) is"
    assert re2(q, "The answer (arabic numerals) is") == expected
    assert re2(q, chain_of_thought=True).endswith("A: Let's think step by step.")


def test_jrt_repeats_the_context_before_the_question():
    prompt = jrt(["doc one", "doc two"], "Which doc?")
    assert prompt == "doc one\n\ndoc two\n\ndoc one\n\ndoc two\n\nWhich doc?"
    assert jrt("only", "q?", separator=" | ") == "only | only | q?"


def test_composes_with_a_chat_template():
    tok = decoderlab.Tokenizer.train_char(texts=["abcdefghijklmnopqrstuvwxyz QAR:?.\n<>|'"])
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    text = chat(tok, re2("why?"), system="be brief")
    assert text == "<|system|>be brief\n<|user|>Q: why?\nRead the question again: why?\nA:\n<|assistant|>"


@pytest.mark.parametrize("call", [lambda: re2(""), lambda: jrt([], "q"), lambda: jrt(["a", " "], "q"),
                                  lambda: jrt("a", "")])
def test_bad_input(call):
    with pytest.raises(UserError) as err:
        call()
    assert "\n" not in str(err.value)
