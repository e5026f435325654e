"""Running lm-eval tasks on a decoderlab model: task names, local task YAML files and folders, the harness's table.

A thin layer over `lm_eval.simple_evaluate`: it finds the tasks (a local YAML file or folder is indexed on its own,
without scanning the harness's thousands of built-in task files unless a built-in name is asked for), runs them
with `DecoderlabLM`, and returns the harness's results dictionary unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager
from lm_eval.utils import make_table

from ..errors import UserError
from .model import DecoderlabLM

_TASK_KINDS = ("task", "py_task")


def _kind(entry: Any) -> str:
    return str(getattr(entry.kind, "name", entry.kind)).lower()


def resolve_tasks(tasks: Sequence[str], include: Sequence[str | Path] = ()) -> tuple[list[str], TaskManager]:
    """Task names and the TaskManager that knows them. `tasks` holds task (or group) names, task YAML files
    (their `task:` names) and folders (every task in them); `include` adds folders of task YAMLs to look names up
    in, as the harness's `--include_path` does."""
    if not tasks:
        raise UserError("no tasks given; pass --tasks NAME,FILE.yaml,FOLDER")
    folders, files, names = [], [], []
    for path in include:
        p = Path(path)
        if not p.exists():
            raise UserError(f"--include {str(path)!r} does not exist; give a folder (or file) of task YAMLs")
        folders.append(p.resolve() if p.is_dir() else p.resolve().parent)
    for spec in tasks:
        p = Path(spec)
        if spec.endswith((".yaml", ".yml")) or p.exists():
            if p.is_dir():
                folders.append(p.resolve())
                files.append(("dir", p.resolve()))
            elif p.is_file():
                folders.append(p.resolve().parent)
                files.append(("file", p.resolve()))
            else:
                raise UserError(f"task file {spec!r} does not exist")
        else:
            names.append(spec)
    manager = _manager(folders, defaults=False)
    if any(name not in manager.task_index for name in names):
        manager = _manager(folders, defaults=True)  # a built-in task: index the harness's own task files too
    resolved: list[str] = []
    for kind, path in files:
        found = sorted(name for name, entry in manager.task_index.items() if _kind(entry) in _TASK_KINDS
                       and entry.yaml_path is not None and (Path(entry.yaml_path).resolve() == path if kind == "file"
                                                            else path in Path(entry.yaml_path).resolve().parents))
        if not found:
            raise UserError(f"{str(path)!r} holds no lm-eval task (a YAML with a `task:` name)")
        resolved += [n for n in found if n not in resolved]
    for name in names:
        if name not in manager.task_index:
            raise UserError(f"unknown task {name!r}; give a task name the harness knows (`lm-eval ls tasks`), a task "
                            "YAML file or folder, or --include FOLDER with its YAML")
        if name not in resolved:
            resolved.append(name)
    return resolved, manager


def _manager(folders: list[Path], defaults: bool) -> TaskManager:
    try:
        return TaskManager(include_path=[str(f) for f in dict.fromkeys(folders)] or None, include_defaults=defaults)
    except Exception as e:  # the harness's YAML parser reports a bad file with its own exception types
        raise UserError(f"cannot read the task YAMLs: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                        ) from None


def evaluate(model: str | Path | DecoderlabLM, tasks: Sequence[str], *, include: Sequence[str | Path] = (),
             num_fewshot: int | None = None, limit: int | float | None = None, batch_size: int = 8,
             device: str | None = None, log_samples: bool = False, seed: bool = True,
             **model_args: Any) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` of `model` (a folder `decoderlab.load` reads, or a `DecoderlabLM`) on `tasks`
    (names, task YAML files, folders; see `resolve_tasks`). Returns the harness's results dictionary.
    `seed=False` leaves Python's, numpy's and torch's global generators alone (the harness seeds them by default;
    few-shot sampling keeps its own seed either way)."""
    names, manager = resolve_tasks(tasks, include)
    if not isinstance(model, DecoderlabLM):
        if not Path(model).exists():
            raise UserError(f"model folder {str(model)!r} does not exist; give an HF folder or a decoderlab run")
        model = DecoderlabLM(pretrained=str(model), batch_size=batch_size, device=device, **model_args)
    # The harness logs every dataset and metric default at INFO/WARNING; the table is what a user reads.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    try:
        seeds = {} if seed else dict(random_seed=None, numpy_random_seed=None, torch_random_seed=None)
        return simple_evaluate(model=model, tasks=names, task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                               log_samples=log_samples, **seeds)
    except (FileNotFoundError, KeyError) as e:
        raise UserError(f"lm-eval could not run {', '.join(names)}: {str(e).splitlines()[0]}") from None


def results_table(results: dict[str, Any]) -> str:
    """The harness's own Markdown table of a results dictionary (and its groups table, when there are groups)."""
    table = make_table(results)
    if results.get("groups"):
        table += "\n" + make_table(results, "groups")
    return table
