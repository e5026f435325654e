"""Validation bits per byte against the training budget on the built-in default corpus (the Python standard library)
with a BPE tokenizer, as a user gets it with no flags beyond `--tokenizer bpe --time T` (the budget rule picks the
shape); each run ends with a sample.

Run: .venv/bin/python benchmarks/default_corpus_curve.py [--budgets 1m 5m 15m] [--prompt "def "] [--out curve/]

Prints one line per run, then a table; writes `curve.md`, `curve.json` and `curve.png` (bits per byte against
minutes) into --out. bits/byte makes runs with different tokenizers comparable: the loss in nats per token times
tokens per byte over ln 2, on the held-out split.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import decoderlab
from decoderlab.training import TrainConfig, parse_duration, train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", nargs="+", default=["1m", "5m", "15m"])
    ap.add_argument("--prompt", default="def ")
    ap.add_argument("--sample-tokens", type=int, default=120)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--out", default="curve")
    args = ap.parse_args()
    os.environ.setdefault("DECODERLAB_CACHE", str(Path(tempfile.gettempdir()) / "decoderlab-bench-cache"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for budget in args.budgets:
        run_dir = tempfile.mkdtemp(prefix="default-curve-")
        cfg = TrainConfig(tokenizer="bpe", time=budget, out=run_dir, seed=args.seed, sample_tokens=0)
        start = time.time()
        result = train(cfg, progress=False)
        wall = time.time() - start
        model, tokenizer = decoderlab.load(run_dir), decoderlab.Tokenizer.from_folder(run_dir)
        sample = decoderlab.generate(model, [tokenizer.encode(args.prompt)], max_new_tokens=args.sample_tokens,
                                     tokenizer=tokenizer, seed=args.seed)
        text = args.prompt + sample.texts[0]
        shape = json.loads((Path(run_dir) / "train_config.json").read_text())
        row = dict(budget=budget, seconds=parse_duration(budget), val_loss=result.val_loss,
                   bits_per_byte=result.val_bits_per_byte, steps=result.steps, tokens=result.tokens,
                   tokens_per_second=result.tokens / result.train_seconds, wall=wall,
                   shape={k: shape.get(k) for k in ("model", "context_length", "batch_size", "compile")}, sample=text)
        rows.append(row)
        print(f"{budget}: val {result.val_loss:.4f}, {result.val_bits_per_byte:.4f} bits/byte, {result.steps} steps, "
              f"{row['tokens_per_second']:,.0f} tok/s, wall {wall:.0f}s\n{text}\n", flush=True)
    lines = ["| budget | val loss | bits/byte | steps | tokens/s | shape |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        m = r["shape"]["model"]
        shape = (f"{m.get('n_layers')}x{m.get('d_model')}, context {r['shape']['context_length']}, "
                 f"batch {r['shape']['batch_size']}{', compiled' if r['shape']['compile'] else ''}")
        lines.append(f"| {r['budget']} | {r['val_loss']:.4f} | {r['bits_per_byte']:.4f} | {r['steps']} | "
                     f"{r['tokens_per_second']:,.0f} | {shape} |")
    table = "\n".join(lines)
    print(table)
    (out / "curve.md").write_text(table + "\n\n" + "\n\n".join(f"{r['budget']}:\n```\n{r['sample']}\n```"
                                                                for r in rows) + "\n")
    (out / "curve.json").write_text(json.dumps(rows, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([r["seconds"] / 60 for r in rows], [r["bits_per_byte"] for r in rows], "o-")
    ax.set_xscale("log")
    ax.set_xlabel("training budget (minutes, --time)")
    ax.set_ylabel("val bits per byte")
    ax.set_title("default corpus (Python stdlib), BPE")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    print(f"wrote {out}/curve.md, curve.json, curve.png")


if __name__ == "__main__":
    main()
