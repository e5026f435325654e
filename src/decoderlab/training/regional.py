"""The training forward with each transformer block through `torch.compile` (regional compilation): the blocks
share one compiled graph, and the embedding, LM head and everything outside the blocks stay eager.

Measured on this CPU (2 cores, bf16, the budget rule's compiled shapes; benchmarks/README.md): a cold compile
takes ~13 s whatever the depth, against 18 s (2 layers) and 23 s (4 layers) for the whole model, and the steps
run 10-20 % faster than the whole model's graph. The blocks are compiled for this forward only: evaluation,
sampling and anything else that calls the model directly run it eagerly, so they cause no recompilation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class BlockCompiled:
    """Call `model` (or its distributed wrapper `outer`) with every block of `model` compiled."""

    def __init__(self, model: nn.Module, outer: nn.Module | None = None) -> None:
        self.model, self.outer = model, outer if outer is not None else model
        # One torch.compile per block, all over the same code: dynamo compiles it once and guards on the module's
        # structure, so blocks of one shape reuse the first block's graph.
        self.compiled = [torch.compile(block._call_impl) for block in model.blocks]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        blocks = self.model.blocks
        for block, compiled in zip(blocks, self.compiled, strict=True):
            block._compiled_call_impl = compiled  # what nn.Module.compile sets; None runs the block eagerly
        try:
            return self.outer(*args, **kwargs)
        finally:
            for block in blocks:
                block._compiled_call_impl = None
