"""The decode engine: a host loop over a public decoder protocol.

`stream` yields each step's new tokens (and text); `generate` collects a whole stream into a `GenerationResult`.
The work splits in two:
- a `Decoder` (the device side) owns the KV cache and the forward passes, and each `step` returns one or more
  new tokens per row. `CachedDecoder` is the default (prefill, then one token per step); PINE and the
  speculative decoders (`speculative`) are others, built by a factory `decoder(request)` passed to `stream`.
- the host loop (`Stream`) applies what every decoder shares: the stop ids, stop strings, the token budget,
  finish reasons, incremental text, grammar masks and logprobs. A decoder that emits several tokens in a step
  gets all of this for free: the host walks its tokens in order and stops a row where plain decoding would.

Defaults are resolved here, once, for every path: sampling arguments left as None take the checkpoint's
`model.generation_config` (`resolve_sampling`), stop ids default to every end id the model and tokenizer know
(`resolve_stop_tokens`). The KV cache starts at the prompt plus `CACHE_CHUNK` tokens and doubles as needed.

Sampling is Gumbel-Max, argmax(logits / T + g), with the noise g of step t drawn from a generator seeded from
(seed, t) alone: `generate(..., trace=True)` records what `counterfactual` needs to replay the same noise under an
intervention. `grammar=` constrains rows to a JSON schema, regex or context-free grammar (see `constrained`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from .. import masks
from ..errors import UserError
from ..model import Transformer
from ..tokenizer import Tokenizer
from .compiled import CompiledDecodeStep, cache_slots
from .sampling import SamplingParams, TokenLogprob, check_logprobs, choose, gumbel_noise, token_logprobs

if TYPE_CHECKING:
    from .constrained import Grammar

# What finished rows are fed; any id works, since their outputs are never read.
PAD_ID = 0
# KV-cache slots allocated past the prompt at first (fewer when fewer tokens are asked for); the cache then
# doubles whenever it fills, up to what the request can use. A request for the whole context of a 128k model
# thus holds memory for what it generated, not for the context.
CACHE_CHUNK = 256


# ---- what a stream yields and returns --------------------------------------------------------------------------


@dataclass
class GenerationStep:
    """One step of a batch, as `stream` yields it; every list has one entry per prompt.

    tokens: the row's new token ids (one per step with the default decoder, possibly several with a speculative
        one; empty once the row has finished; a stop token is never included).
    texts: the row's new text (None without a tokenizer). Text is held back while it ends in an incomplete
        UTF-8 character or could be the start of a stop string, so it may lag the tokens.
    finish_reasons: "stop" or "length" at the step the row finishes, else None.
    stopped_by: the stop token id or stop string that finished the row, at that step, else None.
    logprobs: with `stream(..., logprobs=k)`, one `TokenLogprob` per token in `tokens` (else None).
    """

    tokens: list[list[int]]
    texts: list[str] | None
    finish_reasons: list[str | None]
    stopped_by: list[int | str | None]
    logprobs: list[list[TokenLogprob]] | None = None


@dataclass
class GenerationResult:
    """What `generate` returns; every list has one entry per prompt.

    tokens: the new token ids, without the stop token; when a stop string ends a row, its tokens run through
        the one that completed the stop string.
    texts: `tokenizer.decode(tokens)` cut just before the stop string (None without a tokenizer).
    finish_reasons: "stop" (a stop token or string) or "length" (max_new_tokens or the context length).
    stopped_by: the stop token id or stop string that ended the row, or None.
    prompt_tokens / completion_tokens: tokens read and generated per row (a stop token counts as generated).
    logprobs: with `logprobs=k`, one `TokenLogprob` per token in `tokens` (else None).
    """

    tokens: list[list[int]]
    texts: list[str] | None
    finish_reasons: list[str]
    stopped_by: list[int | str | None]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    trace: Trace | None = None
    logprobs: list[list[TokenLogprob]] | None = None


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


# ---- the decoder protocol --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeRequest:
    """What a decoder is built for: one batch of checked prompts and its resolved settings.

    max_new_tokens: tokens per row at most, already bounded by the context (the host finishes a row there, so a
        decoder never needs to produce more; speculative decoders draft no further).
    seed: the sampling seed (always set: a fresh one is drawn when the caller gives none).
    cache_dtype: as the caller gave it; `kv_dtype` is what to allocate.
    logprobs: None, or the alternatives per token to report (`Decoded.logprobs` must then be filled).
    constrained: the host will pass `allowed` masks (a grammar) or `forced` tokens (a counterfactual) to `step`;
        a decoder that emits several tokens per step must refuse such a request, unless it checks each token
        against `grammar` itself (and says so with a `checks_grammar = True` attribute).
    grammar: the batch's `constrained.GrammarState` (None without a grammar), for such a decoder: it may consume
        tokens to get the next token's mask, but must roll them back before returning (the host advances them).
    """

    model: Transformer
    prompts: list[list[int]]
    max_new_tokens: int
    params: SamplingParams
    seed: int
    cache_dtype: torch.dtype | None = None
    logprobs: int | None = None
    compile: bool = False
    constrained: bool = False
    grammar: Any = None

    @property
    def kv_dtype(self) -> torch.dtype | None:
        """The KV cache's dtype: the caller's, else fp32 on the CPU (single-query attention in fp32 is 3-7x
        faster there than in bf16), else None (the model's)."""
        if self.cache_dtype is not None:
            return self.cache_dtype
        return torch.float32 if self.model.device.type == "cpu" else None

    @property
    def prompt_length(self) -> int:
        """The longest prompt (prompts are left-padded to it)."""
        return max(len(p) for p in self.prompts)


@dataclass
class Decoded:
    """What one `Decoder.step` produced: new tokens per row, in order (at least one for every unfinished row;
    anything for finished rows, which the host ignores), and their `TokenLogprob`s when the request asks."""

    tokens: list[list[int]]
    logprobs: list[list[TokenLogprob]] | None = None


class Decoder(Protocol):
    """The device side of one batch, built by a factory `decoder(request: DecodeRequest)` given to `stream`.

    The factory runs when the stream is made, so it should check its arguments there (a one-line `UserError`)
    and leave allocations and forward passes to the first `step`. The host then calls `step` until every row
    has finished, and `finish(rows)` when rows finish while others go on.

    step(allowed, forced): run the model (the prompts on the first call) and return the next tokens of every
        row as `Decoded`. Tokens a row emits past its stop token, stop string or budget are dropped by the host.
        allowed: bool [B, V], tokens each row may take next (a grammar); forced: {row: token} overrides (a
        counterfactual); both only come with `request.constrained`.
    finish(rows): those rows are done; their later tokens are ignored (a decoder may stop computing them).
    close(): the stream has ended (finished, closed or failed): free the caches, restore what you changed.
    """

    def step(self, allowed: Tensor | None = None, forced: dict[int, int] | None = None) -> Decoded: ...

    def finish(self, rows: list[int]) -> None: ...

    def close(self) -> None: ...


DecoderFactory = Callable[[DecodeRequest], Decoder]


def require_finite(logits: Tensor, who: str = "the model") -> None:
    """Refuse non-finite logits (one sync; decoders call it on the prompt's pass): NaN weights or float16
    overflow would otherwise generate garbage silently."""
    if bool(logits.isfinite().all()):
        return
    kind = "NaN" if bool(logits.isnan().any()) else "infinite"
    raise UserError(f"{who} produced {kind} logits for the prompt: its weights hold NaN/inf or its activations "
                    "overflow in float16; check the checkpoint, or load it in bfloat16 or float32")


def _generated_after(T: int) -> masks.Mask:
    # Every key slot from T on holds a generated token, however far the cache grows.
    return masks.Mask(lambda b, q, k: k >= T, f"generated(from {T})")


class CachedDecoder:
    """The default decoder: KV cache, positions, mask and sampling state; each `step` chooses one token a row.

    Prompts are left-padded to a common length T, so every row's next token goes to the same cache slot.
    A padded batch gets explicit positions (0 at each row's first real token) and the mask
    causal & (padding(valid) | generated), so the same mask object serves every step. A batch without padding
    takes the model's plain causal fast path. With `request.compile`, the steps after the prefill run through a
    `CompiledDecodeStep` over a cache of a power-of-two size. The cache starts at T + CACHE_CHUNK slots (or what
    the request can use, if less) and doubles when it fills.

    Subclass it to run other forward passes: override `logits()` (PINE does), and call `init_sampling`.
    """

    @torch.inference_mode()
    def __init__(self, request: DecodeRequest) -> None:
        model, prompts = request.model, request.prompts
        device, T = model.device, request.prompt_length
        self.request, self.model = request, model
        self.compiled: CompiledDecodeStep | None = None
        self.cache = None
        self.ids = torch.tensor([[PAD_ID] * (T - len(p)) + p for p in prompts], device=device)
        self.lengths = torch.tensor([len(p) for p in prompts], device=device)
        self.valid = torch.arange(T, device=device) >= (T - self.lengths)[:, None]
        self.mask = self.positions = self.next_positions = None
        if any(len(p) < T for p in prompts):
            self.mask = masks.causal() & (masks.padding(self.valid) | _generated_after(T))
            self.positions = (self.valid.long().cumsum(-1) - 1).clamp(min=0)
            self.next_positions = self.lengths[:, None].clone()
        self.init_sampling(request, self.ids, self.valid)

    def init_sampling(self, request: DecodeRequest, ids: Tensor, valid: Tensor) -> None:
        """The sampling state of a batch of prompts `ids` [B, T] (`valid` marks real tokens)."""
        B, device, V = ids.shape[0], ids.device, request.model.config.vocab_size
        self.params, self.logprobs = request.params, request.logprobs
        self.done = torch.zeros(B, dtype=torch.bool, device=device)
        # Reseeded from (seed, step) before each step's noise, so the noise never depends on earlier draws.
        self.generator = torch.Generator(device)
        self.seed, self.step_index, self.noise_shape = request.seed, 0, (B, V)
        self.seen = self.counts = None
        if self.params.needs_seen:
            self.seen = torch.zeros(B, V, device=device).scatter_add_(1, ids, valid.float()) > 0
        if self.params.needs_counts:
            self.counts = torch.zeros(B, V, device=device)
            self.ones = torch.ones(B, 1, device=device)
        self.last: Tensor | None = None

    def _slots(self, needed: int) -> int:
        if self.request.compile:
            return cache_slots(needed, self.model.config.context_length)
        return needed

    def _reserve(self, needed: int) -> None:
        T, steps = self.request.prompt_length, self.request.max_new_tokens
        # Every step but the last feeds its token back, so the last needs no slot.
        self.cache.reserve(needed, limit=T + steps - 1, round_up=self._slots)

    def logits(self) -> Tensor:
        """The next-token logits [B, V]: the prompts' on the first call, then those after the last tokens."""
        if self.last is None:
            T, steps = self.request.prompt_length, self.request.max_new_tokens
            compile = self.request.compile and steps > 1
            slots = T + min(steps - 1, CACHE_CHUNK)
            if compile:
                slots = self._slots(slots)
            self.cache = self.model.new_cache(len(self.ids), slots, dtype=self.request.kv_dtype)
            logits = self.model(self.ids, positions=self.positions, mask=self.mask, cache=self.cache,
                                logits_to_keep=1)
            if compile:
                # Every slot past the prompt holds a generated token; the graph masks those not written yet.
                filled = torch.ones(len(self.ids), slots - T, dtype=torch.bool, device=self.ids.device)
                self.compiled = CompiledDecodeStep(self.model, self.cache, torch.cat([self.valid, filled], 1),
                                                   self.lengths)
            return logits[:, -1]
        feed = self.last.masked_fill(self.done, PAD_ID)[:, None]
        self._reserve(self.cache.length + 1)
        if self.compiled is not None:
            return self.compiled(feed)
        logits = self.model(feed, positions=self.next_positions, mask=self.mask, cache=self.cache,
                            logits_to_keep=1)
        if self.next_positions is not None:
            self.next_positions += 1
        return logits[:, -1]

    @torch.inference_mode()
    def step(self, allowed: Tensor | None = None, forced: dict[int, int] | None = None) -> Decoded:
        """Run the model on the prompts (first call) or on the last tokens, and choose one token per row."""
        first = self.last is None
        raw = logits = self.logits()
        if first:
            require_finite(raw)
        if allowed is not None:
            logits = logits.masked_fill(~allowed, -torch.inf)
        noise = None
        if not self.params.greedy:
            self.generator.manual_seed(step_seed(self.seed, self.step_index))
            noise = gumbel_noise(self.noise_shape, self.generator, logits.device)
        self.step_index += 1
        tokens = choose(logits, self.params, self.generator, self.seen, self.counts, noise)
        if forced:
            rows = list(forced)
            tokens[rows] = torch.tensor([forced[r] for r in rows], device=tokens.device)
        if self.seen is not None:
            self.seen.scatter_(1, tokens[:, None], True)
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens[:, None], self.ones)
        self.last = tokens
        logprobs = None
        if self.logprobs is not None:
            logprobs = [[lp] for lp in token_logprobs(raw, tokens, self.logprobs)]
        return Decoded([[t] for t in tokens.tolist()], logprobs)

    @torch.inference_mode()
    def finish(self, rows: list[int]) -> None:
        self.done[rows] = True

    def close(self) -> None:
        self.cache = self.compiled = None


# ---- checks and defaults, shared by every path -----------------------------------------------------------------


def check_prompts(input_ids: Tensor | Sequence[Sequence[int]], model: Transformer,
                  within_context: bool = True) -> list[list[int]]:
    """The prompts as lists of ids: a LongTensor [B, T] or B token-id lists, each non-empty, in the model's
    vocabulary and (unless `within_context` is False: streaming) within its context; else a one-line
    `UserError`."""
    vocab_size = model.config.vocab_size
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
    prompts = [row.tolist() for row in rows]
    longest, ctx = max(len(p) for p in prompts), model.config.context_length
    if within_context and longest > ctx:
        raise UserError(f"a prompt of {longest} tokens exceeds the model's context length of {ctx}; shorten it")
    return prompts


def resolve_sampling(model: Transformer, temperature: float | None = None, top_k: int | None = None,
                     top_p: float | None = None, min_p: float | None = None,
                     repetition_penalty: float | None = None,
                     frequency_penalty: float | None = None) -> SamplingParams:
    """The `SamplingParams` of a call: each argument left as None takes `model.generation_config`'s default
    (`GenerationConfig.sampling_defaults`: greedy unless the checkpoint's generation_config.json says do_sample,
    as transformers' `generate` does). An explicit temperature 0 is greedy; top_k=0, top_p=1, min_p=0 and
    repetition_penalty=1 switch that setting off."""
    config = getattr(model, "generation_config", None)
    defaults = config.sampling_defaults() if config is not None else {}

    def pick(name: str, value: Any) -> Any:
        return defaults.get(name) if value is None else value

    temperature = pick("temperature", temperature)
    top_k = pick("top_k", top_k)
    if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k == 0:
        top_k = None  # transformers' "no top-k"
    return SamplingParams(0.0 if temperature is None else temperature, top_k, pick("top_p", top_p),
                          pick("min_p", min_p), pick("repetition_penalty", repetition_penalty), frequency_penalty)


def resolve_stop_tokens(model: Transformer, tokenizer: Tokenizer | None = None,
                        stop_tokens: int | Iterable[int] | None = None) -> set[int]:
    """The ids that end a row: `stop_tokens` if given ([] for none), else every end id known —
    model.generation_config.eos_token_id (an instruct model's end-of-turn ids), config.eos_token_id and the
    tokenizer's eos token."""
    if stop_tokens is None:
        ids: set[int] = set()
        config = getattr(model, "generation_config", None)
        if config is not None:
            ids.update(config.eos_token_id)
        eos = model.config.eos_token_id
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        if tokenizer is not None and tokenizer.eos_id is not None:
            ids.add(tokenizer.eos_id)
        return ids
    ids_list = [stop_tokens] if isinstance(stop_tokens, int) else list(stop_tokens)
    bad = next((t for t in ids_list if isinstance(t, bool) or not isinstance(t, int)), None)
    if bad is not None:
        raise UserError(f"stop_tokens must be token ids (ints), got {bad!r}")
    return set(ids_list)


def resolve_stop_strings(stop_strings: str | Iterable[str] | None, tokenizer: Tokenizer | None) -> list[str]:
    """The stop strings as a list (a single string is one stop string); they need a tokenizer."""
    if stop_strings is None:
        return []
    stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings)
    if stops and tokenizer is None:
        raise UserError("stop_strings need a tokenizer to read the generated text; pass tokenizer=...")
    if not all(isinstance(s, str) and s for s in stops):
        raise UserError(f"stop_strings must be non-empty strings, got {stops!r}")
    return stops


# ---- entry points ----------------------------------------------------------------------------------------------


def generate(model: Transformer, input_ids: Tensor | Sequence[Sequence[int]], max_new_tokens: int = 256, *,
             temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float | None = None,
             frequency_penalty: float | None = None, seed: int | None = None,
             stop_tokens: int | Iterable[int] | None = None, stop_strings: str | Iterable[str] | None = None,
             tokenizer: Tokenizer | None = None, cache_dtype: torch.dtype | None = None, grammar: Any = None,
             compile: bool = False, logprobs: int | None = None, decoder: DecoderFactory | None = None,
             window: int | None = None, sinks: int | None = None, trace: bool = False) -> GenerationResult:
    """Continue each prompt by up to `max_new_tokens` tokens; see `stream` for the arguments.

    trace: also return `result.trace`, for `counterfactual` replays with the same sampling noise.
    """
    steps = stream(model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   min_p=min_p, repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                   seed=seed, stop_tokens=stop_tokens, stop_strings=stop_strings, tokenizer=tokenizer,
                   cache_dtype=cache_dtype, grammar=grammar, compile=compile, logprobs=logprobs, decoder=decoder,
                   window=window, sinks=sinks)
    return steps.result(trace=trace)


def stream(model: Transformer, input_ids: Tensor | Sequence[Sequence[int]], max_new_tokens: int = 256, *,
           temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
           min_p: float | None = None, repetition_penalty: float | None = None,
           frequency_penalty: float | None = None, seed: int | None = None,
           stop_tokens: int | Iterable[int] | None = None, stop_strings: str | Iterable[str] | None = None,
           tokenizer: Tokenizer | None = None, cache_dtype: torch.dtype | None = None,
           grammar: Any = None, compile: bool = False, logprobs: int | None = None,
           decoder: DecoderFactory | None = None, window: int | None = None, sinks: int | None = None) -> Stream:
    """Generate step by step: an iterator of `GenerationStep`, one per decoder step.

    input_ids: a LongTensor [B, T] or a list of B token-id lists (of any lengths; left-padded internally).
    max_new_tokens: at most this many new tokens per prompt; fewer where the context length runs out (the
        rows of a batch share cache slots, so the longest prompt sets that limit). The KV cache grows with
        what is generated, so a large value costs nothing up front.
    Sampling arguments left as None take the checkpoint's defaults (`model.generation_config`, read from
    generation_config.json; greedy without one). temperature 0 is greedy; otherwise tokens are sampled from
    softmax(logits / temperature) after the top_k / top_p / min_p filters (top_k=0, top_p=1, min_p=0 switch
    them off). repetition_penalty divides (multiplies) the positive (negative) logits of tokens already in the
    prompt or output, as transformers does; frequency_penalty subtracts penalty x count of each token
    generated so far. `seed` makes sampling reproducible without touching the global RNG.
    stop_tokens: ids that end a row (not included in its output); None means every end id known: the
        generation_config's eos ids, the model config's eos_token_id and the tokenizer's eos token; [] none.
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
    logprobs: None, or k in [0, 20]: every step then reports each new token's log-probability and its top k
        alternatives (`GenerationStep.logprobs`), from log-softmax of the raw logits (before temperature,
        penalties, filters and grammar masks).
    decoder: a factory `decoder(request: DecodeRequest) -> Decoder` for another device side (the `Decoder`
        protocol): e.g. `TokenRecycler(model).decoder`, `speculative.draft_decoder(small)`. None: `CachedDecoder`,
        or for a model with objective "diffusion" or "mlm" masked diffusion sampling (`diffusion.DiffusionSampler()`:
        one step per token, blocks of 32; `diffusion_generate` sets steps and blocks).
    window, sinks: streaming generation with attention sinks (StreamingLLM; `generation.sinks`): the KV cache
        holds the first `sinks` tokens (default 4) and the last `window`, positions within the cache, so
        generation runs past the context length (max_new_tokens alone bounds it) at constant memory. Needs
        window + sinks <= the context length, and prompts of one length.
    Sampling is Gumbel-Max, argmax(logits / T + g), with step t's noise drawn from a generator seeded from
    (seed, t): the same seed gives the same noise whatever tokens came before.

    Arguments are checked here, before the first step; bad ones raise a one-line `UserError`. The prompt's
    forward pass refuses NaN or infinite logits (NaN weights, float16 overflow) with a `UserError`.
    """
    params = resolve_sampling(model, temperature, top_k, top_p, min_p, repetition_penalty, frequency_penalty)
    prompts = check_prompts(input_ids, model, within_context=window is None)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise UserError(f"seed must be an integer or None, got {seed!r}")
    if cache_dtype is not None and not (isinstance(cache_dtype, torch.dtype) and cache_dtype.is_floating_point):
        raise UserError(f"cache_dtype must be a floating-point torch.dtype or None, got {cache_dtype!r}")
    stop_ids = resolve_stop_tokens(model, tokenizer, stop_tokens)
    stops = resolve_stop_strings(stop_strings, tokenizer)
    if window is not None or sinks is not None:
        from .sinks import SinkWindow

        if window is None:
            raise UserError("sinks needs a window: pass window=W (the recent tokens kept) too")
        if decoder is not None:
            raise UserError("window/sinks choose the streaming decoder; pass them or decoder=, not both")
        decoder = SinkWindow(window, 4 if sinks is None else sinks)
    return Stream(model, prompts, max_new_tokens, params, seed=seed, stop_ids=stop_ids, stop_strings=stops,
                  tokenizer=tokenizer, cache_dtype=cache_dtype, grammar=grammar, compile=compile,
                  logprobs=check_logprobs(logprobs), decoder=decoder)


class Stream:
    """The iterator `stream` returns: one `GenerationStep` per decoder step. `prompt_lengths` is known before the
    first step; `decoder` is the batch's `Decoder` (speculative decoders count their forward passes there).

    Built directly, it is the engine for callers that resolved their own settings (`check_prompts`,
    `resolve_sampling`, `resolve_stop_tokens`, `resolve_stop_strings`); `force` ({step: {row: token}}) then
    overrides chosen tokens (counterfactual replays). `result()` runs it to the end.
    """

    def __init__(self, model: Transformer, prompts: list[list[int]], max_new_tokens: int, params: SamplingParams,
                 *, seed: int | None = None, stop_ids: Iterable[int] = (), stop_strings: Sequence[str] = (),
                 tokenizer: Tokenizer | None = None, cache_dtype: torch.dtype | None = None, grammar: Any = None,
                 force: dict[int, dict[int, int]] | None = None, decoder: DecoderFactory | None = None,
                 compile: bool = False, logprobs: int | None = None) -> None:
        self.model, self.prompts, self.params = model, prompts, params
        self.prompt_lengths = [len(p) for p in prompts]
        self.max_new_tokens, self.tokenizer, self.logprobs = max_new_tokens, tokenizer, logprobs
        self.stop_ids, self.stop_strings = set(stop_ids), list(stop_strings)
        self.cache_dtype, self.force, self.compile = cache_dtype, force or {}, compile
        objective = model.config.objective
        if decoder is None and objective != "causal":
            from .diffusion import DiffusionSampler

            decoder = DiffusionSampler()  # a model trained to fill masks is sampled by masked diffusion
        if objective != "causal" and objective not in getattr(decoder, "objectives", ("causal",)):
            name = getattr(decoder, "__qualname__", type(decoder).__name__)
            raise UserError(f"{name} decodes causal models left to right; this model's objective is {objective!r}: "
                            "sample it with diffusion_generate (or pass no decoder, window or sinks)")
        # The last token is chosen but never fed, so a prompt of length ctx still gets one new token; a factory
        # marked `slot_per_token` (a diffusion canvas) needs a slot for every token. A factory marked `unbounded`
        # (streaming with attention sinks) keeps its memory fixed and goes on.
        spare = 0 if getattr(decoder, "slot_per_token", False) else 1
        self.budget = max_new_tokens if getattr(decoder, "unbounded", False) else min(
            max_new_tokens, model.config.context_length - max(self.prompt_lengths) + spare)
        self.grammars = self._grammar = None
        if grammar is not None:
            from .constrained import GrammarState, grammars_for_batch

            self.grammars = grammars_for_batch(grammar, len(prompts))
            if any(g is not None for g in self.grammars):
                self._grammar = GrammarState(self.grammars, tokenizer, model.config.vocab_size)
        if seed is None:
            seed = torch.Generator().seed()  # a fresh random seed, recorded for replays; the global RNG is untouched
        self.seed = seed
        if decoder is not None and not callable(decoder):
            raise UserError(f"decoder must be a factory decoder(request) -> Decoder (e.g. TokenRecycler(model).decoder "
                            f"or speculative.draft_decoder(small_model)), got {type(decoder).__name__}")
        request = DecodeRequest(model, prompts, self.budget, params, seed, cache_dtype, logprobs, compile,
                                constrained=self._grammar is not None or bool(self.force), grammar=self._grammar)
        self.decoder: Decoder = (decoder or CachedDecoder)(request)
        self._steps = self._run()

    def __iter__(self) -> Iterator[GenerationStep]:
        return self

    def __next__(self) -> GenerationStep:
        return next(self._steps)

    def close(self) -> None:
        """Stop early, freeing the KV cache (also what dropping the iterator does, and the end of the stream)."""
        self._steps.close()

    def result(self, trace: bool = False) -> GenerationResult:
        """Run the stream to its end and collect it; `trace` records what `counterfactual` needs."""
        B = len(self.prompts)
        tokens: list[list[int]] = [[] for _ in range(B)]
        pieces: list[list[str]] = [[] for _ in range(B)]
        logprobs: list[list[TokenLogprob]] | None = [[] for _ in range(B)] if self.logprobs is not None else None
        reasons: list[str | None] = [None] * B
        stopped_by: list[int | str | None] = [None] * B
        for step in self:
            for i in range(B):
                tokens[i] += step.tokens[i]
                if step.texts is not None:
                    pieces[i].append(step.texts[i])
                if logprobs is not None:
                    logprobs[i] += step.logprobs[i]
                if step.finish_reasons[i] is not None:
                    reasons[i], stopped_by[i] = step.finish_reasons[i], step.stopped_by[i]
        # max_new_tokens=0 yields no step at all.
        finish = [r or "length" for r in reasons]
        completion = [len(t) + isinstance(s, int) for t, s in zip(tokens, stopped_by, strict=True)]
        texts = ["".join(p) for p in pieces] if self.tokenizer is not None else None
        record = None
        if trace:
            record = Trace(self.seed, self.params, self.prompts, tokens, self.max_new_tokens, sorted(self.stop_ids),
                           self.stop_strings, self.grammars, self.tokenizer, self.cache_dtype, self.force,
                           self.compile)
        return GenerationResult(tokens, texts, finish, stopped_by, list(self.prompt_lengths), completion, record,
                                logprobs)

    def _run(self) -> Iterator[GenerationStep]:
        """The host side of the loop: one sync per step to read the new tokens, then stop checks and text."""
        budget = self.budget
        if budget <= 0:
            return
        model, decoder, grammar, stop_ids = self.model, self.decoder, self._grammar, self.stop_ids
        B = len(self.prompts)
        want_logprobs = self.logprobs is not None
        was_training = model.training
        model.eval()
        try:
            texts = [_RowText(self.tokenizer, self.stop_strings) for _ in range(B)] if self.tokenizer else None
            finished = [False] * B
            emitted = [0] * B  # tokens each row has taken from its budget (a stop token counts)
            step = 0
            while True:
                allowed = grammar.allowed([not f for f in finished], model.device) if grammar is not None else None
                decoded = decoder.step(allowed, self.force.get(step))
                step += 1
                if want_logprobs and decoded.logprobs is None:
                    raise UserError(f"{type(decoder).__name__} does not report logprobs; ask for none")
                out = GenerationStep([[] for _ in range(B)], [""] * B if texts else None, [None] * B, [None] * B,
                                     [[] for _ in range(B)] if want_logprobs else None)
                ended = []
                for i in range(B):  # a loop over rows, for the host-side stop checks
                    if finished[i]:
                        continue
                    row = decoded.tokens[i]
                    if not row:
                        raise UserError(f"{type(decoder).__name__}.step gave no token for row {i}, which has not "
                                        "finished; a decoder must emit at least one token per unfinished row")
                    constrained = grammar is not None and grammar.matchers[i] is not None
                    if constrained and len(row) > 1 and not getattr(decoder, "checks_grammar", False):
                        raise UserError(f"{type(decoder).__name__} emits several tokens per step and cannot "
                                        "follow a grammar; decode constrained output with the default decoder")
                    reason = stop = None
                    for j, token in enumerate(row):
                        emitted[i] += 1
                        if token in stop_ids or (constrained and token == grammar.eos):
                            if constrained:  # checks that the grammar was complete (a forced eos may not be)
                                grammar.advance(i, token)
                            reason, stop = "stop", token
                            break
                        out.tokens[i].append(token)
                        if want_logprobs:
                            out.logprobs[i].append(decoded.logprobs[i][j])
                        if texts and (stop := texts[i].add(token)) is not None:
                            reason = "stop"
                        if constrained and grammar.advance(i, token) and reason is None:
                            reason = "stop"
                        if reason is None and emitted[i] >= budget:
                            reason = "length"
                        if reason is not None:
                            break
                    if texts:
                        out.texts[i] = texts[i].take(final=reason is not None)
                    if reason is not None:
                        finished[i] = True
                        ended.append(i)
                        out.finish_reasons[i], out.stopped_by[i] = reason, stop
                done = all(finished)
                if ended and not done:
                    decoder.finish(ended)
                yield out
                if done:
                    return
        finally:
            decoder.close()
            model.train(was_training)


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
