"""`GenerationConfig`: the generation defaults a checkpoint ships in `generation_config.json`.

Read as transformers reads it: the file's end ids (an instruct model's end-of-turn tokens often live only here),
and its sampling settings, which apply where the caller gives none. Fields the file leaves out take
transformers' global defaults (greedy; when sampling, temperature 1.0 and top-k 50). Without a file, the ids
come from `config.json` (`from_model_config`). Fields decoderlab does not use are kept and saved back unchanged.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .atomic import atomic_write_text
from .errors import CheckpointError

FILE = "generation_config.json"

# transformers' `GenerationConfig._get_default_generation_params` for the fields we use.
_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "min_p": None,
             "repetition_penalty": 1.0}


def _ids(value: Any, name: str, where: str) -> list[int]:
    """An id or a list of ids (as transformers writes them), as a list."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise CheckpointError(f"{where}: {name} must be a token id or a list of token ids, got {value!r}")
    return list(values)


@dataclass
class GenerationConfig:
    """What `generate` uses from a checkpoint's generation_config.json; None means "not set in the file".

    eos_token_id: ids that end generation (all of them, not only the tokenizer's eos).
    do_sample / temperature / top_k / top_p / min_p / repetition_penalty: the checkpoint's sampling defaults,
        used where the caller passes none (see `sampling_defaults`).
    max_new_tokens: the checkpoint's default length, if it sets one.
    extra: every other field of the file, written back on save.
    """

    eos_token_id: list[int] = field(default_factory=list)
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = FILE) -> GenerationConfig:
        if not isinstance(data, dict):
            raise CheckpointError(f"{where} must hold a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls)} - {"extra"}
        out = cls(extra={k: v for k, v in data.items() if k not in known})
        out.eos_token_id = _ids(data.get("eos_token_id"), "eos_token_id", where)
        for name in ("bos_token_id", "pad_token_id"):
            ids = _ids(data.get(name), name, where)
            setattr(out, name, ids[0] if ids else None)
        checks = {"do_sample": (bool,), "temperature": (int, float), "top_k": (int,), "top_p": (int, float),
                  "min_p": (int, float), "repetition_penalty": (int, float), "max_new_tokens": (int,)}
        for name, types in checks.items():
            value = data.get(name)
            if value is None:
                continue
            if not isinstance(value, types) or (bool not in types and isinstance(value, bool)) or (
                    isinstance(value, float) and not math.isfinite(value)):
                raise CheckpointError(f"{where}: {name} has the wrong type or value {value!r}")
            setattr(out, name, value)
        return out

    @classmethod
    def from_model_config(cls, config: Any) -> GenerationConfig:
        """The defaults transformers derives from a model config alone: its bos / eos / pad ids."""
        eos = config.eos_token_id
        return cls(eos_token_id=[] if eos is None else list(eos) if isinstance(eos, list) else [eos],
                   bos_token_id=config.bos_token_id)

    @classmethod
    def read(cls, folder: str | Path) -> GenerationConfig | None:
        """The folder's generation_config.json, or None if it has none."""
        path = Path(folder) / FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not valid JSON ({e}); fix or delete it") from None
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        if self.bos_token_id is not None:
            out["bos_token_id"] = self.bos_token_id
        if self.eos_token_id:
            out["eos_token_id"] = self.eos_token_id[0] if len(self.eos_token_id) == 1 else list(self.eos_token_id)
        if self.pad_token_id is not None:
            out["pad_token_id"] = self.pad_token_id
        for name in ("do_sample", "temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_new_tokens"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def save(self, folder: str | Path) -> None:
        """Write generation_config.json into `folder` (created if needed), atomically."""
        Path(folder).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(folder) / FILE, json.dumps(self.to_dict(), indent=2) + "\n")

    @property
    def samples(self) -> bool:
        """Whether transformers' `generate` samples by default with this config."""
        return bool(self.do_sample if self.do_sample is not None else _DEFAULTS["do_sample"])

    def sampling_defaults(self) -> dict[str, float | int | None]:
        """decoderlab's sampling arguments for a caller who gives none: greedy (temperature 0) unless the file
        says do_sample, then its temperature / top_k / top_p / min_p with transformers' defaults for the
        missing ones (top_k 50). Neutral values come back as None. repetition_penalty applies either way."""
        def value(name: str) -> Any:
            own = getattr(self, name)
            return _DEFAULTS[name] if own is None else own

        penalty = value("repetition_penalty")
        out: dict[str, float | int | None] = {
            "temperature": 0.0, "top_k": None, "top_p": None, "min_p": None,
            "repetition_penalty": None if penalty == 1.0 else float(penalty)}
        if self.samples and value("temperature") > 0:
            top_k, top_p, min_p = value("top_k"), value("top_p"), value("min_p")
            out.update(temperature=float(value("temperature")), top_k=top_k or None,
                       top_p=None if top_p >= 1.0 else float(top_p), min_p=min_p or None)
        return out
