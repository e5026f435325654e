"""Preallocated key/value cache: one buffer for all layers, written in place at explicit slots.

It never grows with `torch.cat` per step: `reserve` makes room geometrically (twice the length, one copy into a
larger buffer, amortised), so a generation allocates what it has used, not the whole context up front.
`length` counts the filled slots, `truncate` rolls back rejected speculative tokens, and `keep` compacts
accepted tree nodes into consecutive slots. With `write_slots` set, a forward pass writes at slots given as a
tensor and attends over the whole buffer: every decode step then has the same shapes, which is what a compiled
decode step needs (`decoderlab.generation.compiled`), and what lets streaming generation's window wrap round a
fixed buffer (`decoderlab.generation.sinks`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .config import ModelConfig
from .errors import UserError


class KVCache:
    """Keys and values for `batch_size` rows of up to `max_length` tokens each.

    The model writes a forward pass's new keys and values at slots `length .. length + T - 1` in every
    layer, then calls `advance(T)`. Slots are the mask algebra's key indices.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_length: int | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        max_length = max_length or config.context_length
        if batch_size < 1 or max_length < 1:
            raise UserError(f"KV cache needs batch_size >= 1 and max_length >= 1, got {batch_size}, {max_length}")
        shape = (config.n_layers, batch_size, config.kv_heads, max_length, config.dim_head)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        # Per-layer views, made once: `update` runs in every layer of every decode step.
        self._layer_keys, self._layer_values = self.keys.unbind(0), self.values.unbind(0)
        self.length = 0
        # Static mode: a LongTensor [T] of the slots the next forward writes (see `update`).
        self.write_slots: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return self.keys.shape[1]

    @property
    def max_length(self) -> int:
        return self.keys.shape[3]

    @property
    def nbytes(self) -> int:
        """Bytes held by the key and value buffers."""
        return self.keys.nbytes + self.values.nbytes

    def reserve(self, needed: int, limit: int | None = None,
                round_up: Callable[[int], int] | None = None) -> bool:
        """Make room for `needed` slots. A buffer that is too short grows to twice its length (at least `needed`,
        at most `limit` where that is at least `needed`), then `round_up` (e.g. to the next power of two for
        compiled graphs): one copy of the filled slots into a new buffer, so growth costs O(1) per token
        amortised. Returns whether the buffers were replaced (compiled steps then re-check their graph)."""
        if needed <= self.max_length:
            return False
        target = max(needed, 2 * self.max_length)
        if limit is not None and limit >= needed:
            target = min(target, limit)
        if round_up is not None:
            target = max(needed, round_up(target))
        self.resize(target)
        return True

    def resize(self, max_length: int) -> None:
        """Move to buffers of `max_length` slots, keeping the `length` filled ones (the rest start as zeros)."""
        if max_length < self.length:
            raise UserError(f"cannot shrink a KV cache holding {self.length} tokens to {max_length} slots")
        shape = (*self.keys.shape[:3], max_length, self.keys.shape[4])
        keys = torch.zeros(shape, device=self.keys.device, dtype=self.keys.dtype)
        values = torch.zeros(shape, device=self.values.device, dtype=self.values.dtype)
        keys[:, :, :, :self.length] = self.keys[:, :, :, :self.length]
        values[:, :, :, :self.length] = self.values[:, :, :, :self.length]
        self.keys, self.values = keys, values
        self._layer_keys, self._layer_values = self.keys.unbind(0), self.values.unbind(0)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write `k`, `v` [B, H_kv, T, D] after the filled slots; return all keys/values so far (views).

        In static mode (`write_slots` set) write them at those slots instead and return the whole buffer: the
        caller's mask says which slots hold keys, and `length` is left to the caller.
        """
        if self.write_slots is not None:
            # One index_put_ on the whole buffer, not a write into a layer's view: torch.compile then updates
            # the buffer in place instead of copying it (a view's mutation is replayed on a copy of its base).
            layers = torch.full_like(self.write_slots, layer)
            self.keys[layers, :, :, self.write_slots] = k.permute(2, 0, 1, 3)
            self.values[layers, :, :, self.write_slots] = v.permute(2, 0, 1, 3)
            return self.keys[layer], self.values[layer]
        end = self.length + k.shape[2]
        if end > self.max_length:
            raise UserError(f"KV cache is full: {end} tokens requested, room for {self.max_length}; "
                            "allocate a longer cache or generate fewer tokens")
        keys, values = self._layer_keys[layer], self._layer_values[layer]
        keys[:, :, self.length:end] = k
        values[:, :, self.length:end] = v
        return keys[:, :, :end], values[:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on (rollback of rejected tokens)."""
        if not 0 <= length <= self.length:
            raise UserError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length

    def keep(self, start: int, slots: torch.Tensor) -> None:
        """Move the entries at `slots` (absolute, ascending) to `start, start+1, ...` and cut the rest."""
        n = slots.numel()
        self.keys[:, :, :, start:start + n] = self.keys[:, :, :, slots]
        self.values[:, :, :, start:start + n] = self.values[:, :, :, slots]
        self.length = start + n

    def reset(self) -> None:
        self.length = 0
