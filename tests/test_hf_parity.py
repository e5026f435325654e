"""Logits parity with transformers: load HF folders, save folders transformers loads, padded batches."""

from __future__ import annotations

import pytest
import torch
from conftest import HF_CASES

import decoderlab
from decoderlab import masks

transformers = pytest.importorskip("transformers")
TOL = 1e-4


def _hf_logits(model, ids, attention_mask=None, position_ids=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids).logits


def _hf_load(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


@pytest.mark.parametrize("sharded", [False, True], ids=["single", "sharded"])
@pytest.mark.parametrize("case", list(HF_CASES))
def test_load_matches_transformers(hf_folder, case, sharded):
    folder = hf_folder(case, sharded)
    ref = _hf_load(folder)
    ours = decoderlab.load(folder)
    assert ours.config.hf_family == ref.config.model_type
    assert ours.num_params() == sum(p.numel() for p in ref.parameters())
    ids = torch.randint(0, ref.config.vocab_size, (3, 37), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = ours(ids)
    assert (got - _hf_logits(ref, ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("case", list(HF_CASES))
def test_saved_folder_loads_in_transformers(hf_folder, tmp_path, case):
    ours = decoderlab.load(hf_folder(case))
    decoderlab.save(ours, tmp_path / "out")
    ref = _hf_load(tmp_path / "out")
    ids = torch.randint(0, ref.config.vocab_size, (2, 21), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = ours(ids)
    assert (got - _hf_logits(ref, ids)).abs().max().item() <= TOL
    again = decoderlab.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(again(ids), got)


@pytest.mark.parametrize("case", ["gpt2", "llama", "qwen2", "mistral"])
def test_left_padded_batch_matches_transformers(hf_folder, case):
    folder = hf_folder(case)
    ref = _hf_load(folder)
    ours = decoderlab.load(folder)
    lengths = [13, 5, 9]
    T = max(lengths)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, ref.config.vocab_size, (len(lengths), T), generator=g)
    valid = torch.zeros(len(lengths), T, dtype=torch.bool)
    for row, n in enumerate(lengths):
        valid[row, T - n:] = True
    ids = ids.masked_fill(~valid, 0)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    expected = _hf_logits(ref, ids, attention_mask=valid.long(), position_ids=positions)
    with torch.no_grad():
        got = ours(ids, positions=positions, mask=masks.causal() & masks.padding(valid))
    assert (got - expected)[valid].abs().max().item() <= TOL
    # Each row alone, unpadded, gives the same logits as inside the padded batch.
    for row, n in enumerate(lengths):
        with torch.no_grad():
            alone = ours(ids[row:row + 1, T - n:])
        assert (alone[0] - got[row, T - n:]).abs().max().item() <= TOL


def test_pytorch_bin_checkpoint(tmp_path, hf_folder):
    ref = _hf_load(hf_folder("llama"))
    state = ref.state_dict()
    torch.save(state, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text((hf_folder("llama") / "config.json").read_text())
    ours = decoderlab.load(tmp_path)
    ids = torch.randint(0, ref.config.vocab_size, (2, 11))
    with torch.no_grad():
        assert (ours(ids) - _hf_logits(ref, ids)).abs().max().item() <= TOL


def test_load_dtype_and_no_extra_copies(hf_folder):
    ours = decoderlab.load(hf_folder("qwen2"), dtype="bfloat16")
    assert ours.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert not any(p.is_meta for p in ours.parameters())
    assert ours.lm_head.weight is ours.embed.weight  # tied embeddings stay one tensor
