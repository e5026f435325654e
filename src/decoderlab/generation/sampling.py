"""Logits processors and token choice for generation: small pure functions over a batch of logits [B, V].

Each processor returns new logits (filtered tokens get -inf); `choose` applies the ones `SamplingParams` asks
for, in transformers' order (penalties, temperature, top-k, top-p, min-p), then takes the argmax or samples.

`token_logprobs` reports what the model thought of the chosen tokens: log-softmax of the raw logits (before
temperature, penalties, filters and grammar masks, as vLLM reports by default), with the top alternatives.

Sampling is the Gumbel-Max trick: argmax(logits / T + g) with g i.i.d. standard Gumbel noise over the whole
vocabulary draws exactly from softmax(logits / T), and makes the noise an explicit, replayable input (the
structural causal model that `counterfactual` replays). Filtered tokens stay -inf whatever noise they get.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UserError


def repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """As in transformers (CTRL): for tokens already present (`seen`, bool [B, V]), divide positive logits by
    `penalty` and multiply negative ones, so penalty > 1 always makes them less likely."""
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def frequency_penalty(logits: Tensor, counts: Tensor, penalty: float) -> Tensor:
    """OpenAI style: subtract `penalty` times how often each token has been generated (`counts`, [B, V])."""
    return logits - penalty * counts


def top_k(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th); the rest become -inf."""
    if k >= logits.shape[-1]:
        return logits
    kth = logits.topk(k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, -math.inf)


def top_p(logits: Tensor, p: float) -> Tensor:
    """Nucleus filtering: keep the smallest set of most likely tokens whose probability mass reaches p."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token is needed only while the more likely ones before it hold less than p; the first always is.
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, -math.inf)


def min_p(logits: Tensor, p: float) -> Tensor:
    """Keep tokens whose probability is at least p times that of the most likely token."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < p * probs.amax(dim=-1, keepdim=True), -math.inf)


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
    """Standard Gumbel noise -log(-log(u)), u ~ U[0, 1), fp32 (u = 0 gives -inf: that token is never chosen)."""
    if generator is not None and device is None:
        device = generator.device
    u = torch.rand(shape, generator=generator, device=device)
    return -(-u.log()).log()


def sample(logits: Tensor, generator: torch.Generator | None = None, noise: Tensor | None = None) -> Tensor:
    """One token id per row [B], drawn from softmax(logits) by Gumbel-Max: argmax(logits + g).

    `noise` ([B, V] Gumbel) is drawn from `generator` when not given.
    """
    if noise is None:
        noise = gumbel_noise(tuple(logits.shape), generator, logits.device)
    return (logits.float() + noise).argmax(dim=-1)


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. temperature 0 is greedy; None switches a filter or penalty off."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)

        def number(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        need(number(self.temperature) and self.temperature >= 0,
             f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        need(self.top_k is None or (isinstance(self.top_k, int) and not isinstance(self.top_k, bool)
                                    and self.top_k >= 1), f"top_k must be an integer >= 1 or None, got {self.top_k!r}")
        need(self.top_p is None or (number(self.top_p) and 0 < self.top_p <= 1),
             f"top_p must be in (0, 1] or None, got {self.top_p!r}")
        need(self.min_p is None or (number(self.min_p) and 0 <= self.min_p <= 1),
             f"min_p must be in [0, 1] or None, got {self.min_p!r}")
        need(self.repetition_penalty is None or (number(self.repetition_penalty) and self.repetition_penalty > 0),
             f"repetition_penalty must be a number > 0 (1 is no penalty) or None, got {self.repetition_penalty!r}")
        need(self.frequency_penalty is None or number(self.frequency_penalty),
             f"frequency_penalty must be a finite number or None, got {self.frequency_penalty!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def needs_seen(self) -> bool:
        """Whether `choose` needs the set of tokens seen so far (prompt and output)."""
        return self.repetition_penalty is not None and self.repetition_penalty != 1

    @property
    def needs_counts(self) -> bool:
        """Whether `choose` needs how often each token has been generated."""
        return bool(self.frequency_penalty)


def penalized(logits: Tensor, params: SamplingParams, seen: Tensor | None = None,
              counts: Tensor | None = None) -> Tensor:
    """The logits after the repetition and frequency penalties `params` asks for (fp32), else unchanged."""
    if params.needs_seen:
        logits = repetition_penalty(logits.float(), seen, params.repetition_penalty)
    if params.needs_counts:
        logits = frequency_penalty(logits.float(), counts, params.frequency_penalty)
    return logits


def choose(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen: Tensor | None = None, counts: Tensor | None = None, noise: Tensor | None = None) -> Tensor:
    """The next token id of each row [B] from logits [B, V].

    Sampling takes argmax(filtered logits / T + noise); `noise` ([B, V] Gumbel) is drawn from `generator` when
    not given. Greedy (temperature 0) is plain argmax and uses no noise.
    `seen` (bool [B, V]: tokens in the prompt or output) and `counts` ([B, V]: times generated) are needed
    when `params` asks for a repetition or frequency penalty.
    """
    if params.greedy and not (params.needs_seen or params.needs_counts):
        return logits.argmax(dim=-1)
    logits = penalized(logits.float(), params, seen, counts)
    # Filters do not change the argmax, so greedy stops here (as transformers does with do_sample=False).
    if params.greedy:
        return logits.argmax(dim=-1)
    return sample(filtered(logits, params), generator, noise)


def filtered(logits: Tensor, params: SamplingParams) -> Tensor:
    """The logits plain sampling draws from: divided by the temperature, then top-k, top-p and min-p applied."""
    logits = logits.float() / params.temperature
    if params.top_k is not None:
        logits = top_k(logits, params.top_k)
    if params.top_p is not None and params.top_p < 1:
        logits = top_p(logits, params.top_p)
    if params.min_p:
        logits = min_p(logits, params.min_p)
    return logits


def probabilities(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution sampling draws from (after any penalties): softmax of the `filtered` logits."""
    return filtered(logits, params).softmax(dim=-1)


# The most alternatives a step reports per token (OpenAI's top_logprobs limit).
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, and the `top` most likely tokens at its position as
    (token, logprob) pairs, most likely first. From log-softmax of the raw logits: before temperature, penalties,
    top-k/top-p/min-p filters and grammar masks (vLLM's default), so it says what the model thought, not what
    the sampler drew from."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: Tensor, tokens: Tensor | list[int], k: int) -> list[TokenLogprob]:
    """`TokenLogprob`s of `tokens` [N] at the positions whose raw logits are `logits` [N, V], with the top `k`
    alternatives each (fp32 log-softmax)."""
    logprobs = logits.float().log_softmax(dim=-1)
    tokens = torch.as_tensor(tokens, device=logits.device).view(-1)
    chosen = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
    k = min(k, logprobs.shape[-1])
    if k:
        top = logprobs.topk(k, dim=-1)
        values, indices = top.values.tolist(), top.indices.tolist()
    else:
        values = indices = [[] for _ in chosen]
    return [TokenLogprob(t, lp, list(zip(idx, val, strict=True)))
            for t, lp, idx, val in zip(tokens.tolist(), chosen, indices, values, strict=True)]


def check_logprobs(k: object) -> int | None:
    """`logprobs` as the engine takes it: None (none reported) or the number of alternatives, 0..MAX_LOGPROBS."""
    if k is None:
        return None
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS:
        raise UserError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}] (alternatives per token), "
                        f"got {k!r}")
    return k
