"""Hook points by TransformerLens name: read or replace any activation of a forward pass while a context is open.

Conventions (as TransformerLens, so its tutorials read across):
- names are `hook_embed`, `hook_pos_embed`, `blocks.{L}.<site>` for every site in `model.BLOCK_HOOKS`, and
  `ln_final.hook_normalized`; `hook_names(model)` lists a model's in forward order;
- a hook is `fn(tensor, hook)`, where `hook.name` is the point's name and `hook.layer()` its block; it returns
  None to leave the value alone or a tensor of the same shape to carry on with instead;
- per-head values are [batch, pos, head, d_head] (`hook_q`, `hook_k`, `hook_v`, `hook_rot_q`, `hook_rot_k`,
  `hook_z`; keys and values have the model's key/value heads), `hook_result` is [batch, pos, head, d_model],
  `hook_attn_scores` and `hook_pattern` are [batch, head, query, key] over the KV cache's slots, masked scores at
  -inf; everything else is [batch, pos, d].
Nothing is hooked outside a context, and inside one only the named points do any work: attention stays on
SDPA in every layer whose scores or pattern nobody asked for. Hooks fire on every forward pass in the context,
so inside `generate` they see each step (the prompt, then one token at a time).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..model import BLOCK_HOOKS, Hooks, Transformer

HookFn = Callable[[torch.Tensor, "HookPoint"], "torch.Tensor | None"]
# Which points: a name, a list of names, or a filter over names.
NameFilter = str | Iterable[str] | Callable[[str], bool]


@dataclass(frozen=True)
class HookPoint:
    """What a hook function is told about where it runs."""

    name: str

    def layer(self) -> int:
        """The block this point belongs to (TransformerLens' `hook.layer()`); an error for model-level points."""
        match = re.match(r"blocks\.(\d+)\.", self.name)
        if match is None:
            raise ValueError(f"{self.name} is not inside a block")
        return int(match.group(1))


def hook_names(model: Transformer) -> list[str]:
    """Every hook point of `model`, in the order a forward pass reaches them."""
    names = ["hook_embed"] + (["hook_pos_embed"] if model.pos_embed is not None else [])
    sites = [s for s in BLOCK_HOOKS if model.config.gated_mlp or s != "mlp.hook_pre_linear"]
    if model.config.positions != "rope":
        sites = [s for s in sites if s not in ("attn.hook_rot_q", "attn.hook_rot_k")]
    for layer in range(model.config.n_layers):
        names += [f"blocks.{layer}.{site}" for site in sites]
    return names + ["ln_final.hook_normalized"]


def select(model: Transformer, names: NameFilter | None) -> list[str]:
    """The model's hook names that `names` picks (None: all of them), in forward order; unknown names refused."""
    every = hook_names(model)
    if names is None:
        return every
    if callable(names):
        return [n for n in every if names(n)]
    wanted = [names] if isinstance(names, str) else list(names)
    known = set(every)
    for name in wanted:
        if name not in known:
            raise UserError(_unknown(name, every, model))
    chosen = set(wanted)
    return [n for n in every if n in chosen]


def _unknown(name: str, every: list[str], model: Transformer) -> str:
    close = difflib.get_close_matches(name, every, n=1)
    hint = f"did you mean {close[0]}?" if close else "see decoderlab.interp.hook_names(model)"
    match = re.match(r"blocks\.(\d+)\.", name)
    if match and int(match.group(1)) >= model.config.n_layers:
        hint = f"the model has blocks 0..{model.config.n_layers - 1}"
    return f"no hook point {name!r} in this model ({hint})"


class _Active(Hooks):
    """The `Hooks` a model calls: each point's functions in the order they were added."""

    def __init__(self, table: dict[str, list[HookFn]]) -> None:
        self.table = table
        self.points = {name: HookPoint(name) for name in table}

    def wants(self, name: str) -> bool:
        return name in self.table

    def __call__(self, name: str, x: torch.Tensor) -> torch.Tensor:
        point = self.points[name]
        for fn in self.table[name]:
            out = fn(x, point)
            if out is not None:
                if not isinstance(out, torch.Tensor) or out.shape != x.shape:
                    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise UserError(f"a hook at {name} returned {shape}; return None or a tensor of shape "
                                    f"{tuple(x.shape)}")
                x = out
        return x


@contextmanager
def hooks(model: Transformer, fwd_hooks: dict[str, HookFn] | Iterable[tuple[NameFilter, HookFn]]) -> Iterator[None]:
    """Run `fwd_hooks` (`{name: fn}`, or `[(name or filter, fn), ...]` as TransformerLens takes them) on every
    forward pass of `model` inside the block. Contexts nest: inner hooks run after outer ones at a point."""
    pairs = fwd_hooks.items() if isinstance(fwd_hooks, dict) else fwd_hooks
    previous = model.hooks
    table: dict[str, list[HookFn]] = {k: list(v) for k, v in previous.table.items()} if isinstance(
        previous, _Active) else {}
    for names, fn in pairs:
        if not callable(fn):
            raise UserError(f"the hook for {names!r} is not callable")
        for name in select(model, names):
            table.setdefault(name, []).append(fn)
    model.hooks = _Active(table) if table else previous
    try:
        yield
    finally:
        model.hooks = previous


def run_with_hooks(model: Transformer, input_ids: torch.Tensor,
                   fwd_hooks: dict[str, HookFn] | Iterable[tuple[NameFilter, HookFn]], **forward_kwargs):
    """One forward pass (`model(input_ids, **forward_kwargs)`) with `fwd_hooks` set; its output."""
    with hooks(model, fwd_hooks):
        return model(input_ids, **forward_kwargs)

