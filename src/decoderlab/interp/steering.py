"""Steering vectors: the mean difference of a layer's activations between two prompt sets (activation addition,
Turner et al. 2023; as "contrastive activation addition"), added with a scale at every position while the model
runs, `generate` included (hooks fire on the prompt's pass and on each new token's).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ..errors import UserError
from ..model import Transformer
from ..tokenizer import Tokenizer
from .cache import act_name, run_with_cache
from .hooks import HookPoint, hooks, select

SITES = ("resid_pre", "resid_mid", "resid_post")
REDUCE = ("mean", "last")


def _site(model: Transformer, layer: int, site: str) -> str:
    if site not in SITES:
        raise UserError(f"steering site must be one of {', '.join(SITES)}, got {site!r}")
    if not -model.config.n_layers <= layer < model.config.n_layers:
        raise UserError(f"layer {layer} is out of range; the model has blocks 0..{model.config.n_layers - 1}")
    return select(model, act_name(site, layer % model.config.n_layers))[0]


def _encode(tokenizer: Tokenizer | None, prompts: Sequence[str] | Sequence[Sequence[int]], which: str) -> list:
    if isinstance(prompts, str) or not prompts:
        raise UserError(f"prompts_{which} must be a non-empty list of prompts (texts or token-id lists)")
    out = []
    for p in prompts:
        if isinstance(p, str):
            if tokenizer is None:
                raise UserError("text prompts need a tokenizer; pass one or give token-id lists")
            p = tokenizer.encode(p)
        if len(p) == 0:
            raise UserError(f"prompts_{which} holds an empty prompt; every prompt needs at least one token")
        out.append(list(p))
    return out


def mean_activation(model: Transformer, prompts: Sequence[Sequence[int]], layer: int, *, site: str = "resid_pre",
                    reduce: str = "mean", batch: int = 32) -> torch.Tensor:
    """The activation at `site` of block `layer`, averaged over the prompts (token-id lists) and over each
    prompt's tokens (`reduce="mean"`) or taken at its last token (`"last"`): [d_model], fp32."""
    if reduce not in REDUCE:
        raise UserError(f"reduce must be one of {', '.join(REDUCE)}, got {reduce!r}")
    name = _site(model, layer, site)
    total = torch.zeros(model.config.d_model, dtype=torch.float32, device=model.device)
    for start in range(0, len(prompts), batch):
        rows = prompts[start:start + batch]
        T = max(len(r) for r in rows)
        # Right padding: under the causal mask the padded tail cannot change the real tokens' activations.
        ids = torch.zeros(len(rows), T, dtype=torch.long, device=model.device)
        valid = torch.zeros(len(rows), T, dtype=torch.bool, device=model.device)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r)
            valid[i, :len(r)] = True
        _, cache = run_with_cache(model, ids, name)
        x = cache[name].float()  # [b, T, d]
        if reduce == "mean":
            total += ((x * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)).sum(0)
        else:
            total += x[torch.arange(len(rows)), valid.sum(1) - 1].sum(0)
    return total / len(prompts)


def steering_vector(model: Transformer, tokenizer: Tokenizer | None, prompts_a: Sequence[str] | Sequence[Sequence[int]],
                    prompts_b: Sequence[str] | Sequence[Sequence[int]], layer: int, *, site: str = "resid_pre",
                    reduce: str = "mean") -> torch.Tensor:
    """mean(activations of prompts_a) - mean(activations of prompts_b) at `site` ("resid_pre", "resid_mid",
    "resid_post") of block `layer`, over each prompt's tokens (`reduce="mean"`) or its last token (`"last"`):
    [d_model], fp32. Adding it moves the model from style b towards style a. Prompts are texts (encoded with
    `tokenizer`) or token-id lists."""
    a = mean_activation(model, _encode(tokenizer, prompts_a, "a"), layer, site=site, reduce=reduce)
    b = mean_activation(model, _encode(tokenizer, prompts_b, "b"), layer, site=site, reduce=reduce)
    return a - b


@contextmanager
def steer(model: Transformer, vector: torch.Tensor, layer: int, scale: float = 1.0, *,
          site: str = "resid_pre") -> Iterator[None]:
    """Inside the block every forward pass of `model` (each `generate` step too) adds `scale * vector` to
    `site` of block `layer` at every position."""
    name = _site(model, layer, site)
    vector = torch.as_tensor(vector)
    if vector.shape != (model.config.d_model,):
        raise UserError(f"the steering vector must be [d_model] = [{model.config.d_model}], got {tuple(vector.shape)}")
    if not torch.isfinite(vector).all():
        raise UserError("the steering vector holds NaN or infinite values")
    shift = (float(scale) * vector.float()).to(model.device)

    def add(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        return x + shift.to(x.dtype)

    with hooks(model, {name: add}):
        yield
