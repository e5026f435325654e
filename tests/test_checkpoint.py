"""Checkpoint folders: our own format, presets, and each kind of bad input as a one-line error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import decoderlab
from decoderlab import CheckpointError, ConfigError, ModelConfig, Transformer
from decoderlab import checkpoint as ckpt


def _one_line(err) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_native_variant_round_trip_and_preset(tmp_path):
    cfg = ModelConfig.preset("char-baby", positions="rope", qk_norm=True, activation="relu2", norm="rmsnorm")
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    decoderlab.save(model, tmp_path / "run")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["architectures"] == ["DecoderlabForCausalLM"]
    again = decoderlab.load(tmp_path / "run")
    assert again.config == cfg
    ids = torch.randint(0, 65, (2, 20))
    with torch.no_grad():
        assert torch.equal(again(ids), model(ids))
    assert decoderlab.load("gpt2-medium", dtype="bf16").dtype == torch.bfloat16


def test_save_with_tokenizer_and_shards(tmp_path):
    tok = decoderlab.Tokenizer.train_char(texts=["hello world"])
    model = Transformer(ModelConfig.preset("llama-tiny", vocab_size=tok.vocab_size, n_layers=2))
    out = decoderlab.save(model, tmp_path / "m", tokenizer=tok, max_shard_size=200_000)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors.index.json", "tokenizer.json"} <= names
    assert not any(n.startswith(".save-") for n in names)
    decoderlab.save(model, out)  # re-saving unsharded removes the stale shards
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and not any(n.startswith("model-0") for n in names)
    assert decoderlab.Tokenizer.from_folder(out).encode("hello") == tok.encode("hello")


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError) as err:
        decoderlab.load(tmp_path)
    assert "has no config.json" in _one_line(err)
    with pytest.raises(CheckpointError) as err:
        decoderlab.load(tmp_path / "nope")
    assert "not a folder" in _one_line(err) and "gpt2" in str(err.value)


def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["T5ForConditionalGeneration"]}))
    with pytest.raises(ConfigError) as err:
        decoderlab.load(tmp_path)
    msg = _one_line(err)
    for name in ("T5ForConditionalGeneration", "GPT2LMHeadModel", "LlamaForCausalLM", "Qwen2ForCausalLM",
                 "MistralForCausalLM"):
        assert name in msg


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _rewrite_weights(folder, edit):
    from safetensors.torch import load_file, save_file

    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def test_weight_of_wrong_shape(hf_folder, tmp_path):
    folder = _copy(hf_folder("llama"), tmp_path / "m")
    name = "model.layers.1.mlp.down_proj.weight"
    _rewrite_weights(folder, lambda s: s.__setitem__(name, torch.zeros(48, 81)))
    with pytest.raises(CheckpointError) as err:
        decoderlab.load(folder)
    msg = _one_line(err)
    assert name in msg and "(48, 81)" in msg and "(48, 80)" in msg


def test_missing_weight(hf_folder, tmp_path):
    folder = _copy(hf_folder("qwen2"), tmp_path / "m")
    name = "model.layers.0.self_attn.k_proj.bias"
    _rewrite_weights(folder, lambda s: s.pop(name))
    with pytest.raises(CheckpointError) as err:
        decoderlab.load(folder)
    assert name in _one_line(err) and "missing" in str(err.value)


@pytest.mark.parametrize("keep", [0.5, 0.001])
def test_truncated_safetensors(hf_folder, tmp_path, keep):
    folder = _copy(hf_folder("gpt2"), tmp_path / "m")
    path = folder / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: max(1, int(len(data) * keep))])
    with pytest.raises(CheckpointError) as err:
        decoderlab.load(folder)
    assert "truncated or corrupt" in _one_line(err) and "model.safetensors" in str(err.value)


def test_missing_shard(hf_folder, tmp_path):
    folder = _copy(hf_folder("mistral", sharded=True), tmp_path / "m")
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="shard model-00002"):
        decoderlab.load(folder)


def test_failed_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model = Transformer(ModelConfig.preset("char-baby"))
    folder = decoderlab.save(model, tmp_path / "run")
    before = (folder / "model.safetensors").read_bytes()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "save_file", disk_full)
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    with pytest.raises(CheckpointError) as err:
        decoderlab.save(model, folder)
    assert "No space left on device" in _one_line(err) and "unchanged" in str(err.value)
    assert (folder / "model.safetensors").read_bytes() == before
    assert not any(p.name.startswith(".save-") for p in folder.iterdir())
    decoderlab.load(folder)


def test_unwritable_destination(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(CheckpointError, match="cannot create"):
        decoderlab.save(Transformer(ModelConfig.preset("char-baby")), blocker / "sub")
