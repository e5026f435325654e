"""Activation-patching sweeps: one patched copy per forward pass vs several side by side in one pass
(`interp.sweep(..., batch=N)`), same cells, same results.

    python benchmarks/patching_speed.py                   # 6 layers x width 256, 32 tokens: resid_pre by pos

Prints the median time of each batch size over --repeats runs and checks that the grids agree.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import decoderlab
from decoderlab import interp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--act", default="resid_pre", help="Activation swept by position (resid_pre, z, ...).")
    parser.add_argument("--batches", default="1,8,32", help="Patched copies per forward pass to compare.")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=512, d_model=args.width, n_layers=args.layers,
                                                          n_heads=args.width // 64, context_length=256)).eval()
    clean = torch.randint(0, 512, (1, args.tokens))
    corrupt = clean.clone()
    corrupt[0, args.tokens // 2] = (corrupt[0, args.tokens // 2] + 1) % 512
    _, cache = interp.run_with_cache(model, corrupt)
    metric = interp.logit_diff(1, 2)
    grids, times = {}, {}
    for batch in [int(b) for b in args.batches.split(",")]:
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            grids[batch] = interp.sweep(model, clean, cache, args.act, metric, by="pos", batch=batch)
            runs.append(time.perf_counter() - t0)
        times[batch] = statistics.median(runs)
    first = next(iter(grids))
    cells = grids[first].numel()
    print(f"{args.act} by position: {cells} cells, {args.layers} layers x width {args.width}, "
          f"{args.tokens} tokens, {torch.get_num_threads()} threads")
    for batch, t in times.items():
        agree = (grids[batch] - grids[first]).abs().max().item()
        print(f"  batch {batch:3d}: {t:.3f} s  ({times[first] / t:.1f}x)  max |diff| vs batch {first}: {agree:.1e}")


if __name__ == "__main__":
    main()
