"""Evaluation suites generated locally from their definitions: deterministic from a seed, written as JSONL
plus a ready lm-eval task YAML (`write_suite`)."""

from .writer import TaskSpec, write_suite

__all__ = ["TaskSpec", "write_suite"]
