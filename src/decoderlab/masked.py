"""Masked objectives on the same backbone: masked diffusion (LLaDA) and BERT-style masked-LM noising, their
losses, the diffusion bound on NLL, and the causal-to-full attention annealing that adapts a causal model.

A noised batch keeps the original token at every trained slot (`targets`, -100 elsewhere) and a loss weight per
slot; with `shift` (a model adapted from a causal one) slot i's logits predict the token at slot i + 1, so the
first slot is never trained. See PAPERS.md, "Masked diffusion language models".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# LLaDA's floor on the masking probability: t ~ U(0, 1) gives p = (1 - eps) t + eps, never 0 (the loss divides by p).
DIFFUSION_EPS = 1e-3
# BERT: 15 % of the tokens are chosen; of those 80 % become the mask token, 10 % a random token, 10 % stay.
MLM_RATE = 0.15
MLM_RANDOM = 0.1
MLM_KEEP = 0.1


@dataclass
class Noised:
    """A batch after noising: `inputs` [B, T] (chosen slots replaced), `targets` [B, T] (the original token at
    every trained slot, else -100), `weights` [B, T] (each trained slot's loss weight, 0 elsewhere) and `count`
    (the normaliser: the tokens that could have been masked)."""

    inputs: torch.Tensor
    targets: torch.Tensor
    weights: torch.Tensor
    count: torch.Tensor

    @property
    def trained(self) -> torch.Tensor:
        return self.targets != IGNORE_INDEX


def _maskable(tokens: torch.Tensor, maskable: torch.Tensor | None, shift: bool) -> torch.Tensor:
    out = torch.ones_like(tokens, dtype=torch.bool) if maskable is None else maskable.to(torch.bool).clone()
    if shift:
        out[:, 0] = False  # nothing before it predicts slot 0
    return out


def diffusion_noise(tokens: torch.Tensor, mask_id: int, generator: torch.Generator | None = None, *,
                    maskable: torch.Tensor | None = None, t: torch.Tensor | None = None, shift: bool = False,
                    eps: float = DIFFUSION_EPS) -> Noised:
    """Masked diffusion's forward process: per row t ~ U(0, 1) (or the given `t` [B]), every maskable token is
    replaced by `mask_id` with probability p = (1 - eps) t + eps and weighted 1 / p in the loss."""
    B, T = tokens.shape
    device = tokens.device
    allowed = _maskable(tokens, maskable, shift)
    if t is None:
        t = torch.rand(B, generator=generator).to(device)
    p = ((1 - eps) * t.to(device, torch.float32) + eps).unsqueeze(1).expand(B, T)
    draw = torch.rand(B, T, generator=generator).to(device)
    masked = allowed & (draw < p)
    return Noised(tokens.masked_fill(masked, mask_id), tokens.masked_fill(~masked, IGNORE_INDEX),
                  torch.where(masked, 1.0 / p, torch.zeros_like(p)), allowed.sum())


def mlm_noise(tokens: torch.Tensor, mask_id: int, vocab_size: int, generator: torch.Generator | None = None, *,
              maskable: torch.Tensor | None = None, rate: float = MLM_RATE, shift: bool = False) -> Noised:
    """BERT's masking: `rate` of the maskable tokens are chosen and trained (weight 1, mean over them); of those
    80 % are replaced by `mask_id`, 10 % by a random token, 10 % left as they are."""
    B, T = tokens.shape
    device = tokens.device
    allowed = _maskable(tokens, maskable, shift)
    chosen = allowed & (torch.rand(B, T, generator=generator).to(device) < rate)
    kind = torch.rand(B, T, generator=generator).to(device)
    randoms = torch.randint(0, vocab_size, (B, T), generator=generator).to(device)
    inputs = torch.where(chosen & (kind < 1 - MLM_RANDOM - MLM_KEEP), torch.full_like(tokens, mask_id), tokens)
    inputs = torch.where(chosen & (kind >= 1 - MLM_RANDOM - MLM_KEEP) & (kind < 1 - MLM_KEEP), randoms, inputs)
    return Noised(inputs, tokens.masked_fill(~chosen, IGNORE_INDEX), chosen.float(), chosen.sum())


def scored_slots(noised: Noised, shift: bool) -> torch.Tensor:
    """The slots [B, T] whose logits the loss needs (pass as the model's `logits_to_keep`)."""
    trained = noised.trained
    if not shift:
        return trained
    out = torch.zeros_like(trained)
    out[:, :-1] = trained[:, 1:]
    return out


def masked_loss(logits: torch.Tensor, noised: Noised, shift: bool) -> torch.Tensor:
    """Sum over trained slots of weight x cross-entropy, divided by `noised.count`.

    `logits` are either [B, T, V] or [N, V] at `scored_slots(noised, shift)` (row-major, as the model returns
    them for a boolean `logits_to_keep`). Diffusion: the 1/p-weighted sum over masked tokens per maskable token
    (LLaDA); MLM: the mean over chosen tokens."""
    trained = noised.trained
    if shift:
        targets, weights = noised.targets[:, 1:], noised.weights[:, 1:]
        trained = trained[:, 1:]
        if logits.dim() == 3:
            logits = logits[:, :-1]
    else:
        targets, weights = noised.targets, noised.weights
    if logits.dim() == 3:
        logits = logits[trained]
    ce = F.cross_entropy(logits.float(), targets[trained], reduction="none")
    return (ce * weights[trained]).sum() / noised.count.clamp(min=1)


def annealed_attention(progress: float, doc_ids: torch.Tensor, generator: torch.Generator | None = None
                       ) -> torch.Tensor:
    """DiffuLLaMA's attention annealing as a boolean mask [B, 1, T, T]: the causal mask plus each future slot of
    the same document with probability `progress` (0: causal, 1: full bidirectional within documents)."""
    B, T = doc_ids.shape
    device = doc_ids.device
    q = torch.arange(T, device=device)
    causal = (q.unsqueeze(0) <= q.unsqueeze(1)).expand(B, T, T)
    same_doc = doc_ids.unsqueeze(2) == doc_ids.unsqueeze(1)
    if progress >= 1:
        allowed = same_doc
    elif progress <= 0:
        allowed = causal & same_doc
    else:
        opened = torch.rand(B, T, T, generator=generator).to(device) < progress
        allowed = (causal | opened) & same_doc
    return allowed.unsqueeze(1)


@torch.no_grad()
def diffusion_nll(model, tokens: torch.Tensor, mask_id: int, *, samples: int = 8, seed: int = 0,
                  shift: bool = False, mask=None, positions: torch.Tensor | None = None,
                  maskable: torch.Tensor | None = None) -> torch.Tensor:
    """Monte Carlo estimate of masked diffusion's bound on the NLL, summed per row [B] in nats:
    -log p(x) <= E_t [ (1 / t) sum over masked tokens of -log p(token | noised x) ], with stratified t over
    `samples` draws (fixed `seed`: the same noise for every model compared). Divide by the maskable tokens for
    nats per token."""
    B, T = tokens.shape
    gen = torch.Generator().manual_seed(seed)
    total = torch.zeros(B, dtype=torch.float64, device=tokens.device)
    offsets = torch.rand(B, generator=gen)
    for s in range(samples):
        t = ((s + offsets) / samples).clamp(min=1e-4)  # stratified: one t per stratum, lower variance
        noised = diffusion_noise(tokens, mask_id, gen, maskable=maskable, t=t, shift=shift, eps=0.0)
        logits = model(noised.inputs, positions=positions, mask=mask)
        if shift:
            logits, targets, trained = logits[:, :-1], noised.targets[:, 1:], noised.trained[:, 1:]
        else:
            targets, trained = noised.targets, noised.trained
        ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1).clamp(min=0),
                             reduction="none")
        ce = (ce.view(B, -1) * trained).sum(1)
        total += (ce / t.to(tokens.device)).double()
    return total / samples
