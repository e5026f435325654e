"""Fine-tuning losses over the trained tokens: next-token, distillation (KL, TAID), DPO, and BICO's masked-LM steps.

Every loss takes logits [..., V] and targets [...] (-100 where nothing is trained: [B, T] rows, or the [N] trained
positions alone when the model computed logits only there) and averages over the trained tokens; a batch without
any trained token has loss 0 (not NaN), so an all-prompt micro-batch is harmless.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..data import IGNORE_INDEX


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the trained tokens."""
    total = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                            ignore_index=IGNORE_INDEX, reduction="sum")
    return total / (targets != IGNORE_INDEX).sum().clamp(min=1)


def kl_to_teacher(logits: torch.Tensor, teacher_logits: torch.Tensor, targets: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """Forward KL(teacher || student) at temperature T, times T² (Hinton et al.: keeps the gradient's scale as T
    changes), averaged over the trained tokens. `teacher_logits` may be any target logits (TAID's interpolation)."""
    keep = targets != IGNORE_INDEX
    s = logits[keep].float() / temperature
    t = teacher_logits[keep].float() / temperature
    kl = F.kl_div(F.log_softmax(s, dim=-1), F.log_softmax(t, dim=-1), log_target=True, reduction="sum")
    return kl * temperature**2 / keep.sum().clamp(min=1)


@dataclass
class TAIDState:
    """TAID's interpolation coefficient t and its adaptive schedule (Shing et al., "TAID: Temporally Adaptive
    Interpolated Distillation", ICLR 2025; the update follows the authors' implementation).

    The target is softmax((1 - t) * student_logits.detach() + t * teacher_logits): it starts near the student and
    moves toward the teacher. After each step, t grows by alpha * sigmoid(m) * (1 - t), where m is a momentum
    (beta) of the loss's relative improvement, and never falls behind the linear ramp from t_start to t_end."""

    t_start: float = 0.4
    t_end: float = 1.0
    alpha: float = 5e-4
    beta: float = 0.99
    t: float = 0.4
    momentum: float = 0.0
    previous_loss: float | None = None

    def target(self, logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        return (1 - self.t) * logits.detach().float() + self.t * teacher_logits.float()

    def update(self, loss: float, progress: float) -> None:
        """After an optimiser step, with that step's loss and the run's progress in [0, 1]."""
        if self.previous_loss is not None and math.isfinite(loss):
            change = (self.previous_loss - loss) / (self.previous_loss + 1e-15)
            self.momentum = self.beta * self.momentum + (1 - self.beta) * change
            ramp = self.t_start + (self.t_end - self.t_start) * min(1.0, max(0.0, progress))
            grown = self.t + self.alpha * (1 / (1 + math.exp(-self.momentum))) * (1 - self.t)
            self.t = min(self.t_end, max(ramp, grown))
        self.previous_loss = loss

    def to_dict(self) -> dict[str, float | None]:
        return dict(t_start=self.t_start, t_end=self.t_end, alpha=self.alpha, beta=self.beta, t=self.t,
                    momentum=self.momentum, previous_loss=self.previous_loss)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor | None = None,
                      n_rows: int | None = None) -> torch.Tensor:
    """[B] sums of log p(target) over each row's trained tokens: from logits [B, T, V] and targets [B, T], or from
    the trained positions' logits [N, V] and targets [N] with their `rows` [N] (of `n_rows`)."""
    keep = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1) * keep
    if rows is None:
        return picked.sum(-1)
    return torch.zeros(n_rows, dtype=picked.dtype, device=picked.device).index_add_(0, rows, picked)


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO (Rafailov et al., 2023): mean of -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) over pairs, from
    the sequence log-probabilities; also the fraction of pairs whose implicit reward prefers the chosen answer."""
    margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean()


MASK_TOKEN = "<mask>"
"""The special token BICO's masked-LM steps put in place of the masked tokens (the tokenizer must have it)."""

BICO_MASK_RATE = 0.15
_BICO_STREAM = 0xB1C0  # keeps BICO's draws apart from the other (seed, ...) streams of a run


@dataclass
class MaskedLMBatch:
    """One BICO masked-LM step's batch: `inputs` [B, T] with the chosen tokens replaced by the mask token, `masked`
    [B, T] bool (the positions trained) and `targets` [B, T] (the original token where masked, else -100)."""

    inputs: torch.Tensor
    masked: torch.Tensor
    targets: torch.Tensor


def bico_masked_lm(step: int, seed: int) -> bool:
    """Whether BICO step `step` of a run seeded `seed` is a masked-LM step (else a next-token step): a fair coin
    drawn from (seed, step) alone, so a resumed run makes the same choices (BICO: 50/50 per batch)."""
    return bool(np.random.default_rng((seed, step, _BICO_STREAM)).random() < 0.5)


def bico_mask(inputs: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor, step: int, seed: int,
              mask_id: int, rate: float = BICO_MASK_RATE) -> MaskedLMBatch:
    """Mask `rate` of a whole batch's maskable tokens for a masked-LM step (drawn from (seed, step): the same at
    resume and whatever the micro-batching; select rows afterwards).

    A token is maskable when it is one the next-token objective trains (the target of the slot before it, in
    the same example): for {"text"} records every token but the first, for prompt/completion records the
    completion only, never a prompt token or padding. The masked token is predicted at its own position.
    """
    B, T = inputs.shape
    maskable = torch.zeros(B, T, dtype=torch.bool)
    maskable[:, 1:] = (targets[:, :-1] != IGNORE_INDEX) & (doc_ids[:, :-1] == doc_ids[:, 1:])
    draw = np.random.default_rng((seed, step, _BICO_STREAM, 1)).random((B, T)) < rate
    masked = maskable & torch.from_numpy(draw)
    return MaskedLMBatch(inputs.masked_fill(masked, mask_id), masked, inputs.masked_fill(~masked, IGNORE_INDEX))
