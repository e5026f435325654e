"""Up-front memory check: refuse a training setting that cannot fit, with a one-line estimate, before allocating.

The estimate is a deliberate LOWER bound (it counts only what training certainly holds), so a refusal is always
right and a setting that fits is never refused; settings just under the line may still run out of memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..accel import available_memory
from ..config import ModelConfig
from ..errors import UserError
from .config import TrainConfig

# Bytes per token held by the batch tensors every rank builds for the whole global batch in `get_batch`: int64
# inputs, targets, document ids and positions (the window index array and temporaries come on top).
BATCH_BYTES_PER_TOKEN = 4 * 8


@dataclass
class MemoryEstimate:
    """Lower bounds, in bytes, of what one training process holds."""

    state: int  # weights + gradients + optimizer state
    activations: int  # what one micro-batch's backward pass needs kept
    batch: int  # the global batch's tensors (host memory)
    rows: int  # rows per micro-batch on this rank
    context: int

    @property
    def total(self) -> int:
        return self.state + self.activations + self.batch


def estimate_memory(cfg: TrainConfig, model: ModelConfig, world_size: int = 1) -> MemoryEstimate:
    """A lower bound of the memory training `model` with `cfg` needs in each process.

    state       = 12 B x parameters: fp32 weights (4) + fp32 gradients (4) + at least one fp32 optimizer
                  state per parameter (Muon keeps 1, AdamW 2); divided by the ranks under FSDP.
    activations = rows x T x (L x (6 d + 2 d_mlp) x a + 8 V), with rows = batch / ranks / grad_accum and
                  a = 2 bytes (bf16 autocast) or 4 (fp32): each layer keeps at least its input, normed input,
                  q, k, v and attention output (6 d values per token) and the MLP's hidden pre- and post-
                  activation (2 d_mlp); the logits and their gradient are fp32 (8 V bytes per token).
                  Attention scores (T^2 per head, unless a fused kernel avoids them) are left out.
    batch       = 32 B x batch x T (`BATCH_BYTES_PER_TOKEN`).
    """
    params = model.num_params()
    state = 12 * params // (world_size if cfg.fsdp else 1)
    rows = max(1, cfg.batch_size // world_size // cfg.grad_accum)
    T = model.context_length
    per_value = 2 if cfg.dtype == "bf16" else 4
    per_token = model.n_layers * (6 * model.d_model + 2 * model.mlp_width) * per_value + 8 * model.vocab_size
    return MemoryEstimate(state=state, activations=rows * T * per_token,
                          batch=cfg.batch_size * T * BATCH_BYTES_PER_TOKEN, rows=rows, context=T)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" or n >= 100 else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def check_memory(cfg: TrainConfig, model: ModelConfig, device: torch.device, world_size: int = 1,
                 host_available: int | None = None, device_available: int | None = None) -> MemoryEstimate:
    """Raise a one-line UserError when the lower-bound estimate exceeds the memory available; else the estimate.

    Host memory is Linux's MemAvailable; on a GPU its free memory (torch.cuda.mem_get_info) bounds the model.
    Where the available memory is unknown nothing is refused.
    """
    est = estimate_memory(cfg, model, world_size)
    if host_available is None:
        host_available = available_memory()
    on_gpu = device.type == "cuda"
    if on_gpu and device_available is None:
        try:
            device_available = torch.cuda.mem_get_info(device)[0]
        except (RuntimeError, AssertionError):
            device_available = None
    checks = [("this machine", host_available, est.batch + (0 if on_gpu else est.state + est.activations))]
    if on_gpu:
        checks.append((f"{device}", device_available, est.state + est.activations))
    for where, available, needed in checks:
        if available is None or needed <= available:
            continue
        setting = f"--batch-size {cfg.batch_size:,} with --context {est.context:,}"
        if cfg.grad_accum > 1:
            setting += f" and --grad-accum {cfg.grad_accum}"
        parts = {"activations": est.activations, "batch tensors": est.batch, "weights and optimizer state": est.state}
        if on_gpu and where != "this machine":
            parts.pop("batch tensors")
        elif on_gpu:
            parts = {"batch tensors": est.batch}
        biggest = max(parts, key=parts.get)
        detail = ", ".join(f"{name} {_size(n)}" for name, n in parts.items())
        fix = {"activations": "lower --batch-size or --context, or raise --grad-accum",
               "batch tensors": "lower --batch-size or --context",
               "weights and optimizer state": "choose a smaller model"}[biggest]
        raise UserError(f"{setting} needs at least {_size(needed)} ({detail}); {where} has {_size(available)} "
                        f"available; {fix}")
    return est
