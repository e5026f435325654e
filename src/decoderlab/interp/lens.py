"""The logit lens: what the model would predict if the residual stream stopped after each block.

`logit_lens(model, ids)` puts the residual stream as it stands after the embeddings and after every block
through the model's own final norm and LM head (`model.unembed(model.final_norm(x))`, soft-cap included), so
the last row is the model's output exactly. It returns a `LogitLens`: per layer x position the top-k tokens and
their probabilities and, for a target token, its probability and rank; `lens.logits(layer)` gives one row's full
logits on demand (the lens keeps the residuals, not [layers, batch, pos, vocab] of logits, which for a real
vocabulary would be gigabytes). `lens.to_json(tokenizer)` is a JSON-ready dict (for the CLI and the lab page).

Tuned-lens ready: `translators` maps a layer row to a callable (an `nn.Linear(d, d)` or any function of the
residual [..., d]) applied to the residual before the final norm, as the tuned lens applies its learned affine
map (which is then `h + A h + b`: initialise the Linear to the identity, or pass `lambda h: h + probe(h)`).

Rows: row 0 is the embeddings (`"embed"`, the stream entering block 0, learned positions included), row i + 1
is after block i (`"0"`, `"1"`, ...). Layer indices accept negatives (`-1`: after the last block).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..model import Transformer
from .cache import run_with_cache

Translator = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LogitLens:
    """What `logit_lens` read. Shapes: R = n_layers + 1 rows, B rows of the batch, P positions read, k top-k.

    labels: [R] row names ("embed", "0", ... "L-1"). positions: [P] the positions read (indices into the input).
    input_ids: [B, T] the input. top_ids / top_probs: [R, B, P, k], best first.
    target_ids: [B, P] the target per position (None without a target; -1 where there is none, e.g. "next" at
    the last position). target_probs / target_ranks: [R, B, P] (rank 0 = the top token; NaN / -1 where no target).
    resid: [R, B, P, d] the residual stream read (before any translator), for `logits`.
    """

    labels: list[str]
    positions: torch.Tensor
    input_ids: torch.Tensor
    top_ids: torch.Tensor
    top_probs: torch.Tensor
    target_ids: torch.Tensor | None
    target_probs: torch.Tensor | None
    target_ranks: torch.Tensor | None
    resid: torch.Tensor
    model: Transformer
    translators: Mapping[int, Translator] | None = None

    def logits(self, layer: int) -> torch.Tensor:
        """Row `layer`'s logits [B, P, vocab] (0: embeddings, -1: after the last block)."""
        row = _row(layer, len(self.labels))
        with torch.no_grad():
            return _read(self.model, self.resid[row], (self.translators or {}).get(row))

    def to_json(self, tokenizer=None, row: int | None = None) -> dict:
        """A JSON-ready dict: `layers` (labels) and `rows`, one per batch row (or only `row`), each with
        `tokens` (the input, as text where a tokenizer is given, else ids), `positions`, `top` [layer][pos][k]
        of {"id", "token", "prob"}, and with a target `target` {"ids", "tokens", "probs" [layer][pos],
        "ranks" [layer][pos]} (null where a position has no target)."""
        def text(i: int) -> str | int:
            return tokenizer.decode([int(i)]) if tokenizer is not None else int(i)

        rows = range(self.input_ids.shape[0]) if row is None else [row]
        out = []
        for b in rows:
            entry: dict = {"tokens": [text(i) for i in self.input_ids[b].tolist()],
                           "positions": self.positions.tolist()}
            entry["top"] = [[[{"id": int(i), "token": text(i), "prob": round(float(p), 6)}
                              for i, p in zip(ids, probs, strict=True)]
                             for ids, probs in zip(self.top_ids[r, b], self.top_probs[r, b], strict=True)]
                            for r in range(len(self.labels))]
            if self.target_ids is not None:
                ids = self.target_ids[b].tolist()
                entry["target"] = {
                    "ids": [i if i >= 0 else None for i in ids],
                    "tokens": [text(i) if i >= 0 else None for i in ids],
                    "probs": [[round(float(p), 6) if i >= 0 else None for p, i in zip(probs, ids, strict=True)]
                              for probs in self.target_probs[:, b].tolist()],
                    "ranks": [[int(k) if i >= 0 else None for k, i in zip(ranks, ids, strict=True)]
                              for ranks in self.target_ranks[:, b].tolist()],
                }
            out.append(entry)
        return {"layers": list(self.labels), "rows": out}


def _row(layer: int, n: int) -> int:
    row = layer + n if layer < 0 else layer
    if not 0 <= row < n:
        raise UserError(f"lens row {layer} is out of range: the lens has rows 0..{n - 1} (0 = embeddings)")
    return row


def _read(model: Transformer, x: torch.Tensor, translator: Translator | None) -> torch.Tensor:
    if translator is not None:
        x = translator(x.to(_dtype_of(translator, x)))
    return model.unembed(model.final_norm(x))


def _dtype_of(translator: Translator, x: torch.Tensor) -> torch.dtype:
    weight = getattr(translator, "weight", None)
    return weight.dtype if isinstance(weight, torch.Tensor) else x.dtype


def _translators(translators, n: int) -> dict[int, Translator] | None:
    if translators is None:
        return None
    items = translators.items() if isinstance(translators, Mapping) else enumerate(translators)
    if not isinstance(translators, Mapping) and len(translators) != n:
        raise UserError(f"give one translator per lens row ({n}: the embeddings and each block; None to skip "
                        f"one), or a dict {{row: translator}}; got {len(translators)}")
    out = {}
    for layer, fn in items:
        if fn is None:
            continue
        if not callable(fn):
            raise UserError(f"translator for row {layer} is not callable (give an nn.Linear(d, d) or a function)")
        out[_row(int(layer), n)] = fn
    return out


def _targets(target, ids: torch.Tensor, pos: torch.Tensor, vocab: int) -> torch.Tensor | None:
    if target is None:
        return None
    B, T = ids.shape
    if isinstance(target, str):
        if target != "next":
            raise UserError(f"target must be a token id, a tensor of ids or 'next', got {target!r}")
        nxt = torch.full((B, T), -1, dtype=torch.long, device=ids.device)
        nxt[:, :-1] = ids[:, 1:]
        return nxt[:, pos]
    t = torch.as_tensor(target, dtype=torch.long, device=ids.device)
    if t.dim() == 0:
        t = t.expand(B, len(pos))
    elif t.dim() == 1 and t.shape[0] == T:
        t = t.expand(B, T)[:, pos]
    elif t.dim() == 1 and t.shape[0] == B:
        t = t[:, None].expand(B, len(pos))
    elif t.shape == (B, T):
        t = t[:, pos]
    else:
        raise UserError(f"target of shape {tuple(t.shape)} fits neither one id, [batch], [pos] nor [batch, pos] "
                        f"({B}, {T})")
    if bool(((t < -1) | (t >= vocab)).any()):
        raise UserError(f"target ids must lie in [0, {vocab}) (or -1 for none)")
    return t.clone()


def logit_lens(model: Transformer, ids: torch.Tensor | Sequence[int], *, top_k: int = 5,
               target: int | torch.Tensor | str | None = None, positions: torch.Tensor | None = None,
               mask=None, pos_slice: int | slice | Sequence[int] | None = None,
               translators: Sequence[Translator | None] | Mapping[int, Translator] | None = None) -> LogitLens:
    """The logit lens over `ids` ([B, T] or one list of ids): one forward pass caching the residual stream.

    top_k: tokens kept per layer and position. target: a token id (every position), ids [B], [T] or [B, T], or
    "next" (each position's next input token: how early the model knew what came next). positions / mask go to
    the model as in `model(...)` (a left-padded batch: explicit positions and `masks.causal() & masks.padding`).
    pos_slice: the positions to read (an int, slice or list; default all). translators: see the module doc.
    """
    ids = torch.as_tensor(ids, dtype=torch.long, device=model.device)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise UserError(f"ids must be a non-empty [batch, time] tensor or a list of ids, got {tuple(ids.shape)}")
    vocab, n = model.config.vocab_size, model.config.n_layers
    if not 1 <= top_k <= vocab:
        raise UserError(f"top_k must be between 1 and the vocabulary size {vocab}, got {top_k}")
    T = ids.shape[1]
    if pos_slice is None:
        pos = torch.arange(T)
    elif isinstance(pos_slice, slice):
        pos = torch.arange(T)[pos_slice]
    else:
        pos = torch.as_tensor([pos_slice] if isinstance(pos_slice, int) else list(pos_slice), dtype=torch.long)
        if bool(((pos < -T) | (pos >= T)).any()):
            raise UserError(f"pos_slice {pos.tolist()} has positions outside 0..{T - 1}")
        pos = pos % T
    if len(pos) == 0:
        raise UserError("pos_slice picks no positions")
    fns = _translators(translators, n + 1)
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n)]
    _, cache = run_with_cache(model, ids, names, positions=positions, mask=mask)
    dev_pos = pos.to(ids.device)
    resid = torch.stack([cache[name][:, dev_pos] for name in names])  # [R, B, P, d]
    targets = _targets(target, ids, dev_pos, vocab)
    top_ids, top_probs, t_probs, t_ranks = [], [], [], []
    with torch.no_grad():
        for row in range(n + 1):
            probs = _read(model, resid[row], (fns or {}).get(row)).float().softmax(-1)  # [B, P, V]
            p, i = probs.topk(top_k, dim=-1)
            top_ids.append(i)
            top_probs.append(p)
            if targets is not None:
                safe = targets.clamp(min=0)
                tp = probs.gather(-1, safe[..., None])[..., 0]
                rank = (probs > tp[..., None]).sum(-1)
                none = targets < 0
                t_probs.append(tp.masked_fill(none, float("nan")))
                t_ranks.append(rank.masked_fill(none, -1))
    labels = ["embed"] + [str(i) for i in range(n)]
    return LogitLens(labels, pos, ids.cpu(), torch.stack(top_ids).cpu(), torch.stack(top_probs).cpu(),
                     None if targets is None else targets.cpu(),
                     None if targets is None else torch.stack(t_probs).cpu(),
                     None if targets is None else torch.stack(t_ranks).cpu(), resid, model, fns)
