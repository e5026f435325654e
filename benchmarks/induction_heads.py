"""Induction heads appear in a 2-layer model trained for minutes on the default corpus, and not in a 1-layer one.

Trains two char-level models on decoderlab's default corpus (the Python standard library) with the same
recipe and time budget, one with 2 layers and one with 1, then scores every head on repeated random tokens
(`decoderlab.interp.head_scores`: attention from position i of the second copy to i - N + 1; the random
tokens are ASCII letters and digits). An induction
head needs two layers (a previous-token head composing with a later head, Olsson et al. 2022), so the 1-layer
model should have none. Also reports the in-context effect: the loss on the second copy of the random tokens
against the first (an induction head lets the model copy, so the second copy's loss falls).

Each training is the same as (2-layer shown):
    decoderlab train --layers 2 --width 64 --heads 4 --set d_mlp=256 --context 128 --batch-size 16 --dtype fp32 \
        --time 2m --out runs/induction/l2
(this script passes eval_batches=8 through the Python API so the periodic evaluations do not read the whole
validation split), then `decoderlab heads runs/induction/l2 --out runs/induction/l2`.

    python benchmarks/induction_heads.py [--time 2m] [--out runs/induction] [--reuse]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import decoderlab
from decoderlab import interp


def repeats_corpus(path: Path, lines: int = 20000, seed: int = 0) -> Path:
    """A synthetic corpus where copying is the only way to predict: each line is a random lowercase string of
    random length (8..40, so no fixed offset works, which a 1-layer model could learn) written twice."""
    import random

    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(lines):
            word = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(8, 40)))
            f.write(f"{word} {word}\n")
    return path


def train(out: Path, layers: int, args: argparse.Namespace) -> float:
    start = time.perf_counter()
    data = None if args.corpus == "default" else [str(repeats_corpus(Path(args.out) / "repeats.txt"))]
    model = {"n_layers": layers, "n_heads": args.heads, "d_model": args.width, "d_mlp": args.mlp}
    decoderlab.train(data=data, out=str(out), model=model, context_length=args.context, batch_size=args.batch_size,
                     schedule=args.schedule, dtype="fp32", time=args.time, eval_batches=8, sample_tokens=0,
                     progress=False, overwrite=True, seed=0)
    return time.perf_counter() - start


def _alnum(text: str) -> bool:
    return len(text) == 1 and text.isascii() and text.isalnum()


def copy_losses(model: decoderlab.Transformer, tokens: torch.Tensor, start: int, seq_len: int) -> tuple[float, float]:
    """Mean next-token loss over the first copy and over the second copy of the repeated tokens."""
    with torch.no_grad():
        logits = model(tokens).float()
    losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")
    first = losses[:, start:start + seq_len - 1].mean()
    second = losses[:, start + seq_len:].mean()
    return float(first), float(second)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--time", default="2m", help="training time per model")
    parser.add_argument("--out", default="runs/induction")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--mlp", type=int, default=256, help="MLP width (d_mlp)")
    parser.add_argument("--batch-size", type=int, default=16, help="training rows per step")
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=40, help="random tokens per copy")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--schedule", default="wsd", help="learning-rate schedule (wsd, cosine, constant)")
    parser.add_argument("--corpus", choices=("default", "repeats"), default="default",
                        help="default: the Python stdlib; repeats: random strings each written twice (synthetic)")
    parser.add_argument("--reuse", action="store_true", help="score runs already in --out instead of training")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: on a shared machine more threads oversubscribe the cores; "
                             "measured 10x more steps per minute with 1 than with 2 under load)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    rows = {}
    for layers in (2, 1):
        run = out / f"l{layers}"
        wall = None if args.reuse else train(run, layers, args)
        model = decoderlab.load(run)
        tok = decoderlab.Tokenizer.from_folder(run)
        prefix = [tok.bos_id] if tok.bos_id is not None else []
        # Random letters and digits: in a char model the rare characters' embeddings are barely trained.
        pool = [i for i in range(model.config.vocab_size) if _alnum(tok.decode([i]))]
        scores = interp.head_scores(model, args.seq_len, args.batch, seed=0, prefix=prefix, token_ids=pool)
        first, second = copy_losses(model, scores.tokens, len(prefix), args.seq_len)
        metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        last = dict(step=max(m["step"] for m in metrics),
                    val_loss=next((m["val_loss"] for m in reversed(metrics) if "val_loss" in m), None))
        interp.head_score_maps(scores, run / "heads.png", title=f"{layers}-layer model")
        layer, head, best = scores.best("induction")
        rows[layers] = dict(best_induction=round(best, 3), best_head=f"L{layer}H{head}",
                            best_previous=round(scores.best("previous")[2], 3),
                            mean_induction=round(float(scores.induction.mean()), 3),
                            loss_first_copy=round(first, 3), loss_second_copy=round(second, 3),
                            steps=last["step"], val_loss=last.get("val_loss"),
                            train_wall_s=None if wall is None else round(wall, 1))
        (run / "heads.json").write_text(json.dumps(scores.to_json(), indent=1))
    print(f"{'layers':>6} {'best induction':>15} {'head':>5} {'mean':>6} {'best prev-token':>16} "
          f"{'loss copy 1':>12} {'loss copy 2':>12} {'steps':>6} {'val loss':>9}")
    for layers, r in rows.items():
        print(f"{layers:>6} {r['best_induction']:>15.3f} {r['best_head']:>5} {r['mean_induction']:>6.3f} "
              f"{r['best_previous']:>16.3f} {r['loss_first_copy']:>12.3f} {r['loss_second_copy']:>12.3f} "
              f"{r['steps']:>6} {r['val_loss'] if r['val_loss'] is not None else float('nan'):>9.3f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
