"""Adapting a causal model to masked diffusion on tinyshakespeare: the diffusion NLL bound before vs after.

Trains a causal char model with `decoderlab train` (or takes `--base RUN`), adapts it with
`decoderlab.finetune(..., objective="diffusion")` on text records cut from the training 90 % of the file, and prints
masked diffusion's Monte Carlo bound on the NLL (`masked.diffusion_nll`, nats per predicted token, shifted: slot i
predicts token i + 1) on windows of the held-out last 10 %: the base model under causal and under full attention
(with its new mask token at the mean embedding), and the adapted model under its saved default (full attention).
The same noise (seed) for every model. For reference it also prints the base model's causal next-token loss there.

    taskset -c 1 env OMP_NUM_THREADS=1 python benchmarks/diffusion_adapt.py --base-time 75s --adapt-time 60s
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import decoderlab
from decoderlab import masks
from decoderlab.masked import diffusion_nll
from decoderlab.training.config import parse_duration

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--out", default="runs/diffusion_adapt")
    ap.add_argument("--base", default=None, help="a causal run to adapt (default: train one for --base-time)")
    ap.add_argument("--base-time", default="75s")
    ap.add_argument("--adapt-time", default="60s")
    ap.add_argument("--anneal-fraction", type=float, default=0.5, help="annealing: this share of the run's steps")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--windows", type=int, default=256, help="held-out windows of 64 characters scored")
    ap.add_argument("--samples", type=int, default=8, help="noise levels t per window (stratified)")
    args = ap.parse_args()
    out = Path(args.out)
    text = Path(args.data).read_text(encoding="utf-8")
    cut = int(len(text) * 0.9)  # decoderlab train's validation split of one file: its last 10 % of characters

    base = Path(args.base) if args.base else out / "base"
    if args.base is None:
        t0 = time.perf_counter()
        decoderlab.train(data=[args.data], tokenizer="char", out=str(base), time=args.base_time, progress=False,
                         sample_tokens=0, overwrite=True)
        print(f"base: decoderlab train --tokenizer char --time {args.base_time} ({time.perf_counter() - t0:.0f}s)")
    context = decoderlab.read_config(base).context_length

    records = out / "train.jsonl"
    records.parent.mkdir(parents=True, exist_ok=True)
    records.write_text("".join(json.dumps({"text": text[i:i + context]}) + "\n"
                               for i in range(0, cut - context, context)))
    # The run's length in steps is fixed after calibration; anneal over a share of an estimate made the same way.
    t0 = time.perf_counter()
    probe = decoderlab.finetune(str(base), data=str(records), out=str(out / "probe"), objective="diffusion", steps=5,
                                batch_size=32, progress=False, overwrite=True, lr=args.lr, val_fraction=0.01)
    seconds = parse_duration(args.adapt_time)
    steps = max(2, int(seconds / (probe.train_seconds / probe.steps)))
    anneal = max(1, int(args.anneal_fraction * steps))
    result = decoderlab.finetune(str(base), data=str(records), out=str(out / "adapted"), objective="diffusion",
                                 steps=steps, anneal_steps=anneal, batch_size=32, lr=args.lr, progress=False,
                                 overwrite=True, val_fraction=0.01, eval_interval=steps)
    print(f"adapted: {result.steps} steps (annealing over {anneal}), {result.tokens:,} tokens, "
          f"{result.train_seconds:.0f}s training ({time.perf_counter() - t0:.0f}s with the probe and evaluations); "
          f"held-out LLaDA loss {result.val_loss_before:.3f} -> {result.val_loss:.3f}")

    tok = decoderlab.Tokenizer.from_folder(out / "adapted")
    held = torch.tensor([tok.encode(text[i:i + context]) for i in range(cut, len(text) - context, context)]
                        [:args.windows])
    before = decoderlab.load(base, pack=False).eval()
    decoderlab.add_mask_token(before, decoderlab.Tokenizer.from_folder(base))
    after = decoderlab.load(out / "adapted", pack=False).eval()
    predicted = held.numel() - held.shape[0]

    def nll(model, mask) -> float:
        total = 0.0
        for first in range(0, len(held), 64):
            rows = held[first:first + 64]
            total += float(diffusion_nll(model, rows, tok.mask_id, samples=args.samples, shift=True, mask=mask).sum())
        return total / predicted

    with torch.no_grad():
        logits = before(held[:, :-1])
        causal_ce = float(F.cross_entropy(logits.flatten(0, 1), held[:, 1:].flatten()))
    print(f"held-out: {len(held)} windows of {context} characters, {args.samples} noise levels each")
    print(f"  base causal next-token loss            {causal_ce:.3f} nats/token")
    print(f"  diffusion NLL bound, base, causal attn  {nll(before, masks.causal()):.3f}")
    print(f"  diffusion NLL bound, base, full attn    {nll(before, masks.full()):.3f}")
    print(f"  diffusion NLL bound, adapted (full)     {nll(after, None):.3f}")


if __name__ == "__main__":
    main()
