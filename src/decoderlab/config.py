"""`ModelConfig`: the one validated description of a decoderlab transformer.

Every architecture decoderlab runs (GPT-2, Llama, Qwen2, Mistral and our own variants) is a setting
of these fields; the model switches behaviour on them, never on a model's name. Named presets and
the Hugging Face `config.json` mapping live here too.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError

NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope", "none")
ACTIVATIONS = ("gelu", "gelu_tanh", "swiglu", "relu2")
# The Hugging Face families whose weights and config.json we map, keyed by `architectures[0]`.
HF_ARCHITECTURES = {
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "MistralForCausalLM": "mistral",
}
# And back: the `architectures` entry written for each family.
FAMILY_ARCHITECTURES = {family: arch for arch, family in HF_ARCHITECTURES.items()}
_HF_ACT = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


@dataclass
class ModelConfig:
    """Shape and switches of a decoder-only transformer.

    `None` in `n_kv_heads`, `d_mlp` and `head_dim` means the usual default (all heads, 4x width,
    width / heads); `resolved()` values are read through the properties below.
    """

    vocab_size: int = 50257
    n_layers: int = 12
    n_heads: int = 12
    d_model: int = 768
    n_kv_heads: int | None = None
    d_mlp: int | None = None
    head_dim: int | None = None
    context_length: int = 1024
    norm: str = "layernorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True
    positions: str = "learned"
    rope_theta: float = 10000.0
    # Llama-3-style frequency scaling: {"factor", "low_freq_factor", "high_freq_factor",
    # "original_max_position_embeddings"}; None for plain RoPE.
    rope_scaling: dict[str, float] | None = None
    activation: str = "gelu_tanh"
    bias_qkv: bool = True
    bias_attn_out: bool = True
    bias_mlp: bool = True
    tie_embeddings: bool = True
    qk_norm: bool = False
    logit_softcap: float | None = None
    sliding_window: int | None = None
    # Extra heads predicting tokens t+2 .. t+1+n_future (multi-token prediction; self-speculation).
    n_future: int = 0
    dropout: float = 0.0
    init_std: float = 0.02
    # Which Hugging Face family this maps to on save ("gpt2", "llama", "qwen2", "mistral"), or None
    # for a decoderlab-only variant (saved with our own config.json).
    hf_family: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"invalid model config: {msg}")

        for name in ("vocab_size", "n_layers", "n_heads", "d_model", "context_length"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        need(self.norm in NORMS, f"unknown norm {self.norm!r}; choose one of {', '.join(NORMS)}")
        need(self.positions in POSITIONS,
             f"unknown positions {self.positions!r}; choose one of {', '.join(POSITIONS)}")
        need(self.activation in ACTIVATIONS,
             f"unknown activation {self.activation!r}; choose one of {', '.join(ACTIVATIONS)}")
        if self.head_dim is None:
            need(self.d_model % self.n_heads == 0,
                 f"n_heads={self.n_heads} does not divide d_model={self.d_model}; change one or set head_dim")
        need(self.kv_heads > 0 and self.n_heads % self.kv_heads == 0,
             f"n_kv_heads={self.kv_heads} must divide n_heads={self.n_heads}")
        need(self.dim_head > 0, f"head_dim must be positive, got {self.head_dim}")
        if self.positions == "rope":
            need(self.dim_head % 2 == 0, f"RoPE needs an even head_dim, got {self.dim_head}")
            need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        if self.rope_scaling is not None:
            missing = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            missing -= set(self.rope_scaling)
            need(not missing, f"rope_scaling lacks {', '.join(sorted(missing))} (Llama-3-style scaling)")
        need(self.mlp_width > 0, f"d_mlp must be positive, got {self.d_mlp}")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")
        need(self.logit_softcap is None or self.logit_softcap > 0, "logit_softcap must be positive or None")
        need(self.sliding_window is None or self.sliding_window > 0, "sliding_window must be positive or None")
        need(isinstance(self.n_future, int) and self.n_future >= 0, "n_future must be a non-negative integer")
        need(self.hf_family is None or self.hf_family in FAMILY_ARCHITECTURES,
             f"unknown hf_family {self.hf_family!r}; choose one of {', '.join(FAMILY_ARCHITECTURES)} or None")

    # Resolved shape values (the `None` defaults filled in).
    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def dim_head(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def mlp_width(self) -> int:
        return 4 * self.d_model if self.d_mlp is None else self.d_mlp

    @property
    def gated_mlp(self) -> bool:
        return self.activation == "swiglu"

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated again)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelConfig:
        """A named preset (see `PRESETS`), with optional field overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return PRESETS[name].replace(**overrides)

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count computed from the shape alone (matches `Transformer.num_params`)."""
        d, h = self.d_model, self.dim_head
        qkv = d * h * (self.n_heads + 2 * self.kv_heads) + (h * (self.n_heads + 2 * self.kv_heads)
                                                           if self.bias_qkv else 0)
        out = self.n_heads * h * d + (d if self.bias_attn_out else 0)
        n_in = 2 if self.gated_mlp else 1
        mlp = n_in * d * self.mlp_width + self.mlp_width * d
        if self.bias_mlp:
            mlp += n_in * self.mlp_width + d
        norm = d * (2 if self.norm == "layernorm" and self.norm_bias else 1)
        qk = 2 * h if self.qk_norm else 0
        total = self.n_layers * (qkv + out + mlp + 2 * norm + qk) + norm + self.n_future * (mlp + norm)
        if include_embeddings:
            total += self.vocab_size * d * (1 if self.tie_embeddings else 2)
            if self.positions == "learned":
                total += self.context_length * d
        return total

    # ---- Hugging Face config.json ----------------------------------------------------------

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict; the family comes from `architectures`."""
        archs = hf.get("architectures") or []
        arch = archs[0] if archs else None
        if arch not in HF_ARCHITECTURES:
            found = f"architecture {arch!r}" if arch else "no 'architectures' entry"
            raise ConfigError(f"config.json has {found}; supported: {', '.join(HF_ARCHITECTURES)}")
        family = HF_ARCHITECTURES[arch]
        common = dict(bos_token_id=hf.get("bos_token_id"), eos_token_id=hf.get("eos_token_id"),
                      hf_family=family, init_std=float(hf.get("initializer_range", 0.02)))
        if family == "gpt2":
            for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
                if hf.get(flag):
                    raise ConfigError(f"GPT-2 config sets {flag}=true, which decoderlab does not support")
            if hf.get("scale_attn_weights") is False:
                raise ConfigError("GPT-2 config sets scale_attn_weights=false, which decoderlab does not support")
            act = hf.get("activation_function", "gelu_new")
            if act not in _HF_ACT:
                raise ConfigError(f"GPT-2 activation_function {act!r} is not supported; use gelu or gelu_new")
            return cls(
                vocab_size=hf["vocab_size"], n_layers=hf["n_layer"], n_heads=hf["n_head"],
                d_model=hf["n_embd"], d_mlp=hf.get("n_inner"), context_length=hf["n_positions"],
                norm="layernorm", norm_eps=hf.get("layer_norm_epsilon", 1e-5), norm_bias=True,
                positions="learned", activation=_HF_ACT[act], bias_qkv=True, bias_attn_out=True,
                bias_mlp=True, tie_embeddings=hf.get("tie_word_embeddings", True), **common,
            )
        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"{arch} hidden_act {act!r} is not supported; decoderlab maps silu (SwiGLU)")
        n_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim")
        if head_dim == hf["hidden_size"] // n_heads:
            head_dim = None  # the default; keeps configs comparable
        theta, scaling = _hf_rope(hf)
        window = None
        if family == "mistral":
            window = hf.get("sliding_window")
        elif family == "qwen2" and hf.get("use_sliding_window"):
            types = hf.get("layer_types") or []
            if len(set(types)) > 1 or hf.get("max_window_layers", 0) > 0 and not types:
                raise ConfigError("Qwen2 config mixes sliding-window and full-attention layers; "
                                  "decoderlab supports one attention kind for all layers")
            window = hf.get("sliding_window")
        attn_bias = True if family == "qwen2" else bool(hf.get("attention_bias", False))
        return cls(
            vocab_size=hf["vocab_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
            d_model=hf["hidden_size"], n_kv_heads=hf.get("num_key_value_heads") or n_heads,
            d_mlp=hf["intermediate_size"], head_dim=head_dim,
            context_length=hf.get("max_position_embeddings", 2048), norm="rmsnorm",
            norm_eps=hf.get("rms_norm_eps", 1e-6), norm_bias=False, positions="rope", rope_theta=theta,
            rope_scaling=scaling, activation="swiglu", bias_qkv=attn_bias,
            bias_attn_out=bool(hf.get("attention_bias", False)) if family != "qwen2" else False,
            bias_mlp=bool(hf.get("mlp_bias", False)), tie_embeddings=hf.get("tie_word_embeddings", False),
            sliding_window=window, **common,
        )

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict for this config's family (`hf_family`)."""
        if self.hf_family is None:
            raise ConfigError("this config has no Hugging Face family (hf_family=None); "
                              "set hf_family to one of gpt2, llama, qwen2, mistral if its shape fits")
        self._check_fits_family()
        family = self.hf_family
        out: dict[str, Any] = {"architectures": [FAMILY_ARCHITECTURES[family]], "model_type": family,
                               "vocab_size": self.vocab_size, "tie_word_embeddings": self.tie_embeddings,
                               "initializer_range": self.init_std, "torch_dtype": "float32"}
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_id is not None:
            out["eos_token_id"] = self.eos_token_id
        if family == "gpt2":
            out.update(n_layer=self.n_layers, n_head=self.n_heads, n_embd=self.d_model,
                       n_inner=self.d_mlp, n_positions=self.context_length,
                       layer_norm_epsilon=self.norm_eps,
                       activation_function="gelu_new" if self.activation == "gelu_tanh" else "gelu",
                       resid_pdrop=self.dropout, embd_pdrop=self.dropout, attn_pdrop=self.dropout)
            return out
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {"rope_type": "llama3", "rope_theta": self.rope_theta, **self.rope_scaling}
        out.update(num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
                   num_key_value_heads=self.kv_heads, hidden_size=self.d_model,
                   intermediate_size=self.mlp_width, head_dim=self.dim_head,
                   max_position_embeddings=self.context_length, rms_norm_eps=self.norm_eps,
                   hidden_act="silu", rope_theta=self.rope_theta, rope_parameters=rope,
                   attention_dropout=self.dropout)
        if family == "llama":
            out.update(attention_bias=self.bias_qkv, mlp_bias=self.bias_mlp)
        if family == "mistral":
            out["sliding_window"] = self.sliding_window
        if family == "qwen2":
            out.update(use_sliding_window=self.sliding_window is not None,
                       sliding_window=self.sliding_window, max_window_layers=0)
        return out

    def _check_fits_family(self) -> None:
        family = self.hf_family
        if family == "gpt2":
            want = dict(n_future=0, norm="layernorm", norm_bias=True, positions="learned", bias_qkv=True,
                        bias_attn_out=True, bias_mlp=True, qk_norm=False, logit_softcap=None,
                        sliding_window=None, kv_heads=self.n_heads, dim_head=self.d_model // self.n_heads)
            if self.activation not in ("gelu", "gelu_tanh"):
                raise ConfigError(f"config does not fit the gpt2 family: activation={self.activation!r}")
        else:
            want = dict(n_future=0, norm="rmsnorm", positions="rope", activation="swiglu", qk_norm=False,
                        logit_softcap=None, bias_attn_out=self.bias_qkv if family == "llama" else False)
            if family == "qwen2":
                want.update(bias_qkv=True, bias_mlp=False)
            if family == "mistral":
                want.update(bias_qkv=False, bias_mlp=False)
            if family != "mistral" and family != "qwen2" and self.sliding_window is not None:
                raise ConfigError("config uses a sliding window, which the Llama family does not have")
        for name, value in want.items():
            if getattr(self, name) != value:
                raise ConfigError(f"config does not fit the {family} family: {name}={getattr(self, name)!r} "
                                  f"(the family needs {value!r}); set hf_family=None to save our own format")


def _hf_rope(hf: dict[str, Any]) -> tuple[float, dict[str, float] | None]:
    """RoPE theta and Llama-3 scaling from either the transformers v4 or v5 config layout."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind != "llama3":
        raise ConfigError(f"RoPE scaling type {kind!r} is not supported; decoderlab supports default and llama3")
    scaling = {key: float(params[key]) for key in ("factor", "low_freq_factor", "high_freq_factor")}
    scaling["original_max_position_embeddings"] = int(
        params.get("original_max_position_embeddings", hf.get("max_position_embeddings", 8192)))
    return theta, scaling


def _gpt2(**kw: Any) -> ModelConfig:
    return ModelConfig(hf_family="gpt2", bos_token_id=50256, eos_token_id=50256, **kw)


PRESETS: dict[str, ModelConfig] = {
    "gpt2": _gpt2(n_layers=12, n_heads=12, d_model=768),
    "gpt2-medium": _gpt2(n_layers=24, n_heads=16, d_model=1024),
    "gpt2-large": _gpt2(n_layers=36, n_heads=20, d_model=1280),
    "llama-tiny": ModelConfig(
        vocab_size=32000, n_layers=4, n_heads=8, n_kv_heads=2, d_model=256, d_mlp=688,
        context_length=2048, norm="rmsnorm", norm_eps=1e-5, norm_bias=False, positions="rope",
        rope_theta=500000.0, activation="swiglu", bias_qkv=False, bias_attn_out=False, bias_mlp=False,
        tie_embeddings=True, hf_family="llama",
    ),
    # nanoGPT's CPU "baby GPT" (shakespeare_char on a laptop): 4 layers, 4 heads, width 128, context 64.
    "char-baby": ModelConfig(
        vocab_size=65, n_layers=4, n_heads=4, d_model=128, context_length=64, norm="layernorm",
        norm_bias=False, positions="learned", activation="gelu", bias_qkv=False, bias_attn_out=False,
        bias_mlp=False, tie_embeddings=True, hf_family=None,
    ),
}


def rope_inv_freq(config: ModelConfig) -> torch.Tensor:  # noqa: F821 - torch imported lazily
    """RoPE inverse frequencies [head_dim / 2] in fp32, with Llama-3 scaling when configured."""
    import torch

    dim = config.dim_head
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = config.rope_scaling
    if not s:
        return inv_freq
    factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)
