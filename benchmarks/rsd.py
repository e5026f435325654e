"""Sampled decoding: plain sampling vs chain speculative sampling vs Recursive Speculative Decoding (RSD).

Run: .venv/bin/python benchmarks/rsd.py [--time 60s] [--draft-time 30s] [--shape 4x256] [--draft-shape 1x128]
     [--new 64] [--repeats 3] [--temperatures 0.7 1.0] [--top-p P] [--trees 2x3 3,2,1 4x2] [--k 3]
     [--threads 1]
Trains (or reuses, cached like benchmarks/speculative.py) a target and a smaller draft on the default corpus with
`decoderlab.train`, then for each temperature and code-continuation prompt times plain sampling (`generate`),
chain speculative sampling (`speculative_generate`, k drafts) and RSD (`rsd_generate`, each tree): tokens/s
(median of --repeats, the methods interleaved) and tokens per target forward pass (mean over prompts and seeds).
Every method's output is distributed as plain sampling's (tests/test_rsd.py, tests/test_speculative.py), so only
speed is compared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

import decoderlab
from decoderlab.generation import generate, rsd_generate, speculative_generate

sys.path.insert(0, str(Path(__file__).parent))
from speculative import PROMPTS, trained  # noqa: E402  (the shared training cache of the speculative benchmark)


def tree_arg(text: str) -> tuple[int | list[int], int | None]:
    """ "2x3" (width x depth) or "3,2,1" (per-depth widths)."""
    if "x" in text:
        w, d = text.split("x")
        return int(w), int(d)
    return [int(x) for x in text.split(",")], None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", default="60s", help="training time of the target")
    parser.add_argument("--draft-time", default="30s", help="training time of the draft")
    parser.add_argument("--shape", default="4x256", help='target "LAYERSxWIDTH"')
    parser.add_argument("--draft-shape", default="1x128", help='draft "LAYERSxWIDTH"')
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.7, 1.0])
    parser.add_argument("--trees", nargs="+", default=["2x3", "3,2,1", "4x2"])
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--k", type=int, default=3, help="chain speculative sampling's drafts per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "decoderlab-bench-speculative"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    target_dir = trained(cache, args.time, args.shape)
    draft_dir = trained(cache, args.draft_time, args.draft_shape)
    target, draft = (decoderlab.load(d).eval().pack(1) for d in (target_dir, draft_dir))
    tok = decoderlab.Tokenizer.from_folder(target_dir)
    print(f"target {target.num_params() / 1e6:.2f}M, draft {draft.num_params() / 1e6:.2f}M parameters, "
          f"{torch.get_num_threads()} thread(s), {args.new} new tokens, median of {args.repeats}")
    prompts = [tok.encode(p) for p in PROMPTS]
    for temperature in args.temperatures:
        sampling = dict(temperature=temperature, top_p=args.top_p, stop_tokens=[])
        methods = {"plain sampling": partial(generate, target, max_new_tokens=args.new, **sampling),
                   f"chain k={args.k}": partial(speculative_generate, target, draft, max_new_tokens=args.new,
                                                k=args.k, **sampling)}
        for spec in args.trees:
            width, depth = tree_arg(spec)
            methods[f"RSD {spec}"] = partial(rsd_generate, target, draft, max_new_tokens=args.new, width=width,
                                             depth=depth, **sampling)
        print(f"\ntemperature {temperature}" + (f", top-p {args.top_p}" if args.top_p else ""))
        # Interleaved (every method on a prompt before the next repeat), so load on a shared CPU hits all alike.
        times = {name: [[] for _ in prompts] for name in methods}
        per_pass = {name: [] for name in methods}
        for r in range(args.repeats):
            for i, ids in enumerate(prompts):
                for name, run in methods.items():
                    t0 = time.perf_counter()
                    out = run([ids], seed=1000 * i + r)
                    times[name][i].append(time.perf_counter() - t0)
                    per_pass[name].append(getattr(out, "mean_accepted", 1.0))
        base = None
        for name in methods:
            tps = args.new * len(prompts) / sum(statistics.median(t) for t in times[name])
            base = base or tps
            print(f"  {name:16s} {tps:8.1f} tok/s  {tps / base:5.2f}x  {statistics.mean(per_pass[name]):5.2f} "
                  "tokens/pass", flush=True)

if __name__ == "__main__":
    main()
