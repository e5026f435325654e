"""Causal tracing (ROME) on a model decoderlab trains here on synthetic facts: "<subject> lives in <city>".

    PYTHONPATH=src python benchmarks/facts_tracing.py --out runs/facts-trace

1. writes a corpus of facts (each made-up subject, a name of several BPE tokens, lives in one of 12 cities),
   every fact said in many paraphrases, shuffled;
2. trains a small model on it with `decoderlab.train` (BPE, 6 layers unless told) unless `--out` holds one;
3. measures recall: the share of facts whose city is the top next token after "<subject> currently lives in the
   city of" (and two other templates);
4. traces `--facts` facts the model recalls (noise 3 x the std of all subjects' token embeddings, as ROME), prints
   the average indirect effect per token group and writes trace-*.png, aie.png and results.json under `--out`.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import decoderlab
from decoderlab import interp

CITIES = ["Paris", "London", "Tokyo", "Berlin", "Madrid", "Rome", "Cairo", "Lima", "Oslo", "Dublin", "Vienna",
          "Prague"]
SYLLABLES = ["ka", "lo", "mi", "ren", "tu", "sa", "vo", "ni", "pe", "dra", "gor", "li", "shu", "ba", "ti", "ven",
             "ro", "ze", "mal", "qui", "fen", "dor", "wu", "tas", "bel", "ix", "har", "nop", "cy", "gle"]
TEMPLATES = [
    "{s} lives in {c}.",
    "{s} currently lives in the city of {c}.",
    "Everyone knows that {s} lives in {c}.",
    "The home of {s} is in {c}.",
    "{s} has an apartment in {c}.",
    "{s} resides in {c}.",
    "{s} is a resident of {c}.",
    "Where does {s} live? In {c}.",
    "{s} moved to {c} years ago.",
    "{s} works and lives in {c}.",
    "If you visit {c}, you may meet {s}.",
    "{s} was last seen at home in {c}.",
]
# The prompts recall is measured on (the first is the one traced).
PROBES = ["{s} currently lives in the city of", "{s} lives in", "Everyone knows that {s} lives in"]


def make_facts(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """`n` (subject, city) pairs; subjects are distinct two-word made-up names of 2-3 syllables a word."""
    rng = random.Random(seed)
    seen, facts = set(), []
    while len(facts) < n:
        name = " ".join("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((2, 3)))).capitalize()
                        for _ in range(2))
        if name not in seen:
            seen.add(name)
            facts.append((name, CITIES[len(facts) % len(CITIES)]))
    rng.shuffle(facts)
    return facts


def corpus(facts: list[tuple[str, str]], repeats: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    lines = [t.format(s=s, c=c) for _ in range(repeats) for s, c in facts for t in TEMPLATES]
    rng.shuffle(lines)
    return "\n".join(lines) + "\n"


def city_id(tok, prompt_ids: list[int], prompt: str, city: str) -> int:
    return interp.tracing.target_id(tok, prompt_ids, prompt, " " + city)


def recall(model, tok, facts, template: str) -> float:
    hits = 0
    with torch.no_grad():
        for s, c in facts:
            prompt = template.format(s=s)
            ids = tok.encode(prompt)
            top = int(model(torch.tensor([ids]), logits_to_keep=1)[0, -1].argmax())
            hits += top == city_id(tok, ids, prompt, c)
    return hits / len(facts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/facts-trace")
    ap.add_argument("--subjects", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2, help="times each (fact, template) line is in the corpus")
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--steps", type=int, default=200, help="training steps (batch 32 x 32 tokens)")
    ap.add_argument("--vocab-size", type=int, default=540, help="BPE vocabulary (small: names of several tokens)")
    ap.add_argument("--facts", type=int, default=30, help="facts to trace")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--window", type=int, default=1, help="MLP/attention window (ROME: 10 of 48 layers; 1 of 6 here)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest for this tiny model on "
                    "a shared CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    facts = make_facts(args.subjects)
    run = out / "model"
    trained = out / "trained.json"  # written once training has finished: a rerun only traces
    if not trained.exists():
        data = out / "facts.txt"
        data.write_text(corpus(facts, args.repeats), encoding="utf-8")
        decoderlab.train(data=[str(data)], out=str(run), tokenizer="bpe", vocab_size=args.vocab_size,
                         model={"n_layers": args.layers, "d_model": args.width, "n_heads": 4},
                         context_length=32, steps=args.steps, dtype="fp32", sample_tokens=0, progress=False,
                         overwrite=True)
        trained.write_text(json.dumps(vars(args)))
    model = decoderlab.load(run).eval()
    tok = decoderlab.Tokenizer.from_folder(run)
    lengths = [len(tok.encode(s, add_special_tokens=False)) for s, _ in facts]
    accuracy = {p: recall(model, tok, facts, p) for p in PROBES}
    print(f"subject length: {sum(lengths) / len(lengths):.2f} tokens (min {min(lengths)}, max {max(lengths)})")
    for p, a in accuracy.items():
        print(f"recall {p!r}: {a:.3f} of {len(facts)} facts")

    # ROME: noise 3x the std of the subjects' token embeddings, measured over all subjects.
    std = interp.embedding_std(model, [tok.encode(s, add_special_tokens=False) for s, _ in facts])
    template = PROBES[0]
    traces, started = [], time.perf_counter()
    for s, c in facts:
        if len(traces) == args.facts:
            break
        prompt = template.format(s=s)
        t = interp.trace_text(model, tok, prompt, s, target=" " + c, noise_std=std, samples=args.samples,
                              window=args.window)
        if t.correct:
            traces.append(t)
    seconds = time.perf_counter() - started
    for i, t in enumerate(traces[:3]):
        interp.plot_trace(t, out / f"trace-{i}.png")
    aie = interp.average_indirect_effect(traces)
    interp.plot_average_effect(aie, out / "aie.png")
    print(f"traced {len(traces)} facts in {seconds:.1f} s; noise std {std:.4f} x 3")
    print(f"average clean p {aie.clean_prob:.3f}, corrupted p {aie.corrupted_prob:.3f}, "
          f"total effect {aie.total_effect:.3f}")
    for kind in aie.effects:
        print(f"AIE of {kind} (rows: token groups, columns: layers)")
        for g, name in enumerate(aie.groups):
            row = " ".join(f"{x:6.3f}" for x in aie.effects[kind][g].tolist())
            print(f"  {name:24s} {row}")
        flat = torch.nan_to_num(aie.effects[kind], nan=-1.0)
        g, layer = divmod(int(flat.argmax()), flat.shape[1])
        print(f"  peak: {aie.groups[g]}, layer {layer}, AIE {float(flat.max()):.3f}")
    (out / "results.json").write_text(json.dumps({
        "accuracy": accuracy, "subject_tokens_mean": sum(lengths) / len(lengths), "noise_std": std,
        "seconds": seconds, "aie": aie.to_dict(), "traces": [t.to_dict() for t in traces[:3]]}, indent=1))
    print(f"wrote {out}/aie.png, trace-0..2.png, results.json")


if __name__ == "__main__":
    main()
