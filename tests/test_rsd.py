"""Recursive Speculative Decoding: the joint law of the first three sampled tokens equals plain sampling's
(chi-square against the exact law by enumeration, with and without top-k/top-p), negative controls that the same
test catches, greedy parity with plain decoding in batches, stops/stop strings/streaming/logprobs through the
engine, the tree's shape, and bad input."""

from __future__ import annotations

import math
import string

import pytest
import torch

from decoderlab import ModelConfig, Tokenizer, Transformer, UserError
from decoderlab.generation import SamplingParams, Stream, generate, rsd, sampling, stream
from decoderlab.generation.rsd import DraftTree, rsd_decoder, rsd_generate

V = 8
PROMPT = [1, 2, 3]
N = 20000  # samples per law: one batch of N identical prompts
Z = 3.719  # the test's level: the upper 1e-4 normal quantile (the seeds are fixed, so the outcome is too)


def _critical(df: int) -> float:
    """The chi-square's upper 1e-4 quantile (Wilson-Hilferty)."""
    return df * (1 - 2 / (9 * df) + Z * math.sqrt(2 / (9 * df))) ** 3


def _peaked(seed: int, scale: float) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(ModelConfig(vocab_size=V, n_layers=1, n_heads=2, d_model=16, context_length=16,
                                    positions="rope")).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)  # far from uniform
    return model


@pytest.fixture(scope="module")
def target() -> Transformer:
    return _peaked(0, 6.0)


@pytest.fixture(scope="module")
def near_draft() -> Transformer:
    """The target's weights with noise on the LM head: whole paths are often accepted, siblings often rejected."""
    draft = _peaked(0, 6.0)
    with torch.no_grad():
        w = draft.lm_head.weight
        w.add_(torch.randn(w.shape, generator=torch.Generator().manual_seed(5)) * w.std() * 0.5)
    return draft


@pytest.fixture(scope="module")
def far_draft() -> Transformer:
    return _peaked(1, 3.0)


def _exact_joint(model: Transformer, params: SamplingParams) -> torch.Tensor:
    """P(x1, x2, x3) [V, V, V] of plain sampling: the product of the processed conditionals, every prefix
    enumerated."""
    with torch.inference_mode():
        p1 = sampling.probabilities(model(torch.tensor([PROMPT]))[:, -1], params)[0]
        p2 = sampling.probabilities(model(torch.tensor([PROMPT + [a] for a in range(V)]))[:, -1], params)
        rows = torch.tensor([PROMPT + [a, b] for a in range(V) for b in range(V)])
        p3 = sampling.probabilities(model(rows)[:, -1], params).view(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def _counts(target: Transformer, draft: Transformer, n: int = N, **kw) -> tuple[torch.Tensor, float]:
    got = rsd_generate(target, draft, [PROMPT] * n, 3, width=[3, 2], seed=0, stop_tokens=[], **kw)
    toks = torch.tensor(got.tokens)
    counts = torch.zeros(V, V, V)
    counts.index_put_((toks[:, 0], toks[:, 1], toks[:, 2]), torch.ones(n), accumulate=True)
    return counts, sum(got.tokens_per_pass) / n


def _pooled(counts: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(observed, expected) per cell, cells with an expected count under 5 pooled into one."""
    expected = probs.flatten().double() * counts.sum()
    observed = counts.flatten().double()
    small = expected < 5
    exp = torch.cat([expected[~small], expected[small].sum().view(1)])
    obs = torch.cat([observed[~small], observed[small].sum().view(1)])
    keep = exp > 0
    return obs[keep], exp[keep]


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, float]:
    """Pearson's statistic and its critical value at level 1e-4."""
    obs, exp = _pooled(counts, probs)
    return float(((obs - exp) ** 2 / exp).sum()), _critical(len(exp) - 1)


def _fits(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    stat, critical = _chi_square(counts, probs)
    return stat < critical


def _detects_two_percent(probs: torch.Tensor, n: int) -> bool:
    """Whether the test at this n rejects, with probability > 0.99, a law that moves 2 % of the mass from the
    likeliest outcome to the second likeliest (TV 0.02): its statistic is then noncentral chi-square with
    lambda = n * sum(delta^2 / p) over those two cells, mean df + lambda and variance 2 (df + 2 lambda)."""
    flat = probs.flatten().double()
    top = flat.topk(2).values
    lam = n * float((0.02 ** 2 / top).sum())
    df = len(_pooled(probs * n, probs)[1]) - 1
    return df + lam - 2.33 * math.sqrt(2 * (df + 2 * lam)) > _critical(df)


SETTINGS = {"T=1": dict(temperature=1.0), "T=1.3 top-k 4 top-p 0.9": dict(temperature=1.3, top_k=4, top_p=0.9)}


# ---- exactness in distribution -----------------------------------------------------------------------------------


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_joint_of_three_tokens_is_plain_samplings(target, near_draft, one_thread, setting):
    # Tree [3, 2]: the first round drafts 3 children of the root and 2 of each, so x1..x3 come from one round when
    # a whole path is accepted, and from rejections of 1, 2 or 3 siblings (the residual updated each time) or later
    # rounds otherwise. Measured: statistic 359 vs critical 443 (T=1, 339 pooled cells), 45 vs 85 (filters).
    kw = SETTINGS[setting]
    params = SamplingParams(**kw)
    want = _exact_joint(target, params)
    counts, per_pass = _counts(target, near_draft, **kw)
    assert 2.0 < per_pass < 3.0  # paths accepted in full and rejected partway
    assert counts[want == 0].sum() == 0  # nothing the filters remove is ever drawn
    assert _fits(counts, want)
    assert _fits(counts.sum(2), want.sum(2))  # the first two tokens alone
    assert _detects_two_percent(want, N)
    # The control: the draft's own law, which the same counts must not fit.
    assert not _fits(counts, _exact_joint(near_draft, params))


def test_forgetting_the_residual_update_is_caught(target, near_draft, one_thread, monkeypatch):
    # After rejecting a sibling, test the next one (and draw the correction) against p instead of
    # norm(max(p - q, 0)). Measured: statistic 1422 vs critical 443.
    monkeypatch.setattr(rsd, "residual", lambda p, q: p)
    kw = SETTINGS["T=1"]
    counts, _ = _counts(target, near_draft, **kw)
    assert not _fits(counts, _exact_joint(target, SamplingParams(**kw)))


def test_siblings_drawn_with_replacement_are_caught(target, far_draft, one_thread, monkeypatch):
    # Siblings drawn independently (with replacement) but verified as if drawn without: the second sibling's law
    # is q, not q renormalised without the first. Measured: statistic 1024 vs critical 85 (the correct rule: 29).
    def with_replacement(log_q, k, generator):
        draws = [(log_q + sampling.gumbel_noise(tuple(log_q.shape), generator)).argmax(-1) for _ in range(k)]
        tokens = torch.stack(draws, -1)
        return tokens, torch.ones_like(tokens, dtype=torch.bool)

    kw = SETTINGS["T=1.3 top-k 4 top-p 0.9"]
    want = _exact_joint(target, SamplingParams(**kw))
    counts, _ = _counts(target, far_draft, **kw)
    assert _fits(counts, want)  # the same pair passes with the correct rule
    monkeypatch.setattr(rsd, "sample_without_replacement", with_replacement)
    counts, _ = _counts(target, far_draft, **kw)
    assert not _fits(counts, want)


def test_gumbel_top_k_draws_without_replacement():
    log_q = torch.tensor([[0.5, 0.3, 0.2, 0.0]]).log().expand(4000, 4)
    tokens, ok = rsd.sample_without_replacement(log_q, 4, torch.Generator().manual_seed(0))
    assert bool(ok[:, :3].all()) and not bool(ok[:, 3].any())  # only 3 tokens have mass; a fourth child is absent
    assert bool((tokens[:, 0] != tokens[:, 1]).all())
    # The second draw's law is q without the first, renormalised: P(second = 1) = .5*.3/.5 + .2*.3/.8 = 0.375.
    assert abs(float((tokens[:, 1] == 1).float().mean()) - 0.375) < 0.03


def test_seed_reproducible(target, near_draft):
    a = rsd_generate(target, near_draft, [[1, 2]], 10, temperature=1.0, seed=7, stop_tokens=[])
    b = rsd_generate(target, near_draft, [[1, 2]], 10, temperature=1.0, seed=7, stop_tokens=[])
    assert a.tokens == b.tokens


# ---- greedy parity, batches, engine paths ------------------------------------------------------------------------


def _model(positions: str, seed: int, n_layers: int = 2, d_model: int = 32) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=40, n_layers=n_layers, n_heads=2, d_model=d_model, context_length=64,
                                   positions=positions, init_std=0.3)).eval()


PROMPTS = [[1], [3, 1, 4, 1, 5], [7, 7, 7, 7], list(range(2, 40))]
ALPHABET40 = string.ascii_lowercase + string.digits + " .,;"


@pytest.mark.parametrize("positions", ["rope", "learned"])
@pytest.mark.parametrize("width", [1, 2, [3, 2, 1]])
def test_greedy_batch_identical_to_plain(positions, width):
    target, draft = _model(positions, 0), _model(positions, 1, 1, 16)
    # Prompts of four lengths in one batch; the 38-token one bounds the batch to 27 new tokens (context 64).
    want = generate(target, PROMPTS, 30, temperature=0, stop_tokens=[]).tokens
    got = rsd_generate(target, draft, PROMPTS, 30, width=width, temperature=0, stop_tokens=[])
    assert got.tokens == want
    assert all(n <= len(t) for n, t in zip(got.forward_passes, want, strict=True))
    # The target as its own draft: every draft is accepted, depth + 1 tokens a pass but at the budget's end.
    self_drafted = rsd_generate(target, target, [PROMPTS[1]], 30, width=width, temperature=0, stop_tokens=[])
    alone = generate(target, [PROMPTS[1]], 30, temperature=0, stop_tokens=[]).tokens[0]
    assert self_drafted.tokens[0] == alone and self_drafted.tokens_per_pass[0] > 3


def test_stops_stop_strings_streaming_and_logprobs():
    target, draft = _model("rope", 0), _model("rope", 1, 1, 16)
    tok = Tokenizer.train_char(texts=[ALPHABET40])
    plain = generate(target, [[1, 2, 3]], 40, temperature=0, stop_tokens=[], tokenizer=tok)
    text = plain.texts[0]
    stop_id = plain.tokens[0][7]
    for kw in (dict(stop_tokens=[stop_id]), dict(stop_tokens=[], stop_strings=text[10:13])):
        want = generate(target, [[1, 2, 3]], 40, temperature=0, tokenizer=tok, logprobs=2, **kw)
        got = rsd_generate(target, draft, [[1, 2, 3]], 40, temperature=0, tokenizer=tok, logprobs=2, **kw)
        assert (got.tokens, got.texts, got.finish_reasons, got.stopped_by) == (
            want.tokens, want.texts, want.finish_reasons, want.stopped_by)
        for a, b in zip(got.logprobs[0], want.logprobs[0], strict=True):
            assert a.token == b.token and abs(a.logprob - b.logprob) < 1e-4
    steps = list(stream(target, [[1, 2, 3]], 20, temperature=0.8, seed=1, stop_tokens=[], tokenizer=tok,
                        decoder=rsd_decoder(target, 2, 3)))
    assert sum(len(s.tokens[0]) for s in steps) == 20 and max(len(s.tokens[0]) for s in steps) > 1
    assert "".join(s.texts[0] for s in steps) == tok.decode([t for s in steps for t in s.tokens[0]])


def test_tree_shape():
    tree = DraftTree.of([3, 2])
    assert tree.starts == [0, 1, 4, 10] and tree.size == 10
    assert tree.parents() == [-1, 0, 0, 0, 1, 1, 2, 2, 3, 3]
    assert tree.depths() == [0, 1, 1, 1, 2, 2, 2, 2, 2, 2]
    assert DraftTree.of(2, 3).branching == (2, 2, 2) and DraftTree.of(4).branching == (4, 4, 4)


def test_bad_input_is_one_line_user_error(target, near_draft):
    bad = [
        (dict(width=0), "width"), (dict(width=2, depth=0), "depth"), (dict(width=[2, 2], depth=3), "disagrees"),
        (dict(width=[40] * 3), "nodes"), (dict(width=9, depth=1), "vocabulary"),
        (dict(width=2, repetition_penalty=1.3), "penalties"),
    ]
    for kw, word in bad:
        width, depth = kw.pop("width"), kw.pop("depth", None)
        with pytest.raises(UserError, match=word) as e:
            list(stream(target, [[1, 2]], 5, temperature=1.0, decoder=rsd_decoder(near_draft, width, depth), **kw))
        assert "\n" not in str(e.value)
    other = Transformer(ModelConfig(vocab_size=V + 1, n_layers=1, n_heads=2, d_model=16, context_length=16))
    with pytest.raises(UserError, match="vocabulary"):
        rsd_generate(target, other, [[1]], 3)
    with pytest.raises(UserError, match="grammar"):
        Stream(target, [[1]], 3, SamplingParams(1.0), force={0: {0: 1}}, decoder=rsd_decoder(near_draft))


# ---- the served API ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsd_server():
    pytest.importorskip("uvicorn")
    import copy

    import openai
    from serve_helpers import MODEL, char_model, char_tokenizer, running

    from decoderlab.serve import create_app

    tok = char_tokenizer()
    model = char_model(tok)
    draft = copy.deepcopy(model)  # the target's own weights: every draft accepted, so RSD's passes are countable
    with running(create_app(model, tok, MODEL, draft=draft, tree=[2, 2, 1])) as base:
        client = openai.OpenAI(base_url=base, api_key="x", max_retries=0, timeout=120)
        try:
            yield {"client": client, "tokenizer": tok, "model": model, "draft": draft, "name": MODEL}
        finally:
            client.close()


def test_server_decodes_sampled_requests_by_rsd(rsd_server, one_thread):
    from serve_helpers import Slowed

    client, tok, model, draft, name = (rsd_server[k] for k in ("client", "tokenizer", "model", "draft", "name"))
    ids = tok.encode("Hello")
    sampling = dict(temperature=0.9, top_p=1.0, top_k=0, min_p=0.0, tokenizer=tok, stop_tokens=[])
    want = generate(model, [ids], 30, seed=11, decoder=rsd_decoder(draft, [2, 2, 1]), **sampling).texts[0]
    with Slowed(model) as target_calls:
        got = client.completions.create(model=name, prompt="Hello", max_tokens=30, temperature=0.9, seed=11)
    assert got.choices[0].text == want and len(want) == 30 and got.choices[0].finish_reason == "length"
    assert len(target_calls.calls) <= 10  # 30 tokens in about 30 / 4 verification passes, not 30 plain steps
    # Streaming gives the same text; a stop string cuts it; the seed reproduces it.
    chunks = list(client.completions.create(model=name, prompt="Hello", max_tokens=30, temperature=0.9, seed=11,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == want and len(chunks) < 30
    stop = want[12:14]
    cut = client.completions.create(model=name, prompt="Hello", max_tokens=30, temperature=0.9, seed=11, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == want[:want.find(stop)]
    short = client.completions.create(model=name, prompt="Hello", max_tokens=7, temperature=0.9, seed=11)
    # Not want[:7]: near its budget a round drafts a shallower tree, which draws other random numbers.
    assert short.choices[0].text == generate(model, [ids], 7, seed=11, decoder=rsd_decoder(draft, [2, 2, 1]),
                                             **sampling).texts[0]
    assert short.usage.completion_tokens == 7 and len(short.choices[0].text) == 7
    # Chat, top-p and top-k: RSD applies the same filters.
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=name, messages=messages, max_tokens=12, temperature=1.2, top_p=0.8,
                                          seed=3, extra_body={"top_k": 5})
    chat_ids = tok.encode_chat(messages)
    expected = generate(model, [chat_ids], 12, seed=3, decoder=rsd_decoder(draft, [2, 2, 1]),
                        **{**sampling, "temperature": 1.2, "top_p": 0.8, "top_k": 5}).texts[0]
    assert chat.choices[0].message.content == expected


def test_server_with_a_draft_is_plain_greedy_at_temperature_zero(rsd_server, one_thread):
    client, tok, model, name = (rsd_server[k] for k in ("client", "tokenizer", "model", "name"))
    want = generate(model, [tok.encode("abc")], 25, temperature=0, tokenizer=tok, stop_tokens=[]).texts[0]
    got = client.completions.create(model=name, prompt="abc", max_tokens=25, temperature=0)
    assert got.choices[0].text == want
    # Penalties are not RSD's: such a request decodes plainly, as the server without a draft would.
    penal = client.completions.create(model=name, prompt="abc", max_tokens=25, temperature=0,
                                      extra_body={"repetition_penalty": 1.5})
    assert penal.choices[0].text == generate(model, [tok.encode("abc")], 25, temperature=0, tokenizer=tok,
                                             stop_tokens=[], repetition_penalty=1.5).texts[0]


def test_server_refuses_a_bad_draft():
    from serve_helpers import MODEL, char_model, char_tokenizer

    from decoderlab.serve import create_app

    tok = char_tokenizer()
    model = char_model(tok)
    other = Transformer(ModelConfig(vocab_size=model.config.vocab_size + 1, n_layers=1, n_heads=2, d_model=16,
                                    context_length=16))
    for kw, word in ((dict(draft=other), "vocabulary"), (dict(draft=model, compile=True), "compile"),
                     (dict(draft=model, tree=0), "width")):
        with pytest.raises(UserError, match=word) as e:
            create_app(model, tok, MODEL, **kw)
        assert "\n" not in str(e.value)


def test_serve_cli_refuses_a_bad_tree(tmp_path):
    import subprocess
    import sys

    run = subprocess.run([sys.executable, "-m", "decoderlab", "serve", str(tmp_path), "--speculative", str(tmp_path),
                          "--tree", "2y3"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.startswith("error: --tree must be") and run.stderr.count("\n") == 1


# ---- self-drafts from the future-token heads ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def heads_target() -> Transformer:
    """A peaked target with two future-token heads (untrained: a draft law that is known but not the target's)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=V, n_layers=1, n_heads=2, d_model=16, context_length=16,
                                    positions="rope", n_future=2)).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)
    return model


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_self_drafts_from_future_heads_are_exact(heads_target, one_thread, setting):
    # The first round has no heads yet and emits one token; the second drafts a [3, 2] tree from heads 1 and 2 at
    # that token's predecessor, so x2 and x3 come from accepted drafts, residual corrections or bonus tokens.
    # Measured: statistic 428 vs critical 547 (T=1), 81 vs 114 (filters); the control below: 3270 vs 547.
    kw = SETTINGS[setting]
    want = _exact_joint(heads_target, SamplingParams(**kw))
    counts, per_pass = _counts(heads_target, None, **kw)
    assert 1.3 < per_pass < 1.5  # drafts accepted, and rejected
    assert counts[want == 0].sum() == 0
    assert _fits(counts, want) and _fits(counts.sum(2), want.sum(2))
    assert _detects_two_percent(want, N)


def test_self_drafts_forgetting_the_residual_update_is_caught(heads_target, one_thread, monkeypatch):
    monkeypatch.setattr(rsd, "residual", lambda p, q: p)
    kw = SETTINGS["T=1"]
    counts, _ = _counts(heads_target, None, **kw)
    assert not _fits(counts, _exact_joint(heads_target, SamplingParams(**kw)))


@pytest.mark.parametrize("width", [1, [3, 2]])
def test_self_drafts_greedy_batch_identical_to_plain(width):
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=40, n_layers=2, n_heads=2, d_model=32, context_length=64,
                                    positions="rope", init_std=0.3, n_future=2)).eval()
    want = generate(model, PROMPTS, 30, temperature=0, stop_tokens=[]).tokens
    got = rsd_generate(model, None, PROMPTS, 30, width=width, depth=None if isinstance(width, list) else 2,
                       temperature=0, stop_tokens=[])
    assert got.tokens == want
    with pytest.raises(UserError, match="n_future"):
        rsd_generate(model, None, PROMPTS, 5, width=2, depth=3)
