"""Speculative decoding: greedy parity with plain `generate`, cache consistency, the recycler's matrix, the
sampling distribution of draft-model speculation (chi-square, chains of drafts with filters), bad input; and every
generation path (plain, three speculative decoders, PINE) against the same stops, defaults, logprobs, cache
growth and refusals."""

from __future__ import annotations

import copy
import math
import string

import pytest
import torch

import decoderlab
from decoderlab import GenerationConfig, ModelConfig, Tokenizer, Transformer, UserError, pine
from decoderlab.generation import SamplingParams, Stream, generate, sampling, stream
from decoderlab.generation import speculative as spec
from decoderlab.generation.speculative import (
    SpeculativeResult,
    TokenRecycler,
    draft_decoder,
    mtp_decoder,
    mtp_generate,
    speculative_generate,
)

PROMPTS = [[1], [3, 1, 4, 1, 5], [7, 7, 7, 7], list(range(2, 40))]


def _model(positions: str, seed: int, vocab_size: int = 40, n_layers: int = 2, d_model: int = 32,
           n_future: int = 0, context_length: int = 64) -> Transformer:
    # A large init spread gives peaked, varied logits, so greedy outputs are not one repeated token.
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, n_layers=n_layers, n_heads=2, d_model=d_model,
                         context_length=context_length, positions=positions, n_future=n_future, init_std=0.3)
    return Transformer(config).eval()


@pytest.fixture(scope="module", params=["rope", "learned"])
def models(request) -> tuple[Transformer, Transformer]:
    """(target with two future heads, smaller draft with the same vocabulary)."""
    return (_model(request.param, 0, n_future=2),
            _model(request.param, 1, n_layers=1, d_model=16))


def _plain(model: Transformer, prompt: list[int], n: int) -> list[int]:
    return generate(model, [prompt], n, temperature=0, stop_tokens=[]).tokens[0]


@pytest.mark.parametrize("method", ["recycler", "draft", "mtp"])
def test_greedy_identical_to_plain(models, method):
    target, draft = models
    recycler = TokenRecycler(target, n_nodes=15)
    for prompt in PROMPTS:
        # 30 new tokens after the 38-token prompt run past the context of 64: the context bound is tested too.
        want = _plain(target, prompt, 30)
        if method == "recycler":
            got = recycler.generate([prompt], 30, stop_tokens=[])
        elif method == "draft":
            got = speculative_generate(target, draft, torch.tensor([prompt]), 30, k=3, stop_tokens=[])
        else:
            got = mtp_generate(target, [prompt], 30, stop_tokens=[])
        assert isinstance(got, SpeculativeResult) and isinstance(got, decoderlab.GenerationResult)
        assert got.tokens[0] == want, (method, prompt)
        assert got.completion_tokens == [len(want)] and got.finish_reasons == ["length"]
        assert got.forward_passes[0] <= len(want) and got.tokens_per_pass[0] >= 1


def test_recycler_compiled_identical_to_plain(models, monkeypatch):
    target, _ = models
    # A first cache of cache_slots(prompt + 2 + 16 nodes) = 64 slots: the longest prompt's grows past it on the
    # way, and the verification moves to the graph (and tree mask) of the new size.
    monkeypatch.setattr(spec, "CACHE_CHUNK", 2)
    calls = []
    verify = spec.CompiledTreeStep.__call__
    monkeypatch.setattr(spec.CompiledTreeStep, "__call__", lambda self, *a: calls.append(1) or verify(self, *a))
    recycler = TokenRecycler(target, n_nodes=15)
    passes = 0
    for prompt in PROMPTS:
        got = recycler.generate([prompt], 30, stop_tokens=[], compile=True)
        assert got.tokens[0] == _plain(target, prompt, 30), prompt
        passes += got.forward_passes[0] - 1  # the prompt's pass is eager
    # Full-size trees went through the compiled graph; only the last few (cut by the budget) ran eagerly.
    assert passes // 2 <= len(calls) <= passes


def test_greedy_stop_token_matches_plain(models):
    target, draft = models
    want_all = _plain(target, [3, 1, 4], 20)
    stop = want_all[5]
    want = generate(target, [[3, 1, 4]], 20, stop_tokens=[stop])
    for got in (TokenRecycler(target).generate([[3, 1, 4]], 20, stop_tokens=[stop]),
                speculative_generate(target, draft, [[3, 1, 4]], 20, stop_tokens=[stop]),
                mtp_generate(target, [[3, 1, 4]], 20, stop_tokens=[stop])):
        assert (got.tokens, got.finish_reasons, got.stopped_by, got.completion_tokens) == (
            want.tokens, want.finish_reasons, want.stopped_by, want.completion_tokens)


@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_recycler_and_draft_on_hf_models(hf_folder, case):
    target = decoderlab.load(hf_folder(case)).eval()
    recycler = TokenRecycler(target)
    for prompt in ([5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9]):
        want = _plain(target, prompt, 25)
        assert recycler.generate([prompt], 25, stop_tokens=[]).tokens[0] == want
        # The model drafting for itself accepts everything: k + 1 tokens a pass.
        got = speculative_generate(target, target, [prompt], 25, k=4, stop_tokens=[])
        assert got.tokens[0] == want and got.tokens_per_pass[0] > 3


def test_recycler_matrix_persists_and_changes(models):
    target, _ = models
    recycler = TokenRecycler(target, n_nodes=20)
    start = recycler.matrix.clone()
    first = recycler.generate([[3, 1, 4]], 30, stop_tokens=[])
    after_first = recycler.matrix.clone()
    assert not torch.equal(start, after_first)
    # The next call starts from the matrix the last one left.
    seen_at_start = []
    update = recycler.update

    def spy(tokens, logits):
        if not seen_at_start:
            seen_at_start.append(recycler.matrix.clone())
        update(tokens, logits)

    recycler.update = spy
    again = recycler.generate([[3, 1, 4]], 30, stop_tokens=[])
    assert torch.equal(seen_at_start[0], after_first)
    assert again.tokens == first.tokens and again.tokens_per_pass[0] > 1
    recycler.generate([[9, 8, 7, 6]], 30, stop_tokens=[])
    assert not torch.equal(after_first, recycler.matrix)
    assert recycler.matrix.shape == (target.config.vocab_size, 8)
    assert recycler.probs.shape == (target.config.vocab_size, 8) and (recycler.probs.sum(-1) <= 1 + 1e-5).all()


def test_rejected_tree_nodes_keep_rows_learned_from_the_text(models):
    # A rejected node's logits follow a context the text did not take: they fill its token's row only where that
    # row is empty, and every row a tree step overwrites belongs to a token of the text.
    target, _ = models
    recycler = TokenRecycler(target, n_nodes=8, adaptive=False)
    prompt = [3, 1, 4, 1, 5]
    recycler.generate([prompt], 30, stop_tokens=[])  # rows for the text's tokens
    overwritten = set()
    update = recycler.update

    def spy(tokens, logits):
        overwritten.update(t for t in tokens.tolist() if t in recycler.rows)
        update(tokens, logits)

    recycler.update = spy
    for other in ([9, 8, 7], [2, 6, 2]):
        got = recycler.generate([other], 30, stop_tokens=[])
        assert got.tokens[0] == _plain(target, other, 30)
        text = set(other + got.tokens[0])
        assert overwritten <= text
        overwritten.clear()


def test_rows_to_write_keep_the_texts_rows_and_let_the_path_win():
    # Tree of 6 nodes; tokens: root 5, then 7, 8, 7, 9, 6; the path took nodes 0, 1, 4 (tokens 5, 7, 9).
    drafted, path = [5, 7, 8, 7, 9, 6], [0, 1, 4]
    rows = {5: None, 6: None}  # 5 and 6 have rows already
    # Node 2 (token 8, no row) fills; node 3 (token 7, also on the path) and node 5 (token 6, has a row) do not;
    # the path comes last, so its rows win over any rejected node's of the same token.
    assert spec._rows_to_write(path, drafted, rows) == [2, 0, 1, 4]


def test_recycler_snapshot_and_restore(models):
    target, _ = models
    recycler = TokenRecycler(target, n_nodes=8)
    recycler.generate([[3, 1, 4]], 20, stop_tokens=[])
    saved, matrix, probs = recycler.snapshot(), recycler.matrix, recycler.probs
    recycler.generate([[9, 8, 7, 6, 5]], 20, stop_tokens=[])
    assert not torch.equal(matrix, recycler.matrix)
    recycler.restore(saved)
    assert torch.equal(matrix, recycler.matrix) and torch.equal(probs, recycler.probs)
    tokens, path = recycler.draft(3, 9, with_probs=True)
    assert tokens[0] == 3 and path[0] == 1 and int(tokens[1]) == int(matrix[3, 0])
    assert float(path[1]) == pytest.approx(float(probs[3, 0]))
    # A snapshot of another shape is refused with a one-line error, and the matrix is left as it was.
    other = TokenRecycler(target, n_nodes=8, k=4)
    other.generate([[3, 1, 4]], 5, stop_tokens=[])
    for bad in (other.snapshot(), {target.config.vocab_size: saved[3]}, {3: ([10**6] * 8, [0.1] * 8)}):
        with pytest.raises(UserError, match="does not fit this recycler"):
            recycler.restore(bad)
    assert torch.equal(matrix, recycler.matrix)


def _capture_caches(monkeypatch, *models: Transformer) -> list:
    caches = []
    for model in models:
        original = model.new_cache

        def new_cache(*args, _original=original, **kwargs):
            caches.append(_original(*args, **kwargs))
            return caches[-1]

        monkeypatch.setattr(model, "new_cache", new_cache)
    return caches


def _check_cache(model: Transformer, cache, sequence: list[int]) -> None:
    """The cache must equal a fresh prefill of `sequence[:cache.length]`: feeding the rest through it gives the
    logits of one full forward pass."""
    with torch.inference_mode():
        assert 0 < cache.length < len(sequence)
        full = model(torch.tensor([sequence]))[0, cache.length:]
        step = model(torch.tensor([sequence[cache.length:]]), cache=cache)[0]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", ["recycler", "draft", "mtp"])
def test_cache_consistent_after_rollbacks(models, monkeypatch, method):
    target, draft = models
    prompt = [3, 1, 4, 1, 5]
    caches = _capture_caches(monkeypatch, target, draft)
    if method == "recycler":
        got = TokenRecycler(target, n_nodes=30).generate([prompt], 24, stop_tokens=[])
    elif method == "draft":
        got = speculative_generate(target, draft, [prompt], 24, k=4, temperature=1.0, seed=3, stop_tokens=[])
    else:
        got = mtp_generate(target, [prompt], 24, stop_tokens=[])
    sequence = prompt + got.tokens[0]
    # Several passes, so the cache was compacted or truncated along the way.
    assert got.forward_passes[0] > 2
    # The last token is chosen but never fed: the target cache holds everything before it. (The recycler's first
    # cache measured its verification costs.)
    cache = caches[-1] if method == "recycler" else caches[0]
    assert cache.length == len(sequence) - 1
    _check_cache(target, cache, sequence)
    if method == "draft":
        _check_cache(draft, caches[1], sequence)


# ---- sampling: the output distribution is the target's ------------------------------------------------------------


def _peaked(seed: int, scale: float) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=8, n_layers=1, n_heads=2, d_model=16, context_length=16,
                                    positions="rope")).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)  # far from uniform, and far from each other
    return model


def _chi_square_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Pearson's test at p = 0.001, cells with an expected count under 5 pooled into one."""
    n = counts.sum()
    expected = probs.flatten() * n
    counts = counts.flatten().float()
    small = expected < 5
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    obs = torch.cat([counts[~small], counts[small].sum().view(1)])
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    df = max(int(keep.sum()) - 1, 1)
    z = 3.09  # upper 0.001 quantile of the standard normal; Wilson-Hilferty approximation of the chi-square's
    critical = df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3
    return stat < critical


def _target_joint(target: Transformer, prompt: list[int], temperature: float) -> torch.Tensor:
    """P(x1, x2) [8, 8] of plain sampling from the target."""
    with torch.inference_mode():
        first = (target(torch.tensor([prompt]))[0, -1] / temperature).softmax(-1)
        rows = torch.tensor([prompt + [x] for x in range(8)])
        second = (target(rows)[:, -1] / temperature).softmax(-1)
    return first[:, None] * second


def _joint_counts(target: Transformer, draft: Transformer, prompt: list[int], n: int, temperature: float):
    counts = torch.zeros(8, 8)
    accepted = 0.0
    for seed in range(n):
        got = speculative_generate(target, draft, [prompt], 2, k=3, temperature=temperature, seed=seed,
                                   stop_tokens=[])
        x1, x2 = got.tokens[0]
        counts[x1, x2] += 1
        accepted += got.tokens_per_pass[0]
    return counts, accepted / n


@pytest.fixture(scope="module")
def peaked_pair() -> tuple[Transformer, Transformer]:
    return _peaked(0, 8.0), _peaked(1, 8.0)


def test_sampling_matches_target_distribution(peaked_pair, one_thread):
    target, draft = peaked_pair
    prompt = [1, 2, 3]
    want = _target_joint(target, prompt, 1.0)
    counts, per_pass = _joint_counts(target, draft, prompt, 1500, 1.0)
    # Drafts were sometimes accepted and sometimes rejected: both branches of the rule ran.
    assert 1.05 < per_pass < 2.0
    assert _chi_square_ok(counts, want)
    assert _chi_square_ok(counts.sum(1), want.sum(1))  # the first token alone
    # The draft's own distribution differs enough that sampling from it would be caught.
    draft_joint = _target_joint(draft, prompt, 1.0)
    assert not _chi_square_ok(counts, draft_joint)


def test_wrong_acceptance_rule_is_caught(peaked_pair, monkeypatch, one_thread):
    target, draft = peaked_pair
    prompt = [1, 2, 3]
    monkeypatch.setattr(spec, "accept_probability", lambda p, q: torch.ones_like(p))
    counts, _ = _joint_counts(target, draft, prompt, 1500, 1.0)
    assert not _chi_square_ok(counts, _target_joint(target, prompt, 1.0))


def test_sampling_with_temperature_and_top_k(peaked_pair, one_thread):
    target, draft = peaked_pair
    prompt = [4, 4]
    counts = torch.zeros(8)
    for seed in range(800):
        got = speculative_generate(target, draft, [prompt], 1, k=2, temperature=2.0, top_k=4, seed=seed)
        counts[got.tokens[0][0]] += 1
    with torch.inference_mode():
        logits = sampling.top_k(target(torch.tensor([prompt]))[0, -1] / 2.0, 4)
    assert _chi_square_ok(counts, logits.softmax(-1))
    assert int((counts > 0).sum()) <= 4


def test_seed_reproducible(peaked_pair):
    target, draft = peaked_pair
    a = speculative_generate(target, draft, [[1, 2]], 10, temperature=1.0, seed=7, stop_tokens=[])
    b = speculative_generate(target, draft, [[1, 2]], 10, temperature=1.0, seed=7, stop_tokens=[])
    assert a.tokens == b.tokens


def _filtered_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Plain sampling's distribution: temperature, then top-k, then top-p (the property-tested processors)."""
    return sampling.top_p(sampling.top_k(logits.double() / temperature, top_k), top_p).softmax(-1)


def _target_joint3(target: Transformer, prompt: list[int], **kw) -> torch.Tensor:
    """P(x1, x2, x3) [8, 8, 8] of plain sampling from the target, by enumeration of every prefix."""
    V = 8
    with torch.inference_mode():
        p1 = _filtered_probs(target(torch.tensor([prompt]))[0, -1], **kw)
        p2 = _filtered_probs(target(torch.tensor([prompt + [a] for a in range(V)]))[:, -1], **kw)  # [a, b]
        rows = torch.tensor([prompt + [a, b] for a in range(V) for b in range(V)])
        p3 = _filtered_probs(target(rows)[:, -1], **kw).view(V, V, V)  # [a, b, c]
    return p1[:, None, None] * p2[:, :, None] * p3


def _chains(target: Transformer, draft: Transformer, prompt: list[int], n: int, monkeypatch, **kw):
    """Counts of the first three tokens over n seeds of speculative sampling with k=3 drafts and 4 new tokens,
    and how the first round went: (drafts, emitted) per call."""
    rounds = []
    verify = spec._verify

    def spy(logits, drafts, q_rows, params, generator):
        out = verify(logits, drafts, q_rows, params, generator)
        rounds.append((len(drafts), len(out)))
        return out

    monkeypatch.setattr(spec, "_verify", spy)
    counts = torch.zeros(8, 8, 8)
    first = []
    for seed in range(n):
        before = len(rounds)
        got = speculative_generate(target, draft, [prompt], 4, k=3, seed=seed, stop_tokens=[], **kw)
        x1, x2, x3 = got.tokens[0][:3]
        counts[x1, x2, x3] += 1
        first.append(rounds[before])
    return counts, first


@pytest.fixture(scope="module")
def chain_pair() -> tuple[Transformer, Transformer]:
    """A target and a draft close to it (the target's weights with noise on the LM head): chains of drafts are
    often accepted in full and sometimes rejected partway."""
    target = _peaked(0, 6.0)
    draft = _peaked(0, 6.0)
    with torch.no_grad():
        w = draft.lm_head.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(5)) * w.std() * 0.3)
    return target, draft


CHAIN_SAMPLING = dict(temperature=1.3, top_k=4, top_p=0.9)


def test_chains_of_drafts_keep_the_joint_distribution_with_filters(chain_pair, monkeypatch, one_thread):
    # The joint law of the first three tokens, each round drafting k=3: the first round verifies three drafts, so
    # accepting a whole chain and rejecting at draft 1 or 2 (resampling from the residual there) all shape it.
    # Checked with Pearson's chi-square at p = 0.001 (cells under 5 expected pooled) against the exact law by
    # enumeration of all 8^3 continuations; top-k and top-p are on, so the filters enter p and q alike (43 of the
    # 512 cells remain). Measured: statistic 31 against a critical 69 here; a residual drawn from p instead scores
    # 353 against 53 with 800 samples.
    target, draft = chain_pair
    prompt = [1, 2, 3]
    want = _target_joint3(target, prompt, **CHAIN_SAMPLING)
    counts, first = _chains(target, draft, prompt, 1500, monkeypatch, **CHAIN_SAMPLING)
    assert all(d == 3 for d, _ in first)  # k drafts in the first round
    full = sum(e == 4 for _, e in first)
    later_rejection = sum(e in (2, 3) for _, e in first)  # rejected at draft 1 or 2, after accepting a chain
    assert full > 300 and later_rejection > 200, (full, later_rejection)
    assert int((want > 0).sum()) < 8 ** 3 // 2  # the filters cut the support
    assert counts[want == 0].sum() == 0  # nothing the filters remove is ever drawn
    assert _chi_square_ok(counts, want)
    assert _chi_square_ok(counts.sum(2), want.sum(2))  # the first two alone
    # The control: the draft's own law, which the same counts must not fit.
    draft_law = _target_joint3(draft, prompt, **CHAIN_SAMPLING)
    assert not _chi_square_ok(counts, draft_law)


@pytest.mark.parametrize("wrong", ["accept every draft", "resample from p"])
def test_a_wrong_rule_fails_the_chain_test(chain_pair, monkeypatch, one_thread, wrong):
    target, draft = chain_pair
    prompt = [1, 2, 3]
    if wrong == "accept every draft":
        monkeypatch.setattr(spec, "accept_probability", lambda p, q: torch.ones_like(p))
    else:  # after a rejection, draw from the target instead of the residual norm(max(0, p - q))
        monkeypatch.setattr(spec, "residual", lambda p, q: p)
    counts, _ = _chains(target, draft, prompt, 800, monkeypatch, **CHAIN_SAMPLING)
    assert not _chi_square_ok(counts, _target_joint3(target, prompt, **CHAIN_SAMPLING))


# ---- templates and bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 8, 15, 40])
def test_tree_template_is_breadth_first(n):
    template = spec.tree_template(n)
    assert len(template) == n and len(set(template)) == n
    depth = []
    for i, (parent, rank) in enumerate(template):
        assert -1 <= parent < i and 0 <= rank < 8
        depth.append(0 if parent < 0 else depth[parent] + 1)
    assert depth == sorted(depth)


def test_bad_input_is_one_line_user_error(models):
    target, draft = models
    cases = [
        lambda: speculative_generate(target, _model("rope", 2, vocab_size=41), [[1, 2]], 5),
        lambda: mtp_generate(draft, [[1, 2]], 5),
        lambda: mtp_generate(target, [[1, 2]], 5, n_draft=3),
        lambda: TokenRecycler(target).generate([[1, 2], [3, 4]], 5),
        lambda: speculative_generate(target, draft, [[1, 2], [3, 4]], 5),
        lambda: mtp_generate(target, torch.tensor([[1, 2], [3, 4]]), 5),
        lambda: speculative_generate(target, draft, [[1, 2]], 5, k=0),
        lambda: speculative_generate(target, draft, [[1, 2]], 5, temperature=-1),
        lambda: TokenRecycler(target).generate([[1, 99]], 5),
        lambda: TokenRecycler(target, n_nodes=0),
        lambda: TokenRecycler(_model("rope", 0, context_length=64).__class__(
            ModelConfig(vocab_size=40, n_layers=1, n_heads=2, d_model=16, positions="rope", sliding_window=8))),
    ]
    for case in cases:
        with pytest.raises(UserError) as info:
            case()
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="--objective mtp --n-future"):
        mtp_generate(draft, [[1, 2]], 5)


def test_zero_new_tokens(models):
    target, draft = models
    for got in (TokenRecycler(target).generate([[1]], 0), speculative_generate(target, draft, [[1]], 0),
                mtp_generate(target, [[1]], 0)):
        assert got.tokens == [[]] and got.completion_tokens == [0] and got.forward_passes == [0]


# ---- every path: the same stops, defaults, logprobs, cache growth and refusals as plain decoding -------------------

ALPHABET40 = string.ascii_lowercase + "0123456789 .,;"


@pytest.fixture(scope="module")
def chars40() -> Tokenizer:
    tok = Tokenizer.train_char(texts=[ALPHABET40])
    assert tok.vocab_size == 40 and tok.eos_id is None
    return tok


@pytest.fixture(scope="module")
def rope_pair() -> tuple[Transformer, Transformer]:
    """(a RoPE target with two future heads, a smaller RoPE draft): every path runs on them, PINE included."""
    return _model("rope", 0, n_future=2), _model("rope", 1, n_layers=1, d_model=16)


PROMPT = [3, 1, 4, 1, 5]


def _paths(target: Transformer, draft: Transformer) -> dict:
    """Every generation path, greedy: name -> fn(prompt, n, **kwargs) -> GenerationResult. PINE gets the prompt as
    prefix, one segment and suffix, where it is plain decoding."""
    recycler = TokenRecycler(target, n_nodes=15)
    return {
        "plain": lambda p, n, **kw: generate(target, [p], n, temperature=0, **kw),
        "recycler": lambda p, n, **kw: recycler.generate([p], n, **kw),
        "draft": lambda p, n, **kw: speculative_generate(target, draft, [p], n, k=3, temperature=0, **kw),
        "mtp": lambda p, n, **kw: mtp_generate(target, [p], n, **kw),
        "pine": lambda p, n, **kw: pine.generate(target, p[:1], [p[1:-1]], p[-1:], n, temperature=0, **kw),
    }


def _summary(result) -> tuple:
    return result.tokens, result.texts, result.finish_reasons, result.stopped_by, result.completion_tokens


def test_every_path_stops_on_the_generation_config_end_ids(rope_pair, monkeypatch):
    target, draft = rope_pair
    free = generate(target, [PROMPT], 30, temperature=0, stop_tokens=[]).tokens[0]
    # The latest token among the first 15 that had not appeared before: reached after several speculative rounds.
    at = max(i for i, t in enumerate(free[:15]) if t not in free[:i])
    end = free[at]
    assert at >= 2 and target.config.eos_token_id is None
    # An end id only the generation_config knows (as an instruct model's end-of-turn token).
    monkeypatch.setattr(target, "generation_config", GenerationConfig(eos_token_id=[end]))
    for name, run in _paths(target, draft).items():
        got = run(PROMPT, 30)
        assert _summary(got) == ([free[:at]], None, ["stop"], [end], [at + 1]), name


def test_every_path_cuts_at_stop_strings_and_streams_text(rope_pair, chars40):
    target, draft = rope_pair
    kw = dict(stop_tokens=[], tokenizer=chars40)
    free = generate(target, [PROMPT], 30, temperature=0, **kw)
    assert free.texts == [chars40.decode(free.tokens[0])]
    stop = free.texts[0][9:11]
    want = generate(target, [PROMPT], 30, temperature=0, stop_strings=[stop], **kw)
    assert want.finish_reasons == ["stop"] and want.stopped_by == [stop]
    for name, run in _paths(target, draft).items():
        assert _summary(run(PROMPT, 30, stop_strings=[stop], **kw)) == _summary(want), name
    # Streamed through a speculative decoder: several tokens a step, the same text deltas in the end.
    steps = list(stream(target, [PROMPT], 30, temperature=0, stop_strings=[stop], decoder=TokenRecycler(
        target, n_nodes=15, adaptive=False).decoder, **kw))  # static: multi-token steps whatever the timing
    assert max(len(s.tokens[0]) for s in steps) > 1
    assert [t for s in steps for t in s.tokens[0]] == want.tokens[0]
    assert "".join(s.texts[0] for s in steps) == want.texts[0]
    assert steps[-1].finish_reasons == ["stop"] and steps[-1].stopped_by == [stop]


def test_every_path_reports_the_same_logprobs(rope_pair):
    target, draft = rope_pair
    want = generate(target, [PROMPT], 20, temperature=0, stop_tokens=[], logprobs=3)
    with torch.inference_mode():
        full = target(torch.tensor([PROMPT + want.tokens[0]]))[0, len(PROMPT) - 1:-1].log_softmax(-1)
    for name, run in _paths(target, draft).items():
        got = run(PROMPT, 20, stop_tokens=[], logprobs=3)
        assert got.tokens == want.tokens, name
        assert [lp.token for lp in got.logprobs[0]] == got.tokens[0]
        for i, lp in enumerate(got.logprobs[0]):
            assert lp.logprob == pytest.approx(float(full[i, lp.token]), abs=1e-4), (name, i)
            assert [t for t, _ in lp.top] == full[i].topk(3).indices.tolist(), (name, i)
            assert [v for _, v in lp.top] == pytest.approx(full[i].topk(3).values.tolist(), abs=1e-4)


def test_draft_speculation_applies_penalties_as_plain_decoding(rope_pair):
    # Greedy with penalties is deterministic: each verified position must see the drafts before it as generated.
    target, draft = rope_pair
    kw = dict(repetition_penalty=1.8, frequency_penalty=0.7, stop_tokens=[])
    want = generate(target, [PROMPT], 30, temperature=0, **kw).tokens
    assert want != generate(target, [PROMPT], 30, temperature=0, stop_tokens=[]).tokens
    got = speculative_generate(target, draft, [PROMPT], 30, k=3, temperature=0, **kw)
    assert got.tokens == want and got.tokens_per_pass[0] > 1


@pytest.mark.parametrize("method", ["recycler", "draft", "mtp", "pine"])
def test_caches_grow_with_the_output_and_keep_tokens(rope_pair, monkeypatch, method):
    target, draft = rope_pair
    monkeypatch.setattr(spec, "CACHE_CHUNK", 2)  # a first cache of prompt + 2 (+ drafts): it must grow often
    monkeypatch.setattr(pine, "CACHE_CHUNK", 2)
    prompt = PROMPT * 3
    want = generate(target, [prompt], 40, temperature=0, stop_tokens=[]).tokens
    caches = _capture_caches(monkeypatch, target, draft)
    got = _paths(target, draft)[method](prompt, 40, stop_tokens=[])
    assert got.tokens == want
    first = len(prompt) + 2
    assert caches and all(c.max_length >= first + 16 for c in caches)  # grew (geometrically) past its first size
    assert all(c.max_length <= len(prompt) + 40 + 16 for c in caches)  # never past what the request can use


def test_nan_weights_are_refused_on_every_path(rope_pair):
    target, draft = rope_pair
    bad = copy.deepcopy(target)
    with torch.no_grad():
        bad.final_norm.weight[0] = float("nan")
    for name, run in _paths(bad, draft).items():
        with pytest.raises(UserError, match="produced NaN logits for the prompt") as info:
            run(PROMPT, 5)
        assert "\n" not in str(info.value), name
    bad_draft = copy.deepcopy(draft)
    with torch.no_grad():
        bad_draft.final_norm.weight[0] = float("nan")
    with pytest.raises(UserError, match="the draft model produced NaN"):
        speculative_generate(target, bad_draft, [PROMPT], 5, temperature=0)


def test_greedy_only_decoders_refuse_sampling_and_take_no_defaults(rope_pair, monkeypatch):
    target, draft = rope_pair
    recycler = TokenRecycler(target)
    for decoder in (recycler.decoder, mtp_decoder()):
        for kwargs in (dict(temperature=0.7), dict(temperature=0, repetition_penalty=1.2)):
            with pytest.raises(UserError, match="decodes greedily") as info:
                stream(target, [PROMPT], 5, decoder=decoder, **kwargs)
            assert "\n" not in str(info.value)
    # A checkpoint that samples by default: its settings are named as the source of the refusal ...
    monkeypatch.setattr(target, "generation_config", GenerationConfig(do_sample=True, temperature=0.6, top_p=0.9))
    with pytest.raises(UserError, match="temperature=0.6 .*generation_config"):
        stream(target, [PROMPT], 5, decoder=recycler.decoder)
    # ... while the greedy methods stay greedy, and draft-model speculation samples with them.
    greedy = generate(target, [PROMPT], 20, temperature=0, stop_tokens=[]).tokens
    assert recycler.generate([PROMPT], 20, stop_tokens=[]).tokens == greedy
    assert mtp_generate(target, [PROMPT], 20, stop_tokens=[]).tokens == greedy
    sampled = stream(target, [PROMPT], 5, decoder=draft_decoder(draft))
    assert sampled.decoder.params == SamplingParams(0.6, 50, 0.9)
    # Several tokens a step cannot follow a grammar's per-token masks, nor compile where there is no graph.
    for decoder in (recycler.decoder, draft_decoder(draft), mtp_decoder()):
        with pytest.raises(UserError, match="cannot follow a grammar"):
            Stream(target, [PROMPT], 5, SamplingParams(), force={0: {0: 1}}, decoder=decoder)
    for decoder in (draft_decoder(draft), mtp_decoder()):
        with pytest.raises(UserError, match="compile=True is not supported"):
            stream(target, [PROMPT], 5, temperature=0, compile=True, decoder=decoder)


# ---- adaptive drafting -------------------------------------------------------------------------------------------


def _with_costs(monkeypatch, costs) -> list:
    """Replace the measured verification costs by `costs(n)`; returns the list of measurements asked for."""
    asked = []

    def measure(model, ancestors, depth, full, kv_dtype):
        asked.append(full)
        return [0.0] + [costs(n) for n in range(1, full + 1)]

    monkeypatch.setattr(spec, "_measure_costs", measure)
    monkeypatch.setattr(spec, "_COSTS", spec.weakref.WeakKeyDictionary())
    return asked


def test_adaptive_falls_back_to_plain_steps_when_wide_passes_cost_their_width(models, monkeypatch):
    target, _ = models
    _with_costs(monkeypatch, lambda n: float(n))  # a pass over n nodes costs n one-token steps: never worth it
    recycler = TokenRecycler(target, n_nodes=15)
    for prompt in PROMPTS:
        got = recycler.generate([prompt], 20, stop_tokens=[])
        assert got.tokens[0] == _plain(target, prompt, 20)
    # Plain steps (most without even drafting: `plain_is_best`), and one exploring tree per EXPLORE_EVERY of them.
    passes = recycler.stats.passes
    plain = passes.get(0, 0)  # every plain step the lean one (no pass of one node after drafting)
    trees = sum(c for n, c in passes.items() if n > 1)
    assert 1 not in passes and plain > 0
    assert trees * spec.EXPLORE_EVERY <= plain + spec.EXPLORE_EVERY * len(PROMPTS)


def test_adaptive_grows_trees_when_passes_are_cheap_and_drafts_land(models, monkeypatch):
    target, _ = models
    _with_costs(monkeypatch, lambda n: 1.0 + 1e-3 * n)  # a wide pass costs about a narrow one
    recycler = TokenRecycler(target, n_nodes=15)
    prompt = [3, 1, 4, 1, 5]
    recycler.generate([prompt], 30, stop_tokens=[])  # the matrix learns this continuation
    again = recycler.generate([prompt], 30, stop_tokens=[])
    assert again.tokens[0] == _plain(target, prompt, 30)
    assert again.tokens_per_pass[0] > 1.5 and max(recycler.stats.passes) > 4
    assert recycler.stats.emitted_tokens > 0 and recycler.stats.expected_tokens > 0


def test_adaptive_with_a_cold_matrix_takes_plain_steps(models, monkeypatch):
    # Nothing recycled yet (probabilities 0): no pass is spent on the placeholder drafts.
    target, _ = models
    _with_costs(monkeypatch, lambda n: 1.0 + 0.1 * n)
    recycler = TokenRecycler(target, n_nodes=8)
    tokens, probs = recycler.draft(3, 9, with_probs=True)
    assert probs[0] == 1 and (probs[1:] == 0).all()
    recycler.verification_costs()
    assert recycler.choose(probs.tolist(), 9)[0] == 1 and recycler.plain_is_best(3)


def test_choose_maximises_expected_tokens_per_second(models, monkeypatch):
    target, _ = models
    _with_costs(monkeypatch, lambda n: 1.0 + 0.25 * (n - 1))
    recycler = TokenRecycler(target, n_nodes=8)
    recycler.verification_costs()
    n_max = len(recycler.parents)
    path = [1.0] + [0.9 ** recycler.depth_list[i] for i in range(1, n_max)]
    n, expected, seconds = recycler.choose(path, n_max)

    def expect(m):  # siblings are disjoint events: a depth's path probabilities add up to at most 1
        per_depth = {}
        for i in range(1, m):
            per_depth[recycler.depth_list[i]] = per_depth.get(recycler.depth_list[i], 0.0) + path[i]
        return 1 + sum(min(1.0, v) for v in per_depth.values())

    rates = [expect(m) / recycler.costs[m] for m in range(1, n_max + 1)]
    rates[0] *= 1 + spec.TREE_MARGIN  # a tree must beat a plain step by the margin
    assert n == 1 + max(range(n_max), key=lambda i: rates[i]) and n > 1
    assert expected == pytest.approx(expect(n)) and seconds == recycler.costs[n]


def test_observe_calibrates_overconfident_paths_down(models, monkeypatch):
    target, _ = models
    _with_costs(monkeypatch, lambda n: 1.0)
    recycler = TokenRecycler(target, n_nodes=8)
    recycler.verification_costs()
    n = len(recycler.parents)
    path = [1.0] + [0.9] * (n - 1)  # confident drafts ...
    before = recycler.choose(path, n)[1]
    for _ in range(30):
        recycler.observe(path, n, accepted=0)  # ... that never land
    after = recycler.choose(path, n)[1]
    assert after < before and after < 1.5


def test_plain_steps_teach_the_matrix_in_stashed_batches(models, monkeypatch):
    target, _ = models
    _with_costs(monkeypatch, lambda n: float(n))  # never worth a tree: plain steps throughout
    monkeypatch.setattr(spec, "EXPLORE_EVERY", 10**6)
    recycler = TokenRecycler(target, n_nodes=8)
    prompt = [3, 1, 4]
    got = recycler.generate([prompt], 2 * spec.STASH_ROWS + 3, stop_tokens=[])
    seq = prompt + got.tokens[0]
    assert got.tokens[0] == _plain(target, prompt, len(got.tokens[0]))
    assert recycler.stats.passes.get(0, 0) > spec.STASH_ROWS and not recycler._stash  # flushed at the end
    # Every token fed since the prompt's last one (all but the last) has the greedy token that followed it as its
    # row's first entry, from the last time it was fed.
    tail = seq[len(prompt) - 1:]
    last_next = {a: b for a, b in zip(tail[:-1], tail[1:], strict=True)}
    for token, following in last_next.items():
        assert int(recycler.matrix[token, 0]) == following


def test_calibration_of_a_depth_not_verified_lately_is_extrapolated(models, monkeypatch):
    target, _ = models
    _with_costs(monkeypatch, lambda n: 1.0)
    recycler = TokenRecycler(target, n_nodes=8)
    depth = recycler.depth_list
    deep = next(n for n in range(1, len(depth) + 1) if max(depth[:n]) == 3)  # the first prefix reaching depth 3
    shallow = deep - 1  # reaches depth 2 only
    path = [1.0] + [0.5 ** depth[i] for i in range(1, len(depth))]
    assert recycler.calibration()[1:4] == [1.0, 1.0, 1.0]  # nothing seen: depth 1 at 1, the rest extrapolated
    for _ in range(10):
        recycler.observe(path, deep, accepted=0)  # depth-3 drafts never land
    assert recycler.calibration()[3] == 0.02
    for _ in range(spec.STALE_PASSES + 1):
        recycler.observe(path, shallow, accepted=2)  # ... but now every verified draft lands, depth 3 unverified
    alpha = recycler.calibration()
    assert alpha[3] == pytest.approx(min(50.0, alpha[2] ** 2 / alpha[1])) and alpha[3] > 1


def test_a_new_request_weighs_its_own_passes_more(models, monkeypatch):
    target, _ = models
    _with_costs(monkeypatch, lambda n: 1.0)
    first, second = TokenRecycler(target, n_nodes=8), TokenRecycler(target, n_nodes=8)
    n = len(first.parents)
    path = [1.0] + [0.3] * (n - 1)
    for recycler in (first, second):
        for _ in range(20):
            recycler.observe(path, n, accepted=3)  # a predictable text: drafts land
    before = first.calibration()
    second.new_request()
    assert second.calibration() == pytest.approx(before, rel=0.02)  # the ratios stay (up to the epsilon) ...
    for recycler in (first, second):
        recycler.observe(path, n, accepted=0)  # ... but a new text's first miss moves them further
    assert second.calibration()[1] < first.calibration()[1] < before[1]


def test_verification_costs_measured_once_per_model_and_setting(models):
    target, _ = models
    spec._COSTS.pop(target, None)
    calls = []
    original = spec._measure_costs
    first = TokenRecycler(target, n_nodes=6)
    try:
        spec._measure_costs = lambda *a: calls.append(1) or original(*a)
        costs = first.verification_costs()
        TokenRecycler(target, n_nodes=6).verification_costs()
    finally:
        spec._measure_costs = original
    assert len(calls) == 1 and len(costs) == len(first.parents) + 1
    assert all(c > 0 for c in costs[1:]) and costs[1:] == sorted(costs[1:])


@pytest.mark.parametrize("seconds, most, rounds", [(0.0, 40, 5), (60.0, 7, 7)])
def test_verification_costs_take_rounds_within_their_time(models, monkeypatch, seconds, most, rounds):
    # At least COST_ROUNDS timed rounds after the warm-up one, more while COST_SECONDS last (at most
    # MAX_COST_ROUNDS).
    target, _ = models
    monkeypatch.setattr(spec, "COST_SECONDS", seconds)
    monkeypatch.setattr(spec, "MAX_COST_ROUNDS", most)
    recycler = TokenRecycler(target, n_nodes=6)
    calls = []
    forward = type(target).forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(target), "forward", counting)
    full = len(recycler.parents)
    costs = spec._measure_costs(target, recycler.ancestors, recycler.depth, full, None)
    grid = len({n for n in (1, 2, 3, 4, 5, 6, 7, 8) if n < full} | {full})
    assert len(calls) == 1 + grid * (rounds + 1)  # the prefix, then a warm-up round and the timed ones
    assert all(c > 0 for c in costs[1:]) and costs[1:] == sorted(costs[1:])


def test_static_tree_when_not_adaptive(models):
    target, _ = models
    recycler = TokenRecycler(target, n_nodes=6, adaptive=False)
    got = recycler.generate([[3, 1, 4]], 20, stop_tokens=[])
    assert got.tokens[0] == _plain(target, [3, 1, 4], 20) and recycler.costs is None and not recycler.stats.passes
