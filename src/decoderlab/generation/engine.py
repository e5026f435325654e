"""The generation loop: prefill a (left-padded) batch of prompts, then decode one token per step with a KV cache.

`stream` yields each step's new tokens (and text); `generate` collects a whole stream into a `GenerationResult`.

Sampling is Gumbel-Max, argmax(logits / T + g), with the noise g of step t drawn from a generator seeded from
(seed, t) alone: `generate(..., trace=True)` records what `counterfactual` needs to replay the same noise under an
intervention. `grammar=` constrains rows to a JSON schema, regex or context-free grammar (see `constrained`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .. import masks
from ..errors import UserError
from ..model import Transformer
from ..tokenizer import Tokenizer
from .compiled import CompiledDecodeStep, cache_slots
from .sampling import SamplingParams, choose, gumbel_noise

if TYPE_CHECKING:
    from .constrained import Grammar, GrammarState

# What finished rows are fed; any id works, since their outputs are never read.
PAD_ID = 0


@dataclass
class GenerationStep:
    """One decode step of a batch, as `stream` yields it; every list has one entry per prompt.

    tokens: the row's new token ids (empty once it has finished; a stop token is never included).
    texts: the row's new text (None without a tokenizer). Text is held back while it ends in an incomplete
        UTF-8 character or could be the start of a stop string, so it may lag the tokens.
    finish_reasons: "stop" or "length" at the step the row finishes, else None.
    stopped_by: the stop token id or stop string that finished the row, at that step, else None.
    logprobs: with `stream(..., logprobs=k)`, per row a `TokenLogprob` for each of `tokens[row]`, else None.
    """

    tokens: list[list[int]]
    texts: list[str] | None
    finish_reasons: list[str | None]
    stopped_by: list[int | str | None]
    logprobs: list[list[TokenLogprob]] | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model (log-softmax of the raw logits, before any
    penalty, temperature, filter or grammar), and the `k` most likely tokens there as (id, logprob)."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class GenerationResult:
    """What `generate` returns; every list has one entry per prompt.

    tokens: the new token ids, without the stop token; when a stop string ends a row, its tokens run through
        the one that completed the stop string.
    texts: `tokenizer.decode(tokens)` cut just before the stop string (None without a tokenizer).
    finish_reasons: "stop" (a stop token or string) or "length" (max_new_tokens or the context length).
    stopped_by: the stop token id or stop string that ended the row, or None.
    prompt_tokens / completion_tokens: tokens read and generated per row (a stop token counts as generated).
    """

    tokens: list[list[int]]
    texts: list[str] | None
    finish_reasons: list[str]
    stopped_by: list[int | str | None]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    trace: Trace | None = None


@dataclass(frozen=True)
class Trace:
    """What `counterfactual` needs to replay a `generate` call with the same sampling noise (`trace=True`).

    The Gumbel noise is not stored: step t's noise is drawn from a generator seeded from (seed, t) alone, so it
    can be regenerated exactly. tokens: the output (as `GenerationResult.tokens`); forced: the token
    interventions a counterfactual's trace replays too.
    """

    seed: int
    params: SamplingParams
    prompts: list[list[int]]
    tokens: list[list[int]]
    max_new_tokens: int
    stop_tokens: list[int]
    stop_strings: list[str]
    grammar: list[Grammar | None] | None = None
    tokenizer: Tokenizer | None = field(default=None, repr=False)
    cache_dtype: torch.dtype | None = None
    forced: dict[int, dict[int, int]] = field(default_factory=dict)  # {step: {row: token}} of a counterfactual
    compile: bool = False  # replays run the same (compiled or eager) kernels, so their logits match to the bit


def generate(model: Transformer, input_ids: Tensor | Sequence[Sequence[int]], max_new_tokens: int = 256, *,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float | None = None,
             frequency_penalty: float | None = None, seed: int | None = None,
             stop_tokens: int | Iterable[int] | None = None, stop_strings: str | Iterable[str] | None = None,
             tokenizer: Tokenizer | None = None, cache_dtype: torch.dtype | None = None, grammar: Any = None,
             compile: bool = False, trace: bool = False) -> GenerationResult:
    """Continue each prompt by up to `max_new_tokens` tokens; see `stream` for the arguments.

    trace: also return `result.trace`, for `counterfactual` replays with the same sampling noise.
    """
    steps = stream(model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   min_p=min_p, repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                   seed=seed, stop_tokens=stop_tokens, stop_strings=stop_strings, tokenizer=tokenizer,
                   cache_dtype=cache_dtype, grammar=grammar, compile=compile)
    return _collect(steps, tokenizer, max_new_tokens, trace)


def _collect(steps: Stream, tokenizer: Tokenizer | None, max_new_tokens: int, trace: bool) -> GenerationResult:
    B = len(steps.prompt_lengths)
    tokens: list[list[int]] = [[] for _ in range(B)]
    pieces: list[list[str]] = [[] for _ in range(B)]
    reasons: list[str | None] = [None] * B
    stopped_by: list[int | str | None] = [None] * B
    for step in steps:
        for i in range(B):
            tokens[i] += step.tokens[i]
            if step.texts is not None:
                pieces[i].append(step.texts[i])
            if step.finish_reasons[i] is not None:
                reasons[i], stopped_by[i] = step.finish_reasons[i], step.stopped_by[i]
    # max_new_tokens=0 yields no step at all.
    reasons = [r or "length" for r in reasons]
    completion = [len(t) + isinstance(s, int) for t, s in zip(tokens, stopped_by, strict=True)]
    texts = ["".join(p) for p in pieces] if tokenizer is not None else None
    record = None
    if trace:
        record = Trace(steps.seed, steps.params, steps.prompts, tokens, max_new_tokens, sorted(steps.stop_ids),
                       steps.stop_strings, steps.grammars, tokenizer, steps.cache_dtype, steps.force, steps.compile)
    return GenerationResult(tokens, texts, reasons, stopped_by, list(steps.prompt_lengths), completion, record)


def stream(model: Transformer, input_ids: Tensor | Sequence[Sequence[int]], max_new_tokens: int = 256, *,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           min_p: float | None = None, repetition_penalty: float | None = None,
           frequency_penalty: float | None = None, seed: int | None = None,
           stop_tokens: int | Iterable[int] | None = None, stop_strings: str | Iterable[str] | None = None,
           tokenizer: Tokenizer | None = None, cache_dtype: torch.dtype | None = None,
           grammar: Any = None, compile: bool = False, logprobs: int | None = None) -> Stream:
    """Generate step by step: an iterator of `GenerationStep`, one per decoded token position.

    input_ids: a LongTensor [B, T] or a list of B token-id lists (of any lengths; left-padded internally).
    max_new_tokens: at most this many new tokens per prompt; fewer where the context length runs out (the
        rows of a batch share cache slots, so the longest prompt sets that limit).
    temperature 0 is greedy; otherwise tokens are sampled from softmax(logits / temperature) after the
    top_k / top_p / min_p filters. repetition_penalty divides (multiplies) the positive (negative) logits of
    tokens already in the prompt or output, as transformers does; frequency_penalty subtracts penalty x count
    of each token generated so far. `seed` makes sampling reproducible without touching the global RNG.
    stop_tokens: ids that end a row (not included in its output); None means the model config's
        eos_token_id plus the tokenizer's eos token, [] means none.
    stop_strings: text that ends a row (needs `tokenizer`); the text is cut before it.
    cache_dtype: the KV cache's dtype; None means fp32 on the CPU (faster attention), else the model's.
    grammar: constrain the output (needs `tokenizer`, with an eos token, and llguidance): a `constrained.Grammar`
        or a dict {"json_schema": schema} / {"regex": pattern} / {"lark": source} for every row, or a list with
        one per row (None: unconstrained). Each step masks the tokens the grammar forbids before sampling; the
        eos token is allowed only where the grammar is complete, and a row whose grammar is complete and allows
        nothing more stops ("stop").
    compile: run the decode steps through one `torch.compile` graph (`generation.compiled`): a one-off compile of
        seconds per model, batch size and cache size (cached on disk by inductor across processes), then faster
        steps where Python overhead dominates (small models, bf16). The prompt's forward pass stays eager.
    logprobs: give each step's tokens their log-probabilities and the `logprobs` most likely alternatives
        (`GenerationStep.logprobs`); None: none.
    Sampling is Gumbel-Max, argmax(logits / T + g), with step t's noise drawn from a generator seeded from
    (seed, t): the same seed gives the same noise whatever tokens came before.

    Arguments are checked here, before the first step; bad ones raise a one-line `UserError`.
    """
    params = SamplingParams(temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty)
    prompts = _prompts(input_ids, model.config.vocab_size)
    ctx = model.config.context_length
    longest = max(len(p) for p in prompts)
    if longest > ctx:
        raise UserError(f"a prompt of {longest} tokens exceeds the model's context length of {ctx}; shorten it")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise UserError(f"seed must be an integer or None, got {seed!r}")
    if cache_dtype is not None and not (isinstance(cache_dtype, torch.dtype) and cache_dtype.is_floating_point):
        raise UserError(f"cache_dtype must be a floating-point torch.dtype or None, got {cache_dtype!r}")
    if logprobs is not None and (isinstance(logprobs, bool) or not isinstance(logprobs, int) or logprobs < 0):
        raise UserError(f"logprobs must be an integer >= 0 (alternatives per token) or None, got {logprobs!r}")
    stop_ids = _stop_tokens(stop_tokens, model, tokenizer)
    stops = _stop_strings(stop_strings, tokenizer)
    return _make_stream(model, prompts, max_new_tokens, params, seed, stop_ids, stops, tokenizer, cache_dtype,
                        grammar, compile=compile, logprobs=logprobs)


def _make_stream(model: Transformer, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams,
                 seed: int | None, stop_ids: set[int], stops: list[str], tokenizer: Tokenizer | None,
                 cache_dtype: torch.dtype | None, grammar: Any,
                 force: dict[int, dict[int, int]] | None = None, decoder: DecoderFactory | None = None,
                 compile: bool = False, logprobs: int | None = None) -> Stream:
    """`stream` after its checks; `force` ({step: {row: token}}) overrides chosen tokens (counterfactuals);
    `decoder` builds the device side in place of `_Decoder` (PINE runs its own forward passes)."""
    if compile:
        if decoder is not None:
            raise UserError("compile=True works with the plain decode loop only")
        decoder = functools.partial(_Decoder, compile=True)
    longest = max(len(p) for p in prompts)
    # The last token is sampled but never fed, so a prompt of length ctx still gets one new token.
    steps = min(max_new_tokens, model.config.context_length - longest + 1)
    grammars = state = None
    if grammar is not None:
        from .constrained import GrammarState, grammars_for_batch

        grammars = grammars_for_batch(grammar, len(prompts))
        if any(g is not None for g in grammars):
            state = GrammarState(grammars, tokenizer, model.config.vocab_size)
    if seed is None:
        seed = torch.Generator().seed()  # a fresh random seed, recorded for replays; the global RNG is untouched
    return Stream(model, prompts, steps, params, seed, stop_ids, stops, tokenizer, cache_dtype, grammars, state,
                  force, decoder, compile, logprobs)


class Stream:
    """The iterator `stream` returns. `prompt_lengths` is known before the first step."""

    def __init__(self, model: Transformer, prompts: list[list[int]], steps: int, params: SamplingParams,
                 seed: int, stop_ids: set[int], stop_strings: list[str], tokenizer: Tokenizer | None,
                 cache_dtype: torch.dtype | None, grammars: list[Grammar | None] | None = None,
                 state: GrammarState | None = None, force: dict[int, dict[int, int]] | None = None,
                 decoder: DecoderFactory | None = None, compile: bool = False, logprobs: int | None = None) -> None:
        self.prompt_lengths = [len(p) for p in prompts]
        self.prompts, self.params, self.seed, self.stop_ids = prompts, params, seed, stop_ids
        self.stop_strings, self.cache_dtype, self.grammars = stop_strings, cache_dtype, grammars
        self.force, self.compile = force or {}, compile
        self._steps = _run(model, prompts, steps, params, seed, stop_ids, stop_strings, tokenizer, cache_dtype,
                           state, force or {}, decoder, logprobs)

    def __iter__(self) -> Iterator[GenerationStep]:
        return self

    def __next__(self) -> GenerationStep:
        return next(self._steps)

    def close(self) -> None:
        """Stop early, freeing the KV cache (also what dropping the iterator does)."""
        self._steps.close()


def _run(model: Transformer, prompts: list[list[int]], steps: int, params: SamplingParams, seed: int,
         stop_ids: set[int], stop_strings: list[str], tokenizer: Tokenizer | None,
         cache_dtype: torch.dtype | None, grammar: GrammarState | None = None,
         force: dict[int, dict[int, int]] | None = None,
         make_decoder: DecoderFactory | None = None, logprobs: int | None = None) -> Iterator[GenerationStep]:
    """The host side of the loop: one sync per step to read the new tokens, then stop checks and text."""
    if steps == 0:
        return
    B = len(prompts)
    was_training = model.training
    model.eval()
    try:
        decoder = (make_decoder or _Decoder)(model, prompts, steps, params, seed, cache_dtype)
        decoder.top_logprobs = logprobs
        texts = [_RowText(tokenizer, stop_strings) for _ in range(B)] if tokenizer is not None else None
        finished = [False] * B
        for step in range(steps):
            allowed = grammar.allowed([not f for f in finished], model.device) if grammar is not None else None
            new = decoder.next_tokens(allowed, force.get(step) if force else None).tolist()
            out = GenerationStep([[] for _ in range(B)], [""] * B if texts else None, [None] * B, [None] * B,
                                 [[] for _ in range(B)] if logprobs is not None else None)
            ended = []
            for i, token in enumerate(new):  # a loop over rows, for the host-side stop checks
                if finished[i]:
                    continue
                reason = stop = None
                constrained = grammar is not None and grammar.matchers[i] is not None
                if token in stop_ids or (constrained and token == grammar.eos):
                    if constrained:
                        grammar.advance(i, token)  # checks that the grammar was complete (a forced eos may not be)
                    reason, stop = "stop", token
                else:
                    out.tokens[i].append(token)
                    if out.logprobs is not None:
                        out.logprobs[i].append(decoder.token_logprob(i))
                    if texts and (stop := texts[i].add(token)) is not None:
                        reason = "stop"
                    if constrained and grammar.advance(i, token) and reason is None:
                        reason = "stop"
                if reason is None and step == steps - 1:
                    reason = "length"
                if texts:
                    out.texts[i] = texts[i].take(final=reason is not None)
                if reason is not None:
                    finished[i] = True
                    ended.append(i)
                    out.finish_reasons[i], out.stopped_by[i] = reason, stop
            if ended and step < steps - 1:
                decoder.finish(ended)
            yield out
            if all(finished):
                return
    finally:
        model.train(was_training)


class _Decoder:
    """The device side of one batch: KV cache, positions, mask and sampling state; `next_tokens` runs one step.

    Prompts are left-padded to a common length T, so every row's next token goes to the same cache slot.
    A padded batch gets explicit positions (0 at each row's first real token) and the mask
    causal & padding(valid), where `valid` is preallocated for the prompt and every generated slot: slots past
    the cache's length are never read, so the same mask object serves every step. A batch without padding
    takes the model's plain causal fast path. With `compile`, the steps after the prefill run through a
    `CompiledDecodeStep` over a cache of a power-of-two size.
    """

    @torch.inference_mode()
    def __init__(self, model: Transformer, prompts: list[list[int]], steps: int, params: SamplingParams,
                 seed: int, cache_dtype: torch.dtype | None, compile: bool = False) -> None:
        device, B, T, V = model.device, len(prompts), max(len(p) for p in prompts), model.config.vocab_size
        self.model, self.params = model, params
        self.compiled: CompiledDecodeStep | None = None
        self._compile_args: tuple[Tensor, Tensor] | None = None
        self.ids = torch.tensor([[PAD_ID] * (T - len(p)) + p for p in prompts], device=device)
        lengths = torch.tensor([len(p) for p in prompts], device=device)
        valid = torch.arange(T, device=device) >= (T - lengths)[:, None]
        self.mask = self.positions = self.next_positions = None
        if any(len(p) < T for p in prompts):
            generated = torch.ones(B, steps, dtype=torch.bool, device=device)
            self.mask = masks.causal() & masks.padding(torch.cat([valid, generated], dim=1))
            self.positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
            self.next_positions = lengths[:, None].clone()
        # Every step but the last feeds its token back, so the last needs no slot.
        # On the CPU an fp32 cache keeps single-query attention in fp32, whose kernel is 3-7x faster than bf16's.
        cache_dtype = cache_dtype or (torch.float32 if device.type == "cpu" else None)
        slots = T + steps - 1
        if compile and steps > 1:
            slots = cache_slots(slots, model.config.context_length)
            # Every slot past the prompt holds a generated token; the graph masks those not written yet.
            filled = torch.ones(B, slots - T, dtype=torch.bool, device=device)
            self._compile_args = (torch.cat([valid, filled], dim=1), lengths)
        self.cache = model.new_cache(B, slots, dtype=cache_dtype)
        self.top_logprobs: int | None = None
        self.init_sampling(params, seed, self.ids, valid, V)

    def init_sampling(self, params: SamplingParams, seed: int, ids: Tensor, valid: Tensor, vocab_size: int) -> None:
        """The sampling state of a batch of prompts `ids` [B, T] (`valid` marks real tokens)."""
        B, device = ids.shape[0], ids.device
        self.params = params
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        # Reseeded from (seed, step) before each step's noise, so the noise never depends on earlier draws.
        self.generator = torch.Generator(device)
        self.seed, self.step, self.noise_shape = seed, 0, (B, vocab_size)
        self.seen = self.counts = None
        if params.needs_seen:
            self.seen = torch.zeros(B, vocab_size, device=device).scatter_add_(1, ids, valid.float()) > 0
        if params.needs_counts:
            self.counts = torch.zeros(B, vocab_size, device=device)
            self.ones = torch.ones(B, 1, device=device)
        self.last: Tensor | None = None

    def logits(self) -> Tensor:
        """The next-token logits [B, V]: the prompts' on the first call, then those after the last tokens."""
        if self.last is None:
            logits = self.model(self.ids, positions=self.positions, mask=self.mask, cache=self.cache,
                                logits_to_keep=1)
            if self._compile_args is not None:
                self.compiled = CompiledDecodeStep(self.model, self.cache, *self._compile_args)
        elif self.compiled is not None:
            return self.compiled(self.last.masked_fill(self.done, PAD_ID)[:, None])
        else:
            feed = self.last.masked_fill(self.done, PAD_ID)[:, None]
            logits = self.model(feed, positions=self.next_positions, mask=self.mask, cache=self.cache,
                                logits_to_keep=1)
            if self.next_positions is not None:
                self.next_positions += 1
        return logits[:, -1]

    @torch.inference_mode()
    def next_tokens(self, allowed: Tensor | None = None, forced: dict[int, int] | None = None) -> Tensor:
        """Run the model on the prompts (first call) or on the last tokens, and choose the next ones [B].

        allowed: bool [B, V], the tokens each row may take (a grammar's mask); forced: {row: token} overrides.
        """
        logits = self.logits()
        raw = logits
        if allowed is not None:
            logits = logits.masked_fill(~allowed, -torch.inf)
        noise = None
        if not self.params.greedy:
            self.generator.manual_seed(step_seed(self.seed, self.step))
            noise = gumbel_noise(self.noise_shape, self.generator, logits.device)
        self.step += 1
        tokens = choose(logits, self.params, self.generator, self.seen, self.counts, noise)
        if forced:
            rows = list(forced)
            tokens[rows] = torch.tensor([forced[r] for r in rows], device=tokens.device)
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens[:, None], self.ones)
        self.last = tokens
        if getattr(self, "top_logprobs", None) is not None:
            lp = raw.float().log_softmax(-1)
            top = lp.topk(min(self.top_logprobs, lp.shape[-1]), dim=-1)
            self._logprobs = (lp.gather(1, tokens[:, None])[:, 0].tolist(), top.indices.tolist(), top.values.tolist())
        return tokens

    def token_logprob(self, row: int) -> TokenLogprob:
        """The last chosen token of `row` with its logprob and top alternatives (`top_logprobs` set)."""
        chosen, ids, values = self._logprobs
        return TokenLogprob(int(self.last[row]), chosen[row], list(zip(ids[row], values[row], strict=True)))

    @torch.inference_mode()
    def finish(self, rows: list[int]) -> None:
        self.done[rows] = True


DecoderFactory = Callable[[Transformer, list[list[int]], int, SamplingParams, int, "torch.dtype | None"], _Decoder]


class _RowText:
    """One row's text as its tokens arrive: deltas that decode cleanly, and the stop-string check.

    Incremental detokenization as in vLLM: decode a short window of recent tokens with and without the new
    ones, and keep the difference only when it does not end in U+FFFD (an incomplete UTF-8 character). The
    window gives tokenizers that drop a leading space at the start of a text the context they need.
    """

    def __init__(self, tokenizer: Tokenizer, stop_strings: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stop_strings
        self.longest = max((len(s) for s in stop_strings), default=0)
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is the window already turned into text
        self.text = ""  # clean text so far
        self.sent = 0  # characters of it already handed out
        self.stopped = False

    def add(self, token: int) -> str | None:
        """Add a token; returns the stop string that the text now contains, if any (and cuts the text there)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        after = self.tokenizer.decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return None
        start = max(0, len(self.text) - self.longest + 1)
        self.text += after[len(before):]
        self.prefix, self.read = self.read, len(self.ids)
        found = [(at, s) for s in self.stops if (at := self.text.find(s, start)) >= 0]
        if not found:
            return None
        at, stop = min(found, key=lambda f: f[0])
        self.text, self.stopped = self.text[:at], True
        return stop

    def take(self, final: bool) -> str:
        """The text not handed out yet: all of it when the row is finished, else all but a tail that could
        begin a stop string."""
        if final and not self.stopped:
            # Whatever is still held (an incomplete character at the end) is the text now.
            before = self.tokenizer.decode(self.ids[self.prefix:self.read])
            self.text += self.tokenizer.decode(self.ids[self.prefix:])[len(before):]
            self.prefix = self.read = len(self.ids)
        end = len(self.text)
        if not final:
            end -= next((n for n in range(min(self.longest - 1, end - self.sent), 0, -1)
                         if any(s.startswith(self.text[end - n:]) for s in self.stops)), 0)
        delta, self.sent = self.text[self.sent:end], end
        return delta


_MASK64 = (1 << 64) - 1


def step_seed(seed: int, step: int) -> int:
    """The seed of step `step`'s noise generator: SplitMix64 of (seed, step), so nearby seeds and steps give
    unrelated streams."""
    x = (seed * 0x9E3779B97F4A7C15 + (step + 1) * 0xD1B54A32D192ED03) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _prompts(input_ids: Tensor | Sequence[Sequence[int]], vocab_size: int) -> list[list[int]]:
    if isinstance(input_ids, Tensor):
        if input_ids.dim() != 2:
            raise UserError(f"input_ids must be a tensor [batch, time], got shape {list(input_ids.shape)}")
        rows = list(input_ids)
    elif isinstance(input_ids, Sequence) and not isinstance(input_ids, (str, bytes)):
        try:
            rows = [torch.as_tensor(p) for p in input_ids]
        except (TypeError, ValueError, RuntimeError):
            raise UserError("input_ids must be a list of token-id lists") from None
    else:
        raise UserError(f"input_ids must be a tensor [batch, time] or a list of token-id lists, "
                        f"got {type(input_ids).__name__}")
    if not rows:
        raise UserError("input_ids holds no prompts; pass at least one")
    for i, row in enumerate(rows):
        if row.dim() == 1 and row.numel() == 0:
            raise UserError(f"prompt {i} is empty; every prompt needs at least one token (e.g. a BOS token)")
        if row.dim() != 1 or row.dtype.is_floating_point or row.dtype.is_complex or row.dtype == torch.bool:
            raise UserError("input_ids must hold integer token ids: a tensor [batch, time] or a list of token-id "
                            "lists (for one prompt pass [ids])")
        bad = row[(row < 0) | (row >= vocab_size)]
        if bad.numel():
            raise UserError(f"prompt {i} holds {int(bad[0])}, not a token id in [0, {vocab_size})")
    return [row.tolist() for row in rows]


def _stop_tokens(stop_tokens: int | Iterable[int] | None, model: Transformer,
                 tokenizer: Tokenizer | None) -> set[int]:
    if stop_tokens is None:
        eos = model.config.eos_token_id
        ids = set(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if tokenizer is not None and tokenizer.eos_id is not None:
            ids.add(tokenizer.eos_id)
        return ids
    ids = [stop_tokens] if isinstance(stop_tokens, int) else list(stop_tokens)
    bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, int)), None)
    if bad is not None:
        raise UserError(f"stop_tokens must be token ids (ints), got {bad!r}")
    return set(ids)


def _stop_strings(stop_strings: str | Iterable[str] | None, tokenizer: Tokenizer | None) -> list[str]:
    if stop_strings is None:
        return []
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    if stops and tokenizer is None:
        raise UserError("stop_strings need a tokenizer to read the generated text; pass tokenizer=...")
    if not all(isinstance(s, str) and s for s in stops):
        raise UserError(f"stop_strings must be non-empty strings, got {stops!r}")
    return stops
