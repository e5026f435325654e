"""Writes a generated suite to disk: one JSONL file per split and an lm-eval task YAML that reads them."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..atomic import atomic_write_text
from ..errors import UserError

OUTPUT_TYPES = ("multiple_choice", "loglikelihood", "loglikelihood_rolling", "generate_until")


@dataclass
class TaskSpec:
    """How lm-eval reads a suite's records: `doc_to_text` / `doc_to_target` / `doc_to_choice` are the harness's
    own fields (a record field name or a Jinja template over the record; `doc_to_choice` may also be a list).
    `extra` is merged into the YAML as it is (e.g. `generation_kwargs`, `metadata`)."""

    name: str
    doc_to_text: str
    doc_to_target: str
    doc_to_choice: str | Sequence[str] | None = None
    output_type: str = "multiple_choice"
    metrics: Sequence[str] = ("acc", "acc_norm")
    target_delimiter: str = " "
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.output_type not in OUTPUT_TYPES:
            raise UserError(f"output_type {self.output_type!r} is not one of {', '.join(OUTPUT_TYPES)}")


def _yaml_scalar(value: Any) -> str:
    # JSON is valid YAML for scalars, lists and mappings, and quotes templates safely.
    return json.dumps(value, ensure_ascii=False)


def write_suite(out_dir: str | Path, spec: TaskSpec, splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> Path:
    """Writes `{split}.jsonl` for every split and `{spec.name}.yaml` into `out_dir`; returns the YAML's path.

    The test split is `test` (else the last split given); `train` becomes the harness's few-shot split. Data
    paths in the YAML are absolute, because lm-eval resolves `data_files` from its working directory."""
    if not splits:
        raise UserError(f"suite {spec.name!r} has no splits to write")
    out = Path(out_dir).resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create suite folder {str(out)!r} ({e.strerror or e})") from None
    files = {}
    for split, records in splits.items():
        path = out / f"{split}.jsonl"
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        files[split] = str(path)
    test = "test" if "test" in splits else list(splits)[-1]
    lines = [
        f"task: {_yaml_scalar(spec.name)}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        *(f"    {split}: {_yaml_scalar(path)}" for split, path in files.items()),
        f"output_type: {spec.output_type}",
        f"test_split: {test}",
    ]
    if "train" in splits and test != "train":
        lines.append("training_split: train")
        lines.append("fewshot_split: train")
    lines.append(f"doc_to_text: {_yaml_scalar(spec.doc_to_text)}")
    lines.append(f"doc_to_target: {_yaml_scalar(spec.doc_to_target)}")
    if spec.doc_to_choice is not None:
        choice = spec.doc_to_choice if isinstance(spec.doc_to_choice, str) else list(spec.doc_to_choice)
        lines.append(f"doc_to_choice: {_yaml_scalar(choice)}")
    lines.append(f"target_delimiter: {_yaml_scalar(spec.target_delimiter)}")
    lines.append("metric_list:")
    for metric in spec.metrics:
        higher = metric not in ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")
        lines += [f"  - metric: {metric}", "    aggregation: mean" if higher else "    aggregation: " +
                  ("weighted_perplexity" if metric.endswith("perplexity") else "bits_per_byte"),
                  f"    higher_is_better: {'true' if higher else 'false'}"]
    for key, value in spec.extra.items():
        lines.append(f"{key}: {_yaml_scalar(value)}")
    path = out / f"{spec.name}.yaml"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
