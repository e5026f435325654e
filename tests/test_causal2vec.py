"""Causal2Vec: gradients reach only the head (and adapters), InfoNCE by hand, training helps on held-out pairs,
padding/batching invariance, save/load round trip, one-line errors, the CLI."""

from __future__ import annotations

import json
import math
import random
import string
import subprocess
import sys

import numpy as np
import pytest
import torch

import decoderlab
from decoderlab import causal2vec
from decoderlab.causal2vec import (
    Causal2Vec,
    Causal2VecConfig,
    corpus_split,
    function_pairs,
    info_nce,
    load_causal2vec,
    retrieval_mrr,
    save_causal2vec,
    train_causal2vec,
)
from decoderlab.errors import UserError
from decoderlab.lora import has_lora, lora_parameters

TOK = decoderlab.Tokenizer.train_char(texts=[string.printable])
TEXTS = ["a cat sat", "the quick brown fox jumps over it", "hi", "Two words", "x y z w v u t s r"]


def _model(kind: str = "llama", width: int = 32) -> decoderlab.Transformer:
    torch.manual_seed(0)
    if kind == "llama":
        cfg = decoderlab.ModelConfig(vocab_size=TOK.vocab_size, n_layers=2, n_heads=2, d_model=width,
                                     context_length=128, positions="rope", norm="rmsnorm", activation="swiglu",
                                     tie_embeddings=False)
    else:  # GPT-2-like: learned positions, which the contextual token must get too
        cfg = decoderlab.ModelConfig(vocab_size=TOK.vocab_size, n_layers=2, n_heads=2, d_model=width,
                                     context_length=128)
    return decoderlab.Transformer(cfg).eval()


def _pairs(n: int, seed: int) -> list[tuple[str, str]]:
    """Query: random lowercase letters; document: the same letters upper-cased, with a tail. Matching them
    needs learning (the upper-case characters are other tokens), and new strings test generalisation."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        q = " ".join("".join(rng.choices(string.ascii_lowercase, k=3)) for _ in range(2))
        out.append((q, q.upper() + " ok"))
    return out


def _head(model: decoderlab.Transformer, **kw) -> Causal2Vec:
    torch.manual_seed(1)
    return Causal2Vec.for_decoder(model, Causal2VecConfig(max_tokens=40, **kw))


@pytest.mark.parametrize("lora_r", [0, 2])
def test_gradients_reach_only_the_head_and_adapters(lora_r):
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = train_causal2vec(model, TOK, _pairs(16, 0), Causal2VecConfig(max_tokens=40, lora_r=lora_r),
                              steps=1, batch_size=8)
    head = result.head
    # One more backward by hand: which parameters got a gradient?
    head.zero_grad(set_to_none=True)
    for p in lora_parameters(model):
        p.grad = None
    rows = causal2vec.token_rows(TOK, [q for q, _ in _pairs(4, 1)] + [d for _, d in _pairs(4, 1)], 40)
    e = head.embed_ids(model, rows)
    info_nce(e[:4], e[4:]).backward()
    adapters = {id(p) for p in lora_parameters(model)}
    assert has_lora(model) == bool(lora_r)
    for name, p in model.named_parameters():
        if id(p) in adapters:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None and not p.requires_grad, name
    assert all(p.grad is not None for p in head.parameters() if p is not head.encoder.lm_head.weight)
    assert sum(p.grad.abs().sum() for p in head.projection.parameters()) > 0
    # The decoder's own weights are unchanged by the training step (adapters are extra parameters).
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k


def test_info_nce_matches_hand_computation():
    q = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    d = torch.tensor([[2.0, 0.0], [0.0, 3.0]])  # normalised: [1, 0], [0, 1]
    t = 0.5
    sims = [[1.0, 0.0], [0.6, 0.8]]  # cos(q_i, d_j)
    want = sum(-math.log(math.exp(sims[i][i] / t) / sum(math.exp(s / t) for s in sims[i])) for i in range(2)) / 2
    assert abs(info_nce(q, d, t).item() - want) < 1e-6


def test_training_lowers_loss_and_beats_an_untrained_head_on_held_out_pairs():
    model = _model()
    train, held_out = _pairs(128, 0), _pairs(40, 99)
    assert not {q for q, _ in train} & {q for q, _ in held_out}
    untrained = _head(model)
    q, d = [p[0] for p in held_out], [p[1] for p in held_out]
    mrr0 = retrieval_mrr(decoderlab.embed(model, q, TOK, "causal2vec", head=untrained),
                         decoderlab.embed(model, d, TOK, "causal2vec", head=untrained))
    torch.manual_seed(1)
    result = train_causal2vec(model, TOK, train, Causal2VecConfig(max_tokens=40), steps=60, batch_size=16, lr=3e-3)
    first, last = np.mean(result.losses[:5]), np.mean(result.losses[-5:])
    assert last < 0.5 * first, (first, last)
    mrr1 = retrieval_mrr(decoderlab.embed(model, q, TOK, "causal2vec", head=result.head),
                         decoderlab.embed(model, d, TOK, "causal2vec", head=result.head))
    assert mrr1 > mrr0 + 0.3, (mrr0, mrr1)  # measured: 0.11 -> 0.92


@pytest.mark.parametrize("kind,decoder_tokens", [("llama", None), ("gpt2", None), ("llama", 4)])
def test_batch_equals_alone_with_left_and_right_padding(kind, decoder_tokens):
    model = _model(kind)
    head = _head(model, decoder_tokens=decoder_tokens)
    alone = torch.cat([decoderlab.embed(model, [t], TOK, "causal2vec", head=head) for t in TEXTS])
    assert alone.shape == (len(TEXTS), 64) and alone.dtype == torch.float32
    assert torch.allclose(alone.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    for side in ("left", "right"):
        batched = decoderlab.embed(model, TEXTS, TOK, "causal2vec", head=head, batch_size=3, padding_side=side)
        assert (batched - alone).abs().max() <= 1e-5, side


@pytest.mark.parametrize("decoder_tokens", [None, 5])
def test_embedding_is_contextual_token_and_last_token_states(decoder_tokens):
    model = _model("gpt2")
    head = _head(model, decoder_tokens=decoder_tokens)
    text = TEXTS[1]
    ids = TOK.encode(text, add_special_tokens=False)
    with torch.no_grad():
        ctx = head.contextual([ids])  # the encoder reads the whole text, the decoder its first decoder_tokens
        ids = ids[:decoder_tokens]
        x = model.embed(torch.tensor([[0] + ids])) + model.pos_embed(torch.arange(len(ids) + 1))
        x[0, 0] = ctx[0] + model.pos_embed.weight[0]  # the contextual token gets its position like any token
        h = model(None, residual=x, hidden_states=True).hidden_states[-1][0]
    want = torch.cat([h[0], h[-1]])
    got = decoderlab.embed(model, [text, "hi"], TOK, "causal2vec", head=head, normalize=False)[0]
    assert (got - want).abs().max() <= 1e-5


@pytest.mark.parametrize("lora_r", [0, 2])
def test_save_load_round_trip_gives_identical_vectors(tmp_path, lora_r):
    model = _model()
    model_dir = tmp_path / "m"
    decoderlab.save(model, model_dir, tokenizer=TOK)
    result = train_causal2vec(model, TOK, _pairs(32, 0), Causal2VecConfig(max_tokens=40, lora_r=lora_r), steps=3,
                              batch_size=8, base_model=str(model_dir), out=tmp_path / "head")
    want = decoderlab.embed(model, TEXTS, TOK, "causal2vec", head=result.head)
    meta = json.loads((tmp_path / "head" / "causal2vec.json").read_text())
    assert meta["config"]["base_model"] == str(model_dir) and meta["config"]["extra"]["steps"] == 3
    fresh = decoderlab.load(model_dir)
    got = decoderlab.embed(fresh, TEXTS, TOK, "causal2vec", head=str(tmp_path / "head"))
    assert torch.allclose(got, want, atol=1e-6)
    assert has_lora(fresh) == bool(lora_r)
    # The sentence-transformers-style wrapper loads the folder once.
    enc = decoderlab.Encoder(decoderlab.load(model_dir), TOK, pooling="causal2vec", head=tmp_path / "head")
    assert np.allclose(enc.encode(TEXTS), want.numpy(), atol=1e-6)


def test_bad_input_gives_one_line_errors(tmp_path):
    model = _model()
    with pytest.raises(UserError, match="needs a trained head") as e:
        decoderlab.embed(model, TEXTS, TOK, "causal2vec")
    assert "\n" not in str(e.value)
    head = _head(model)
    save_causal2vec(head, tmp_path / "head")
    wide = _model(width=48)
    for call in (lambda: decoderlab.embed(wide, TEXTS, TOK, "causal2vec", head=head),
                 lambda: load_causal2vec(tmp_path / "head", wide)):
        with pytest.raises(UserError, match="width 32") as e:
            call()
        assert "\n" not in str(e.value)
    with pytest.raises(UserError, match="not a Causal2Vec head"):
        load_causal2vec(tmp_path, model)
    with pytest.raises(UserError, match="head= is for pooling"):
        decoderlab.embed(model, TEXTS, TOK, "mean", head=head)
    with pytest.raises(UserError, match="fewer than one batch"):
        train_causal2vec(model, TOK, _pairs(3, 0), steps=1, batch_size=8)
    with pytest.raises(UserError, match="max_tokens"):
        Causal2Vec.for_decoder(model, Causal2VecConfig(max_tokens=127))


def test_function_pairs_split_is_by_file_and_disjoint(tmp_path):
    src = "def f(x):\n    '''Add one to the number.'''\n    total = x + 1\n    return total\n"
    files = []
    for i in range(20):
        (tmp_path / f"m{i}.py").write_text(src.replace("f(", f"f{i}("))
        files.append(tmp_path / f"m{i}.py")
    train = list(function_pairs(files, split="train", root=tmp_path))
    held = list(function_pairs(files, split="eval", root=tmp_path))
    assert list(function_pairs(files)) == list(function_pairs(files, root=tmp_path))
    # Which files are held out depends only on their names (relative to the root): the same on every machine.
    held_files = sorted(f.name for f in files if corpus_split(f, tmp_path) == "eval")
    assert held_files == ["m14.py", "m17.py", "m4.py", "m5.py", "m6.py", "m8.py"]
    assert len(train) == 14 and len(held) == 6
    assert train[0] == ("Add one to the number.", "total = x + 1\nreturn total")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "decoderlab", *args], capture_output=True, text=True, timeout=120)


def test_cli_embed_train_then_embed(tmp_path):
    model = _model()
    decoderlab.save(model, tmp_path / "m", tokenizer=TOK)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps({"query": q, "document": d}) + "\n"
                                                  for q, d in _pairs(24, 0)))
    out = _run("embed-train", str(tmp_path / "m"), "--out", str(tmp_path / "head"), "--pairs",
               str(tmp_path / "pairs.jsonl"), "--steps", "2", "--batch-size", "8", "--max-tokens", "40")
    assert out.returncode == 0, out.stderr
    assert "2 steps" in out.stdout
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n")
    out = _run("embed", str(tmp_path / "m"), "--input", str(tmp_path / "texts.txt"), "--output",
               str(tmp_path / "e.npy"), "--pooling", "causal2vec", "--head", str(tmp_path / "head"))
    assert out.returncode == 0, out.stderr
    fresh = decoderlab.load(tmp_path / "m")
    want = decoderlab.embed(fresh, TEXTS, TOK, "causal2vec", head=load_causal2vec(tmp_path / "head", fresh))
    assert np.allclose(np.load(tmp_path / "e.npy"), want.numpy(), atol=1e-5)
    bad = _run("embed", str(tmp_path / "m"), "--input", str(tmp_path / "texts.txt"), "--output",
               str(tmp_path / "e.npy"), "--pooling", "causal2vec")
    assert bad.returncode == 2 and "needs a trained head" in bad.stderr and "Traceback" not in bad.stderr
