"""ModelConfig validation, presets and the Hugging Face config.json mapping."""

from __future__ import annotations

import dataclasses

import pytest

from decoderlab import PRESETS, ConfigError, ModelConfig, hf


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(d_model=100, n_heads=3), "does not divide d_model"),
    (dict(n_heads=12, n_kv_heads=5), "must divide n_heads"),
    (dict(activation="mish"), "unknown activation 'mish'; choose one of gelu, gelu_tanh, swiglu, relu2"),
    (dict(norm="batchnorm"), "unknown norm"),
    (dict(positions="alibi"), "unknown positions"),
    (dict(vocab_size=0), "vocab_size must be a positive integer"),
    (dict(dropout=1.5), "dropout"),
    (dict(branch_drop=1.0), "branch_drop must be in [0, 1)"),
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


# ---- config.json as transformers 5.23 reads it ------------------------------------------------------------

def _llama_like(arch: str = "LlamaForCausalLM", **fields) -> dict:
    return {"architectures": [arch], "vocab_size": 10, "hidden_size": 16, "intermediate_size": 32,
            "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 2, **fields}


@pytest.mark.parametrize("family", hf.FAMILIES)
def test_defaults_are_those_of_the_transformers_config_classes(family):
    transformers = pytest.importorskip("transformers")
    cls = getattr(transformers, {"gpt2": "GPT2Config", "llama": "LlamaConfig", "qwen2": "Qwen2Config",
                                 "mistral": "MistralConfig"}[family])
    declared = {f.name: f.default for f in dataclasses.fields(cls)}
    for name, value in hf.DEFAULTS[family].items():
        if name in declared:
            assert declared[name] == value, name
        else:  # read with getattr(config, name, fallback) by the model: None is the fallback
            assert (name, value) == ("head_dim", None)
    assert hf.FAMILY_ARCHITECTURES[family] == getattr(transformers, cls.__name__.replace("Config", "")
                                                      + ("LMHeadModel" if family == "gpt2" else "ForCausalLM")).__name__


def test_absent_fields_take_the_family_defaults():
    llama = ModelConfig.from_hf_config(_llama_like())
    assert (llama.bias_qkv, llama.bias_mlp, llama.tie_embeddings, llama.context_length) == (False, False, False, 2048)
    assert (llama.norm_eps, llama.bos_token_id, llama.eos_token_id, llama.sliding_window) == (1e-6, 1, 2, None)
    gpt2 = ModelConfig.from_hf_config({"architectures": ["GPT2LMHeadModel"], "vocab_size": 10, "n_embd": 8,
                                       "n_layer": 1, "n_head": 2})
    assert (gpt2.tie_embeddings, gpt2.context_length, gpt2.activation, gpt2.eos_token_id) == (
        True, 1024, "gelu_tanh", 50256)
    # A Mistral config without sliding_window has MistralConfig's 4096; an explicit null has none.
    assert ModelConfig.from_hf_config(_llama_like("MistralForCausalLM")).sliding_window == 4096
    assert ModelConfig.from_hf_config(_llama_like("MistralForCausalLM", sliding_window=None)).sliding_window is None
    # num_key_value_heads: null means as many as the query heads; absent means the class default (Mistral: 8).
    assert ModelConfig.from_hf_config(_llama_like("MistralForCausalLM", num_attention_heads=8,
                                                  num_key_value_heads=None)).kv_heads == 8
    fields = _llama_like("MistralForCausalLM", hidden_size=64, num_attention_heads=16)
    del fields["num_key_value_heads"]
    assert ModelConfig.from_hf_config(fields).kv_heads == 8


def test_family_switches():
    llama = ModelConfig.from_hf_config(_llama_like(attention_bias=True, mlp_bias=True, head_dim=4))
    assert (llama.bias_qkv, llama.bias_attn_out, llama.bias_mlp, llama.dim_head) == (True, True, True, 4)
    qwen2 = ModelConfig.from_hf_config(_llama_like("Qwen2ForCausalLM"))
    assert (qwen2.bias_qkv, qwen2.bias_attn_out, qwen2.bias_mlp) == (True, False, False)
    # Qwen2 without use_sliding_window has no window, whatever sliding_window says.
    qwen2 = ModelConfig.from_hf_config(_llama_like("Qwen2ForCausalLM", sliding_window=4, max_window_layers=0))
    assert qwen2.layer_windows == [None, None, None]
    # use_sliding_window with max_window_layers == num_hidden_layers: every layer full (transformers' default).
    qwen2 = ModelConfig.from_hf_config(_llama_like("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=4,
                                                   max_window_layers=3))
    assert qwen2.layer_windows == [None, None, None] and qwen2.sliding_window is None
    qwen2 = ModelConfig.from_hf_config(_llama_like("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=4,
                                                   max_window_layers=2))
    assert qwen2.layer_windows == [None, None, 4] and qwen2.sliding_layers == [2]
    qwen2 = ModelConfig.from_hf_config(_llama_like("Qwen2ForCausalLM", use_sliding_window=True, sliding_window=4,
                                                   layer_types=["sliding_attention", "attention", "full_attention"]))
    assert qwen2.layer_windows == [4, None, None]


def test_family_from_model_type_and_disagreement():
    fields = _llama_like()
    del fields["architectures"]
    assert ModelConfig.from_hf_config({**fields, "model_type": "qwen2"}).hf_family == "qwen2"
    with pytest.raises(ConfigError, match="architectures 'LlamaForCausalLM' but model_type 'qwen2'"):
        ModelConfig.from_hf_config(_llama_like(model_type="qwen2"))


@pytest.mark.parametrize("fields, fragment", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope type 'linear' is not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0}), "rope type 'yarn' is not supported"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope type 'dynamic' is not supported"),
    (dict(rope_parameters={"rope_type": "longrope"}), "rope type 'longrope' is not supported"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "partial_rotary_factor": 0.5}), "partial_rotary_factor=0.5"),
    (dict(rope_parameters={"rope_type": "llama3", "factor": 8.0}), "lacks 'low_freq_factor'"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    (dict(rms_norm_eps="1e-5"), "'rms_norm_eps' must be a positive number, got '1e-5'"),
    (dict(rms_norm_eps=float("nan")), "'rms_norm_eps' must be a positive number, got nan"),
    (dict(num_hidden_layers=2.5), "'num_hidden_layers' must be a positive integer, got 2.5"),
    (dict(num_hidden_layers=True), "'num_hidden_layers' must be a positive integer, got True"),
    (dict(hidden_size=-16), "'hidden_size' must be a positive integer, got -16"),
    (dict(vocab_size=None), "'vocab_size' must be a positive integer, got None"),
    (dict(tie_word_embeddings="yes"), "'tie_word_embeddings' must be true or false"),
    (dict(eos_token_id="</s>"), "'eos_token_id' must be a token id"),
    (dict(architectures="LlamaForCausalLM"), "'architectures' must be a list"),
])
def test_hostile_hf_fields_are_one_line_errors(fields, fragment):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_hf_config(_llama_like(**fields))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_missing_shape_field_is_named():
    fields = _llama_like()
    del fields["intermediate_size"]
    with pytest.raises(ConfigError, match="lacks 'intermediate_size', which LlamaForCausalLM needs"):
        ModelConfig.from_hf_config(fields)


@pytest.mark.parametrize("fields, fragment", [
    (dict(layer_types=["full_attention"] * 2), "layer_types has 2 entries for num_hidden_layers=3"),
    (dict(layer_types=["chunked_attention"] * 3), "layer_types entry 'chunked_attention' is not supported"),
    (dict(use_sliding_window=True, sliding_window=None, layer_types=["sliding_attention"] * 3),
     "sliding_window is null"),
    (dict(use_sliding_window=False, sliding_window=4, layer_types=["sliding_attention"] * 3),
     "use_sliding_window is false"),
    (dict(use_sliding_window=True, sliding_window=0), "'sliding_window' must be a positive integer or null"),
    (dict(max_window_layers=-1), "'max_window_layers' must be an integer >= 0"),
])
def test_qwen2_window_fields_that_cannot_load(fields, fragment):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_hf_config(_llama_like("Qwen2ForCausalLM", **fields))
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("arch, field", [("LlamaForCausalLM", "attn_logit_softcapping"),
                                         ("LlamaForCausalLM", "final_logit_softcapping"),
                                         ("MistralForCausalLM", "attention_bias"),
                                         ("MistralForCausalLM", "use_sliding_window"),
                                         ("Qwen2ForCausalLM", "mlp_bias")])
def test_fields_transformers_ignores_are_ignored_with_a_warning(arch, field):
    plain = ModelConfig.from_hf_config(_llama_like(arch))
    with pytest.warns(UserWarning, match=f"sets {field}=.*which transformers' {arch} ignores"):
        value = {"use_sliding_window": False}.get(field, True if "bias" in field else 30.0)
        got = ModelConfig.from_hf_config(_llama_like(arch, **{field: value}))
    assert got == plain


def test_llama_ignores_window_fields_as_transformers_does():
    with pytest.warns(UserWarning) as record:
        got = ModelConfig.from_hf_config(_llama_like(layer_types=["sliding_attention"] * 3, sliding_window=4))
    assert got.layer_windows == [None] * 3
    assert {str(w.message).split("=")[0] for w in record} == {"config.json sets layer_types",
                                                             "config.json sets sliding_window"}


@pytest.mark.parametrize("windows", [[None, None, None], [4, 4, 4], [None, 4, 4], [4, None, 4]])
def test_qwen2_windows_round_trip_through_transformers_config(windows):
    transformers = pytest.importorskip("transformers")
    sliding = [i for i, w in enumerate(windows) if w is not None]
    cfg = ModelConfig.from_hf_config(_llama_like("Qwen2ForCausalLM")).replace(
        sliding_window=4 if sliding else None, sliding_layers=sliding or None)
    assert cfg.layer_windows == windows
    out = cfg.to_hf_config()
    assert ModelConfig.from_hf_config(out) == cfg
    theirs = transformers.Qwen2Config(**{k: v for k, v in out.items() if k != "architectures"})
    assert [w if t == "sliding_attention" else None for t, w in
            zip(theirs.layer_types, [theirs.sliding_window] * 3, strict=True)] == windows


@pytest.mark.parametrize("kwargs, fragment", [
    (dict(sliding_window=4, sliding_layers=[12]), "sliding_layers must list distinct layer indices in [0, 12)"),
    (dict(sliding_layers=[1]), "sliding_layers is set but sliding_window is None"),
    (dict(sliding_window=4, sliding_layers=[]), "sliding_layers=[] slides no layer"),
    (dict(sliding_window=4, sliding_layers=[1, 1]), "distinct layer indices"),
    (dict(norm_eps="1e-5"), "norm_eps must be a finite number, got '1e-5'"),
    (dict(n_layers=2.0), "n_layers must be a positive integer, got 2.0"),
    (dict(d_model=True), "d_model must be a positive integer, got True"),
    (dict(n_kv_heads="2"), "n_kv_heads must be a positive integer or None"),
    (dict(bias_qkv="no"), "bias_qkv must be true or false"),
    (dict(activation=["gelu"]), "unknown activation ['gelu']"),
    (dict(eos_token_id=[1, "x"]), "eos_token_id must be a token id"),
])
def test_model_config_field_types(kwargs, fragment):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**kwargs)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_sliding_layers_spellings():
    cfg = ModelConfig(n_layers=3, sliding_window=4, sliding_layers=(2, 0))
    assert cfg.sliding_layers == [0, 2] and cfg.layer_windows == [4, None, 4]
    assert ModelConfig(n_layers=3, sliding_window=4, sliding_layers=[0, 1, 2]) == ModelConfig(n_layers=3,
                                                                                              sliding_window=4)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="must be a JSON object"):
        ModelConfig.from_dict(["n_layers", 3])
