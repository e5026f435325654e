"""Wall time of an lm-eval run: decoderlab's model ("decoderlab") against the harness's own HF model ("hf").

Both sides in one process, on the same folder (the `gpt2` preset, random weights, saved with `decoderlab.save`
with a byte-level BPE tokenizer trained here), the same local tasks (a 4-way multiple-choice task and a rolling
loglikelihood task, what `decoderlab.suites.write_suite` writes), the same batch size; runs interleaved, median
reported. Models are built before timing: the figure is the evaluation (`simple_evaluate` on an LM object).

    PYTHONPATH=src python benchmarks/eval_speed.py --docs 20 --rolling-docs 4 --runs 3   (README figures)
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import tempfile
import time
from pathlib import Path

import lm_eval
import torch
from lm_eval.models.huggingface import HFLM

import decoderlab
from decoderlab.harness import DecoderlabLM, resolve_tasks
from decoderlab.suites import TaskSpec, write_suite

WORDS = ("the king queen lord night day sword crown love death heaven earth fair foul good bad thou art my doth "
         "shall what where when never ever upon within").split()


def build(root: Path, docs: int, rolling_docs: int) -> tuple[Path, list[str]]:
    rng = random.Random(0)
    corpus = "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + rng.choice([".\n", ", ", "!\n"])
                     for _ in range(20000))
    tok = decoderlab.Tokenizer.train_bpe(texts=[corpus], vocab_size=2000)
    torch.manual_seed(0)
    model = decoderlab.Transformer(decoderlab.ModelConfig.preset(
        "gpt2", vocab_size=tok.vocab_size, bos_token_id=tok.eos_id, eos_token_id=tok.eos_id)).eval()
    folder = root / "gpt2"
    decoderlab.save(model, folder, tokenizer=tok)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    mc = [{"question": sentence(20, 60), "choices": [sentence(3, 10) for _ in range(4)], "label": rng.randrange(4)}
          for _ in range(docs)]
    write_suite(root / "tasks" / "mc", TaskSpec(name="bench_mc", doc_to_text="Q: {{question}}\nA:",
                                                doc_to_target="label", doc_to_choice="choices"), {"test": mc})
    starts = [rng.randrange(len(corpus) - 3000) for _ in range(rolling_docs)]
    texts = [{"text": corpus[s: s + rng.randint(200, 2500)]} for s in starts]
    write_suite(root / "tasks" / "roll", TaskSpec(name="bench_roll", doc_to_text="", doc_to_target="{{text}}",
                                                  output_type="loglikelihood_rolling",
                                                  metrics=("word_perplexity", "bits_per_byte")), {"test": texts})
    return folder, [str(root / "tasks")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=200, help="multiple-choice questions (4 choices each)")
    parser.add_argument("--rolling-docs", type=int, default=40, help="texts for the rolling task")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        folder, tasks = build(Path(tmp), args.docs, args.rolling_docs)
        names, manager = resolve_tasks(tasks)
        models = {"decoderlab": DecoderlabLM(pretrained=str(folder), batch_size=args.batch_size, device="cpu"),
                  "hf": HFLM(pretrained=str(folder), batch_size=args.batch_size, device="cpu", dtype="float32")}
        times: dict[str, dict[str, list[float]]] = {name: {t: [] for t in names} for name in models}
        results: dict[str, dict] = {}
        for _ in range(args.runs):
            for name, lm in models.items():
                for task in names:
                    start = time.perf_counter()
                    out = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=manager)
                    times[name][task].append(time.perf_counter() - start)
                    results.setdefault(name, {}).update(out["results"])
        print(f"torch threads {torch.get_num_threads()}, gpt2 preset (124M, vocab {models['hf'].tokenizer.vocab_size}),"
              f" batch {args.batch_size}, {args.docs} MC questions x 4, {args.rolling_docs} rolling texts, "
              f"median of {args.runs}")
        for task in names:
            ours, theirs = (statistics.median(times[n][task]) for n in ("decoderlab", "hf"))
            print(f"{task}: decoderlab {ours:.1f} s, hf {theirs:.1f} s, ratio {theirs / ours:.2f}x "
                  f"(runs: decoderlab {[round(t, 1) for t in times['decoderlab'][task]]}, "
                  f"hf {[round(t, 1) for t in times['hf'][task]]})")
        total = {n: sum(statistics.median(times[n][t]) for t in names) for n in models}
        print(f"total: decoderlab {total['decoderlab']:.1f} s, hf {total['hf']:.1f} s, "
              f"ratio {total['hf'] / total['decoderlab']:.2f}x")
        for task in names:
            print(task, {k: (round(v, 6) if isinstance(v, float) else v) for k, v in results["decoderlab"][task].items()
                         if "," in k and "stderr" not in k},
                  {k: (round(v, 6) if isinstance(v, float) else v) for k, v in results["hf"][task].items()
                   if "," in k and "stderr" not in k})


if __name__ == "__main__":
    main()
