"""Recursive Speculative Decoding (RSD, Jeon et al. 2024): sampled speculation with a draft *tree* whose siblings
are drawn without replacement, verified in one target pass, exact in distribution.

Each round the draft model grows a tree of fixed shape (`DraftTree`: `branching[d]` children for every node at
depth d) from the last emitted token: at every node, Gumbel-top-k over the draft's processed distribution q (the
same temperature/top-k/top-p/min-p as the target) draws its children without replacement, one draft pass per
level. The target scores the whole tree in one forward pass (the tree mask `masks.tree` over the KV cache), and
recursive rejection sampling walks it from the root: the children of the current node are tried in the order they
were drawn; child x is accepted with probability min(1, p(x) / q(x)); on a rejection the target's distribution
becomes the residual p <- norm(max(p - q, 0)) and q loses x (renormalised: the law of the next sibling given the
earlier ones), and the next sibling is tested against them. An accepted child becomes the current node; when every
child is rejected the token is drawn from the last residual, and at a leaf a bonus token comes from the target.
Every emitted token is thereby distributed exactly as plain sampling with the target's processed distribution p.

Rows are independent and batched: the caches keep each row's accepted path (compacted, right-aligned, with a
per-row mask of the slots that hold its tokens), so a batch of prompts decodes together. Greedy (temperature 0)
drafts the draft's top-`branching[d]` tokens and accepts the child greedy decoding picks: identical to plain greedy.
Repetition/frequency penalties are refused (use chain speculation, `speculative_generate`, for those).

Self-drafts: with no draft model, a model with future-token heads (`n_future`) drafts level d of the tree from
head d's distribution read at the node before the root (one known law per level, siblings without replacement under
each parent); the same recursive rejection keeps the output exact. The first round, with no heads read yet, emits
one token.

`rsd_decoder(draft, width, depth)` is the engine's `Decoder` factory (`generate(..., decoder=...)` and `stream`
then apply stops, stop strings, text streaming and logprobs as for plain decoding); `rsd_generate` adds acceptance
statistics.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from .. import masks
from ..cache import KVCache
from ..errors import UserError
from ..model import Transformer
from ..tokenizer import Tokenizer
from .engine import CACHE_CHUNK, Decoded, DecodeRequest, DecoderFactory, GenerationResult, require_finite, stream
from .sampling import gumbel_noise, probabilities, sample, token_logprobs
from .speculative import SpeculativeResult, residual

# A tree bigger than this is refused: the verification pass feeds every node, and its mask is dense.
MAX_TREE_NODES = 1024


@dataclass(frozen=True)
class DraftTree:
    """The shape of an RSD draft tree: every node at depth d has `branching[d]` children (RSD-C).

    Nodes are numbered breadth first, node 0 being the root (the last emitted token); level d holds nodes
    `starts[d] .. starts[d + 1] - 1`, and child r of node i at depth d is `starts[d + 1] + (i - starts[d]) *
    branching[d] + r`.
    """

    branching: tuple[int, ...]

    def __post_init__(self) -> None:
        b = self.branching
        if not isinstance(b, tuple) or not b or any(isinstance(x, bool) or not isinstance(x, int) or x < 1
                                                    for x in b):
            raise UserError(f"the draft tree's width must be an integer >= 1 or a non-empty list of them (children "
                            f"per node at each depth), got {b!r}")
        if self.size > MAX_TREE_NODES:
            raise UserError(f"a draft tree of branching {list(b)} has {self.size} nodes, more than "
                            f"{MAX_TREE_NODES}; use a narrower or shallower tree")

    @classmethod
    def of(cls, width: int | Sequence[int] = 2, depth: int | None = None) -> DraftTree:
        """`width` children per node at each of `depth` levels (default 3), or per-depth widths [b0, b1, ...]."""
        if isinstance(width, Sequence) and not isinstance(width, (str, bytes)):
            branching = tuple(width)
            if depth is not None and depth != len(branching):
                raise UserError(f"depth={depth!r} disagrees with the {len(branching)} per-depth widths {list(width)}; "
                                "give one or the other")
            return cls(branching)
        depth = 3 if depth is None else depth
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 1:
            raise UserError(f"depth (draft tokens along a path) must be an integer >= 1, got {depth!r}")
        return cls((width,) * depth)

    @property
    def depth(self) -> int:
        return len(self.branching)

    @property
    def starts(self) -> list[int]:
        """starts[d]: the first node of level d, for d = 0 .. depth + 1 (the last is the node count)."""
        out, n, size = [0], 1, 0
        for b in (*self.branching, 1):
            size += n
            out.append(size)
            n *= b
        return out

    @property
    def size(self) -> int:
        return self.starts[-1]

    def parents(self) -> list[int]:
        """Each node's parent (-1 for the root), breadth first."""
        s, out = self.starts, [-1]
        for d, b in enumerate(self.branching):
            out += [s[d] + j // b for j in range((s[d + 1] - s[d]) * b)]
        return out

    def depths(self) -> list[int]:
        s = self.starts
        return [d for d in range(self.depth + 1) for _ in range(s[d + 1] - s[d])]


def sample_without_replacement(log_q: Tensor, k: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """k tokens of each row of `log_q` [..., V] drawn without replacement (Gumbel-top-k: the top k of log q + g),
    in the order sequential sampling without replacement would draw them; and which of them exist [..., k]
    (a row whose distribution has fewer than k tokens yields fewer)."""
    noise = gumbel_noise(tuple(log_q.shape), generator, log_q.device)
    top = (log_q + noise).topk(k, dim=-1)
    return top.indices, top.values.isfinite()


def rsd_decoder(draft_model: Transformer | None, width: int | Sequence[int] = 2,
                depth: int | None = None) -> DecoderFactory:
    """The `Decoder` factory of RSD with `draft_model` drafting a tree of `width` children per node (or per-depth
    widths [b0, b1, ...]) and `depth` levels (default 3): `generate(model, ids, decoder=rsd_decoder(small, 2, 3),
    temperature=0.8)`. `draft_model=None` drafts with the target's own future-token heads (`n_future` >= depth):
    level d of the tree is drawn from head d's distribution at the node before the root."""
    tree = DraftTree.of(width, depth)

    def factory(request: DecodeRequest) -> RSDDecoder:
        return RSDDecoder(request, draft_model, tree)

    return factory


def rsd_generate(model: Transformer, draft_model: Transformer | None, input_ids: Tensor | Sequence[Sequence[int]],
                 max_new_tokens: int = 256, *, width: int | Sequence[int] = 2, depth: int | None = None,
                 temperature: float | None = None, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, seed: int | None = None,
                 stop_tokens: int | Iterable[int] | None = None, stop_strings: str | Iterable[str] | None = None,
                 tokenizer: Tokenizer | None = None, logprobs: int | None = None) -> SpeculativeResult:
    """Recursive Speculative Decoding with `draft_model` (None: the target's future heads, `rsd_decoder`): output
    distributed exactly as `generate` with the same
    sampling settings (arguments left as None take the target's generation_config defaults), a batch of prompts
    at once. The tree: `width` children per node (or per-depth widths) over `depth` levels (default 3).
    Temperature 0 gives exactly plain greedy. Stops, stop strings, text and logprobs as `generate`; the result adds
    target/draft forward passes and tokens per target pass per row."""
    steps = stream(model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   min_p=min_p, seed=seed, stop_tokens=stop_tokens, stop_strings=stop_strings, tokenizer=tokenizer,
                   logprobs=logprobs, decoder=rsd_decoder(draft_model, width, depth))
    base = steps.result()
    decoder: RSDDecoder = steps.decoder  # type: ignore[assignment]
    passes = decoder.passes_per_row()
    return SpeculativeResult(**{f.name: getattr(base, f.name) for f in fields(GenerationResult)},
                             forward_passes=passes,
                             tokens_per_pass=[c / max(n, 1) for c, n in zip(base.completion_tokens, passes,
                                                                             strict=True)],
                             draft_passes=[decoder.draft_passes] * len(passes))


def _forward(model: Transformer, cache: KVCache, tokens: Tensor, positions: Tensor, mask: Tensor) -> Tensor:
    cache.reserve(cache.length + tokens.shape[1])
    return model(tokens, positions=positions, mask=mask, cache=cache)


def _block_mask(ctx: Tensor, pre: Tensor, tree: Tensor) -> Tensor:
    """Mask [B, 1, P + n, S + P + n] of a feed of P `pre` tokens (valid where `pre` [B, P]; causal among them)
    then the n nodes of a tree (ancestors `tree` [n, n]; they see every valid pre token), after cached slots
    valid where `ctx` [B, S]. Every token sees itself, so padding rows never attend to nothing."""
    B, P, n = pre.shape[0], pre.shape[1], tree.shape[0]
    if P == 0:  # the usual round: only the tree is new
        return torch.cat([ctx[:, None, :].expand(B, n, ctx.shape[1]), tree.expand(B, n, n)], dim=-1)[:, None]
    device = pre.device
    eye = torch.eye(P, dtype=torch.bool, device=device)
    causal = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    pre_rows = torch.cat([(causal & pre[:, None, :]) | eye, torch.zeros(B, P, n, dtype=torch.bool, device=device)],
                         dim=-1)
    tree_rows = torch.cat([pre[:, None, :].expand(B, n, P), tree.expand(B, n, n)], dim=-1)
    own = torch.cat([pre_rows, tree_rows], dim=1)
    return torch.cat([ctx[:, None, :].expand(B, P + n, ctx.shape[1]), own], dim=-1)[:, None]


def _keep_rows(cache: KVCache, start: int, src: Tensor) -> None:
    """Move each row's entries at slots `start + src[b]` [B, L] to `start .. start + L - 1` and cut the rest."""
    keys, values = cache.keys, cache.values
    Ly, B, H, _, D = keys.shape
    L = src.shape[1]
    index = (start + src)[None, :, None, :, None].expand(Ly, B, H, L, D)
    keys[:, :, :, start:start + L] = keys.gather(3, index)
    values[:, :, :, start:start + L] = values.gather(3, index)
    cache.truncate(start + L)


class RSDDecoder:
    """RSD as a `Decoder`: each step is one round (`depth` draft passes, one target pass over the tree) and emits,
    per row, the accepted path plus the correction or bonus token."""

    def __init__(self, request: DecodeRequest, draft_model: Transformer | None, tree: DraftTree) -> None:
        model, params = request.model, request.params
        if request.constrained:
            raise UserError("RSD emits several tokens per step and cannot follow a grammar or forced tokens; "
                            "use decoderlab.generate")
        if request.compile:
            raise UserError("compile=True is not supported by RSD; leave it out")
        if params.needs_seen or params.needs_counts:
            raise UserError("RSD does not apply repetition/frequency penalties (each tree node would need its own "
                            "history); leave them out, or use draft-model chain speculation "
                            "(speculative_generate) or plain decoding")
        if draft_model is None:  # self-drafts from the future heads
            if model.config.n_future < tree.depth:
                raise UserError(f"drafting a tree of depth {tree.depth} with the model's own future-token heads "
                                f"needs n_future >= {tree.depth}, and this model has {model.config.n_future}; use a "
                                "shallower tree or a draft model")
        elif not isinstance(draft_model, Transformer):
            raise UserError(f"the draft model must be a decoderlab Transformer, got {type(draft_model).__name__}")
        if draft_model is not None and draft_model.config.vocab_size != model.config.vocab_size:
            raise UserError(f"the draft model's vocabulary ({draft_model.config.vocab_size} tokens) differs from the "
                            f"target's ({model.config.vocab_size}); use a draft trained with the same tokenizer")
        for who, m in (("target", model), ("draft", draft_model or model)):
            if m.config.sliding_window is not None:
                # The model applies its window to cache slots, which are not positions for tree nodes.
                raise UserError(f"RSD does not support sliding-window models (the {who} is one); use "
                                "decoderlab.generate")
        if max(tree.branching) > model.config.vocab_size:
            raise UserError(f"a draft-tree width of {max(tree.branching)} exceeds the vocabulary "
                            f"({model.config.vocab_size} tokens); use at most that many children per node")
        self.request, self.model, self.draft, self.tree, self.params = request, model, draft_model, tree, params
        device = model.device
        self.generator = torch.Generator(device).manual_seed(request.seed)
        self.starts = tree.starts
        parents = torch.tensor(tree.parents(), device=device)
        n = tree.size
        self.ancestors = masks.tree(parents, 0).materialize(n, n, batch_size=1, device=device)[0, 0]
        self.depth_of = torch.tensor(tree.depths(), device=device)
        # Each internal node's children [internal nodes, widest branching], -1 where its level has fewer.
        s, widest = self.starts, max(tree.branching)
        self.kids = torch.tensor([[s[d + 1] + (i - s[d]) * b + r if r < b else -1 for r in range(widest)]
                                  for d, b in enumerate(tree.branching) for i in range(s[d], s[d + 1])],
                                 dtype=torch.long, device=device)
        self.forward_passes = self.draft_passes = 0
        self.finished_at: dict[int, int] = {}
        self.cache_t = self.cache_d = None
        self.was_training = draft_model is not None and draft_model.training
        # Self-drafts: the future heads' draft distributions for the next round's levels [B, depth, V] (logits
        # when greedy), read at the node before its root; None until the first target pass.
        self.heads = None

    def passes_per_row(self) -> list[int]:
        """Target forward passes each row took (up to the step it finished)."""
        return [self.finished_at.get(b, self.forward_passes) for b in range(len(self.request.prompts))]

    def _start(self) -> None:
        request, model, draft, device = self.request, self.model, self.draft, self.model.device
        prompts, T = request.prompts, request.prompt_length
        B = len(prompts)
        if draft is not None:
            draft.eval()  # the host puts the target in eval mode; the draft is ours
        ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts], device=device)
        valid = torch.arange(T, device=device) >= torch.tensor([T - len(p) for p in prompts], device=device)[:, None]
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)
        slots = T + min(request.max_new_tokens, CACHE_CHUNK) + self.tree.size
        self.cache_t = model.new_cache(B, slots, dtype=request.kv_dtype)
        if draft is not None:
            dtype = request.cache_dtype or (torch.float32 if draft.device.type == "cpu" else None)
            self.cache_d = draft.new_cache(B, slots, dtype=dtype)
        empty = torch.zeros(B, 0, dtype=torch.bool, device=device)
        self.valid_t = self.valid_d = empty  # which cached slots hold a row's tokens
        # Tokens each model still has to read before the root (the last emitted token): (ids, valid, positions).
        self.pre_t = self.pre_d = (ids[:, :-1], valid[:, :-1], pos[:, :-1])
        self.root, self.root_pos = ids[:, -1], pos[:, -1]
        # Per row, as Python numbers: each round's depth is decided from them without touching tensors.
        self.emitted_list, self.root_pos_list, self.done_rows = [0] * B, pos[:, -1].tolist(), set()

    def _depth_now(self) -> int:
        """Levels this round may draft: within the budget (the round also emits one target token) and both
        contexts, for every unfinished row."""
        live = [b for b in range(len(self.emitted_list)) if b not in self.done_rows]
        if not live:
            return 0
        budget = self.request.max_new_tokens - max(self.emitted_list[b] for b in live) - 1
        last = max(self.root_pos_list[b] for b in live)
        room_t = self.model.config.context_length - 1 - last
        if self.draft is None:  # the heads: none before the first target pass
            return 0 if self.heads is None else max(0, min(self.tree.depth, budget, room_t))
        room_d = self.draft.config.context_length - last  # leaves are not fed to the draft
        return max(0, min(self.tree.depth, budget, room_t, room_d))

    @torch.inference_mode()
    def step(self, allowed: Tensor | None = None, forced: dict[int, int] | None = None) -> Decoded:
        first = self.cache_t is None
        if first:
            self._start()
        D = self._depth_now()
        s = self.starts
        n = s[D + 1]  # nodes of this round's tree
        A = self.ancestors[:n, :n]
        B, device = len(self.request.prompts), self.model.device
        tokens = torch.empty(B, n, dtype=torch.long, device=device)
        tokens[:, 0] = self.root
        exists = torch.ones(B, n, dtype=torch.bool, device=device)
        q = None
        t0_d = None
        if D > 0 and self.draft is None:
            q = self._draft_from_heads(tokens, exists, D)
        elif D > 0:
            q, t0_d = self._draft(tokens, exists, D, first)
        # The target reads what it lacks, the root and the whole tree, in one pass.
        pre_ids, pre_valid, pre_pos = self.pre_t
        ctx_ctx, P = self.valid_t, pre_ids.shape[1]
        positions = self.root_pos[:, None] + self.depth_of[:n]
        if self.root_pos_list and max(self.root_pos_list) + D >= self.model.config.context_length:
            positions = positions.clamp(max=self.model.config.context_length - 1)
        mask = _block_mask(ctx_ctx, pre_valid, A)
        if P:  # the prompt (first round): read it in the same pass
            positions, tokens = torch.cat([pre_pos, positions], 1), torch.cat([pre_ids, tokens], 1)
            self.valid_t = torch.cat([ctx_ctx, pre_valid], 1)
            self.pre_t = (pre_ids[:, :0], pre_valid[:, :0], pre_pos[:, :0])
        self.cache_t.reserve(self.cache_t.length + tokens.shape[1])
        out = self.model(tokens, positions=positions, mask=mask, cache=self.cache_t, future=self.draft is None)
        raw, heads = (out, None) if self.draft is not None else (out.logits, out.future_logits)
        raw, tokens = raw[:, P:], tokens[:, P:]
        if first:
            require_finite(raw[:, 0])
        self.forward_passes += 1
        t0_t = ctx_ctx.shape[1] + P
        path, final = self._verify(raw, q, tokens, exists, D)
        if heads is not None:  # the next round's draft laws: the heads at the node the final token follows
            rows = torch.arange(B, device=device)
            last = P + torch.cat([torch.zeros(B, 1, dtype=torch.long, device=device), path], 1)[
                rows, (path >= 0).sum(1)]
            at = torch.stack([h[rows, last] for h in heads[:self.tree.depth]], 1)  # [B, depth, V]
            self.heads = at.float() if self.params.greedy else probabilities(at, self.params)
        return self._commit(raw, tokens, path, final, D, t0_t, t0_d)

    def _draft(self, tokens: Tensor, exists: Tensor, D: int, first: bool) -> tuple[Tensor | None, int]:
        """Grow the tree level by level (fills `tokens` and `exists` [B, n]); returns the draft's processed
        distribution at every internal node [B, internal, V] (None when greedy) and the root's draft slot."""
        draft, cache, s, params = self.draft, self.cache_d, self.starts, self.params
        B = tokens.shape[0]
        pre_ids, pre_valid, pre_pos = self.pre_d
        ctx_valid = self.valid_d
        ctx = draft.config.context_length
        logits = _forward(draft, cache, torch.cat([pre_ids, self.root[:, None]], 1),
                          torch.cat([pre_pos, self.root_pos[:, None]], 1).clamp(max=ctx - 1),
                          _block_mask(ctx_valid, pre_valid, self.ancestors[:1, :1]))[:, -1:]
        if first:
            require_finite(logits, "the draft model")
        self.draft_passes += 1
        self.valid_d = torch.cat([ctx_valid, pre_valid], 1)
        self.pre_d = (pre_ids[:, :0], pre_valid[:, :0], pre_pos[:, :0])
        t0 = self.valid_d.shape[1]  # the root's slot
        q_levels = []
        for d in range(D):
            b = self.tree.branching[d]
            lo, hi, end = s[d], s[d + 1], s[d + 2]  # level d is lo..hi-1; its children hi..end-1
            if params.greedy:
                top = logits.float().topk(b, dim=-1)
                children, ok = top.indices, top.values.isfinite()
            else:
                q = probabilities(logits, params)  # [B, hi - lo, V]
                q_levels.append(q)
                children, ok = sample_without_replacement(q.log(), b, self.generator)
            tokens[:, hi:end] = children.reshape(B, -1)
            exists[:, hi:end] = (ok & exists[:, lo:hi, None]).reshape(B, -1)
            if d + 1 < D:  # the next level's distributions; the leaves' are never needed
                mask = torch.cat([self.valid_d[:, None, :].expand(B, end - hi, t0),
                                  self.ancestors[hi:end, :end].expand(B, end - hi, end)], dim=-1)[:, None]
                positions = (self.root_pos[:, None] + d + 1).expand(B, end - hi)
                logits = _forward(draft, cache, tokens[:, hi:end], positions.clamp(max=ctx - 1), mask)
                self.draft_passes += 1
        return (torch.cat(q_levels, 1) if q_levels else None), t0

    def _draft_from_heads(self, tokens: Tensor, exists: Tensor, D: int) -> Tensor | None:
        """Self-drafts: every node at depth d gets its children from head d's law (one law per level, read at the
        node before the root; siblings without replacement). Fills `tokens` and `exists` [B, n]; returns the law
        at every internal node [B, internal, V] (None when greedy)."""
        B, s, q_levels = tokens.shape[0], self.starts, []
        for d in range(D):
            b, lo, hi, end = self.tree.branching[d], s[d], s[d + 1], s[d + 2]
            law = self.heads[:, d, None].expand(B, hi - lo, self.heads.shape[-1])
            if self.params.greedy:
                top = law.topk(b, dim=-1)
                children, ok = top.indices, top.values.isfinite()
            else:
                q_levels.append(law)
                children, ok = sample_without_replacement(law.log(), b, self.generator)
            tokens[:, hi:end] = children.reshape(B, -1)
            exists[:, hi:end] = (ok & exists[:, lo:hi, None]).reshape(B, -1)
        return torch.cat(q_levels, 1) if q_levels else None

    def _verify(self, raw: Tensor, q: Tensor | None, tokens: Tensor, exists: Tensor,
                D: int) -> tuple[Tensor, Tensor]:
        """Recursive rejection sampling down the tree, all rows at once. Returns each row's accepted nodes
        [B, D] (-1 past its end) and its final token [B] (the correction after rejecting every child of its last
        node, or the bonus token at a leaf).

        The sibling tests of every internal node are decided at once: what child r of a node is tested against
        (the residual after rejecting children 0 .. r-1) depends only on the drawn tokens, not on the coin flips,
        so the `bmax` sibling steps run over all internal nodes together, and the walk from the root then only
        follows, at each node, its first accepted child. Later children's outcomes are computed but never used
        once one is accepted, exactly as if they had not been tested."""
        B, device = tokens.shape[0], tokens.device
        rows = torch.arange(B, device=device)
        internal = self.starts[D]
        if D == 0:  # nothing drafted: the target's own token
            none = torch.empty(B, 0, dtype=torch.long, device=device)
            if self.params.greedy:
                return none, raw[:, 0].argmax(-1)
            return none, sample(probabilities(raw[:, 0], self.params).log(), self.generator)
        kids = self.kids[:internal]  # [I, bmax]: each internal node's children (-1: none at that depth)
        child = kids.clamp(min=0)
        kid_tokens = tokens[:, child]  # [B, I, bmax]
        kid_ok = exists[:, child] & (kids >= 0)
        if self.params.greedy:
            choice = raw.argmax(-1)  # [B, n]: greedy decoding's token after each node
            accept = kid_ok & (kid_tokens == choice[:, :internal, None])  # siblings are distinct: one hit at most
            cur, path = self._walk(accept, kids, D)
            return path, choice[rows, cur]
        p_all = probabilities(raw, self.params)  # [B, n, V]
        p, qc = p_all[:, :internal], q
        u = torch.rand(B, internal, kids.shape[1], generator=self.generator, device=device)
        accept = torch.empty_like(kid_ok)
        for r in range(kids.shape[1]):
            x = kid_tokens[..., r, None]
            px, qx = p.gather(-1, x)[..., 0], qc.gather(-1, x)[..., 0]
            there = kid_ok[..., r]
            accept[..., r] = there & (u[..., r] * qx < px)  # accept w.p. min(1, p(x) / q(x)); q(x) > 0 (drawn)
            # Rejected: the target's law becomes the residual, the draft's loses x (the next sibling's law).
            p = torch.where(there[..., None], residual(p, qc), p)
            q_left = qc.scatter(-1, x, 0.0)
            qc = torch.where(there[..., None], q_left / q_left.sum(-1, keepdim=True).clamp(min=1e-30), qc)
        cur, path = self._walk(accept, kids, D)
        # At a leaf the bonus token's law is the target's; elsewhere the residual after every child's rejection.
        final_p = torch.where((path[:, -1] >= 0)[:, None], p_all[rows, cur], p[rows, cur.clamp(max=internal - 1)])
        final = sample(final_p.clamp(min=0).log(), self.generator)
        return path, final

    @staticmethod
    def _walk(accept: Tensor, kids: Tensor, D: int) -> tuple[Tensor, Tensor]:
        """Follow each row from the root through the first accepted child of each node: the last node reached
        [B] and the path [B, D] (-1 past its end)."""
        B, device = accept.shape[0], accept.device
        rows = torch.arange(B, device=device)
        first = torch.where(accept.any(-1), accept.to(torch.uint8).argmax(-1), -1)  # [B, I]
        cur = torch.zeros(B, dtype=torch.long, device=device)
        path = torch.full((B, D), -1, dtype=torch.long, device=device)
        walking = torch.ones(B, dtype=torch.bool, device=device)
        for d in range(D):
            r = first[rows, cur]
            walking = walking & (r >= 0)
            nxt = kids[cur, r.clamp(min=0)]
            path[:, d] = torch.where(walking, nxt, -1)
            cur = torch.where(walking, nxt, cur)
        return cur, path

    def _commit(self, raw: Tensor, tokens: Tensor, path: Tensor, final: Tensor, D: int, t0_t: int,
                t0_d: int | None) -> Decoded:
        """Emit each row's path and final token; keep the root and the accepted nodes in both caches."""
        B, device = tokens.shape[0], tokens.device
        rows = torch.arange(B, device=device)
        m = (path >= 0).sum(1)  # accepted drafts per row
        L = int(m.max()) + 1 if D > 0 else 1
        # Keep root + path, right-aligned in L slots after t0 (the front slots of shorter paths are invalid).
        nodes = torch.cat([torch.zeros(B, 1, dtype=torch.long, device=device), path], 1)  # [B, D + 1]
        order = torch.arange(L, device=device)
        at = (order[None, :] - (L - 1 - m)[:, None]).clamp(min=0)  # index into nodes, 0 (the root) for padding
        src = nodes[rows[:, None], at]
        front = order[None, :] >= (L - 1 - m)[:, None]
        _keep_rows(self.cache_t, t0_t, src)
        self.valid_t = torch.cat([self.valid_t, front], 1)
        leaf = m == D  # the path ends at a leaf, which the draft never read
        if t0_d is not None:
            inner = torch.where(leaf, m, m + 1)  # root and the internal nodes of the path
            Ld = int(inner.max())
            order_d = torch.arange(Ld, device=device)
            at_d = (order_d[None, :] - (Ld - inner)[:, None]).clamp(min=0)
            _keep_rows(self.cache_d, t0_d, nodes[rows[:, None], at_d])
            self.valid_d = torch.cat([self.valid_d, order_d[None, :] >= (Ld - inner)[:, None]], 1)
            last = nodes[rows, m]
            carry = (tokens[rows, last] * leaf)[:, None], leaf[:, None], (self.root_pos + m)[:, None]
            self.pre_d = carry
        elif self.draft is not None:  # nothing drafted: the draft has yet to read the root
            ids, valid, pos = self.pre_d
            self.pre_d = (torch.cat([ids, self.root[:, None]], 1), torch.cat([valid, torch.ones_like(valid[:, :1])], 1),
                          torch.cat([pos, self.root_pos[:, None]], 1))
        path_tokens = tokens[rows[:, None], path.clamp(min=0)].tolist()
        m_list, final_list = m.tolist(), final.tolist()
        emitted = [path_tokens[b][:m_list[b]] + [final_list[b]] for b in range(B)]
        self.root = final
        self.root_pos = self.root_pos + m + 1
        self.root_pos_list = [r + k + 1 for r, k in zip(self.root_pos_list, m_list, strict=True)]
        self.emitted_list = [e + k + 1 for e, k in zip(self.emitted_list, m_list, strict=True)]
        logprobs = None
        if self.request.logprobs is not None:
            node_rows = nodes.tolist()
            logprobs = [token_logprobs(raw[b, node_rows[b][:m_list[b] + 1]], emitted[b], self.request.logprobs)
                        for b in range(B)]
        return Decoded(emitted, logprobs)

    @torch.inference_mode()
    def finish(self, rows: list[int]) -> None:
        for b in rows:
            self.finished_at.setdefault(b, self.forward_passes)
        self.done_rows.update(rows)

    def close(self) -> None:
        self.cache_t = self.cache_d = None
        if self.draft is not None:
            self.draft.train(self.was_training)


__all__ = ["DraftTree", "RSDDecoder", "rsd_decoder", "rsd_generate", "sample_without_replacement"]
