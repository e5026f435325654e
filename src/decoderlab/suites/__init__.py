"""Evaluation suites generated locally from their definitions: deterministic from a seed, written as JSONL
plus a ready lm-eval task YAML (`write_suite`)."""

from .corr2cause import (
    PROPERTIES,
    CausalClass,
    corr2cause_items,
    corr2cause_task,
    equivalence_classes,
    unlabeled_dags,
    write_corr2cause,
)
from .writer import TaskSpec, write_suite

__all__ = [
    "PROPERTIES",
    "CausalClass",
    "TaskSpec",
    "corr2cause_items",
    "corr2cause_task",
    "equivalence_classes",
    "unlabeled_dags",
    "write_corr2cause",
    "write_suite",
]
