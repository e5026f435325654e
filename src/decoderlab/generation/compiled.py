"""The decode step compiled by `torch.compile`: one graph per model, batch size and cache size, reused every step.

An eager decode step pays Python and dispatch for every operation (about 55 us per layer here), which is most
of a small model's step. To compile the step once, every step must have the same shapes: the KV cache runs in
static mode (`KVCache.write_slots`: keys are written at a slot given as a tensor, attention reads the whole
buffer under a mask), and the mask causal & padding(valid) is built inside the graph from the slot tensor; the
model adds each layer's sliding window to it from the same tensor, also inside the graph. Cache sizes come in
powers of two, so prompts of different lengths share graphs; a cache that grows (`KVCache.reserve`) moves the
step to the graph of its new size. Token Recycling's tree verification (`CompiledTreeStep`) runs the same way,
with its tree mask prepared outside the graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..accel import Linear
from ..cache import KVCache
from ..errors import UserError
from ..model import Transformer

# Smallest static cache: shorter generations share this graph; attention over a few unused slots is cheap.
MIN_CACHE_SLOTS = 64
# Graphs kept per step function before torch.compile falls back to eager (its default is 8): one per model,
# batch size and cache size in use.
RECOMPILE_LIMIT = 64


def cache_slots(needed: int, context_length: int) -> int:
    """Cache slots for `needed` tokens: the next power of two from MIN_CACHE_SLOTS on, capped at the context
    length (or `needed` itself where that is longer, for a prompt that fills the context)."""
    slots = MIN_CACHE_SLOTS
    while slots < needed:
        slots *= 2
    return max(needed, min(slots, context_length))


def _decode_step(model: Transformer, tokens: Tensor, positions: Tensor, cache: KVCache, valid: Tensor) -> Tensor:
    keys = torch.arange(valid.shape[1], device=valid.device)
    mask = valid & (keys <= cache.write_slots)  # causal & padding(valid), for the one query slot
    # The model adds each layer's sliding window from the same slot tensor, inside the graph.
    return model(tokens, positions, mask[:, None, None, :], cache, logits_to_keep=1)[:, -1]


def _static_forward(model: Transformer, tokens: Tensor, positions: Tensor, cache: KVCache, mask: Tensor) -> Tensor:
    return model(tokens, positions, mask, cache)


class _Graph:
    """A function compiled once (per process) and called with the guards handled for a session of steps."""

    def __init__(self, fn) -> None:
        self.fn, self.compiled = fn, None

    def __call__(self, first: bool, *args) -> Tensor:
        if self.compiled is None:
            # One compiled function: dynamo keys its graphs on the code object, so guards tell models apart.
            # cpp_wrapper: the graph's launcher is C++, not Python (measured: 0.41 -> 0.33 ms a step, 3M model).
            self.compiled = torch.compile(self.fn, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})
        if not first:
            # The first call of a session checked every guard and picked the graph; the model, cache and mask
            # stay the same objects with the same shapes for the rest of it, so later steps skip that check
            # (measured: 0.1-0.3 ms a step, a model's guards cover all its parameters).
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                return self.compiled(*args)
        try:  # only a call that may compile needs the higher limit (patching costs ~35 us a call)
            with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                return self.compiled(*args)
        except torch._dynamo.exc.BackendCompilerFailed as e:  # e.g. no C++ compiler on this machine
            inner = e.inner_exception
            cause = str(inner).strip().splitlines()[0] if inner is not None and str(inner).strip() else str(e)
            raise UserError(f"torch.compile could not build the decode step ({type(inner).__name__}: {cause}); "
                            "install a C++ compiler (g++) or decode without compile") from None


_decode_graph = _Graph(_decode_step)
_forward_graph = _Graph(_static_forward)


def _prepare(model: Transformer) -> None:
    if model.training or torch.is_grad_enabled():
        raise UserError("a compiled decode step runs in eval mode under torch.inference_mode()")
    for module in model.modules():
        if isinstance(module, Linear) and module.stale:
            module.repack()  # a compiled graph cannot check whether a packed weight still matches


class CompiledDecodeStep:
    """Runs the decode steps of one batch after its prefill, through the compiled graph.

    `cache` must have been filled by a normal (eager) forward of the prompts; `valid` [B, cache.max_length]
    marks the slots that hold (or will hold) real tokens; `positions` [B] are the next tokens' positions.
    When the cache grows, the slots it gains count as valid (they hold generated tokens).
    """

    def __init__(self, model: Transformer, cache: KVCache, valid: Tensor, positions: Tensor) -> None:
        _prepare(model)
        self.model, self.cache, self.valid = model, cache, valid
        self.positions = positions.view(-1, 1).clone()
        cache.write_slots = torch.tensor([cache.length], device=valid.device)
        self._first = True

    def __call__(self, tokens: Tensor) -> Tensor:
        """Logits [B, V] after feeding `tokens` [B, 1]; advances the cache and the positions."""
        if self.cache.length >= self.cache.max_length:
            raise UserError(f"KV cache is full: room for {self.cache.max_length} tokens")
        grown = self.cache.max_length - self.valid.shape[1]
        if grown:
            # A new buffer size: another graph, whose guards the next call checks in full.
            more = torch.ones(self.valid.shape[0], grown, dtype=torch.bool, device=self.valid.device)
            self.valid = torch.cat([self.valid, more], dim=1)
            self._first = True
        logits = _decode_graph(self._first, self.model, tokens, self.positions, self.cache, self.valid)
        self._first = False
        self.cache.write_slots += 1
        self.positions += 1
        self.cache.length += 1
        return logits


class CompiledTreeStep:
    """Verifies speculative draft trees of a fixed size through one compiled graph (Token Recycling).

    Each call writes the tree's keys at slots cache.length .. +N-1 and returns every node's logits; the caller
    then keeps the accepted path (`KVCache.keep`). `ancestors` [N, N] says which nodes each node sees.
    """

    def __init__(self, model: Transformer, cache: KVCache, ancestors: Tensor) -> None:
        _prepare(model)
        self.model, self.cache = model, cache
        n, device = ancestors.shape[-1], ancestors.device
        self.n, self.offsets = n, torch.arange(n, device=device)
        self.ancestors = ancestors.reshape(1, 1, n, n)
        self.mask = torch.zeros(1, 1, n, cache.max_length, dtype=torch.bool, device=device)
        self._first = True

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Logits [1, N, V] of the tree `tokens` [1, N] at `positions` [1, N]."""
        start = self.cache.length
        if start + self.n > self.cache.max_length:
            raise UserError(f"KV cache is full: room for {self.cache.max_length} tokens")
        if self.mask.shape[-1] != self.cache.max_length:  # the cache grew: a mask (and graph) of its new size
            self.mask = self.mask.new_zeros(1, 1, self.n, self.cache.max_length)
            self._first = True
        # The context before the tree, then the tree's own pattern; slots after it stay hidden (never written).
        self.mask[..., :start] = True
        self.mask[..., start:start + self.n] = self.ancestors
        self.cache.write_slots = self.offsets + start
        try:
            return _forward_graph(self._first, self.model, tokens, positions, self.cache, self.mask)
        finally:
            self._first = False
            self.cache.write_slots = None
            self.mask[..., start:start + self.n] = False
