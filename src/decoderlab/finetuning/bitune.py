"""Bitune-style prompts: the instruction part attends bidirectionally, in training and at inference.

Training rows pack several examples; each example's prompt slots see one another (both ways) and nothing of other
examples, every other slot stays causal: `(causal & document(doc_ids)) | document(prompt_blocks)`, where the
prompt slots of example d carry block id d and every other slot an id of its own. At inference the prompt is
prefilled under `causal | prefix(T)` (over its real tokens), so its KV cache holds exactly the keys and values
training computed; the generated tokens are causal as usual.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import masks
from ..generation.engine import CachedDecoder, DecodeRequest


def training_mask(doc_ids: Tensor, prompt: Tensor) -> masks.Mask:
    """The mask of packed rows [B, T]: causal within each example, bidirectional within each example's prompt."""
    T = doc_ids.shape[-1]
    # Slots outside any prompt get distinct negative ids, so they match only themselves (already causal).
    own = -1 - torch.arange(T, device=doc_ids.device).expand_as(doc_ids)
    blocks = torch.where(prompt, doc_ids, own)
    return (masks.causal() & masks.document(doc_ids)) | masks.document(blocks)


class BidirectionalPromptDecoder(CachedDecoder):
    """`generate(..., decoder=BidirectionalPromptDecoder)`: the prompt attends bidirectionally over its real
    tokens (left padding excluded), generated tokens causally; positions count from each row's first real
    token, as in training."""

    @torch.inference_mode()
    def __init__(self, request: DecodeRequest) -> None:
        super().__init__(request)
        T = request.prompt_length
        generated = masks.Mask(lambda b, q, k: k >= T, f"generated(from {T})")
        self.mask = (masks.causal() | masks.prefix(T)) & (masks.padding(self.valid) | generated)
        self.positions = (self.valid.long().cumsum(-1) - 1).clamp(min=0)
        self.next_positions = self.lengths[:, None].clone()
