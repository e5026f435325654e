"""Prompt builders that let a causal model read its input twice: RE2 (re-reading) and JRT (just read twice).

Each returns plain text, so it composes with a chat template (`chat`) or any other wrapper.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import UserError
from .tokenizer import Tokenizer

COT_TRIGGER = "Let's think step by step."


def _need_text(name: str, value: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{name} must be non-empty text")


def re2(question: str, answer_trigger: str = "", chain_of_thought: bool = False) -> str:
    """RE2: `Q: {question}\\nRead the question again: {question}\\nA: {trigger}`.

    With `chain_of_thought`, "Let's think step by step." follows "A:" (the paper's RE2 + CoT variant).
    """
    _need_text("question", question)
    trigger = " ".join(t for t in (answer_trigger, COT_TRIGGER if chain_of_thought else "") if t)
    return f"Q: {question}\nRead the question again: {question}\nA:{' ' + trigger if trigger else ''}"


def jrt(context: str | Sequence[str], question: str, separator: str = "\n\n") -> str:
    """JRT: the context (documents joined by `separator`) twice, then the question, so every token of the
    second copy has seen all of the context once before."""
    docs = [context] if isinstance(context, str) else list(context)
    if not docs:
        raise UserError("jrt needs at least one context document")
    for i, doc in enumerate(docs):
        _need_text(f"context document #{i}", doc)
    _need_text("question", question)
    body = separator.join(docs)
    return f"{body}{separator}{body}{separator}{question}"


def chat(tokenizer: Tokenizer, prompt: str, system: str | None = None) -> str:
    """`prompt` as the user turn of the tokenizer's chat template (with the assistant's turn opened)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
