"""Lossless speculative decoding: draft several tokens cheaply, verify them in one forward pass of the model.

Three drafters share one contract (greedy output identical to `generate(..., temperature=0)`; sampled output
distributed exactly as plain sampling): `TokenRecycler` (training-free, a draft tree grown from a matrix of
recently seen top-k successors), `speculative_generate` (a smaller draft model; speculative sampling) and
`mtp_generate` (self-speculation with the model's own future-token heads). All take one prompt (batch size 1).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import masks
from ..errors import UserError
from ..model import Transformer
from .compiled import CompiledTreeStep, cache_slots
from .engine import GenerationResult, _prompts, _stop_tokens
from .sampling import SamplingParams, filtered

# Prior acceptance probability of a draft by the rank of its token among the recycled successors; only the
# ratios matter, to decide which (parent, rank) nodes the static tree template spends its budget on.
RANK_PRIOR = (0.50, 0.16, 0.08, 0.05, 0.035, 0.025, 0.02, 0.015)


@dataclass
class SpeculativeResult(GenerationResult):
    """A `GenerationResult` plus acceptance statistics.

    forward_passes: forward passes of the target model (the prompt's included), per row.
    tokens_per_pass: completion tokens / forward passes, per row (plain decoding gives 1.0).
    draft_passes: forward passes of the draft model (draft-model speculation only; else 0).
    """

    forward_passes: list[int] | None = None
    tokens_per_pass: list[float] | None = None
    draft_passes: list[int] | None = None

    @property
    def mean_accepted(self) -> float:
        """Mean tokens accepted per target forward pass, over the rows."""
        values = self.tokens_per_pass or [0.0]
        return sum(values) / len(values)


class _Output:
    """Collects emitted tokens of one row and applies the stop tokens and the token budget, as `generate` does."""

    def __init__(self, steps: int, stop_ids: set[int]) -> None:
        self.steps, self.stop_ids = steps, stop_ids
        self.tokens: list[int] = []
        self.stopped_by: int | None = None
        self.done = steps == 0

    @property
    def remaining(self) -> int:
        return self.steps - len(self.tokens) - (self.stopped_by is not None)

    def add(self, token: int) -> bool:
        """Emit `token`; True when the row is finished (and nothing more may be emitted)."""
        if token in self.stop_ids:
            self.stopped_by, self.done = token, True
        else:
            self.tokens.append(token)
            self.done = len(self.tokens) >= self.steps
        return self.done

    def result(self, prompt_length: int, passes: int, draft_passes: int = 0) -> SpeculativeResult:
        completion = len(self.tokens) + (self.stopped_by is not None)
        reason = "stop" if self.stopped_by is not None else "length"
        return SpeculativeResult([self.tokens], None, [reason], [self.stopped_by], [prompt_length], [completion],
                                 forward_passes=[passes], tokens_per_pass=[completion / max(passes, 1)],
                                 draft_passes=[draft_passes])


def _one_prompt(model: Transformer, input_ids: Tensor | Sequence[Sequence[int]], max_new_tokens: int,
                what: str) -> tuple[list[int], int]:
    """The single prompt and the number of tokens to generate (as `stream` bounds it), or a one-line UserError."""
    prompts = _prompts(input_ids, model.config.vocab_size)
    if len(prompts) != 1:
        raise UserError(f"{what} decodes one prompt at a time (batch size 1), got {len(prompts)}; "
                        "loop over the prompts or use decoderlab.generate for batches")
    prompt = prompts[0]
    ctx = model.config.context_length
    if len(prompt) > ctx:
        raise UserError(f"a prompt of {len(prompt)} tokens exceeds the model's context length of {ctx}; shorten it")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise UserError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    # As in `stream`: the last token is chosen but never fed, so a full context still gets one new token.
    return prompt, min(max_new_tokens, ctx - len(prompt) + 1)


def _begin(model: Transformer, input_ids: Tensor | Sequence[Sequence[int]], max_new_tokens: int,
           stop_tokens: int | Iterable[int] | None, what: str) -> tuple[list[int], _Output]:
    """The checked prompt and an output collector with the stop tokens and token budget `generate` would use."""
    prompt, steps = _one_prompt(model, input_ids, max_new_tokens, what)
    return prompt, _Output(steps, _stop_tokens(stop_tokens, model, None))


def _cache_dtype(model: Transformer) -> torch.dtype | None:
    # The same choice as `generate`: an fp32 cache on the CPU, so the attention arithmetic matches plain decoding.
    return torch.float32 if model.device.type == "cpu" else None


def _eval(*models: Transformer) -> list[bool]:
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    return modes


def _restore(models: Iterable[Transformer], modes: list[bool]) -> None:
    for m, mode in zip(models, modes, strict=True):
        m.train(mode)


# ---- Token Recycling ---------------------------------------------------------------------------------------------


def tree_template(n_nodes: int, k: int = 8, prior: Sequence[float] = RANK_PRIOR) -> list[tuple[int, int]]:
    """A static draft tree of `n_nodes` nodes in breadth-first order, each (parent, rank): parent is an index
    into this list (-1: a child of the last accepted token), rank the column of the adjacency matrix its token
    comes from. The nodes are the `n_nodes` most likely paths under `prior` (acceptance by rank, independent
    across depths), so the budget goes to deep top-1 chains and shallow alternatives alike.
    """
    if isinstance(n_nodes, bool) or not isinstance(n_nodes, int) or n_nodes < 1:
        raise UserError(f"the draft tree needs at least one node, got {n_nodes!r}")
    if not 1 <= k <= len(prior):
        raise UserError(f"k must be in [1, {len(prior)}], got {k!r}")
    # Best-first expansion: a node's children only become candidates once it is chosen, so every chosen node's
    # parent is chosen too. Entries: (-score, tie-break, parent's chosen index, rank, depth).
    heap = [(-prior[r], r, -1, r, 1) for r in range(k)]
    chosen: list[tuple[int, int, int, float]] = []  # (parent, rank, depth, score)
    counter = k
    while heap and len(chosen) < n_nodes:
        neg, _, parent, rank, depth = heapq.heappop(heap)
        chosen.append((parent, rank, depth, -neg))
        me = len(chosen) - 1
        for r in range(k):
            counter += 1
            heapq.heappush(heap, (neg * prior[r], counter, me, r, depth + 1))
    # Breadth-first order (by depth, then parent's new index, then rank), with parents renumbered.
    order = _bfs(chosen)
    new_index = {old: new for new, old in enumerate(order)}
    return [(new_index[chosen[i][0]] if chosen[i][0] >= 0 else -1, chosen[i][1]) for i in order]


def _bfs(chosen: list[tuple[int, int, int, float]]) -> list[int]:
    children: dict[int, list[int]] = {}
    for i, (parent, _, _, _) in enumerate(chosen):
        children.setdefault(parent, []).append(i)
    order, frontier = [], [-1]
    while frontier:
        level = [c for p in frontier for c in sorted(children.get(p, []), key=lambda i: chosen[i][1])]
        order += level
        frontier = level
    return order


class TokenRecycler:
    """Token Recycling (training-free speculative decoding), greedy, batch size 1.

    An adjacency matrix [vocab, k] holds, for every token, the top-k next tokens of the last forward pass
    that computed logits after it; every pass overwrites the rows of all the tokens it saw. Each step grows a
    draft tree from the last accepted token through the matrix (the static `tree_template`), verifies the
    whole tree in one forward pass with tree attention, accepts the longest path greedy decoding agrees with
    plus one bonus token, and compacts the KV cache to that path. The matrix persists across `generate`
    calls, so reuse one recycler for a model. Output is token-for-token that of `generate(..., temperature=0)`
    (up to floating-point ties between the two best logits, as with any change of batch shape).
    """

    def __init__(self, model: Transformer, n_nodes: int = 8, k: int = 8) -> None:
        if model.config.sliding_window is not None:
            # The model applies its window to cache slots, which are not positions for tree nodes.
            raise UserError("Token Recycling does not support sliding-window models; use decoderlab.generate")
        V, device = model.config.vocab_size, model.device
        k = min(k, V)  # a tiny vocabulary has fewer than k candidates per token
        self.model, self.k = model, k
        self.template = tree_template(n_nodes, k)
        # Before anything is seen, rank r of every token points at token r: distinct siblings, harmless drafts.
        self.matrix = torch.arange(k, device=device).clamp(max=V - 1).repeat(V, 1)
        # Node 0 of a step's tree is the last accepted token; template node i becomes node i + 1.
        parents = [-1] + [p + 1 for p, _ in self.template]
        self.parents = torch.tensor(parents, device=device)
        self.ranks = torch.tensor([0] + [r for _, r in self.template], device=device)
        depth = [0]
        for p in parents[1:]:
            depth.append(depth[p] + 1)
        self.depth = torch.tensor(depth, device=device)
        # Nodes within depth d are a prefix of the breadth-first order: upto[d] is its length.
        self.upto = [sum(1 for x in depth if x <= d) for d in range(max(depth) + 1)]
        self.levels = [(self.upto[d - 1], self.upto[d]) for d in range(1, len(self.upto))]
        self.children: list[list[int]] = [[] for _ in parents]
        for i, p in enumerate(parents[1:], start=1):
            self.children[p].append(i)
        # Which tree node sees which (itself and its ancestors), built once: each step only prepends the
        # context columns, instead of materialising `causal() & tree(parents, start)` anew.
        n = len(parents)
        self.ancestors = masks.tree(self.parents, 0).materialize(n, n, batch_size=1, device=device)

    def update(self, tokens: Tensor, logits: Tensor) -> None:
        """Overwrite the rows of `tokens` [N] with the top-k of their next-token `logits` [N, V]."""
        self.matrix[tokens] = logits.topk(self.k, dim=-1).indices

    def draft(self, root: int, n: int) -> Tensor:
        """The first `n` tree nodes' tokens [n], grown from `root` through the matrix level by level."""
        tokens = torch.empty(n, dtype=torch.long, device=self.matrix.device)
        tokens[0] = root
        for start, end in self.levels:
            if start >= n:
                break
            end = min(end, n)
            tokens[start:end] = self.matrix[tokens[self.parents[start:end]], self.ranks[start:end]]
        return tokens

    @torch.inference_mode()
    def generate(self, input_ids: Tensor | Sequence[Sequence[int]], max_new_tokens: int = 256, *,
                 stop_tokens: int | Iterable[int] | None = None, compile: bool = False) -> SpeculativeResult:
        """Greedy continuation of one prompt by up to `max_new_tokens` tokens (stop tokens as `generate`).

        compile: verify full-size trees through one `torch.compile` graph (`generation.compiled`), as
        `generate(..., compile=True)` does for plain steps; the few smaller trees near the end run eagerly.
        """
        model = self.model
        prompt, out = _begin(model, input_ids, max_new_tokens, stop_tokens, "Token Recycling")
        if out.done:
            return out.result(len(prompt), 0)
        modes = _eval(model)
        try:
            return self._run(prompt, out, compile)
        finally:
            _restore([model], modes)

    def _run(self, prompt: list[int], out: _Output, compile: bool = False) -> SpeculativeResult:
        model, device, ctx = self.model, self.model.device, self.model.config.context_length
        slots = len(prompt) + out.steps + len(self.parents)
        if compile:
            slots = cache_slots(slots, ctx)
        cache = model.new_cache(1, slots, dtype=_cache_dtype(model))
        verify = CompiledTreeStep(model, cache, self.ancestors[0, 0]) if compile else None
        ids = torch.tensor([prompt], device=device)
        logits = model(ids, cache=cache)[0]  # every position's logits: they all feed the matrix
        self.update(ids[0], logits)
        passes = 1
        pending = int(logits[-1].argmax())
        while not out.add(pending):
            start = cache.length  # the pending token's slot and position
            depth = min(out.remaining - 1, ctx - 1 - start, len(self.upto) - 1)
            n = self.upto[depth]
            tokens = self.draft(pending, n)
            if verify is not None and n == verify.n:
                logits = verify(tokens[None], (start + self.depth)[None])[0]
            else:
                mask = torch.cat([self.ancestors.new_ones(1, 1, n, start), self.ancestors[:, :, :n, :n]], dim=-1)
                logits = model(tokens[None], positions=start + self.depth[:n], mask=mask, cache=cache)[0]
            passes += 1
            self.update(tokens, logits)
            greedy, drafted = logits.argmax(-1).tolist(), tokens.tolist()
            # Walk down the tree while greedy decoding's choice is among the node's children.
            path, node = [0], 0
            while True:
                choice = greedy[node]
                nxt = next((c for c in self.children[node] if c < n and drafted[c] == choice), None)
                if nxt is None:
                    break
                if out.add(choice):
                    break
                path.append(nxt)
                node = nxt
            if out.done:
                break
            cache.keep(start, torch.tensor(path, device=device) + start)
            pending = greedy[node]
        return out.result(len(prompt), passes)


# ---- draft-model speculative sampling ----------------------------------------------------------------------------


def _probs(logits: Tensor, params: SamplingParams) -> Tensor:
    """The distribution plain sampling draws from: temperature, then top-k, top-p, min-p, then softmax."""
    return filtered(logits, params).softmax(dim=-1)


def accept_probability(p: Tensor, q: Tensor) -> Tensor:
    """Speculative sampling's acceptance rule min(1, p/q) for a draft token with target probability p and draft
    probability q (q > 0, since the draft sampled it)."""
    return (p / q).clamp(max=1.0)


def residual(p: Tensor, q: Tensor) -> Tensor:
    """The distribution to resample from after a rejection: norm(max(0, p - q))."""
    r = (p - q).clamp(min=0)
    total = r.sum(dim=-1, keepdim=True)
    # total is 0 only when p == q, where nothing is ever rejected; fall back to p against rounding.
    return torch.where(total > 0, r / total.clamp(min=1e-30), p)


@torch.inference_mode()
def speculative_generate(model: Transformer, draft_model: Transformer,
                         input_ids: Tensor | Sequence[Sequence[int]], max_new_tokens: int = 256, *, k: int = 4,
                         temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                         min_p: float | None = None, seed: int | None = None,
                         stop_tokens: int | Iterable[int] | None = None) -> SpeculativeResult:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) with a smaller `draft_model`, batch size 1.

    Each round the draft proposes up to `k` tokens (sampled from its own filtered distribution q, with its own
    KV cache), the target scores them all in one pass, accepts draft i with probability min(1, p_i/q_i) and
    on the first rejection resamples from norm(max(0, p - q)); when all are accepted a bonus token comes from
    the target. Output is distributed exactly as `generate` with the same temperature / top_k / top_p / min_p;
    temperature 0 gives exactly plain greedy. Both caches roll back with `truncate`. Penalties are not supported.
    """
    params = SamplingParams(temperature, top_k, top_p, min_p)
    if draft_model.config.vocab_size != model.config.vocab_size:
        raise UserError(f"the draft model's vocabulary ({draft_model.config.vocab_size} tokens) differs from the "
                        f"target's ({model.config.vocab_size}); use a draft trained with the same tokenizer")
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UserError(f"k (draft tokens per round) must be an integer >= 1, got {k!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise UserError(f"seed must be an integer or None, got {seed!r}")
    prompt, out = _begin(model, input_ids, max_new_tokens, stop_tokens, "speculative_generate")
    if out.done:
        return out.result(len(prompt), 0)
    modes = _eval(model, draft_model)
    try:
        return _speculate(model, draft_model, prompt, out, k, params, seed)
    finally:
        _restore([model, draft_model], modes)


def _speculate(model: Transformer, draft_model: Transformer, prompt: list[int], out: _Output, k: int,
               params: SamplingParams, seed: int | None) -> SpeculativeResult:
    device = model.device
    generator = torch.Generator(device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    ctx_t, ctx_d = model.config.context_length, draft_model.config.context_length
    room = len(prompt) + out.steps + k + 1
    cache_t = model.new_cache(1, room, dtype=_cache_dtype(model))
    cache_d = draft_model.new_cache(1, room, dtype=_cache_dtype(draft_model))
    seq = list(prompt)  # every committed token; the last is not in the target's cache yet
    passes = draft_passes = 0
    while not out.done:
        n = len(seq)
        # Draft no further than the budget (the round also emits one target token) and both contexts allow.
        k_now = max(0, min(k, out.remaining - 1, ctx_t - n, ctx_d - n + 1))
        drafts: list[int] = []
        q_rows: list[Tensor] = []
        for _ in range(k_now):
            # The draft cache holds a prefix of seq + drafts: feed what it lacks (after a full acceptance, two).
            feed = (seq + drafts)[cache_d.length:]
            logits_d = draft_model(torch.tensor([feed], device=device), cache=cache_d, logits_to_keep=1)[0, -1]
            draft_passes += 1
            if params.greedy:
                token = int(logits_d.argmax())
            else:
                q = _probs(logits_d[None], params)[0]
                token = int(torch.multinomial(q, 1, generator=generator))
                q_rows.append(q)
            drafts.append(token)
        feed = seq[cache_t.length:] + drafts
        logits_t = model(torch.tensor([feed], device=device), cache=cache_t, logits_to_keep=k_now + 1)[0]
        passes += 1
        emitted = _verify(logits_t, drafts, q_rows, params, generator)
        accepted = len(emitted) - 1
        # Keep the committed context and the accepted drafts; the last emitted token is fed next round.
        cache_t.truncate(n + accepted)
        cache_d.truncate(min(cache_d.length, n + accepted))
        for token in emitted:
            seq.append(token)
            if out.add(token):
                break
    return out.result(len(prompt), passes, draft_passes)


def _verify(logits: Tensor, drafts: list[int], q_rows: list[Tensor], params: SamplingParams,
            generator: torch.Generator) -> list[int]:
    """The tokens a round emits: the accepted drafts, then the correction (on a rejection) or the bonus token.

    logits: the target's [len(drafts) + 1, V], row i scoring the token that draft i proposes.
    """
    if params.greedy:
        greedy = logits.argmax(-1).tolist()
        emitted = []
        for i, token in enumerate(drafts):
            if greedy[i] != token:
                break
            emitted.append(token)
        emitted.append(greedy[len(emitted)])
        return emitted
    p = _probs(logits, params)
    emitted = []
    if drafts:
        d = torch.tensor(drafts, device=logits.device)
        q = torch.stack(q_rows)
        rows = torch.arange(len(drafts), device=logits.device)
        chance = accept_probability(p[rows, d], q[rows, d])
        u = torch.rand(len(drafts), generator=generator, device=logits.device)
        ok = (u < chance).tolist()
        for i, token in enumerate(drafts):
            if not ok[i]:
                fix = residual(p[i], q[i])
                emitted.append(int(torch.multinomial(fix, 1, generator=generator)))
                return emitted
            emitted.append(token)
    emitted.append(int(torch.multinomial(p[len(drafts)], 1, generator=generator)))
    return emitted


# ---- self-speculation with multi-token heads ----------------------------------------------------------------------


@torch.inference_mode()
def mtp_generate(model: Transformer, input_ids: Tensor | Sequence[Sequence[int]], max_new_tokens: int = 256, *,
                 n_draft: int | None = None, stop_tokens: int | Iterable[int] | None = None) -> SpeculativeResult:
    """Greedy self-speculative decoding with the model's future-token heads (`config.n_future` >= 1), batch 1.

    The heads' logits at the last accepted position draft the next `n_draft` tokens (default: all heads) beyond
    the main head's; the model verifies them in one causal pass and keeps the prefix greedy decoding agrees
    with. Output is token-for-token that of `generate(..., temperature=0)`.
    """
    heads = model.config.n_future
    if heads < 1:
        raise UserError("this model has no future-token heads (n_future=0); train one with "
                        "`decoderlab train --objective mtp --n-future N` or use TokenRecycler")
    n_draft = heads if n_draft is None else n_draft
    if isinstance(n_draft, bool) or not isinstance(n_draft, int) or not 0 <= n_draft <= heads:
        raise UserError(f"n_draft must be an integer in [0, {heads}] (the model's future heads), got {n_draft!r}")
    prompt, out = _begin(model, input_ids, max_new_tokens, stop_tokens, "mtp_generate")
    if out.done:
        return out.result(len(prompt), 0)
    modes = _eval(model)
    try:
        device, ctx = model.device, model.config.context_length
        cache = model.new_cache(1, len(prompt) + out.steps + n_draft, dtype=_cache_dtype(model))
        feed = prompt
        drafts: list[int] = []
        passes = 0
        while True:
            start = cache.length
            res = model(torch.tensor([feed + drafts], device=device), cache=cache, future=True,
                        logits_to_keep=len(drafts) + 1)
            passes += 1
            greedy = res.logits[0].argmax(-1).tolist()
            accepted = 0
            while accepted < len(drafts) and drafts[accepted] == greedy[accepted]:
                accepted += 1
            if any(out.add(t) for t in greedy[:accepted + 1]):
                break
            # The pending token plus the accepted drafts stay; the rejected drafts' slots are rolled back.
            cache.truncate(start + len(feed) + accepted)
            feed = [greedy[accepted]]
            room = min(n_draft, out.remaining - 1, ctx - 1 - cache.length)
            drafts = [int(f[0, accepted].argmax()) for f in res.future_logits[:max(room, 0)]]
        return out.result(len(prompt), passes)
    finally:
        _restore([model], modes)
