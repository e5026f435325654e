"""Key-value retrieval, the synthetic task of "Lost in the Middle" (Liu et al., 2023): a JSON object of n random
UUID keys and values, one key queried; the queried pair stands at each position in turn, so accuracy by position
shows whether a model reads the middle of its context. Deterministic from a seed; scored plainly or with PINE
(the pairs are the order-free segments).

A prompt is the paper's, one pair per line:

    Extract the value corresponding to the specified key in the JSON object below.

    JSON data:
    {"<key 1>": "<value 1>",
    "<key 2>": "<value 2>",
    }

    Key: "<queried key>"
    Corresponding value:

Every pair line ends with ",\n" (the last one too) so that each pair is the same text wherever it stands: a PINE
segment then holds exactly the tokens it holds in the plain prompt. The answer is the value; an output is right
when the first UUID in it is the value (the YAML's regex filter, and `kv_retrieval_accuracy`).
"""

from __future__ import annotations

import json
import random
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import generation, pine
from ..errors import UserError
from ..model import Transformer
from ..tokenizer import Tokenizer
from .writer import TaskSpec, write_suite

INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below.\n\nJSON data:\n{"
UUID_PATTERN = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
METHODS = ("plain", "pine")


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def pair_text(key: str, value: str) -> str:
    """One pair's line of the JSON object (a PINE segment)."""
    return f"{json.dumps(key)}: {json.dumps(value)},\n"


def question_text(key: str) -> str:
    """What follows the pairs: the object's close and the query."""
    return f"}}\n\nKey: {json.dumps(key)}\nCorresponding value:"


def kv_retrieval_items(n_pairs: int, n_examples: int = 10, seed: int = 0,
                       positions: Sequence[int] | None = None) -> list[dict[str, Any]]:
    """`n_examples` sets of `n_pairs` fresh UUID pairs, each asked with its queried pair at every position in
    `positions` (default all, 0-based): n_examples * len(positions) records {"id", "example", "position",
    "n_pairs", "pairs" (as placed, [[key, value], ...]), "key", "value", "prompt"}. Other pairs keep their order."""
    if not isinstance(n_pairs, int) or n_pairs < 1:
        raise UserError(f"n_pairs must be a positive integer, got {n_pairs!r}")
    if not isinstance(n_examples, int) or n_examples < 1:
        raise UserError(f"n_examples must be a positive integer, got {n_examples!r}")
    positions = list(range(n_pairs)) if positions is None else list(positions)
    bad = [p for p in positions if not isinstance(p, int) or not 0 <= p < n_pairs]
    if bad or not positions:
        raise UserError(f"positions must be indices in [0, {n_pairs}), got {bad or positions}")
    rng = random.Random(seed)
    records = []
    for example in range(n_examples):
        pairs = [(_uuid(rng), _uuid(rng)) for _ in range(n_pairs)]
        query = pairs[rng.randrange(n_pairs)]
        others = [p for p in pairs if p != query]
        for position in positions:
            placed = [*others[:position], query, *others[position:]]
            records.append({
                "id": f"{example}-{position}", "example": example, "position": position, "n_pairs": n_pairs,
                "pairs": [list(p) for p in placed], "key": query[0], "value": query[1],
                "prompt": INSTRUCTION + "".join(pair_text(k, v) for k, v in placed) + question_text(query[0]),
            })
    return records


def task_spec(name: str = "kv_retrieval") -> TaskSpec:
    """lm-eval's form: greedy generation to the end of the line; exact match of the first UUID with the value."""
    return TaskSpec(
        name=name, doc_to_text="prompt", doc_to_target="value", output_type="generate_until",
        metrics=("exact_match",),
        extra={"generation_kwargs": {"until": ["\n"], "do_sample": False, "max_gen_toks": 64},
               "filter_list": [{"name": "first-uuid", "filter": [
                   {"function": "regex", "regex_pattern": f"({UUID_PATTERN})"}, {"function": "take_first"}]}],
               "metadata": {"version": 1.0}})


def write_kv_retrieval(out_dir: str | Path, n_pairs: int, n_examples: int = 10, seed: int = 0,
                       n_train: int = 0, name: str | None = None) -> Path:
    """Writes test.jsonl (n_examples x every position) and, with `n_train` > 0, train.jsonl (examples from another
    seed stream, for few-shot or training), plus the task YAML; returns the YAML's path."""
    splits = {"test": kv_retrieval_items(n_pairs, n_examples, seed)}
    if n_train:
        splits = {"train": kv_retrieval_items(n_pairs, n_train, seed + 1_000_003), **splits}
    return write_suite(out_dir, task_spec(name or f"kv_retrieval_{n_pairs}"), splits)


def first_uuid(text: str) -> str | None:
    """The first UUID in `text`, as the YAML's filter reads an output."""
    match = re.search(UUID_PATTERN, text)
    return match.group(0) if match else None


@dataclass
class KVRetrievalResult:
    """Accuracy of one method, overall and by the queried pair's position."""

    method: str
    items: int
    accuracy: float
    accuracy_by_position: list[float] = field(default_factory=list)  # [p]: over the items asked at position p
    outputs: list[str] = field(default_factory=list)  # the generated text per item, in the items' order

    def summary(self) -> str:
        by_pos = " ".join(f"{a:.2f}" for a in self.accuracy_by_position)
        return f"{self.method}: {self.items} items, accuracy {self.accuracy:.3f}; by position [{by_pos}]"


def pine_input(tokenizer: Tokenizer, record: dict[str, Any]) -> pine.PineInput:
    """A record as token ids: the instruction (after the tokenizer's BOS, if any), one segment per pair, the
    query. Each part is tokenized on its own, so the plain prompt (`.tokens`) holds the same tokens."""
    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    segments = [enc(pair_text(k, v)) for k, v in record["pairs"]]
    return pine.PineInput(tokenizer.added_tokens[0] + enc(INSTRUCTION), segments, enc(question_text(record["key"])))


def kv_retrieval_accuracy(model: Transformer, tokenizer: Tokenizer, items: Sequence[dict[str, Any]],
                          method: str = "plain", batch_size: int = 8,
                          max_new_tokens: int | None = None) -> KVRetrievalResult:
    """Greedy answers to `items` (records of `kv_retrieval_items`), read plainly or with PINE (pairs as segments;
    needs a RoPE model); an answer is right when its first UUID is the value. `max_new_tokens` defaults to the
    longest value's token count plus 4."""
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    items = list(items)
    if not items:
        raise UserError("no items to score; make some with kv_retrieval_items")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    inputs = [pine_input(tokenizer, r) for r in items]
    if max_new_tokens is None:
        max_new_tokens = max(len(tokenizer.encode(" " + r["value"], add_special_tokens=False)) for r in items) + 4
    outputs: list[str] = []
    for at in range(0, len(items), batch_size):
        chunk = inputs[at:at + batch_size]
        if method == "plain":
            result = generation.generate(model, [it.tokens for it in chunk], max_new_tokens, temperature=0.0,
                                         stop_strings=["\n"], tokenizer=tokenizer)
        else:
            result = pine.batch_generate(model, chunk, max_new_tokens, temperature=0.0, stop_strings=["\n"],
                                         tokenizer=tokenizer)
        outputs += result.texts
    n_positions = max(r["position"] for r in items) + 1
    right, seen = [0] * n_positions, [0] * n_positions
    for record, text in zip(items, outputs, strict=True):
        seen[record["position"]] += 1
        right[record["position"]] += first_uuid(text) == record["value"]
    return KVRetrievalResult(method, len(items), sum(right) / len(items),
                             [r / s if s else float("nan") for r, s in zip(right, seen, strict=True)], outputs)
