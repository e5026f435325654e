"""Head detectors on known patterns (a hand-built previous-token head; patterns replaced through hook_pattern),
attention-sink shares against eager attentions and padded batches, Lookback-Lens features against a full
forward pass over the generated text."""

from __future__ import annotations

import pytest
import torch

import decoderlab
from decoderlab import interp
from decoderlab.errors import UserError


def _previous_token_model() -> decoderlab.Transformer:
    """Layer 0, head 0 attends to the previous token by construction: token embeddings are zero and position i
    embeds as the one-hot e_i, so after RMSNorm the stream is sqrt(d) e_i; the head's keys read e_j and its
    queries read e_{i-1} (scaled up), so the score is large only at j = i - 1. Every other head is zero."""
    torch.manual_seed(0)
    d, H, T = 64, 2, 32
    cfg = decoderlab.ModelConfig(vocab_size=20, d_model=d, n_layers=2, n_heads=H, context_length=T,
                                 norm="rmsnorm", positions="learned", bias_qkv=False)
    model = decoderlab.Transformer(cfg).eval()
    D = d // H
    with torch.no_grad():
        model.embed.weight.zero_()
        model.pos_embed.weight.copy_(torch.eye(T, d))
        for block in model.blocks:
            w = block.attn.qkv.weight
            w.zero_()
            for a in range(D - 1):
                w[a, a + 1] = 4.0  # head 0's query dim a reads position a + 1
            w[H * D: H * D + D, :D] = torch.eye(D)  # head 0's key dim a reads position a
            for m in (block.mlp.up, block.mlp.down, block.attn.out):
                m.weight.zero_()
    return model


def test_a_hand_built_previous_token_head_scores_one_and_the_others_do_not():
    model = _previous_token_model()
    scores = interp.head_scores(model, seq_len=12, batch=4, prefix=[0])
    assert scores.previous.shape == (2, 2)
    assert scores.previous[0, 0] > 0.95 and scores.previous[1, 0] > 0.95
    assert scores.best("previous")[:2] in [(0, 0), (1, 0)]
    # Head 1 is all zeros: uniform over the causal prefix, so its scores are small.
    assert (scores.previous[:, 1] < 0.2).all()
    assert (scores.induction < 0.1).all() and (scores.duplicate < 0.1).all()


def _induction_pattern(B: int, H: int, N: int, start: int, head: int, kind: str) -> torch.Tensor:
    """Self-attention everywhere, except `head`, which in the second half attends like an induction head
    (`i - N + 1`) or a duplicate-token head (`i - N`)."""
    T = start + 2 * N
    p = torch.eye(T).expand(B, H, T, T).clone()
    for i in range(start + N, T):
        p[:, head, i] = 0
        p[:, head, i, i - N + (1 if kind == "induction" else 0)] = 1
    return p


@pytest.mark.parametrize("kind", ["induction", "duplicate"])
def test_detectors_score_known_patterns_set_through_hook_pattern(kind):
    torch.manual_seed(1)
    model = decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4,
                                                          n_kv_heads=2, context_length=64, positions="rope")).eval()
    B, N, start = 3, 10, 1
    known = _induction_pattern(B, 4, N, start, head=2, kind=kind)
    with interp.hooks(model, {"blocks.1.attn.hook_pattern": lambda x, hook: known.to(x.dtype)}):
        scores = interp.head_scores(model, seq_len=N, batch=B, prefix=[0])
    other = "duplicate" if kind == "induction" else "induction"
    assert scores[kind][1, 2] == pytest.approx(1.0)
    assert scores[other][1, 2] == pytest.approx(0.0)
    assert scores.previous[1, 2] == pytest.approx(0.0, abs=1e-6)
    assert scores.previous[1, 0] == pytest.approx(0.0, abs=1e-6)  # self-attention is not previous-token
    assert scores.best(kind) == (1, 2, pytest.approx(1.0))
    # The untouched layer 0 is a random model's: spread out, nothing near 1.
    assert (scores[kind][0] < 0.5).all()


def test_scores_from_patterns_refuses_a_length_that_does_not_fit():
    with pytest.raises(UserError):
        interp.scores_from_patterns([torch.ones(1, 2, 9, 9)], seq_len=5, start=0)
    with pytest.raises(UserError):
        interp.head_scores(decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=10, d_model=16, n_layers=1,
                                                                         n_heads=2, context_length=16)), seq_len=9)


def test_repeated_tokens_repeat_and_draw_from_the_pool():
    t = interp.repeated_tokens(50, 7, 3, seed=2, prefix=[49], token_ids=range(5, 10))
    assert t.shape == (3, 15) and (t[:, 0] == 49).all()
    assert torch.equal(t[:, 1:8], t[:, 8:]) and ((t[:, 1:] >= 5) & (t[:, 1:] < 10)).all()


def test_sink_shares_equal_eager_attentions_and_padding_changes_nothing():
    torch.manual_seed(2)
    model = decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4,
                                                          context_length=64, positions="rope",
                                                          norm="rmsnorm")).eval()
    ids = torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(3))
    shares = interp.sink_shares(model, ids)
    with torch.no_grad():
        attn = model(ids, attentions=True).attentions
    expected = torch.stack([a[:, :, 1:, 0].mean(dim=(0, 2)) for a in attn])
    assert torch.allclose(shares, expected, atol=1e-6)
    # Always on the first token -> 1; the share plus the rest of each query's attention sums to 1.
    T = ids.shape[1]
    on_first = torch.zeros(2, 4, T, T)
    on_first[..., 0] = 1
    with interp.hooks(model, [(lambda n: n.endswith("hook_pattern"), lambda x, hook: on_first)]):
        assert torch.allclose(interp.sink_shares(model, ids), torch.ones(2, 4))
    rest = torch.stack([a[:, :, 1:, 1:].sum(-1).mean(dim=(0, 2)) for a in attn])
    assert torch.allclose(shares + rest, torch.ones(2, 4), atol=1e-5)
    # Row 1 left-padded by 4: its first real token is the sink; the result equals the unpadded rows' average.
    short = ids[1, :5]
    padded = torch.stack([ids[0], torch.cat([torch.zeros(4, dtype=torch.long), short])])
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, :4] = False
    got = interp.sink_shares(model, padded, valid=valid)
    a, b = interp.sink_shares(model, ids[:1]), interp.sink_shares(model, short)
    assert torch.allclose(got, (a * (T - 1) + b * 4) / (T - 1 + 4), atol=1e-5)
    with pytest.raises(UserError):
        interp.sink_shares(model, ids, valid=valid[:, :3])


def test_lookback_features_match_a_full_forward_over_the_generation():
    torch.manual_seed(3)
    model = decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4,
                                                          n_kv_heads=2, context_length=64, positions="rope")).eval()
    prompt = [3, 17, 5, 9, 22, 1]
    lb = interp.lookback_lens(model, prompt, 6, temperature=0, stop_tokens=[])
    assert len(lb.tokens) == 6 and lb.ratios.shape == (6, 2, 4) and lb.prompt_len == 6
    assert torch.allclose(lb.ratios[0], torch.ones(2, 4))
    full = torch.tensor([prompt + lb.tokens[:-1]])
    with torch.no_grad():
        attn = model(full, attentions=True).attentions
    n = len(prompt)
    for step in range(1, 6):
        q = n - 1 + step
        for layer in range(2):
            row = attn[layer][0, :, q]
            ctx, new = row[:, :n].mean(-1), row[:, n:q + 1].mean(-1)
            assert torch.allclose(lb.context[step, layer], ctx, atol=1e-5)
            assert torch.allclose(lb.new[step, layer], new, atol=1e-5)
            assert torch.allclose(lb.ratios[step, layer], ctx / (ctx + new), atol=1e-5)
            # Means times counts add up to each query's whole attention.
            assert torch.allclose(lb.context[step, layer] * n + lb.new[step, layer] * step, torch.ones(4), atol=1e-5)
    assert lb.features().shape == (8,)
