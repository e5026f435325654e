"""Reasoning tasks side by side at one budget: Sudoku in solver vs row-major vs random order; the reversal curse
under plain, reverse-augmented, chunk-permuted and BICO training.

Run: .venv/bin/python benchmarks/reasoning_tasks.py sudoku [--size 6] [--time 10m] [--orders solver row-major
     random] [--puzzles 100000] [--score 1000] [--beam 3] [--layers 4] [--width 128] [--threads 1] [--out DIR]
     .venv/bin/python benchmarks/reasoning_tasks.py reversal [--time 4m] [--arms plain reverse permute bico]
     [--facts 100] [--layers 4] [--width 256] [--threads 1] [--seed 0] [--out DIR]
Sudoku: each order trains the same fresh model (`decoderlab.tasks.sudoku.train_model`: the same puzzles, the loss
on the moves only) for the same time, then solves the same held-out puzzles greedily (and with a beam if asked);
one table: steps, tokens, held-out loss, cell accuracy and puzzles fully solved per order. Reversal: each arm
trains a fresh model on the same facts for the same time (`decoderlab.tasks.reversal.run_experiment`); one row
per (arm, subset, direction): exact match, top-1/top-5 and mean rank of the true answer among all candidates,
with the chance baseline. The runs stay in --out (default a temporary folder): `decoderlab tasks eval RUN`
scores them again (e.g. `--beam 5`).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from decoderlab.tasks import sudoku


def sudoku_table(args: argparse.Namespace) -> list[dict]:
    out = Path(args.out or tempfile.mkdtemp(prefix="reasoning-"))
    rows = []
    for order in args.orders:
        run = out / f"sudoku{args.size}-{order}"
        # "solver-shuffled": the solver's rounds, the fills within each in a seeded random order
        result = sudoku.train_model(run, size=args.size, order=order.removesuffix("-shuffled"),
                                    shuffle_rounds=order.endswith("-shuffled"), puzzles=args.puzzles,
                                    heldout=args.score, seed=args.seed, layers=args.layers, width=args.width,
                                    time=args.time, progress=False, overwrite=True)
        row = {"order": order, "steps": result.steps, "tokens": result.tokens,
               "seconds": round(result.train_seconds, 1), "val_loss": result.val_loss}
        for beam in sorted({1, *args.beam}):
            score = sudoku.evaluate_model(run, count=args.score, beam=beam)
            row[f"beam{beam}"] = {"cell": score.cell_accuracy, "solved": score.puzzle_accuracy,
                                  "verdicts": score.verdict_counts}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nSudoku {args.size}x{args.size}, {args.layers} layers x {args.width}, {args.time} per order, "
          f"{args.score} held-out puzzles ({torch.get_num_threads()} threads); runs in {out}")
    beams = sorted({1, *args.beam})
    head = "| order | steps | tokens | held-out loss | " + " | ".join(
        f"cells ({'greedy' if b == 1 else f'beam {b}'}) | solved ({'greedy' if b == 1 else f'beam {b}'})"
        for b in beams) + " |"
    print(head)
    print("|" + "---|" * (4 + 2 * len(beams)))
    for row in rows:
        print(f"| {row['order']} | {row['steps']} | {row['tokens']:,} | {row['val_loss']:.3f} | " + " | ".join(
            f"{row[f'beam{b}']['cell']:.1%} | {row[f'beam{b}']['solved']:.1%}" for b in beams) + " |")
    return rows


def reversal_table(args: argparse.Namespace) -> list[dict]:
    from decoderlab.tasks import reversal

    out = Path(args.out or tempfile.mkdtemp(prefix="reasoning-"))
    rows = reversal.run_experiment(out, arms=args.arms, time=args.time, per_subset=args.facts, layers=args.layers,
                                   width=args.width or 256, seed=args.seed)
    print(f"\nReversal, {args.facts} facts per subset, {args.layers} layers x {args.width or 256}, {args.time} per "
          f"arm ({torch.get_num_threads()} threads); runs in {out}")
    print(reversal.format_rows(rows))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=["sudoku", "reversal"])
    p.add_argument("--arms", nargs="+", default=["plain", "reverse", "permute", "bico"])
    p.add_argument("--facts", type=int, default=100, help="reversal: facts per subset")
    p.add_argument("--size", type=int, default=6)
    p.add_argument("--orders", nargs="+", default=list(sudoku.ORDERS), help="solver, row-major, random or "
                   "solver-shuffled (within-round shuffles)")
    p.add_argument("--time", default=None, help="per order / arm (default 10m for sudoku, 4m for reversal)")
    p.add_argument("--puzzles", type=int, default=100_000)
    p.add_argument("--score", type=int, default=1000, help="held-out puzzles scored")
    p.add_argument("--beam", type=int, nargs="*", default=[], help="beam widths scored besides greedy")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=None, help="default 128 for sudoku, 256 for reversal")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.task == "reversal":
        args.time = args.time or "4m"
        reversal_table(args)
    else:
        args.time, args.width = args.time or "10m", args.width or 128
        sudoku_table(args)


if __name__ == "__main__":
    main()
