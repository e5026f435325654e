"""PINE, position-invariant inference: the answer does not depend on the order of the segments (documents,
options) in the prompt. Training-free; works on any RoPE model decoderlab loads.

The input is a prefix, segments 1..n and a suffix (see PAPERS.md, "PINE"). In every layer and head:
1. segment tokens see all of every other segment (bidirectional between segments), causally their own;
2. each query ranks the other segments by its attention to them computed without positions (per-token mean
   over the segment; a segment's tokens rank from their pooled attention, suffix and generated tokens each
   from their own), and
3. the segments are re-placed for that query: all are stacked to end just before the suffix, and each is moved
   back by the lengths of the segments it ranks below, so more important segments sit nearer the query.
Since RoPE scores depend only on query position minus key position, moving a key segment back by s is the same
as moving the query forward by s: keys are rotated once, at their stacked positions (and cached so), and each
query is rotated once per segment. Everything is batched and vectorised over tokens, heads and segments.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from . import masks
from .errors import UserError
from .generation.engine import CACHE_CHUNK, PAD_ID, CachedDecoder, DecodeRequest, GenerationResult, stream
from .model import Transformer, apply_rope, rope_angles
from .tokenizer import Tokenizer


@dataclass
class PineInput:
    """One PINE prompt as token ids: `prefix`, then `segments` (order-free), then `suffix`."""

    prefix: list[int]
    segments: list[list[int]]
    suffix: list[int]

    @property
    def tokens(self) -> list[int]:
        """The plain prompt: prefix, segments in the given order, suffix."""
        return [*self.prefix, *(t for s in self.segments for t in s), *self.suffix]


def _as_input(item: PineInput | Sequence[Any], vocab_size: int, where: str = "") -> PineInput:
    if not isinstance(item, PineInput):
        if not isinstance(item, Sequence) or len(item) != 3:
            raise UserError(f"a PINE input{where} is (prefix, segments, suffix) token-id lists or a PineInput")
        item = PineInput(*item)
    try:
        prefix = [int(t) for t in item.prefix]
        segments = [[int(t) for t in s] for s in item.segments]
        suffix = [int(t) for t in item.suffix]
    except (TypeError, ValueError):
        raise UserError(f"PINE input{where}: prefix, suffix and every segment must be lists of token ids") from None
    if not segments:
        raise UserError(f"PINE input{where} has no segments; pass the documents or options to reorder as a list "
                        "of token-id lists")
    for j, seg in enumerate(segments):
        if not seg:
            raise UserError(f"segment {j}{where} is empty; every segment needs at least one token")
    if not suffix:
        raise UserError(f"the suffix{where} is empty; PINE predicts after a suffix that follows the segments "
                        "(e.g. 'Answer:'), which sees every segment")
    for t in (*prefix, *suffix, *(t for s in segments for t in s)):
        if not 0 <= t < vocab_size:
            raise UserError(f"PINE input{where} holds {t}, not a token id in [0, {vocab_size})")
    return PineInput(prefix, segments, suffix)


def _check_model(model: Transformer, longest: int, new_tokens: int) -> None:
    cfg = model.config
    if cfg.positions != "rope":
        raise UserError(f"PINE needs a RoPE model: it re-places segments by rotating keys to new positions per "
                        f"query, and this model's positions are {cfg.positions!r} (learned absolute position "
                        "embeddings are added to the input once and cannot be re-placed per layer and head)")
    total = longest + new_tokens
    if total > cfg.context_length:
        raise UserError(f"the PINE prompt of {longest} tokens plus {new_tokens} new ones exceeds the model's "
                        f"context length of {cfg.context_length}; shorten the segments")
    if cfg.sliding_window is not None and total > cfg.sliding_window:
        raise UserError(f"{total} tokens exceed this model's sliding window of {cfg.sliding_window}; PINE "
                        "attends to whole segments, so keep prompt and output within the window")


class _Layout:
    """A batch of PINE prompts, left-padded to one length, with each slot's segment and stacked position.

    Slot s of row b holds the token ids[b, s]; group[b, s] is its segment (1..J) or 0 (prefix, suffix, padding
    and generated tokens); positions[b, s] its position with every segment ending at prefix + total segment length.
    Segment j's r-th token sits at slot seg_slots[b, j, r] (seg_valid marks real ones).
    """

    def __init__(self, items: list[PineInput], steps: int, device: torch.device, sort_segments: bool = True) -> None:
        if sort_segments:
            # A canonical order (by token ids) first: float rounding then cannot depend on the input order, so
            # exact ties in the ranking (segments of the same tokens, e.g. "37" and "73" in layer 0, where keys
            # carry no position) break the same way for every order. The method alone is order-free up to
            # rounding (tested with sort_segments=False).
            items = [PineInput(it.prefix, sorted(it.segments), it.suffix) for it in items]
        B = len(items)
        T = max(len(it.tokens) for it in items)
        J = max(len(it.segments) for it in items)
        Lmax = max(len(s) for it in items for s in it.segments)
        ids, group, positions = [], [], []
        seg_len = torch.zeros(B, J, dtype=torch.long)
        seg_slots = torch.zeros(B, J, Lmax, dtype=torch.long)
        seg_valid = torch.zeros(B, J, Lmax, dtype=torch.bool)
        next_position = []
        for b, it in enumerate(items):  # a loop over prompts, building index tables on the host
            pad = T - len(it.tokens)
            P, L = len(it.prefix), sum(len(s) for s in it.segments)
            ids.append([PAD_ID] * pad + it.tokens)
            group.append([0] * (pad + P))
            positions.append([0] * pad + list(range(P)))
            slot = pad + P
            for j, seg in enumerate(it.segments):
                n = len(seg)
                group[-1] += [j + 1] * n
                positions[-1] += range(P + L - n, P + L)
                seg_len[b, j] = n
                seg_slots[b, j, :n] = torch.arange(slot, slot + n)
                seg_valid[b, j, :n] = True
                slot += n
            group[-1] += [0] * len(it.suffix)
            positions[-1] += range(P + L, P + L + len(it.suffix))
            next_position.append(P + L + len(it.suffix))
        self.ids = torch.tensor(ids, device=device)
        lengths = torch.tensor([len(it.tokens) for it in items], device=device)
        valid = torch.arange(T, device=device) >= (T - lengths)[:, None]
        self.valid = valid
        # Generated tokens: outside every segment, at the next positions.
        extra = torch.arange(steps, device=device)
        self.group = torch.cat([torch.tensor(group, device=device), torch.zeros(B, steps, dtype=torch.long,
                                                                                 device=device)], dim=1)
        self.positions = torch.cat([torch.tensor(positions, device=device),
                                    torch.tensor(next_position, device=device)[:, None] + extra], dim=1)
        self.seg_len = seg_len.to(device)
        self.seg_slots = seg_slots.to(device)
        self.seg_valid = seg_valid.to(device)
        self.mask = ((masks.causal() | masks.segments(self.group))
                     & masks.padding(torch.cat([valid, torch.ones(B, steps, dtype=torch.bool, device=device)], 1)))
        # For merging per-segment scores into slot order: slot -> index into the flattened [J, Lmax] block.
        S = T + steps
        flat = torch.zeros(B, S, dtype=torch.long, device=device)
        index = (torch.arange(J, device=device)[:, None] * Lmax + torch.arange(Lmax, device=device)).expand(B, J, Lmax)
        flat.scatter_(1, self.seg_slots.flatten(1), torch.where(self.seg_valid, index, 0).flatten(1))
        self.seg_flat = flat
        self.in_segment = self.group > 0


class PineAttention:
    """The attention function PINE hands to `Transformer.forward(attention=...)`, with its own cache.

    A `KVCache` holds every slot's keys, rotated at their stacked positions, and values; beside it, per layer,
    the segments' keys in [J, Lmax] blocks, without positions (fp32, for the ranking) and rotated (for scores).
    """

    def __init__(self, model: Transformer, layout: _Layout, cache_dtype: torch.dtype | None = None,
                 slots: int | None = None) -> None:
        # `slots`: the cache's first size (it grows as generation needs, up to every slot of the layout).
        self.limit = layout.group.shape[1]
        self.cache = model.new_cache(layout.ids.shape[0], slots or self.limit, dtype=cache_dtype)
        self.seg_keys_raw: list[Tensor | None] = [None] * model.config.n_layers
        self.seg_keys: list[Tensor | None] = [None] * model.config.n_layers
        self.inv_freq = model.rope_inv_freq
        self.layout = layout
        self._step: dict[str, Tensor] | None = None

    def begin(self, n_new: int) -> None:
        """Prepare a forward pass over the next `n_new` slots (tables shared by every layer)."""
        lay, start = self.layout, self.cache.length
        end = start + n_new
        self.cache.reserve(end, limit=self.limit)
        q_slots = torch.arange(start, end, device=lay.ids.device)
        allowed = lay.mask.materialize(q_slots, torch.arange(end, device=lay.ids.device),
                                       batch_size=lay.ids.shape[0], device=lay.ids.device)
        allowed = allowed | ~allowed.any(dim=-1, keepdim=True)  # padding queries: garbage, never NaN
        q_group = lay.group[:, start:end]
        J = lay.seg_len.shape[1]
        own = q_group[:, :, None] == torch.arange(1, J + 1, device=q_group.device)  # [B, T, J]
        positions = lay.positions[:, start:end]
        cos, sin = rope_angles(positions[:, None], self.inv_freq, self.cache.keys.dtype)  # [B, 1, T, D]
        self._step = {
            "allowed": allowed, "own": own, "positions": positions, "cos": cos, "sin": sin,
            "in_segment": lay.in_segment[:, :end], "seg_flat": lay.seg_flat[:, :end],
        }

    def advance(self) -> None:
        self.cache.advance(self._step["positions"].shape[1])
        self._step = None

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        st, lay = self._step, self.layout
        B, H, T, D = q.shape
        Hkv = k.shape[1]
        G = H // Hkv
        dtype = self.cache.keys.dtype
        q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
        k_rot = apply_rope(k, st["cos"], st["sin"])
        first = self.cache.length == 0  # the prompt pass: every segment is in it
        keys, values = self.cache.update(layer, k_rot, v)
        end = keys.shape[2]
        if first:
            slots = lay.seg_slots.flatten(1)[:, None, :, None].expand(B, Hkv, -1, D)
            J, Lmax = lay.seg_slots.shape[1:]
            self.seg_keys_raw[layer] = k.gather(2, slots).view(B, Hkv, J, Lmax, D).float()
            self.seg_keys[layer] = k_rot.gather(2, slots).view(B, Hkv, J, Lmax, D)
        seg_raw, seg_rot = self.seg_keys_raw[layer], self.seg_keys[layer]
        # Queries grouped by the key head they share: [B, Hkv, G*T, D] (GQA without copying keys).
        qg = q.reshape(B, Hkv, G * T, D)
        scale = 1.0 / math.sqrt(D)

        # 1. Importance of each segment to each query, without positions: softmax over the keys of the other
        # segments, summed per segment, divided by its length. Own segment and missing segments excluded.
        raw = torch.einsum("bhtd,bhjld->bhtjl", qg.float(), seg_raw).reshape(B, H, T, -1) * scale
        seen = (lay.seg_valid[:, None, None] & ~st["own"][:, None, :, :, None]).flatten(-2)  # [B, 1, T, J*Lmax]
        probs = raw.masked_fill(~seen, -math.inf).softmax(dim=-1).nan_to_num(0.0)
        J = lay.seg_len.shape[1]
        seg_len = lay.seg_len.float()
        per_segment = probs.view(B, H, T, J, -1).sum(-1) / seg_len.clamp(min=1)[:, None, None]  # [B, H, T, J]
        # A segment's tokens share one ranking, from their summed attention (as the paper's doc-to-doc scores).
        own = st["own"].float()  # [B, T, J]
        pooled = torch.einsum("btj,bhtk->bhjk", own, per_segment)
        pooled = torch.einsum("btj,bhjk->bhtk", own, pooled)
        importance = torch.where(st["own"].any(-1)[:, None, :, None], pooled, per_segment)
        importance = importance.masked_fill(st["own"][:, None], math.inf)
        importance = importance.masked_fill((lay.seg_len == 0)[:, None, None], -math.inf)

        # 2. Shift of each segment for each query: the total length of the segments ranked above it.
        order = importance.argsort(dim=-1, descending=True, stable=True)
        lens = lay.seg_len[:, None, None].expand(B, H, T, J)
        ranked = lens.gather(-1, order)
        shift = (ranked.cumsum(-1) - ranked).gather(-1, order.argsort(dim=-1))  # [B, H, T, J]

        # 3. Scores: non-segment keys with the query at its own position; segment j's keys with the query
        # moved forward by shift[j] (the same as moving those keys back by it).
        q_plain = apply_rope(q, st["cos"], st["sin"])
        scores = (q_plain.reshape(B, Hkv, G * T, D) @ keys.transpose(-1, -2)).view(B, H, T, end)
        moved = st["positions"][:, None, :, None] + shift  # [B, H, T, J]
        q_moved = apply_rope(q[:, :, :, None, :], *rope_angles(moved, self.inv_freq, dtype))  # [B, H, T, J, D]
        seg_scores = torch.einsum("bhtjd,bhjld->bhtjl", q_moved.reshape(B, Hkv, G * T, J, D), seg_rot)
        seg_scores = seg_scores.reshape(B, H, T, -1)
        index = st["seg_flat"][:, None, None, :].expand(B, H, T, end)
        scores = torch.where(st["in_segment"][:, None, None, :], seg_scores.gather(-1, index), scores)
        scores = (scores.float() * scale).masked_fill(~st["allowed"], -math.inf)
        weights = scores.softmax(dim=-1).to(dtype)
        return (weights.view(B, Hkv, G * T, end) @ values).view(B, H, T, D)


@torch.inference_mode()
def _prompt_pass(model: Transformer, items: list[PineInput], keep: int = 1,
                 sort_segments: bool = True) -> tuple[Tensor, PineAttention]:
    layout = _Layout(items, 0, model.device, sort_segments)
    attention = PineAttention(model, layout)
    attention.begin(layout.ids.shape[1])
    logits = model(layout.ids, attention=attention, logits_to_keep=keep)
    attention.advance()
    return logits, attention


def _inputs(model: Transformer, items: Iterable[PineInput | Sequence[Any]], new_tokens: int = 0) -> list[PineInput]:
    items = list(items)
    if not items:
        raise UserError("no PINE inputs given; pass at least one (prefix, segments, suffix)")
    many = len(items) > 1
    checked = [_as_input(it, model.config.vocab_size, f" {i}" if many else "") for i, it in enumerate(items)]
    _check_model(model, max(len(it.tokens) for it in checked), new_tokens)
    return checked


def logits(model: Transformer, prefix: Sequence[int], segments: Sequence[Sequence[int]],
           suffix: Sequence[int], *, sort_segments: bool = True) -> Tensor:
    """Next-token logits [V] after `suffix`, with PINE over `segments` (token-id lists; see the module doc).

    The same for every order of `segments`; with one segment, the plain forward pass's. `sort_segments`
    first puts the segments in a canonical order (by token ids), so that float rounding and exact ties in the
    attention ranking cannot depend on the input order either: the output is then bit-for-bit the same
    (for the same batch shape: a multithreaded product may round a row differently at another batch position).
    """
    return batch_logits(model, [(prefix, segments, suffix)], sort_segments=sort_segments)[0]


def batch_logits(model: Transformer, items: Iterable[PineInput | Sequence[Any]], *,
                 sort_segments: bool = True) -> Tensor:
    """`logits` for a batch of (prefix, segments, suffix) inputs in one pass: [B, V] (fp32)."""
    was_training = model.training
    model.eval()
    try:
        out, _ = _prompt_pass(model, _inputs(model, items), sort_segments=sort_segments)
    finally:
        model.train(was_training)
    return out[:, -1].float()


def suffix_logits(model: Transformer, items: Iterable[PineInput | Sequence[Any]], *,
                  sort_segments: bool = True) -> list[Tensor]:
    """For each input, the logits [len(suffix), V] at every suffix token: row i predicts suffix[i + 1] (the
    last row, the next token). Scores continuations, e.g. each option's answer text appended to the suffix."""
    items = _inputs(model, items)
    keep = max(len(it.suffix) for it in items)
    was_training = model.training
    model.eval()
    try:
        out, _ = _prompt_pass(model, items, keep=keep, sort_segments=sort_segments)
    finally:
        model.train(was_training)
    return [out[b, keep - len(it.suffix):].float() for b, it in enumerate(items)]


class _PineDecoder(CachedDecoder):
    """The generation engine's default decoder with PINE forward passes (prompt, then one token per step)."""

    def __init__(self, request: DecodeRequest, items: list[PineInput], sort_segments: bool = True) -> None:
        if request.compile:
            raise UserError("compile=True is not supported with PINE (its attention is its own function); "
                            "leave it out")
        self.request, self.model = request, request.model
        self.layout = _Layout(items, request.max_new_tokens, request.model.device, sort_segments)
        self.attention: PineAttention | None = None  # made at the first step
        self.init_sampling(request, self.layout.ids, self.layout.valid)

    def logits(self) -> Tensor:
        if self.last is None:
            T = self.layout.ids.shape[1]
            self.attention = PineAttention(self.model, self.layout, self.request.cache_dtype,
                                           slots=T + min(self.request.max_new_tokens, CACHE_CHUNK))
            feed = self.layout.ids
        else:
            feed = self.last.masked_fill(self.done, PAD_ID)[:, None]
        self.attention.begin(feed.shape[1])
        out = self.model(feed, attention=self.attention, logits_to_keep=1)
        self.attention.advance()
        return out[:, -1]

    def close(self) -> None:
        self.attention = None


def generate(model: Transformer, prefix: Sequence[int], segments: Sequence[Sequence[int]], suffix: Sequence[int],
             max_new_tokens: int = 64, *, temperature: float | None = None, top_k: int | None = None,
             top_p: float | None = None, min_p: float | None = None, repetition_penalty: float | None = None,
             seed: int | None = None, stop_tokens: int | Iterable[int] | None = None,
             stop_strings: str | Iterable[str] | None = None, tokenizer: Tokenizer | None = None,
             cache_dtype: torch.dtype | None = None, logprobs: int | None = None,
             sort_segments: bool = True) -> GenerationResult:
    """Continue after `suffix` with PINE: every generated token also ranks and re-places the segments from its
    own point of view. Sampling, stops and logprobs as in `decoderlab.generate` (arguments left as None take the
    checkpoint's generation_config defaults; the default stop ids are every end id the model and tokenizer
    know); returns a `GenerationResult` for one row.
    """
    return batch_generate(model, [(prefix, segments, suffix)], max_new_tokens, temperature=temperature,
                          top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                          stop_tokens=stop_tokens, stop_strings=stop_strings, tokenizer=tokenizer,
                          cache_dtype=cache_dtype, logprobs=logprobs, sort_segments=sort_segments)


def batch_generate(model: Transformer, items: Iterable[PineInput | Sequence[Any]], max_new_tokens: int = 64, *,
                   temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                   min_p: float | None = None, repetition_penalty: float | None = None, seed: int | None = None,
                   stop_tokens: int | Iterable[int] | None = None, stop_strings: str | Iterable[str] | None = None,
                   tokenizer: Tokenizer | None = None, cache_dtype: torch.dtype | None = None,
                   logprobs: int | None = None, sort_segments: bool = True) -> GenerationResult:
    """`generate` for a batch of (prefix, segments, suffix) inputs, decoded together: the engine's `stream` with
    a PINE decoder, so stops, stop strings, text and finish reasons are plain decoding's."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    items = _inputs(model, items, max(max_new_tokens - 1, 0))

    def decoder(request: DecodeRequest) -> _PineDecoder:
        return _PineDecoder(request, items, sort_segments)

    return stream(model, [it.tokens for it in items], max_new_tokens, temperature=temperature, top_k=top_k,
                  top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                  stop_tokens=stop_tokens, stop_strings=stop_strings, tokenizer=tokenizer, cache_dtype=cache_dtype,
                  logprobs=logprobs, decoder=decoder).result()


def build(tokenizer: Tokenizer, template: str, documents: Sequence[str], *,
          segment_template: str = "{document}", add_bos: bool | None = None) -> PineInput:
    """A `PineInput` from text: `template` holds `{segments}` once, where the documents (or options) go, each
    formatted by `segment_template` (which holds `{document}`, e.g. "Option: {document}\\n").

    Prefix, each segment and suffix are tokenized separately (a BPE merge across their boundaries is lost).
    add_bos: start the prefix with the tokenizer's BOS token (True) or not (False); None: with whatever the
        tokenizer puts before a text (Llama's BOS, nothing for GPT-2), as transformers' tokenizer does.
    """
    if template.count("{segments}") != 1:
        raise UserError("the PINE template must hold '{segments}' exactly once, where the documents go, e.g. "
                        "'Question: ...\\n{segments}Answer:'")
    if "{document}" not in segment_template:
        raise UserError("segment_template must hold '{document}', e.g. 'Document: {document}\\n'")
    if isinstance(documents, str) or not documents:
        raise UserError("PINE needs a list of at least one document or option")
    before, after = template.split("{segments}")
    def enc(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    prefix = enc(before)
    if add_bos is None:
        prefix = tokenizer.added_tokens[0] + prefix
    elif add_bos:
        if tokenizer.bos_id is None:
            raise UserError("add_bos: this tokenizer has no BOS token")
        prefix = [tokenizer.bos_id, *prefix]
    segments = []
    for i, doc in enumerate(documents):
        ids = enc(segment_template.replace("{document}", doc))
        if not ids:
            raise UserError(f"document {i} is empty; every segment needs at least one token")
        segments.append(ids)
    return PineInput(prefix, segments, enc(after))
