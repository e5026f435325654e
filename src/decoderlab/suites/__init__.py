"""Evaluation suites generated locally from their definitions: deterministic from a seed, written as JSONL
plus a ready lm-eval task YAML (`write_suite`); and fine-tuning sets made from the default corpus (`docstrings`)."""

from .cladder import CausalModel, ExactModel, cladder_counts, generate_cladder, write_cladder
from .corr2cause import (
    PROPERTIES,
    CausalClass,
    corr2cause_items,
    corr2cause_task,
    equivalence_classes,
    unlabeled_dags,
    write_corr2cause,
)
from .docstrings import docstring_records, write_docstrings
from .kv_retrieval import KVRetrievalResult, kv_retrieval_accuracy, kv_retrieval_items, write_kv_retrieval
from .writer import TaskSpec, write_suite

__all__ = [
    "PROPERTIES",
    "CausalClass",
    "CausalModel",
    "ExactModel",
    "KVRetrievalResult",
    "TaskSpec",
    "cladder_counts",
    "corr2cause_items",
    "corr2cause_task",
    "docstring_records",
    "equivalence_classes",
    "generate_cladder",
    "kv_retrieval_accuracy",
    "kv_retrieval_items",
    "unlabeled_dags",
    "write_cladder",
    "write_corr2cause",
    "write_docstrings",
    "write_kv_retrieval",
    "write_suite",
]
