"""Adapting a causal model to masked diffusion: the mask token, the noise on packed examples, the annealed attention,
the saved folder, exact resume, the held-out diffusion loss, bad input and the CLI."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest
import torch

import decoderlab
from decoderlab import masks
from decoderlab.errors import UserError
from decoderlab.finetuning import FinetuneConfig, FinetuneTrainer, finetune
from decoderlab.finetuning import diffusion as adapt
from decoderlab.masked import IGNORE_INDEX, diffusion_nll, masked_loss
from decoderlab.vocab import add_mask_token

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_hf_model  # noqa: E402
from serve_helpers import bpe_tokenizer, prose  # noqa: E402
from test_finetune import _interrupt_then_resume, _losses  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    """A tiny random Llama (transformers' save_pretrained, untied head) with a BPE tokenizer that has no mask."""
    folder = tmp_path_factory.mktemp("base")
    make_hf_model("llama", vocab_size=tok.vocab_size).save_pretrained(folder)
    tok.save(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rng = random.Random(0)
    records = []
    for i in range(40):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        records.append({"prompt": f"add {a} {b} =", "completion": f" {a + b}"} if i % 2 else
                       {"text": f"{a} plus {b} is {a + b}"})
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---- the mask token -----------------------------------------------------------------------------------------


def _check_grown(before: torch.Tensor, after: torch.Tensor) -> None:
    assert after.shape == (before.shape[0] + 1, before.shape[1])
    assert torch.equal(after[:-1], before)  # the old rows untouched
    torch.testing.assert_close(after[-1], before.mean(0))


def test_mask_token_for_a_char_tokenizer_grows_embedding_and_head_and_saves(tmp_path):
    tok = decoderlab.Tokenizer.train_char(texts=["to be or not to be"])
    assert tok.mask_id is None
    torch.manual_seed(0)
    model = decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=tok.vocab_size, n_layers=1, n_heads=2,
                                                          d_model=16, context_length=32, tie_embeddings=False))
    embed, head = model.embed.weight.detach().clone(), model.lm_head.weight.detach().clone()
    old_vocab = tok.vocab_size
    mask_id = add_mask_token(model, tok)
    assert mask_id == old_vocab == tok.mask_id and tok.vocab_size == old_vocab + 1
    _check_grown(embed, model.embed.weight.detach())
    _check_grown(head, model.lm_head.weight.detach())
    assert model.config.vocab_size == old_vocab + 1 and model.config.mask_token_id == mask_id
    assert tok.encode("to<mask>be") == tok.encode("to") + [mask_id] + tok.encode("be")
    assert model(torch.tensor([[mask_id, 0, 1]])).shape == (1, 3, old_vocab + 1)
    assert add_mask_token(model, tok) == mask_id and model.embed.weight.shape[0] == old_vocab + 1  # no-op again

    decoderlab.save(model, tmp_path / "m", tokenizer=tok)
    loaded, tok2 = decoderlab.load(tmp_path / "m", pack=False), decoderlab.Tokenizer.from_folder(tmp_path / "m")
    assert tok2.mask_id == mask_id and loaded.config.mask_token_id == mask_id
    assert torch.equal(loaded.embed.weight, model.embed.weight)


def test_mask_token_for_a_gpt2_bpe_folder_grows_the_tied_matrix_and_transformers_loads_it(tmp_path, tok):
    import transformers

    folder = tmp_path / "gpt2"
    make_hf_model("gpt2", vocab_size=tok.vocab_size).save_pretrained(folder)
    tok.save(folder)
    model = decoderlab.load(folder, pack=True)  # packed, as load leaves it: the growth unpacks
    tok = decoderlab.Tokenizer.from_folder(folder)
    embed = model.embed.weight.detach().clone()
    mask_id = add_mask_token(model, tok)
    assert mask_id == embed.shape[0]
    _check_grown(embed, model.embed.weight.detach())
    assert model.lm_head.weight is model.embed.weight  # still tied
    decoderlab.save(model, tmp_path / "out", tokenizer=tok)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf.config.vocab_size == mask_id + 1
    ids = torch.tensor([[3, mask_id, 50, 7]])
    with torch.no_grad():
        torch.testing.assert_close(decoderlab.load(tmp_path / "out", pack=False)(ids), hf(ids).logits,
                                   atol=1e-4, rtol=1e-4)
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "out").mask_token == "<mask>"


def test_a_padded_vocabulary_gives_the_mask_a_free_id_without_growing(tmp_path):
    tok = bpe_tokenizer()
    make_hf_model("llama", vocab_size=tok.vocab_size + 5).save_pretrained(tmp_path)
    model = decoderlab.load(tmp_path, pack=False)
    embed, head = model.embed.weight.detach().clone(), model.lm_head.weight.detach().clone()
    mask_id = add_mask_token(model, tok)
    assert mask_id == tok.vocab_size - 1 and model.embed.weight.shape == embed.shape  # the first id no text makes
    others = torch.arange(embed.shape[0]) != mask_id
    assert torch.equal(model.embed.weight[others], embed[others]) and torch.equal(model.lm_head.weight[others],
                                                                                  head[others])
    torch.testing.assert_close(model.embed.weight[mask_id], embed[:mask_id].mean(0))
    torch.testing.assert_close(model.lm_head.weight[mask_id], head[:mask_id].mean(0))


# ---- noise and attention ------------------------------------------------------------------------------------


def _packed_batch():
    inputs = torch.tensor([[10, 11, 12, 13, 20, 21, 22, 0]])
    targets = torch.tensor([[IGNORE_INDEX, 12, 13, 14, IGNORE_INDEX, 22, 23, IGNORE_INDEX]])
    doc = torch.tensor([[0, 0, 0, 0, 1, 1, 1, 2]])
    return inputs, targets, doc


def test_full_noise_masks_every_trained_token_and_only_those():
    inputs, targets, doc = _packed_batch()
    noised = adapt.noise_examples(inputs, targets, doc, 99, torch.Generator().manual_seed(0), t=torch.ones(1),
                                  eps=0.0)
    assert torch.equal(noised.targets, targets) and torch.equal(noised.weights, (targets != IGNORE_INDEX).float())
    # Slot j + 1's input is the token slot j predicts: hidden when masked and in the same example. The prompt
    # tokens (10, 11; 20) stay; the examples' last tokens (14, 23) are targets only.
    assert noised.inputs.tolist() == [[10, 11, 99, 99, 20, 21, 99, 0]]
    assert int(noised.count) == 5


def test_noise_is_a_function_of_seed_and_step_and_rows_share_it():
    inputs, targets, doc = (x.repeat(6, 1) for x in _packed_batch())
    a = adapt.step_noise(inputs, targets, doc, 99, seed=3, step=7)
    b = adapt.step_noise(inputs, targets, doc, 99, seed=3, step=7)
    c = adapt.step_noise(inputs, targets, doc, 99, seed=3, step=8)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.weights, b.weights)
    assert not torch.equal(a.weights, c.weights)
    part = a.rows([1, 2])
    assert torch.equal(part.inputs, a.inputs[1:3]) and int(part.count) == 10


def test_attention_anneals_from_causal_and_document_to_document():
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1, 2]])
    T = doc.shape[1]
    q = torch.arange(T)
    causal_doc = (masks.causal() & masks.document(doc)).materialize(q, q, batch_size=1)
    at0 = adapt.attention(doc, 0.0, seed=0, step=0)
    assert torch.equal(at0.materialize(q, q, batch_size=1), causal_doc)
    full = masks.document(doc).materialize(q, q, batch_size=1)
    assert torch.equal(adapt.attention(doc, 1.0, seed=0, step=0).materialize(q, q, batch_size=1), full)
    half = adapt.attention(doc.repeat(64, 1), 0.5, seed=0, step=0)
    assert (half >= causal_doc).all() and (half <= full).all()
    opened = (half & ~causal_doc).float().sum() / (full & ~causal_doc).float().sum() / 64
    assert 0.4 < float(opened) < 0.6
    assert adapt.anneal_progress(0, 4) == 0 and adapt.anneal_progress(2, 4) == 0.5 and adapt.anneal_progress(9, 4) == 1


def test_step_zero_is_exactly_the_causal_path(base, data, tmp_path):
    """At progress 0 the trainer's loss is LLaDA's loss computed under causal & document attention."""
    cfg = FinetuneConfig(base=str(base), data=[str(data)], out=str(tmp_path / "r"), objective="diffusion",
                         steps=4, anneal_steps=4, batch_size=4, dtype="fp32")
    trainer = FinetuneTrainer(cfg, progress=False)
    assert trainer.anneal_progress(0) == 0 and trainer.anneal_progress(2) == 0.5
    batch = trainer._batch()
    with torch.no_grad():
        loss = trainer.loss(batch, slice(None))
        noised = adapt.step_noise(batch.inputs, batch.targets, batch.doc_ids, trainer.mask_token.id, cfg.seed, 0)
        T = batch.inputs.shape[1]
        dense = (masks.causal() & masks.document(batch.doc_ids)).materialize(torch.arange(T), torch.arange(T),
                                                                              batch_size=batch.inputs.shape[0])
        logits = trainer.raw_model(noised.inputs, positions=batch.positions, mask=dense)
        # Slot j's logits see slots <= j only: hiding everything after j changes nothing.
        logits_cut = trainer.raw_model(noised.inputs[:, :5], positions=batch.positions[:, :5], mask=dense[..., :5, :5])
    torch.testing.assert_close(loss, masked_loss(logits, noised, shift=False))
    torch.testing.assert_close(logits[:, :5], logits_cut, atol=1e-5, rtol=1e-5)


# ---- runs ----------------------------------------------------------------------------------------------------


def test_adapted_hf_folder_records_the_objective_and_keeps_its_weights_for_transformers(base, data, tmp_path, tok):
    import transformers

    result = finetune(base, data=str(data), out=str(tmp_path / "run"), objective="diffusion", steps=6,
                      anneal_steps=3, lr=3e-3, progress=False, dtype="fp32")
    assert result.steps == 6
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    mask_id = tok.vocab_size
    assert saved["model_type"] == "llama" and saved["vocab_size"] == mask_id + 1
    assert saved["decoderlab_objective"] == {"objective": "diffusion", "bidirectional": True, "shift_logits": True,
                                             "mask_token_id": mask_id}
    ours = decoderlab.load(tmp_path / "run", pack=False)
    assert (ours.config.objective, ours.config.bidirectional, ours.config.shift_logits) == ("diffusion", True, True)
    assert decoderlab.Tokenizer.from_folder(tmp_path / "run").mask_id == mask_id
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run").eval()
    ids = torch.tensor([[5, 17, mask_id, 3, 99]])
    with torch.no_grad():  # the same weights: equal logits under transformers' (causal) attention
        torch.testing.assert_close(ours(ids, mask=masks.causal()), hf(ids).logits, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(ours(ids), hf(ids).logits, atol=1e-3)  # by default it attends both ways


def test_a_model_saved_mid_annealing_keeps_causal_attention_by_default(base, data, tmp_path):
    finetune(base, data=str(data), out=str(tmp_path / "mid"), objective="diffusion", steps=3, anneal_steps=10,
             progress=False, dtype="fp32")
    config = decoderlab.read_config(tmp_path / "mid")
    assert (config.objective, config.bidirectional, config.shift_logits) == ("diffusion", False, True)


def test_resume_mid_annealing_is_exact(base, data, tmp_path, monkeypatch):
    common = dict(steps=8, lr=3e-3, dtype="fp32", log_interval=1, eval_interval=4, batch_size=4,
                  objective="diffusion", anneal_steps=6, grad_accum=2)
    finetune(base, data=str(data), out=str(tmp_path / "straight"), progress=False, **common)
    straight = _losses(tmp_path / "straight")
    cfg = FinetuneConfig(base=str(base), data=[str(data)], out=str(tmp_path / "cut"), save_interval=3, **common)
    _interrupt_then_resume(FinetuneTrainer(cfg, progress=False), 4, monkeypatch)
    assert _losses(tmp_path / "cut") == straight and len(straight) == 8
    straight_vals = [json.loads(x).get("val_loss") for x in (tmp_path / "straight" / "metrics.jsonl").read_text()
                     .splitlines()]
    cut_vals = [json.loads(x).get("val_loss") for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert straight_vals == cut_vals


# ---- a real causal model, adapted --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "prose.txt"
    path.write_text(prose(200_000))
    return path


@pytest.fixture(scope="module")
def causal_base(tmp_path_factory, corpus):
    """A small causal char model trained on made-up prose for a few seconds."""
    out = tmp_path_factory.mktemp("causal") / "base"
    decoderlab.train(data=[str(corpus)], tokenizer="char", out=str(out), steps=150, batch_size=16,
                     context_length=64, model=dict(n_layers=2, d_model=64, n_heads=4, d_mlp=128), progress=False,
                     dtype="fp32", sample_tokens=0, eval_interval=150)
    return out


def test_adaptation_lowers_the_held_out_diffusion_loss(causal_base, corpus, tmp_path):
    text = corpus.read_text()
    cut = int(0.9 * len(text))
    chunks = [text[i:i + 48] for i in range(0, cut - 48, 48)][:600]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": c}) + "\n" for c in chunks))
    finetune(str(causal_base), data=str(path), out=str(tmp_path / "adapted"), objective="diffusion", steps=60,
             anneal_steps=30, batch_size=16, lr=2e-3, progress=False, dtype="fp32")

    tok = decoderlab.Tokenizer.from_folder(tmp_path / "adapted")
    held = torch.tensor([tok.encode(text[i:i + 48]) for i in range(cut, cut + 48 * 32, 48)])
    before = decoderlab.load(causal_base, pack=False).eval()
    add_mask_token(before, decoderlab.Tokenizer.from_folder(causal_base))
    after = decoderlab.load(tmp_path / "adapted", pack=False).eval()
    per_token = held.numel() - held.shape[0]  # slot 0 is never predicted

    def nll(model, mask):
        return float(diffusion_nll(model, held, tok.mask_id, samples=8, shift=True, mask=mask).sum()) / per_token

    nll_after = nll(after, None)  # its saved default: full attention
    nll_before = min(nll(before, masks.causal()), nll(before, masks.full()))
    assert nll_after < nll_before - 0.2, (nll_before, nll_after)


# ---- bad input and the CLI ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [0, -3, 1.5])
def test_anneal_steps_must_be_a_positive_count(base, data, bad):
    with pytest.raises(UserError, match="--anneal-steps must be") as info:
        FinetuneConfig(base=str(base), data=[str(data)], objective="diffusion", anneal_steps=bad)
    assert "\n" not in str(info.value)


def test_anneal_steps_and_lora_are_refused_where_they_do_not_apply(base, data):
    with pytest.raises(UserError, match="--anneal-steps is for --objective diffusion"):
        FinetuneConfig(base=str(base), data=[str(data)], anneal_steps=5)
    with pytest.raises(UserError, match="drop --lora-r"):
        FinetuneConfig(base=str(base), data=[str(data)], objective="diffusion", lora_r=4)


def test_a_diffusion_model_without_shift_is_refused(tmp_path, data, tok):
    model = decoderlab.Transformer(decoderlab.ModelConfig(
        vocab_size=tok.vocab_size + 1, n_layers=1, n_heads=2, d_model=16, context_length=64, objective="diffusion",
        bidirectional=True, mask_token_id=tok.vocab_size))
    decoderlab.save(model, tmp_path / "dm", tokenizer=tok)
    with pytest.raises(UserError, match="shift_logits=False") as info:
        finetune(str(tmp_path / "dm"), data=str(data), out=str(tmp_path / "x"), objective="diffusion", steps=1,
                 progress=False)
    assert "\n" not in str(info.value) and not (tmp_path / "x").exists()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "decoderlab", *args], capture_output=True, text=True, timeout=300)


def test_cli_adapts_and_refuses_bad_anneal_steps(base, data, tmp_path):
    out = _cli("finetune", str(base), "--data", str(data), "--objective", "diffusion", "--steps", "2",
               "--anneal-steps", "1", "--out", str(tmp_path / "cli"), "--no-progress", "--dtype", "fp32")
    assert out.returncode == 0, out.stderr
    assert "fine-tuned 2 steps" in out.stdout and "diffusion" in out.stdout
    assert decoderlab.read_config(tmp_path / "cli").bidirectional
    bad = _cli("finetune", str(base), "--data", str(data), "--objective", "diffusion", "--anneal-steps", "0",
               "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: --anneal-steps must be")
    assert len(bad.stderr.strip().splitlines()) == 1
