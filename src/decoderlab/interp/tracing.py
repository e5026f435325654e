"""Causal tracing as ROME does it (Meng et al. 2022, `experiments/causal_trace.py`): where in the network does a
model recall the fact that a prompt's subject carries?

Conventions (ROME's, so results compare with the paper):
- corrupt: Gaussian noise is added to the subject tokens' *token* embeddings (`hook_embed`, before any learned
  position embeddings are added). Its standard deviation is `noise` (3 by default) times `noise_std`, the
  standard deviation of subject-token embeddings: measured over a set of subject texts with `embedding_std`
  (as ROME's `collect_embedding_std`), or by default over this prompt's own subject tokens. The `samples` noised
  copies draw their noise from `numpy.random.RandomState(seed)` (ROME: seed 1, `randn(samples, span, d)`), the
  same noise for every restoration;
- restore: one (layer, token) state is put back to its clean value in every noised copy. "hidden" restores the
  block output (`hook_resid_post`); "mlp" and "attn" restore the MLP outputs (`hook_mlp_out`) or attention
  outputs (`hook_attn_out`) of a window of `window` layers around the layer, `range(max(0, l - window // 2),
  min(L, l - (-window // 2)))`, clipped at the ends as ROME clips them;
- score: the probability of the target token at the last position (the clean run's top token unless given),
  averaged over the noised copies. The clean run gives the high score, the noised run with nothing restored
  the low one; a grid is [token, layer].
Restorations share forward passes: each pass holds many restorations, `samples` rows each, up to `batch_tokens`
tokens. Tokens before the subject see no noise in a causal model, so restoring them changes nothing: their
cells are the low score without being run.
`average_indirect_effect` groups traces' rows by ROME's six token groups (`TOKEN_GROUPS`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import UserError
from ..model import Transformer
from .cache import run_with_cache
from .hooks import HookPoint, hooks, run_with_hooks

#: What each kind of trace restores, by hook site inside a block.
KIND_SITES = {"hidden": "hook_resid_post", "mlp": "hook_mlp_out", "attn": "hook_attn_out"}
KINDS = tuple(KIND_SITES)
#: ROME's six token groups for the average indirect effect, in its order.
TOKEN_GROUPS = ("first subject token", "middle subject tokens", "last subject token", "first subsequent token",
                "further tokens", "last token")

State = tuple[str, int]  # (hook name, token index)


@dataclass
class CausalTrace:
    """One prompt's causal trace: `grids[kind]` is [token, layer] of the target's probability with that state
    restored (for "mlp"/"attn", the window of layers centred on it)."""

    ids: list[int]
    tokens: list[str]
    subject: tuple[int, int]
    target: int
    target_token: str
    predicted: int
    clean_prob: float
    corrupted_prob: float
    grids: dict[str, torch.Tensor]
    noise: float
    noise_std: float
    samples: int
    window: int
    seed: int

    @property
    def correct(self) -> bool:
        """Whether the clean run's top token is the target (ROME averages only such facts)."""
        return self.predicted == self.target

    def to_dict(self) -> dict:
        """Plain numbers and lists, ready for `json.dumps`."""
        return {"tokens": self.tokens, "ids": self.ids, "subject": list(self.subject), "target": self.target,
                "target_token": self.target_token, "predicted": self.predicted, "clean_prob": self.clean_prob,
                "corrupted_prob": self.corrupted_prob, "noise": self.noise, "noise_std": self.noise_std,
                "samples": self.samples, "window": self.window, "seed": self.seed,
                "grids": {k: v.tolist() for k, v in self.grids.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    def __repr__(self) -> str:
        return (f"CausalTrace({len(self.tokens)} tokens, subject {self.subject}, p({self.target_token!r}) "
                f"clean {self.clean_prob:.3f} corrupted {self.corrupted_prob:.3f}, kinds {list(self.grids)})")


# ---------------------------------------------------------------------------------------------- inputs


def _as_ids(model: Transformer, ids) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long)
    if t.dim() == 2 and t.shape[0] == 1:
        t = t[0]
    if t.dim() != 1 or t.numel() == 0:
        raise UserError(f"trace takes one prompt's token ids ([T] or [1, T]), got shape {tuple(t.shape)}")
    return t.to(model.device).unsqueeze(0)


def _span(subject, n_tokens: int) -> tuple[int, int]:
    if isinstance(subject, slice):
        start, stop, step = subject.indices(n_tokens)
        if step != 1:
            raise UserError("the subject is a plain slice of tokens (step 1)")
        subject = (start, stop)
    try:
        start, end = (int(x) for x in subject)
    except (TypeError, ValueError):
        raise UserError(f"the subject is a (start, end) token span or a slice, got {subject!r}") from None
    if not 0 <= start < end <= n_tokens:
        raise UserError(f"the subject span ({start}, {end}) is not a non-empty span of the prompt's {n_tokens} "
                        "tokens")
    return start, end


def window_layers(layer: int, n_layers: int, window: int) -> range:
    """The layers a window of `window` around `layer` restores, clipped at the ends (ROME's rule)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def embedding_std(model: Transformer, subjects: Iterable[Sequence[int]]) -> float:
    """The standard deviation of the token embeddings of the subjects' tokens, all elements together (ROME's
    `collect_embedding_std` over a set of subject texts, each tokenized on its own)."""
    rows = [torch.as_tensor(list(s), dtype=torch.long) for s in subjects]
    if not rows or any(r.numel() == 0 for r in rows):
        raise UserError("embedding_std needs at least one subject, each with at least one token")
    with torch.no_grad():
        return float(model.embed(torch.cat(rows).to(model.device)).float().std())


def find_subject(tokenizer, ids: Sequence[int], subject: str) -> tuple[int, int]:
    """The token span [start, end) of the first occurrence of `subject` in the text the tokens decode to (as
    ROME's `find_token_range`: decode each token, find the text, take the tokens it overlaps)."""
    pieces = [tokenizer.decode([int(i)]) for i in ids]
    text = "".join(pieces)
    needle = subject if subject in text else subject.strip()
    at = text.find(needle) if needle else -1
    if at < 0:
        raise UserError(f"subject {subject!r} is not in the prompt (its tokens read {text!r}); pass a subject that "
                        "appears in the prompt")
    start = end = None
    pos = 0
    for i, piece in enumerate(pieces):
        nxt = pos + len(piece)
        if start is None and nxt > at:
            start = i
        if nxt >= at + len(needle):
            end = i + 1
            break
        pos = nxt
    return int(start), int(end)


def target_id(tokenizer, prompt_ids: Sequence[int], prompt: str, target: str) -> int:
    """The first token of `target` as it continues `prompt` (so BPE's leading space goes with it): from the
    tokens of prompt + target where the prompt's own tokens are a prefix of them, else from the target alone."""
    if not target:
        raise UserError("the target is empty; pass the text the model should continue the prompt with")
    whole = tokenizer.encode(prompt + target)
    n = len(prompt_ids)
    if len(whole) > n and list(whole[:n]) == list(prompt_ids):
        return int(whole[n])
    own = tokenizer.encode(target, add_special_tokens=False)
    if not own:
        raise UserError(f"the target {target!r} has no tokens")
    return int(own[0])


# ---------------------------------------------------------------------------------------------- the runs


@dataclass
class _Setup:
    """What every restored run shares: the prompt, the clean states, the noise, the target."""

    ids: torch.Tensor  # [1, T]
    subject: tuple[int, int]
    noise: torch.Tensor  # [samples, span, d], already scaled
    target: int
    clean: dict[str, torch.Tensor] = field(default_factory=dict)  # hook name -> [T, d]


def _noise(model: Transformer, samples: int, span: int, scale: float, seed: int) -> torch.Tensor:
    # ROME draws float64 numpy noise, scales it, and adds it into the embeddings' dtype.
    draw = np.random.RandomState(seed).randn(samples, span, model.config.d_model)
    return torch.from_numpy(draw * scale).to(device=model.device, dtype=model.embed.weight.dtype)


def _first_layer(states: Sequence[State], n_layers: int) -> int:
    """The first block a restoration touches: every block before it runs exactly as in the corrupted run."""
    layers = [int(name.split(".")[1]) for name, _ in states if name.startswith("blocks.")]
    return min(layers, default=n_layers) if len(layers) == len(states) else 0


def _restored_scores(model: Transformer, setup: _Setup, restorations: Sequence[Sequence[State]],
                     batch_tokens: int) -> torch.Tensor:
    """The target's probability, averaged over the noised copies, for each list of states to restore.

    One corrupted run keeps every block's input; a restoration whose first restored state is in block k then
    starts at block k from that input (`start_at_layer`), so the blocks it cannot change are not rerun."""
    samples, T = setup.noise.shape[0], setup.ids.shape[1]
    start, end = setup.subject
    L = model.config.n_layers

    def corrupt(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        x = x.clone()
        x[:, start:end] += setup.noise.repeat(x.shape[0] // samples, 1, 1)
        return x

    inputs = [f"blocks.{layer}.hook_resid_pre" for layer in range(L)]
    with hooks(model, [("hook_embed", corrupt)]):
        logits, corrupted = run_with_cache(model, setup.ids.expand(samples, T), inputs, logits_to_keep=1)
    corrupted_prob = logits[:, -1].float().softmax(-1)[:, setup.target].mean()

    scores = torch.empty(len(restorations))
    by_layer: dict[int, list[int]] = {}
    for i, states in enumerate(restorations):
        first = _first_layer(states, L)
        if first >= L:  # nothing restored inside the blocks: the corrupted run itself
            scores[i] = corrupted_prob
        else:
            by_layer.setdefault(first, []).append(i)
    per_pass = max(1, batch_tokens // (samples * T))
    for first, members in sorted(by_layer.items()):
        for at in range(0, len(members), per_pass):
            chunk = members[at:at + per_pass]
            n = len(chunk)
            where: dict[str, tuple[list[int], list[int]]] = {}
            for row, i in enumerate(chunk):
                for name, token in restorations[i]:
                    rows, tokens = where.setdefault(name, ([], []))
                    rows.extend(range(row * samples, (row + 1) * samples))
                    tokens.extend([token] * samples)
            index = {name: (torch.tensor(rows, device=model.device), torch.tensor(tokens, device=model.device))
                     for name, (rows, tokens) in where.items()}

            def restore(x: torch.Tensor, hook: HookPoint, index=index) -> torch.Tensor:
                rows, tokens = index[hook.name]
                return x.index_put((rows, tokens), setup.clean[hook.name][tokens].to(x.dtype))

            fwd = [(name, restore) for name in index]
            if first == 0:  # a restored embedding: the run starts from the ids, corrupted as above
                fwd.insert(0, ("hook_embed", corrupt))
                logits = run_with_hooks(model, setup.ids.expand(n * samples, T), fwd, logits_to_keep=1)
            else:
                residual = corrupted[inputs[first]].repeat(n, 1, 1)
                logits = run_with_hooks(model, None, fwd, logits_to_keep=1, start_at_layer=first,
                                        residual=residual)
            probs = logits[:, -1].float().softmax(-1)[:, setup.target]
            scores[torch.tensor(chunk)] = probs.view(n, samples).mean(1).cpu()
    return scores


def _setup(model: Transformer, ids, subject, target: int | None, noise: float, noise_std: float | None,
           samples: int, seed: int, names: Sequence[str]) -> tuple[_Setup, float, int, float]:
    ids = _as_ids(model, ids)
    span = _span(subject, ids.shape[1])
    if samples < 1:
        raise UserError(f"samples must be at least 1, got {samples}")
    if not (noise >= 0 and math.isfinite(noise)):
        raise UserError(f"noise must be a finite number >= 0, got {noise}")
    vocab = model.config.vocab_size
    if target is not None and not 0 <= int(target) < vocab:
        raise UserError(f"target token {target} is outside the vocabulary (0..{vocab - 1})")
    logits, cache = run_with_cache(model, ids, names=["hook_embed", *names], logits_to_keep=1)
    probs = logits[0, -1].float().softmax(-1)
    predicted = int(probs.argmax())
    target = predicted if target is None else int(target)
    if noise_std is None:  # this prompt's subject tokens, every element (ROME measures over a set of subjects)
        noise_std = float(cache["hook_embed"][0, span[0]:span[1]].float().std())
    if not (noise_std >= 0 and math.isfinite(noise_std)):
        raise UserError(f"noise_std must be a finite number >= 0, got {noise_std}")
    setup = _Setup(ids, span, _noise(model, samples, span[1] - span[0], noise * noise_std, seed), target,
                   {name: cache[name][0] for name in names})
    return setup, float(probs[target]), predicted, float(noise_std)


def restored_prob(model: Transformer, ids, subject, states: Iterable[State], *, target: int | None = None,
                  noise: float = 3.0, noise_std: float | None = None, samples: int = 10, seed: int = 1) -> float:
    """The target's probability (averaged over the noised copies) with the subject corrupted and `states`,
    (hook name, token) pairs, put back to their clean values: ROME's `trace_with_patch`, one run."""
    states = [(str(name), int(token)) for name, token in states]
    names = sorted({name for name, _ in states})
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            setup, *_ = _setup(model, ids, subject, target, noise, noise_std, samples, seed, names)
            for name, token in states:
                if not 0 <= token < setup.ids.shape[1]:
                    raise UserError(f"token {token} to restore at {name} is outside the prompt's "
                                    f"{setup.ids.shape[1]} tokens")
            return float(_restored_scores(model, setup, [states], batch_tokens=1 << 30)[0])
    finally:
        model.train(was_training)


def trace(model: Transformer, ids, subject, *, target: int | None = None, noise: float = 3.0,
          noise_std: float | None = None, samples: int = 10, window: int = 10, seed: int = 1,
          kinds: Sequence[str] = KINDS, tokens: Sequence[str] | None = None, target_token: str | None = None,
          batch_tokens: int = 16384) -> CausalTrace:
    """ROME's causal trace of one prompt `ids` ([T] or [1, T]) whose `subject` is the token span (start, end)
    or a slice: the clean and corrupted probabilities of `target` (default: the clean run's top token) and a
    [token, layer] grid per kind ("hidden", "mlp", "attn"). `tokens` label the rows (default: the ids).
    `batch_tokens` bounds the tokens of one forward pass (memory); the result does not depend on it."""
    kinds = tuple(kinds)
    bad = [k for k in kinds if k not in KIND_SITES]
    if bad or not kinds:
        raise UserError(f"unknown trace kind {bad[0] if bad else None!r}; choose among {', '.join(KINDS)}")
    if window < 1:
        raise UserError(f"window must be at least 1 layer, got {window}")
    L = model.config.n_layers
    names = [f"blocks.{layer}.{KIND_SITES[k]}" for k in kinds for layer in range(L)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            setup, clean_prob, predicted, noise_std = _setup(model, ids, subject, target, noise, noise_std,
                                                             samples, seed, names)
            T = setup.ids.shape[1]
            start = setup.subject[0]
            restorations: list[list[State]] = [[]]  # first: nothing restored, the corrupted run
            for kind in kinds:
                site = KIND_SITES[kind]
                for token in range(start, T):
                    for layer in range(L):
                        layers = [layer] if kind == "hidden" else window_layers(layer, L, window)
                        restorations.append([(f"blocks.{lay}.{site}", token) for lay in layers])
            scores = _restored_scores(model, setup, restorations, batch_tokens)
    finally:
        model.train(was_training)
    low = float(scores[0])
    grids, at = {}, 1
    for kind in kinds:
        grid = torch.full((T, L), low)
        n = (T - start) * L
        grid[start:] = scores[at:at + n].view(T - start, L)
        grids[kind], at = grid, at + n
    ids_list = [int(i) for i in setup.ids[0].tolist()]
    labels = [str(t) for t in tokens] if tokens is not None else [str(i) for i in ids_list]
    if len(labels) != T:
        raise UserError(f"{len(labels)} token labels for {T} tokens")
    return CausalTrace(ids_list, labels, setup.subject, setup.target,
                       target_token if target_token is not None else str(setup.target), predicted, clean_prob, low,
                       grids, float(noise), noise_std, samples, window, seed)


def trace_text(model: Transformer, tokenizer, prompt: str, subject: str, *, target: str | None = None,
               **options) -> CausalTrace:
    """`trace` of a text prompt: the subject found in its tokens (`find_subject`), the target given as the text
    that continues the prompt (its first token; default: the model's top token), rows labelled by token text."""
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UserError("the prompt has no tokens")
    span = find_subject(tokenizer, ids, subject)
    target_ids = None if target is None else target_id(tokenizer, ids, prompt, target)
    result = trace(model, ids, span, target=target_ids, tokens=[tokenizer.decode([i]) for i in ids], **options)
    result.target_token = tokenizer.decode([result.target])
    return result


# ---------------------------------------------------------------------------------------------- averages


def token_groups(n_tokens: int, subject: tuple[int, int]) -> list[list[int]]:
    """The token indices of each of ROME's six groups (`TOKEN_GROUPS`) in a prompt of `n_tokens` tokens whose
    subject is [start, end). A one-token subject is both first and last subject token; one token after the
    subject is both first subsequent and last token; tokens before the subject are in no group."""
    start, end = subject
    if not 0 <= start < end < n_tokens:
        raise UserError(f"the subject ({start}, {end}) must be followed by at least one token of the prompt's "
                        f"{n_tokens} for the six token groups")
    last = n_tokens - 1
    return [[start], list(range(start + 1, end - 1)), [end - 1], [end], list(range(end + 1, last)), [last]]


@dataclass
class AverageEffect:
    """Traces averaged by token group: `probs[kind]` [6, layer] is the mean restored probability over the
    groups' rows (all facts together, as ROME's notebook averages); `effects[kind]` is that minus the mean
    corrupted probability: the average indirect effect (AIE). `counts[g]` is the rows group g averaged."""

    probs: dict[str, torch.Tensor]
    effects: dict[str, torch.Tensor]
    clean_prob: float
    corrupted_prob: float
    counts: list[int]
    n: int
    window: int
    groups: tuple[str, ...] = TOKEN_GROUPS

    @property
    def total_effect(self) -> float:
        """Average clean minus corrupted probability (ROME's average total effect)."""
        return self.clean_prob - self.corrupted_prob

    def to_dict(self) -> dict:
        return {"n": self.n, "groups": list(self.groups), "counts": self.counts, "clean_prob": self.clean_prob,
                "corrupted_prob": self.corrupted_prob, "total_effect": self.total_effect, "window": self.window,
                "probs": {k: _rows(v) for k, v in self.probs.items()},
                "effects": {k: _rows(v) for k, v in self.effects.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def _rows(t: torch.Tensor) -> list[list[float | None]]:
    """A grid as JSON lists, a group no fact has (NaN) as null."""
    return [[None if math.isnan(x) else x for x in row] for row in t.tolist()]


def average_indirect_effect(traces: Sequence[CausalTrace], *, correct_only: bool = True) -> AverageEffect:
    """ROME's average indirect effect over a set of facts' traces, by token group: [6, layer] per kind. With
    `correct_only` (ROME's choice) only traces whose clean top token is the target count."""
    chosen = [t for t in traces if t.correct or not correct_only]
    if not chosen:
        raise UserError("no trace to average" + (" (none predicts its target; pass correct_only=False to "
                                                 "average them anyway)" if traces else ""))
    kinds = list(chosen[0].grids)
    if any(list(t.grids) != kinds for t in chosen):
        raise UserError("the traces to average must all have the same kinds")
    layers = chosen[0].grids[kinds[0]].shape[1]
    if any(t.grids[kinds[0]].shape[1] != layers for t in chosen):
        raise UserError("the traces to average come from models with different numbers of layers")
    sums = {k: torch.zeros(len(TOKEN_GROUPS), layers, dtype=torch.float64) for k in kinds}
    counts = [0] * len(TOKEN_GROUPS)
    for t in chosen:
        for g, rows in enumerate(token_groups(len(t.tokens), t.subject)):
            counts[g] += len(rows)
            for k in kinds:
                sums[k][g] += t.grids[k][rows].double().sum(0)
    denominators = torch.tensor(counts, dtype=torch.float64).unsqueeze(1)
    probs = {k: (v / denominators).float() for k, v in sums.items()}  # a group no fact has: NaN
    low = float(np.mean([t.corrupted_prob for t in chosen]))
    high = float(np.mean([t.clean_prob for t in chosen]))
    return AverageEffect(probs, {k: v - low for k, v in probs.items()}, high, low, counts, len(chosen),
                         chosen[0].window)


# ---------------------------------------------------------------------------------------------- pictures

_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
_WHAT = {"hidden": "state", "mlp": "MLP", "attn": "Attn"}


def _save(fig, path) -> None:
    from pathlib import Path

    from ..atomic import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=150, bbox_inches="tight"))


def _xlabel(kind: str, window: int) -> str:
    if kind == "hidden" or window == 1:
        return "single restored layer" if kind == "hidden" else f"single restored {_WHAT[kind]} layer"
    return f"center of interval of {window} restored {_WHAT[kind]} layers"


def _panels(rows: Sequence[str], grids: dict[str, np.ndarray], vmin: dict[str, float], xlabel, titles,
            colorbar: str, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = list(grids)
    n_rows, n_layers = next(iter(grids.values())).shape
    fig, axes = plt.subplots(1, len(kinds), figsize=(3.6 * len(kinds) + 0.6, 0.6 + 0.28 * max(n_rows, 6)),
                             squeeze=False)
    try:
        for ax, kind in zip(axes[0], kinds, strict=True):
            # pcolor with the first token on top, as ROME's plot_trace_heatmap draws it.
            h = ax.pcolor(grids[kind], cmap=_CMAPS[kind], vmin=vmin[kind])
            ax.invert_yaxis()
            ax.set_yticks([0.5 + i for i in range(n_rows)])
            ax.set_yticklabels(rows, fontsize=8)
            step = max(1, n_layers // 8)
            ax.set_xticks([0.5 + i for i in range(0, n_layers, step)])
            ax.set_xticklabels(list(range(0, n_layers, step)), fontsize=8)
            ax.set_title(titles[kind], fontsize=9)
            ax.set_xlabel(xlabel[kind], fontsize=8)
            cb = fig.colorbar(h, ax=ax)
            cb.ax.tick_params(labelsize=7)
            cb.ax.set_title(colorbar, y=-0.12, fontsize=8)
        fig.tight_layout()
        _save(fig, path)
    finally:
        plt.close(fig)


def plot_trace(result: CausalTrace, path) -> None:
    """ROME's causal-trace figure as one PNG: a heat map per kind (hidden state, MLP, attention), tokens down
    (subject tokens marked '*'), layers across, colour the target's probability (from the corrupted run's)."""
    start, end = result.subject
    rows = [tok + ("*" if start <= i < end else "") for i, tok in enumerate(result.tokens)]
    kinds = list(result.grids)
    xlabel = {k: _xlabel(k, result.window) for k in kinds}
    titles = {k: f"Impact of restoring {_WHAT[k]} after corrupted input" for k in kinds}
    _panels(rows, {k: result.grids[k].numpy() for k in kinds}, {k: result.corrupted_prob for k in kinds}, xlabel,
            titles, f"p({result.target_token.strip() or result.target_token!r})", path)


def plot_average_effect(effect: AverageEffect, path) -> None:
    """ROME's average-indirect-effect figure: per kind, the six token groups down, layers across, colour the
    AIE (clipped at 0, as ROME draws it)."""
    kinds = list(effect.effects)
    titles = {k: f"Avg indirect effect of {_WHAT[k]} over {effect.n} prompts" for k in kinds}
    xlabel = {k: _xlabel(k, effect.window) for k in kinds}
    grids = {k: np.nan_to_num(np.clip(effect.effects[k].numpy(), 0, None)) for k in kinds}
    _panels(list(effect.groups), grids, {k: 0.0 for k in kinds}, xlabel, titles, "AIE", path)
