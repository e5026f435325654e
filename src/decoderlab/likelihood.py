r"""Perplexity and bits per byte of a model on texts, files or folders, with the sliding window of transformers'
perplexity guide (https://huggingface.co/docs/transformers/perplexity) or lm-eval's rolling loglikelihood.

Each document (a file, or one line's text field of a .jsonl file, as `decoderlab.data` reads them; or one string
of `texts`) is encoded on its own with the tokenizer's special tokens (Llama's BOS; nothing for GPT-2) and scored
on its own, as lm-eval's `loglikelihood_rolling` scores each document of a task. Two window schemes over its ids
S[0..n), both batched (`batch_size` windows per forward pass, longest first):

- "guide" (default): windows S[begin:end], begin = 0, stride, 2*stride, ..., end = min(begin + context, n),
  stopping at the first window that reaches n; a window scores its last end - prev_end tokens (those no earlier
  window scored), each from the tokens before it in the window, and never its own first token. S[0] is never
  predicted, and with stride == context neither is any later window's first token, exactly as the guide's loop.
- "lm-eval": lm-eval's `get_rolling_token_windows(S, prefix, max_seq_len=context, context_len=context - stride
  + 1)` + `make_disjoint_window`: every token is predicted once, from a prefix token (BOS, else EOS) for the
  first, the first window predicting `context` tokens and each later one the next `stride`, each read from the
  up to `context` tokens before its last one. With stride == context (the default) this is the harness's own
  `loglikelihood_rolling` (which uses context_len=1).

Figures are lm-eval's: perplexity = exp(NLL / tokens scored), word_perplexity = exp(NLL / words),
byte_perplexity = exp(NLL / UTF-8 bytes), bits_per_byte = NLL / bytes / ln 2, NLL summed over every scored token
in nats, words = len(re.split(r"\s+", text)) per document (lm-eval's `count_words`), all summed over documents.
The guide averages each window's mean loss weighted by its label count minus one; we sum per-token NLL exactly.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .data import input_files, read_documents
from .errors import UserError
from .model import Transformer
from .tokenizer import Tokenizer


@dataclass
class PerplexityStats:
    """Summed figures over some documents (one file's, or all of them)."""

    name: str
    nll: float = 0.0  # summed negative log-likelihood of the scored tokens, in nats
    tokens: int = 0  # tokens scored (predicted)
    bytes: int = 0  # UTF-8 bytes of the documents' text
    words: int = 0  # lm-eval's word count: len(re.split(r"\s+", text)) per document
    documents: int = 0

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens) if self.tokens else math.nan

    @property
    def word_perplexity(self) -> float:
        return math.exp(self.nll / self.words) if self.words else math.nan

    @property
    def byte_perplexity(self) -> float:
        return math.exp(self.nll / self.bytes) if self.bytes else math.nan

    @property
    def bits_per_byte(self) -> float:
        return self.nll / self.bytes / math.log(2) if self.bytes else math.nan

    def add(self, other: PerplexityStats) -> None:
        self.nll += other.nll
        self.tokens += other.tokens
        self.bytes += other.bytes
        self.words += other.words
        self.documents += other.documents

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "documents": self.documents, "tokens": self.tokens, "bytes": self.bytes,
                "words": self.words, "nll": self.nll, "perplexity": self.perplexity,
                "word_perplexity": self.word_perplexity, "byte_perplexity": self.byte_perplexity,
                "bits_per_byte": self.bits_per_byte}


@dataclass
class PerplexityResult:
    """`total` over every document, `sources` per file (or per string of `texts`), and the window settings."""

    total: PerplexityStats
    sources: list[PerplexityStats] = field(default_factory=list)
    context: int = 0
    stride: int = 0
    mode: str = "guide"
    prefix_token: int | None = None

    @property
    def perplexity(self) -> float:
        return self.total.perplexity

    @property
    def word_perplexity(self) -> float:
        return self.total.word_perplexity

    @property
    def byte_perplexity(self) -> float:
        return self.total.byte_perplexity

    @property
    def bits_per_byte(self) -> float:
        return self.total.bits_per_byte

    def to_dict(self) -> dict[str, Any]:
        return {"context": self.context, "stride": self.stride, "mode": self.mode, "prefix_token": self.prefix_token,
                "total": self.total.to_dict(), "sources": [s.to_dict() for s in self.sources]}


def count_words(text: str) -> int:
    """lm-eval's word count of a document (`Task.count_words`): the pieces between whitespace runs."""
    return len(re.split(r"\s+", text))


@dataclass
class _Window:
    doc: int  # index of the document's source
    feed: list[int]  # the tokens the model reads
    first: int  # first feed position whose next-token prediction is scored
    targets: list[int]  # feed[first + 1:] plus the window's last token


MODES = ("guide", "lm-eval")


def windows(ids: Sequence[int], context: int, stride: int, mode: str = "guide") -> list[tuple[int, int, int]]:
    """The windows over `ids` as (begin, first, end): tokens ids[first:end] are scored, each predicted from the
    tokens ids[begin:i] before it (the model reads ids[begin:end - 1]). Every index in [1, n) is scored at most once
    ("guide"; all of them when stride < context) or exactly once ("lm-eval")."""
    n = len(ids)
    out = []
    if mode == "guide":
        prev_end = 0
        for begin in range(0, n, stride):
            end = min(begin + context, n)
            first = max(begin + 1, prev_end)  # the last end - prev_end tokens, but never the window's first
            if first < end:
                out.append((begin, first, end))
            prev_end = end
            if end == n:
                break
    else:
        # lm-eval's get_rolling_token_windows(max_seq_len=context, context_len=context - stride + 1): the first
        # window predicts its first `context` tokens, each later one the next `stride`, read from the `context`
        # tokens before its last one (so the last window reaches back for a full context).
        first, end = 1, min(context + 1, n)
        while first < end:
            out.append((max(0, end - 1 - context), first, end))
            first, end = end, min(end + stride, n)
    return out


def _check_settings(model: Transformer, context: int | None, stride: int | None, batch_size: int,
                    mode: str) -> tuple[int, int]:
    if mode not in MODES:
        raise UserError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    limit = model.config.context_length
    if context is None:
        context = limit
    least = 2 if mode == "guide" else 1
    if not isinstance(context, int) or context < least:
        raise UserError(f"context must be an integer of at least {least} tokens, got {context!r}")
    if context > limit:
        raise UserError(f"context {context} is longer than the model's context length of {limit}; use a context "
                        f"of at most {limit}")
    if stride is None:
        stride = context
    if not isinstance(stride, int) or stride < 1:
        raise UserError(f"stride must be a positive integer, got {stride!r}")
    if stride > context:
        raise UserError(f"stride {stride} is larger than context {context}: tokens between windows would never "
                        "be scored; use a stride of at most the context")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    return context, stride


def _sources(inputs: Sequence[str | os.PathLike] | str | os.PathLike | None, texts: Iterable[str] | str | None,
             text_field: str) -> list[tuple[str, Iterable[str]]]:
    sources: list[tuple[str, Iterable[str]]] = []
    if isinstance(texts, str):
        texts = [texts]
    for i, text in enumerate(texts or ()):
        if not isinstance(text, str):
            raise UserError(f"texts[{i}] is a {type(text).__name__}, not a string")
        sources.append((f"text[{i}]", [text]))
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if inputs is not None:
        if not inputs and not sources:
            raise UserError("no files given: pass text files, .jsonl files or folders to score")
        for path in input_files(inputs) if inputs else []:
            sources.append((str(path), _documents(path, text_field)))
    if not sources:
        raise UserError("nothing to score: pass files or folders, or texts=[...]")
    return sources


def _documents(path: Path, text_field: str) -> Iterable[str]:
    try:
        yield from read_documents(path, text_field)
    except OSError as e:
        raise UserError(f"cannot read {str(path)!r} ({e.strerror or e})") from None


@torch.inference_mode()
def _score(model: Transformer, items: list[_Window], batch_size: int, nll: list[float]) -> None:
    """Adds each window's summed NLL to nll[window.doc]. Longest windows first, right-padded: a causal model's
    real positions never see the padding after them, and nearly every batch is of full windows."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i].feed))
    device = model.device
    for at in range(0, len(order), batch_size):
        chunk = [items[i] for i in order[at:at + batch_size]]
        T = len(chunk[0].feed)
        ids = torch.tensor([w.feed + [0] * (T - len(w.feed)) for w in chunk], device=device)
        keep = T - min(w.first for w in chunk)  # logits only where some row scores a token
        logits = model(ids, logits_to_keep=keep)
        for b, w in enumerate(chunk):
            lo = w.first - (T - keep)
            rows = logits[b, lo:lo + len(w.targets)].float().log_softmax(-1)
            target = torch.tensor(w.targets, device=device)
            nll[w.doc] -= float(rows.gather(-1, target[:, None]).double().sum())


def perplexity(model: Transformer | str | os.PathLike, inputs: Sequence[str | os.PathLike] | str | None = None, *,
               texts: Iterable[str] | str | None = None, tokenizer: Tokenizer | None = None,
               context: int | None = None, stride: int | None = None, mode: str = "guide",
               prefix_token: int | None = None, batch_size: int = 8, text_field: str = "text") -> PerplexityResult:
    """Perplexity, word and byte perplexity and bits per byte of `model` on files or folders (`inputs`, read as
    `decoderlab.data` reads a corpus) and/or strings (`texts`); see the module docstring for the windows.

    `model` is a loaded `Transformer` (then pass its `tokenizer`) or a folder (`decoderlab.load`: an HF folder or
    a decoderlab run, with its tokenizer). `context` (default: the model's context length) and `stride` (default:
    context) are the guide's max_length and stride (`mode="guide"`), or lm-eval's max_length and prediction
    length (`mode="lm-eval"`, where each document also starts with `prefix_token`, by default BOS, else EOS, as
    lm-eval's HF model does). `prefix_token` goes before each document's ids in either mode.
    `batch_size` windows go through the model per forward pass.
    """
    if isinstance(model, (str, os.PathLike)):
        from .checkpoint import load

        folder = model
        model = load(folder)
        tokenizer = tokenizer or Tokenizer.from_folder(folder)
    if not isinstance(model, Transformer):
        raise UserError(f"model must be a Transformer or a model folder, got {type(model).__name__}")
    if tokenizer is None:
        raise UserError("pass the model's tokenizer= (or give the model as a folder holding its tokenizer)")
    context, stride = _check_settings(model, context, stride, batch_size, mode)
    if mode == "lm-eval" and prefix_token is None:
        prefix_token = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
        if prefix_token is None:
            raise UserError("the tokenizer has neither a BOS nor an EOS token to start each document with; pass "
                            "prefix_token= (--prefix-token)")
    vocab = model.config.vocab_size
    if prefix_token is not None and not 0 <= prefix_token < vocab:
        raise UserError(f"prefix_token {prefix_token} is not a token id in [0, {vocab})")

    stats = []
    items: list[_Window] = []
    for name, documents in _sources(inputs, texts, text_field):
        source = PerplexityStats(name)
        stats.append(source)
        for text in documents:
            ids = tokenizer.encode(text, add_special_tokens=True)
            if prefix_token is not None:
                ids = [prefix_token, *ids]
            if ids and max(ids) >= vocab:
                raise UserError(f"{name}: the tokenizer gives id {max(ids)}, outside the model's vocabulary of "
                                f"{vocab}; use the model's own tokenizer")
            for begin, first, end in windows(ids, context, stride, mode):
                items.append(_Window(len(stats) - 1, ids[begin:end - 1], first - begin - 1, ids[first:end]))
                source.tokens += end - first
            source.bytes += len(text.encode("utf-8"))
            source.words += count_words(text)
            source.documents += 1
    nll = [0.0] * len(stats)
    was_training = model.training
    model.eval()
    try:
        _score(model, items, batch_size, nll)
    finally:
        model.train(was_training)
    total = PerplexityStats("total")
    for source, value in zip(stats, nll, strict=True):
        source.nll = value
        total.add(source)
    return PerplexityResult(total, stats, context, stride, mode, prefix_token)
