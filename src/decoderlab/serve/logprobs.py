"""Log-probabilities in OpenAI's response shapes, from the engine's `TokenLogprob`s.

Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...]}`.
Completions (legacy): `{"tokens", "token_logprobs", "top_logprobs": [{token: logprob}, ...], "text_offset"}`, where
each top_logprobs entry holds the k most likely tokens and, as OpenAI's does, the chosen one; text_offset counts
characters from the start of the completion.

Values are log-softmax of the model's raw logits (before temperature, penalties, filters or a response_format's
grammar). A token is shown as its own decoded text, with its bytes: a byte-level token holding part of a
multi-byte character decodes to U+FFFD alone, and its `bytes` say which bytes it really holds. JSON has no
-Infinity: a logprob below -9999 is written as -9999.0, as OpenAI does.
"""

from __future__ import annotations

import functools
import re
from typing import Any

from ..generation import TokenLogprob
from ..tokenizer import Tokenizer

_FLOOR = -9999.0
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # SentencePiece byte fallback


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-ins for the 256 bytes (`bytes_to_unicode`), inverted."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


class TokenText:
    """Each token's text and bytes, as logprobs show them (memoized per id)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        hit = self._cache.get(token)
        if hit is None:
            hit = self._cache[token] = self._describe(token)
        return hit

    def _describe(self, token: int) -> tuple[str, list[int]]:
        text = self.tokenizer.decode([token])
        if "\ufffd" not in text:
            return text, list(text.encode("utf-8"))
        piece = self.tokenizer.id_to_token(token) or ""
        alphabet = _byte_level_alphabet()
        if piece and all(ch in alphabet for ch in piece):
            return text, [alphabet[ch] for ch in piece]
        if m := _BYTE_TOKEN.match(piece):
            return text, [int(m.group(1), 16)]
        return text, list(text.encode("utf-8"))


def _value(logprob: float) -> float:
    return max(logprob, _FLOOR)


def chat_logprobs(items: list[TokenLogprob], text: TokenText) -> list[dict[str, Any]]:
    """The `logprobs.content` entries of a chat completion (or of one streamed chunk)."""
    def entry(token: int, logprob: float) -> dict[str, Any]:
        shown, raw = text(token)
        return {"token": shown, "logprob": _value(logprob), "bytes": raw}

    return [entry(lp.token, lp.logprob) | {"top_logprobs": [entry(t, v) for t, v in lp.top]} for lp in items]


def completion_logprobs(items: list[TokenLogprob], text: TokenText, offset: int = 0) -> dict[str, Any]:
    """A completion's `logprobs` object (or one streamed chunk's); `offset`: characters already sent."""
    tokens, offsets, tops = [], [], []
    for lp in items:
        shown = text(lp.token)[0]
        tokens.append(shown)
        offsets.append(offset)
        offset += len(shown)
        top = {text(t)[0]: _value(v) for t, v in lp.top}
        top.setdefault(shown, _value(lp.logprob))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [_value(lp.logprob) for lp in items], "top_logprobs": tops,
            "text_offset": offsets}
