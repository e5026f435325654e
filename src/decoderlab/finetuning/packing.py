"""Rows of fine-tuning examples: packing, per-epoch shuffles and the batch of each step.

Several examples share a row of `context_length` slots (greedy packing in a shuffled order); each example keeps
its own document id, so the document mask keeps examples from attending to one another, and its positions restart
at 0, so a packed example computes what it would alone. An example of n tokens takes n - 1 slots (its last token is
only a target). The rows of epoch e come from a shuffle seeded by (seed, e), so the batch of a step is a pure
function of (seed, step) and a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..data import IGNORE_INDEX, Batch
from .examples import Example


@dataclass
class SFTBatch(Batch):
    """A `Batch` whose `prompt` [B, T] marks the slots of each example's prompt (the bidirectional part under
    Bitune)."""

    prompt: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SFTBatch:
        moved = super().to(device, non_blocking)
        prompt = None if self.prompt is None else self.prompt.to(device, non_blocking=non_blocking)
        return SFTBatch(moved.inputs, moved.targets, moved.doc_ids, moved.positions, prompt)


def pack(lengths: np.ndarray, order: np.ndarray, context_length: int, packed: bool = True) -> list[list[int]]:
    """Example indices per row, in `order`: each row takes examples while their slots (length - 1) fit (one
    example per row without `packed`). Examples must be at most context_length + 1 tokens long."""
    rows: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i in order.tolist():
        need = int(lengths[i]) - 1
        if current and (not packed or used + need > context_length):
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += need
    if current:
        rows.append(current)
    return rows


def build_batch(examples: list[Example], rows: list[list[int]], context_length: int, pad_id: int = 0) -> SFTBatch:
    """The [len(rows), context_length] batch of these rows (padding after the last example has no target and a
    document of its own)."""
    B, T = len(rows), context_length
    inputs = np.full((B, T), pad_id, dtype=np.int64)
    targets = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
    doc_ids = np.zeros((B, T), dtype=np.int64)
    positions = np.zeros((B, T), dtype=np.int64)
    prompt = np.zeros((B, T), dtype=bool)
    for r, row in enumerate(rows):
        at = 0
        for d, i in enumerate(row):
            ex = examples[i]
            n = len(ex) - 1
            inputs[r, at:at + n] = ex.ids[:-1]
            targets[r, at:at + n] = np.where(ex.trained[1:], ex.ids[1:], IGNORE_INDEX)
            doc_ids[r, at:at + n] = d
            positions[r, at:at + n] = np.arange(n)
            prompt[r, at:at + min(n, ex.prompt_length)] = True
            at += n
        doc_ids[r, at:] = len(row)
        positions[r, at:] = np.arange(T - at)
    return SFTBatch(torch.from_numpy(inputs), torch.from_numpy(targets), torch.from_numpy(doc_ids),
                    torch.from_numpy(positions), torch.from_numpy(prompt))


class RowPlan:
    """The stream of rows over epochs: epoch e packs the examples in a permutation drawn from (seed, e)."""

    def __init__(self, examples: list[Example], context_length: int, seed: int, packed: bool = True,
                 shuffle: bool = True) -> None:
        self.examples = examples
        self.context_length = context_length
        self.seed = seed
        self.packed = packed
        self.shuffle = shuffle
        self.lengths = np.array([len(e) for e in examples], dtype=np.int64)
        self._epochs: list[list[list[int]]] = []
        self._starts: list[int] = [0]  # first global row of each epoch

    def epoch(self, e: int) -> list[list[int]]:
        while len(self._epochs) <= e:
            k = len(self._epochs)
            n = len(self.examples)
            order = np.random.default_rng((self.seed, k)).permutation(n) if self.shuffle else np.arange(n)
            self._epochs.append(pack(self.lengths, order, self.context_length, self.packed))
            self._starts.append(self._starts[-1] + len(self._epochs[-1]))
        return self._epochs[e]

    @property
    def rows_per_epoch(self) -> int:
        return len(self.epoch(0))

    def rows(self, first: int, count: int) -> list[list[int]]:
        """Global rows first .. first + count - 1 of the stream (crossing into later epochs as needed)."""
        out: list[list[int]] = []
        e = 0
        while len(out) < count:
            rows = self.epoch(e)
            start, end = self._starts[e], self._starts[e] + len(rows)
            lo = max(first + len(out), start)
            if lo < end:
                out.extend(rows[lo - start:lo - start + count - len(out)])
            e += 1
        return out

    def batch(self, step: int, batch_size: int, pad_id: int = 0) -> SFTBatch:
        """The batch of optimiser step `step`: global rows [step * B, (step + 1) * B)."""
        return build_batch(self.examples, self.rows(step * batch_size, batch_size), self.context_length, pad_id)

    def all_rows(self) -> list[list[int]]:
        """Every example once, in file order (evaluation)."""
        return pack(self.lengths, np.arange(len(self.examples)), self.context_length, self.packed)
