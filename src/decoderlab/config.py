"""`ModelConfig`: the one validated description of a decoderlab transformer.

Every architecture decoderlab runs (GPT-2, Llama, Qwen2, Mistral and our own variants) is a setting
of these fields; the model switches behaviour on them, never on a model's name. Named presets live
here too; the Hugging Face `config.json` mapping lives in `decoderlab.hf`.
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
# The Hugging Face families a config can be saved as (decoderlab.hf maps them).
HF_FAMILIES = ("gpt2", "llama", "qwen2", "mistral")
# What a model was trained to predict: the next token (a causal LM), masked tokens (BERT-style MLM) or masked
# tokens at every noise level (a masked diffusion LM, LLaDA).
MODEL_OBJECTIVES = ("causal", "mlm", "diffusion")


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
    # Sliding-window attention: a query sees the last `sliding_window` slots (itself included), in the layers
    # listed in `sliding_layers` (ascending indices), or in every layer where that is None.
    sliding_window: int | None = None
    sliding_layers: list[int] | None = None
    # Extra heads predicting tokens t+2 .. t+1+n_future (multi-token prediction; self-speculation).
    n_future: int = 0
    dropout: float = 0.0
    # Per-token stochastic depth, training only: each attention and each MLP branch's output is dropped for each
    # token independently with this probability (the kept ones scaled by 1 / (1 - p)). It regularises like dropout
    # at a fraction of its cost: 2 x batch x tokens random numbers a layer instead of one per activation.
    branch_drop: float = 0.0
    init_std: float = 0.02
    # The training objective (`MODEL_OBJECTIVES`). An "mlm" or "diffusion" model predicts the tokens standing at
    # `mask_token_id` slots; with `shift_logits` (a model adapted from a causal one, DiffuLLaMA-style) slot i's
    # logits predict token i + 1, else token i. `bidirectional` lifts the causal mask when no mask is given.
    objective: str = "causal"
    bidirectional: bool = False
    shift_logits: bool = False
    mask_token_id: int | None = None
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

        # Types first: a config read from a file may hold anything, and the checks below compare numbers.
        for name in ("vocab_size", "n_layers", "n_heads", "d_model", "context_length"):
            value = getattr(self, name)
            need(_is_int(value) and value > 0, f"{name} must be a positive integer, got {value!r}")
        for name in ("n_kv_heads", "d_mlp", "head_dim", "sliding_window"):
            value = getattr(self, name)
            need(value is None or _is_int(value) and value > 0, f"{name} must be a positive integer or None, "
                 f"got {value!r}")
        need(_is_int(self.n_future) and self.n_future >= 0, "n_future must be a non-negative integer")
        for name in ("norm_eps", "rope_theta", "dropout", "branch_drop", "init_std"):
            value = getattr(self, name)
            need(_is_number(value), f"{name} must be a finite number, got {value!r}")
        need(self.logit_softcap is None or _is_number(self.logit_softcap) and self.logit_softcap > 0,
             f"logit_softcap must be a positive number or None, got {self.logit_softcap!r}")
        for name in ("norm_bias", "bias_qkv", "bias_attn_out", "bias_mlp", "tie_embeddings", "qk_norm",
                     "bidirectional", "shift_logits"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, choices in (("norm", NORMS), ("positions", POSITIONS), ("activation", ACTIVATIONS),
                              ("objective", MODEL_OBJECTIVES)):
            value = getattr(self, name)
            need(isinstance(value, str) and value in choices,
                 f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
        if self.head_dim is None:
            need(self.d_model % self.n_heads == 0,
                 f"n_heads={self.n_heads} does not divide d_model={self.d_model}; change one or set head_dim")
        need(self.n_heads % self.kv_heads == 0, f"n_kv_heads={self.kv_heads} must divide n_heads={self.n_heads}")
        if self.positions == "rope":
            need(self.dim_head % 2 == 0, f"RoPE needs an even head_dim, got {self.dim_head}")
            need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        if self.rope_scaling is not None:
            need(isinstance(self.rope_scaling, dict) and all(_is_number(v) for v in self.rope_scaling.values()),
                 f"rope_scaling must map names to numbers, got {self.rope_scaling!r}")
            missing = {"factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}
            missing -= set(self.rope_scaling)
            need(not missing, f"rope_scaling lacks {', '.join(sorted(missing))} (Llama-3-style scaling)")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(0.0 <= self.branch_drop < 1.0, f"branch_drop must be in [0, 1), got {self.branch_drop}")
        need(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")
        if self.sliding_layers is not None:
            layers = self.sliding_layers
            need(isinstance(layers, list | tuple) and all(_is_int(i) and 0 <= i < self.n_layers for i in layers)
                 and len(set(layers)) == len(layers),
                 f"sliding_layers must list distinct layer indices in [0, {self.n_layers}), got {layers!r}")
            need(self.sliding_window is not None, "sliding_layers is set but sliding_window is None; set the window")
            need(len(layers) > 0, "sliding_layers=[] slides no layer; set sliding_window=None instead")
            # One spelling per model: every layer sliding is None (Mistral's form), so configs compare equal.
            self.sliding_layers = None if len(layers) == self.n_layers else sorted(layers)
        need(self.hf_family is None or self.hf_family in HF_FAMILIES,
             f"unknown hf_family {self.hf_family!r}; choose one of {', '.join(HF_FAMILIES)} or None")
        need(self.bos_token_id is None or _is_int(self.bos_token_id),
             f"bos_token_id must be a token id or None, got {self.bos_token_id!r}")
        eos = self.eos_token_id
        need(eos is None or _is_int(eos) or isinstance(eos, list) and all(_is_int(t) for t in eos),
             f"eos_token_id must be a token id, a list of them or None, got {eos!r}")
        need(isinstance(self.extra, dict), f"extra must be a dict, got {type(self.extra).__name__}")
        need(self.mask_token_id is None or _is_int(self.mask_token_id) and 0 <= self.mask_token_id < self.vocab_size,
             f"mask_token_id must be a token id below vocab_size={self.vocab_size} or None, got {self.mask_token_id!r}")
        if self.objective == "causal":
            need(not self.bidirectional and not self.shift_logits,
                 "a causal model (objective='causal') attends causally and always predicts the next token; "
                 "bidirectional and shift_logits are for objective 'mlm' or 'diffusion'")
        else:
            need(self.mask_token_id is not None, f"objective={self.objective!r} needs mask_token_id (the id of the "
                                                 "token standing for a masked slot)")

    # Resolved shape values (the `None` defaults filled in).
    @property
    def kv_heads(self) -> int:
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def dim_head(self) -> int:
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer`, or None where it attends to every earlier slot."""
        if self.sliding_layers is None or layer in self.sliding_layers:
            return self.sliding_window
        return None

    @property
    def layer_windows(self) -> list[int | None]:
        """Every layer's sliding window (None: full attention)."""
        if self.sliding_layers is None:  # read in every forward pass: the common case without a loop
            return [self.sliding_window] * self.n_layers
        return [self.layer_window(i) for i in range(self.n_layers)]

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
        if not isinstance(data, dict):
            raise ConfigError(f"a model config must be a JSON object of fields, got {type(data).__name__}")
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

    # ---- Hugging Face config.json (the mapping lives in decoderlab.hf) ------------------------

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any]) -> ModelConfig:
        """Build from a Hugging Face `config.json` dict as transformers would; see `decoderlab.hf.config`."""
        from .hf import from_hf_config

        return from_hf_config(hf)

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face `config.json` dict for this config's family (`hf_family`)."""
        from .hf import to_hf_config

        return to_hf_config(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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
