"""Evaluation over the one `Transformer`: multiple-choice scoring by answer log-likelihood, and the
position-bias probe (does the chosen option change when the options are reordered?), plain or with PINE.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from . import pine
from .errors import UserError
from .model import Transformer
from .tokenizer import Tokenizer

METHODS = ("plain", "pine")


@dataclass
class ChoiceItem:
    """A multiple-choice question as token ids: `prefix`, the `options` (listed in this order in a plain
    prompt, as segments with PINE), then `suffix`; `answer` is the index of the right option. The model picks
    the option whose answer text (`answers[i]`, by default the option itself) is likeliest after the suffix.
    """

    prefix: list[int]
    options: list[list[int]]
    suffix: list[int]
    answer: int
    answers: list[list[int]] | None = None

    @classmethod
    def from_text(cls, tokenizer: Tokenizer, prefix: str, options: Sequence[str], suffix: str, answer: int,
                  answers: Sequence[str] | None = None) -> ChoiceItem:
        """Tokenize each part on its own (so a plain prompt and PINE's segments hold the same tokens); the prefix
        starts with what the tokenizer puts before a text (Llama's BOS), as transformers' tokenizer does."""
        def enc(text: str) -> list[int]:
            return tokenizer.encode(text, add_special_tokens=False)

        return cls(tokenizer.added_tokens[0] + enc(prefix), [enc(o) for o in options], enc(suffix), answer,
                   None if answers is None else [enc(a) for a in answers])

    def answer_tokens(self, i: int) -> list[int]:
        return self.answers[i] if self.answers is not None else self.options[i]


def _check_items(items: Iterable[ChoiceItem]) -> list[ChoiceItem]:
    items = list(items)
    if not items:
        raise UserError("no items to evaluate; pass at least one ChoiceItem")
    for n, it in enumerate(items):
        if not isinstance(it, ChoiceItem):
            raise UserError(f"item {n} is a {type(it).__name__}, not a ChoiceItem")
        if len(it.options) < 2:
            raise UserError(f"item {n} has {len(it.options)} option(s); a choice needs at least two")
        if not 0 <= it.answer < len(it.options):
            raise UserError(f"item {n}: answer {it.answer} is not an option index in [0, {len(it.options)})")
        if it.answers is not None and len(it.answers) != len(it.options):
            raise UserError(f"item {n} has {len(it.answers)} answers for {len(it.options)} options")
        if any(not o for o in it.options) or any(not it.answer_tokens(i) for i in range(len(it.options))):
            raise UserError(f"item {n} has an empty option or answer; every one needs at least one token")
        if not it.suffix:
            raise UserError(f"item {n} has an empty suffix; the answer is read after it (e.g. 'Answer:')")
    return items


def _plain_scores(model: Transformer, rows: list[tuple[list[int], list[int]]], batch_size: int) -> list[float]:
    """Sum of log p(answer | context) for each (context, answer) row; right-padded batches."""
    scores: list[float] = []
    ctx = model.config.context_length
    for at in range(0, len(rows), batch_size):
        chunk = rows[at:at + batch_size]
        seqs = [c + a for c, a in chunk]
        longest = max(len(s) for s in seqs)
        if longest > ctx:
            raise UserError(f"a prompt with its answer has {longest} tokens, more than the model's context length "
                            f"of {ctx}; shorten the items")
        ids = torch.tensor([s + [0] * (longest - len(s)) for s in seqs], device=model.device)
        logprobs = model(ids).float().log_softmax(-1)
        for b, (c, a) in enumerate(chunk):
            where = torch.arange(len(c) - 1, len(c) + len(a) - 1, device=model.device)
            target = torch.tensor(a, device=model.device)
            scores.append(float(logprobs[b, where, target].sum()))
    return scores


def _pine_scores(model: Transformer, rows: list[tuple[pine.PineInput, list[int]]], batch_size: int) -> list[float]:
    scores: list[float] = []
    for at in range(0, len(rows), batch_size):
        chunk = rows[at:at + batch_size]
        inputs = [pine.PineInput(p.prefix, p.segments, p.suffix + a) for p, a in chunk]
        for (p, a), logits in zip(chunk, pine.suffix_logits(model, inputs), strict=True):
            logprobs = logits.log_softmax(-1)
            where = torch.arange(len(p.suffix) - 1, len(p.suffix) + len(a) - 1, device=logits.device)
            scores.append(float(logprobs[where, torch.tensor(a, device=logits.device)].sum()))
    return scores


def choice_scores(model: Transformer, item: ChoiceItem, order: Sequence[int] | None = None,
                  method: str = "plain", batch_size: int = 16) -> Tensor:
    """Log-likelihood [n_options] of each option's answer after the prompt with the options in `order`
    (indices into item.options; default as given), read plainly or with PINE. Indexed by option, not slot."""
    return _score_orders(model, _check_items([item])[0], [list(order or range(len(item.options)))], method,
                         batch_size)[0]


@torch.inference_mode()
def _score_orders(model: Transformer, item: ChoiceItem, orders: list[list[int]], method: str,
                  batch_size: int) -> list[Tensor]:
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    n = len(item.options)
    for order in orders:
        if sorted(order) != list(range(n)):
            raise UserError(f"order {order} is not a permutation of the {n} option indices")
    was_training = model.training
    model.eval()
    try:
        # One order's rows per batch: every order then runs in the same batch shape and row positions, so
        # identical inputs (PINE with canonically sorted segments) give identical scores even where a
        # multithreaded product would round a row differently at another batch position.
        scores = []
        for order in orders:
            if method == "plain":
                context = [*item.prefix, *(t for j in order for t in item.options[j]), *item.suffix]
                flat = _plain_scores(model, [(context, item.answer_tokens(i)) for i in range(n)], batch_size)
            else:
                segments = pine.PineInput(item.prefix, [item.options[j] for j in order], item.suffix)
                flat = _pine_scores(model, [(segments, item.answer_tokens(i)) for i in range(n)], batch_size)
            scores.append(torch.tensor(flat))
    finally:
        model.train(was_training)
    return scores


@dataclass
class PositionBias:
    """What `position_bias` measured. Orders are the cyclic rotations of each item's options, so the right
    option stands once at every position."""

    method: str
    items: int
    flip_rate: float  # share of items whose chosen option is not the same under every order
    accuracy: float  # over all (item, order) pairs
    accuracy_by_position: list[float] = field(default_factory=list)  # [p]: accuracy when the answer is at slot p
    chosen_position: list[float] = field(default_factory=list)  # [p]: how often the option at slot p is chosen

    def summary(self) -> str:
        by_pos = " ".join(f"{a:.2f}" for a in self.accuracy_by_position)
        chosen = " ".join(f"{c:.2f}" for c in self.chosen_position)
        return (f"{self.method}: {self.items} items, flip rate {self.flip_rate:.3f}, accuracy {self.accuracy:.3f}; "
                f"accuracy by answer position [{by_pos}]; chosen position [{chosen}]")


def position_bias(model: Transformer, items: Iterable[ChoiceItem], method: str = "plain",
                  batch_size: int = 16) -> PositionBias:
    """How often the chosen option changes when the options are reordered, and accuracy by the right
    option's position. Each item is read under every cyclic rotation of its options; `method` is "plain"
    (options listed in the prompt) or "pine" (options as PINE segments). Items must share one option count
    for the per-position figures (a mix gives figures for the smallest count's positions).
    """
    if method not in METHODS:
        raise UserError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    items = _check_items(items)
    slots = min(len(it.options) for it in items)
    correct_at, chosen_at = [0] * slots, [0] * slots
    seen_at = [0] * slots
    flips = total_correct = total = 0
    for it in items:
        n = len(it.options)
        orders = [[(start + k) % n for k in range(n)] for start in range(n)]
        chosen = [int(s.argmax()) for s in _score_orders(model, it, orders, method, batch_size)]
        flips += len(set(chosen)) > 1
        for order, pick in zip(orders, chosen, strict=True):
            gold_slot, pick_slot = order.index(it.answer), order.index(pick)
            total += 1
            total_correct += pick == it.answer
            if gold_slot < slots:
                seen_at[gold_slot] += 1
                correct_at[gold_slot] += pick == it.answer
            if pick_slot < slots:
                chosen_at[pick_slot] += 1
    return PositionBias(method, len(items), flips / len(items), total_correct / total,
                        [c / max(s, 1) for c, s in zip(correct_at, seen_at, strict=True)],
                        [c / total for c in chosen_at])


def max_number_task(n_items: int, n_options: int = 4, seed: int = 0, low: int = 10,
                    high: int = 99) -> list[dict[str, Any]]:
    """A synthetic task with options, for training a small model and probing position bias: "max: 37 82 15 64
    -> 82". Each item is {"prefix", "options", "suffix", "answer"} as text; `task_text` renders training lines.
    Options are distinct numbers, each with its leading space, so a plain prompt and PINE's segments match.
    """
    rng = random.Random(seed)
    items = []
    for _ in range(n_items):
        values = rng.sample(range(low, high + 1), n_options)
        items.append({"prefix": "max:", "options": [f" {v}" for v in values], "suffix": " ->",
                      "answer": values.index(max(values))})
    return items


def task_text(items: Iterable[dict[str, Any]]) -> str:
    """Training text for text items: prompt, then the right option, one item per line."""
    return "".join(f"{it['prefix']}{''.join(it['options'])}{it['suffix']}{it['options'][it['answer']]}\n"
                   for it in items)
