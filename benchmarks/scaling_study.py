"""The scaling study behind the budget rule (training/budget.py): full-split validation loss of a grid of shapes at
several --time budgets on tinyshakespeare (character level), each shape set by flags so the rule itself stays out.

Run: .venv/bin/python benchmarks/scaling_study.py [--budgets 10s 90s 300s] [--shapes 2x256x64x32 2x256x128x16 ...]
     [--seeds 1337] [--out study/]

A shape is LAYERSxWIDTHxCONTEXTxBATCH, optionally +cN (torch.compile; N ignored) and/or +dP (dropout P, e.g. +d0.1).
Prints one line per run as it finishes, then a table (budget x shape, median over seeds); writes `study.md`,
`study.json` and `study.png` (val loss against budget, one line per shape) into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from decoderlab.training import TrainConfig, parse_duration, train
from decoderlab.training.config import swiglu_width

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
DEFAULT_SHAPES = ["2x256x64x32", "2x256x128x16+c", "4x256x256x8+c", "4x256x256x8+c+d0.1"]  # the rule's tiers


def parse_shape(text: str) -> dict:
    """'2x256x128x16+c+d0.1' -> the TrainConfig fields that set it."""
    core, *extras = text.split("+")
    layers, width, context, batch = (int(x) for x in core.split("x"))
    model = {"n_layers": layers, "d_model": width, "n_heads": max(1, width // 64),
             "d_mlp": swiglu_width(width), "dropout": 0.0}
    compiled = False
    for extra in extras:
        if extra.startswith("c"):
            compiled = True
        elif extra.startswith("d"):
            model["dropout"] = float(extra[1:])
        else:
            raise SystemExit(f"cannot read {extra!r} in shape {text!r}: use +c (compile) or +dP (dropout P)")
    return dict(model=model, context_length=context, batch_size=batch, compile=compiled)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--budgets", nargs="+", default=["10s", "90s", "300s"])
    ap.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES)
    ap.add_argument("--seeds", nargs="+", type=int, default=[1337])
    ap.add_argument("--out", default="study")
    ap.add_argument("--replot", action="store_true", help="redraw study.png from --out's study.json, no training")
    args = ap.parse_args()
    if args.replot:
        runs = json.loads((Path(args.out) / "study.json").read_text())
        shapes = list(dict.fromkeys(r["shape"] for r in runs))
        _plot(runs, shapes, Path(args.out) / "study.png")
        return
    if not SHAKESPEARE.exists():
        raise SystemExit(f"{SHAKESPEARE} not found: this study needs ../shared/data/tinyshakespeare.txt")
    os.environ.setdefault("DECODERLAB_CACHE", str(Path(tempfile.gettempdir()) / "decoderlab-bench-cache"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for budget in args.budgets:
        for shape in args.shapes:
            for seed in args.seeds:
                fields = parse_shape(shape)
                cfg = TrainConfig(data=[str(SHAKESPEARE)], tokenizer="char", sample_tokens=0, time=budget, seed=seed,
                                  out=tempfile.mkdtemp(prefix="study-"), **fields)
                t0 = time.perf_counter()
                result = train(cfg, progress=False)
                evals = [r["val_loss"] for r in result.history if "val_loss" in r]
                train_losses = [r["train_loss"] for r in result.history if "train_loss" in r][-5:]
                run = dict(budget=budget, seconds=parse_duration(budget), shape=shape, seed=seed,
                           val=result.val_loss, best=min(evals), steps=result.steps,
                           tok_per_s=round(result.tokens / result.train_seconds),
                           train=sum(train_losses) / len(train_losses), wall=round(time.perf_counter() - t0))
                runs.append(run)
                print(f"{budget:>6} {shape:<22} seed {seed}: val {run['val']:.4f} (best {run['best']:.4f}), "
                      f"train ~{run['train']:.3f}, {run['steps']} steps, {run['tok_per_s']:,} tok/s", flush=True)
                (out / "study.json").write_text(json.dumps(runs, indent=1))
    table = ["| shape | " + " | ".join(args.budgets) + " |", "| --- |" + " ---: |" * len(args.budgets)]
    for shape in args.shapes:
        cells = []
        for budget in args.budgets:
            vals = [r["val"] for r in runs if r["shape"] == shape and r["budget"] == budget]
            cells.append(f"{statistics.median(vals):.4f}")
        table.append(f"| {shape} | " + " | ".join(cells) + " |")
    (out / "study.md").write_text("\n".join(table) + "\n")
    print("\nval loss (median over seeds)\n" + "\n".join(table))
    _plot(runs, args.shapes, out / "study.png")


def _plot(runs: list[dict], shapes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # A run whose compilation ate its budget ends near the initial loss (~4.2): drawn at the top edge, so that
    # the differences that matter (hundredths) stay readable.
    top = min(2.2, max(r["val"] for r in runs) + 0.02)
    for shape in shapes:
        points = sorted({(r["seconds"], statistics.median(q["val"] for q in runs if q["shape"] == shape
                                                          and q["seconds"] == r["seconds"]))
                         for r in runs if r["shape"] == shape})
        ys = [min(p[1], top) for p in points]
        line, = ax.plot([p[0] for p in points], ys, marker="o", label=shape)
        for (x, y), shown in zip(points, ys, strict=True):
            if y > top:
                ax.annotate(f"{y:.2f}", (x, shown), textcoords="offset points", xytext=(4, -10), fontsize=7,
                            color=line.get_color())
    ax.set_ylim(top=top + 0.02)
    ax.set_xscale("log")
    ax.set_xlabel("training time (s), 2 CPU cores")
    ax.set_ylabel("val loss (full split, nats/char)")
    ax.set_title("tinyshakespeare, char level: val loss by budget and shape")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
