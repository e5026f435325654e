"""ModelConfig validation, presets and the Hugging Face config.json mapping."""

from __future__ import annotations

import pytest

from decoderlab import PRESETS, ConfigError, ModelConfig


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(d_model=100, n_heads=3), "does not divide d_model"),
    (dict(n_heads=12, n_kv_heads=5), "must divide n_heads"),
    (dict(activation="mish"), "unknown activation 'mish'; choose one of gelu, gelu_tanh, swiglu, relu2"),
    (dict(norm="batchnorm"), "unknown norm"),
    (dict(positions="alibi"), "unknown positions"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(dropout=1.5), "dropout"),
    (dict(positions="rope", head_dim=7, d_model=14, n_heads=2), "even head_dim"),
    (dict(rope_scaling={"factor": 8.0}), "rope_scaling lacks"),
])
def test_nonsense_configs_are_one_line_errors(kwargs, fragment):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_presets():
    assert {"gpt2", "gpt2-medium", "llama-tiny", "char-baby"} <= set(PRESETS)
    baby = ModelConfig.preset("char-baby")
    assert (baby.n_layers, baby.n_heads, baby.d_model, baby.context_length) == (4, 4, 128, 64)
    assert ModelConfig.preset("gpt2", n_layers=2).n_layers == 2
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'; choose one of gpt2"):
        ModelConfig.preset("gpt5")
    with pytest.raises(ConfigError, match="unknown config field"):
        ModelConfig.preset("gpt2", n_layer=2)


@pytest.mark.parametrize("name", ["gpt2", "gpt2-medium", "llama-tiny"])
def test_hf_config_round_trip(name):
    cfg = ModelConfig.preset(name)
    assert ModelConfig.from_hf_config(cfg.to_hf_config()) == cfg


def test_hf_config_reads_v4_rope_layout():
    hf = {"architectures": ["LlamaForCausalLM"], "vocab_size": 10, "hidden_size": 16, "intermediate_size": 32,
          "num_hidden_layers": 1, "num_attention_heads": 2, "rope_theta": 1234.0,
          "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}
    cfg = ModelConfig.from_hf_config(hf)
    assert cfg.rope_theta == 1234.0 and cfg.rope_scaling["factor"] == 8.0 and cfg.n_kv_heads == 2


def test_unsupported_architecture_lists_supported_ones():
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_hf_config({"architectures": ["BertForMaskedLM"]})
    msg = str(err.value)
    assert "BertForMaskedLM" in msg and "LlamaForCausalLM" in msg and "GPT2LMHeadModel" in msg


def test_config_that_does_not_fit_its_family_cannot_be_saved_as_it():
    cfg = ModelConfig.preset("llama-tiny", qk_norm=True)
    with pytest.raises(ConfigError, match="does not fit the llama family: qk_norm"):
        cfg.to_hf_config()
    with pytest.raises(ConfigError, match="no Hugging Face family"):
        ModelConfig.preset("char-baby").to_hf_config()
