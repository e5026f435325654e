"""Load and save model folders in Hugging Face format (config.json + safetensors), atomically.

Loading builds the model on the meta device and assigns each tensor as it is read, so a model
never needs twice its size in memory. Folders saved for the GPT-2, Llama, Qwen2 and Mistral
families load in transformers as they are; our own variants use the same layout with our names.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import hf
from .accel import finish_load
from .config import FAMILY_ARCHITECTURES, HF_ARCHITECTURES, PRESETS, ModelConfig
from .errors import CheckpointError, ConfigError
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
        data = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON ({e}); re-save the model") from None
    if (data.get("architectures") or [None])[0] == NATIVE_ARCHITECTURE:
        return ModelConfig.from_dict(data["decoderlab"])
    if (data.get("architectures") or [None])[0] not in HF_ARCHITECTURES:
        arch = (data.get("architectures") or ["(none)"])[0]
        raise ConfigError(f"unsupported architecture {arch!r} in {cfg_path}; supported: "
                          f"{', '.join([*HF_ARCHITECTURES, NATIVE_ARCHITECTURE])}")
    try:
        return ModelConfig.from_hf_config(data)
    except KeyError as e:
        raise CheckpointError(f"{cfg_path} lacks the field {e.args[0]!r} its architecture needs") from None


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
        try:
            weight_map = json.loads((self.folder / name).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{self.folder / name} is not a valid shard index ({e})") from None
        for shard in set(weight_map.values()):
            if not (self.folder / shard).is_file():
                raise CheckpointError(f"shard {shard} listed in {name} is missing from {self.folder}")
        return weight_map

    def _open(self, file: str):
        if file not in self._handles:
            try:
                self._handles[file] = safe_open(str(self.folder / file), framework="pt", device="cpu")
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{self.folder / file} is truncated or corrupt ({e}); "
                                      "copy or save it again") from None
        return self._handles[file]

    def _bin(self, file: str) -> dict[str, torch.Tensor]:
        if file not in self._bins:
            try:
                self._bins[file] = torch.load(self.folder / file, map_location="cpu", weights_only=True,
                                              mmap=True)
            except Exception as e:  # torch raises many kinds for a damaged zip/pickle
                raise CheckpointError(f"{self.folder / file} is truncated or corrupt ({e}); "
                                      "copy or save it again") from None
        return self._bins[file]

    def names(self) -> set[str]:
        return set(self.where)

    def get(self, name: str) -> torch.Tensor:
        file = self.where[name]
        if file.endswith(".bin"):
            return self._bin(file)[name]
        try:
            return self._open(file).get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{self.folder / file} is truncated or corrupt ({e}); "
                                  "copy or save it again") from None


def load(path_or_preset: str | Path, device: torch.device | str | None = None,
         dtype: torch.dtype | str | None = None, pack: bool = True) -> Transformer:
    """A `Transformer` from a checkpoint folder, or a preset name with fresh random weights.

    `dtype=None` keeps the checkpoint's dtype (fp32 for a preset); weights go straight to `device`. A checkpoint
    loaded on the CPU comes back packed for fast decoding, one copy of each weight held (`Transformer.pack`);
    `pack=False` keeps it plain. A preset (fresh weights, for training) stays plain, in training mode.
    """
    dtype = _resolve_dtype(dtype)
    if not Path(path_or_preset).exists() and str(path_or_preset) in PRESETS:
        model = Transformer(ModelConfig.preset(str(path_or_preset)))
        return model.to(device=device, dtype=dtype or torch.float32)
    folder = Path(path_or_preset)
    config = read_config(folder)
    source = _TensorSource(folder)
    family = config.hf_family
    if family is None:  # our own layout: tensors carry decoderlab's names
        by_name = {n: n for n in source.names()}
        ignored = None
        def locate(ours: str) -> tuple[tuple[str, ...], bool]:
            return (ours,), False
    else:
        by_name = {hf.normalize_hf_name(family, n): n for n in source.names()}
        ignored = hf.IGNORED[family]
        locate = partial(hf.hf_names, family)
    available = set(by_name)
    def fetch(name: str) -> torch.Tensor:
        return source.get(by_name[name])

    with torch.device("meta"):
        model = Transformer(config)
    expected = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    target_dtype = dtype
    for ours, meta in expected.items():
        if ours == "lm_head.weight" and config.tie_embeddings:
            continue
        names, transpose = locate(ours)
        missing = [n for n in names if n not in available]
        if missing:
            raise CheckpointError(f"weight {missing[0]!r} (for {ours}) is missing from {folder}; "
                                  "the checkpoint is incomplete or its config.json does not match it")
        tensor = hf.gather_weight(names, transpose, fetch)
        used.update(names)
        if tuple(tensor.shape) != tuple(meta.shape):
            raise CheckpointError(f"weight {names[0]!r} has shape {tuple(tensor.shape)} in {folder}, "
                                  f"but config.json implies {tuple(meta.shape)} (for {ours})")
        if target_dtype is None and tensor.is_floating_point():
            target_dtype = tensor.dtype
        state[ours] = tensor.to(device=device, dtype=target_dtype or tensor.dtype)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
        used.add(locate("lm_head.weight")[0][0])
    unused = sorted(n for n in available - used if ignored is None or not ignored.search(n))
    if unused:
        warnings.warn(f"{folder}: {len(unused)} tensor(s) not used, e.g. {unused[0]!r}", stacklevel=2)
    model.load_state_dict(state, assign=True, strict=True)
    model.tie_weights()
    model.reset_buffers()
    return finish_load(model.eval(), pack)


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
    folder = Path(path)
    config = model.config
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {folder} ({e.strerror}); choose a writable folder") from None
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if config.hf_family is None:
        if config.tie_embeddings:
            state.pop("lm_head.weight", None)
        tensors = {k: v.contiguous() for k, v in state.items()}
        cfg = {"architectures": [NATIVE_ARCHITECTURE], "model_type": "decoderlab",
               "decoderlab": config.to_dict()}
    else:
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
    """A summary of a checkpoint folder or preset, read from its config and weight headers only."""
    if not Path(path_or_preset).exists() and str(path_or_preset) in PRESETS:
        config, dtype, source = ModelConfig.preset(str(path_or_preset)), "float32", "preset"
    else:
        folder = Path(path_or_preset)
        config = read_config(folder)
        tensors = _TensorSource(folder)
        first = min(tensors.names())
        dtype = str(tensors.get(first).dtype).removeprefix("torch.")
        source = str(folder)
    arch = FAMILY_ARCHITECTURES.get(config.hf_family, NATIVE_ARCHITECTURE)
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
        "norm": config.norm,
        "activation": config.activation,
    }

