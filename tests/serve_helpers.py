"""Helpers for the server tests: a real uvicorn server on a free loopback port, tiny models, a slowed model."""

from __future__ import annotations

import functools
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import torch

import decoderlab

MODEL = "tiny-char"
TEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ :\n.,!?'"
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
BPE_CORPUS = ['{"name": "alice", "age": 31, "tags": ["a", "b"], "ok": true}', "(1 + 2) * 3 - (4 / 5)",
              "hello world 0123456789", "<|im_start|>user\nhi there<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>",
              "true false null [1, 2, 3]"] * 10


def char_tokenizer() -> decoderlab.Tokenizer:
    """One id per character, no special tokens (so no eos: a request generates exactly max_tokens)."""
    tok = decoderlab.Tokenizer.train_char(texts=[TEXT + "<>"])
    tok.chat_template = TEMPLATE
    return tok


def char_model(tok: decoderlab.Tokenizer, context_length: int = 64, seed: int = 0) -> decoderlab.Transformer:
    torch.manual_seed(seed)
    return decoderlab.Transformer(decoderlab.ModelConfig.preset("char-baby", vocab_size=tok.vocab_size,
                                                                context_length=context_length)).eval()


def prose(n_chars: int, seed: int = 0) -> str:
    """`n_chars` of made-up words and punctuation (text for a tokenizer to chew on)."""
    import random

    rng = random.Random(seed)
    syllables = ["an", "be", "ca", "do", "el", "fi", "go", "hu", "is", "jo", "ka", "lu", "mo", "ne", "or", "pu"]
    words = ["".join(rng.choices(syllables, k=rng.randint(1, 3))) for _ in range(2000)]
    out, size = [], 0
    while size < n_chars:
        w = rng.choice(words) + rng.choice([" ", " ", " ", ", ", ". ", "\n"])
        out.append(w)
        size += len(w)
    return "".join(out)[:n_chars]


@functools.cache
def _bpe_json() -> str:
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return decoderlab.Tokenizer.train_bpe(texts=[*BPE_CORPUS, prose(50_000)], vocab_size=600,
                                          special_tokens=special).backend.to_str()


def bpe_tokenizer() -> decoderlab.Tokenizer:
    """Byte-level BPE with an eos (<|endoftext|>) and ChatML's turn tokens, with a ChatML chat template."""
    import tokenizers

    tok = decoderlab.Tokenizer(tokenizers.Tokenizer.from_str(_bpe_json()),
                               special_tokens={"eos_token": "<|endoftext|>"})
    tok.chat_template = CHATML
    return tok


def bpe_model(tok: decoderlab.Tokenizer, seed: int = 0) -> decoderlab.Transformer:
    torch.manual_seed(seed)
    return decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=tok.vocab_size, n_layers=1, n_heads=2,
                                                         d_model=32, context_length=512)).eval()


@contextmanager
def running(app: Any) -> Iterator[str]:
    """Serve `app` with uvicorn on a free loopback port (in a thread); yields the base URL, .../v1."""
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        srv.should_exit = True
        thread.join(timeout=60)
        sock.close()
        assert not thread.is_alive()


class Slowed:
    """Makes every forward pass of `model` take `seconds` longer, and records when each ran (and its input).

    `fail_at`: the forward pass (1-based, counted from entering) that raises a RuntimeError instead."""

    def __init__(self, model: torch.nn.Module, seconds: float = 0.0, fail_at: int | None = None) -> None:
        self.model, self.seconds, self.fail_at = model, seconds, fail_at
        self.calls: list[tuple[float, torch.Tensor]] = []

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self.calls.append((time.monotonic(), args[0].detach().clone()))
        if self.fail_at is not None and len(self.calls) == self.fail_at:
            raise RuntimeError("injected failure in the forward pass")
        time.sleep(self.seconds)

    def __enter__(self) -> Slowed:
        self.handle = self.model.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The OpenAI-style error of `response`, checked to have the status and the shape clients parse."""
    assert response.status_code == status, (response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"] and "\n" not in error["message"]
    assert isinstance(error["type"], str)
    return error


def still_serves(base: str, model: str = MODEL, headers: dict[str, str] | None = None) -> None:
    """A normal request gets a normal answer."""
    r = httpx.post(f"{base}/completions", json={"model": model, "prompt": "ab", "max_tokens": 2, "temperature": 0},
                   headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == 2
