"""Head detectors and attention statistics: what each attention head does, as numbers per layer x head.

- `head_scores(model, seq_len=N, batch=B)`: on N random tokens repeated twice (optionally after a `prefix`, e.g.
  a BOS), one forward pass caching only the attention patterns, and per layer x head ([n_layers, n_heads]):
  `induction` (mean attention from each second-half position i to i - N + 1, the token after the earlier copy
  of the current one: the induction-head signature of Olsson et al. 2022), `previous` (to i - 1, over every
  position after the first of the repeated tokens) and `duplicate` (to i - N, the earlier copy itself).
  `scores_from_patterns(patterns, seq_len, start)` computes the same from patterns you already have.
- `sink_shares(model, ids)`: per layer x head, the mean share of attention that queries put on the first
  token (the "attention sink"), over every valid query but the first token itself (which can only see itself);
  padded batches: pass `valid` ([B, T] bool, True on real tokens), the first real token of each row counts.
- `lookback_lens(model, prompt, max_new_tokens)`: Lookback-Lens features (Chuang et al. 2024) of a generation:
  per generated token and layer x head, the lookback ratio A_ctx / (A_ctx + A_new), with A_ctx the mean
  attention on the prompt's tokens and A_new that on the tokens generated so far, recorded with `interp.record`
  during `decoderlab.generate`.
Only layers' patterns are hooked, so the other values of the forward pass are not kept.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import UserError
from ..masks import causal, padding
from ..model import Transformer
from .cache import record, run_with_cache

SCORES = ("induction", "previous", "duplicate")


def _pattern_names(model: Transformer) -> list[str]:
    return [f"blocks.{i}.attn.hook_pattern" for i in range(model.config.n_layers)]


@dataclass
class HeadScores:
    """Detector scores [n_layers, n_heads] each, and the repeated-token batch they were measured on."""

    induction: torch.Tensor
    previous: torch.Tensor
    duplicate: torch.Tensor
    tokens: torch.Tensor  # [batch, prefix + 2 * seq_len]
    seq_len: int
    prefix_len: int

    def best(self, kind: str = "induction") -> tuple[int, int, float]:
        """(layer, head, score) of the head scoring highest on `kind`."""
        grid = self[kind]
        flat = int(grid.argmax())
        layer, head = divmod(flat, grid.shape[1])
        return layer, head, float(grid[layer, head])

    def __getitem__(self, kind: str) -> torch.Tensor:
        if kind not in SCORES:
            raise UserError(f"unknown head score {kind!r}; one of {', '.join(SCORES)}")
        return getattr(self, kind)

    def to_json(self) -> dict:
        """A JSON-ready dict: each score as [layer][head] and the best head per score."""
        out: dict = {k: [[round(float(v), 6) for v in row] for row in self[k].tolist()] for k in SCORES}
        out["best"] = {k: dict(zip(("layer", "head", "score"), self.best(k), strict=True)) for k in SCORES}
        out["seq_len"], out["batch"], out["prefix_len"] = self.seq_len, self.tokens.shape[0], self.prefix_len
        return out


def repeated_tokens(vocab_size: int, seq_len: int, batch: int, *, seed: int = 0,
                    prefix: Sequence[int] | None = None, token_ids: Sequence[int] | None = None) -> torch.Tensor:
    """[batch, len(prefix) + 2 * seq_len]: `prefix`, then `seq_len` random tokens (uniform over `token_ids`, or
    all ids), then the same tokens again."""
    if seq_len < 2 or batch < 1:
        raise UserError(f"seq_len must be at least 2 and batch at least 1, got seq_len {seq_len}, batch {batch}")
    pool = torch.arange(vocab_size) if token_ids is None else torch.as_tensor(list(token_ids), dtype=torch.long)
    if len(pool) < 2 or bool(((pool < 0) | (pool >= vocab_size)).any()):
        raise UserError(f"token_ids must hold at least two ids in [0, {vocab_size})")
    gen = torch.Generator().manual_seed(seed)
    half = pool[torch.randint(len(pool), (batch, seq_len), generator=gen)]
    pre = torch.as_tensor(list(prefix or []), dtype=torch.long).expand(batch, -1)
    return torch.cat([pre, half, half], dim=1)


def scores_from_patterns(patterns: Sequence[torch.Tensor] | torch.Tensor, seq_len: int,
                         start: int = 0) -> dict[str, torch.Tensor]:
    """Detector scores from attention patterns of a repeated-token batch: `patterns` per layer [B, H, T, T] (or
    stacked [L, B, H, T, T]), the repeat starting at `start` (the prefix length) with halves of `seq_len`.
    Returns {"induction", "previous", "duplicate"} -> [L, H] (mean over batch and the positions scored)."""
    stacked = patterns if isinstance(patterns, torch.Tensor) else torch.stack(list(patterns))
    T = stacked.shape[-1]
    if T != start + 2 * seq_len:
        raise UserError(f"patterns over {T} keys do not fit a prefix of {start} and two halves of {seq_len}")
    stacked = stacked.float()
    second = torch.arange(start + seq_len, start + 2 * seq_len)
    every = torch.arange(start + 1, start + 2 * seq_len)

    def along(queries: torch.Tensor, offset: int) -> torch.Tensor:
        # pattern[..., q, q - offset] for each query q, averaged over batch and queries: [L, H]
        return stacked[:, :, :, queries, queries - offset].mean(dim=(1, 3))

    return {"induction": along(second, seq_len - 1), "previous": along(every, 1), "duplicate": along(second, seq_len)}


def head_scores(model: Transformer, seq_len: int = 64, batch: int = 8, *, seed: int = 0,
                prefix: Sequence[int] | None = None, token_ids: Sequence[int] | None = None) -> HeadScores:
    """Induction, previous-token and duplicate-token scores per layer x head on `batch` rows of `seq_len` random
    tokens repeated twice (after `prefix`, e.g. `[tokenizer.bos_id]`); see the module doc."""
    prefix = list(prefix or [])
    total = len(prefix) + 2 * seq_len
    if total > model.config.context_length:
        raise UserError(f"{len(prefix)} prefix + 2 x {seq_len} tokens exceed the model's context length "
                        f"{model.config.context_length}; lower seq_len")
    tokens = repeated_tokens(model.config.vocab_size, seq_len, batch, seed=seed, prefix=prefix, token_ids=token_ids)
    names = _pattern_names(model)
    _, cache = run_with_cache(model, tokens.to(model.device), names, device="cpu", dtype=torch.float32)
    scores = scores_from_patterns([cache[name] for name in names], seq_len, len(prefix))
    return HeadScores(scores["induction"], scores["previous"], scores["duplicate"], tokens, seq_len, len(prefix))


def sink_shares(model: Transformer, ids: torch.Tensor | Sequence[int], *, valid: torch.Tensor | None = None,
                positions: torch.Tensor | None = None) -> torch.Tensor:
    """[n_layers, n_heads]: the mean share of attention on each row's first (real) token, over all other valid
    queries of the batch. `valid` [B, T] marks real tokens of a padded batch (positions then count from each
    row's first real token unless given)."""
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() == 1:
        ids = ids[None]
    if ids.dim() != 2 or ids.shape[1] < 2:
        raise UserError(f"sink shares need [batch, time] ids with at least 2 tokens, got {tuple(ids.shape)}")
    B, T = ids.shape
    kwargs = {}
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool)
    else:
        valid = torch.as_tensor(valid, dtype=torch.bool).cpu()
        if valid.shape != (B, T):
            raise UserError(f"valid must be [batch, time] {(B, T)} like ids, got {tuple(valid.shape)}")
        if positions is None:
            positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
        kwargs = dict(mask=causal() & padding(valid.to(model.device)), positions=positions.to(model.device))
    names = _pattern_names(model)
    _, cache = run_with_cache(model, ids.to(model.device), names, device="cpu", dtype=torch.float32, **kwargs)
    first = valid.long().argmax(-1)  # [B]: index of each row's first real token
    queries = valid.clone()
    queries[torch.arange(B), first] = False
    if not bool(queries.any()):
        raise UserError("sink shares need at least one row with two real tokens")
    out = []
    for name in names:
        pattern = cache[name]  # [B, H, T, T]
        on_first = pattern[torch.arange(B), :, :, first]  # [B, H, T] (advanced index first: batch leads)
        weight = queries[:, None, :].float()
        out.append((on_first * weight).sum(dim=(0, 2)) / weight.sum(dim=(0, 2)))
    return torch.stack(out)


@dataclass
class LookbackFeatures:
    """Lookback-Lens features of one generation.

    ratios: [new tokens, n_layers, n_heads], A_ctx / (A_ctx + A_new) for the step that produced each token
    (1.0 for the first, which sees no generated tokens yet). context / new: [new tokens, n_layers, n_heads],
    mean attention on the prompt's tokens and on the generated ones (0 for the first step).
    tokens: the generated ids; prompt_len: the prompt's length.
    """

    ratios: torch.Tensor
    context: torch.Tensor
    new: torch.Tensor
    tokens: list[int]
    prompt_len: int

    def features(self) -> torch.Tensor:
        """The classifier's input of the Lookback-Lens paper: ratios averaged over the generated span,
        flattened to [n_layers * n_heads]."""
        return self.ratios.mean(0).flatten()


def lookback_lens(model: Transformer, prompt: Sequence[int] | torch.Tensor, max_new_tokens: int = 32,
                  **generate_kwargs) -> LookbackFeatures:
    """Generate from one `prompt` (ids) with `decoderlab.generate` (its other arguments in `generate_kwargs`)
    while recording each step's attention patterns; the per-step Lookback-Lens features."""
    from ..generation import generate

    prompt = [int(i) for i in torch.as_tensor(prompt).flatten().tolist()] if isinstance(prompt, torch.Tensor) \
        else [int(i) for i in prompt]
    if not prompt:
        raise UserError("lookback_lens needs a non-empty prompt")
    if generate_kwargs.get("compile") or generate_kwargs.get("decoder") is not None:
        raise UserError("lookback_lens records plain decoding; leave out compile and decoder")
    n = len(prompt)
    with record(model, _pattern_names(model), device="cpu", dtype=torch.float32) as rec:
        result = generate(model, [prompt], max_new_tokens, **generate_kwargs)
    new_tokens = result.tokens[0]
    ctx, gen = [], []
    for step in range(len(new_tokens)):
        layers_ctx, layers_new = [], []
        for name in _pattern_names(model):
            row = rec[step][name][0, :, -1]  # [H, keys]: the query that produced token `step`
            if row.shape[-1] != n + step:
                raise UserError(f"recorded attention of step {step} covers {row.shape[-1]} keys, expected "
                                f"{n + step}; lookback_lens needs plain decoding of one prompt")
            layers_ctx.append(row[:, :n].mean(-1))
            layers_new.append(row[:, n:].mean(-1) if step else torch.zeros(row.shape[0]))
        ctx.append(torch.stack(layers_ctx))
        gen.append(torch.stack(layers_new))
    L, H = model.config.n_layers, model.config.n_heads
    context = torch.stack(ctx) if ctx else torch.zeros(0, L, H)
    new = torch.stack(gen) if gen else torch.zeros(0, L, H)
    ratios = context / (context + new).clamp(min=1e-12)
    return LookbackFeatures(ratios, context, new, list(new_tokens), n)
