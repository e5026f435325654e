"""Optimizers and learning-rate schedules: AdamW, and Muon for the hidden weight matrices.

Muon (Keller Jordan, 2024) orthogonalises each matrix's momentum with a Newton-Schulz iteration
before the step; embeddings, the LM head, norms and biases stay on AdamW.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..accel import fast_bf16


def newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """An approximately orthogonal matrix with G's singular vectors (batched over leading dims).

    The quintic's coefficients trade exactness for speed: singular values land in roughly [0.7, 1.2],
    which is what Muon needs. Runs in bf16 where the device multiplies in it natively (GPUs, AVX-512 CPUs),
    else in fp32 (on an AVX2-only CPU bf16 products are ~60x slower: `decoderlab.accel.precision`).
    """
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.bfloat16() if fast_bf16(G.device.type) else G.float()
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    shape = X.shape
    X = X.reshape(-1, *shape[-2:])  # baddbmm takes one batch dimension: any leading dims fold into it
    for _ in range(steps):
        A = X @ X.mT
        # b*A + c*A@A and a*X + B@X as one fused multiply-add each: the separate scalings and sums cost as
        # much as the products on a small model's matrices (measured: the iteration runs ~2x faster on CPU).
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, B, X, beta=a)
    X = X.reshape(shape)
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Momentum, orthogonalised: for 2-D hidden weights only.

    `splits` maps a parameter to the row sizes of the matrices fused in it (e.g. Q, K, V in one
    projection), so each is orthogonalised on its own as if it were a separate weight.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5, weight_decay: float = 0.0,
                 splits: dict[nn.Parameter, list[int]] | None = None) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov, ns_steps=ns_steps,
                                      weight_decay=weight_decay))
        self.splits = splits or {}

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
            params, pieces = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mom)
                g = p.grad.lerp(buf, mom) if group["nesterov"] else buf
                params.append(p)
                pieces.append(list(g.split(self.splits[p])) if p in self.splits else [g])
            # Orthogonalise all matrices of one shape in one batched iteration: on small models the
            # per-call overhead, not the arithmetic, dominates.
            # A tall matrix is orthogonalised as its transpose, so it joins the wide ones of its shape.
            by_shape: dict[tuple[int, int], list[torch.Tensor]] = {}
            for parts in pieces:
                for part in parts:
                    by_shape.setdefault(_wide(part.shape), []).append(part.mT if _tall(part) else part)
            done = {shape: iter(newton_schulz(torch.stack(mats), group["ns_steps"]).unbind(0))
                    for shape, mats in by_shape.items()}
            for p, parts in zip(params, pieces, strict=True):
                # Scale so the update's RMS does not depend on the matrix's aspect ratio.
                update = torch.cat([_untransposed(next(done[_wide(part.shape)]), part)
                                    * max(1.0, part.size(0) / part.size(1)) ** 0.5 for part in parts])
                if wd:
                    p.mul_(1 - lr * wd)
                p.add_(update.to(p.dtype), alpha=-lr)


def _tall(m: torch.Tensor) -> bool:
    return m.size(0) > m.size(1)


def _wide(shape: torch.Size) -> tuple[int, int]:
    return (min(shape), max(shape))


def _untransposed(update: torch.Tensor, part: torch.Tensor) -> torch.Tensor:
    return update.mT if _tall(part) else update


def muon_splits(model: nn.Module) -> dict[nn.Parameter, list[int]]:
    """Row splits of the fused matrices of a decoderlab `Transformer` (QKV, gate/up)."""
    from ..hf import split_sizes

    out = {}
    for name, p in model.named_parameters():
        sizes = split_sizes(model.config, name) if name.endswith(".weight") else None
        if sizes:
            out[p] = sizes
    return out


def build_optimizers(model: nn.Module, cfg, device: torch.device) -> list[torch.optim.Optimizer]:
    """AdamW for embeddings, head, norms and biases; Muon for hidden matrices (unless cfg.optimizer is adamw).

    `cfg` is a `TrainConfig`. Each group remembers its `initial_lr` for the schedule.
    """
    hidden, other, seen = [], [], set()
    for name, p in model.named_parameters():
        if id(p) in seen or not p.requires_grad:  # tied weights appear twice; frozen ones (LoRA's base) not at all
            continue
        seen.add(id(p))
        is_matrix = p.dim() == 2 and not name.startswith(("embed.", "pos_embed.", "lm_head."))
        (hidden if is_matrix and cfg.optimizer == "muon" else other).append(p)
    fused = {"fused": True} if device.type in ("cpu", "cuda") and not cfg.fsdp else {}
    muon = cfg.optimizer == "muon"
    # The token embedding and the LM head get their own learning rates where the config gives them (a training
    # run of the recipe: `TrainConfig.embed_lr`, `head_lr`); a tied matrix, fine-tuning and runs from before
    # these fields keep `lr` (and the optimizer's original groups, so their snapshots still load).
    rates = {"embed.": getattr(cfg, "embed_lr", None), "lm_head.": getattr(cfg, "head_lr", None)}
    tied = getattr(getattr(model, "config", None), "tie_embeddings", False)
    own: dict[str, list[nn.Parameter]] = {k: [] for k, lr in rates.items() if lr and lr != cfg.lr and not tied}
    names = {id(p): name for name, p in model.named_parameters()}
    for p in other:
        prefix = next((k for k in own if names[id(p)].startswith(k)), None)
        if prefix is not None:
            own[prefix].append(p)
    mine = {id(p) for ps in own.values() for p in ps}
    other = [p for p in other if id(p) not in mine]
    # Weight decay on matrices only (as nanoGPT): decaying norm gains and biases only hurts.
    decay = 0.0 if muon else cfg.weight_decay
    groups = [{"params": [p for p in other if p.dim() >= 2], "weight_decay": decay},
              {"params": [p for p in other if p.dim() < 2], "weight_decay": 0.0}]
    groups += [{"params": ps, "weight_decay": decay, "lr": rates[prefix]} for prefix, ps in own.items()]
    groups = [g for g in groups if g["params"]]
    opts: list[torch.optim.Optimizer] = [torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas,
                                                           eps=1e-10 if muon else 1e-8, **fused)]
    if hidden:
        opts.append(Muon(hidden, lr=cfg.muon_lr, weight_decay=cfg.weight_decay, splits=muon_splits(model)))
    for opt in opts:
        for group in opt.param_groups:
            group["initial_lr"] = group["lr"]
    return opts


def lr_factor(progress: float, warmup: float, schedule: str, decay: float = 0.4, floor: float = 0.0,
              start: float = 0.0) -> float:
    """Learning-rate multiplier at `progress` in [0, 1] of the run (or of one segment of it).

    `warmup` is a fraction of the run, ramping linearly from `start` (0 for a fresh run) to 1. "cosine" decays
    to `floor` over the rest; "wsd" (warmup-stable-decay) holds the peak and decays linearly to `floor` over the
    last `decay` fraction.
    """
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return start + (1 - start) * progress / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        t = (progress - warmup) / max(1e-9, 1 - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    start = 1 - decay
    if progress < start:
        return 1.0
    return floor + (1 - floor) * (1 - (progress - start) / max(1e-9, decay))
