"""Activation caches: keep what a forward pass produced at the hook points asked for, and read it as
TransformerLens' `ActivationCache` reads (`cache["pattern", 3]`, residual decompositions, direct logit attribution).

Only the named points are kept, each moved to `device` / cast to `dtype` as it is produced, so caching the
residual stream of a long run does not hold every attention pattern too. Stacks put their components first:
[component, batch, pos, d_model]; `pos_slice` (an int or a slice) picks positions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from ..errors import UserError
from ..model import Transformer
from .hooks import HookPoint, NameFilter, hooks, select

# TransformerLens' short names (utils.get_act_name) -> the site inside a block.
_SHORT = {
    "resid_pre": "hook_resid_pre", "resid_mid": "hook_resid_mid", "resid_post": "hook_resid_post",
    "attn_out": "hook_attn_out", "mlp_out": "hook_mlp_out",
    "q": "attn.hook_q", "k": "attn.hook_k", "v": "attn.hook_v", "rot_q": "attn.hook_rot_q",
    "rot_k": "attn.hook_rot_k", "z": "attn.hook_z", "result": "attn.hook_result",
    "attn_scores": "attn.hook_attn_scores", "scores": "attn.hook_attn_scores",
    "pattern": "attn.hook_pattern", "attn": "attn.hook_pattern",
    "pre": "mlp.hook_pre", "pre_linear": "mlp.hook_pre_linear", "post": "mlp.hook_post",
    "normalized": "ln{}.hook_normalized",
}
_MODEL_SHORT = {"embed": "hook_embed", "pos_embed": "hook_pos_embed"}


def act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """The full hook name for a TransformerLens short name: `act_name("pattern", 3)` is
    `blocks.3.attn.hook_pattern`; `act_name("normalized", 3, "ln2")`; `act_name("embed")` is `hook_embed`.
    A full name passes through unchanged."""
    if layer is None:
        if name in _MODEL_SHORT:
            return _MODEL_SHORT[name]
        if name in ("ln_final", "normalized"):
            return "ln_final.hook_normalized"
        return name
    if name not in _SHORT:
        raise UserError(f"unknown activation {name!r}; use one of {', '.join(sorted(_SHORT))} or a full hook name")
    site = _SHORT[name]
    if "{}" in site:
        kind = (layer_type or "ln1").removeprefix("ln")
        if kind not in ("1", "2"):
            raise UserError(f"normalized takes layer_type ln1 or ln2, got {layer_type!r}")
        site = site.format(kind)
    return f"blocks.{layer}.{site}"


def _positions(x: torch.Tensor, pos_slice: int | slice | None, pos_dim: int = -2) -> torch.Tensor:
    if pos_slice is None:
        return x
    if isinstance(pos_slice, int):
        pos_slice = slice(pos_slice, pos_slice + 1 if pos_slice != -1 else None)
    return x.narrow(pos_dim, *_span(pos_slice, x.shape[pos_dim]))


def _span(s: slice, n: int) -> tuple[int, int]:
    start, stop, step = s.indices(n)
    if step != 1:
        raise UserError("pos_slice takes a plain slice (step 1) or an int")
    return start, max(stop - start, 0)


class ActivationCache:
    """What one forward pass produced at the hook points it was asked to keep."""

    def __init__(self, values: dict[str, torch.Tensor], model: Transformer) -> None:
        self.values = values
        self.model = model

    def __getitem__(self, key: str | tuple) -> torch.Tensor:
        name = act_name(*key) if isinstance(key, tuple) else act_name(key)
        if name not in self.values:
            kept = ", ".join(list(self.values)[:6]) + (" ..." if len(self.values) > 6 else "")
            raise KeyError(f"{name} was not cached (cached: {kept or 'nothing'}); ask for it in names=")
        return self.values[name]

    def __contains__(self, key: str | tuple) -> bool:
        return (act_name(*key) if isinstance(key, tuple) else act_name(key)) in self.values

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def keys(self):
        return self.values.keys()

    def items(self):
        return self.values.items()

    def to(self, device: torch.device | str) -> ActivationCache:
        return ActivationCache({k: v.to(device) for k, v in self.values.items()}, self.model)

    def __repr__(self) -> str:
        more = " ..." if len(self) > 4 else ""
        return f"ActivationCache({len(self)} points: {', '.join(list(self.values)[:4])}{more})"

    # ------------------------------------------------------------------ the residual stream, taken apart

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice: int | slice | None = None, return_labels: bool = False):
        """The residual stream as it stands before each block up to `layer` (all blocks and the final one
        when None): [component, batch, pos, d_model], labels `"0_pre"`, (`"0_mid"`), ..., `"final_post"`."""
        n = self.model.config.n_layers
        last = n if layer is None else layer
        parts, labels = [], []
        for i in range(last):
            parts.append(self["resid_pre", i]), labels.append(f"{i}_pre")
            if incl_mid:
                parts.append(self["resid_mid", i]), labels.append(f"{i}_mid")
        if layer is None or layer == n:
            parts.append(self["resid_post", n - 1]), labels.append("final_post")
        stack = _positions(torch.stack(parts), pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mode: str = "all", incl_embeds: bool = True,
                        apply_ln: bool = False, pos_slice: int | slice | None = None, return_labels: bool = False):
        """The residual stream before `layer` (None: after the last block) as the sum of what wrote to it:
        embeddings, then each block's attention and MLP outputs (`mode` "attn" or "mlp" keeps one kind).
        They add up to `resid_pre` of that layer exactly."""
        if mode not in ("all", "attn", "mlp"):
            raise UserError(f"mode must be all, attn or mlp, got {mode!r}")
        last = self.model.config.n_layers if layer is None else layer
        parts, labels = [], []
        if incl_embeds:
            parts.append(self["embed"]), labels.append("embed")
            if self.model.pos_embed is not None:
                parts.append(self["pos_embed"]), labels.append("pos_embed")
        for i in range(last):
            if mode in ("all", "attn"):
                parts.append(self["attn_out", i]), labels.append(f"{i}_attn_out")
            if mode in ("all", "mlp"):
                parts.append(self["mlp_out", i]), labels.append(f"{i}_mlp_out")
        stack = _positions(torch.stack(parts), pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def stack_head_results(self, layer: int | None = None, return_labels: bool = False, apply_ln: bool = False,
                           pos_slice: int | slice | None = None):
        """Every head's write to the residual stream, for the blocks before `layer` (None: all):
        [layer * head, batch, pos, d_model], labels `"L0H0"`, ... From `attn.hook_result` where cached, else
        computed from `attn.hook_z` and the output projection (the bias, shared by the heads, is left out)."""
        last = self.model.config.n_layers if layer is None else layer
        parts, labels = [], []
        for i in range(last):
            result = self.values.get(act_name("result", i))
            if result is None:
                z = self["z", i]  # [B, T, H, D]
                out = self.model.blocks[i].attn.out.weight
                result = torch.einsum("bthd,mhd->bthm", z, out.view(out.shape[0], z.shape[2], -1).to(z.dtype))
            parts += list(result.movedim(2, 0))
            labels += [f"L{i}H{h}" for h in range(result.shape[2])]
        stack = _positions(torch.stack(parts), pos_slice)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice)
        return (stack, labels) if return_labels else stack

    def apply_ln_to_stack(self, stack: torch.Tensor, layer: int | None = None,
                          pos_slice: int | slice | None = None) -> torch.Tensor:
        """Put each component of `stack` [..., batch, pos, d] through a norm as the whole stream went through
        it: the final norm (`layer` None or n_layers) or block `layer`'s first norm, with the scale measured on
        the cached stream entering it (so the map is linear). A LayerNorm centres each component; the norm's
        weight is applied, its bias is not (a constant: summed components plus the bias give the norm's
        output exactly)."""
        n = self.model.config.n_layers
        if layer is None or layer == n or layer == -1:
            stream, norm = self["resid_post", n - 1], self.model.final_norm
        else:
            stream, norm = self["resid_pre", layer], self.model.blocks[layer].attn_norm
        stream = _positions(stream, pos_slice).float()
        stack = stack.float()
        if isinstance(norm, torch.nn.LayerNorm):
            stream = stream - stream.mean(-1, keepdim=True)
            stack = stack - stack.mean(-1, keepdim=True)
        scale = (stream.pow(2).mean(-1, keepdim=True) + norm.eps).sqrt()
        out = stack / scale
        return out if norm.weight is None else out * norm.weight.float()

    def logit_attrs(self, residual_stack: torch.Tensor, tokens: int | torch.Tensor,
                    incorrect_tokens: int | torch.Tensor | None = None,
                    pos_slice: int | slice | None = None) -> torch.Tensor:
        """Direct logit attribution: each component's share of the logit of `tokens` (minus that of
        `incorrect_tokens`) through the final norm (`apply_ln_to_stack`) and the LM head.

        `residual_stack` is [component, batch, pos, d] (positions already picked with the same `pos_slice`);
        `tokens` an id, [batch] (one per row, every position) or [batch, pos]. Returns [component, batch, pos].
        The shares plus the final norm's bias term add up to the logit (without a soft-cap, which is not linear).
        """
        scaled = self.apply_ln_to_stack(residual_stack, None, pos_slice=pos_slice)
        directions = self._directions(tokens, scaled)
        if incorrect_tokens is not None:
            directions = directions - self._directions(incorrect_tokens, scaled)
        return (scaled * directions).sum(-1)

    def _directions(self, tokens: int | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        unembed = self.model.lm_head.weight.float()  # [V, d]
        tokens = torch.as_tensor(tokens, device=unembed.device)
        d = unembed[tokens]  # [d] | [B, d] | [B, T, d]
        if tokens.dim() == 1:
            d = d[:, None, :]
        return d.to(like.device)


class Recording:
    """Caches of every forward pass run inside `record` (`generate` runs one per step): `steps[i]`."""

    def __init__(self) -> None:
        self.steps: list[ActivationCache] = []

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, i: int) -> ActivationCache:
        return self.steps[i]

    def stacked(self, name: str | tuple, dim: int = 1) -> torch.Tensor:
        """One point's values over all steps, concatenated along positions (`dim`, 1 for [batch, pos, ...]);
        for points whose other dimensions stay the same from step to step (not patterns: their keys grow)."""
        return torch.cat([step[name] for step in self.steps], dim=dim)


@contextmanager
def record(model: Transformer, names: NameFilter | None = None, *, device: torch.device | str | None = None,
           dtype: torch.dtype | None = None) -> Iterator[Recording]:
    """Keep the values at `names` (None: every point) of each forward pass run inside the block.

    Values are detached, moved to `device` and cast to `dtype` (floating values only) as they are produced."""
    chosen = select(model, names)
    recording = Recording()
    current: dict[str, dict[str, torch.Tensor]] = {}

    def start(x: torch.Tensor, hook: HookPoint) -> None:  # every forward pass reaches hook_embed first
        values: dict[str, torch.Tensor] = {}
        recording.steps.append(ActivationCache(values, model))
        current["values"] = values

    def keep(x: torch.Tensor, hook: HookPoint) -> None:
        x = x.detach()
        if device is not None or (dtype is not None and x.is_floating_point()):
            x = x.to(device=device, dtype=dtype if x.is_floating_point() else None)
        current["values"][hook.name] = x

    with hooks(model, [("hook_embed", start)] + [(name, keep) for name in chosen]):
        yield recording


def run_with_cache(model: Transformer, input_ids: torch.Tensor, names: NameFilter | None = None, *,
                   device: torch.device | str | None = None, dtype: torch.dtype | None = None,
                   grad: bool = False, **forward_kwargs) -> tuple:
    """One forward pass that keeps the values at `names` (a name, names, a filter; None: every point):
    `(output, cache)`. `forward_kwargs` go to the model (positions, mask, cache, ...), so padded batches and
    KV-cached steps are cached as they run. Runs without gradients unless `grad=True`."""
    with torch.set_grad_enabled(grad), record(model, names, device=device, dtype=dtype) as rec:
        output = model(input_ids, **forward_kwargs)
    return output, rec.steps[0]
