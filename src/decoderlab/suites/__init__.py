"""Evaluation suites generated locally from their definitions: deterministic from a seed, written as JSONL
plus a ready lm-eval task YAML (`write_suite`)."""

from .kv_retrieval import KVRetrievalResult, kv_retrieval_accuracy, kv_retrieval_items, write_kv_retrieval
from .writer import TaskSpec, write_suite

__all__ = ["KVRetrievalResult", "TaskSpec", "kv_retrieval_accuracy", "kv_retrieval_items", "write_kv_retrieval",
           "write_suite"]
