"""Masked objectives: the model's objective fields, the noising, the losses and the attention annealing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import decoderlab
from decoderlab import masks
from decoderlab.config import ModelConfig
from decoderlab.errors import ConfigError
from decoderlab.masked import (
    annealed_attention,
    diffusion_nll,
    diffusion_noise,
    masked_loss,
    mlm_noise,
    scored_slots,
)
from decoderlab.model import Transformer

TINY = dict(vocab_size=40, n_layers=2, n_heads=2, d_model=32, context_length=32, positions="rope", norm="rmsnorm",
            activation="swiglu", hf_family=None)


def tiny(**changes) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(**{**TINY, **changes})).eval()


def test_objective_fields_are_validated():
    with pytest.raises(ConfigError, match="needs mask_token_id"):
        ModelConfig(**TINY, objective="diffusion")
    with pytest.raises(ConfigError, match="below vocab_size"):
        ModelConfig(**TINY, objective="mlm", mask_token_id=40)
    with pytest.raises(ConfigError, match="causal model"):
        ModelConfig(**TINY, bidirectional=True)
    with pytest.raises(ConfigError, match="unknown objective"):
        ModelConfig(**TINY, objective="bert", mask_token_id=1)


def test_bidirectional_model_sees_the_future_and_matches_the_full_mask():
    model = tiny(objective="diffusion", bidirectional=True, mask_token_id=39)
    x = torch.randint(0, 39, (2, 12))
    with torch.no_grad():
        default = model(x)
        explicit = model(x, mask=masks.full())
        changed = model(torch.cat([x[:, :-1], (x[:, -1:] + 1) % 39], 1))
    torch.testing.assert_close(default, explicit)
    assert not torch.allclose(default[:, 0], changed[:, 0]), "the first slot must see the last token"
    causal = tiny()
    with torch.no_grad():
        a, b = causal(x), causal(torch.cat([x[:, :-1], (x[:, -1:] + 1) % 39], 1))
    torch.testing.assert_close(a[:, :-1], b[:, :-1])


@pytest.mark.parametrize("family", ["llama", None])
def test_saved_folder_records_the_objective(tmp_path, family):
    changes = dict(objective="diffusion", bidirectional=True, shift_logits=True, mask_token_id=7)
    if family:
        changes.update(hf_family=family, norm_eps=1e-6, tie_embeddings=False, bias_qkv=False, bias_attn_out=False,
                       bias_mlp=False, qk_norm=False)
    model = tiny(**changes)
    decoderlab.save(model, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    if family:
        assert cfg["decoderlab_objective"] == {"objective": "diffusion", "bidirectional": True,
                                               "shift_logits": True, "mask_token_id": 7}
    back = decoderlab.load(tmp_path, device="cpu")
    for name in changes:
        assert getattr(back.config, name) == getattr(model.config, name)
    x = torch.randint(0, 39, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(back(x), model(x), rtol=1e-4, atol=1e-4)


def test_diffusion_loss_with_every_token_masked_is_the_cross_entropy_of_the_row():
    model = tiny(objective="diffusion", bidirectional=True, mask_token_id=39)
    x = torch.randint(0, 39, (3, 16))
    noised = diffusion_noise(x, 39, torch.Generator().manual_seed(0), t=torch.ones(3))
    assert (noised.inputs == 39).all() and torch.allclose(noised.weights, torch.ones(3, 16))
    logits = model(noised.inputs)
    expected = F.cross_entropy(logits.flatten(0, 1), x.flatten())  # p = 1: CE / p is the plain CE
    torch.testing.assert_close(masked_loss(logits, noised, shift=False), expected)
    # The head only at the scored slots gives the same loss.
    kept = model(noised.inputs, logits_to_keep=scored_slots(noised, shift=False))
    torch.testing.assert_close(masked_loss(kept, noised, shift=False), expected)


def test_diffusion_weights_are_one_over_p_and_the_rate_follows_t():
    x = torch.randint(0, 39, (4, 4000))
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    noised = diffusion_noise(x, 39, torch.Generator().manual_seed(1), t=t)
    p = (1 - 1e-3) * t + 1e-3
    rate = (noised.inputs == 39).float().mean(1)
    torch.testing.assert_close(rate, p, atol=0.03, rtol=0)
    for row in range(4):
        w = noised.weights[row][noised.trained[row]]
        torch.testing.assert_close(w, torch.full_like(w, 1 / p[row].item()))
    assert noised.count == x.numel()


def test_shifted_loss_predicts_the_next_slot_and_never_masks_the_first():
    model = tiny(objective="diffusion", bidirectional=True, shift_logits=True, mask_token_id=39)
    x = torch.randint(0, 39, (2, 10))
    noised = diffusion_noise(x, 39, torch.Generator().manual_seed(0), t=torch.ones(2), shift=True)
    assert not noised.trained[:, 0].any() and noised.trained[:, 1:].all()
    logits = model(noised.inputs)
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="sum") / (2 * 9)
    torch.testing.assert_close(masked_loss(logits, noised, shift=True), expected)
    kept = model(noised.inputs, logits_to_keep=scored_slots(noised, shift=True))
    torch.testing.assert_close(masked_loss(kept, noised, shift=True), expected)


def test_mlm_noise_follows_bert_proportions_and_only_touches_maskable_slots():
    x = torch.randint(0, 30, (8, 5000))
    maskable = torch.ones_like(x, dtype=torch.bool)
    maskable[:, :100] = False
    noised = mlm_noise(x, 39, 40, torch.Generator().manual_seed(0), maskable=maskable)
    chosen = noised.trained
    assert not chosen[:, :100].any()
    assert abs(chosen[:, 100:].float().mean().item() - 0.15) < 0.01
    replaced = (noised.inputs == 39)[chosen].float().mean().item()
    unchanged = (noised.inputs == x)[chosen].float().mean().item()
    assert abs(replaced - 0.8) < 0.02 and 0.09 < unchanged < 0.14  # 10 % kept + random tokens that hit the same id
    assert (noised.inputs[~chosen] == x[~chosen]).all()


def test_annealed_attention_goes_from_causal_to_full_within_documents():
    docs = torch.tensor([[0, 0, 0, 1, 1, 1]])
    causal = (masks.causal() & masks.document(docs)).materialize(torch.arange(6), torch.arange(6), batch_size=1)
    full = masks.document(docs).materialize(torch.arange(6), torch.arange(6), batch_size=1)
    assert torch.equal(annealed_attention(0.0, docs), causal)
    assert torch.equal(annealed_attention(1.0, docs), full)
    half = annealed_attention(0.5, docs.expand(200, 6), torch.Generator().manual_seed(0))
    assert (half <= full).all() and (half >= causal).all()
    future = full & ~causal
    share = half[future.expand_as(half)].float().mean().item()
    assert 0.4 < share < 0.6


def test_diffusion_nll_bound_is_lower_for_a_model_that_fits_the_data():
    # A model that knows the sequence (its logits put all mass on the right token) has a bound near 0.
    x = torch.randint(0, 39, (2, 12))

    class Oracle(torch.nn.Module):
        def forward(self, ids, positions=None, mask=None):
            return F.one_hot(x, 40).float() * 50

    oracle = diffusion_nll(Oracle(), x, 39, samples=4)
    untrained = diffusion_nll(tiny(objective="diffusion", bidirectional=True, mask_token_id=39), x, 39, samples=4)
    assert (oracle < 1e-6).all() and (untrained > 12 * 2.0).all()  # a random model is near log(40) per token
