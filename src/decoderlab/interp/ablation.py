"""Ablations: knock out an activation (any hook point, any index) by zeroing it, replacing it by its mean over a
reference batch, or by its value on other inputs (resample ablation), and see what the output does without it.

`index` picks cells after the batch dimension, as in `interp.patching` (None: the whole tensor; an int: a
position, or a head for patterns; a tuple such as `(slice(None), head)` for one head of `hook_z`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ..errors import UserError
from ..model import Transformer
from .cache import run_with_cache
from .hooks import HookFn, HookPoint, hooks, select
from .patching import Index, Site, index_key, site_name

HOW = ("zero", "mean", "resample")


def ablation_hooks(model: Transformer, site: Site | Sequence[Site], how: str = "zero", *, index: Index = None,
                   reference: torch.Tensor | None = None, over_positions: bool = False, seed: int = 0,
                   **forward_kwargs) -> list[tuple[str, HookFn]]:
    """The hooks that ablate `site` (one or a list) at `index`, for `interp.hooks` / `run_with_hooks`.

    how: "zero"; "mean" (the mean over the rows of `reference` ids, per position, or over positions too with
    `over_positions=True`); "resample" (row i takes the value of a reference row drawn with `seed`, per forward
    pass; the reference must have the target's length unless `over_positions`, which draws a position too).
    `forward_kwargs` (positions, mask) go to the reference run."""
    if how not in HOW:
        raise UserError(f"unknown ablation {how!r}; use one of {', '.join(HOW)}")
    names = select(model, [site_name(s) for s in ([site] if isinstance(site, str | tuple) else site)])
    key = index_key(index)
    if how == "zero":
        def zero(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            x = x.clone()
            x[key] = 0
            return x
        return [(name, zero) for name in names]
    if reference is None or reference.dim() != 2:
        raise UserError(f"a {how} ablation needs reference= input ids [batch, time] to take values from")
    _, cache = run_with_cache(model, reference, names, **forward_kwargs)
    if how == "mean":
        means = {}
        for name in names:
            v = cache[name].float().mean(0, keepdim=True)  # [1, ...]
            if over_positions:
                v = v.mean(_pos_dim(name), keepdim=True)
            means[name] = v

        def mean(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
            if means[hook.name].shape[1:] != x.shape[1:] and not over_positions:
                raise UserError(f"mean ablation at {hook.name}: the reference's mean is "
                                f"{tuple(means[hook.name].shape[1:])} per row but the run has {tuple(x.shape[1:])}; "
                                "use reference inputs of the same length or over_positions=True")
            x = x.clone()
            x[key] = means[hook.name].to(x.device, x.dtype).expand_as(x)[key]
            return x
        return [(name, mean) for name in names]

    generator = torch.Generator().manual_seed(seed)

    def resample(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        ref = cache[hook.name]
        dim = _pos_dim(hook.name)
        rows = torch.randint(0, ref.shape[0], (x.shape[0],), generator=generator)
        picked = ref[rows]
        if over_positions:
            cols = torch.randint(0, ref.shape[dim], (x.shape[dim],), generator=generator)
            picked = picked.index_select(dim, cols)
        elif picked.shape != x.shape:
            raise UserError(f"resample ablation at {hook.name}: the reference gives {tuple(ref.shape[1:])} per row "
                            f"but the run has {tuple(x.shape[1:])}; use reference inputs of the same length or "
                            "over_positions=True")
        x = x.clone()
        x[key] = picked.to(x.device, x.dtype)[key]
        return x
    return [(name, resample) for name in names]


def _pos_dim(name: str) -> int:
    return 2 if name.endswith(("hook_attn_scores", "hook_pattern")) else 1


@contextmanager
def ablated(model: Transformer, site: Site | Sequence[Site], how: str = "zero", **kwargs) -> Iterator[None]:
    """Every forward pass inside the block runs with `site` ablated (see `ablation_hooks` for the arguments)."""
    with hooks(model, ablation_hooks(model, site, how, **kwargs)):
        yield


def ablate(model: Transformer, input_ids: torch.Tensor, site: Site | Sequence[Site], how: str = "zero", *,
           index: Index = None, reference: torch.Tensor | None = None, over_positions: bool = False,
           seed: int = 0, **forward_kwargs) -> torch.Tensor:
    """The logits of `input_ids` with `site` ablated at `index` (see `ablation_hooks`)."""
    with torch.no_grad(), ablated(model, site, how, index=index, reference=reference,
                                  over_positions=over_positions, seed=seed, **forward_kwargs):
        return model(input_ids, **forward_kwargs)
