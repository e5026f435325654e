"""The decode step compiled by `torch.compile`: one graph per model, batch size and cache size, reused every step.

An eager decode step pays Python and dispatch for every operation (about 55 us per layer here), which is most
of a small model's step. To compile the step once, every step must have the same shapes: the KV cache runs in
static mode (`KVCache.write_slots`: keys are written at a slot given as a tensor, attention reads the whole
buffer under a mask), and the mask causal & padding(valid) & window is built inside the graph from the slot
tensor. Cache sizes come in powers of two, so prompts of different lengths share graphs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..cache import KVCache
from ..errors import UserError
from ..model import Linear, Transformer

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


def _decode_step(model: Transformer, tokens: Tensor, positions: Tensor, cache: KVCache, valid: Tensor,
                 window: int | None) -> Tensor:
    slot = cache.write_slots
    keys = torch.arange(valid.shape[1], device=valid.device)
    mask = valid & (keys <= slot)  # causal & padding(valid), for the one query slot
    if window is not None:
        mask = mask & (slot - keys < window)
    return model(tokens, positions, mask[:, None, None, :], cache, logits_to_keep=1)[:, -1]


_compiled_step = None


def _compiled():
    global _compiled_step
    if _compiled_step is None:
        # One compiled function: dynamo keys its graphs on the code object, so guards tell models apart.
        # cpp_wrapper: the graph's launcher is C++, not Python (measured: 0.41 -> 0.33 ms a step, 3M model).
        _compiled_step = torch.compile(_decode_step, dynamic=False, fullgraph=True, options={"cpp_wrapper": True})
    return _compiled_step


class CompiledDecodeStep:
    """Runs the decode steps of one batch after its prefill, through the compiled graph.

    `cache` must have been filled by a normal (eager) forward of the prompts; `valid` [B, cache.max_length]
    marks the slots that hold (or will hold) real tokens; `positions` [B] are the next tokens' positions.
    """

    def __init__(self, model: Transformer, cache: KVCache, valid: Tensor, positions: Tensor) -> None:
        if model.training or torch.is_grad_enabled():
            raise UserError("a compiled decode step runs in eval mode under torch.inference_mode()")
        for module in model.modules():
            if isinstance(module, Linear) and module.stale:
                module.repack()  # a compiled graph cannot check whether a packed weight still matches
        self.model, self.cache, self.valid = model, cache, valid
        self.positions = positions.view(-1, 1).clone()
        self.window = model.config.sliding_window
        cache.write_slots = torch.tensor([cache.length], device=valid.device)
        self._first = True

    def __call__(self, tokens: Tensor) -> Tensor:
        """Logits [B, V] after feeding `tokens` [B, 1]; advances the cache and the positions."""
        if self.cache.length >= self.cache.max_length:
            raise UserError(f"KV cache is full: room for {self.cache.max_length} tokens")
        args = (self.model, tokens, self.positions, self.cache, self.valid, self.window)
        if self._first:  # only a call that may compile needs the limit (patching costs ~35 us a call)
            try:
                with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
                    logits = _compiled()(*args)
            except torch._dynamo.exc.BackendCompilerFailed as e:  # e.g. no C++ compiler on this machine
                cause = str(e.inner_exception).strip().splitlines()[0] if e.inner_exception else str(e)
                raise UserError(f"torch.compile could not build the decode step ({type(e.inner_exception).__name__}: "
                                f"{cause}); install a C++ compiler (g++) or generate without compile") from None
            self._first = False
        else:
            # The first call checked every guard and picked the graph; the model, cache and mask stay the same
            # objects with the same shapes for the rest of the generation, so later steps skip that check
            # (measured: 0.1-0.3 ms a step, a model's guards cover all its parameters).
            with torch.compiler.set_stance(skip_guard_eval_unsafe=True):
                logits = _compiled()(*args)
        self.cache.write_slots += 1
        self.positions += 1
        self.cache.length += 1
        return logits

    def close(self) -> None:
        """Back to the cache's normal mode (its contents stay)."""
        self.cache.write_slots = None
