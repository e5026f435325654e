"""Synthetic reasoning tasks to train on and score: each module makes the data, writes it as training text,
and judges a model's answers."""

from . import reversal, sudoku

__all__ = ["reversal", "sudoku"]
