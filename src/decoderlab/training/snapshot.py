"""Resumable snapshots (`checkpoints/step-N/`): written whole, proven complete by a manifest, loaded safely.

A snapshot holds the model and tokenizer (Hugging Face layout), `optimizer.pt` and `state.json`. It is written in a
staging folder, every file fsynced, then `manifest.json` (each file's size and SHA-256) is written LAST, and the
folder is renamed into place. Resume takes the newest snapshot whose manifest exists and matches its files, and
says which newer ones it skipped and why. SHA-256 runs at ~1.4 GB/s here (SHA-NI), so hashing a snapshot costs
about a millisecond per 1.4 MB: ~15 ms for the default recipe (model + optimizer ~21 MB).

`optimizer.pt` holds only tensors, numbers, strings, lists and dicts, and is read with `torch.load(...,
weights_only=True)`: a planted pickle payload is refused, never run.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text
from ..errors import UserError

MANIFEST_FILE = "manifest.json"
STATE_FILE = "state.json"
OPTIM_FILE = "optimizer.pt"
SNAPSHOT_DIR = "checkpoints"
MANIFEST_FORMAT = "decoderlab.snapshot"
# What a snapshot cannot resume without (the weights are checked by the model loader, which names what is missing).
REQUIRED = (STATE_FILE, OPTIM_FILE, "tokenizer.json")
# ... and the model's config: a whole model's, or a LoRA adapter's (a fine-tuning run with a frozen base).
CONFIG_FILES = ("config.json", "adapter_config.json")
_NAME = re.compile(r"step-(\d+)")
_HASH_CHUNK = 1 << 20


def snapshot_name(step: int) -> str:
    return f"step-{step:07d}"


def snapshot_step(folder: Path) -> int | None:
    """The step of a `step-N` folder, or None for anything else."""
    match = _NAME.fullmatch(folder.name)
    return int(match.group(1)) if match else None


def snapshots(run_dir: Path) -> list[Path]:
    """The run's `checkpoints/step-N` folders, oldest first (complete or not)."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and snapshot_step(p) is not None]
    return sorted(found, key=lambda p: snapshot_step(p))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Make a folder's entries (a rename into it) durable, where the platform allows."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported here (the data is still fsynced)
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(folder: Path, step: int) -> None:
    """fsync every file of `folder`, then write its manifest (sizes and hashes) last, then fsync the folder."""
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name == MANIFEST_FILE:
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        files[path.name] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": MANIFEST_FORMAT, "version": 1, "step": step, "files": files}
    atomic_write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")
    fsync_dir(folder)


def problem(folder: Path) -> str | None:
    """Why `folder` is not a complete, intact snapshot, or None when it is."""
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        return f"no {MANIFEST_FILE} (its save did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise TypeError
        listed = {str(name): (int(entry["size"]), str(entry["sha256"])) for name, entry in files.items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return f"its {MANIFEST_FILE} is unreadable"
    missing = [name for name in REQUIRED if name not in listed]
    if not any(name in listed for name in CONFIG_FILES):
        missing.append(CONFIG_FILES[0])
    if missing:
        return f"its manifest does not list {missing[0]}"
    for name, (size, digest) in listed.items():
        if "/" in name or "\\" in name or name in (".", ".."):
            return f"its manifest names a file outside the snapshot ({name!r})"
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{name} has {actual:,} bytes, its manifest says {size:,} (truncated or replaced)"
        if _sha256(path) != digest:
            return f"{name} does not match the hash in its manifest (corrupt or modified)"
    return None


def find_snapshot(run_dir: Path, note: Callable[[str], None] = print) -> Path:
    """The newest complete, intact snapshot of `run_dir`; `note` is told about each newer one skipped, and why."""
    candidates = snapshots(run_dir)
    for folder in reversed(candidates):
        reason = problem(folder)
        if reason is None:
            return folder
        note(f"skipping snapshot {folder}: {reason}")
    if not candidates:
        raise UserError(f"{run_dir} has no snapshot to resume from (no {SNAPSHOT_DIR}/step-*/: the run stopped "
                        "before its first save); start it again with --overwrite")
    raise UserError(f"no complete snapshot in {Path(run_dir) / SNAPSHOT_DIR} ({len(candidates)} found, none with a "
                    "manifest matching its files); the run cannot be resumed — start a new one")


def remove(folder: Path) -> None:
    """Delete a snapshot: its manifest first, so a crash part-way leaves an incomplete snapshot, never a bad one."""
    (folder / MANIFEST_FILE).unlink(missing_ok=True)
    shutil.rmtree(folder, ignore_errors=True)


def prune(run_dir: Path, step: int, keep_last: int) -> None:
    """Keep the newest `keep_last` snapshots up to `step` (newer ones, skipped on resume, are left to be replaced)."""
    kept = [p for p in snapshots(run_dir) if snapshot_step(p) <= step]
    for old in kept[:-keep_last]:
        remove(old)


def load_tensors(path: Path) -> Any:
    """`torch.load(path, weights_only=True)` on CPU; anything else than plain tensors and containers is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - the unpickler raises many kinds; all mean the same to the user
        text = str(e)
        detail = next((line.strip() for line in text.splitlines()
                       if "GLOBAL" in line or "global" in line.lower()), text.splitlines()[0] if text else "")
        raise UserError(f"{path} cannot be read as plain tensors ({type(e).__name__}: {detail[:200]}); it is corrupt "
                        "or was not written by decoderlab — nothing in it was run; delete that snapshot folder to "
                        "resume from an earlier one") from None


def read_state(snapshot: Path) -> dict[str, Any]:
    """The snapshot's state.json, checked for the fields resume needs."""
    path = snapshot / STATE_FILE
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        ok = (isinstance(state, dict) and isinstance(state["step"], int) and isinstance(state["tokens"], int)
              and isinstance(state["train_seconds"], int | float) and isinstance(state["rng"]["torch"], list)
              and isinstance(state["schedule"], dict))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        ok = False
    if not ok:
        raise UserError(f"{path} is not a decoderlab training state (unreadable or missing fields); "
                        "delete that snapshot folder to resume from an earlier one")
    return state
