"""Run folders: what a training run writes into its `--out` folder, and the rules that keep two runs from mixing.

A fresh run starts only in a new or empty folder (created with its parents). A folder that already holds a run
(`train_config.json` or `checkpoints/`) is refused unless the caller resumes it or passes `overwrite`, which first
removes exactly the files a run writes (`RUN_FILES`, `RUN_DIRS`, weight shards and leftovers of interrupted
writes) and nothing else. A folder holding a model that was not trained there (`config.json` or weights without
`train_config.json`, e.g. a Hugging Face download) is refused even with `overwrite`. Any other non-empty folder is
refused unless `overwrite`, which then trains beside the files already there, deleting none of them.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from ..errors import UserError

RUN_CONFIG = "train_config.json"
RUN_FILES = (RUN_CONFIG, "metrics.jsonl", "loss.png", "config.json", "generation_config.json", "model.safetensors",
             "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
             "adapter_config.json", "adapter_model.safetensors")  # the last two: a LoRA fine-tuning run's
RUN_DIRS = ("checkpoints", "best")
_MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def is_run(folder: Path) -> bool:
    return (folder / RUN_CONFIG).is_file() or (folder / "checkpoints").is_dir()


def _run_owned(path: Path) -> bool:
    name = path.name
    if path.is_dir():
        return name in RUN_DIRS or name.startswith(".save-")  # checkpoint.save's staging folders
    return (name in RUN_FILES or (name.startswith("model-") and name.endswith(".safetensors"))
            or (name.endswith(".tmp") and any(name.startswith(f".{f}.") for f in RUN_FILES))  # atomic_write's
            or name in (".write-test", ".loss.png.tmp.png"))


def check_out_folder(folder: Path, overwrite: bool, note: Callable[[str], None] = print) -> None:
    """Refuse (one-line UserError) an `--out` that would mix two runs or replace a model; with `overwrite`, clear
    the earlier run's own files."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file, not a folder; choose another --out")
    if not folder.exists():
        return
    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        raise UserError(f"cannot read --out {folder} ({e.strerror or e}); choose another --out") from None
    if not entries:
        return
    if is_run(folder):
        if not overwrite:
            raise UserError(f"--out {folder} already holds a training run; continue it with --resume {folder}, "
                            "replace it with --overwrite, or choose another --out")
        removed = [p for p in entries if _run_owned(p)]
        for path in removed:
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        kept = len(entries) - len(removed)
        note(f"--overwrite: removed the earlier run in {folder} ({', '.join(p.name for p in removed)})"
             + (f"; {kept} other file(s) left as they were" if kept else ""))
        return
    model = [p.name for p in entries if p.name == "config.json" or p.suffix in _MODEL_SUFFIXES]
    if model:
        raise UserError(f"--out {folder} holds a model that was not trained there ({', '.join(model[:3])}); "
                        "--overwrite never replaces one — choose another --out")
    if not overwrite:
        shown = ", ".join(p.name for p in entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise UserError(f"--out {folder} is not empty (it holds {shown}); choose a new or empty folder, or pass "
                        "--overwrite to train into it beside those files")
