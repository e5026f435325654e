"""Train a fresh model on a task's prompt/completion records: the loss on the completions only, the loop of
`decoderlab finetune` (packing with the document mask, exact resume, held-out loss, bf16 where native), started
from a newly initialised model of a chosen shape instead of a checkpoint.

A task run's folder `OUT` is the training run itself (`decoderlab.load(OUT)` loads the trained model); `OUT/task/`
holds what the run was made from: `task.json` (the task and its options), the data files and `init/`, the freshly
initialised model the run starts from (its base).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_write_text
from ..checkpoint import save as save_model
from ..config import ModelConfig
from ..errors import UserError
from ..model import Transformer
from ..tokenizer import Tokenizer
from ..training.config import RECIPE, swiglu_width
from ..training.runfolder import is_run

TASK_FOLDER = "task"
TASK_FILE = "task.json"

# From-scratch optimisation (the `decoderlab train` recipe: Muon, warmup-stable-decay), not fine-tuning's AdamW
# at 1e-4; no text samples (the task's own evaluation says how the model does).
SCRATCH = dict(optimizer="muon", lr=0.01, muon_lr=0.03, schedule="wsd", warmup=0.02, decay=0.5, lr_floor=0.05,
               batch_size=32, sample_tokens=0, show=0)


@dataclass(frozen=True)
class Shape:
    """The model a task trains: layers, width (heads of 64 dimensions) and context length in tokens."""

    layers: int = 4
    width: int = 256
    context: int = 256

    def model_config(self, vocab_size: int) -> ModelConfig:
        if self.layers < 1 or self.width < 64 or self.width % 64:
            raise UserError(f"a task model needs at least 1 layer and a width that is a multiple of 64, got "
                            f"{self.layers} layers of width {self.width}")
        return ModelConfig(vocab_size=vocab_size, context_length=self.context, **{
            **RECIPE, "n_layers": self.layers, "d_model": self.width, "n_heads": self.width // 64,
            "d_mlp": swiglu_width(self.width)})


def init_model(folder: str | os.PathLike, tokenizer: Tokenizer, shape: Shape, seed: int = 0) -> Path:
    """Write a freshly initialised model of `shape` with `tokenizer` to `folder` (a loadable model folder)."""
    torch.manual_seed(seed)
    model = Transformer(shape.model_config(tokenizer.vocab_size))
    return save_model(model, folder, tokenizer=tokenizer)


def task_info(run: str | os.PathLike) -> dict[str, Any]:
    """The `task.json` of a task run (what `train_on_task` recorded), or a one-line error."""
    path = Path(run) / TASK_FOLDER / TASK_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{run} is not a task run (no {TASK_FOLDER}/{TASK_FILE}); train one with "
                        "`decoderlab tasks train TASK --out DIR`") from None
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def train_on_task(out: str | os.PathLike, info: dict[str, Any], write_data: Any, tokenizer: Tokenizer,
                  shape: Shape = Shape(), *, resume: bool = False, overwrite: bool = False,
                  progress: bool = True, seed: int = 0, **overrides: Any):
    """Train a fresh model of `shape` in `out` on the records `write_data(folder)` writes.

    `write_data(folder)` writes the task's files into `folder` and returns {"train": path, "val": path, ...}
    (JSONL `prompt`/`completion` or `text` records); `info` (JSON-able: the task and its options) is saved as
    `task.json` beside them. `overrides` are `FinetuneConfig` fields (time=, steps=, lr=, objective=, ...), on top
    of the from-scratch defaults in `SCRATCH`. With `resume=True` the run in `out` continues exactly.
    Returns the `FinetuneResult`.
    """
    from ..finetuning.config import FinetuneConfig
    from ..finetuning.trainer import finetune

    out = Path(out)
    task_dir = out / TASK_FOLDER
    settings = {**SCRATCH, **overrides}
    # Bad settings or shape fail here, before any file is written (not after the data, leaving a half-made run).
    shape.model_config(tokenizer.vocab_size)
    FinetuneConfig(base=str(task_dir / "init"), data=["-"], out=str(out), seed=seed, **settings)
    if resume:
        saved = task_info(out)
        files = saved.get("files", {})
    else:
        if out.exists() and any(out.iterdir()) and not overwrite:
            what = "a training run" if is_run(out) else "files"
            raise UserError(f"--out {out} already holds {what}; continue a task run with --resume, replace it with "
                            "--overwrite, or choose another --out")
        if task_dir.exists():
            import shutil

            shutil.rmtree(task_dir)
        task_dir.mkdir(parents=True)
        files = {k: str(Path(v).resolve()) for k, v in write_data(task_dir / "data").items()}
        if "train" not in files:
            raise UserError("a task's data writer must return a 'train' file")
        init_model(task_dir / "init", tokenizer, shape, seed=seed)
        saved = {**info, "shape": vars(shape), "seed": seed, "files": files}
        atomic_write_text(task_dir / TASK_FILE, json.dumps(saved, indent=2) + "\n")
    val = files.get("val")
    return finetune(base=str(task_dir / "init"), data=[files["train"]], val_data=[val] if val else None,
                    out=str(out), seed=seed, resume=resume, overwrite=not resume, progress=progress,
                    **settings)
