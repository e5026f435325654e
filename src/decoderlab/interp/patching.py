"""Activation patching and path patching: run a target (clean) input with chosen activations taken from a source
(corrupted) run, and measure what that does to the output.

Conventions (TransformerLens-like):
- a *site* is a hook name (`blocks.3.hook_resid_pre`) or a short name with a layer (`("resid_pre", 3)`);
- an *index* picks cells of the site's tensor after the batch dimension: `None` (all of it), an int (a position
  for [batch, pos, ...] sites, a head for patterns [batch, head, q, k]) or a tuple such as `(pos, head)` for
  `hook_z` [batch, pos, head, d_head]; `slice(None)` keeps a whole axis: `(slice(None), head)` is one head at
  every position;
- a *metric* maps the patched logits [batch, pos, vocab] to a number (or a tensor); `logit_diff` and
  `normalized` build the usual ones;
- the *source* is an `ActivationCache` of the source run, or the source's input ids (run once here, caching only
  the sites needed), with the same shape as the target input.
Sweeps patch several cells per forward pass (`batch` copies of the target input side by side, each copy with
its own cell patched) and return a grid of metric values: `[layer, pos]`, `[layer, head]`, `[layer, head, pos]`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import UserError
from ..model import Transformer
from .cache import ActivationCache, act_name, run_with_cache
from .hooks import HookPoint, hooks, select

Metric = Callable[[torch.Tensor], torch.Tensor | float]
Index = int | slice | tuple | None
Site = str | tuple
Source = ActivationCache | torch.Tensor

# Sites whose tensors are [batch, pos, head, ...] and [batch, head, query, key]; the rest are [batch, pos, ...].
_HEAD_SITES = ("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_z",
               "attn.hook_result")
_PATTERN_SITES = ("attn.hook_attn_scores", "attn.hook_pattern")


def site_name(site: Site) -> str:
    """The full hook name of a site: a name, or `(short name, layer)` as `act_name` takes them."""
    return act_name(*site) if isinstance(site, tuple) else act_name(site)


def index_key(index: Index) -> tuple:
    """The index as applied to a tensor with its batch dimension first."""
    if index is None:
        return (slice(None),)
    return (slice(None), *(index if isinstance(index, tuple) else (index,)))


# ---------------------------------------------------------------------------------------------------- metrics


def logit_diff(answer: int | torch.Tensor, wrong: int | torch.Tensor, pos: int = -1) -> Metric:
    """The metric logit[answer] - logit[wrong] at position `pos`, averaged over the batch. `answer` and `wrong`
    are ids or [batch] tensors of ids (one per row)."""

    def metric(logits: torch.Tensor) -> torch.Tensor:
        last = logits[:, pos].float()  # [B, V]
        rows = torch.arange(last.shape[0], device=last.device)
        a = torch.as_tensor(answer, device=last.device).expand(last.shape[0])
        w = torch.as_tensor(wrong, device=last.device).expand(last.shape[0])
        return (last[rows, a] - last[rows, w]).mean()

    return metric


def normalized(metric: Metric, clean_logits: torch.Tensor, corrupted_logits: torch.Tensor) -> Metric:
    """`metric` rescaled so that the corrupted run scores 0 and the clean run 1 (the share of the clean
    behaviour a patch restores, when patching clean activations into the corrupted run)."""
    with torch.no_grad():
        clean, corrupted = float(metric(clean_logits.detach())), float(metric(corrupted_logits.detach()))
    if abs(clean - corrupted) < 1e-12:
        raise UserError(f"the metric is {clean:.6g} on both the clean and the corrupted run, so it cannot be "
                        "normalised; pick inputs (or a metric) on which the two runs differ")

    def scaled(logits: torch.Tensor) -> torch.Tensor:
        return (torch.as_tensor(metric(logits)) - corrupted) / (clean - corrupted)

    return scaled


# ---------------------------------------------------------------------------------------------------- batching


def source_values(model: Transformer, source: Source, names: list[str], forward_kwargs: dict) -> dict:
    """The source run's values at `names`: from its cache, or from one run of its ids (with `forward_kwargs`)."""
    if isinstance(source, ActivationCache):
        return {name: source[name] for name in names}
    if isinstance(source, torch.Tensor) and not source.is_floating_point():
        _, cache = run_with_cache(model, source, names, **forward_kwargs)
        return {name: cache[name] for name in names}
    raise UserError("source must be an ActivationCache of the source run or its input ids (a LongTensor); "
                    f"got {type(source).__name__}")


def check_source_shape(src: torch.Tensor, x: torch.Tensor, batch: int, name: str) -> None:
    """A one-line error unless the source run's value `src` can stand in for the target's `x` (batch `batch`)."""
    if src.shape[1:] != x.shape[1:] or src.shape[0] not in (1, batch):
        raise UserError(f"the source run's {name} is {tuple(src.shape)} but the target run's is "
                        f"{(batch, *x.shape[1:])}; give source inputs of the target's shape (pad them alike)")


def _repeated(forward_kwargs: dict[str, Any], copies: int, batch: int, T: int, device: torch.device) -> dict:
    """The forward arguments for `copies` copies of a batch side by side (rows copy-major)."""
    if forward_kwargs.get("cache") is not None:
        raise UserError("patching runs whole inputs; pass no KV cache")
    out = dict(forward_kwargs)
    if copies == 1:
        return out
    positions = out.get("positions")
    if isinstance(positions, torch.Tensor) and positions.dim() == 2 and positions.shape[0] == batch > 1:
        out["positions"] = positions.repeat(copies, 1)
    mask = out.get("mask")
    if mask is not None and (isinstance(mask, torch.Tensor) or mask.batch_size not in (None, 1)):
        if not isinstance(mask, torch.Tensor):
            mask = mask.materialize_for(T, 0, batch_size=batch, device=device)
        if mask.shape[0] == batch > 1:
            mask = mask.repeat(copies, 1, 1, 1)
        out["mask"] = mask
    return out


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(i + size, n)) for i in range(0, n, size)]


def patch_cells(model: Transformer, target_ids: torch.Tensor, source: Source,
                cells: Sequence[tuple[Site, Index]], metric: Metric, *, batch: int = 16,
                **forward_kwargs) -> torch.Tensor:
    """The metric after patching each cell (site, index) alone from the source run into the target run:
    a tensor [len(cells), *metric's shape]. Runs `batch` patched copies of the target per forward pass."""
    if batch < 1:
        raise UserError(f"batch must be >= 1, got {batch}")
    cells = [(site_name(site), index) for site, index in cells]
    names = select(model, sorted({name for name, _ in cells}))
    values = source_values(model, source, names, forward_kwargs)
    B, T = target_ids.shape
    results: list[torch.Tensor] = []
    with torch.no_grad():
        for chunk in _chunks(len(cells), batch):
            copies = len(chunk)
            todo: dict[str, list[tuple[int, tuple]]] = {}
            for j, c in enumerate(chunk):
                name, index = cells[c]
                todo.setdefault(name, []).append((j, index_key(index)))

            def fn(x: torch.Tensor, hook: HookPoint, todo=todo) -> torch.Tensor:
                x = x.clone()
                src = values[hook.name].to(x.device, x.dtype)
                check_source_shape(src, x, B, hook.name)
                for j, key in todo[hook.name]:
                    x[j * B:(j + 1) * B][key] = src[key]
                return x

            ids = target_ids.repeat(copies, 1)
            kwargs = _repeated(forward_kwargs, copies, B, T, target_ids.device)
            with hooks(model, [(name, fn) for name in todo]):
                logits = model(ids, **kwargs)
            results += [torch.as_tensor(metric(logits[j * B:(j + 1) * B])).detach().float().cpu()
                        for j in range(copies)]
    return torch.stack(results)


def patch(model: Transformer, target_ids: torch.Tensor, source: Source, site: Site | Sequence[Site],
          metric: Metric | None = None, *, index: Index = None, **forward_kwargs) -> torch.Tensor:
    """One patched run: the target input with `site` (a site, or a list of sites, each at `index`) taken from
    the source run. Returns `metric(logits)`, or the logits when no metric is given."""
    sites = [site] if isinstance(site, str | tuple) else list(site)
    names = select(model, [site_name(s) for s in sites])
    values = source_values(model, source, names, forward_kwargs)
    key = index_key(index)

    def fn(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        src = values[hook.name].to(x.device, x.dtype)
        check_source_shape(src, x, x.shape[0], hook.name)
        x = x.clone()
        x[key] = src[key]
        return x

    with torch.no_grad(), hooks(model, [(name, fn) for name in names]):
        logits = model(target_ids, **_repeated(forward_kwargs, 1, 0, 0, target_ids.device))
        return logits if metric is None else torch.as_tensor(metric(logits))


# ---------------------------------------------------------------------------------------------------- sweeps


def _axes(name: str, by: Sequence[str]) -> list[int]:
    """Where each swept dimension ("pos", "head") sits in the site's tensor after the batch dimension."""
    site = name.split(".", 2)[-1]
    if site in _HEAD_SITES:
        where = {"pos": 0, "head": 1}
    elif site in _PATTERN_SITES:
        where = {"head": 0, "pos": 1}  # the query position
    else:
        where = {"pos": 0}
    for dim in by:
        if dim not in where:
            raise UserError(f"cannot sweep {dim!r} at {name}; it has {', '.join(where)}")
    return [where[dim] for dim in by]


def sweep(model: Transformer, target_ids: torch.Tensor, source: Source, act: str, metric: Metric, *,
          by: str | Sequence[str] = "pos", layers: Sequence[int] | None = None, batch: int = 16,
          **forward_kwargs) -> torch.Tensor:
    """Patch one cell at a time of activation `act` (a short name: "resid_pre", "attn_out", "mlp_out", "z",
    "v", "pattern", ...) at every layer, from the source run into the target run.

    `by` names the swept dimensions after the layer: "pos", "head", ("head", "pos"), or () for whole layers.
    Returns the metric per cell: [layer, *by sizes] (e.g. [layer, pos], [layer, head, pos]) for `layers`
    (default all), computed `batch` cells per forward pass."""
    by = (by,) if isinstance(by, str) else tuple(by)
    layers = list(range(model.config.n_layers)) if layers is None else list(layers)
    names = [act_name(act, layer) for layer in layers]
    select(model, names)
    if len(set(by)) != len(by):
        raise UserError(f"by names a dimension twice: {by}")
    # The source values tell the sizes (keys and values have the model's key/value heads).
    values = source_values(model, source, names, forward_kwargs)
    cache = ActivationCache(values, model)
    axes = _axes(names[0], by)
    sizes = [values[names[0]].shape[1 + a] for a in axes]
    cells: list[tuple[Site, Index]] = []
    for name in names:
        for flat in range(int(torch.tensor(sizes).prod()) if sizes else 1):
            coords, rest = [], flat
            for size in reversed(sizes):
                coords.append(rest % size)
                rest //= size
            coords.reverse()
            index: list = [slice(None)] * (max(axes) + 1 if axes else 0)
            for axis, c in zip(axes, coords, strict=True):
                index[axis] = c
            cells.append((name, tuple(index) if index else None))
    out = patch_cells(model, target_ids, cache, cells, metric, batch=batch, **forward_kwargs)
    return out.view(len(layers), *sizes, *out.shape[1:])


def resid_pre_by_pos(model: Transformer, target_ids: torch.Tensor, source: Source, metric: Metric,
                     **kwargs) -> torch.Tensor:
    """Each layer's residual stream before the block, one position at a time: [layer, pos]."""
    return sweep(model, target_ids, source, "resid_pre", metric, by="pos", **kwargs)


def attn_out_by_pos(model: Transformer, target_ids: torch.Tensor, source: Source, metric: Metric,
                    **kwargs) -> torch.Tensor:
    """Each layer's attention output, one position at a time: [layer, pos]."""
    return sweep(model, target_ids, source, "attn_out", metric, by="pos", **kwargs)


def mlp_out_by_pos(model: Transformer, target_ids: torch.Tensor, source: Source, metric: Metric,
                   **kwargs) -> torch.Tensor:
    """Each layer's MLP output, one position at a time: [layer, pos]."""
    return sweep(model, target_ids, source, "mlp_out", metric, by="pos", **kwargs)


def head_out(model: Transformer, target_ids: torch.Tensor, source: Source, metric: Metric,
             **kwargs) -> torch.Tensor:
    """Each head's output (`hook_z`) at every position at once: [layer, head]."""
    return sweep(model, target_ids, source, "z", metric, by="head", **kwargs)


def head_out_by_pos(model: Transformer, target_ids: torch.Tensor, source: Source, metric: Metric,
                    **kwargs) -> torch.Tensor:
    """Each head's output (`hook_z`) at one position at a time: [layer, head, pos]."""
    return sweep(model, target_ids, source, "z", metric, by=("head", "pos"), **kwargs)


# ---------------------------------------------------------------------------------------------------- path patching

# The sites through which components write to the residual stream: frozen at the target run's values while
# the sender's effect on the receiver is measured.
_FROZEN = ("attn.hook_z", "hook_mlp_out")
# Receivers computed from their own block's head outputs: that block's hook_z stays free.
_FROM_Z = ("attn.hook_result", "hook_attn_out")


def path_patch(model: Transformer, target_ids: torch.Tensor, source: Source,
               sender: tuple[Site, Index] | list[tuple[Site, Index]] | None,
               receiver: tuple[Site, Index] | list[tuple[Site, Index]], metric: Metric | None = None,
               **forward_kwargs) -> torch.Tensor:
    """The sender's effect on the output through the receiver only (path patching, Wang et al. 2022).

    1. Run the target input with the sender cell(s) (site, index) taken from the source run and every
       component's output (each head's `hook_z`, each `hook_mlp_out`) frozen at the target run's values
       (except the sender's cells); keep the receiver cell(s) (site, index) as they are computed there: they
       carry the sender's effect along the residual stream only, not through other components.
    2. Run the target input again with the receiver cells set to those values, everything else computed
       freely, and return `metric(logits)` (the logits when no metric is given).
    Receivers are usually a head's input (`hook_q`/`hook_k`/`hook_v` with `(slice(None), head)`), a residual
    stream point or `ln_final.hook_normalized` (the sender's direct effect on the logits); an `hook_attn_out`
    or `hook_result` receiver leaves its own block's `hook_z` free. A sender of None (or []) changes nothing:
    the result is the target run's.
    """
    keep: dict[str, torch.Tensor] = {}

    def logits_of(logits: torch.Tensor) -> torch.Tensor:
        keep["logits"] = logits
        return logits.new_zeros(())

    value = _path_patch_groups(model, target_ids, source, [_cells(sender)], receiver,
                               logits_of if metric is None else metric, 1, forward_kwargs)[0]
    return keep["logits"] if metric is None else value


def path_patch_cells(model: Transformer, target_ids: torch.Tensor, source: Source,
                     senders: Sequence[tuple[Site, Index]], receiver: tuple[Site, Index] | list[tuple[Site, Index]],
                     metric: Metric, *, batch: int = 16, **forward_kwargs) -> torch.Tensor:
    """`path_patch` for each sender cell (site, index) alone, into the same receiver(s): [len(senders),
    *metric's shape], `batch` senders per forward pass."""
    if batch < 1:
        raise UserError(f"batch must be >= 1, got {batch}")
    return _path_patch_groups(model, target_ids, source, [_cells(cell) for cell in senders], receiver, metric,
                              batch, forward_kwargs)


def path_patch_heads(model: Transformer, target_ids: torch.Tensor, source: Source,
                     receiver: tuple[Site, Index] | list[tuple[Site, Index]], metric: Metric, *,
                     batch: int = 16, **forward_kwargs) -> torch.Tensor:
    """Every head as the sender (its `hook_z` at every position), into the receiver(s): [layer, head]."""
    L, H = model.config.n_layers, model.config.n_heads
    senders = [(act_name("z", layer), (slice(None), head)) for layer in range(L) for head in range(H)]
    return path_patch_cells(model, target_ids, source, senders, receiver, metric, batch=batch,
                            **forward_kwargs).view(L, H, -1).squeeze(-1)


def _path_patch_groups(model: Transformer, target_ids: torch.Tensor, source: Source,
                       groups: list[list[tuple[str, Index]]], receiver, metric: Metric, batch: int,
                       forward_kwargs: dict) -> torch.Tensor:
    """Path patching for each group of sender cells, `batch` groups side by side per forward pass."""
    receivers = _cells(receiver)
    if not receivers:
        raise UserError("path patching needs a receiver: (site, index), e.g. (('v', 1), (slice(None), 0))")
    receiver_names = select(model, sorted({name for name, _ in receivers}))
    sender_names = select(model, sorted({name for group in groups for name, _ in group}))
    free = {name.rsplit(".", 2)[0] + ".attn.hook_z" if name.endswith("attn.hook_result") else
            name.rsplit(".", 1)[0] + ".attn.hook_z" for name in receiver_names if name.endswith(_FROM_Z)}
    frozen = set(select(model, lambda n: n.split(".", 2)[-1] in _FROZEN)) - free
    _, clean = run_with_cache(model, target_ids, sorted(frozen), **forward_kwargs)
    src = source_values(model, source, sender_names, forward_kwargs) if sender_names else {}
    B, T = target_ids.shape
    results: list[torch.Tensor] = []
    with torch.no_grad():
        for chunk in _chunks(len(groups), batch):
            copies = len(chunk)
            kept: dict[str, torch.Tensor] = {}

            def send(x: torch.Tensor, name: str, chunk=chunk) -> torch.Tensor:
                for j, g in enumerate(chunk):
                    for sender_name, index in groups[g]:
                        if sender_name == name:
                            value = src[name].to(x.device, x.dtype)
                            check_source_shape(value, x, B, name)
                            key = index_key(index)
                            x[j * B:(j + 1) * B][key] = value[key]
                return x

            def step_one(x: torch.Tensor, hook: HookPoint, copies=copies, kept=kept, send=send) -> torch.Tensor:
                x = send(x.clone(), hook.name)
                if hook.name in receiver_names:
                    kept[hook.name] = x.detach().clone()  # as computed; what flows on is frozen below
                if hook.name in frozen:
                    frozen_value = clean[hook.name].to(x.device, x.dtype)
                    x = send(frozen_value.repeat(copies, *[1] * (x.dim() - 1)), hook.name)
                return x

            def receive(x: torch.Tensor, hook: HookPoint, kept=kept) -> torch.Tensor:
                x = x.clone()
                for name, index in receivers:
                    if name == hook.name:
                        key = index_key(index)  # the batch axis first: every copy at once
                        x[key] = kept[name][key]
                return x

            ids = target_ids.repeat(copies, 1)
            kwargs = _repeated(forward_kwargs, copies, B, T, target_ids.device)
            with hooks(model, [(n, step_one) for n in select(model, sorted(frozen | set(sender_names)
                                                                           | set(receiver_names)))]):
                model(ids, **kwargs)
            with hooks(model, [(n, receive) for n in receiver_names]):
                logits = model(ids, **kwargs)
            results += [torch.as_tensor(metric(logits[j * B:(j + 1) * B])).detach().float().cpu()
                        for j in range(copies)]
    return torch.stack(results)


def _cells(cells) -> list[tuple[str, Index]]:
    """One (site, index) pair, or a list of them (None: none)."""
    if cells is None:
        return []
    pairs = [cells] if isinstance(cells, tuple) else list(cells)
    for pair in pairs:
        if not (isinstance(pair, tuple) and len(pair) == 2):
            raise UserError(f"a path-patching cell is (site, index), e.g. ('blocks.0.attn.hook_z', (slice(None), 3)); "
                            f"got {pair!r}")
    return [(site_name(site), index) for site, index in pairs]
