"""Greedy speculative decoding vs plain greedy `generate` on small models trained on the default corpus.

Run: .venv/bin/python benchmarks/speculative.py [--time 60s] [--new 128] [--repeats 3] [--nodes 16] [--fixed 4]
     [--seeds 1337 1 2] [--no-mtp] [--threads 1] [--shape 8x512] [--dtype fp32|bf16] [--cache DIR] [--compile]
The README's figures: --shape 8x512 --time 5m --seeds 1337 1 2 --threads 2 --dtype bf16 (and fp32) --no-mtp
--repeats 3 --fixed 4, and the recipe's default model: --no-mtp --repeats 21 --fixed 4 (no --shape).
Trains (or reuses, cached under --cache by the settings) a default-recipe model per --seeds value with
`decoderlab.train` and, unless --no-mtp, one with `objective="mtp", n_future=3`. For each of 12 prompts (code
continuations, English prose, repetitive text) it times plain greedy decoding, Token Recycling with adaptive
drafting (`TokenRecycler(model, n_nodes=N)` for each --nodes N) and, with --fixed N, the static N-node tree of
every step (`adaptive=False`), plain decoding again ("plain-again": the noise floor of a ratio on this
machine), and MTP self-speculation (on the mtp model, against that model's plain greedy):
tokens/s (median of --repeats), mean tokens per forward pass, and whether the output is identical. The recycler's
matrix is shared across prompts (as across requests) but restored before each repeat, so every timed run sees its
prompt for the first time. It ends with the distribution over all (model, prompt) pairs: median, worst and best
speed-up, how many are below 1.0x, and the adaptive choice's verification-cost model (its predicted seconds of
the drafting steps next to their measured seconds; expected vs emitted tokens; passes by tree size).
Target (issue 19): median >= 1.8x plain with no prompt below 1.0x, identical output everywhere.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import decoderlab
from decoderlab.generation import generate
from decoderlab.generation.speculative import RecyclingStats, TokenRecycler, mtp_generate

PROMPTS = [
    # code continuations
    "def __init__(self", "import os\n", "    for i in range(", "class ", "        if not ", "    def get(",
    # English prose (docstrings and comments of the corpus's kind, and plain sentences)
    "    \"\"\"Return the number of ", "# This module provides ", "The quick brown fox jumps over the lazy dog. ",
    # repetitive text
    "a = 1\nb = 2\na = 1\nb = 2\n", "0, 1, 2, 3, 4, 5, 6, 7, ", "self.x = x\n        self.y = y\n        self.",
]


def trained(cache: Path, time_budget: str, shape: str = "", seed: int = 1337, **objective) -> Path:
    """A run folder trained with these settings, reused when it exists. `shape` "LxW" (e.g. "8x512") sets the
    layers and width (heads of 64, SwiGLU width 8/3 x W rounded) and a 256-token context; "" is the recipe."""
    key = "-".join([*(f"{k}{v}" for k, v in sorted(objective.items())), shape, time_budget,
                    "" if seed == 1337 else f"seed{seed}"])
    out = cache / f"run-{key.replace('--', '-').strip('-')}"
    extra = {}
    if shape:
        layers, width = (int(x) for x in shape.split("x"))
        extra = dict(context_length=256, batch_size=16, eval_batches=8,
                     model=dict(n_layers=layers, d_model=width, n_heads=width // 64,
                                d_mlp=(8 * width // 3 + 63) // 64 * 64))
    if not (out / "model.safetensors").exists():
        print(f"training {out} ({time_budget}) ...", flush=True)
        decoderlab.train(out=str(out), time=time_budget, sample_tokens=0, progress=False, seed=seed, **objective,
                         **extra)
    return out


def timed(fn, repeats: int, before=None) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        if before is not None:
            before()
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def parting(model, prompt: list[int], plain, got) -> str:
    """Where the speculative output parts from plain greedy and the plain top-2 logit gap there: in bf16 the
    verification pass's other batch shape rounds differently, so a near-tie may flip; a clear gap is a bug."""
    a, b = plain.tokens[0], got.tokens[0]
    step = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + a[:step]]), logits_to_keep=1)[0, -1].float()
    top = logits.topk(2).values
    return f"  (parts at token {step}; plain top-2 logit gap {float(top[0] - top[1]):.3f})"


def compare(name: str, model, tok, prompts: list[str], new: int, repeats: int, methods: dict,
            compile: bool = False) -> dict[str, list[tuple[float, float, bool]]]:
    """Prints the table; returns, per method, (speed-up, tokens per pass, identical) for each prompt."""
    per_prompt: dict[str, list[tuple[float, float, bool]]] = {m: [] for m in methods}
    print(f"\n== {name}: {new} new tokens, median of {repeats}" + (", compiled steps" if compile else ""))
    if compile:  # the plain loop's graph for this cache size, compiled before any timing
        generate(model, [tok.encode(prompts[0])], new, stop_tokens=[], compile=True)
    header = f"{'prompt':24} {'method':14} {'tok/s':>8} {'ratio':>6} {'tok/pass':>8} {'same':>5}"
    print(header)
    totals: dict[str, list[float]] = {m: [0.0, 0] for m in ["plain", *methods]}
    for text in prompts:
        ids = [tok.encode(text)]
        # Repeats alternate plain and every method, so the machine's drift hits them alike.
        runs: dict[str, list[float]] = {m: [] for m in ["plain", *methods]}
        outputs = {}
        for _ in range(repeats):
            seconds, outputs["plain"] = timed(
                lambda ids=ids: generate(model, ids, new, stop_tokens=[], compile=compile), 1)
            runs["plain"].append(seconds)
            for method, (run, before) in methods.items():
                seconds, outputs[method] = timed(lambda ids=ids, run=run: run(ids), 1, before)
                runs[method].append(seconds)
        plain = outputs["plain"]
        seconds = statistics.median(runs["plain"])
        n = len(plain.tokens[0])
        totals["plain"][0] += seconds
        totals["plain"][1] += n
        print(f"{text!r:24} {'plain':14} {n / seconds:8.1f} {1.0:6.2f} {1.0:8.2f} {'':>5}")
        for method in methods:
            s, got = statistics.median(runs[method]), outputs[method]
            totals[method][0] += s
            totals[method][1] += len(got.tokens[0])
            same = got.tokens == plain.tokens
            per_pass = getattr(got, "tokens_per_pass", [1.0])[0]  # plain decoding: one token a pass
            per_prompt[method].append((seconds / s * len(got.tokens[0]) / n, per_pass, same))
            print(f"{'':24} {method:14} {len(got.tokens[0]) / s:8.1f} {seconds / s:6.2f} "
                  f"{per_pass:8.2f} {str(same):>5}{'' if same else parting(model, ids[0], plain, got)}")
    base = totals["plain"][1] / totals["plain"][0]
    for method, (s, n) in totals.items():
        print(f"overall {method:14} {n / s:8.1f} tok/s  {n / s / base:5.2f}x plain")
    return per_prompt


def distribution(results: dict[str, list[tuple[float, float, bool]]], recyclers: dict) -> None:
    """Median, worst and best speed-up over every (model, prompt) pair, and the cost model's record."""
    print("\n== distribution over models and prompts")
    for method, rows in results.items():
        ratios = sorted(r for r, _, _ in rows)
        passes = [p for _, p, _ in rows]
        print(f"{method:14} pairs {len(rows):3d}  median {statistics.median(ratios):.2f}x  worst {ratios[0]:.2f}x  "
              f"best {ratios[-1]:.2f}x  below 1.0x: {sum(r < 1.0 for r in ratios)}  "
              f"tokens/pass median {statistics.median(passes):.2f}  identical {sum(same for *_, same in rows)}/"
              f"{len(rows)}")
    for method, items in recyclers.items():
        seen = [r.stats for r in items if r.adaptive and r.stats.passes]  # passes[0]: plain steps, no draft
        if not seen:
            continue
        predicted = sum(st.predicted_seconds for st in seen)
        measured = sum(st.measured_seconds for st in seen)
        expected = sum(st.expected_tokens for st in seen)
        emitted = sum(st.emitted_tokens for st in seen)
        sizes: dict[int, int] = {}
        for st in seen:
            for n, c in st.passes.items():
                sizes[n] = sizes.get(n, 0) + c
        print(f"{method:14} cost model: drafting steps (pass + bookkeeping) predicted {predicted:.2f} s, measured "
              f"{measured:.2f} s "
              f"({measured / max(predicted, 1e-9):.2f}x); tokens expected {expected:.0f}, emitted {emitted} "
              f"({emitted / max(expected, 1e-9):.2f}x); passes by nodes (0: plain, no draft) "
              f"{dict(sorted(sizes.items()))}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--time", default="60s", help="training time per model")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--nodes", type=int, nargs="+", default=[16], help="largest tree of adaptive recycling")
    parser.add_argument("--fixed", type=int, nargs="*", default=[], help="static trees to compare (adaptive=False)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1337], help="one trained model per seed")
    parser.add_argument("--no-mtp", action="store_true")
    parser.add_argument("--no-pack", action="store_true", help="skip Transformer.pack (oneDNN weights)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shape", default="", help='model "LAYERSxWIDTH" (e.g. 8x512, context 256); default: the '
                        "recipe's 2x256 with context 64")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="weights' dtype when decoding")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "decoderlab-bench-speculative"))
    parser.add_argument("--compile", action="store_true",
                        help="compiled steps for plain greedy and Token Recycling (generate.compiled)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cache = Path(args.cache)

    def load(folder: Path):
        model = decoderlab.load(folder, dtype=torch.bfloat16 if args.dtype == "bf16" else None).eval()
        return (model if args.no_pack else model.pack(1)), decoderlab.Tokenizer.from_folder(folder)

    results: dict[str, list] = {}
    recyclers: dict[str, list] = {}
    for seed in args.seeds:
        model, tok = load(trained(cache, args.time, args.shape, seed=seed))
        print(f"\nmodel (seed {seed}): {model.num_params() / 1e6:.2f}M parameters, {model.config.n_layers} layers, "
              f"width {model.config.d_model}, context {model.config.context_length}, vocab "
              f"{model.config.vocab_size}, {args.dtype}, {torch.get_num_threads()} thread(s), "
              f"packed={not args.no_pack}")
        methods = {}
        for n, adaptive in [*((n, True) for n in args.nodes), *((n, False) for n in args.fixed)]:
            recycler = TokenRecycler(model, n_nodes=n, adaptive=adaptive)
            # Warm the matrix on unrelated text (as earlier requests would), then restore it before each timed
            # run. With --compile this also compiles the tree graph for the cache size the timed runs use.
            recycler.generate([tok.encode("import sys\n\n\ndef main():\n")], args.new, stop_tokens=[],
                              compile=args.compile)
            saved = recycler.snapshot()
            recycler.stats = RecyclingStats()
            name = f"recycle-{n}" if adaptive else f"static-{n}"
            recyclers.setdefault(name, []).append(recycler)
            methods[name] = (lambda ids, r=recycler: r.generate(ids, args.new, stop_tokens=[], compile=args.compile),
                             lambda r=recycler, m=saved: r.restore(m))
        # Plain decoding timed again as a method: its spread around 1.0x is this machine's noise floor.
        methods["plain-again"] = (lambda ids, model=model: generate(model, ids, args.new, stop_tokens=[],
                                                                    compile=args.compile), None)
        got = compare(f"Token Recycling (seed {seed})", model, tok, PROMPTS, args.new, args.repeats, methods,
                      args.compile)
        for method, rows in got.items():
            results.setdefault(method, []).extend(rows)
    distribution(results, recyclers)

    if not args.no_mtp:
        mtp, tok = load(trained(cache, args.time, args.shape, objective="mtp", n_future=3))
        heads = {f"mtp-{d}": (lambda ids, d=d: mtp_generate(mtp, ids, args.new, n_draft=d, stop_tokens=[]), None)
                 for d in range(1, mtp.config.n_future + 1)}
        recycler = TokenRecycler(mtp, n_nodes=args.nodes[0])
        recycler.generate([tok.encode("import sys\n\n\ndef main():\n")], args.new, stop_tokens=[],
                          compile=args.compile)
        saved = recycler.snapshot()
        heads[f"recycle-{args.nodes[0]}"] = (lambda ids: recycler.generate(ids, args.new, stop_tokens=[],
                                                                           compile=args.compile),
                                             lambda: recycler.restore(saved))
        compare("MTP self-speculation (model trained with --objective mtp --n-future 3)", mtp, tok, PROMPTS,
                args.new, args.repeats, heads, args.compile)


if __name__ == "__main__":
    main()
