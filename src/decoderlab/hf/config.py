"""Hugging Face `config.json` <-> `ModelConfig`, field by field as transformers 5.23 reads each family.

transformers builds a model from its config class: a field the file leaves out takes the class's default,
and some switches depend on others (Qwen2's `use_sliding_window` gates `sliding_window`, and `layer_types`,
which defaults from `max_window_layers`, says which layers use it). This module reproduces those rules, so a
folder loads with the logits transformers gives it, and writes config.json files transformers reads back as
the same model.

Conventions:
- The family comes from `architectures` (or `model_type` where `architectures` is absent); the two must
  agree. Nothing is switched on a model's name.
- Every value read is type-checked; a wrong type, a missing shape field or a switch decoderlab cannot honour
  is a one-line `ConfigError` naming the field.
- A field the family's transformers class does not read (an `attn_logit_softcapping` in a Llama config) is
  ignored, as transformers ignores it, with a warning naming it: the logits stay those of transformers.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

from ..config import HF_FAMILIES, ModelConfig
from ..errors import ConfigError

# The Hugging Face families whose config.json and weights decoderlab maps, keyed by `architectures[0]`.
ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
# And back: the `architectures` entry written for each family (whose `model_type` is the family's name).
FAMILY_ARCHITECTURES = {family: arch for arch, family in ARCHITECTURES.items()}
FAMILIES = HF_FAMILIES  # the values ModelConfig.hf_family takes; one architecture each

# transformers 5.23's defaults (the config classes' field defaults) for the fields decoderlab reads, used
# where config.json leaves one out. tests/test_config.py checks them against the installed transformers.
DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": dict(n_positions=1024, n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                 initializer_range=0.02, tie_word_embeddings=True, scale_attn_weights=True,
                 scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False, bos_token_id=50256,
                 eos_token_id=50256),
    "llama": dict(num_key_value_heads=None, head_dim=None, hidden_act="silu", max_position_embeddings=2048,
                  initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False,
                  mlp_bias=False, bos_token_id=1, eos_token_id=2),
    "qwen2": dict(num_key_value_heads=32, head_dim=None, hidden_act="silu", max_position_embeddings=32768,
                  initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                  sliding_window=4096, max_window_layers=28, layer_types=None, bos_token_id=None,
                  eos_token_id=None),
    "mistral": dict(num_key_value_heads=8, head_dim=None, hidden_act="silu", max_position_embeddings=131072,
                    initializer_range=0.02, rms_norm_eps=1e-6, tie_word_embeddings=False, sliding_window=4096,
                    bos_token_id=1, eos_token_id=2),
}
# GPT2Config's attribute_map: a GPT-2 config.json may use the common names instead.
_GPT2_ALIASES = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers", "n_head": "num_attention_heads",
                 "n_positions": "max_position_embeddings"}
_GPT2_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                     "gelu_fast": "gelu_tanh"}
# Fields of other architectures that a family's transformers class never reads: set to something other than
# the "off" value here, they are ignored by transformers and by decoderlab alike, with a warning.
_FOREIGN = {"attn_logit_softcapping": None, "final_logit_softcapping": None, "query_pre_attn_scalar": None,
            "logits_scaling": None, "embedding_multiplier": None, "residual_multiplier": None,
            "attention_multiplier": None, "use_qk_norm": False, "qk_layernorm": False}
_FOREIGN_BY_FAMILY = {
    "gpt2": {},
    "llama": {"sliding_window": None, "use_sliding_window": False, "layer_types": None},
    # Mistral applies sliding_window whatever use_sliding_window says: only `false` would mislead.
    "mistral": {"attention_bias": False, "mlp_bias": False, "use_sliding_window": True, "layer_types": None},
    "qwen2": {"mlp_bias": False},  # its attention_bias is ignored too, but q/k/v have biases: no surprise
}
_LAYER_TYPES = {"full_attention": False, "sliding_attention": True, "attention": False}  # "attention": legacy


def family_of(data: dict[str, Any]) -> str:
    """The family of a config.json dict: from `architectures`, checked against `model_type`."""
    archs = data.get("architectures")
    model_type = data.get("model_type")
    if archs is not None and (not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)):
        raise ConfigError(f"config.json field 'architectures' must be a list of class names, got {_show(archs)}")
    supported = ", ".join(ARCHITECTURES)
    if archs:
        if archs[0] not in ARCHITECTURES:
            raise ConfigError(f"config.json has architecture {_show(archs[0])}; supported: {supported}")
        family = ARCHITECTURES[archs[0]]
        if model_type is not None and model_type != family:
            raise ConfigError(f"config.json says architectures {archs[0]!r} but model_type {_show(model_type)} "
                              f"(transformers builds by model_type); make them agree ({family!r})")
        return family
    if isinstance(model_type, str) and model_type in FAMILY_ARCHITECTURES:
        return model_type
    found = f"model_type {_show(model_type)}" if model_type is not None else "no 'architectures' entry"
    raise ConfigError(f"config.json has {found}; supported: {supported}")


def from_hf_config(data: dict[str, Any]) -> ModelConfig:
    """The `ModelConfig` transformers 5.23 would build from config.json `data`."""
    if not isinstance(data, dict):
        raise ConfigError(f"config.json must hold a JSON object, got {type(data).__name__}")
    family = family_of(data)
    fields = _Fields(data, family)
    _warn_foreign(data, family)
    common = dict(hf_family=family, init_std=fields.number("initializer_range", positive=False),
                  bos_token_id=fields.token_ids("bos_token_id", many=False),
                  eos_token_id=fields.token_ids("eos_token_id", many=True), **_objective_fields(data))
    if family == "gpt2":
        return _gpt2(fields, common)
    return _llama_like(fields, family, common)


# A masked (MLM or diffusion) model saved in a Hugging Face family keeps its objective under this key;
# transformers ignores it (and would run the weights as a causal LM).
OBJECTIVE_KEY = "decoderlab_objective"
_OBJECTIVE_FIELDS = ("objective", "bidirectional", "shift_logits", "mask_token_id")


def _objective_fields(data: dict[str, Any]) -> dict[str, Any]:
    record = data.get(OBJECTIVE_KEY)
    if record is None:
        return {}
    if not isinstance(record, dict) or set(record) - set(_OBJECTIVE_FIELDS):
        raise ConfigError(f"config.json field {OBJECTIVE_KEY!r} must be an object with some of "
                          f"{', '.join(_OBJECTIVE_FIELDS)}, got {_show(record)}")
    return dict(record)


def _gpt2(f: _Fields, common: dict[str, Any]) -> ModelConfig:
    for flag, supported in (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
                            ("scale_attn_weights", True)):
        if f.flag(flag) != supported:
            raise ConfigError(f"GPT-2 config sets {flag}={str(not supported).lower()}, which decoderlab does not "
                              "support")
    act = f.text("activation_function")
    if act not in _GPT2_ACTIVATIONS:
        raise ConfigError(f"GPT-2 activation_function {act!r} is not supported; use one of "
                          f"{', '.join(_GPT2_ACTIVATIONS)}")
    return ModelConfig(
        vocab_size=f.integer("vocab_size"), n_layers=f.integer("n_layer"), n_heads=f.integer("n_head"),
        d_model=f.integer("n_embd"), d_mlp=f.integer("n_inner", nullable=True),
        context_length=f.integer("n_positions"), norm="layernorm", norm_eps=f.number("layer_norm_epsilon"),
        norm_bias=True, positions="learned",
        activation=_GPT2_ACTIVATIONS[act], bias_qkv=True, bias_attn_out=True, bias_mlp=True,
        tie_embeddings=f.flag("tie_word_embeddings"), **common)


def _llama_like(f: _Fields, family: str, common: dict[str, Any]) -> ModelConfig:
    arch = FAMILY_ARCHITECTURES[family]
    act = f.text("hidden_act")
    if act not in ("silu", "swish"):
        raise ConfigError(f"{arch} hidden_act {act!r} is not supported; decoderlab maps silu (SwiGLU)")
    n_layers, n_heads = f.integer("num_hidden_layers"), f.integer("num_attention_heads")
    d_model = f.integer("hidden_size")
    # null means "as many as query heads" (the classes' __post_init__); absent means the class default.
    n_kv = f.integer("num_key_value_heads", nullable=True)
    head_dim = f.integer("head_dim", nullable=True)
    if head_dim is not None and n_heads * head_dim == d_model:
        head_dim = None  # the default; keeps configs comparable
    theta, scaling = _rope(f)
    if family == "llama":
        bias_qkv = bias_out = f.flag("attention_bias")
        bias_mlp = f.flag("mlp_bias")
    else:  # Qwen2: biases on q, k, v only; Mistral: none (whatever the file says)
        bias_qkv, bias_out, bias_mlp = family == "qwen2", False, False
    window, sliding = None, None
    if family == "mistral":
        window = f.integer("sliding_window", nullable=True)
    elif family == "qwen2":
        window, sliding = _qwen2_windows(f, n_layers)
    return ModelConfig(
        vocab_size=f.integer("vocab_size"), n_layers=n_layers, n_heads=n_heads, d_model=d_model,
        n_kv_heads=n_heads if n_kv is None else n_kv, d_mlp=f.integer("intermediate_size"), head_dim=head_dim,
        context_length=f.integer("max_position_embeddings"), norm="rmsnorm", norm_eps=f.number("rms_norm_eps"),
        norm_bias=False, positions="rope", rope_theta=theta, rope_scaling=scaling, activation="swiglu",
        bias_qkv=bias_qkv, bias_attn_out=bias_out, bias_mlp=bias_mlp, tie_embeddings=f.flag("tie_word_embeddings"),
        sliding_window=window, sliding_layers=sliding, **common)


def _qwen2_windows(f: _Fields, n_layers: int) -> tuple[int | None, list[int] | None]:
    """(sliding_window, sliding_layers) as Qwen2Config and Qwen2Attention decide them.

    Qwen2Config drops `sliding_window` unless `use_sliding_window`; a layer slides iff its `layer_types` entry
    is "sliding_attention", and `layer_types` defaults to sliding for layers >= `max_window_layers` when a
    window is left. So use_sliding_window=true with max_window_layers == num_hidden_layers slides nowhere.
    """
    window = f.integer("sliding_window", nullable=True)
    if not f.flag("use_sliding_window"):
        window = None
    types = f.data.get("layer_types")
    if types is None:
        first = f.integer("max_window_layers", minimum=0)
        sliding = [i for i in range(n_layers) if window is not None and i >= first]
    else:
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise ConfigError(f"config.json field 'layer_types' must be a list of strings, got {_show(types)}")
        if len(types) != n_layers:
            raise ConfigError(f"config.json layer_types has {len(types)} entries for num_hidden_layers={n_layers}; "
                              "give one per layer")
        odd = next((t for t in types if t not in _LAYER_TYPES), None)
        if odd is not None:
            raise ConfigError(f"config.json layer_types entry {odd!r} is not supported for Qwen2; use "
                              "full_attention or sliding_attention")
        sliding = [i for i, t in enumerate(types) if _LAYER_TYPES[t]]
        if sliding and window is None:
            why = "use_sliding_window is false" if not f.flag("use_sliding_window") else "sliding_window is null"
            raise ConfigError(f"config.json layer_types makes layer {sliding[0]} sliding_attention but {why}, so it "
                              "has no window (transformers fails on it too); set both or mark it full_attention")
    return (window, sliding) if sliding else (None, None)


def _rope(f: _Fields) -> tuple[float, dict[str, float] | None]:
    """RoPE theta and Llama-3 scaling from the v5 (`rope_parameters`) or v4 (`rope_scaling`) layout."""
    data = f.data
    params = data.get("rope_scaling") or data.get("rope_parameters") or {}  # transformers' order of preference
    if not isinstance(params, dict):
        raise ConfigError(f"config.json field 'rope_parameters' must be an object, got {_show(params)}")
    if any(isinstance(v, dict) for v in params.values()):
        raise ConfigError("config.json rope_parameters is nested per layer type, which decoderlab does not support")
    theta = _number("rope_theta", params.get("rope_theta", data.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    partial = params.get("partial_rotary_factor", data.get("partial_rotary_factor"))
    if kind in (None, "default"):
        if partial not in (None, 1, 1.0):  # default RoPE in transformers rotates the whole head regardless
            _warn_ignored("partial_rotary_factor", partial, f.family)
        return theta, None
    if kind != "llama3":
        raise ConfigError(f"config.json rope type {_show(kind)} is not supported; decoderlab implements default "
                          "and llama3 RoPE")
    if partial not in (None, 1, 1.0):
        raise ConfigError(f"config.json partial_rotary_factor={_show(partial)} is not supported; decoderlab "
                          "rotates the whole head")
    scaling = {}
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if key not in params:
            raise ConfigError(f"config.json llama3 rope_parameters lacks {key!r}")
        scaling[key] = _number(key, params[key])
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ConfigError("config.json llama3 rope_parameters needs high_freq_factor > low_freq_factor")
    # A top-level original_max_position_embeddings wins (transformers' Phi-3 exception), then the dict's,
    # then max_position_embeddings.
    if "original_max_position_embeddings" in data:
        original = f.integer("original_max_position_embeddings")
    elif "original_max_position_embeddings" in params:
        original = _integer("original_max_position_embeddings", params["original_max_position_embeddings"])
    else:
        original = f.integer("max_position_embeddings")
    scaling["original_max_position_embeddings"] = original
    return theta, scaling


def _warn_foreign(data: dict[str, Any], family: str) -> None:
    for name, off in {**_FOREIGN, **_FOREIGN_BY_FAMILY[family]}.items():
        value = data.get(name, off)
        if value != off and not (name == "layer_types" and _all_full(value)):
            _warn_ignored(name, value, family)


def _all_full(types: Any) -> bool:
    return isinstance(types, list) and all(t in ("full_attention", "attention") for t in types)


def _warn_ignored(name: str, value: Any, family: str) -> None:
    warnings.warn(f"config.json sets {name}={_show(value)}, which transformers' {FAMILY_ARCHITECTURES[family]} "
                  "ignores; decoderlab ignores it too", stacklevel=4)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Fields:
    """Typed access to one config.json's fields, with transformers' default where a field is absent."""

    def __init__(self, data: dict[str, Any], family: str) -> None:
        self.data, self.family = data, family

    def _get(self, name: str) -> Any:
        if name in self.data:
            return self.data[name]
        if self.family == "gpt2" and _GPT2_ALIASES.get(name) in self.data:
            return self.data[_GPT2_ALIASES[name]]
        defaults = DEFAULTS[self.family]
        if name in defaults:
            return defaults[name]
        raise ConfigError(f"config.json lacks {name!r}, which {FAMILY_ARCHITECTURES[self.family]} needs")

    def integer(self, name: str, minimum: int = 1, nullable: bool = False) -> int | None:
        return _integer(name, self._get(name), minimum, nullable)

    def number(self, name: str, positive: bool = True) -> float:
        return _number(name, self._get(name), positive)

    def flag(self, name: str) -> bool:
        value = self._get(name)
        if not isinstance(value, bool):
            raise _bad(name, "true or false", value)
        return value

    def text(self, name: str) -> str:
        value = self._get(name)
        if not isinstance(value, str):
            raise _bad(name, "a string", value)
        return value

    def token_ids(self, name: str, many: bool) -> int | list[int] | None:
        value = self._get(name)
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool)) or (
            many and isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
        if not ok:
            raise _bad(name, "a token id" + (" or a list of them" if many else "") + " or null", value)
        return value


def _bad(name: str, want: str, value: Any) -> ConfigError:
    return ConfigError(f"config.json field {name!r} must be {want}, got {_show(value)}")


def _integer(name: str, value: Any, minimum: int = 1, nullable: bool = False) -> int | None:
    if value is None and nullable:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        want = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise _bad(name, want + (" or null" if nullable else ""), value)
    return value


def _number(name: str, value: Any, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or (
            value <= 0 if positive else value < 0):
        raise _bad(name, "a positive number" if positive else "a non-negative number", value)
    return float(value)


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """The config.json dict for `config`'s family (`hf_family`), which transformers loads as the same model."""
    if config.hf_family is None:
        raise ConfigError("this config has no Hugging Face family (hf_family=None); "
                          "set hf_family to one of gpt2, llama, qwen2, mistral if its shape fits")
    check_fits_family(config)
    family = config.hf_family
    out: dict[str, Any] = {"architectures": [FAMILY_ARCHITECTURES[family]], "model_type": family,
                           "vocab_size": config.vocab_size, "tie_word_embeddings": config.tie_embeddings,
                           "initializer_range": config.init_std, "torch_dtype": "float32",
                           # Written even when None: the classes' defaults differ by family.
                           "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id}
    if config.objective != "causal":
        out[OBJECTIVE_KEY] = {name: getattr(config, name) for name in _OBJECTIVE_FIELDS}
    if family == "gpt2":
        out.update(n_layer=config.n_layers, n_head=config.n_heads, n_embd=config.d_model,
                   n_inner=config.d_mlp, n_positions=config.context_length,
                   layer_norm_epsilon=config.norm_eps,
                   activation_function="gelu_new" if config.activation == "gelu_tanh" else "gelu",
                   resid_pdrop=config.dropout, embd_pdrop=config.dropout, attn_pdrop=config.dropout)
        return out
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": config.rope_theta}
    if config.rope_scaling:
        rope = {"rope_type": "llama3", "rope_theta": config.rope_theta, **config.rope_scaling}
    out.update(num_hidden_layers=config.n_layers, num_attention_heads=config.n_heads,
               num_key_value_heads=config.kv_heads, hidden_size=config.d_model,
               intermediate_size=config.mlp_width, head_dim=config.dim_head,
               max_position_embeddings=config.context_length, rms_norm_eps=config.norm_eps,
               hidden_act="silu", rope_theta=config.rope_theta, rope_parameters=rope,
               attention_dropout=config.dropout)
    if family == "llama":
        out.update(attention_bias=config.bias_qkv, mlp_bias=config.bias_mlp)
    if family == "mistral":
        out["sliding_window"] = config.sliding_window
    if family == "qwen2":
        windows = config.layer_windows
        sliding = [i for i, w in enumerate(windows) if w is not None]
        # layer_types decides; max_window_layers matches it where the sliding layers are the top ones (the
        # only pattern readers that predate layer_types can express).
        top = sliding == list(range(sliding[0], config.n_layers)) if sliding else False
        out.update(use_sliding_window=bool(sliding), sliding_window=config.sliding_window,
                   max_window_layers=sliding[0] if top else config.n_layers,
                   layer_types=["sliding_attention" if w is not None else "full_attention" for w in windows])
    return out


def check_fits_family(config: ModelConfig) -> None:
    """Raise a `ConfigError` naming the first field that the Hugging Face family `config.hf_family` cannot hold."""
    family = config.hf_family
    if family == "gpt2":
        want = dict(n_future=0, norm="layernorm", norm_bias=True, positions="learned", bias_qkv=True,
                    bias_attn_out=True, bias_mlp=True, qk_norm=False, logit_softcap=None,
                    sliding_window=None, kv_heads=config.n_heads, dim_head=config.d_model // config.n_heads)
        if config.activation not in ("gelu", "gelu_tanh"):
            raise ConfigError(f"config does not fit the gpt2 family: activation={config.activation!r}")
    else:
        want = dict(n_future=0, norm="rmsnorm", positions="rope", activation="swiglu", qk_norm=False,
                    logit_softcap=None, bias_attn_out=config.bias_qkv if family == "llama" else False)
        if family == "qwen2":
            want.update(bias_qkv=True, bias_mlp=False)
        if family == "mistral":
            # Mistral applies its window to every layer.
            want.update(bias_qkv=False, bias_mlp=False, sliding_layers=None)
        if family == "llama":
            want.update(sliding_window=None)
    for name, value in want.items():
        if getattr(config, name) != value:
            raise ConfigError(f"config does not fit the {family} family: {name}={getattr(config, name)!r} "
                              f"(the family needs {value!r}); set hf_family=None to save our own format")
