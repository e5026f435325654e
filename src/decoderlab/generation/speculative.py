"""Lossless speculative decoding: draft several tokens cheaply, verify them in one forward pass of the model.

Three drafters share one contract (greedy output identical to `generate(..., temperature=0)`; sampled output
distributed exactly as plain sampling): `TokenRecycler` (training-free, a draft tree grown from a matrix of
recently seen top-k successors), `speculative_generate` (a smaller draft model; speculative sampling) and
`mtp_generate` (self-speculation with the model's own future-token heads). All take one prompt (batch size 1).

Each is a `Decoder` of the generation engine (`RecyclingDecoder`, `DraftDecoder`, `MTPDecoder`) that emits the
tokens a verification pass accepts, so the engine's host loop applies the same stop ids (by default every end id
of the generation_config, config and tokenizer), stop strings, token budget, finish reasons, text streaming and
logprobs as plain decoding: `stream(model, ids, decoder=TokenRecycler(model).decoder, tokenizer=tok)` streams
speculative output. The `*_generate` functions run such a stream and add acceptance statistics.
"""

from __future__ import annotations

import heapq
import time
import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor

from .. import masks
from ..errors import UserError
from ..model import Transformer
from ..tokenizer import Tokenizer
from .compiled import CompiledTreeStep, cache_slots
from .engine import (
    CACHE_CHUNK,
    Decoded,
    DecodeRequest,
    DecoderFactory,
    GenerationResult,
    Stream,
    require_finite,
    stream,
)
from .sampling import SamplingParams, penalized, probabilities, token_logprobs

# Prior acceptance probability of a draft by the rank of its token among the recycled successors; only the
# ratios matter, to decide which (parent, rank) nodes the static tree template spends its budget on.
RANK_PRIOR = (0.50, 0.16, 0.08, 0.05, 0.035, 0.025, 0.02, 0.015)
EXPLORE_EVERY = 16  # adaptive recycling verifies a depth-2 tree after this many plain steps in a row
# A tree must beat a plain step's tokens per second by this fraction to be verified: the estimates behind the
# choice are noisy, and a tree expected to gain a few percent loses as often as it wins.
TREE_MARGIN = 0.1
# Rounds of timed passes per tree size when measuring verification costs: at least COST_ROUNDS, more while they
# fit in COST_SECONDS (at most MAX_COST_ROUNDS), so a small model's sub-millisecond passes get enough of them.
COST_ROUNDS, COST_SECONDS, MAX_COST_ROUNDS = 5, 0.25, 40
REQUEST_CARRYOVER = 0.25  # what earlier requests' calibration weighs when a request starts (`new_request`)
STASH_ROWS = 8  # plain steps whose matrix rows are written together (one update instead of one a step)
STALE_PASSES = 16  # a depth's calibration not updated for this many drafting passes is extrapolated instead
# Verification cost models measured per model: {model: {(dtype, kv dtype, threads, nodes): seconds by node count}}.
_COSTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


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


def _result(steps: Stream) -> SpeculativeResult:
    """Run a speculative stream to the end: its `GenerationResult` with the decoder's pass counts."""
    decoder = steps.decoder
    base = steps.result()
    passes = decoder.forward_passes
    return SpeculativeResult(**{f.name: getattr(base, f.name) for f in fields(GenerationResult)},
                             forward_passes=[passes],
                             tokens_per_pass=[base.completion_tokens[0] / max(passes, 1)],
                             draft_passes=[getattr(decoder, "draft_passes", 0)])


def _check_request(request: DecodeRequest, what: str, greedy_only: bool, compiles: bool = False) -> None:
    """What every speculative decoder refuses, as one-line errors: batches, grammars and forced tokens (a
    step emits several tokens), compile where it has no compiled path, and sampling where it is greedy-only."""
    if len(request.prompts) != 1:
        raise UserError(f"{what} decodes one prompt at a time (batch size 1), got {len(request.prompts)}; "
                        "loop over the prompts or use decoderlab.generate for batches")
    if request.constrained:
        raise UserError(f"{what} emits several tokens per step and cannot follow a grammar or forced tokens; "
                        "use decoderlab.generate")
    if request.compile and not compiles:
        raise UserError(f"compile=True is not supported by {what}; leave it out")
    p = request.params
    if greedy_only and (not p.greedy or p.needs_seen or p.needs_counts):
        asked = [f"temperature={p.temperature}" if not p.greedy else "",
                 f"repetition_penalty={p.repetition_penalty}" if p.needs_seen else "",
                 f"frequency_penalty={p.frequency_penalty}" if p.needs_counts else ""]
        raise UserError(f"{what} decodes greedily without penalties, but the sampling settings ask for "
                        f"{', '.join(a for a in asked if a)} (settings not given come from the checkpoint's "
                        "generation_config); pass temperature=0 and no penalties, or use draft-model speculation")


def _cache(model: Transformer, request: DecodeRequest, extra: int) -> tuple[int, int]:
    """(first size, largest size) of a speculative decoder's cache: the prompt and what the request can use
    (plus `extra` slots for the drafts of a pass), the first size holding at most CACHE_CHUNK new tokens."""
    T, steps = request.prompt_length, request.max_new_tokens
    return T + min(steps, CACHE_CHUNK) + extra, T + steps + extra



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


@dataclass
class RecyclingStats:
    """What the adaptive choice predicted and saw over a recycler's passes (reset with `RecyclingStats()`):
    passes by node count (0: plain steps taken without drafting, `plain_is_best`), expected vs emitted tokens and
    predicted vs measured seconds (whole steps: pass and bookkeeping) of the steps that drafted."""

    passes: dict[int, int] = field(default_factory=dict)
    expected_tokens: float = 0.0
    emitted_tokens: int = 0
    predicted_seconds: float = 0.0
    measured_seconds: float = 0.0


def _tree_mask(ancestors: Tensor, start: int, n: int) -> Tensor:
    """The mask of a pass over the first n tree nodes after `start` cached tokens: every node sees the context and
    its own ancestors (`ancestors` [1, 1, N, N], built once per recycler)."""
    return torch.cat([ancestors.new_ones(1, 1, n, start), ancestors[:, :, :n, :n]], dim=-1)


def _measure_costs(model: Transformer, ancestors: Tensor, depth: Tensor, full: int,
                   kv_dtype: torch.dtype | None) -> list[float]:
    ctx = model.config.context_length
    prefix = max(1, min(64, ctx - full - 1))
    device = model.device
    cache = model.new_cache(1, prefix + full, dtype=kv_dtype)
    generator = torch.Generator(device="cpu").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, prefix + full), generator=generator).to(device)
    # Every size up to 8 (kernels take rows in blocks, e.g. our bf16 kernel four at a time: cost is a staircase
    # that a line between 4 and 8 would miss), then a few wider ones; linear in between.
    grid = sorted({n for n in (1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64, 96, 128) if n < full} | {full})
    times: dict[int, list[float]] = {n: [] for n in grid}
    with torch.inference_mode():
        model(ids[:, :prefix], cache=cache)
        # Rounds over every size, so a slow moment of a shared machine hits all sizes alike (ratios are what
        # the choice uses); the first round warms up. Each size's cost is its fastest round: timing noise only
        # ever adds, and medians of a few sub-millisecond passes put the staircase's steps in other places
        # from one process to the next.
        round_, started = 0, time.perf_counter()
        while round_ <= COST_ROUNDS or (round_ <= MAX_COST_ROUNDS and time.perf_counter() - started < COST_SECONDS):
            for n in grid:
                t0 = time.perf_counter()
                if n == 1:
                    model(ids[:, prefix:prefix + 1], cache=cache)
                else:
                    model(ids[:, prefix:prefix + n], positions=prefix + depth[:n],
                          mask=_tree_mask(ancestors, prefix, n), cache=cache)
                if round_:
                    times[n].append(time.perf_counter() - t0)
                cache.truncate(prefix)
            round_ += 1
    measured = {n: min(t) for n, t in times.items()}
    costs = [0.0]
    for n in range(1, full + 1):
        low = max(g for g in grid if g <= n)
        high = min(g for g in grid if g >= n)
        t = measured[low] if high == low else measured[low] + (measured[high] - measured[low]) * (n - low) / (
            high - low)
        costs.append(max(t, costs[-1]))  # a wider pass never costs less (noise aside)
    return costs


def _rows_to_write(path: list[int], drafted: list[int], rows: dict) -> list[int]:
    """The tree nodes whose logits a verification pass writes to the matrix, in write order (a later write of the
    same token wins): rejected nodes whose token has no row and is not on the accepted `path`, then the path.

    A rejected node's logits follow a context the text did not take; overwriting rows learned from the text with
    them cost trained 26M models a quarter of their speed-up (median 1.98x -> 1.52x in bf16; bigger trees write
    more such rows), though the recipe's tiny model, which reads little context, gained from it (README)."""
    on_path = {drafted[i] for i in path}
    return [i for i, t in enumerate(drafted) if t not in rows and t not in on_path] + path


class TokenRecycler:
    """Token Recycling (training-free speculative decoding), greedy, batch size 1.

    An adjacency matrix [vocab, k] holds, for every token, the top-k next tokens of the last forward pass that
    computed logits after it in the text (and their probabilities): every pass overwrites the rows of the tokens the
    text took (the prompt's, so a request's own prompt seeds it, a plain step's, a tree's accepted path), and a
    rejected tree node fills its token's row only where it has none. The rows live in a Python dict (drafting a tree is
    then a few microseconds of list lookups, not a chain of tensor ops); `matrix` and `probs` are their tensor
    views, `snapshot`/`restore` save and put back what was learned. Each step grows a draft tree from the last
    accepted token through the matrix (the static `tree_template`, best-first under a rank prior), verifies the tree
    in one forward pass with tree attention, accepts the longest path greedy decoding agrees with plus one bonus
    token, and compacts the KV cache to that path. The matrix persists across `generate` calls, so reuse one
    recycler for a model. Output is token-for-token that of `generate(..., temperature=0)` (up to floating-point
    ties between the two best logits, as with any change of batch shape).

    adaptive (default): each step verifies only the first n nodes of the template (1 <= n <= n_nodes) for the n that
    maximises expected tokens per second: the expected accepted length is 1 + the sum of the nodes' path
    probabilities (the recycled probabilities along the path, calibrated per depth against what was accepted), the
    cost of a pass with n nodes comes from `verification_costs` (measured once per model, dtype and thread count;
    about 3 s for a 124M model in fp32 on a 2-core CPU). n = 1 is a plain decoding step, so where drafts are rarely
    accepted (a cold matrix, an unpredictable text, a model whose wide passes cost nearly n times a narrow one)
    decoding falls back to plain steps by itself; a tree must beat it by TREE_MARGIN (`calibration` and
    `new_request` say how the path probabilities are calibrated). Only ratios of the measured costs matter, so they
    are measured together (interleaved rounds); what a drafting step spends besides its pass (drafting, matrix
    update, cache compaction) is timed while decoding and added to every tree's cost. Plain steps write their matrix
    rows STASH_ROWS at a time (before any drafting step), so a request that falls back costs about what `generate`
    does. `adaptive=False` verifies every step's full tree (and is what `compile=True` does: its graph has one tree
    size).
    """

    def __init__(self, model: Transformer, n_nodes: int = 16, k: int = 8, adaptive: bool = True) -> None:
        if model.config.sliding_window is not None:
            # The model applies its window to cache slots, which are not positions for tree nodes.
            raise UserError("Token Recycling does not support sliding-window models; use decoderlab.generate")
        V, device = model.config.vocab_size, model.device
        k = min(k, V)  # a tiny vocabulary has fewer than k candidates per token
        self.model, self.k, self.adaptive = model, k, bool(adaptive)
        # The template's nodes renumbered best-first (by prior path score; parents still come first): any prefix
        # is then the best tree of its size under the prior, which is what adaptive drafting cuts.
        bfs = tree_template(n_nodes, k)
        score: list[float] = []
        for parent, rank in bfs:
            score.append(RANK_PRIOR[rank] * (score[parent] if parent >= 0 else 1.0))
        order = sorted(range(len(bfs)), key=lambda i: (-score[i], i))
        renumber = {old: new for new, old in enumerate(order)}
        self.template = [(renumber[bfs[i][0]] if bfs[i][0] >= 0 else -1, bfs[i][1]) for i in order]
        # Before anything is seen, rank r of every token points at token r with probability 0: harmless drafts
        # that the adaptive choice does not spend a pass on.
        self.rows: dict[int, tuple[list[int], list[float]]] = {}
        self._unseen = ([min(r, V - 1) for r in range(k)], [0.0] * k)
        # Node 0 of a step's tree is the last accepted token; template node i becomes node i + 1.
        parents = [-1] + [p + 1 for p, _ in self.template]
        self.parents, self.ranks = parents, [0] + [r for _, r in self.template]
        depth = [0]
        for p in parents[1:]:
            depth.append(depth[p] + 1)
        self.depth = torch.tensor(depth, device=device)
        # within[d]: the longest prefix of nodes no deeper than d; reach[d]: the shortest prefix reaching depth d.
        deepest = max(depth)
        self.within = [max(n for n in range(1, len(depth) + 1) if max(depth[:n]) <= d) for d in range(deepest + 1)]
        self.reach = [depth.index(d) + 1 for d in range(deepest + 1)]
        self.width = depth.count(1)  # depth-1 nodes: ranks 0 .. width - 1
        self.children: list[list[int]] = [[] for _ in parents]
        for i, p in enumerate(parents[1:], start=1):
            self.children[p].append(i)
        # Which tree node sees which (itself and its ancestors), built once: each step only prepends the
        # context columns, instead of materialising `causal() & tree(parents, start)` anew.
        n = len(parents)
        self.ancestors = masks.tree(torch.tensor(parents, device=device), 0).materialize(n, n, batch_size=1,
                                                                                        device=device)
        self.depth_list = depth
        # Per-depth calibration of the path probabilities: running means (from 0: their ratio is what counts) of
        # accepted (>= d tokens) and predicted, and how many passes fed them.
        self._seen = [0.0] * (max(depth) + 1)
        self._predicted = [0.0] * (max(depth) + 1)
        self._observed = [0] * (max(depth) + 1)
        self._passes = 0  # drafting passes observed; _last_verified[d]: the last that verified depth d
        self._last_verified = [0] * (max(depth) + 1)
        self.costs: list[float] | None = None  # seconds of a pass with n nodes at index n (`verification_costs`)
        # Seconds a drafting step spends outside its forward pass (draft, choice, matrix update, cache compaction),
        # a running mean: added to every tree's cost, so a tree must pay for its bookkeeping too.
        self.overhead = 0.0
        self._alpha: list[float] | None = None  # `calibration()`, until the next observation
        # Plain steps not yet written to the matrix: the fed tokens and their logits rows [1, V].
        self._stash: list[tuple[int, Tensor]] = []
        # The last `plain_is_best`'s root: its depth-1 drafts and their recycled probability.
        self._root_drafts: list[int] = []
        self._root_mass = 0.0
        self._plain_streak = 0  # plain steps in a row (an exploring tree every EXPLORE_EVERY)
        self.stats = RecyclingStats()

    @property
    def matrix(self) -> Tensor:
        """The adjacency matrix [vocab, k]: each token's recycled top-k next tokens (a new tensor)."""
        return self._table(0, torch.long)

    @property
    def probs(self) -> Tensor:
        """The recycled probabilities [vocab, k] of `matrix`'s tokens (a new tensor)."""
        return self._table(1, torch.float32)

    def _table(self, field: int, dtype: torch.dtype) -> Tensor:
        table = torch.tensor(self._unseen[field], dtype=dtype).repeat(self.model.config.vocab_size, 1)
        if self.rows:
            seen = list(self.rows)
            table[seen] = torch.tensor([self.rows[t][field] for t in seen], dtype=dtype)
        return table.to(self.model.device)

    def snapshot(self) -> dict[int, tuple[list[int], list[float]]]:
        """What the matrix has learned, for `restore` (rows are replaced, never changed in place: a shallow copy
        is a snapshot)."""
        self.flush()
        return dict(self.rows)

    def restore(self, snapshot: dict[int, tuple[list[int], list[float]]]) -> None:
        """Put the matrix back as `snapshot` took it (from a recycler of the same vocabulary and k)."""
        V = self.model.config.vocab_size
        for token, (ids, probs) in snapshot.items():
            if not (0 <= token < V and len(ids) == len(probs) == self.k and all(0 <= t < V for t in ids)):
                raise UserError(f"this snapshot does not fit this recycler (row {token}: {len(ids)} tokens, vocabulary "
                                f"{V}, k={self.k}); restore a snapshot taken from a recycler of the same model and k")
        self._stash.clear()
        self.rows = dict(snapshot)

    def update(self, tokens: Tensor, logits: Tensor) -> None:
        """Overwrite the rows of `tokens` [N] with the top-k of their next-token `logits` [N, V] and the
        probabilities of those top-k (a token listed twice keeps its later row)."""
        top = logits.float().softmax(-1).topk(self.k, dim=-1)
        rows = self.rows
        for token, ids, probs in zip(tokens.tolist(), top.indices.tolist(), top.values.tolist(), strict=True):
            rows[token] = (ids, probs)

    def _draft(self, root: int, n: int) -> tuple[list[int], list[float]]:
        """The first `n` tree nodes' tokens and path probabilities, as lists (see `draft`)."""
        rows, unseen, parents, ranks = self.rows, self._unseen, self.parents, self.ranks
        tokens, path = [root], [1.0]
        for i in range(1, n):  # parents come before their children
            parent, rank = parents[i], ranks[i]
            ids, probs = rows.get(tokens[parent], unseen)
            tokens.append(ids[rank])
            path.append(path[parent] * probs[rank])
        return tokens, path

    def draft(self, root: int, n: int, with_probs: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """The first `n` tree nodes' tokens [n], grown from `root` through the matrix; with `with_probs`, also
        each node's path probability [n] (the product of the recycled probabilities from the root down to it; 1
        for the root)."""
        tokens, path = self._draft(root, n)
        device = self.model.device
        ids = torch.tensor(tokens, device=device)
        return (ids, torch.tensor(path, device=device)) if with_probs else ids

    def verification_costs(self, kv_dtype: torch.dtype | None = None) -> list[float]:
        """Seconds of a verification pass with n = 1 .. n_nodes + 1 tree nodes (index n; index 0 unused), after a
        64-token context: measured on this model (the fastest of COST_ROUNDS or more interleaved rounds after a
        warm-up, as many as fit in COST_SECONDS; at node counts 1 to 8, 12, 16, ... and the full tree, linear in
        between) and kept for the model, dtype, cache dtype and thread count."""
        model, full = self.model, len(self.parents)
        key = (model.dtype, kv_dtype, torch.get_num_threads(), full)
        known = _COSTS.setdefault(model, {})
        if key not in known:
            known[key] = _measure_costs(model, self.ancestors, self.depth, full, kv_dtype)
        self.costs = known[key]
        return self.costs

    @torch.inference_mode()
    def flush(self) -> None:
        """Write the stashed plain steps' rows to the matrix (one `update` for all of them)."""
        if self._stash:
            self.update(torch.tensor([s[0] for s in self._stash]), torch.cat([s[1] for s in self._stash]))
            self._stash.clear()

    def new_request(self) -> None:
        """Discount what earlier requests taught the calibration (to REQUEST_CARRYOVER of its weight; the ratios
        stay), so a request's own first passes move it: a text unlike the last one's should not pay for several
        trees calibrated on the other."""
        self._seen = [x * REQUEST_CARRYOVER for x in self._seen]
        self._predicted = [x * REQUEST_CARRYOVER for x in self._predicted]
        self._alpha = None

    def skipped(self, chosen: int) -> None:
        """Calibrate depth 1 with a plain step that chose `chosen` after `plain_is_best`: would one of the
        depth-1 drafts it skipped have been accepted?"""
        self._record(1, chosen in self._root_drafts, self._root_mass)
        self._alpha = None

    def _record(self, depth: int, landed: bool, predicted: float) -> None:
        """One more pass into depth `depth`'s running means: whether a draft there was accepted, and the path
        probability the drafts there had."""
        self._observed[depth] += 1
        self._seen[depth] = 0.9 * self._seen[depth] + 0.1 * landed
        self._predicted[depth] = 0.9 * self._predicted[depth] + 0.1 * predicted

    def _plain_rate(self) -> float:
        """Tokens per second a tree must beat: a plain pass's, raised by TREE_MARGIN."""
        return (1.0 + TREE_MARGIN) / self.costs[1]

    def tree_cost(self, n: int) -> float:
        """Seconds of a drafting step that verifies n nodes: the measured pass plus the bookkeeping `overhead`."""
        return self.costs[n] + self.overhead

    def calibration(self) -> list[float]:
        """Per depth, accepted over predicted path probability (running means over the last passes, from 4 on;
        depth 1 starts at 1, a deeper depth not verified lately extrapolates the two above it): recycled
        probabilities come from the last context a token was seen in, and are often far from the acceptance rate
        in either direction."""
        if self._alpha is not None:
            return self._alpha
        alpha = [1.0]
        for d in range(1, len(self._seen)):
            seen = self._observed[d]
            if seen >= 4 and (d == 1 or self._passes - self._last_verified[d] <= STALE_PASSES):
                own = (self._seen[d] + 1e-3 * (1 - 0.9 ** seen)) / (self._predicted[d] + 1e-3 * (1 - 0.9 ** seen))
                alpha.append(min(50.0, max(0.02, own)))
            elif d == 1:
                alpha.append(1.0)
            else:
                # A depth not verified lately (or in fewer than 4 passes) extrapolates the two above it
                # geometrically (each depth multiplies the path probability by one more recycled probability):
                # its own ratio would be stale, and a tree that stopped growing on a stale ratio never would.
                alpha.append(min(50.0, max(0.02, alpha[-1] * alpha[-1] / alpha[-2])))
        self._alpha = alpha
        return alpha

    def plain_is_best(self, root: int) -> bool:
        """Whether a plain step from `root` is expected to beat every tree, judged from one row of the matrix
        before drafting anything: with m the (calibrated) probability that some depth-1 draft is accepted, a tree
        reaching depth D expects about 1 + m + m^2 + ... + m^D tokens (confidence that holds along the path);
        plain wins when that, over the cost of the smallest tree reaching depth D (`tree_cost`), is below one
        token over a plain pass for every D."""
        width = self.width
        alpha = self.calibration()
        ids, probs = self.rows.get(root, self._unseen)
        self._root_drafts, self._root_mass = ids[:width], sum(probs[:width])
        m = self._root_mass
        plain_rate = self._plain_rate()
        expected, mass = 1.0, 1.0
        for depth in range(1, len(self.reach)):
            mass *= m
            expected += min(1.0, alpha[depth] * mass)
            if expected / self.tree_cost(self.reach[depth]) > plain_rate:
                return False
        return True

    def choose(self, path: list[float], n_max: int) -> tuple[int, float, float]:
        """(n, expected tokens, predicted seconds) for the pass over the first n of `n_max` nodes that maximises
        expected tokens per second; `path` holds the nodes' path probabilities. A tree costs `tree_cost(n)`, one
        node a plain pass; the seconds returned are those of the drafting step (`tree_cost`)."""
        alpha = self.calibration()
        best, expected, best_expected = 1, 1.0, 1.0
        best_rate = self._plain_rate()
        mass = [0.0] * len(alpha)  # path probability per depth; at most 1 after calibration (disjoint events)
        for n in range(2, n_max + 1):
            d = self.depth_list[n - 1]
            before = min(1.0, alpha[d] * mass[d])
            mass[d] += path[n - 1]
            expected += min(1.0, alpha[d] * mass[d]) - before
            rate = expected / self.tree_cost(n)
            if rate > best_rate:
                best, best_rate, best_expected = n, rate, expected
        return best, best_expected, self.tree_cost(best)

    def observe(self, path: list[float], n: int, accepted: int) -> None:
        """Calibrate the path probabilities per depth with a pass over n nodes that accepted `accepted` drafts."""
        predicted = [0.0] * len(self._seen)
        for i in range(1, n):
            predicted[self.depth_list[i]] += path[i]
        self._passes += 1
        for d in range(1, max(self.depth_list[:n]) + 1):
            self._last_verified[d] = self._passes
            self._record(d, accepted >= d, predicted[d])
        self._alpha = None

    def decoder(self, request: DecodeRequest) -> RecyclingDecoder:
        """The `Decoder` factory for `stream(..., decoder=recycler.decoder)`: greedy, no penalties, batch 1;
        `stream(..., compile=True)` verifies full-size trees through one compiled graph."""
        return RecyclingDecoder(self, request)

    def generate(self, input_ids: Tensor | Sequence[Sequence[int]], max_new_tokens: int = 256, *,
                 stop_tokens: int | Iterable[int] | None = None, stop_strings: str | Iterable[str] | None = None,
                 tokenizer: Tokenizer | None = None, logprobs: int | None = None,
                 compile: bool = False) -> SpeculativeResult:
        """Greedy continuation of one prompt by up to `max_new_tokens` tokens; stops, stop strings, text and
        logprobs as `generate` (the default stop ids are every end id of the model and `tokenizer`).
        Greedy whatever the checkpoint's generation_config says (this method takes no sampling settings).

        compile: verify full-size trees through one `torch.compile` graph (`generation.compiled`), as
        `generate(..., compile=True)` does for plain steps; the few smaller trees near the end run eagerly.
        """
        return _result(stream(self.model, input_ids, max_new_tokens, temperature=0.0, repetition_penalty=1.0,
                              stop_tokens=stop_tokens, stop_strings=stop_strings, tokenizer=tokenizer,
                              logprobs=logprobs, compile=compile, decoder=self.decoder))


class RecyclingDecoder:
    """Token Recycling as a `Decoder`: the prompt's pass emits its greedy token; every later step verifies a
    draft tree rooted at the last emitted token and emits the accepted path plus the bonus token."""

    def __init__(self, recycler: TokenRecycler, request: DecodeRequest) -> None:
        _check_request(request, "Token Recycling", greedy_only=True, compiles=True)
        if request.model is not recycler.model:
            raise UserError("this TokenRecycler was made for another model; make one per model")
        self.recycler, self.request = recycler, request
        self.budget, self.emitted, self.forward_passes = request.max_new_tokens, 0, 0
        self.cache = self.verify = None
        self.pending = 0  # the last emitted token: not in the cache yet, the root of the next tree

    def _reserve(self, needed: int) -> None:
        ctx = self.recycler.model.config.context_length
        self.cache.reserve(needed, limit=self.limit,
                           round_up=(lambda n: cache_slots(n, ctx)) if self.request.compile else None)

    @torch.inference_mode()
    def step(self, allowed: Tensor | None = None, forced: dict[int, int] | None = None) -> Decoded:
        r, request = self.recycler, self.request
        model, device, ctx = r.model, r.model.device, r.model.config.context_length
        if self.cache is None:
            prompt = request.prompts[0]
            if r.adaptive and not request.compile:
                r.verification_costs(request.kv_dtype)  # measured once per model, dtype and thread count
                r.new_request()
            slots, self.limit = _cache(model, request, len(r.parents))
            if request.compile:
                slots = cache_slots(slots, ctx)
            self.cache = model.new_cache(1, slots, dtype=request.kv_dtype)
            self.verify = CompiledTreeStep(model, self.cache, r.ancestors[0, 0]) if request.compile else None
            ids = torch.tensor([prompt], device=device)
            logits = model(ids, cache=self.cache)[0]  # every position's logits: they all feed the matrix
            require_finite(logits[-1])
            r.update(ids[0], logits)
            self.forward_passes = 1
            rows, emitted = logits[-1:], [int(logits[-1].argmax())]
        else:
            cache = self.cache
            start = cache.length  # the pending token's slot and position
            depth = min(self.budget - self.emitted - 1, ctx - 1 - start, len(r.within) - 1)
            n = r.within[depth]
            explore = r._plain_streak >= EXPLORE_EVERY  # now and then a tree anyway: calibration needs passes
            if r.adaptive and self.verify is None and not explore and r.plain_is_best(self.pending):
                r._plain_streak += 1
                return self._plain_step(start)
            r.flush()  # drafts read the latest rows
            drafted, node_probs = r._draft(self.pending, n)
            path_probs = None  # set where the adaptive choice is made (and then learns from the pass)
            if r.adaptive and self.verify is None:
                step_start, path_probs = time.perf_counter(), node_probs
                n_max = n
                n, expected, predicted = r.choose(path_probs, n_max)
                probe = min(r.reach[2] if len(r.reach) > 2 else n_max, n_max)  # the best tree reaching depth 2
                if explore and n < probe:  # recorded with no expected gain: the choice did not expect any
                    n = probe
                    expected, predicted = 1.0, r.tree_cost(n)
                if n == 1:  # no tree pays after all: the lean plain step
                    r._plain_streak += 1
                    return self._plain_step(start)
                r._plain_streak = 0
                drafted = drafted[:n]
                stats = r.stats
                stats.passes[n] = stats.passes.get(n, 0) + 1
                stats.expected_tokens += expected
                stats.predicted_seconds += predicted
                t0 = time.perf_counter()
            tokens = torch.tensor(drafted, device=device)
            self._reserve(start + n)
            if self.verify is not None and n == self.verify.n:
                logits = self.verify(tokens[None], (start + r.depth)[None])[0]
            elif n == 1:  # a plain decoding step
                logits = model(tokens[None], cache=cache)[0]
            else:
                logits = model(tokens[None], positions=start + r.depth[:n], mask=_tree_mask(r.ancestors, start, n),
                               cache=cache)[0]
            if path_probs is not None:
                forward = time.perf_counter() - t0
            self.forward_passes += 1
            greedy = logits.argmax(-1).tolist()
            # Walk down the tree while greedy decoding's choice is among the node's children; every node on the
            # path emits greedy decoding's choice after it (the last one's is the bonus token).
            path, node = [0], 0
            while (nxt := next((c for c in r.children[node] if c < n and drafted[c] == greedy[node]),
                               None)) is not None:
                path.append(nxt)
                node = nxt
            if path[-1] == len(path) - 1:  # nodes 0, 1, .. in order: the pass wrote them where the path goes
                cache.length = start + len(path)
            else:
                cache.keep(start, torch.tensor(path, device=device) + start)
            emitted = [greedy[i] for i in path]
            write = _rows_to_write(path, drafted[:n], r.rows)
            r.update(tokens[write], logits[write])
            rows = logits[path] if request.logprobs is not None else None
            if path_probs is not None:
                r.observe(path_probs, n, len(path) - 1)
                r.stats.emitted_tokens += len(emitted)
                seconds = time.perf_counter() - step_start
                r.stats.measured_seconds += seconds
                r.overhead = 0.9 * r.overhead + 0.1 * (seconds - forward)
        self.emitted += len(emitted)
        self.pending = emitted[-1]
        logprobs = None if request.logprobs is None else [token_logprobs(rows, emitted, request.logprobs)]
        return Decoded([emitted], logprobs)

    def _plain_step(self, start: int) -> Decoded:
        """A plain step without drafting, as lean as `generate`'s: its matrix row is stashed and written with the
        next few (`flush`); it calibrates depth 1 with the drafts `plain_is_best` looked at."""
        r, request = self.recycler, self.request
        model, cache, device = r.model, self.cache, r.model.device
        self._reserve(start + 1)
        logits = model(torch.tensor([[self.pending]], device=device), cache=cache)[0]
        self.forward_passes += 1
        emitted = [int(logits[0].argmax())]
        r.skipped(emitted[0])
        r._stash.append((self.pending, logits))
        if len(r._stash) >= STASH_ROWS:
            r.flush()
        r.stats.passes[0] = r.stats.passes.get(0, 0) + 1
        self.emitted += 1
        self.pending = emitted[0]
        logprobs = None if request.logprobs is None else [token_logprobs(logits, emitted, request.logprobs)]
        return Decoded([emitted], logprobs)

    def finish(self, rows: list[int]) -> None:
        pass  # one row: the host stops calling

    def close(self) -> None:
        self.recycler.flush()  # the next request's drafts learn from this one's plain steps too
        self.cache = self.verify = None


# ---- draft-model speculative sampling ----------------------------------------------------------------------------


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


def draft_decoder(draft_model: Transformer, k: int = 4) -> DecoderFactory:
    """The `Decoder` factory of speculative sampling with `draft_model` proposing `k` tokens a round:
    `stream(model, ids, decoder=draft_decoder(small, k=4), temperature=0.8, ...)`."""
    def factory(request: DecodeRequest) -> DraftDecoder:
        return DraftDecoder(request, draft_model, k)

    return factory


@torch.inference_mode()
def speculative_generate(model: Transformer, draft_model: Transformer,
                         input_ids: Tensor | Sequence[Sequence[int]], max_new_tokens: int = 256, *, k: int = 4,
                         temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                         min_p: float | None = None, repetition_penalty: float | None = None,
                         frequency_penalty: float | None = None, seed: int | None = None,
                         stop_tokens: int | Iterable[int] | None = None,
                         stop_strings: str | Iterable[str] | None = None, tokenizer: Tokenizer | None = None,
                         logprobs: int | None = None) -> SpeculativeResult:
    """Speculative sampling (Leviathan et al. 2023; Chen et al. 2023) with a smaller `draft_model`, batch size 1.

    Each round the draft proposes up to `k` tokens (sampled from its own processed distribution q, with its own
    KV cache), the target scores them all in one pass, accepts draft i with probability min(1, p_i/q_i) and
    on the first rejection resamples from norm(max(0, p - q)); when all are accepted a bonus token comes from
    the target. Output is distributed exactly as `generate` with the same sampling settings (arguments left as
    None take the target's generation_config defaults; penalties included: each position's p and q see the
    tokens before it, drafts too); temperature 0 gives exactly plain greedy. Stops, stop strings, text and
    logprobs as `generate`. Both caches roll back with `truncate`.
    """
    return _result(stream(model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                          min_p=min_p, repetition_penalty=repetition_penalty, frequency_penalty=frequency_penalty,
                          seed=seed, stop_tokens=stop_tokens, stop_strings=stop_strings, tokenizer=tokenizer,
                          logprobs=logprobs, decoder=draft_decoder(draft_model, k)))


class _History:
    """The tokens a row has seen (prompt and output) and how often it generated each, for the penalties."""

    def __init__(self, params: SamplingParams, prompt: list[int], vocab_size: int, device: torch.device) -> None:
        self.params, self.V = params, vocab_size
        self.seen = self.counts = None
        if params.needs_seen:
            self.seen = torch.zeros(1, vocab_size, dtype=torch.bool, device=device)
            self.seen[0, prompt] = True
        if params.needs_counts:
            self.counts = torch.zeros(1, vocab_size, device=device)

    def add(self, tokens: list[int]) -> None:
        for t in tokens:
            if self.seen is not None:
                self.seen[0, t] = True
            if self.counts is not None:
                self.counts[0, t] += 1

    def logits(self, logits: Tensor, drafts: list[int], first: int = 0) -> Tensor:
        """Penalised `logits` [N, V] where row i follows the history plus drafts[:first + i]."""
        if self.seen is None and self.counts is None:
            return logits
        N = logits.shape[0]
        before = torch.zeros(N, self.V, device=logits.device)  # row i: how often each token is in those drafts
        if drafts:
            cum = torch.nn.functional.one_hot(torch.tensor(drafts, device=logits.device), self.V).float().cumsum(0)
            at = torch.arange(N, device=logits.device) + first - 1  # row i takes cum[first + i - 1]
            rows = at >= 0
            before[rows] = cum[at[rows]]
        seen = None if self.seen is None else self.seen | (before > 0)
        counts = None if self.counts is None else self.counts + before
        return penalized(logits.float(), self.params, seen, counts)


class DraftDecoder:
    """Speculative sampling as a `Decoder`: each step is one round (up to k drafts, one target pass) and emits
    the accepted drafts plus the correction or bonus token."""

    def __init__(self, request: DecodeRequest, draft_model: Transformer, k: int) -> None:
        _check_request(request, "draft-model speculation", greedy_only=False)
        model = request.model
        if not isinstance(draft_model, Transformer):
            raise UserError(f"the draft model must be a decoderlab Transformer, got {type(draft_model).__name__}")
        if draft_model.config.vocab_size != model.config.vocab_size:
            raise UserError(f"the draft model's vocabulary ({draft_model.config.vocab_size} tokens) differs from the "
                            f"target's ({model.config.vocab_size}); use a draft trained with the same tokenizer")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UserError(f"k (draft tokens per round) must be an integer >= 1, got {k!r}")
        self.request, self.model, self.draft, self.k = request, model, draft_model, k
        self.params = request.params
        self.generator = torch.Generator(model.device).manual_seed(request.seed)
        self.seq = list(request.prompts[0])  # every emitted token; the last is not in the target's cache yet
        self.history = _History(self.params, self.seq, model.config.vocab_size, model.device)
        self.emitted = self.forward_passes = self.draft_passes = 0
        self.cache_t = self.cache_d = None
        self.was_training = draft_model.training

    @torch.inference_mode()
    def step(self, allowed: Tensor | None = None, forced: dict[int, int] | None = None) -> Decoded:
        model, draft, params, device = self.model, self.draft, self.params, self.model.device
        request = self.request
        first = self.cache_t is None
        if first:
            draft.eval()  # the host puts the target in eval mode; the draft is ours
            slots, self.limit = _cache(model, request, self.k + 1)
            self.cache_t = model.new_cache(1, slots, dtype=request.kv_dtype)
            dtype = request.cache_dtype or (torch.float32 if draft.device.type == "cpu" else None)
            self.cache_d = draft.new_cache(1, slots, dtype=dtype)
        cache_t, cache_d, seq = self.cache_t, self.cache_d, self.seq
        ctx_t, ctx_d = model.config.context_length, draft.config.context_length
        n = len(seq)
        # Draft no further than the budget (the round also emits one target token) and both contexts allow.
        k_now = max(0, min(self.k, request.max_new_tokens - self.emitted - 1, ctx_t - n, ctx_d - n + 1))
        drafts: list[int] = []
        q_rows: list[Tensor] = []
        for _ in range(k_now):
            # The draft cache holds a prefix of seq + drafts: feed what it lacks (after a full acceptance, two).
            feed = (seq + drafts)[cache_d.length:]
            cache_d.reserve(cache_d.length + len(feed), limit=self.limit)
            logits_d = draft(torch.tensor([feed], device=device), cache=cache_d, logits_to_keep=1)[0, -1]
            if self.draft_passes == 0:
                require_finite(logits_d, "the draft model")
            self.draft_passes += 1
            logits_d = self.history.logits(logits_d[None], drafts, first=len(drafts))[0]
            if params.greedy:
                token = int(logits_d.argmax())
            else:
                q = probabilities(logits_d[None], params)[0]
                token = int(torch.multinomial(q, 1, generator=self.generator))
                q_rows.append(q)
            drafts.append(token)
        feed = seq[cache_t.length:] + drafts
        cache_t.reserve(cache_t.length + len(feed), limit=self.limit)
        raw = model(torch.tensor([feed], device=device), cache=cache_t, logits_to_keep=k_now + 1)[0]
        if first:
            require_finite(raw[0])
        self.forward_passes += 1
        emitted = _verify(self.history.logits(raw, drafts), drafts, q_rows, params, self.generator)
        accepted = len(emitted) - 1
        # Keep the committed context and the accepted drafts; the last emitted token is fed next round.
        cache_t.truncate(n + accepted)
        cache_d.truncate(min(cache_d.length, n + accepted))
        seq += emitted
        self.history.add(emitted)
        self.emitted += len(emitted)
        logprobs = None
        if request.logprobs is not None:
            logprobs = [token_logprobs(raw[:len(emitted)], emitted, request.logprobs)]
        return Decoded([emitted], logprobs)

    def finish(self, rows: list[int]) -> None:
        pass  # one row: the host stops calling

    def close(self) -> None:
        self.cache_t = self.cache_d = None
        self.draft.train(self.was_training)


def _verify(logits: Tensor, drafts: list[int], q_rows: list[Tensor], params: SamplingParams,
            generator: torch.Generator) -> list[int]:
    """The tokens a round emits: the accepted drafts, then the correction (on a rejection) or the bonus token.

    logits: the target's [len(drafts) + 1, V] (penalties applied), row i scoring the token after draft i - 1.
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
    p = probabilities(logits, params)
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


def mtp_decoder(n_draft: int | None = None) -> DecoderFactory:
    """The `Decoder` factory of self-speculation with the model's future heads (`n_draft` of them; default all):
    `stream(model, ids, decoder=mtp_decoder())`. Greedy, batch 1."""
    def factory(request: DecodeRequest) -> MTPDecoder:
        return MTPDecoder(request, n_draft)

    return factory


def mtp_generate(model: Transformer, input_ids: Tensor | Sequence[Sequence[int]], max_new_tokens: int = 256, *,
                 n_draft: int | None = None, stop_tokens: int | Iterable[int] | None = None,
                 stop_strings: str | Iterable[str] | None = None, tokenizer: Tokenizer | None = None,
                 logprobs: int | None = None) -> SpeculativeResult:
    """Greedy self-speculative decoding with the model's future-token heads (`config.n_future` >= 1), batch 1.

    The heads' logits at the last accepted position draft the next `n_draft` tokens (default: all heads) beyond
    the main head's; the model verifies them in one causal pass and keeps the prefix greedy decoding agrees
    with. Output is token-for-token that of `generate(..., temperature=0)`, greedy whatever the checkpoint's
    generation_config says; stops, stop strings, text and logprobs as `generate`.
    """
    return _result(stream(model, input_ids, max_new_tokens, temperature=0.0, repetition_penalty=1.0,
                          stop_tokens=stop_tokens, stop_strings=stop_strings, tokenizer=tokenizer,
                          logprobs=logprobs, decoder=mtp_decoder(n_draft)))


class MTPDecoder:
    """Self-speculation as a `Decoder`: each step is one causal pass over the pending token and the heads' drafts,
    and emits the drafts greedy decoding agrees with plus greedy decoding's next token."""

    def __init__(self, request: DecodeRequest, n_draft: int | None) -> None:
        model = request.model
        heads = model.config.n_future
        if heads < 1:
            raise UserError("this model has no future-token heads (n_future=0); train one with "
                            "`decoderlab train --objective mtp --n-future N` or use TokenRecycler")
        n_draft = heads if n_draft is None else n_draft
        if isinstance(n_draft, bool) or not isinstance(n_draft, int) or not 0 <= n_draft <= heads:
            raise UserError(f"n_draft must be an integer in [0, {heads}] (the model's future heads), got {n_draft!r}")
        _check_request(request, "multi-token-head speculation", greedy_only=True)
        self.request, self.model, self.n_draft = request, model, n_draft
        self.emitted = self.forward_passes = 0
        self.cache = None
        self.feed = list(request.prompts[0])
        self.drafts: list[int] = []

    @torch.inference_mode()
    def step(self, allowed: Tensor | None = None, forced: dict[int, int] | None = None) -> Decoded:
        model, request, device = self.model, self.request, self.model.device
        first = self.cache is None
        if first:
            slots, self.limit = _cache(model, request, self.n_draft)
            self.cache = model.new_cache(1, slots, dtype=request.kv_dtype)
        cache, feed, drafts = self.cache, self.feed, self.drafts
        start = cache.length
        cache.reserve(start + len(feed) + len(drafts), limit=self.limit)
        res = model(torch.tensor([feed + drafts], device=device), cache=cache, future=True,
                    logits_to_keep=len(drafts) + 1)
        if first:
            require_finite(res.logits[0, -1])
        self.forward_passes += 1
        greedy = res.logits[0].argmax(-1).tolist()
        accepted = 0
        while accepted < len(drafts) and drafts[accepted] == greedy[accepted]:
            accepted += 1
        emitted = greedy[:accepted + 1]
        self.emitted += len(emitted)
        # The pending token plus the accepted drafts stay; the rejected drafts' slots are rolled back.
        cache.truncate(start + len(feed) + accepted)
        self.feed = [greedy[accepted]]
        room = min(self.n_draft, request.max_new_tokens - self.emitted - 1,
                   model.config.context_length - 1 - cache.length)
        self.drafts = [int(f[0, accepted].argmax()) for f in res.future_logits[:max(room, 0)]]
        logprobs = None
        if request.logprobs is not None:
            logprobs = [token_logprobs(res.logits[0, :len(emitted)], emitted, request.logprobs)]
        return Decoded([emitted], logprobs)

    def finish(self, rows: list[int]) -> None:
        pass  # one row: the host stops calling

    def close(self) -> None:
        self.cache = None
