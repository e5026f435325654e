"""Synthetic reasoning tasks to train on and score: each module makes the data, writes it as training text,
and judges a model's answers."""

from . import sudoku

__all__ = ["sudoku"]
