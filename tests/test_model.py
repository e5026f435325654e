"""The Transformer itself: cache consistency, attention paths, masks, positions, config switches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import decoderlab
from decoderlab import ModelConfig, Transformer, masks

VARIANTS = {
    "gpt2-like": ModelConfig(vocab_size=50, n_layers=2, n_heads=4, d_model=32, context_length=64),
    "llama-like": ModelConfig(vocab_size=50, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32,
                              context_length=64, norm="rmsnorm", positions="rope", activation="swiglu",
                              bias_qkv=False, bias_attn_out=False, bias_mlp=False, tie_embeddings=False),
    "modern": ModelConfig(vocab_size=50, n_layers=2, n_heads=4, n_kv_heads=1, d_model=32, context_length=64,
                          norm="rmsnorm", positions="rope", activation="relu2", qk_norm=True,
                          logit_softcap=15.0, bias_qkv=False, bias_attn_out=False, bias_mlp=False),
    "nopos": ModelConfig(vocab_size=50, n_layers=1, n_heads=2, d_model=16, context_length=32, positions="none",
                         activation="gelu", norm_bias=False),
}


def _model(name: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(VARIANTS[name]).eval()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_kv_cache_prefill_then_decode_matches_full_forward(name):
    model = _model(name)
    ids = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(batch_size=2, max_length=16)
        parts = [model(ids[:, :5], cache=cache)]
        for t in range(5, 9):
            parts.append(model(ids[:, t:t + 1], cache=cache))
        parts.append(model(ids[:, 9:], cache=cache))  # several tokens after a cached prefix
    assert cache.length == 12
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5)


def test_cache_truncate_rolls_back():
    model = _model("llama-like")
    ids = torch.randint(0, 50, (1, 10))
    with torch.no_grad():
        cache = model.new_cache(1, 16)
        model(ids[:, :6], cache=cache)
        model(torch.randint(0, 50, (1, 3)), cache=cache)  # speculative tokens, then rejected
        cache.truncate(6)
        tail = model(ids[:, 6:], cache=cache)
        assert torch.allclose(tail, model(ids)[:, 6:], atol=1e-5)


def test_cache_overflow_is_a_clear_error():
    model = _model("gpt2-like")
    cache = model.new_cache(1, 4)
    with pytest.raises(decoderlab.UserError, match="KV cache is full"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)


def test_plain_causal_takes_sdpa_fast_path(monkeypatch):
    model = _model("llama-like")
    calls = []
    real = F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, is_causal=False, **kw):
        calls.append((attn_mask is None, is_causal))
        return real(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    ids = torch.randint(0, 50, (2, 9))
    with torch.no_grad():
        model(ids)
        assert calls and all(c == (True, True) for c in calls)
        calls.clear()
        model(ids, mask=masks.causal())
        assert all(c == (True, True) for c in calls)
        calls.clear()
        model(ids, mask=masks.causal() & masks.padding(torch.ones(2, 9, dtype=torch.bool)))
        assert all(c == (False, False) for c in calls)  # a real mask goes in as a tensor


@pytest.mark.parametrize("name", list(VARIANTS))
def test_eager_attention_matches_sdpa_and_returns_weights(name):
    model = _model(name)
    ids = torch.randint(0, 50, (2, 10))
    mask = masks.causal() | masks.prefix(torch.tensor([4, 6]))  # a prefix-LM mask: not plain causal
    with torch.no_grad():
        for m in (None, mask):
            out = model(ids, mask=m, attentions=True, hidden_states=True)
            assert torch.allclose(out.logits, model(ids, mask=m), atol=1e-5)
            assert len(out.attentions) == model.config.n_layers
            assert len(out.hidden_states) == model.config.n_layers + 1
            probs = out.attentions[0]
            assert probs.shape == (2, model.config.n_heads, 10, 10)
            assert torch.allclose(probs.sum(-1), torch.ones(2, model.config.n_heads, 10))
            if m is None:
                assert probs.triu(1).abs().max() == 0
            else:  # inside the prefix, early tokens see later ones
                assert probs[0, :, 0, 3].min() > 0 and probs[0, :, 0, 4].max() == 0


def test_document_mask_with_restarting_positions_equals_separate_documents():
    model = _model("llama-like")
    a, b = torch.randint(0, 50, (1, 5)), torch.randint(0, 50, (1, 7))
    packed = torch.cat([a, b], dim=1)
    doc = torch.tensor([[0] * 5 + [1] * 7])
    positions = torch.tensor([list(range(5)) + list(range(7))])
    with torch.no_grad():
        got = model(packed, positions=positions, mask=masks.causal() & masks.document(doc))
        assert torch.allclose(got[:, :5], model(a), atol=1e-5)
        assert torch.allclose(got[:, 5:], model(b), atol=1e-5)


def test_explicit_positions_shift_rope_only_relatively():
    model = _model("llama-like")  # RoPE: a constant shift of all positions changes nothing
    ids = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        shifted = model(ids, positions=torch.arange(8) + 17)
        assert torch.allclose(shifted, model(ids), atol=1e-4)


def test_logits_to_keep_and_bad_inputs():
    model = _model("gpt2-like")
    ids = torch.randint(0, 50, (2, 6))
    with torch.no_grad():
        assert torch.allclose(model(ids, logits_to_keep=1), model(ids)[:, -1:], atol=1e-6)
    with pytest.raises(decoderlab.UserError, match="context length"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(decoderlab.UserError, match="batch, time"):
        model(torch.zeros(6, dtype=torch.long))


def test_param_count_matches_config_formula():
    for name, cfg in VARIANTS.items():
        assert Transformer(cfg).num_params() == cfg.num_params(), name
    for name in ("gpt2", "llama-tiny", "char-baby"):
        assert Transformer(ModelConfig.preset(name)).num_params() == ModelConfig.preset(name).num_params()
    assert ModelConfig.preset("gpt2").num_params() == 124_439_808  # the published GPT-2 small count


def test_left_padded_batch_through_the_cache_matches_one_pass():
    model = _model("llama-like")
    valid = torch.tensor([[False, False, True, True, True, True, True, True],
                          [True, True, True, True, True, True, True, True]])
    ids = torch.randint(0, 50, (2, 8)).masked_fill(~valid, 0)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    mask = masks.causal() & masks.padding(valid)
    with torch.no_grad():
        full = model(ids, positions=positions, mask=mask)
        cache = model.new_cache(2, 8)
        first = model(ids[:, :5], positions=positions[:, :5], mask=mask, cache=cache)
        rest = [model(ids[:, t:t + 1], positions=positions[:, t:t + 1], mask=mask, cache=cache) for t in range(5, 8)]
    got = torch.cat([first, *rest], dim=1)
    assert torch.allclose(got[valid], full[valid], atol=1e-5)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN not available")
def test_packed_weights_match_and_go_stale(monkeypatch):
    model = _model("llama-like")
    ids = torch.randint(0, 50, (2, 7))
    model.pack(batch_size=2)  # small fp32 weights stay unpacked: the plain product is faster in cache
    assert model.blocks[0].attn.qkv.packed is None
    monkeypatch.setattr(decoderlab.accel.packing, "SMALL_MODEL_BYTES", 0)
    with torch.no_grad():
        plain = model(ids)
        model.pack(batch_size=2)
        assert model.blocks[0].attn.qkv.packed is not None
        assert (model(ids) - plain).abs().max() <= 1e-5
        assert set(model.state_dict()) == set(_model("llama-like").state_dict())  # packing adds no weights
        model.blocks[0].mlp.down.weight.mul_(2.0)  # an in-place edit makes the packed copy stale
        edited = model(ids)
    model.blocks[0].mlp.down.packed = None
    with torch.no_grad():
        assert torch.allclose(edited, model(ids), atol=1e-6)


def test_bf16_model_with_fp32_cache_matches_bf16_cache():
    model = _model("llama-like").to(torch.bfloat16)
    ids = torch.randint(0, 50, (1, 9))
    outs = []
    with torch.no_grad():
        for dtype in (torch.bfloat16, torch.float32):
            cache = model.new_cache(1, 16, dtype=dtype)
            first = model(ids[:, :6], cache=cache)
            rest = [model(ids[:, t:t + 1], cache=cache) for t in range(6, 9)]
            outs.append(torch.cat([first, *rest], dim=1).float())
    assert outs[1].dtype == torch.float32 and (outs[0] - outs[1]).abs().max() < 0.1


def test_edit_residual_runs_before_each_block():
    model = _model("llama-like")
    ids = torch.randint(0, 50, (1, 6))
    seen = []

    def identity(layer, x):
        seen.append(layer)
        return x

    with torch.no_grad():
        assert torch.equal(model(ids, edit_residual=identity), model(ids))
        assert seen == [0, 1]
        out = model(ids, hidden_states=True, edit_residual=lambda layer, x: x + 1.0 if layer == 1 else x)
        plain = model(ids, hidden_states=True)
    assert torch.allclose(out.hidden_states[1], plain.hidden_states[1] + 1.0, atol=1e-6)


def test_tensor_mask_equals_the_mask_it_materialises():
    model = _model("llama-like")
    ids = torch.randint(0, 50, (2, 9))
    mask = masks.causal() | masks.segments(torch.tensor([[0, 0, 1, 1, 2, 2, 2, 0, 0]] * 2))
    dense = mask.materialize(9, 9, batch_size=2)
    with torch.no_grad():
        assert torch.equal(model(ids, mask=mask), model(ids, mask=dense))
        cache = model.new_cache(2, 16)
        model(ids[:, :5], cache=cache)
        tail = masks.causal().materialize(range(5, 9), 9, batch_size=1)
        assert (model(ids[:, 5:], mask=tail, cache=cache) - model(ids)[:, 5:]).abs().max() < 1e-5
    for bad in (dense.float(), dense[:, :, :, :8], dense[:1, 0]):
        with pytest.raises(decoderlab.UserError, match="tensor mask must be bool"):
            model(ids, mask=bad)
    # The user's window still applies to a tensor mask.
    windowed = Transformer(ModelConfig(**{**VARIANTS["llama-like"].__dict__, "sliding_window": 3})).eval()
    with torch.no_grad():
        assert torch.equal(windowed(ids, mask=masks.causal().materialize(9, 9)), windowed(ids))


def test_branch_drop_drops_whole_tokens_of_each_branch_while_training():
    cfg = VARIANTS["llama-like"].replace(branch_drop=0.25)
    torch.manual_seed(0)
    model = Transformer(cfg)
    reference = Transformer(VARIANTS["llama-like"])
    reference.load_state_dict(model.state_dict())
    torch.manual_seed(1)
    out = model.blocks[0]._regularise(torch.ones(4, 1000, 32))
    per_token = out[..., :1]
    assert torch.equal(out, per_token.expand_as(out))  # a token's branch is kept or dropped as a whole
    kept = per_token == 1 / 0.75
    assert bool((kept | (per_token == 0)).all())
    assert 0.22 < 1 - kept.float().mean().item() < 0.28
    ids = torch.randint(0, 50, (2, 24))
    model.eval(), reference.eval()
    assert torch.equal(model(ids), reference(ids))  # nothing dropped at inference
    model.train()
    torch.manual_seed(2)
    a = model(ids)
    torch.manual_seed(3)
    b = model(ids)
    assert not torch.allclose(a, b)  # random per forward
    a.sum().backward()
    assert all(p.grad is not None for p in model.blocks.parameters())
