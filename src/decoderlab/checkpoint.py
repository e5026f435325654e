"""Load and save model folders in Hugging Face format (config.json + safetensors), atomically.

Loading builds the model on the meta device and assigns each tensor as it is read, so a model
never needs twice its size in memory. Folders saved for the GPT-2, Llama, Qwen2 and Mistral
families load in transformers as they are; our own variants use the same layout with our names.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import hf
from .accel import DEFAULT_GROUP_SIZE, Linear, QuantizedWeight, finish_load, quantized_layers
from .config import PRESETS, ModelConfig
from .errors import CheckpointError, ConfigError, UserError
from .generation_config import GenerationConfig
from .model import Transformer

if TYPE_CHECKING:
    from .tokenizer import Tokenizer

NATIVE_ARCHITECTURE = "DecoderlabForCausalLM"
SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def read_config(path: str | Path) -> ModelConfig:
    """The `ModelConfig` of a checkpoint folder (decoderlab's own or a supported HF family)."""
    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{folder} is not a folder; pass a checkpoint folder or a preset "
                              f"({', '.join(PRESETS)})")
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{folder} has no config.json; is it a Hugging Face-format model folder?")
    try:
        data = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); re-save the model") from None
    except RecursionError:
        raise CheckpointError(f"{cfg_path} is nested too deeply to be a model config") from None
    except OSError as e:
        raise CheckpointError(f"cannot read {cfg_path} ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg_path} must hold a JSON object of fields, not {_json_kind(data)}; "
                              "re-save the model")
    archs = data.get("architectures")
    try:
        if isinstance(archs, list) and archs[:1] == [NATIVE_ARCHITECTURE]:
            fields = data.get("decoderlab")
            if not isinstance(fields, dict):
                raise CheckpointError(f"{cfg_path} names {NATIVE_ARCHITECTURE} but has no 'decoderlab' object "
                                      "of model fields; re-save the model")
            return ModelConfig.from_dict(fields)
        return hf.from_hf_config(data)
    except ConfigError as e:
        message = str(e)  # "config.json field ..." reads "<folder>/config.json field ..."
        message = message.removeprefix("config.json") if message.startswith("config.json ") else f": {message}"
        raise ConfigError(f"{cfg_path}{message}") from None


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _json_kind(value: object) -> str:
    kinds = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


# safetensors' dtype codes, by torch's names (errors name dtypes as torch does).
_SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                       "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                       "C64": "complex64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
# Weights decoderlab loads (and casts to the model's dtype); integer, bool, complex or float8 tensors are
# quantized or damaged checkpoints, which it does not load.
WEIGHT_DTYPES = ("float32", "float16", "bfloat16", "float64")


class _TensorSource:
    """Lazy access to the tensors of a folder's weight files, by name."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._handles: dict[str, object] = {}
        self._bins: dict[str, dict[str, torch.Tensor]] = {}
        if (folder / SAFE_SINGLE).is_file():
            self.where = {n: SAFE_SINGLE for n in self._open(SAFE_SINGLE).keys()}
        elif (folder / SAFE_INDEX).is_file():
            self.where = self._index(SAFE_INDEX)
        elif (folder / BIN_SINGLE).is_file():
            self.where = {n: BIN_SINGLE for n in self._bin(BIN_SINGLE)}
        elif (folder / BIN_INDEX).is_file():
            self.where = self._index(BIN_INDEX)
        else:
            raise CheckpointError(f"{folder} has no weights: expected {SAFE_SINGLE}, {SAFE_INDEX}, "
                                  f"{BIN_SINGLE} or {BIN_INDEX}")

    def _index(self, name: str) -> dict[str, str]:
        path = self.folder / name
        try:
            weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{path} is not a valid shard index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise CheckpointError(f"{path}: 'weight_map' must map tensor names to shard file names")
        for shard in sorted(set(weight_map.values())):
            if Path(shard).name != shard:  # a shard is a file beside the index, never a path elsewhere
                raise CheckpointError(f"{path} lists shard {shard!r}, a path outside the folder; shards must be "
                                      "plain file names")
            if not (self.folder / shard).is_file():
                raise CheckpointError(f"shard {shard} listed in {name} is missing from {self.folder}")
        return weight_map

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.folder / file), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{self.folder / file} is truncated or corrupt ({_first_line(e)}); "
                                      "copy or save it again") from None
        return self._handles[file]

    def _bin(self, file: str) -> dict[str, torch.Tensor]:
        if file not in self._bins:
            try:
                state = torch.load(self.folder / file, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError:  # what weights_only raises for anything but tensors and containers
                raise CheckpointError(f"{self.folder / file} holds Python objects besides tensors (a pickle that "
                                      "could run code), so it is not loaded; use a safetensors copy") from None
            except Exception as e:  # torch raises many kinds for a damaged zip/pickle
                raise CheckpointError(f"{self.folder / file} is truncated or corrupt ({_first_line(e)}); "
                                      "copy or save it again") from None
            if not isinstance(state, dict) or not all(
                    isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
                raise CheckpointError(f"{self.folder / file} does not hold a dict of named tensors")
            self._bins[file] = state
        return self._bins[file]

    def names(self) -> set[str]:
        return set(self.where)

    def info(self, name: str) -> tuple[tuple[int, ...], str]:
        """(shape, dtype name) of a tensor, from the file's header (no data read)."""
        file = self.where[name]
        if file.endswith(".bin"):
            t = self._bin(file)[name]
            return tuple(t.shape), str(t.dtype).removeprefix("torch.")
        try:
            part = self._open(file).get_slice(name)
            code = part.get_dtype()
            return tuple(part.get_shape()), _SAFETENSORS_DTYPES.get(code, code.lower())
        except SafetensorError as e:
            raise CheckpointError(f"{self.folder / file} is truncated or corrupt ({_first_line(e)}); "
                                  "copy or save it again") from None

    def get(self, name: str) -> torch.Tensor:
        file = self.where[name]
        if file.endswith(".bin"):
            return self._bin(file)[name]
        try:
            return self._open(file).get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{self.folder / file} is truncated or corrupt ({_first_line(e)}); "
                                  "copy or save it again") from None


class _WeightPlan:
    """Which file tensors make each model parameter, checked against the config from the headers alone.

    Every tensor a parameter needs must exist, hold floating-point values and have the shape config.json
    implies, before any data is read: a bad checkpoint fails fast, and `describe` checks it too.
    """

    def __init__(self, config: ModelConfig, source: _TensorSource, folder: Path, model: Transformer) -> None:
        family = config.hf_family
        self.source, self.folder = source, folder
        if family is None:  # our own layout: tensors carry decoderlab's names
            self.by_name = {n: n for n in source.names()}
            self.ignored = None
        else:
            self.by_name = {hf.normalize_hf_name(family, n): n for n in source.names()}
            self.ignored = hf.IGNORED[family]
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        # (decoderlab name, HF names concatenated in order, transposed?)
        self.entries: list[tuple[str, tuple[str, ...], bool]] = []
        self.used: set[str] = set()
        for ours, shape in shapes.items():
            if ours == "lm_head.weight" and config.tie_embeddings:
                if family is not None:  # a tied checkpoint may still carry its (identical) head
                    self.used.add(hf.hf_names(family, ours)[0][0])
                continue
            if family is None:
                names, transpose, parts = (ours,), False, [shape]
            else:
                (names, transpose), parts = hf.hf_names(family, ours), hf.part_shapes(config, ours, shape)
            for name, want in zip(names, parts, strict=True):
                self._check(config, ours, name, want)
            self.entries.append((ours, names, transpose))
            self.used.update(names)

    def _check(self, config: ModelConfig, ours: str, name: str, want: tuple[int, ...]) -> None:
        folder = self.folder
        if name not in self.by_name:
            raise CheckpointError(f"weight {name!r} (for {ours}) is missing from {folder}; "
                                  "the checkpoint is incomplete or its config.json does not match it")
        shape, dtype = self.source.info(self.by_name[name])
        if dtype not in WEIGHT_DTYPES:
            raise CheckpointError(f"weight {name!r} in {folder} is {dtype}; decoderlab loads float32, bfloat16 "
                                  "and float16 weights (quantized or integer checkpoints are not supported)")
        if shape != want:
            hint = ""
            if ours in ("embed.weight", "lm_head.weight") and shape[:1] != want[:1]:
                hint = f"; config.json's vocab_size is {config.vocab_size}"
            raise CheckpointError(f"weight {name!r} has shape {shape} in {folder}, but config.json implies "
                                  f"{want} (for {ours}){hint}")

    def fetch(self, name: str) -> torch.Tensor:
        return self.source.get(self.by_name[name])

    def unused(self) -> list[str]:
        return sorted(n for n in set(self.by_name) - self.used if self.ignored is None or not self.ignored.search(n))


def load(path_or_preset: str | Path, device: torch.device | str | None = None,
         dtype: torch.dtype | str | None = None, pack: bool = True, *, check_finite: bool = True,
         quantize: str | None = None, group_size: int = DEFAULT_GROUP_SIZE,
         adapter: str | Path | None = None) -> Transformer:
    """A `Transformer` from a checkpoint folder, or a preset name with fresh random weights.

    `dtype=None` keeps the checkpoint's dtype (fp32 for a preset); weights go straight to `device`. A checkpoint
    loaded on the CPU comes back packed for fast decoding, one copy of each weight held (`Transformer.pack`);
    `pack=False` keeps it plain. A preset (fresh weights, for training) stays plain, in training mode.
    `check_finite` refuses weights holding NaN or infinity (also after a cast to `dtype`), naming the first;
    it is one `aminmax` pass over the weights (loading GPT-2 124M: 254 -> 280 ms, benchmarks/finite_check.py).
    `quantize` ("int8" or "int4", with `group_size` for int4) quantizes every linear layer's weight for CPU
    inference (`Transformer.quantize`); a folder written by `save` from a quantized model loads quantized as it is.
    `adapter` is a LoRA adapter folder (PEFT's layout) to put on the loaded model (`decoderlab.load_adapter`). An
    adapter folder given as the model itself (a `decoderlab finetune --lora-r` run) loads its base, as recorded in
    its adapter_config.json (`base_model_name_or_path`), with the adapter on it.
    """
    folder = Path(path_or_preset)
    if adapter is None and (folder / "adapter_config.json").is_file() and not (folder / "config.json").exists():
        base = _adapter_base(folder)
        return load(base, device, dtype, pack, check_finite=check_finite, quantize=quantize, group_size=group_size,
                    adapter=folder)
    if adapter is not None:
        from .lora import load_adapter  # lora builds on this module's model; imported when asked for

        return load_adapter(load(path_or_preset, device, dtype, pack, check_finite=check_finite,
                                 quantize=quantize, group_size=group_size), adapter)
    dtype = _resolve_dtype(dtype)
    if not Path(path_or_preset).exists() and str(path_or_preset) in PRESETS:
        model = Transformer(ModelConfig.preset(str(path_or_preset)))
        model = model.to(device=device, dtype=dtype or torch.float32)
        return model.eval().quantize(quantize, group_size) if quantize else model
    folder = Path(path_or_preset)
    config = read_config(folder)
    stored_quantization = _quantization_of(folder)
    if stored_quantization is not None:
        if quantize is not None:
            raise UserError(f"{folder} is already quantized ({_describe_quantization(stored_quantization)}); "
                            "load it without quantize")
        return finish_load(_load_quantized(folder, config, stored_quantization, device, dtype), pack)
    with torch.device("meta"):
        model = Transformer(config)
    plan = _WeightPlan(config, _TensorSource(folder), folder, model)
    state: dict[str, torch.Tensor] = {}
    finite: list[torch.Tensor] = []
    target_dtype = dtype
    for ours, names, transpose in plan.entries:
        tensor = hf.gather_weight(names, transpose, plan.fetch)
        target_dtype = target_dtype or tensor.dtype
        state[ours] = tensor.to(device=device, dtype=target_dtype)
        if check_finite:
            # min and max are NaN if any value is, and +-inf if any is infinite: one pass, no temporary.
            low, high = torch.aminmax(state[ours])
            finite.append(low.isfinite() & high.isfinite())
    if finite and not bool(torch.stack(finite).all()):
        _refuse_non_finite(plan, int(torch.stack(finite).logical_not().nonzero()[0]), target_dtype)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    unused = plan.unused()
    if unused:
        warnings.warn(f"{folder}: {len(unused)} tensor(s) not used, e.g. {unused[0]!r}", stacklevel=2)
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    model.reset_buffers()
    model.generation_config = GenerationConfig.read(folder) or GenerationConfig.from_model_config(config)
    if quantize is not None:
        model.eval().quantize(quantize, group_size)
    return finish_load(model.eval(), pack)


def _adapter_base(folder: Path) -> str:
    """The base model folder an adapter folder names (PEFT's base_model_name_or_path), which must be here."""
    try:
        base = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8")).get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as e:
        raise CheckpointError(f"{folder / 'adapter_config.json'} is unreadable ({e})") from None
    if not base or not Path(base).exists():
        raise UserError(f"{folder} is a LoRA adapter for {base!r}, which is not a folder here; load its base with "
                        f"the adapter: decoderlab.load(BASE, adapter={str(folder)!r}) (CLI: --adapter)")
    return base


# A quantized folder (`save` of a quantized model) is decoderlab's own layout: config.json names
# DecoderlabForCausalLM (transformers refuses it) and has a "quantization" object {"method", "bits",
# "group_size", "lm_head", "layers"}; model.safetensors holds each quantized layer L as L.qweight, L.scales and,
# for int4, L.zeros (`accel.QuantizedWeight.state`), every other tensor in the model's dtype by its own name.
QUANTIZATION_METHOD = "decoderlab-weight-only"


def _quantization_of(folder: Path) -> dict | None:
    data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    found = data.get("quantization")
    if found is None:
        return None
    if (not isinstance(found, dict) or found.get("method") != QUANTIZATION_METHOD or found.get("bits") not in (4, 8)
            or not isinstance(found.get("layers"), list)):
        raise CheckpointError(f"{folder / 'config.json'} has a 'quantization' object decoderlab does not read "
                              f"(expected method {QUANTIZATION_METHOD!r}, bits 8 or 4 and a list of layers)")
    return found


def _describe_quantization(q: dict) -> str:
    return f"int{q['bits']}" + (f", group size {q['group_size']}" if q.get("group_size") else "")


def _load_quantized(folder: Path, config: ModelConfig, quantization: dict, device, dtype) -> Transformer:
    if device is not None and torch.device(device).type != "cpu":
        raise UserError(f"{folder} is quantized ({_describe_quantization(quantization)}); quantized models run on "
                        "the CPU: load it with device='cpu'")
    source = _TensorSource(folder)
    with torch.device("meta"):
        model = Transformer(config)
    layers = set(quantization["layers"])
    modules = dict(model.named_modules())
    state: dict[str, torch.Tensor] = {}
    for name, meta in model.state_dict().items():
        layer = name.removesuffix(".weight")
        if layer in layers or (name == "lm_head.weight" and config.tie_embeddings):
            # Filled below (the quantized copy) or tied: a plain tensor never filled, whose pages stay untouched.
            state[name] = torch.empty(meta.shape, dtype=dtype or _stored_dtype(source, quantization))
            continue
        if name not in source.names():
            raise CheckpointError(f"tensor {name!r} is missing from {folder}; the quantized folder is incomplete")
        state[name] = source.get(name).to(dtype=dtype) if dtype else source.get(name)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    model.reset_buffers()
    for layer in sorted(layers):
        module = modules.get(layer)
        if not isinstance(module, Linear):
            raise CheckpointError(f"{folder}: quantized layer {layer!r} is not a linear layer of this model")
        try:
            parts = {part: source.get(f"{layer}.{part}") for part in ("qweight", "scales", "zeros")
                     if f"{layer}.{part}" in source.names()}
            weight = QuantizedWeight.from_state(parts, quantization["bits"], quantization.get("group_size"),
                                                module.in_features)
        except KeyError as e:
            raise CheckpointError(f"{folder}: quantized layer {layer!r} lacks its {e.args[0]} tensor") from None
        module.quantize(weight.to_dtype(dtype) if dtype else weight)
    model.quantization = {k: quantization[k] for k in ("bits", "group_size", "lm_head")}
    model.generation_config = GenerationConfig.read(folder) or GenerationConfig.from_model_config(config)
    return model.eval()


def _stored_dtype(source: _TensorSource, quantization: dict) -> torch.dtype:
    scales = f"{quantization['layers'][0]}.scales" if quantization["layers"] else None
    return source.get(scales).dtype if scales in source.names() else torch.float32


def _quantized_tensors(model: Transformer) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and config.json "quantization" object of a quantized model's folder."""
    layers = quantized_layers(model)
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        # The stored table: reading a quantized layer's weight through the module would dequantize it.
        for name, param in dict.items(module._parameters):
            if param is None or id(param) in seen or (module_name in layers and name == "weight"):
                continue
            seen.add(id(param))
            tensors[prefix + name] = param.detach().contiguous()
    for layer, weight in layers.items():
        tensors.update({f"{layer}.{part}": t.contiguous() for part, t in weight.state().items()})
    return tensors, {"method": QUANTIZATION_METHOD, **model.quantization, "layers": sorted(layers)}


def _refuse_non_finite(plan: _WeightPlan, index: int, dtype: torch.dtype) -> None:
    ours, names, transpose = plan.entries[index]
    original = hf.gather_weight(names, transpose, plan.fetch)
    name = str(dtype).removeprefix("torch.")
    if bool(original.isfinite().all()):
        raise CheckpointError(f"weight {names[0]!r} in {plan.folder} overflows {name} (values beyond its range "
                              "become infinite); load it in bfloat16 or float32")
    raise CheckpointError(f"weight {names[0]!r} in {plan.folder} holds NaN or infinite values; the checkpoint is "
                          "damaged (load(..., check_finite=False) loads it anyway)")


def _resolve_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
    name = aliases.get(name, name)
    if name not in _DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    return _DTYPES[name]


def save(model: Transformer, path: str | Path, tokenizer: Tokenizer | None = None,
         max_shard_size: int | None = None) -> Path:
    """Write `model` (and `tokenizer`) as a Hugging Face-format folder; every file is replaced atomically.

    `max_shard_size` (bytes) splits the weights into shards with an index, as transformers does.
    """
    from .lora import has_lora

    if has_lora(model):
        raise UserError("this model has LoRA adapters: merge them into the weights first (decoderlab.merge_lora) "
                        "or save them alone (decoderlab.save_adapter)")
    folder = Path(path)
    config = model.config
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {folder} ({e.strerror}); choose a writable folder") from None
    if quantized_layers(model):
        tensors, quantization = _quantized_tensors(model)
        cfg = {"architectures": [NATIVE_ARCHITECTURE], "model_type": "decoderlab", "decoderlab": config.to_dict(),
               "quantization": quantization}
    elif config.hf_family is None:
        state = {k: v.detach() for k, v in model.state_dict().items()}
        if config.tie_embeddings:
            state.pop("lm_head.weight", None)
        tensors = {k: v.contiguous() for k, v in state.items()}
        cfg = {"architectures": [NATIVE_ARCHITECTURE], "model_type": "decoderlab",
               "decoderlab": config.to_dict()}
    else:
        state = {k: v.detach() for k, v in model.state_dict().items()}
        tensors = hf.to_hf_state_dict(config, state)
        cfg = config.to_hf_config()
    cfg["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    cfg["dtype"] = cfg["torch_dtype"]

    # Stage everything in a temporary folder beside the target, then move files in one by one with
    # os.replace (atomic): a crash leaves either the old file or the new one, never half of one.
    staging = Path(tempfile.mkdtemp(prefix=".save-", dir=folder))
    try:
        written = _write_weights(tensors, staging, max_shard_size)
        (staging / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        model.generation_config.save(staging)
        if tokenizer is not None:
            tokenizer.save(staging)
        for file in sorted(staging.iterdir(), key=lambda p: p.name == "config.json"):
            os.replace(file, folder / file.name)
        stale = {SAFE_SINGLE, SAFE_INDEX, BIN_SINGLE, BIN_INDEX}
        for old in folder.iterdir():
            is_weights = old.name in stale or (old.name.startswith("model-") and old.suffix == ".safetensors")
            if is_weights and old.name not in written:
                old.unlink()
    except OSError as e:
        raise CheckpointError(f"could not save to {folder} ({e.strerror or e}); "
                              "the previous files there are unchanged") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _write_weights(tensors: dict[str, torch.Tensor], folder: Path, max_shard_size: int | None) -> set[str]:
    metadata = {"format": "pt"}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_size is None or total <= max_shard_size:
        save_file(tensors, str(folder / SAFE_SINGLE), metadata=metadata)
        return {SAFE_SINGLE}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_size:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    weight_map, files = {}, set()
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata=metadata)
        files.add(file)
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return files | {SAFE_INDEX}


def describe(path_or_preset: str | Path) -> dict[str, object]:
    """A summary of a checkpoint folder or preset, read from its config and weight headers only.

    The headers are checked as `load` checks them (every weight present, floating-point, of the right shape),
    so a folder `describe` accepts loads unless its data is damaged.
    """
    if not Path(path_or_preset).exists() and str(path_or_preset) in PRESETS:
        config, dtype, source = ModelConfig.preset(str(path_or_preset)), "float32", "preset"
    else:
        folder = Path(path_or_preset)
        config = read_config(folder)
        with torch.device("meta"):
            plan = _WeightPlan(config, _TensorSource(folder), folder, Transformer(config))
        dtype = plan.source.info(plan.by_name[plan.entries[0][1][0]])[1]
        source = str(folder)
    arch = hf.FAMILY_ARCHITECTURES.get(config.hf_family, NATIVE_ARCHITECTURE)
    windows = sorted({w for w in config.layer_windows if w is not None})
    sliding = sum(w is not None for w in config.layer_windows)
    return {
        "source": source,
        "architecture": arch,
        "parameters": config.num_params(),
        "dtype": dtype,
        "context_length": config.context_length,
        "layers": config.n_layers,
        "heads": f"{config.n_heads} (kv {config.kv_heads})",
        "width": config.d_model,
        "vocab_size": config.vocab_size,
        "positions": config.positions if config.positions != "rope" else f"rope (theta {config.rope_theta:g})",
        "attention": (f"sliding window {windows[0]} in {sliding} of {config.n_layers} layers" if windows
                      else "full (causal)"),
        "norm": config.norm,
        "activation": config.activation,
    }
