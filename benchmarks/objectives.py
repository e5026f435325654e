"""One backbone, five objectives, the same training: next-token, prefix-LM, MTP, MLM and masked diffusion.

Run: .venv/bin/python benchmarks/objectives.py [--data shakespeare|default|both] [--steps 150] [--judge-steps 450]
     [--samples 16] [--sample-tokens 48] [--threads 1] [--objectives next,prefix,mtp,mlm,next>mlm,diffusion]

Every objective trains the default recipe (character level, 2 layers, width 256, context 64, batch 32) with
`decoderlab.train` for --steps on the corpus (tinyshakespeare, or the default corpus, the Python standard library):
the same tokens and about the same compute for each (a step budget, not a time budget, because this machine's
CPU is shared and its speed varies; each run's training seconds are printed). Reported per objective:
- val NLL (nats per token on the held-out split): the causal cross-entropy for next, prefix and MTP (their main
  head, as they would be used to generate); `next>mlm` is half the steps next-token then half MLM (CLM -> MLM);
  for diffusion the Monte Carlo *upper bound* on the NLL (the ELBO over
  the masking level t, 4 stratified draws per batch, fixed noise), so a diffusion figure is pessimistic. MLM's
  masked-token loss is no NLL (it predicts 15 % of the tokens from both sides) and is printed apart; it compares
  MLM with CLM -> MLM (the same seeded draw of masked tokens; CLM -> MLM never masks a row's first token).
- generation: --samples continuations of --sample-tokens (48) tokens after --prompt-tokens (16) tokens cut from
  the validation text, at temperature 0.8; quality is their perplexity under a separate causal judge (the
  recipe trained for --judge-steps, longer than the others, on the same corpus), with the unigram
  entropy of the samples beside it (a model that repeats one character fools a judge's perplexity, not the
  entropy); the validation text's own judge perplexity and entropy are the reference. Speed is generated
  tokens/s (a batch of all samples; causal: KV cache; diffusion: no cache, the whole sequence per step, one
  token per step and four).
Runs are cached under --cache by their settings.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections import Counter
from pathlib import Path

import torch

import decoderlab
from decoderlab.training import TrainConfig, train

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
OBJECTIVES = ("next", "prefix", "mtp", "mlm", "next>mlm", "diffusion")
GENERATIVE = ("next", "prefix", "mtp", "diffusion")
# The judge: the recipe's shape trained longer (on this CPU a wider model learns less in minutes, not more).
JUDGE = dict(n_layers=2, n_heads=4, d_model=256)
CONTEXT = 64  # the recipe's: a 16-token prompt and 48 generated tokens fit


def trained(cache: Path, corpus: str, objective: str, steps: int, model: dict | None = None) -> Path:
    out = cache / (f"{corpus}-{objective}-{steps}" + ("-judge" if model else ""))
    if not (out / "model.safetensors").exists():
        print(f"training {out.name} ...", flush=True)
        data = None if corpus == "default" else [str(SHAKESPEARE)]
        extra: dict = dict(n_future=2) if objective == "mtp" else {}
        if ">" in objective:  # CLM -> MLM: half the budget each
            objective, extra["switch_to"] = objective.split(">")
        train(TrainConfig(data=data, tokenizer="char", steps=steps, objective=objective, out=str(out),
                          model=model or {}, context_length=CONTEXT, sample_tokens=0,
                          eval_batches=None if corpus != "default" else 40, **extra), progress=False)
    return out


def final_val(run: Path) -> float:
    import json

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["val_loss"] for r in records if "val_loss" in r][-1]


def train_seconds(run: Path) -> float:
    import json

    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return records[-1]["elapsed_s"]


def prompts_from(run: Path, tok: decoderlab.Tokenizer, n: int, length: int) -> tuple[list[list[int]], list[str]]:
    """`n` prompts of `length` tokens and the true continuations, from the validation split of the run's data."""
    from decoderlab.data import PreparedData

    cfg = TrainConfig.from_dict(__import__("json").loads((run / "train_config.json").read_text()))
    from decoderlab.training.loop import data_cache_dir

    val = PreparedData.load(data_cache_dir(cfg)).val.tokens
    step = (len(val) - 2 * length - 256) // n
    prompts = [val[i * step:i * step + length].tolist() for i in range(n)]
    truths = [tok.decode(val[i * step + length:i * step + length + 128].tolist()) for i in range(n)]
    return prompts, truths


def entropy(texts: list[str]) -> float:
    counts = Counter("".join(texts))
    total = sum(counts.values())
    return -sum(c / total * math.log2(c / total) for c in counts.values()) if total else 0.0


def generate(run: Path, objective: str, prompts: list[list[int]], n_tokens: int, per_step: int = 1
             ) -> tuple[list[str], float]:
    model = decoderlab.load(run)
    tok = decoderlab.Tokenizer.from_folder(run)
    t0 = time.perf_counter()
    if objective == "diffusion":
        out = decoderlab.diffusion_generate(model, prompts, n_tokens, steps=n_tokens // per_step, block_length=16,
                                            temperature=0.8, seed=0, stop_tokens=[], tokenizer=tok)
    else:
        out = decoderlab.generate(model, prompts, n_tokens, temperature=0.8, top_k=0, top_p=1.0, seed=0,
                                  tokenizer=tok, stop_tokens=[])
    seconds = time.perf_counter() - t0
    return out.texts, sum(map(len, out.tokens)) / seconds


def judge_ppl(judge: Path, texts: list[str]) -> float:
    return decoderlab.perplexity(judge, texts=[t for t in texts if t]).perplexity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="shakespeare", choices=["shakespeare", "default", "both"])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--judge-steps", type=int, default=450)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--sample-tokens", type=int, default=48)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--objectives", default=",".join(OBJECTIVES))
    ap.add_argument("--cache", default=str(Path.home() / ".cache" / "decoderlab" / "bench-objectives"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    objectives = [o for o in args.objectives.split(",") if o]
    for corpus in (["shakespeare", "default"] if args.data == "both" else [args.data]):
        judge = trained(cache, corpus, "next", args.judge_steps, model=JUDGE)
        runs = {o: trained(cache, corpus, o, args.steps) for o in objectives}
        tok = decoderlab.Tokenizer.from_folder(judge)
        prompts, truths = prompts_from(judge, tok, args.samples, args.prompt_tokens)
        print(f"\n## {corpus}: {args.steps} steps of 32 x {CONTEXT} tokens each (judge: {args.judge_steps} steps, "
              f"val {final_val(judge):.3f})\n")
        print("| objective | train s | val NLL (nats/token) | samples: judge PPL | samples: entropy (bits/char) "
              "| tokens/s |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        print(f"| validation text (reference) | | | {judge_ppl(judge, truths):.2f} | {entropy(truths):.2f} | |")
        for o in objectives:
            val = final_val(runs[o])
            shown = f"{val:.3f}" if "mlm" not in o else f"(masked-token loss {val:.3f})"
            if o == "diffusion":
                shown = f"<= {val:.3f}"
            seconds = train_seconds(runs[o])
            if o not in GENERATIVE:
                print(f"| {o} | {seconds:.0f} | {shown} | | | |")
                continue
            variants = [(o, 1)] + ([(f"{o}, 4 tokens/step", 4)] if o == "diffusion" else [])
            for name, per_step in variants:
                speeds, texts = [], []
                for _ in range(3):
                    texts, speed = generate(runs[o], o, prompts, args.sample_tokens, per_step)
                    speeds.append(speed)
                print(f"| {name} | {seconds:.0f} | {shown} | {judge_ppl(judge, texts):.2f} | {entropy(texts):.2f} | "
                      f"{statistics.median(speeds):,.0f} |", flush=True)


if __name__ == "__main__":
    main()
