"""Code retrieval with sentence embeddings: docstring -> function body, MRR@10 per pooling (training-free, Causal2Vec).

Run: .venv/bin/python benchmarks/embed_eval.py [--model DIR] [--time 60s] [--context 256] [--pairs 500]
     [--batch-size 32] [--repeats 1] [--threads 1] [--dtype fp32|bf16] [--cache DIR] [--c2v-time 180s]
A retrieval task from real data with no download: from the default corpus (the Python standard library,
`decoderlab.data.default_corpus_files()`), every function or method with a docstring of at least a few words and at
least two statements after it gives a pair (query = the docstring, whitespace collapsed; document = the body with
the docstring removed, dedented; `decoderlab.causal2vec.function_pairs`). Files are split train / eval by a hash of
their path (`corpus_split`, one in five held out); the evaluated pairs come from the eval files only, and the
Causal2Vec head is trained (--c2v-time, cached under --cache) on the train files' pairs only, so it never sees an
evaluated pair or anything else from its file. A fixed-seed sample of --pairs eval pairs (distinct queries,
distinct documents) is embedded with every pooling of `decoderlab.embeddings.ALL_POOLINGS`; each query ranks all
documents by cosine similarity and
we report MRR@10 and Recall@1 of its own body, the random-ranking expectation (exact: H_10 / N and 1 / N, with the
standard deviation of MRR@10 over N independent random rankings, to tell signal from noise), and
embedding throughput (queries + documents per second, median of --repeats, after a one-batch warm-up).
Texts are truncated up front to the longest length that fits the model's context under every evaluated pooling's
template (echo holds the text twice), so all poolings see the same texts. Ties in similarity count against the query.
The model is --model (a decoderlab run / checkpoint or Hugging Face folder with its tokenizer) or, by default, one
trained with `decoderlab.train` on the default corpus for --time at context --context (batch scaled to keep the
recipe's 2048 tokens per step), cached under --cache by those settings and reused when present.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import math
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

import decoderlab
from decoderlab.causal2vec import Causal2VecConfig, function_pairs, load_causal2vec, train_causal2vec
from decoderlab.data import default_corpus_files
from decoderlab.embeddings import ALL_POOLINGS, ECHO_INSTRUCTION, PROMPT_EOL, embed
from decoderlab.errors import UserError

RECIPE_TOKENS_PER_STEP = 32 * 64  # the default recipe's batch x context


def trained(cache: Path, time_budget: str, context: int) -> Path:
    """A run folder trained on the default corpus with these settings, reused when it exists."""
    out = cache / f"run-ctx{context}-{time_budget}"
    if not (out / "model.safetensors").exists():
        print(f"training {out} ({time_budget}, context {context}) ...", flush=True)
        # A few validation batches per evaluation: the full stdlib split would cost more than the training.
        decoderlab.train(out=str(out), time=time_budget, context_length=context,
                         batch_size=max(1, RECIPE_TOKENS_PER_STEP // context), eval_batches=8,
                         sample_tokens=0, progress=False)
    return out


def text_budget(tok: decoderlab.Tokenizer, context: int, poolings: list[str]) -> int:
    """The most tokens a text may have so that it fits `context` under every pooling's template (see embed.py)."""
    bos = 0 if tok.bos_id is None else 1
    prompt = len(tok.encode(PROMPT_EOL[0])) + len(tok.encode(PROMPT_EOL[1]))
    overhead = {"prompt-eol": (prompt, 1), "token-prepending": (prompt + 1, 1),
                "causal2vec": (3 - (tok.bos_id is not None), 1),  # BOS, contextual token, EOS: 3 slots kept
                "echo": (len(tok.encode(f"Instruct: {ECHO_INSTRUCTION}\nQuery: ")) + len(tok.encode("\nQuery again: ")),
                         2)}
    return min((context - bos - overhead.get(p, (0, 1))[0]) // overhead.get(p, (0, 1))[1] for p in poolings)


def truncate(tok: decoderlab.Tokenizer, text: str, budget: int) -> str | None:
    """`text` cut to at most `budget` tokens (None if it cannot be encoded or nothing is left)."""
    try:
        ids = tok.encode(text)
        if len(ids) > budget:
            for cut in range(budget, -1, -1):  # a BPE prefix can re-encode longer than it was cut: cut shorter
                text = tok.decode(ids[:cut]).strip()
                if len(tok.encode(text)) <= budget:
                    break
    except UserError:  # a character the tokenizer does not know
        return None
    return text or None


def sample_pairs(tok: decoderlab.Tokenizer, n: int | None, budget: int, seed: int,
                 split: str = "eval") -> tuple[list[str], list[str], int]:
    """`n` (None: all) truncated pairs of the `split` files drawn with a fixed seed, queries and documents each
    distinct; also the candidate count."""
    candidates = list(function_pairs(default_corpus_files(), split=split))
    random.Random(seed).shuffle(candidates)
    queries, docs, seen_q, seen_d = [], [], set(), set()
    for query, body in candidates:
        q, d = truncate(tok, query, budget), truncate(tok, body, budget)
        if q is None or d is None or q in seen_q or d in seen_d:
            continue
        seen_q.add(q)
        seen_d.add(d)
        queries.append(q)
        docs.append(d)
        if len(queries) == n:
            break
    return queries, docs, len(candidates)


def c2v_head(cache: Path, folder: Path, model: decoderlab.Transformer, tok: decoderlab.Tokenizer, budget: int,
             args: argparse.Namespace):
    """A Causal2Vec head for this decoder trained on the train split's pairs for --c2v-time, cached by the decoder's
    weights and the settings; loaded onto `model`."""
    digest = hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()[:12] \
        if (folder / "model.safetensors").is_file() else hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]
    key = (f"c2v-{digest}-{args.c2v_time}-tok{budget}-L{args.c2v_layers}-d{args.c2v_decoder_tokens}-r{args.c2v_lora}"
           f"-b{args.c2v_batch}-lr{args.c2v_lr}-s{args.seed}")
    out = cache / key
    if not (out / "causal2vec.json").is_file():
        queries, docs, _ = sample_pairs(tok, None, budget, args.seed, split="train")
        print(f"training Causal2Vec head {out} on {len(queries)} train-split pairs for {args.c2v_time} ...", flush=True)
        config = Causal2VecConfig(encoder_layers=args.c2v_layers, max_tokens=budget, lora_r=args.c2v_lora,
                                  decoder_tokens=args.c2v_decoder_tokens)
        # A copy of the decoder to train on: LoRA adapters go onto it in place, and the training-free poolings
        # must be scored on the untouched decoder.
        trainee = decoderlab.load(folder, dtype=torch.float32).eval()
        result = train_causal2vec(trainee, tok, list(zip(queries, docs, strict=True)), config, time=args.c2v_time,
                                  batch_size=args.c2v_batch, lr=args.c2v_lr, seed=args.seed,
                                  bf16=args.dtype == "bf16", base_model=str(folder), out=out)
        print(f"  {result.steps} steps in {result.seconds:.0f}s, InfoNCE {result.losses[0]:.3f} -> "
              f"{statistics.mean(result.losses[-10:]):.3f} (mean of the last 10)", flush=True)
    if args.c2v_lora:  # the head puts its adapters onto the decoder it is loaded with: a copy, as a user would
        model = decoderlab.load(folder, dtype=torch.float32).eval()
    return load_causal2vec(out, model), model


def retrieval_scores(q: torch.Tensor, d: torch.Tensor, k: int = 10) -> tuple[float, float]:
    """(MRR@k, Recall@1) of document i for query i among all documents; ties ranked against the gold document."""
    sims = q @ d.T
    gold = sims.diagonal()
    rank = (sims >= gold[:, None]).sum(1).float()  # 1 = best; an equal score elsewhere pushes the gold one down
    mrr = torch.where(rank <= k, 1.0 / rank, torch.zeros_like(rank)).mean().item()
    return mrr, (rank == 1).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="existing model folder (with tokenizer); default: train one and cache it")
    parser.add_argument("--time", default="60s", help="training time when no --model is given")
    parser.add_argument("--context", type=int, default=256, help="context length of the trained model")
    parser.add_argument("--pairs", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0, help="seed of the pair sample")
    parser.add_argument("--max-tokens", type=int, help="cap on tokens per text (default: what fits the context)")
    parser.add_argument("--poolings", nargs="+", default=list(ALL_POOLINGS), choices=ALL_POOLINGS)
    parser.add_argument("--c2v-time", default="240s", help="Causal2Vec head training time (cached)")
    parser.add_argument("--c2v-layers", type=int, default=1, help="Causal2Vec encoder blocks")
    parser.add_argument("--c2v-lora", type=int, default=0, help="Causal2Vec LoRA rank on the decoder (0: frozen)")
    parser.add_argument("--c2v-decoder-tokens", type=int, default=32,
                        help="Causal2Vec: the decoder reads only this many tokens (the encoder all)")
    parser.add_argument("--c2v-batch", type=int, default=32, help="Causal2Vec pairs per training step")
    parser.add_argument("--c2v-lr", type=float, default=2e-3, help="Causal2Vec AdamW learning rate")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = CPU autocast around embed")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "decoderlab-bench-embed"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    folder = Path(args.model) if args.model else trained(Path(args.cache), args.time, args.context)
    model = decoderlab.load(folder, dtype=torch.float32).eval()
    tok = decoderlab.Tokenizer.from_folder(folder)
    budget = text_budget(tok, model.config.context_length, args.poolings)
    if args.max_tokens is not None:
        budget = min(budget, args.max_tokens)
    if budget < 1:
        raise SystemExit(f"context {model.config.context_length} leaves no room for text under every template")
    queries, docs, n_candidates = sample_pairs(tok, args.pairs, budget, args.seed)
    head, plain_model = None, model
    if "causal2vec" in args.poolings:
        head, c2v_model = c2v_head(Path(args.cache), folder, model, tok, budget, args)
    else:
        c2v_model = model
    n = len(queries)
    texts = queries + docs
    lengths = [len(tok.encode(t)) for t in texts]
    autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if args.dtype == "bf16" else contextlib.nullcontext())

    print(f"model: {folder}")
    print(f"  {model.num_params() / 1e6:.2f}M parameters, {model.config.n_layers} layers, width "
          f"{model.config.d_model}, vocab {model.config.vocab_size}, context {model.config.context_length}")
    print(f"pairs: {n} of {n_candidates} eval-split candidates (seed {args.seed}); texts cut to {budget} tokens; "
          "mean tokens "
          f"query {statistics.mean(lengths[:n]):.0f}, document {statistics.mean(lengths[n:]):.0f}")
    print(f"dtype: {'bf16 autocast' if args.dtype == 'bf16' else 'fp32'}, {torch.get_num_threads()} thread(s), "
          f"batch {args.batch_size}; texts/s over all {2 * n} texts (queries + documents), median of {args.repeats}")
    # Random ranking: the gold rank is uniform on 1..n, so the reciprocal rank (0 past 10) has these moments.
    mean_rr = sum(1 / r for r in range(1, 11)) / n
    sd_mrr = math.sqrt((sum(1 / r**2 for r in range(1, 11)) / n - mean_rr**2) / n)
    print(f"random ranking: MRR@10 {mean_rr:.4f} (sd {sd_mrr:.4f} over {n} independent queries), R@1 {1 / n:.4f}\n")

    print(f"| {'pooling':16} | {'MRR@10':>7} | {'R@1':>6} | {'texts/s':>8} |")
    print(f"|{'-' * 18}|{'-' * 8}:|{'-' * 7}:|{'-' * 9}:|")
    for pooling in args.poolings:
        def run(batch: list[str], pooling: str = pooling) -> torch.Tensor:
            with autocast:
                if pooling == "causal2vec":
                    return embed(c2v_model, batch, tok, pooling, batch_size=args.batch_size, head=head)
                return embed(plain_model, batch, tok, pooling, batch_size=args.batch_size, bos_id=tok.bos_id)

        run(texts[:args.batch_size])  # warm-up: first-call allocations and kernel selection
        times, emb = [], None
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            emb = run(texts)
            times.append(time.perf_counter() - t0)
        assert emb is not None and not math.isnan(emb.sum().item())
        mrr, r1 = retrieval_scores(emb[:n], emb[n:])
        print(f"| {pooling:16} | {mrr:7.4f} | {r1:6.4f} | {len(texts) / statistics.median(times):8.1f} |", flush=True)


if __name__ == "__main__":
    main()
