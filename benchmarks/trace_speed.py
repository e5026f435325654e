"""Causal tracing cost: how many block runs `interp.trace` does, against rerunning every block per restoration.

Each restored run starts at its first restored block (`start_at_layer`), so the blocks before it are not rerun.
This script counts the (row x block) forwards the trace actually runs, through a hook on every block's input,
against what running every restoration from the embeddings would take, and times the trace.

    python benchmarks/trace_speed.py [--layers 12 --width 128 --tokens 12 --threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

import decoderlab
from decoderlab import interp


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=12)
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = decoderlab.ModelConfig(vocab_size=500, n_layers=args.layers, n_heads=4, d_model=args.width,
                                    context_length=64)
    model = decoderlab.Transformer(config).eval()
    ids = torch.randint(0, 500, (args.tokens,))
    subject = (2, 5)
    rows = {"run": 0}

    def count(x, hook):
        rows["run"] += x.shape[0]

    with interp.hooks(model, [(lambda n: n.endswith("hook_resid_pre"), count)]):
        interp.trace(model, ids, subject, samples=args.samples)
    ran = rows["run"]
    # Every restoration from the embeddings: the clean run, the corrupted copies, then one batch of copies per cell.
    cells = 3 * (args.tokens - subject[0]) * args.layers
    full = (1 + args.samples * (1 + cells)) * args.layers
    start = time.perf_counter()
    interp.trace(model, ids, subject, samples=args.samples)
    wall = time.perf_counter() - start
    print(f"{args.layers} layers, width {args.width}, {args.tokens} tokens, {args.samples} noised copies, "
          f"{args.threads} thread(s): {ran:,} row x block forwards run, {full:,} if every restoration started at the "
          f"embeddings ({full / ran:.2f}x the work); trace {wall:.2f} s")


if __name__ == "__main__":
    main()
