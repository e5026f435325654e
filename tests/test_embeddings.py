"""Sentence embeddings: batching/padding invariance, hand-computed poolings, token prepending, errors."""

from __future__ import annotations

import string

import numpy as np
import pytest
import torch

import decoderlab
from decoderlab import masks
from decoderlab.embeddings import POOLINGS, PROMPT_EOL, Encoder, embed, token_prepending_layers
from decoderlab.errors import UserError
from decoderlab.model import _AttnPlan

TOK = decoderlab.Tokenizer.train_char(texts=[string.printable])
TEXTS = ["a cat sat", "the quick brown fox jumps over it", "hi", "Two words", "x y z w v u t s r"]


def _model(kind: str) -> decoderlab.Transformer:
    torch.manual_seed(0)
    if kind == "llama":  # room for a placeholder id past the tokenizer's vocabulary
        cfg = decoderlab.ModelConfig(vocab_size=TOK.vocab_size + 4, n_layers=4, n_heads=2, d_model=32,
                                     context_length=256, positions="rope", norm="rmsnorm", activation="swiglu")
    else:  # GPT-2-like: learned positions, no spare ids
        cfg = decoderlab.ModelConfig(vocab_size=TOK.vocab_size, n_layers=4, n_heads=2, d_model=32,
                                     context_length=256)
    return decoderlab.Transformer(cfg).eval()


MODELS = {kind: _model(kind) for kind in ("llama", "gpt2")}


@pytest.mark.parametrize("kind", list(MODELS))
@pytest.mark.parametrize("pooling", POOLINGS)
def test_batch_equals_alone_with_left_and_right_padding(kind, pooling):
    model = MODELS[kind]
    alone = torch.cat([embed(model, [t], TOK, pooling) for t in TEXTS])
    assert alone.dtype == torch.float32 and alone.shape == (len(TEXTS), 32)
    assert torch.allclose(alone.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    for side in ("left", "right"):
        batched = embed(model, TEXTS, TOK, pooling, batch_size=3, padding_side=side)
        assert (batched - alone).abs().max() <= 1e-5, side


def test_mean_matches_hand_computation():
    model = MODELS["llama"]
    ids = torch.tensor([TOK.encode(TEXTS[1])])
    with torch.no_grad():
        h = model(ids, hidden_states=True).hidden_states[-1][0]
    want = torch.nn.functional.normalize(h.mean(0), dim=0)
    assert (embed(model, [TEXTS[1]], TOK, "mean")[0] - want).abs().max() <= 1e-5
    # Unnormalised, and at a chosen layer.
    with torch.no_grad():
        h2 = model(ids, hidden_states=True).hidden_states[2][0]
    got = embed(model, [TEXTS[1], "hi"], TOK, "mean", layer=2, normalize=False)[0]
    assert (got - h2.mean(0)).abs().max() <= 1e-5


def test_last_and_prompt_eol_take_the_last_token():
    model = MODELS["gpt2"]
    text = TEXTS[0]
    for pooling, s in (("last", text), ("prompt-eol", PROMPT_EOL[0] + text + PROMPT_EOL[1])):
        ids = torch.tensor([TOK.encode(s)])
        with torch.no_grad():
            h = model(ids, hidden_states=True).hidden_states[-1][0, -1]
        got = embed(model, [text, "hi"], TOK, pooling, normalize=False)[0]
        assert (got - h).abs().max() <= 1e-5, pooling


def test_echo_pools_only_the_second_copy():
    model = MODELS["llama"]
    text = TEXTS[0]
    first = TOK.encode("Instruct: Rewrite the sentence\nQuery: " + text + "\nQuery again: ")
    second = TOK.encode(text)
    with torch.no_grad():
        h = model(torch.tensor([first + second]), hidden_states=True).hidden_states[-1][0]
    want = h[len(first):].mean(0)
    got = embed(model, [text, TEXTS[1]], TOK, "echo", normalize=False)[0]
    assert (got - want).abs().max() <= 1e-5
    assert (got - h[-2 * len(second):].mean(0)).abs().max() > 1e-3  # not the mean over both copies


def _token_prepending_reference(model, text, placeholder_id):
    """One text, blocks run one by one, the placeholder overwritten with plain indexing."""
    k, exit_layer = token_prepending_layers(model.config.n_layers)
    head, tail = TOK.encode(PROMPT_EOL[0]), TOK.encode(PROMPT_EOL[1])
    ids = torch.tensor([head + [placeholder_id] + TOK.encode(text) + tail])
    p, T = len(head), ids.shape[1]
    positions = torch.arange(T)
    with torch.no_grad():
        x = model.embed(ids)
        if model.pos_embed is not None:
            x = x + model.pos_embed(positions)
        rope = model._rope(positions, x.dtype) if model.config.positions == "rope" else None
        plan = _AttnPlan(None, True, False)
        states = []
        for i, block in enumerate(model.blocks):
            if 1 <= i <= k:
                x = x.clone()
                x[0, p] = x[0, T - 1]
            states.append(x)
            x, _ = block(x, rope, plan, None)
        states.append(model.final_norm(x))
    return torch.nn.functional.normalize(states[exit_layer][0, -1], dim=0)


@pytest.mark.parametrize("kind", list(MODELS))
def test_token_prepending_matches_slow_reference(kind):
    model = MODELS[kind]
    assert token_prepending_layers(32) == (7, 27)
    assert token_prepending_layers(4) == (1, 3)
    # The llama model has a spare id past the tokenizer; the gpt2 one falls back to the last id.
    pst = TOK.vocab_size if kind == "llama" else TOK.vocab_size - 1
    for side in ("left", "right"):
        got = embed(model, TEXTS, TOK, "token-prepending", batch_size=4, padding_side=side)
        for i, text in enumerate(TEXTS):
            assert (got[i] - _token_prepending_reference(model, text, pst)).abs().max() <= 1e-5
    # The replacement matters: without it (plain PromptEOL with the placeholder) the vector differs.
    assert (got[0] - embed(model, [TEXTS[0]], TOK, "prompt-eol", layer=3)[0]).abs().max() > 1e-4


def test_bidirectional_lifts_the_causal_mask():
    model = MODELS["llama"]
    text = TEXTS[1]
    with torch.no_grad():
        h = model(torch.tensor([TOK.encode(text)]), mask=masks.full(), hidden_states=True).hidden_states[-1][0]
    want = torch.nn.functional.normalize(h.mean(0), dim=0)
    got = embed(model, [text], TOK, "bidirectional")[0]
    assert (got - want).abs().max() <= 1e-5
    assert (got - embed(model, [text], TOK, "mean")[0]).abs().max() > 1e-3


def test_encoder_wraps_embed():
    model = MODELS["llama"]
    enc = Encoder(model, TOK, pooling="echo")
    arr = enc.encode(TEXTS, batch_size=2)
    assert isinstance(arr, np.ndarray) and arr.shape == (len(TEXTS), 32) and arr.dtype == np.float32
    assert np.abs(arr - embed(model, TEXTS, TOK, "echo").numpy()).max() <= 1e-5
    one = enc.encode(TEXTS[0], convert_to_numpy=False, normalize_embeddings=False)
    assert isinstance(one, torch.Tensor) and one.shape == (32,) and abs(float(one.norm()) - 1) > 1e-3


def test_bad_input_errors():
    model = MODELS["gpt2"]
    with pytest.raises(UserError, match="unknown pooling 'max'; choose one of last, mean") as e:
        embed(model, TEXTS, TOK, "max")
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="no texts"):
        embed(model, [], TOK)
    with pytest.raises(UserError, match=r"text #1 is 300 tokens .* context length 256") as e:
        embed(model, ["ok", "a" * 300], TOK)
    assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="text #0 is empty"):
        embed(model, [""], TOK)
    with pytest.raises(UserError, match="layer must lie"):
        embed(model, TEXTS, TOK, layer=9)
    with pytest.raises(UserError, match="unknown pooling"):
        Encoder(model, TOK, pooling="cls")
