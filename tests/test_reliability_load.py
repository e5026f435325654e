"""Reliability battery, loading: hostile config.json files and weight files, each a one-line `UserError` from
`decoderlab.load` and `error: ...` with exit code 2 from the CLI (`decoderlab info`, which checks the same
headers; `decoderlab generate` for damage only the data shows), never a traceback."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import decoderlab
from decoderlab import UserError, cli


def _copy(hf_folder, case, tmp_path):
    return shutil.copytree(hf_folder(case), tmp_path / "m")


def _edit_config(folder, edit):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _edit_weights(folder, edit):
    state = load_file(folder / "model.safetensors")
    edit(state)
    save_file(state, folder / "model.safetensors")


def _set(key, value):
    return lambda data: data.__setitem__(key, value)


def _drop(key):
    return lambda data: data.pop(key)


def _retype(name, dtype):
    return lambda state: state.__setitem__(name, state[name].to(dtype))


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def _as_bin(folder, state_of=lambda state: state, keep: float = 1.0):
    """Replace the folder's safetensors by a pytorch_model.bin of `state_of(its tensors)`, cut to `keep`."""
    state = state_of(load_file(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    data = (folder / "pytorch_model.bin").read_bytes()
    (folder / "pytorch_model.bin").write_bytes(data[:int(len(data) * keep)])


LLAMA_DOWN = "model.layers.1.mlp.down_proj.weight"
LLAMA_EMBED = "model.embed_tokens.weight"

# (case, what to do to the folder, fragment the one-line message must hold). Each message also names the file.
CASES = {
    "config-array": ("llama", lambda f: (f / "config.json").write_text("[]"),
                     "must hold a JSON object of fields, not an array"),
    "config-null": ("llama", lambda f: (f / "config.json").write_text("null"), "not null"),
    "config-string": ("llama", lambda f: (f / "config.json").write_text('"llama"'), "not a string"),
    "config-number": ("llama", lambda f: (f / "config.json").write_text("42"), "not a number"),
    "config-not-json": ("llama", lambda f: (f / "config.json").write_text('{"architectures": ['), "is not valid JSON"),
    "config-deeply-nested": ("llama", lambda f: (f / "config.json").write_text("[" * 100_000 + "]" * 100_000),
                             "nested too deeply"),
    "config-not-utf8": ("llama", lambda f: (f / "config.json").write_bytes(b'{"a": "\xff"}'), "is not valid JSON"),
    "norm-eps-string": ("llama", lambda f: _edit_config(f, _set("rms_norm_eps", "1e-5")),
                        "'rms_norm_eps' must be a positive number, got '1e-5'"),
    "layers-float": ("llama", lambda f: _edit_config(f, _set("num_hidden_layers", 2.0)),
                     "'num_hidden_layers' must be a positive integer, got 2.0"),
    "width-negative": ("qwen2", lambda f: _edit_config(f, _set("hidden_size", -48)),
                       "'hidden_size' must be a positive integer, got -48"),
    "vocab-missing": ("mistral", lambda f: _edit_config(f, _drop("vocab_size")),
                      "lacks 'vocab_size', which MistralForCausalLM needs"),
    "gpt2-layers-missing": ("gpt2", lambda f: _edit_config(f, _drop("n_layer")), "lacks 'n_layer'"),
    "architecture-mismatch": ("llama", lambda f: _edit_config(f, _set("model_type", "gpt2")),
                              "but model_type 'gpt2'"),
    "architectures-not-list": ("llama", lambda f: _edit_config(f, _set("architectures", "LlamaForCausalLM")),
                               "'architectures' must be a list"),
    "rope-yarn": ("llama", lambda f: _edit_config(f, _set("rope_parameters", {"rope_type": "yarn", "factor": 4.0})),
                  "rope type 'yarn' is not supported"),
    "qwen2-sliding-without-window": (
        "qwen2", lambda f: _edit_config(f, _set("layer_types", ["sliding_attention", "full_attention"])),
        "layer_types makes layer 0 sliding_attention but use_sliding_window is false"),
    "native-without-fields": ("native", lambda f: _edit_config(f, _drop("decoderlab")),
                              "has no 'decoderlab' object of model fields"),
    "native-field-type": ("native", lambda f: _edit_config(f, lambda d: d["decoderlab"].update(n_layers="two")),
                          "n_layers must be a positive integer, got 'two'"),
    "int8-tensor": ("llama", lambda f: _edit_weights(f, _retype(LLAMA_DOWN, torch.int8)),
                    "is int8; decoderlab loads float32, bfloat16 and float16 weights"),
    "int16-tensor": ("qwen2", lambda f: _edit_weights(f, _retype("model.norm.weight", torch.int16)), "is int16"),
    "bool-tensor": ("gpt2", lambda f: _edit_weights(f, _retype("transformer.ln_f.bias", torch.bool)), "is bool"),
    "complex-tensor": ("mistral", lambda f: _edit_weights(f, _retype("lm_head.weight", torch.complex64)),
                       "is complex64"),
    "shape-mismatch": ("llama", lambda f: _edit_weights(f, lambda s: s.__setitem__(LLAMA_DOWN, torch.zeros(48, 81))),
                       "has shape (48, 81)"),
    "vocab-disagrees-with-embedding": ("llama", lambda f: _edit_config(f, _set("vocab_size", 120)),
                                       "config.json's vocab_size is 120"),
    "missing-tensor": ("qwen2", lambda f: _edit_weights(f, lambda s: s.pop("model.layers.0.self_attn.k_proj.bias")),
                       "'model.layers.0.self_attn.k_proj.bias' (for blocks.0.attn.qkv.bias) is missing"),
    "truncated-safetensors": ("gpt2", lambda f: (f / "model.safetensors").write_bytes(
        (f / "model.safetensors").read_bytes()[:300]), "is truncated or corrupt"),
    "bin-pickle-runs-code": ("llama", lambda f: _as_bin(f, lambda s: {**s, "x": _RunsCode()}),
                             "holds Python objects besides tensors"),
    "bin-truncated": ("llama", lambda f: _as_bin(f, keep=0.5), "pytorch_model.bin is truncated or corrupt"),
    "shard-index-not-a-map": ("mistral-sharded", lambda f: (f / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": ["model-00001-of-00002.safetensors"]})), "'weight_map' must map tensor names"),
    "shard-outside-folder": ("mistral-sharded", lambda f: (f / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {LLAMA_EMBED: "../model.safetensors"}})),
        "lists shard '../model.safetensors', a path outside the folder"),
}


@pytest.fixture
def folder_for(hf_folder, tmp_path):
    def build(case: str):
        if case == "native":
            model = decoderlab.Transformer(decoderlab.ModelConfig.preset("char-baby", n_layers=1))
            return decoderlab.save(model, tmp_path / "m")
        if case == "mistral-sharded":
            return shutil.copytree(hf_folder("mistral", sharded=True), tmp_path / "m")
        return _copy(hf_folder, case, tmp_path)

    return build


def _cli(capsys, *args: str) -> str:
    """Run the CLI in-process as `decoderlab ...`; any exception other than SystemExit(2) fails the test."""
    capsys.readouterr()  # drop what building the folder printed
    argv = sys.argv
    sys.argv = ["decoderlab", *args]
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.main()
    finally:
        sys.argv = argv
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, err
    assert out == ""  # nothing printed, and nothing a hostile file could make run
    return err


@pytest.mark.parametrize("name", list(CASES))
def test_bad_folder_is_one_line_error(folder_for, capsys, name):
    case, damage, fragment = CASES[name]
    folder = folder_for(case)
    damage(folder)
    with pytest.raises(UserError) as err:
        decoderlab.load(folder)
    message = str(err.value)
    assert fragment in message and "\n" not in message, message
    assert str(folder) in message
    assert "this ran while loading" not in capsys.readouterr().out
    err_text = _cli(capsys, "info", str(folder))
    assert err_text == f"error: {message}\n"


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_weight_is_refused_unless_asked(folder_for, value):
    folder = folder_for("llama")

    def poison(state):
        state[LLAMA_DOWN][-1, -1] = value  # the very last value: the check must read every one

    _edit_weights(folder, poison)
    with pytest.raises(decoderlab.CheckpointError) as err:
        decoderlab.load(folder)
    assert str(err.value) == (f"weight '{LLAMA_DOWN}' in {folder} holds NaN or infinite values; the checkpoint "
                              "is damaged (load(..., check_finite=False) loads it anyway)")
    model = decoderlab.load(folder, check_finite=False)
    assert not model.blocks[1].mlp.down.weight.isfinite().all()


def test_overflow_on_cast_is_named(folder_for):
    folder = folder_for("llama")
    _edit_weights(folder, lambda s: s[LLAMA_EMBED].__setitem__((0, 0), 1e6))
    decoderlab.load(folder)  # fine in float32
    with pytest.raises(decoderlab.CheckpointError, match=f"'{LLAMA_EMBED}' .* overflows float16"):
        decoderlab.load(folder, dtype="float16")


def test_cli_generate_refuses_nan_weights(tmp_path):
    tok = decoderlab.Tokenizer.train_char(texts=["hello world"])
    model = decoderlab.Transformer(decoderlab.ModelConfig.preset("char-baby", vocab_size=tok.vocab_size, n_layers=1))
    with torch.no_grad():
        model.blocks[0].attn.out.weight[3, 4] = float("nan")
    folder = decoderlab.save(model, tmp_path / "m", tokenizer=tok)
    out = subprocess.run([sys.executable, "-m", "decoderlab", "generate", str(folder), "hello", "-n", "3"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert out.stderr.count("\n") == 1 and out.stderr.startswith("error: weight 'blocks.0.attn.out.weight'")
    assert "NaN" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("name", ["config-array", "int8-tensor"])
def test_real_cli_process(folder_for, name):
    """The same refusals through a real `python -m decoderlab info` process: exit 2, one line, no traceback."""
    case, damage, fragment = CASES[name]
    folder = folder_for(case)
    damage(folder)
    out = subprocess.run([sys.executable, "-m", "decoderlab", "info", str(folder)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stderr.startswith("error: ") and out.stderr.count("\n") == 1
    assert fragment in out.stderr and "Traceback" not in out.stderr
