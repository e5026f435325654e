"""Sampling a masked diffusion LM (LLaDA's sampler), as a `Decoder` the generation engine drives.

The prompt is followed by a canvas of `max_new_tokens` mask tokens, split into blocks of `block_length` filled
left to right (semi-autoregressive). `steps` denoising steps are spread over the blocks as evenly as possible,
and each block's masks over its steps as LLaDA's `get_num_transfer_tokens` does (the first steps take one more
when they do not divide). A step runs the model on the whole sequence (no KV cache: attention is bidirectional),
predicts every masked slot of the block (with `shift_logits`, from the logits of the slot before it: a model
adapted from a causal one; never the mask token itself) and commits the k most confident predictions
(remasking="low_confidence": the softmax probability of the chosen token, as LLaDA) or k random ones
(remasking="random"). Temperature is Gumbel noise on the logits (argmax(logits / T + g), the engine's sampler);
0 is greedy.

The decoder emits a row's tokens once everything before them is committed, so the host loop (`engine.Stream`)
applies stop ids, stop strings, the budget, text and logprobs exactly as for causal decoding: a row ends at the
first stop token with nothing masked before it, and the block loop ends when every row has.

Constrained decoding (a grammar) is exact left to right only: the grammar engine (`constrained`) masks the next
token given a committed prefix. With a grammar each step commits its k tokens (the same schedule) in order, at
the leftmost masked slots, from one forward pass: token j is chosen under the grammar's mask after tokens
0..j-1 (fed to the matcher, then rolled back for the host), so every output is in the grammar's language, and
with one token per step it is exactly constrained semi-autoregressive decoding. Confidence or random order is
not used then: it would commit tokens whose left context is still masked, which a left-to-right matcher cannot
check (exact constraints there need "can this gapped text still be completed" queries, CFG intersection).

Batches of prompts of different lengths are left-padded, with explicit positions and a padding mask.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .. import masks
from ..errors import UserError
from ..model import Transformer
from ..tokenizer import Tokenizer
from .engine import (
    PAD_ID,
    Decoded,
    DecodeRequest,
    GenerationResult,
    Stream,
    check_prompts,
    require_finite,
    resolve_sampling,
    resolve_stop_strings,
    resolve_stop_tokens,
    step_seed,
)
from .sampling import TokenLogprob, check_logprobs, choose, gumbel_noise, token_logprobs

REMASKING = ("low_confidence", "random")
# LLaDA's usual block length; a shorter generation is one block.
DEFAULT_BLOCK_LENGTH = 32
# What the sampler can run: a model trained to fill masked slots.
OBJECTIVES = ("diffusion", "mlm")


def transfer_counts(tokens: int, steps: int) -> list[int]:
    """How many of `tokens` masked slots each of `steps` steps commits (LLaDA's get_num_transfer_tokens): as
    even as possible, the first steps taking one more."""
    base, extra = divmod(tokens, steps)
    return [base + (i < extra) for i in range(steps)]


def schedule(length: int, steps: int, block_length: int) -> list[list[int]]:
    """Per block (of `block_length` slots, the last one shorter if it does not divide `length`), the tokens each
    of its steps commits. The `steps` are spread over the blocks as evenly as possible (the first blocks take one
    more), and never more steps than a block has tokens."""
    sizes = [min(block_length, length - start) for start in range(0, length, block_length)]
    if steps < len(sizes):
        raise UserError(f"steps={steps} is fewer than the {len(sizes)} blocks of {block_length} tokens; give at "
                        f"least one step per block, or a longer block_length")
    per_block = transfer_counts(steps, len(sizes))
    return [transfer_counts(size, min(size, n)) for size, n in zip(sizes, per_block, strict=True)]


def check_settings(steps: Any, block_length: Any, remasking: Any) -> None:
    """One-line `UserError`s for bad sampler settings (None: the default)."""
    for name, value in (("steps", steps), ("block_length", block_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise UserError(f"{name} must be an integer >= 1, got {value!r}")
    if remasking not in REMASKING:
        raise UserError(f"unknown remasking {remasking!r}; choose one of {', '.join(REMASKING)}")


class DiffusionSampler:
    """A decoder factory for masked diffusion sampling: pass `DiffusionSampler(steps, ...)` as
    `stream(..., decoder=)`/`generate(..., decoder=)`, or call `diffusion_generate`.

    steps: denoising steps over the whole generation (None: one per token, LLaDA's usual setting).
    block_length: slots per semi-autoregressive block (None: 32, or the whole generation when shorter).
    remasking: "low_confidence" (commit the most probable predictions) or "random".
    """

    # Read by the host (`engine.Stream`): the objectives this decoder samples, and that every generated token
    # holds a slot of the context (the canvas), so prompt + tokens must fit in it.
    objectives = OBJECTIVES
    slot_per_token = True

    def __init__(self, steps: int | None = None, block_length: int | None = None,
                 remasking: str = "low_confidence") -> None:
        check_settings(steps, block_length, remasking)
        self.steps, self.block_length, self.remasking = steps, block_length, remasking

    def __call__(self, request: DecodeRequest) -> DiffusionDecoder:
        return DiffusionDecoder(request, self.steps, self.block_length, self.remasking)


def require_masked_model(model: Transformer) -> int:
    """The model's mask token id; a one-line `UserError` unless it was trained to fill masked slots."""
    config = model.config
    if config.objective not in OBJECTIVES:
        raise UserError(f"diffusion sampling needs a model trained to fill masked slots (objective diffusion or "
                        f"mlm), this one is {config.objective!r}: decode it with generate(), or pass a converted "
                        "copy (config.replace(objective='diffusion', shift_logits=True, mask_token_id=...))")
    return config.mask_token_id


class DiffusionDecoder:
    """The device side of one diffusion batch (`Decoder` protocol): the canvas, its masks and the schedule.

    Each `step` runs denoising steps until every unfinished row has new tokens to emit (everything before them
    committed), and returns those; with a grammar it runs one step, committing the leftmost masked slots in
    order, each checked against the grammar (`checks_grammar`: the host accepts several such tokens a step).
    """

    checks_grammar = True

    @torch.inference_mode()
    def __init__(self, request: DecodeRequest, steps: int | None, block_length: int | None,
                 remasking: str) -> None:
        model, prompts = request.model, request.prompts
        self.mask_id = require_masked_model(model)
        params = request.params
        if params.needs_seen or params.needs_counts:
            raise UserError("repetition and frequency penalties are not defined for diffusion sampling (tokens are "
                            "not chosen in order); leave them out")
        if request.compile:
            raise UserError("compile applies to cached causal decoding; leave it out for diffusion sampling")
        T, L = request.prompt_length, request.max_new_tokens
        self.request, self.model, self.params, self.remasking = request, model, params, remasking
        self.shift = model.config.shift_logits
        self.T, self.L = T, L
        block = block_length or min(DEFAULT_BLOCK_LENGTH, max(L, 1))
        self.block_length = block
        self.plan = schedule(L, L if steps is None else steps, block) if L else []
        device = model.device
        self.canvas = torch.tensor([[PAD_ID] * (T - len(p)) + p + [self.mask_id] * L for p in prompts],
                                   device=device)
        B = len(prompts)
        self.masked = torch.zeros_like(self.canvas, dtype=torch.bool)
        self.masked[:, T:] = True  # masks written in the prompt (if any) stay as they are
        self.positions = self.mask = None
        if any(len(p) < T for p in prompts):
            lengths = torch.tensor([len(p) for p in prompts], device=device)
            valid = torch.arange(T + L, device=device) >= (T - lengths)[:, None]
            self.positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
            pattern = masks.padding(valid)
            if not model.config.bidirectional:
                pattern = masks.causal() & pattern
            slots = torch.arange(T + L, device=device)
            self.mask = pattern.materialize(slots, slots, batch_size=B, device=device)  # the same every step
        self.emitted = [0] * B  # generated tokens handed to the host per row
        self.done = [False] * B
        self.block_index = self.step_in_block = 0
        self.passes = 0  # model forward passes (the denoising steps run)
        self.logprobs = request.logprobs
        self.slot_logprobs: list[dict[int, TokenLogprob]] = [{} for _ in range(B)]
        self.generator = torch.Generator(device)

    @property
    def forward_passes(self) -> int:
        return self.passes

    def _logits(self, slots: Tensor) -> Tensor:
        """Raw logits [B, n, V] predicting the canvas slots `slots` [n] (shared by every row)."""
        keep = torch.zeros_like(self.canvas, dtype=torch.bool)
        keep[:, slots - 1 if self.shift else slots] = True
        logits = self.model(self.canvas, positions=self.positions, mask=self.mask, logits_to_keep=keep)
        if self.passes == 0:
            require_finite(logits)
        self.passes += 1
        return logits.view(len(self.canvas), len(slots), -1)

    def _choose(self, logits: Tensor, sub_step: int = 0) -> Tensor:
        """The predicted token of each slot [B, n] (greedy, or Gumbel-Max with this step's noise; a grammar's
        steps choose their tokens one by one, `sub_step` apart)."""
        B, n, V = logits.shape
        # A slot is never filled with the mask token itself (a trained model hardly predicts it; an untrained
        # one would leave masks in the text).
        logits = logits.clone()
        logits[..., self.mask_id] = -torch.inf
        noise = None
        if not self.params.greedy:
            self.generator.manual_seed(step_seed(step_seed(self.request.seed, self.passes), sub_step))
            noise = gumbel_noise((B * n, V), self.generator, logits.device)
        return choose(logits.reshape(B * n, V), self.params, self.generator, noise=noise).view(B, n)

    def _record(self, rows: Tensor, slots: Tensor, logits: Tensor, tokens: Tensor) -> None:
        """Keep the committed tokens' logprobs (raw logits [N, V]) for when they are emitted."""
        if self.logprobs is None or not len(rows):
            return
        for r, s, lp in zip(rows.tolist(), slots.tolist(), token_logprobs(logits, tokens, self.logprobs),
                            strict=True):
            self.slot_logprobs[r][s] = lp

    def _denoise(self) -> None:
        """One step of the schedule: commit this step's share of the current block's masks in every row."""
        sizes = self.plan[self.block_index]
        start = self.T + self.block_index * self.block_length
        slots = torch.arange(start, start + self.block_length, device=self.canvas.device)[:sum(sizes)]
        k = sizes[self.step_in_block]
        logits = self._logits(slots)
        predicted = self._choose(logits)
        masked = self.masked[:, slots]
        if self.remasking == "low_confidence":
            # LLaDA: the probability of the chosen token under the model's raw (un-noised) distribution.
            confidence = logits.float().softmax(-1).gather(-1, predicted[..., None])[..., 0]
        else:
            self.generator.manual_seed(step_seed(self.request.seed, -1 - self.passes))
            confidence = torch.rand(masked.shape, generator=self.generator, device=masked.device)
        confidence = confidence.masked_fill(~masked, -torch.inf)
        chosen = torch.zeros_like(masked)
        chosen.scatter_(1, confidence.topk(k, dim=1).indices, True)
        chosen &= masked
        rows, cols = chosen.nonzero(as_tuple=True)
        self.canvas[rows, slots[cols]] = predicted[rows, cols]
        self.masked[rows, slots[cols]] = False
        self._record(rows, slots[cols], logits[rows, cols], predicted[rows, cols])
        self._advance(len(sizes))

    def _advance(self, steps_in_block: int) -> None:
        self.step_in_block += 1
        if self.step_in_block == steps_in_block:
            self.block_index, self.step_in_block = self.block_index + 1, 0

    def _commit_in_order(self, allowed: Tensor | None) -> None:
        """One step of the schedule under a grammar: commit this step's share of the block's masks strictly left
        to right, each token chosen under the grammar's mask given the tokens before it (consumed for the next
        mask, then rolled back: the host advances the grammar). A row stops at its grammar's end."""
        grammar, device = self.request.grammar, self.canvas.device
        sizes = self.plan[self.block_index]
        first = self.T + min(self.emitted[i] for i in range(len(self.done)) if not self.done[i])
        k = sizes[self.step_in_block]
        slots = torch.arange(first, first + k, device=device)  # live rows share them (each step fills k slots)
        raw = self._logits(slots)
        live = [not d for d in self.done]
        consumed = [0] * len(live)
        try:
            for j in range(k):
                if j:
                    allowed = grammar.allowed(live, device)
                logits = raw[:, j] if allowed is None else raw[:, j].masked_fill(~allowed, -torch.inf)
                predicted = self._choose(logits[:, None], sub_step=j)[:, 0]
                rows = [i for i in range(len(live)) if live[i]]
                for i, token in zip(rows, predicted[rows].tolist(), strict=True):
                    self.canvas[i, first + j] = token
                    self.masked[i, first + j] = False
                    matcher = grammar.matchers[i]
                    if matcher is None:
                        continue
                    if token == grammar.eos:
                        live[i] = False  # the host checks that the grammar accepts here
                    elif not matcher.consume_token(token):
                        live[i] = False  # cannot happen under the mask; the host will say why
                    else:
                        consumed[i] += 1
                        live[i] = not matcher.is_stopped()
                rows_t = torch.tensor(rows, device=device, dtype=torch.long)
                self._record(rows_t, torch.full_like(rows_t, first + j), raw[rows_t, j], predicted[rows_t])
                if not any(live):
                    break
        finally:
            for i, n in enumerate(consumed):
                if n:
                    grammar.matchers[i].rollback(n)
        self._advance(len(sizes))

    def _ready(self, row: int) -> list[int]:
        """The row's committed tokens not emitted yet that have nothing masked before them."""
        start = self.T + self.emitted[row]
        still = self.masked[row, start:].nonzero()
        end = self.T + self.L if not len(still) else start + int(still[0])
        return self.canvas[row, start:end].tolist()

    @torch.inference_mode()
    def step(self, allowed: Tensor | None = None, forced: dict[int, int] | None = None) -> Decoded:
        if forced:
            raise UserError("diffusion sampling cannot replay forced tokens (counterfactuals need causal decoding)")
        B = len(self.done)
        if self.request.constrained:
            self._commit_in_order(allowed)
            out = [self._ready(i) if not self.done[i] else [] for i in range(B)]
        else:
            while True:
                out = [self._ready(i) if not self.done[i] else [] for i in range(B)]
                if all(out[i] or self.done[i] for i in range(B)) or self.block_index >= len(self.plan):
                    break
                self._denoise()
        logprobs = None
        if self.logprobs is not None:
            logprobs = [[self.slot_logprobs[i].pop(self.T + self.emitted[i] + j) for j in range(len(out[i]))]
                        for i in range(B)]
        for i in range(B):
            self.emitted[i] += len(out[i])
        return Decoded(out, logprobs)

    def finish(self, rows: list[int]) -> None:
        for i in rows:
            self.done[i] = True

    def close(self) -> None:
        self.canvas = self.masked = self.mask = self.positions = None


def check_length(max_new_tokens: int, block_length: int | None) -> None:
    """LLaDA's rule: an explicit `block_length` divides the generation length (a one-line `UserError`)."""
    # A block_length that is no positive integer is `check_settings`' to refuse, with its own message.
    valid = isinstance(block_length, int) and not isinstance(block_length, bool) and block_length >= 1
    if valid and max_new_tokens % block_length:
        raise UserError(f"block_length={block_length} does not divide the {max_new_tokens} tokens asked for; pick "
                        "a divisor (or leave block_length out)")


def diffusion_generate(model: Transformer, input_ids: Tensor | Iterable[Iterable[int]], max_new_tokens: int = 128,
                       *, steps: int | None = None, block_length: int | None = None,
                       remasking: str = "low_confidence", temperature: float | None = None,
                       top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                       seed: int | None = None, stop_tokens: int | Iterable[int] | None = None,
                       stop_strings: str | Iterable[str] | None = None, tokenizer: Tokenizer | None = None,
                       grammar: Any = None, logprobs: int | None = None) -> GenerationResult:
    """Fill `max_new_tokens` masked slots after each prompt by masked diffusion (LLaDA's sampler); returns a
    `GenerationResult` as `generate` does (tokens and text up to the first stop token or string).

    steps: denoising steps in all (None: one per token); fewer steps commit several tokens per step (faster,
        usually worse). block_length: slots per semi-autoregressive block (None: 32, or the whole generation when
        shorter); it must divide max_new_tokens, and steps must be at least the number of blocks.
    remasking: "low_confidence" (commit the most probable predictions first) or "random".
    temperature / top_k / top_p / min_p: as `generate` (None: the checkpoint's defaults; greedy without any).
    stop_tokens / stop_strings / tokenizer / seed / logprobs: as `generate`; a row ends at its first stop token
        once every slot before it is committed.
    grammar: as `generate`; each step's tokens are then committed strictly left to right, each under the
        grammar's mask given those before it (the only order in which a left-to-right grammar engine is exact);
        remasking does not apply.
    The model must have objective "diffusion" or "mlm"; prompt + max_new_tokens must fit in its context.
    """
    check_settings(steps, block_length, remasking)
    require_masked_model(model)
    prompts = check_prompts(input_ids, model)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    longest, ctx = max(len(p) for p in prompts), model.config.context_length
    if longest + max_new_tokens > ctx:
        raise UserError(f"a prompt of {longest} tokens plus max_new_tokens={max_new_tokens} masked slots exceeds "
                        f"the context length {ctx}; ask for at most {max(ctx - longest, 0)} tokens")
    check_length(max_new_tokens, block_length)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise UserError(f"seed must be an integer or None, got {seed!r}")
    params = resolve_sampling(model, temperature, top_k, top_p, min_p, 1.0, None)
    stream = Stream(model, prompts, max_new_tokens, params, seed=seed,
                    stop_ids=resolve_stop_tokens(model, tokenizer, stop_tokens),
                    stop_strings=resolve_stop_strings(stop_strings, tokenizer), tokenizer=tokenizer, grammar=grammar,
                    logprobs=check_logprobs(logprobs), decoder=DiffusionSampler(steps, block_length, remasking))
    return stream.result()
