"""Text generation: `generate` (whole results) and `stream` (step by step) over one KV-cached decode loop.

Lossless speculative decoding (Token Recycling, a draft model, multi-token heads) lives in `speculative`.
The logits processors (penalties, temperature, top-k, top-p, min-p) live in `sampling` as pure functions.
"""

from . import constrained, sampling
from .constrained import Grammar
from .counterfactual import Trace, counterfactual
from .engine import GenerationResult, GenerationStep, Stream, TokenLogprob, generate, stream
from .sampling import SamplingParams
from .speculative import SpeculativeResult, TokenRecycler, mtp_generate, speculative_generate, tree_template

__all__ = [
    "GenerationResult", "GenerationStep", "Grammar", "SamplingParams", "SpeculativeResult", "Stream", "TokenLogprob",
    "TokenRecycler", "Trace", "constrained", "counterfactual", "generate", "mtp_generate", "sampling",
    "speculative_generate", "stream", "tree_template",
]
