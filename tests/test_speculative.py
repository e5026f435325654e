"""Speculative decoding: greedy parity with plain `generate`, cache consistency, the recycler's matrix, the
sampling distribution of draft-model speculation (chi-square), and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import decoderlab
from decoderlab import ModelConfig, Transformer, UserError
from decoderlab.generation import generate, sampling
from decoderlab.generation import speculative as spec
from decoderlab.generation.speculative import SpeculativeResult, TokenRecycler, mtp_generate, speculative_generate

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
    # The last token is chosen but never fed: the target cache holds everything before it.
    assert caches[0].length == len(sequence) - 1
    _check_cache(target, caches[0], sequence)
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
    df = int(keep.sum()) - 1
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


def test_sampling_matches_target_distribution(peaked_pair):
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


def test_wrong_acceptance_rule_is_caught(peaked_pair, monkeypatch):
    target, draft = peaked_pair
    prompt = [1, 2, 3]
    monkeypatch.setattr(spec, "accept_probability", lambda p, q: torch.ones_like(p))
    counts, _ = _joint_counts(target, draft, prompt, 1500, 1.0)
    assert not _chi_square_ok(counts, _target_joint(target, prompt, 1.0))


def test_sampling_with_temperature_and_top_k(peaked_pair):
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
