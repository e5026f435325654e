"""Adapting a causal model to masked diffusion (DiffuLLaMA / DiffuCoder): the noise, attention and loss of one
`finetune --objective diffusion` step on packed examples.

The model keeps its causal head's alignment: slot i's logits predict the token at slot i + 1 (`shift_logits`). In
the packed layout (see `packing`) slot j holds an example's token k and its target is token k + 1, so masking token
k + 1 means: its slot's input (slot j + 1, when it is in the same example) becomes the mask token, and slot j is
trained to predict it. Only the tokens the examples train are ever masked (completions, assistant turns; every
token but the first of a text record); prompts stay visible. The last token of an example (its end-of-text) is
maskable too: it is a target, never an input.

LLaDA's loss: per row t ~ U(0, 1), each trainable token masked with p = (1 - eps) t + eps, loss = sum over the
masked tokens of CE / p over the trainable tokens (`masked.masked_loss`). The attention anneals from causal to full
within each example over `anneal_steps` optimiser steps (`masked.annealed_attention`, progress = step /
anneal_steps). Every draw comes from (seed, step) for the whole batch, rows selected afterwards: a resumed run and
any micro-batching see the same noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import masks
from ..config import ModelConfig
from ..data import IGNORE_INDEX
from ..errors import UserError
from ..masked import DIFFUSION_EPS, Noised, annealed_attention, diffusion_noise

_STREAM = 0xD1FF  # keeps these draws apart from the run's other (seed, ...) streams


def anneal_progress(step: int, anneal_steps: int) -> float:
    """How far optimiser step `step` (0-based) is from causal (0) to full attention (1)."""
    return min(1.0, step / anneal_steps)


def check_base(config: ModelConfig, folder: str) -> None:
    """Refuse a base model that cannot be adapted: an MLM, or a diffusion model predicting its own slot."""
    if config.objective == "mlm":
        raise UserError(f"{folder} is a masked-LM model; --objective diffusion adapts a causal model (or continues "
                        "an adapted one)")
    if config.objective == "diffusion" and not config.shift_logits:
        raise UserError(f"{folder} is a diffusion model whose slot i predicts token i (shift_logits=False); adapting "
                        "shifts logits so slot i predicts token i + 1: start from a causal model, or keep training "
                        "that one with decoderlab train --objective diffusion")


def generator(seed: int, step: int, part: int) -> torch.Generator:
    """A torch generator for draw `part` of step `step` of a run seeded `seed`."""
    state = int(np.random.default_rng((seed, step, _STREAM, part)).integers(2**62))
    return torch.Generator().manual_seed(state)


@dataclass
class PackedNoise(Noised):
    """A noised packed batch (`noise_examples`); `row_counts` [B] are each row's trainable tokens."""

    row_counts: torch.Tensor | None = None

    def rows(self, rows) -> Noised:
        """Some rows, normalised by their own trainable tokens (a micro-batch's loss)."""
        return Noised(self.inputs[rows], self.targets[rows], self.weights[rows], self.row_counts[rows].sum())


def noise_examples(inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor, mask_id: int,
                   gen: torch.Generator, t: torch.Tensor | None = None, eps: float = DIFFUSION_EPS) -> PackedNoise:
    """Masked diffusion's forward process on a packed batch [B, T] (module doc): `targets[j]` is masked with
    probability p of its row (t per row from `gen`, or the given `t` [B]), and then also stands as the mask token
    in slot j + 1's input when that slot is the same example's. The result's `targets` / `weights` are per slot
    (slot j predicts them): use it with `shift=False` in `masked.masked_loss` / `scored_slots`."""
    trainable = targets != IGNORE_INDEX
    # The slot-aligned tokens (targets) go through LLaDA's forward process; -100 slots are never maskable.
    noised = diffusion_noise(targets.clamp(min=0), mask_id, gen, maskable=trainable, t=t, eps=eps)
    hidden = torch.zeros_like(trainable)
    hidden[:, 1:] = noised.trained[:, :-1] & (doc_ids[:, 1:] == doc_ids[:, :-1])
    return PackedNoise(inputs.masked_fill(hidden, mask_id), noised.targets, noised.weights, noised.count,
                       trainable.sum(1))


def step_noise(inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor, mask_id: int, seed: int,
               step: int) -> PackedNoise:
    """The noise of optimiser step `step` for the whole batch (drawn from (seed, step) alone)."""
    return noise_examples(inputs, targets, doc_ids, mask_id, generator(seed, step, 0))


def attention(doc_ids: torch.Tensor, progress: float, seed: int, step: int, part: int = 1
              ) -> masks.Mask | torch.Tensor:
    """The step's attention over a packed batch: causal & document at progress 0 and document alone at 1 (as masks,
    the fast paths), in between the annealed boolean mask [B, 1, T, T] drawn from (seed, step, part)."""
    if progress <= 0:
        return masks.causal() & masks.document(doc_ids)
    if progress >= 1:
        return masks.document(doc_ids)
    return annealed_attention(progress, doc_ids, generator(seed, step, part))
