"""Weight-name maps between decoderlab and Hugging Face checkpoints, one table per family.

Each rule maps one decoderlab parameter to one or more Hugging Face tensors: several are
concatenated along the output dimension (fused QKV, fused gate/up), and GPT-2's `Conv1D` weights
are stored transposed. The table is chosen by the family `decoderlab.hf.config` reads from
`config.json`, never from a model's name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..config import ModelConfig


@dataclass(frozen=True)
class Rule:
    """decoderlab name pattern -> Hugging Face name patterns (`{i}` is the layer index)."""

    ours: str
    theirs: tuple[str, ...]
    transpose: bool = False


def _gpt2_rules() -> list[Rule]:
    layer = "transformer.h.{i}."
    rules = [
        Rule("embed.weight", ("transformer.wte.weight",)),
        Rule("pos_embed.weight", ("transformer.wpe.weight",)),
        Rule("final_norm.weight", ("transformer.ln_f.weight",)),
        Rule("final_norm.bias", ("transformer.ln_f.bias",)),
        Rule("lm_head.weight", ("lm_head.weight",)),
    ]
    for ours, theirs, t in [
        ("attn_norm.weight", "ln_1.weight", False), ("attn_norm.bias", "ln_1.bias", False),
        ("attn.qkv.weight", "attn.c_attn.weight", True), ("attn.qkv.bias", "attn.c_attn.bias", False),
        ("attn.out.weight", "attn.c_proj.weight", True), ("attn.out.bias", "attn.c_proj.bias", False),
        ("mlp_norm.weight", "ln_2.weight", False), ("mlp_norm.bias", "ln_2.bias", False),
        ("mlp.up.weight", "mlp.c_fc.weight", True), ("mlp.up.bias", "mlp.c_fc.bias", False),
        ("mlp.down.weight", "mlp.c_proj.weight", True), ("mlp.down.bias", "mlp.c_proj.bias", False),
    ]:
        rules.append(Rule("blocks.{i}." + ours, (layer + theirs,), t))
    return rules


def _llama_rules() -> list[Rule]:
    """Llama, Qwen2 and Mistral share one layout; which biases exist is the config's business."""
    layer = "model.layers.{i}."
    rules = [
        Rule("embed.weight", ("model.embed_tokens.weight",)),
        Rule("final_norm.weight", ("model.norm.weight",)),
        Rule("lm_head.weight", ("lm_head.weight",)),
    ]
    attn = layer + "self_attn."
    for kind in ("weight", "bias"):
        rules += [
            Rule("blocks.{i}.attn.qkv." + kind, tuple(f"{attn}{p}_proj.{kind}" for p in "qkv")),
            Rule("blocks.{i}.attn.out." + kind, (f"{attn}o_proj.{kind}",)),
            Rule("blocks.{i}.mlp.up." + kind, (f"{layer}mlp.gate_proj.{kind}", f"{layer}mlp.up_proj.{kind}")),
            Rule("blocks.{i}.mlp.down." + kind, (f"{layer}mlp.down_proj.{kind}",)),
        ]
    rules += [
        Rule("blocks.{i}.attn_norm.weight", (layer + "input_layernorm.weight",)),
        Rule("blocks.{i}.mlp_norm.weight", (layer + "post_attention_layernorm.weight",)),
        Rule("blocks.{i}.attn.q_norm.weight", (attn + "q_norm.weight",)),
        Rule("blocks.{i}.attn.k_norm.weight", (attn + "k_norm.weight",)),
    ]
    return rules


RULES: dict[str, list[Rule]] = {
    "gpt2": _gpt2_rules(),
    "llama": _llama_rules(),
    "qwen2": _llama_rules(),
    "mistral": _llama_rules(),
}

# Tensors some checkpoints carry that are not weights (cached masks, RoPE tables).
IGNORED: dict[str, re.Pattern] = {
    "gpt2": re.compile(r"(^|\.)attn\.(masked_)?bias$"),
    "llama": re.compile(r"rotary_emb\.inv_freq$"),
    "qwen2": re.compile(r"rotary_emb\.inv_freq$"),
    "mistral": re.compile(r"rotary_emb\.inv_freq$"),
}


def normalize_hf_name(family: str, name: str) -> str:
    """Canonical HF name: older GPT-2 checkpoints omit the `transformer.` prefix."""
    if family == "gpt2" and not name.startswith(("transformer.", "lm_head.")):
        return "transformer." + name
    return name


def _expand(rule: Rule, ours: str) -> tuple[str, ...] | None:
    """The HF names for decoderlab parameter `ours` under `rule`, or None if the rule does not match."""
    pattern = "^" + re.escape(rule.ours).replace(r"\{i\}", r"(?P<i>\d+)") + "$"
    m = re.match(pattern, ours)
    if m is None:
        return None
    i = m.groupdict().get("i")
    return tuple(t.replace("{i}", i) if i is not None else t for t in rule.theirs)


def hf_names(family: str, ours: str) -> tuple[tuple[str, ...], bool]:
    """HF tensor names (concatenated in order) for one decoderlab parameter, and whether transposed."""
    for rule in RULES[family]:
        names = _expand(rule, ours)
        if names is not None:
            return names, rule.transpose
    raise KeyError(f"no {family} weight-name rule for parameter {ours!r}")


def split_sizes(config: ModelConfig, ours: str) -> list[int] | None:
    """How a fused decoderlab tensor splits into its HF parts along dim 0 (None if not fused)."""
    if ".attn.qkv." in ours:
        h, d = config.dim_head, config.n_heads
        return [d * h, config.kv_heads * h, config.kv_heads * h]
    if ".mlp.up." in ours and config.gated_mlp:
        return [config.mlp_width, config.mlp_width]
    return None


def part_shapes(config: ModelConfig, ours: str, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    """The shape each HF tensor of decoderlab parameter `ours` (of `shape`) must have, in `hf_names` order."""
    names, transpose = hf_names(config.hf_family, ours)
    sizes = split_sizes(config, ours) if len(names) > 1 else [shape[0]]
    parts = [(size, *shape[1:]) for size in sizes]
    return [tuple(reversed(p)) if transpose else p for p in parts]


def to_hf_state_dict(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """decoderlab parameters -> HF tensors (contiguous, ready for safetensors)."""
    family = config.hf_family
    out: dict[str, torch.Tensor] = {}
    for ours, tensor in state.items():
        if ours == "lm_head.weight" and config.tie_embeddings:
            continue
        names, transpose = hf_names(family, ours)
        parts = tensor.split(split_sizes(config, ours), dim=0) if len(names) > 1 else (tensor,)
        for name, part in zip(names, parts, strict=True):
            out[name] = (part.t() if transpose else part).contiguous()
    return out


def gather_weight(names: tuple[str, ...], transpose: bool,
                  fetch: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Build one decoderlab tensor from its HF parts."""
    parts = [fetch(n) for n in names]
    tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
    return tensor.t().contiguous() if transpose else tensor
