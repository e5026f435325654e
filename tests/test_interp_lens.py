"""The logit lens: its last row is the model's output exactly, its first is the embeddings read by the LM head,
top-k / target ranks agree with the full logits, translators plug in, bad input is a one-line error."""

from __future__ import annotations

import json

import pytest
import torch

import decoderlab
from decoderlab import interp, masks
from decoderlab.errors import UserError


def _model(**kw) -> decoderlab.Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=60, d_model=32, n_layers=3, n_heads=4, context_length=64) | kw
    return decoderlab.Transformer(decoderlab.ModelConfig(**cfg)).eval()


@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_last_row_is_the_models_logits_exactly(hf_folder, case):
    model = decoderlab.load(hf_folder(case))
    ids = torch.randint(0, 90, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits = model(ids)
    lens = interp.logit_lens(model, ids, top_k=4)
    assert len(lens.labels) == model.config.n_layers + 1 and lens.labels[0] == "embed"
    assert torch.equal(lens.logits(-1), logits)
    top_p, top_i = logits.float().softmax(-1).topk(4, dim=-1)
    assert torch.equal(lens.top_ids[-1], top_i) and torch.allclose(lens.top_probs[-1], top_p)


def test_first_row_reads_the_embeddings_and_a_padded_batch_matches_its_rows():
    model = _model(positions="rope", norm="rmsnorm")
    ids = torch.randint(1, 60, (1, 7), generator=torch.Generator().manual_seed(1))
    lens = interp.logit_lens(model, ids)
    with torch.no_grad():
        expected = model.lm_head(model.final_norm(model.embed(ids)))
    assert torch.allclose(lens.logits(0), expected, atol=1e-6)
    # Left-pad the same row by 3 tokens: with its positions and padding mask the lens reads the same values.
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], dim=1)
    valid = torch.arange(10)[None] >= 3
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    lp = interp.logit_lens(model, padded, positions=positions, mask=masks.causal() & masks.padding(valid),
                           pos_slice=slice(3, None))
    for row in range(len(lens.labels)):
        assert torch.allclose(lp.logits(row), lens.logits(row), atol=1e-5)
    assert torch.equal(lp.top_ids, lens.top_ids)


def test_target_probabilities_and_ranks_agree_with_the_full_logits():
    model = _model()
    ids = torch.randint(0, 60, (2, 8), generator=torch.Generator().manual_seed(2))
    lens = interp.logit_lens(model, ids, top_k=3, target="next")
    assert lens.target_ids.shape == (2, 8) and (lens.target_ids[:, -1] == -1).all()
    assert torch.equal(lens.target_ids[:, :-1], ids[:, 1:])
    for row in range(len(lens.labels)):
        probs = lens.logits(row).float().softmax(-1)
        for b in range(2):
            for p in range(7):
                t = int(ids[b, p + 1])
                order = probs[b, p].argsort(descending=True).tolist()
                assert int(lens.target_ranks[row, b, p]) == order.index(t)
                assert float(lens.target_probs[row, b, p]) == pytest.approx(float(probs[b, p, t]), abs=1e-6)
    assert torch.isnan(lens.target_probs[:, :, -1]).all() and (lens.target_ranks[:, :, -1] == -1).all()
    fixed = interp.logit_lens(model, ids, target=5, pos_slice=[0, -1])
    assert fixed.positions.tolist() == [0, 7] and (fixed.target_ids == 5).all()


def test_translators_are_applied_before_the_final_norm():
    model = _model()
    ids = torch.randint(0, 60, (1, 6), generator=torch.Generator().manual_seed(4))
    plain = interp.logit_lens(model, ids)
    identity = torch.nn.Linear(32, 32)
    with torch.no_grad():
        identity.weight.copy_(torch.eye(32))
        identity.bias.zero_()
    same = interp.logit_lens(model, ids, translators=[identity] * 4)
    assert torch.allclose(same.logits(1), plain.logits(1), atol=1e-5)
    # A translator standing in for "the rest of the network" makes row 0 read like the final row.
    final = plain.resid[-1]
    moved = interp.logit_lens(model, ids, translators={0: lambda h: final})
    assert torch.equal(moved.top_ids[0], plain.top_ids[-1])
    assert torch.equal(moved.top_ids[1:], plain.top_ids[1:])


def test_to_json_is_json_with_tokens_and_targets():
    model = _model()
    tok = decoderlab.Tokenizer.train_char(texts=["abcdefghij klmnopqrstuvwxyz"])
    model = _model(vocab_size=tok.vocab_size)
    ids = tok.encode("hello world")
    lens = interp.logit_lens(model, ids, top_k=2, target="next")
    data = json.loads(json.dumps(lens.to_json(tok)))
    assert data["layers"] == ["embed", "0", "1", "2"]
    row = data["rows"][0]
    assert "".join(row["tokens"]) == "hello world"
    assert len(row["top"]) == 4 and len(row["top"][0]) == len(ids) and len(row["top"][0][0]) == 2
    assert row["target"]["tokens"][0] == "e" and row["target"]["probs"][0][-1] is None


def test_bad_input_is_a_user_error():
    model = _model()
    ids = torch.randint(0, 60, (1, 5))
    for kwargs in (dict(top_k=0), dict(top_k=61), dict(target="previous"), dict(target=torch.zeros(3, 3)),
                   dict(target=60), dict(pos_slice=[9]), dict(pos_slice=slice(4, 2)), dict(translators=[None])):
        with pytest.raises(UserError):
            interp.logit_lens(model, ids, **kwargs)
    with pytest.raises(UserError):
        interp.logit_lens(model, ids).logits(4)
