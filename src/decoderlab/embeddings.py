"""Sentence embeddings from a decoder-only `Transformer`, training-free: last-token, mean, PromptEOL,
echo, token prepending and bidirectional (mask lifted) pooling, batched with left or right padding; and the
trained Causal2Vec head (`pooling="causal2vec", head=...`, decoderlab.causal2vec).

`embed(model, texts, tokenizer, pooling=...)` returns a float32 tensor [N, d]; `Encoder` wraps it with a
sentence-transformers-style `encode`. See PAPERS.md, "Sentence embeddings from a decoder-only model".
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import causal2vec, masks
from .causal2vec import Causal2Vec
from .errors import UserError
from .model import Transformer
from .tokenizer import Tokenizer

POOLINGS = ("last", "mean", "prompt-eol", "echo", "token-prepending", "bidirectional")
# Poolings that need a trained head (`head=`): Causal2Vec (decoderlab.causal2vec).
TRAINED_POOLINGS = ("causal2vec",)
ALL_POOLINGS = POOLINGS + TRAINED_POOLINGS

PROMPT_EOL = ('This sentence : "', '" means in one word:"')
ECHO_INSTRUCTION = "Rewrite the sentence"


@dataclass
class _Item:
    """One templated text: its ids, the [start, end) span to pool, and the placeholder slot (or -1)."""

    ids: list[int]
    start: int
    end: int
    placeholder: int = -1


def token_prepending_layers(n_layers: int) -> tuple[int, int]:
    """Default (last replacement layer k, early-exit hidden state) for a model of `n_layers` blocks.

    Scaled from the paper's Llama-2-7B setting (replace in layers 1..7 of 32, exit at layer 27 of 32). k is
    at least 1 so that some replacement happens; the exit is at least k + 1 so that the last block that saw
    a replaced placeholder has run, and at most n_layers.
    """
    k = min(max(1, round(7 * n_layers / 32)), max(1, n_layers - 1))
    exit_layer = min(max(k + 1, round(27 * n_layers / 32)), n_layers)
    return k, exit_layer


def default_placeholder_id(model: Transformer, tokenizer: Tokenizer) -> int:
    """The id standing for the `<PST>` placeholder when none is given.

    If the model's embedding table has rows the tokenizer never produces, the first of them is used: a
    token the text cannot contain, as the paper's new `<PST>` token (its embedding only matters in block 0;
    from block 1 on its state is overwritten). Otherwise the tokenizer's last id, in practice a rarely used
    token (often a special token); pass `placeholder_id` to choose another.
    """
    if model.config.vocab_size > tokenizer.vocab_size:
        return tokenizer.vocab_size
    return tokenizer.vocab_size - 1


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    # Template parts continue each other: the tokenizer's own special tokens (a BOS) go only at the start.
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def _build(texts: Sequence[str], tokenizer: Tokenizer, pooling: str, instruction: str,
           placeholder_id: int, bos: list[int]) -> list[_Item]:
    # Template parts are tokenized separately and concatenated, so the span of the pooled part is exact
    # (tokenizing the joined string could merge tokens across a part boundary with BPE).
    enc = [_encode(tokenizer, t) for t in texts]
    items = []
    if pooling in ("prompt-eol", "token-prepending"):
        head, tail = _encode(tokenizer, PROMPT_EOL[0]), _encode(tokenizer, PROMPT_EOL[1])
        pst = [placeholder_id] if pooling == "token-prepending" else []
        for ids in enc:
            full = bos + head + pst + ids + tail
            items.append(_Item(full, len(full) - 1, len(full), len(bos) + len(head) if pst else -1))
    elif pooling == "echo":
        head = _encode(tokenizer, f"Instruct: {instruction}\nQuery: ")
        again = _encode(tokenizer, "\nQuery again: ")
        for ids in enc:
            first = bos + head + ids + again
            items.append(_Item(first + ids, len(first), len(first) + len(ids)))
    else:
        for ids in enc:
            full = bos + ids
            start = len(full) - 1 if pooling == "last" else len(bos)
            items.append(_Item(full, start, len(full)))
    return items


def embed(
    model: Transformer,
    texts: list[str],
    tokenizer: Tokenizer,
    pooling: str = "mean",
    batch_size: int = 32,
    layer: int | None = None,
    padding_side: str = "left",
    normalize: bool = True,
    *,
    instruction: str = ECHO_INSTRUCTION,
    placeholder_id: int | None = None,
    prepend_layers: int | None = None,
    bos_id: int | None = None,
    head: Causal2Vec | str | os.PathLike | None = None,
) -> torch.Tensor:
    """Embeddings [N, d] (float32, L2-normalised unless `normalize=False`) of `texts`.

    pooling: "last" (last real token), "mean" (mean over real tokens), "prompt-eol" (last token of the
    PromptEOL template), "echo" (mean over the second copy of the text), "token-prepending" (PromptEOL with a
    placeholder before the sentence whose state, in blocks 1..prepend_layers, is replaced by the previous
    layer's last-token state; early exit) or "bidirectional" (no causal mask, mean over real tokens).
    layer: which entry of `hidden_states` to pool (0 = embeddings, n_layers = final normed output, the
    default; negative counts from the end); token-prepending defaults to its early-exit layer, an un-normed
    residual stream as in the paper. Padding never enters the pooled vectors nor the attention of real
    tokens: positions count real tokens only and the padding mask hides pad keys.
    bos_id: prepended to every sequence; None: whatever the tokenizer puts before a text (Llama's BOS, nothing
        for GPT-2), as transformers' tokenizer does. Never pooled by mean/echo.
    head: for pooling "causal2vec", the trained head (a `decoderlab.causal2vec.Causal2Vec` or the folder
        `save_causal2vec` wrote): vectors [N, 2 d], the contextual token's and the last token's final states.
    """
    if pooling not in ALL_POOLINGS:
        raise UserError(f"unknown pooling {pooling!r}; choose one of {', '.join(ALL_POOLINGS)}")
    if padding_side not in ("left", "right"):
        raise UserError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if isinstance(texts, str):
        raise UserError("texts must be a list of strings, got a single string; wrap it in a list")
    texts = list(texts)
    if not texts:
        raise UserError("no texts to embed; pass a non-empty list of strings")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise UserError(f"text #{i} is a {type(t).__name__}, not a string")
        if not t:
            raise UserError(f"text #{i} is empty; there is nothing to embed")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive int, got {batch_size!r}")
    if pooling == "causal2vec":
        if layer is not None:
            raise UserError("pooling 'causal2vec' reads the final hidden states; leave out layer")
        return causal2vec.embed_texts(causal2vec.resolve_head(head, model), model, texts, tokenizer,
                                      batch_size=batch_size, padding_side=padding_side, normalize=normalize)
    if head is not None:
        raise UserError(f"head= is for pooling 'causal2vec'; pooling {pooling!r} is training-free")
    n_layers = model.config.n_layers
    k, exit_layer = token_prepending_layers(n_layers)
    if prepend_layers is not None:
        if not 1 <= prepend_layers < n_layers:
            raise UserError(f"prepend_layers must lie in [1, {n_layers - 1}], got {prepend_layers}")
        k = prepend_layers
    if layer is None:
        layer = exit_layer if pooling == "token-prepending" else n_layers
    if not -(n_layers + 1) <= layer <= n_layers:
        raise UserError(f"layer must lie in [{-(n_layers + 1)}, {n_layers}] for this {n_layers}-layer model, "
                        f"got {layer}")
    layer %= n_layers + 1
    if placeholder_id is None:
        placeholder_id = default_placeholder_id(model, tokenizer)
    if not 0 <= placeholder_id < model.config.vocab_size:
        raise UserError(f"placeholder_id {placeholder_id} is outside the model's vocabulary of "
                        f"{model.config.vocab_size}")

    bos = list(tokenizer.added_tokens[0]) if bos_id is None else [bos_id]
    items = _build(texts, tokenizer, pooling, instruction, placeholder_id, bos)
    ctx = model.config.context_length
    for i, item in enumerate(items):
        if item.start >= item.end:
            raise UserError(f"text #{i} is empty; there is nothing to pool")
        if len(item.ids) > ctx:
            raise UserError(f"text #{i} is {len(item.ids)} tokens with the {pooling} template, over the model's "
                            f"context length {ctx}; shorten it")

    out = []
    # Dropout would make embeddings random; run in eval mode and give the model back as it came.
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for b in range(0, len(items), batch_size):
                out.append(_embed_batch(model, items[b:b + batch_size], pooling, layer, k, padding_side))
    finally:
        model.train(was_training)
    emb = torch.cat(out).float()
    return F.normalize(emb, dim=-1) if normalize else emb


def _embed_batch(model: Transformer, items: list[_Item], pooling: str, layer: int, k: int,
                 padding_side: str) -> torch.Tensor:
    device = model.device
    B, T = len(items), max(len(it.ids) for it in items)
    lengths = torch.tensor([len(it.ids) for it in items], device=device)
    # Where each row's text starts in the padded row: padding goes before it (left) or after it (right).
    offset = T - lengths if padding_side == "left" else torch.zeros_like(lengths)
    slot = torch.arange(T, device=device)
    valid = (slot >= offset[:, None]) & (slot < (offset + lengths)[:, None])
    ids = torch.zeros(B, T, dtype=torch.long, device=device)  # pad id 0: any id works, it is masked out
    ids[valid] = torch.tensor([t for it in items for t in it.ids], dtype=torch.long, device=device)
    # Positions count real tokens only, so a text gets the same positions whatever padding surrounds it.
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    mask = masks.padding(valid) if pooling == "bidirectional" else masks.causal() & masks.padding(valid)

    edit: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    if pooling == "token-prepending":
        rows = torch.arange(B, device=device)
        pst = offset + torch.tensor([it.placeholder for it in items], device=device)
        last = offset + lengths - 1

        def edit(i: int, x: torch.Tensor) -> torch.Tensor:
            # x entering block i is block i-1's output: hand the placeholder the last token's summary.
            if 1 <= i <= k:
                x = x.index_put((rows, pst), x[rows, last])
            return x

    hidden = model(ids, positions=positions, mask=mask, hidden_states=True, edit_residual=edit).hidden_states
    h = hidden[layer].float()
    start = offset + torch.tensor([it.start for it in items], device=device)
    end = offset + torch.tensor([it.end for it in items], device=device)
    weight = ((slot >= start[:, None]) & (slot < end[:, None])).float()
    return (h * weight[..., None]).sum(1) / weight.sum(1, keepdim=True)


class Encoder:
    """A sentence-transformers-style wrapper: `Encoder(model, tokenizer, pooling=...).encode(texts)`."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, pooling: str = "mean", layer: int | None = None,
                 padding_side: str = "left", **options) -> None:
        if pooling not in ALL_POOLINGS:
            raise UserError(f"unknown pooling {pooling!r}; choose one of {', '.join(ALL_POOLINGS)}")
        if pooling == "causal2vec":  # a head folder is loaded once, not at every encode
            options["head"] = causal2vec.resolve_head(options.get("head"), model)
        self.model, self.tokenizer = model, tokenizer
        self.pooling, self.layer, self.padding_side, self.options = pooling, layer, padding_side, options

    def encode(self, texts: str | list[str], batch_size: int = 32, normalize_embeddings: bool = True,
               convert_to_numpy: bool = True) -> np.ndarray | torch.Tensor:
        """Embeddings [N, d] of a list of texts, or [d] of a single string; numpy float32 unless told."""
        single = isinstance(texts, str)
        emb = embed(self.model, [texts] if single else list(texts), self.tokenizer, self.pooling,
                    batch_size=batch_size, layer=self.layer, padding_side=self.padding_side,
                    normalize=normalize_embeddings, **self.options)
        if single:
            emb = emb[0]
        return emb.cpu().numpy() if convert_to_numpy else emb
