"""LoRA adapters: trainable low-rank updates W + (alpha/r) B A on a frozen model's linear layers, in PEFT's layout.

An adapter belongs to one Hugging Face module (`model.layers.0.self_attn.q_proj`, GPT-2's fused `c_attn`), as in
PEFT, so files move between decoderlab and PEFT unchanged. Our `Transformer` fuses q, k and v into one `attn.qkv`
layer (and gate and up into `mlp.up`): a q_proj adapter updates the q rows of that weight. An adapted layer stays
the model's `accel.Linear` (packing and int8/int4 quantization keep working under it) and adds each adapter's
x A^T B^T * scaling into its rows of the output; the A products of all its adapters are one matmul. Our own
models (no HF family) name adapters by our layer names (`blocks.0.attn.qkv`).

`apply_lora` adds fresh adapters and freezes the rest, `save_adapter` / `load_adapter` write and read PEFT's
`adapter_config.json` + `adapter_model.safetensors`, `merge_lora` folds them into the weights (then
`decoderlab.save` writes a plain folder transformers loads).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from . import hf
from .accel import Linear, stored_parameters
from .atomic import atomic_write, atomic_write_text
from .errors import CheckpointError, UserError
from .model import Transformer

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT saves a causal LM's adapter tensors under its wrapper's names: PeftModel.base_model (LoraModel).model.
KEY_PREFIX = "base_model.model."
# PEFT's defaults (TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING): attention's query and value projections;
# GPT-2 fuses them into c_attn. Our own models: the fused qkv layer.
DEFAULT_TARGETS: dict[str | None, list[str]] = {
    "llama": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "mistral": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"], None: ["qkv"],
}
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])(?:\.default)?\.weight$")
# PEFT also saves the base weight of an adapted lm_head or embedding ("<module>.base_layer.weight").
_BASE_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.base_layer\.weight$")
_REGEX_CHARS = set("*+?[](){}|^$\\")


@dataclass
class LoraConfig:
    """What `apply_lora` adds: rank `r`, `alpha` (updates scaled by alpha / r, or alpha / sqrt(r) with
    `use_rslora`), `dropout` on the adapters' input while training, and `target_modules`.

    `target_modules` follows PEFT: a list of module names, each matching a module whose full name is it or ends in
    "." + it (`"q_proj"`, `"self_attn.q_proj"`), or one string, a regular expression the full name must match
    (`r".*layers\\.[01]\\..*proj"`); a list entry with regex characters is a full-match pattern too. Names are
    Hugging Face's for HF families (q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head;
    GPT-2: c_attn, c_proj, c_fc, lm_head), ours for decoderlab's own models (qkv, out, up, down, lm_head).
    None: PEFT's default for the family (q_proj and v_proj; GPT-2's c_attn; our qkv). `bias` is "none" only:
    the adapters alone are trained.
    """

    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise UserError(f"LoRA rank r must be a positive integer, not {self.r!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise UserError(f"LoRA alpha must be a positive number, not {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise UserError(f"LoRA dropout must be in [0, 1), not {self.dropout!r}")
        if self.bias != "none":
            raise UserError(f"LoRA bias={self.bias!r} is not supported: only 'none' (the adapters alone are trained)")
        targets = self.target_modules
        if isinstance(targets, tuple):
            self.target_modules = targets = list(targets)
        if not (targets is None or isinstance(targets, str) or (
                isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets))):
            raise UserError(f"target_modules must be a list of module names, one regex string or None, "
                            f"not {targets!r}")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    def to_peft_dict(self, base_model_name_or_path: str | None = None, fan_in_fan_out: bool = False) -> dict:
        """PEFT's adapter_config.json fields (those PEFT has read since 0.7, so older versions load it too)."""
        targets = self.target_modules
        return {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
            "revision": None, "inference_mode": True, "r": self.r, "lora_alpha": self.alpha,
            "lora_dropout": self.dropout, "target_modules": sorted(targets) if isinstance(targets, list) else targets,
            "bias": self.bias, "fan_in_fan_out": fan_in_fan_out, "use_rslora": self.use_rslora, "use_dora": False,
            "init_lora_weights": True, "modules_to_save": None, "layers_to_transform": None,
            "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        }

    @classmethod
    def from_peft_dict(cls, data: dict, source: str = ADAPTER_CONFIG) -> LoraConfig:
        """A `LoraConfig` from PEFT's adapter_config.json fields; a one-line error for what decoderlab does not run."""
        if not isinstance(data, dict):
            raise CheckpointError(f"{source} must hold a JSON object")
        if data.get("peft_type", "LORA") != "LORA":
            raise CheckpointError(f"{source} is a {data.get('peft_type')} adapter; decoderlab loads LoRA adapters")
        refused = {
            "use_dora": "DoRA", "rank_pattern": "per-module ranks (rank_pattern)",
            "alpha_pattern": "per-module alphas (alpha_pattern)", "modules_to_save": "fully trained modules "
            "(modules_to_save)", "layers_to_transform": "layers_to_transform", "lora_bias": "LoRA biases",
            "exclude_modules": "exclude_modules", "target_parameters": "target_parameters",
            "layer_replication": "layer_replication", "use_qalora": "QA-LoRA", "trainable_token_indices":
            "trainable tokens",
        }
        for key, what in refused.items():
            if data.get(key):
                raise CheckpointError(f"{source} uses {what}, which decoderlab does not run; only plain LoRA "
                                      "(rank r, lora_alpha, target_modules) adapters load")
        try:
            return cls(r=data["r"], alpha=data.get("lora_alpha", 8), dropout=data.get("lora_dropout", 0.0),
                       target_modules=data.get("target_modules"), bias=data.get("bias", "none"),
                       use_rslora=bool(data.get("use_rslora", False)))
        except KeyError as e:
            raise CheckpointError(f"{source} lacks the field {e.args[0]!r}") from None
        except UserError as e:
            raise CheckpointError(f"{source}: {e}") from None


@dataclass(frozen=True)
class AdapterSite:
    """Where an adapter can go: the module it is named after (`name`, HF's for HF families), the model's `layer`
    holding its weight, and the output rows [start, stop) of that weight it updates."""

    name: str
    layer: str
    start: int
    stop: int
    in_features: int


def adapter_sites(model: Transformer) -> list[AdapterSite]:
    """Every module of `model` an adapter can target, named as in the adapter files."""
    config, family = model.config, model.config.hf_family
    sites = []
    for layer, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        out, inp = module.out_features, module.in_features
        if family is None:
            sites.append(AdapterSite(layer, layer, 0, out, inp))
            continue
        try:
            names, _ = hf.hf_names(family, layer + ".weight")
        except KeyError:
            continue  # a layer transformers' model lacks (future heads)
        sizes = hf.split_sizes(config, layer + ".weight") if len(names) > 1 else [out]
        start = 0
        for name, size in zip(names, sizes, strict=True):
            sites.append(AdapterSite(name.removesuffix(".weight"), layer, start, start + size, inp))
            start += size
    return sites


def _is_pattern(target: str) -> bool:
    return any(c in _REGEX_CHARS for c in target)


def _matches(target: str, name: str) -> bool:
    if _is_pattern(target):
        try:
            return re.fullmatch(target, name) is not None
        except re.error as e:
            raise UserError(f"target_modules pattern {target!r} is not a valid regular expression ({e})") from None
    return name == target or name.endswith("." + target)


def _choose(sites: list[AdapterSite], targets: list[str] | str, family: str | None) -> list[AdapterSite]:
    entries = [targets] if isinstance(targets, str) else targets
    chosen = []
    for target in entries:
        found = [s for s in sites if _matches(target, s.name)]
        if not found:
            kinds = sorted({s.name.rsplit(".", 1)[-1] for s in sites})
            raise UserError(f"LoRA target {target!r} matches no linear layer of this {family or 'decoderlab'} "
                            f"model; its layers are {', '.join(kinds)} (full names like {sites[0].name!r})")
        chosen += [s for s in found if s not in chosen]
    return sorted(chosen, key=sites.index)


class LoraAdapter(nn.Module):
    """One module's low-rank update: A [r, in], B [rows, r], added as x A^T B^T * scaling to rows [start, stop)."""

    def __init__(self, site: AdapterSite, r: int, scaling: float, device: torch.device) -> None:
        super().__init__()
        self.name, self.start, self.stop, self.scaling = site.name, site.start, site.stop, scaling
        # Float32 whatever the base's dtype, as PEFT keeps adapters (autocast_adapter_dtype); PEFT's init.
        self.A = nn.Parameter(torch.empty(r, site.in_features, device=device))
        self.B = nn.Parameter(torch.zeros(site.stop - site.start, r, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        """The weight update scaling * B A [rows, in], in float32."""
        return (self.B.detach().float() @ self.A.detach().float()) * self.scaling


class LoraLinear(Linear):
    """A model `Linear` with LoRA adapters on row ranges of its output (`apply_lora` turns a layer into one, in
    place: its weight, packing and quantization stay as they were)."""

    lora_adapters: nn.ModuleList
    lora_dropout: float = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        adapters = list(self.lora_adapters)
        dtype = out.dtype
        x = x.to(dtype).reshape(-1, x.shape[-1])
        if self.lora_dropout and self.training:  # each adapter its own dropout mask, as PEFT draws them
            low = torch.cat([F.dropout(x, self.lora_dropout) @ a.A.to(dtype).t() for a in adapters], dim=-1)
        else:  # one matmul for every adapter's A
            A = adapters[0].A if len(adapters) == 1 else torch.cat([a.A for a in adapters])
            low = x @ A.to(dtype).t()
        # One matmul for every adapter's B too: each B (times its scaling) sits in its rows and its adapter's
        # columns of an [out, n * r] matrix, zero elsewhere (a few columns: the zeros cost next to nothing), so
        # the update is one addmm onto the base output and autograd keeps no copies of row slices.
        full = len(adapters) == 1 and adapters[0].start == 0 and adapters[0].stop == out.shape[-1]
        if full:
            B = adapters[0].B.to(dtype) * adapters[0].scaling
        else:
            r = adapters[0].A.shape[0]
            B = out.new_zeros(out.shape[-1], r * len(adapters))
            for i, a in enumerate(adapters):
                B[a.start:a.stop, i * r:(i + 1) * r] = a.B.to(dtype) * a.scaling
        return torch.addmm(out.reshape(-1, out.shape[-1]), low, B.t()).view(out.shape)


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """The adapted layers of `model` by name, empty without adapters."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoraLinear) for m in model.modules())


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (A and B of each), what an optimizer for LoRA training takes."""
    return [p for layer in lora_layers(model).values() for a in layer.lora_adapters for p in (a.A, a.B)]


def _attach(model: Transformer, config: LoraConfig, sites: Iterable[AdapterSite]) -> dict[str, LoraAdapter]:
    """Freeze every parameter, then turn the layers of `sites` into `LoraLinear`s with fresh adapters."""
    if has_lora(model):
        raise UserError("this model already has LoRA adapters; merge them (merge_lora) or load the base again "
                        "before adding others")
    for p in stored_parameters(model):  # a flag, not a read: packed or quantized weights stay as they are
        p.requires_grad_(False)
    modules = dict(model.named_modules())
    made: dict[str, LoraAdapter] = {}
    for site in sites:
        layer = modules[site.layer]
        if not isinstance(layer, LoraLinear):
            layer.__class__ = LoraLinear  # same object: its weight, packed copy and quantized copy stay
            layer.lora_adapters = nn.ModuleList()
            layer.lora_dropout = config.dropout
        adapter = LoraAdapter(site, config.r, config.scaling, layer.weight_device)
        layer.lora_adapters.append(adapter)
        made[site.name] = adapter
    model.lora_config = config
    return made


def apply_lora(model: Transformer, config: LoraConfig | None = None) -> Transformer:
    """Add fresh LoRA adapters (PEFT's initialisation: A kaiming-uniform, B zero, so the output is unchanged) to
    the layers `config.target_modules` names, and freeze every other parameter; in place, `model` returned.

    Works on a packed or quantized (int8/int4: QLoRA) base; `lora_parameters(model)` are what to train.
    """
    config = config or LoraConfig()
    family = model.config.hf_family
    targets = config.target_modules if config.target_modules is not None else DEFAULT_TARGETS[family]
    sites = adapter_sites(model)
    chosen = _choose(sites, targets, family)
    # What the files say: PEFT reads list entries as names only, so a list with patterns is written out in full.
    written = (targets if isinstance(targets, str) or not any(map(_is_pattern, targets))
               else [s.name for s in chosen])
    _attach(model, replace(config, target_modules=written), chosen)
    return model


def save_adapter(model: Transformer, folder: str | Path, base_model_name_or_path: str | None = None) -> Path:
    """Write the adapters of `model` as PEFT does: `adapter_config.json` and `adapter_model.safetensors` (keys
    `base_model.model.<module>.lora_A.weight` / `lora_B.weight`), each file replaced atomically."""
    layers = lora_layers(model)
    if not layers:
        raise UserError("this model has no LoRA adapters to save; add them with apply_lora or load_adapter")
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {folder} ({e.strerror}); choose a writable folder") from None
    tensors = {}
    for layer in layers.values():
        for a in layer.lora_adapters:
            tensors[f"{KEY_PREFIX}{a.name}.lora_A.weight"] = a.A.detach().contiguous()
            tensors[f"{KEY_PREFIX}{a.name}.lora_B.weight"] = a.B.detach().contiguous()
    # GPT-2's Conv1D stores weights [in, out]: PEFT merges its updates transposed (the A and B files are the same).
    config = model.lora_config.to_peft_dict(base_model_name_or_path, fan_in_fan_out=model.config.hf_family == "gpt2")
    data = safetensors_bytes(tensors, metadata={"format": "pt"})
    try:
        atomic_write(folder / ADAPTER_WEIGHTS, lambda f: f.write(data))
        atomic_write_text(folder / ADAPTER_CONFIG, json.dumps(config, indent=2) + "\n")
    except OSError as e:
        raise CheckpointError(f"could not save the adapter to {folder} ({e.strerror or e})") from None
    return folder


def load_adapter(model: Transformer, folder: str | Path) -> Transformer:
    """Put the LoRA adapter in `folder` (PEFT's layout, saved by decoderlab or by PEFT) on `model`, its base; in
    place, `model` returned, base frozen and adapters trainable."""
    folder = Path(folder)
    for file in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / file).is_file():
            raise CheckpointError(f"{folder} has no {file}; an adapter folder holds {ADAPTER_CONFIG} and "
                                  f"{ADAPTER_WEIGHTS} (as PEFT's save_pretrained writes them)")
    source = str(folder / ADAPTER_CONFIG)
    try:
        data = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{source} is not valid JSON ({e})") from None
    config = LoraConfig.from_peft_dict(data, source)
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS} is truncated or corrupt ({e}); save it again") from None
    parts: dict[str, dict[str, torch.Tensor]] = {}
    base_copies: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if m is None and _BASE_KEY.match(key):
            base_copies[_BASE_KEY.match(key)["module"]] = tensor
            continue
        if m is None:
            raise CheckpointError(f"{folder / ADAPTER_WEIGHTS} holds {key!r}, which is not a LoRA A or B weight; "
                                  "only plain LoRA adapters load")
        parts.setdefault(m["module"], {})[m["part"]] = tensor
    if not parts:
        raise CheckpointError(f"{folder / ADAPTER_WEIGHTS} holds no LoRA weights")
    sites = {s.name: s for s in adapter_sites(model)}
    family = model.config.hf_family or "decoderlab"
    for name, ab in sorted(parts.items()):
        site = sites.get(name)
        if site is None:
            example = next(iter(sites))
            raise CheckpointError(f"{folder} adapts {name!r}, which this {family} model does not have (its layers "
                                  f"are named like {example!r}); the adapter was made for another model")
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"{folder}: {name} has lora_{'A' if 'A' not in ab else 'B'} missing")
        want = {"A": (config.r, site.in_features), "B": (site.stop - site.start, config.r)}
        for part, shape in want.items():
            if tuple(ab[part].shape) != shape:
                raise CheckpointError(f"{folder}: {name}.lora_{part} has shape {tuple(ab[part].shape)}, but rank "
                                      f"{config.r} on this model needs {shape}; the adapter was made for another "
                                      "model (or another rank)")
    _check_base_copies(model, sites, base_copies, folder)
    made = _attach(model, config, (sites[n] for n in sorted(parts, key=list(sites).index)))
    with torch.no_grad():
        for name, adapter in made.items():
            adapter.A.copy_(parts[name]["A"])
            adapter.B.copy_(parts[name]["B"])
    return model


def _check_base_copies(model: Transformer, sites: dict[str, AdapterSite], copies: dict[str, torch.Tensor],
                       folder: Path) -> None:
    """PEFT saves an adapted lm_head's base weight beside its adapter: it must be this model's, unchanged."""
    modules = dict(model.named_modules())
    for name, tensor in copies.items():
        site = sites.get(name)
        if site is None:
            raise CheckpointError(f"{folder} holds a base weight for {name!r}, which this model does not have; the "
                                  "adapter was made for another model")
        weight = modules[site.layer].unpacked_weight()[site.start:site.stop]
        transposed = model.config.hf_family == "gpt2" and tensor.shape != weight.shape
        tensor = tensor.t() if transposed else tensor
        if tensor.shape != weight.shape or not torch.allclose(tensor.to(weight.dtype), weight, atol=1e-6, rtol=1e-3):
            raise CheckpointError(f"{folder} replaces the base weight of {name!r} (a fully trained layer); "
                                  "decoderlab loads adapters over an unchanged base")


def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its layer's weight (W[rows] += scaling * B A) and remove the adapters; in place.
    The layers become plain (`pack` again for fast decoding); parameters stay frozen. `decoderlab.save` then
    writes a folder transformers loads as it loads any."""
    layers = lora_layers(model)
    if not layers:
        raise UserError("this model has no LoRA adapters to merge")
    for name, layer in layers.items():
        if layer.quantized is not None:
            raise UserError(f"{name} is quantized: merging into its int weight would round the update away; load "
                            "the float base, load_adapter, then merge")
        if layer.weight is getattr(model.embed, "weight", None):
            raise UserError(f"{name} shares its weight with the embedding (tied): merging would change both; keep "
                            "the adapter separate (save_adapter)")
    with torch.no_grad():
        for layer in layers.values():
            layer.unpack()  # a packed copy would go stale
            weight = layer.weight
            for a in layer.lora_adapters:
                weight[a.start:a.stop] += a.delta().to(device=weight.device, dtype=weight.dtype)
            del layer.lora_adapters
            layer.__class__ = Linear
            layer.__dict__.pop("lora_dropout", None)
    del model.lora_config
    return model
