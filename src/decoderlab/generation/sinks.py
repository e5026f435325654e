"""Streaming generation with attention sinks (StreamingLLM, Xiao et al. 2023): constant memory past the context.

`SinkWindow(window, sinks)` is a decoder factory (`stream(..., decoder=SinkWindow(w, s))`, or
`generate(..., window=w, sinks=s)`): its KV cache holds S + W slots, allocated once. The first S tokens stay
("attention sinks"); the last W tokens live in a ring over slots S .. S+W-1, each new token overwriting the
oldest. Until the cache is full, decoding is plain cached decoding, bit for bit.

Positions follow StreamingLLM: positions within the cache, not in the text. Every query sees the sinks at
positions 0..S-1 and the window contiguous after them, itself last. Keys are cached after RoPE, so instead of
re-rotating the window each step (O(W)), only the S sink keys move: the window keeps the rotations it was
written with (its distances to the query are the text's distances, which equal the cache's), and the sinks are
re-rotated from a kept copy each step by the number of evicted tokens, which puts them just before the window.
RoPE's scores depend only on relative angles, so this is StreamingLLM's rule exactly. Rotation positions are
rebased (the window rotated back, once every S + W steps) so angles stay small and fp32-precise however long the
stream runs.

Learned absolute positions (GPT-2) are baked into every layer's keys and cannot be re-assigned: each new token
gets its cache position (the last slot's, S + W - 1, once full), the cached keys keep theirs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import UserError
from ..model import apply_rope, rope_angles
from .engine import PAD_ID, CachedDecoder, DecodeRequest


def check_window(window: object, sinks: object, context_length: int | None = None) -> tuple[int, int]:
    """(window, sinks), else a one-line `UserError`: W >= 1, S >= 0, and S + W within the context if given."""
    for name, value, low in (("window", window, 1), ("sinks", sinks, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"{name} must be an integer >= {low}, got {value!r}")
    if context_length is not None and window + sinks > context_length:
        raise UserError(f"window + sinks = {window + sinks} exceeds the model's context length {context_length}: "
                        "the model never saw longer distances; use a smaller window")
    return window, sinks


class SinkWindow:
    """Decoder factory for streaming generation: S sink tokens plus the last W tokens in the KV cache.

    `unbounded` tells the host loop that the context length does not end the generation.
    """

    unbounded = True

    def __init__(self, window: int, sinks: int = 4) -> None:
        # The context length is checked when the request (and its model) arrive.
        self.window, self.sinks = check_window(window, sinks)

    def __call__(self, request: DecodeRequest) -> StreamingDecoder:
        return StreamingDecoder(request, self.window, self.sinks)


class StreamingDecoder(CachedDecoder):
    """`CachedDecoder` over a fixed cache of S + W slots whose window slots wrap (see the module docstring)."""

    def __init__(self, request: DecodeRequest, window: int, sinks: int) -> None:
        config = request.model.config
        check_window(window, sinks, config.context_length)
        if request.compile:
            raise UserError("streaming generation (window/sinks) runs eagerly; leave out compile")
        if len({len(p) for p in request.prompts}) > 1:
            raise UserError("streaming generation needs prompts of one length (rows share cache slots); "
                            "batch prompts by length or generate them one at a time")
        if any(w is not None for w in config.layer_windows):
            raise UserError("streaming generation needs full-attention layers; this model has sliding-window "
                            "layers (its own window already bounds their cache)")
        super().__init__(request)
        self.window, self.sinks = window, sinks
        self.capacity = window + sinks
        self.rope = config.positions == "rope"
        self.evicted = 0  # tokens pushed out of the window so far
        self.shift = 0  # how far rotation positions have been rebased (text position - rotation position)
        self.sink_keys: Tensor | None = None
        self.full_mask: Tensor | None = None  # every slot holds a token once the ring runs

    def logits(self) -> Tensor:
        model = self.model
        if self.last is None:
            B, P = self.ids.shape
            self.cache = model.new_cache(B, self.capacity, dtype=self.request.kv_dtype)
            n = min(P, self.capacity)
            logits = model(self.ids[:, :n], cache=self.cache, logits_to_keep=1)
            for j in range(n, P):  # a prompt longer than the cache streams through it token by token
                logits = self.ring_step(self.ids[:, j:j + 1])
            return logits[:, -1]
        feed = self.last.masked_fill(self.done, PAD_ID)[:, None]
        if self.cache.length < self.capacity:  # not full yet: plain cached decoding
            return model(feed, cache=self.cache, logits_to_keep=1)[:, -1]
        return self.ring_step(feed)[:, -1]

    def slot_positions(self) -> Tensor:
        """The StreamingLLM position of every cache slot [S + W] as the next query sees it (a full cache):
        sinks 0..S-1, the window's tokens S.. in age order, the newest (the last query's own) last."""
        S, W = self.sinks, self.window
        age = (self.evicted - 1 - torch.arange(W)) % W  # slots back from the newest
        return torch.cat([torch.arange(S), S + W - 1 - age])

    def ring_step(self, feed: Tensor) -> Tensor:
        """One token per row through the full cache: overwrite the oldest window slot, attend over all slots."""
        cache, S, W, cap = self.cache, self.sinks, self.window, self.capacity
        device = feed.device
        slot = S + self.evicted % W
        text_position = cap + self.evicted  # the new token's place in the text (prompt included)
        self.evicted += 1
        if self.rope:
            if self.sink_keys is None:  # rotated at 0..S-1 by the prefill; kept to re-rotate from
                self.sink_keys = cache.keys[:, :, :, :S].clone()
            position = text_position - self.shift
            if position >= 2 * cap:
                self._rebase(position - (cap - 1))
                position = text_position - self.shift
            if S:
                # Sinks sit just before the window's oldest token: rotated by the count of evicted tokens.
                cos, sin = rope_angles(torch.tensor([self.evicted - self.shift], device=device),
                                       self.model.rope_inv_freq, cache.keys.dtype)
                cache.keys[:, :, :, :S] = apply_rope(self.sink_keys, cos, sin)
        else:
            position = cap - 1  # learned positions: the new token's cache position
        cache.write_slots = torch.tensor([slot], device=device)
        if self.full_mask is None:
            self.full_mask = torch.ones(1, 1, 1, cap, dtype=torch.bool, device=device)
        try:
            return self.model(feed, positions=torch.tensor([position], device=device), mask=self.full_mask, cache=cache,
                              logits_to_keep=1)
        finally:
            cache.write_slots = None

    def _rebase(self, amount: int) -> None:
        """Rotate every window key back by `amount` positions, so rotation angles stay near the cache's."""
        S = self.sinks
        cos, sin = rope_angles(torch.tensor([-amount], device=self.cache.keys.device),
                               self.model.rope_inv_freq, self.cache.keys.dtype)
        window = self.cache.keys[:, :, :, S:]
        window.copy_(apply_rope(window, cos, sin))
        self.shift += amount

