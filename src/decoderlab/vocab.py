"""Giving a model and its tokenizer a mask token: the special token masked-LM and diffusion models read in place of
a hidden token.

`add_mask_token(model, tokenizer)` does both halves. The tokenizer half (`ensure_mask_token`) reuses a mask token
it already has (role "mask_token", or a "<mask>" token without the role), else adds "<mask>" as a special token at
the next free id. The model half (`fit_token_row`) makes sure the embedding (and an untied LM head) has a row for
that id: a model whose vocabulary is padded past the tokenizer's already has one, which no text ever produced and is
set to the mean of the tokenizer's rows; otherwise the matrices grow, the old rows untouched and the new one the
mean of the old. The mean keeps the new token's input on the scale of the others and its logit at an average one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .errors import UserError
from .model import Transformer
from .tokenizer import Tokenizer

MASK_TOKEN = "<mask>"


@dataclass(frozen=True)
class MaskToken:
    """A tokenizer's mask token: its `id`, and whether `ensure_mask_token` just `added` it (its model row is then
    one no text has trained)."""

    id: int
    added: bool


def ensure_mask_token(tokenizer: Tokenizer, token: str = MASK_TOKEN) -> MaskToken:
    """The tokenizer's mask token, added as a special token (role "mask_token") if it has none."""
    if tokenizer.mask_id is not None:
        return MaskToken(tokenizer.mask_id, False)
    if tokenizer.token_to_id(token) is not None:  # there, but without the role
        return MaskToken(tokenizer.add_special_token(token, role="mask_token"), False)
    return MaskToken(tokenizer.add_special_token(token, role="mask_token"), True)


@torch.no_grad()
def fit_token_row(model: Transformer, token_id: int, fresh: bool) -> None:
    """Make sure `model` has an embedding row (and LM head row) for `token_id`.

    Past the model's vocabulary the matrices grow to `token_id + 1` rows, the new ones set to the mean of the old.
    Within it, a `fresh` row (a token the tokenizer just gained) is set to the mean of the rows below it; an
    existing token's row is left as it is."""
    if not isinstance(token_id, int) or token_id < 0:
        raise UserError(f"token id must be a non-negative integer, got {token_id!r}")
    if model.quantization is not None:
        raise UserError("this model is quantized; add the token to the float model (before quantizing)")
    config = model.config
    if token_id < config.vocab_size and not fresh:
        return
    model.unpack()  # packed copies would hold the old matrices
    matrices = [model.embed.weight] + ([] if config.tie_embeddings else [model.lm_head.weight])
    if token_id < config.vocab_size:
        for weight in matrices:
            weight[token_id] = weight[:max(1, token_id)].float().mean(0).to(weight.dtype)
        return
    extra = token_id + 1 - config.vocab_size
    grown = []
    for weight in matrices:
        mean = weight.float().mean(0, keepdim=True).to(weight.dtype)
        grown.append(nn.Parameter(torch.cat([weight.detach(), mean.expand(extra, -1)]),
                                  requires_grad=weight.requires_grad))
    model.embed.weight = grown[0]
    model.embed.num_embeddings = token_id + 1
    model.config = config.replace(vocab_size=token_id + 1)
    if config.tie_embeddings:
        model.tie_weights()
    else:
        model.lm_head.weight = grown[1]
    model.lm_head.out_features = token_id + 1


def add_mask_token(model: Transformer, tokenizer: Tokenizer, token: str = MASK_TOKEN) -> int:
    """Give `tokenizer` a mask token (its own, else `token` added as a special token) and `model` a row for it
    (see the module doc); record it as the model's `mask_token_id` and return its id. Calling it again is a
    no-op. Save both (`decoderlab.save(model, folder, tokenizer=tokenizer)`) and they load back with it."""
    mask = ensure_mask_token(tokenizer, token)
    if model.config.mask_token_id is not None and model.config.mask_token_id != mask.id:
        raise UserError(f"the model's mask_token_id is {model.config.mask_token_id} but the tokenizer's mask token "
                        f"{tokenizer.id_to_token(mask.id)!r} is id {mask.id}; use the tokenizer saved with the model")
    fit_token_row(model, mask.id, fresh=mask.added)
    model.config = model.config.replace(mask_token_id=mask.id)
    return mask.id
