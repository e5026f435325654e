"""Evaluation suites generated locally from their definitions: deterministic from a seed, written as JSONL
plus a ready lm-eval task YAML (`write_suite`)."""

from .cladder import CausalModel, ExactModel, cladder_counts, generate_cladder, write_cladder
from .writer import TaskSpec, write_suite

__all__ = ["CausalModel", "ExactModel", "TaskSpec", "cladder_counts", "generate_cladder", "write_cladder",
           "write_suite"]
