"""Text generation: `generate` (whole results) and `stream` (step by step) over one KV-cached decode loop.

The logits processors (penalties, temperature, top-k, top-p, min-p) live in `sampling` as pure functions.
"""

from . import sampling
from .engine import GenerationResult, GenerationStep, Stream, generate, stream
from .sampling import SamplingParams

__all__ = ["GenerationResult", "GenerationStep", "SamplingParams", "Stream", "generate", "sampling", "stream"]
