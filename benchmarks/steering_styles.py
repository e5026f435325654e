"""Steering between two styles on a model decoderlab trains itself (issue 11's done-when: "a steering vector that
moves generations between two styles by a measured amount").

1. A corpus of two styles: tinyshakespeare cut into short passages, each passage written either ALL UPPER-CASE
   or all lower-case (one JSONL document each, so the document mask keeps the styles apart in training).
2. `decoderlab train` on it: a char-level model, the default recipe, a short time budget.
3. The steering vector: mean over tokens of `resid_pre` at a layer for upper-case prompts minus the same
   prompts in lower case (`interp.steering_vector`).
4. Generations from lower-case prompts (and upper-case ones, steered the other way) with the vector added at
   every position (`interp.steer`) at several scales, several sampled continuations each; the style statistic
   is the share of upper-case letters among the generated letters; the share of spaces and newlines tells what
   is left of the word structure.

    python benchmarks/steering_styles.py --out runs/styles                    # train (200 steps), then measure
    python benchmarks/steering_styles.py --out runs/styles --skip-train       # measure an existing run

Prints a table (scale -> upper-case share, mean over samples and prompts) and writes it as JSON beside the run.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

import decoderlab
from decoderlab import interp

# The repository's sibling shared/ folder (as in CI); --source overrides.
SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def make_corpus(path: Path, source: Path = SHAKESPEARE, lines_per_doc: int = 6, seed: int = 0) -> int:
    """Write the two-style corpus as JSONL (one passage per line, upper- or lower-cased at random); returns the
    number of documents."""
    lines = [line for line in source.read_text().splitlines() if line.strip()]
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with open(path, "w") as f:
        for start in range(0, len(lines) - lines_per_doc, lines_per_doc):
            text = "\n".join(lines[start:start + lines_per_doc]) + "\n"
            text = text.upper() if rng.random() < 0.5 else text.lower()
            f.write(json.dumps({"text": text}) + "\n")
            n += 1
    return n


def upper_share(text: str) -> float:
    letters = [c for c in text if c.isalpha()]
    return sum(c.isupper() for c in letters) / max(len(letters), 1)


def space_share(text: str) -> float:
    """Share of characters that are spaces or newlines (about 0.2 in the corpus, either case): what is left of
    the word structure, the price of a large scale."""
    return sum(c in " \n" for c in text) / max(len(text), 1)


def passages(source: Path, n: int, length: int, seed: int) -> list[str]:
    """`n` prompt passages of `length` characters from the text's last tenth (the validation split)."""
    text = source.read_text()
    tail = text[int(len(text) * 0.9):]
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        start = rng.randrange(0, len(tail) - length)
        start = tail.index("\n", start) + 1  # start at a line
        chunk = tail[start:start + length]
        if sum(c.isalpha() for c in chunk) > length // 2:
            out.append(chunk)
    return out


def measure(run: Path, source_text: Path, layer: int, scales: list[float], samples: int, tokens: int, n_prompts: int,
            temperature: float) -> dict:
    model = decoderlab.load(str(run))
    tok = decoderlab.Tokenizer.from_folder(str(run))
    # The vector comes from one set of passages, the generations start from others.
    source = passages(source_text, 32, 64, seed=1)
    vector = interp.steering_vector(model, tok, [p.upper() for p in source], [p.lower() for p in source], layer,
                                    site="resid_pre", reduce="mean")
    prompts = passages(source_text, n_prompts, 48, seed=2)
    table: dict = {"layer": layer, "vector_norm": float(vector.norm()), "samples": samples, "tokens": tokens,
                   "prompts": n_prompts, "temperature": temperature, "from_lower": {}, "from_upper": {}}
    for direction, case, sign in (("from_lower", str.lower, 1.0), ("from_upper", str.upper, -1.0)):
        ids = [tok.encode(case(p)) for p in prompts]
        for scale in scales:
            texts = []
            with interp.steer(model, vector, layer, sign * scale):
                for s in range(samples):
                    result = decoderlab.generate(model, ids, tokens, temperature=temperature, top_k=0, top_p=1.0,
                                                 seed=s, stop_tokens=[])
                    texts += [tok.decode(row) for row in result.tokens]
            shares = [upper_share(t) for t in texts]
            table[direction][str(sign * scale)] = {
                "upper_share": statistics.mean(shares), "stdev": statistics.stdev(shares) if len(shares) > 1 else 0.0,
                "space_share": statistics.mean(space_share(t) for t in texts), "example": case(prompts[0]) + texts[0]}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/styles", help="Run folder (trained here unless --skip-train).")
    parser.add_argument("--steps", type=int, default=200, help="Training steps.")
    parser.add_argument("--time", default="5m", help="Training time cap (the steps usually end it first).")
    parser.add_argument("--width", type=int, default=128, help="Model width (2 layers, the default recipe).")
    parser.add_argument("--skip-train", action="store_true", help="Measure the run already in --out.")
    parser.add_argument("--layer", type=int, default=1, help="Block whose resid_pre is steered.")
    parser.add_argument("--scales", default="0,0.25,0.5,0.75,1,2,4", help="Comma-separated steering scales.")
    parser.add_argument("--samples", type=int, default=4, help="Sampled continuations per prompt and scale.")
    parser.add_argument("--prompts", type=int, default=8, help="Prompts (each in both cases).")
    parser.add_argument("--tokens", type=int, default=80, help="Characters generated per continuation.")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--source", default=str(SHAKESPEARE), help="tinyshakespeare.txt (default: ../shared/data/).")
    args = parser.parse_args()
    run = Path(args.out)
    if not args.skip_train:
        corpus = run.parent / (run.name + "-corpus") / "styles.jsonl"
        n = make_corpus(corpus, Path(args.source))
        print(f"corpus: {n} passages -> {corpus}")
        t0 = time.perf_counter()
        # A small model and a step budget (fp32: faster than bf16 autocast on most CPUs), so the run is the
        # same on any machine; --time caps it on a slow or busy one.
        decoderlab.train(data=[str(corpus)], steps=args.steps, time=args.time, out=str(run), overwrite=True,
                         seed=0, dtype="fp32", model={"d_model": args.width, "d_mlp": args.width * 11 // 4},
                         context_length=128, batch_size=16, progress=False)
        print(f"trained in {time.perf_counter() - t0:.0f} s")
    torch.manual_seed(0)
    scales = [float(s) for s in args.scales.split(",")]
    t0 = time.perf_counter()
    table = measure(run, Path(args.source), args.layer, scales, args.samples, args.tokens, args.prompts,
                    args.temperature)
    print(f"measured in {time.perf_counter() - t0:.0f} s; layer {args.layer} resid_pre, "
          f"|v| = {table['vector_norm']:.2f}")
    print("scale   upper-case share of generated letters (mean +- stdev over prompts x samples)   spaces")
    for direction in ("from_lower", "from_upper"):
        print(f"  prompts {direction.split('_')[1]}-case:")
        for scale, row in table[direction].items():
            print(f"  {float(scale):+5.2f}   {row['upper_share']:.3f} +- {row['stdev']:.3f}"
                  f"{'':58}{row['space_share']:.3f}")
    for direction in ("from_lower", "from_upper"):
        print(f"  examples, prompts {direction.split('_')[1]}-case (prompt + continuation):")
        for scale, row in table[direction].items():
            print(f"  {float(scale):+5.2f}  {row['example']!r}")
    (run / "steering_styles.json").write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()
