"""Block-sparse attention (block masks from the mask algebra) against the dense mask, on this CPU.

Run: .venv/bin/python benchmarks/block_mask.py train [--contexts 2048 8192] [--steps 3]
     .venv/bin/python benchmarks/block_mask.py rule [--lengths 512 1024 2048] [--repeats 5]

`train`: one packed-document training step (forward, backward, AdamW; llama-tiny shape with an 8k vocabulary,
batch 1, fp32) under `causal() & document(ids)` with documents of random lengths (mean context/8), once with
the dense mask (attention_backend="dense") and once block-sparse (the "auto" choice): median step time and
peak memory, each measured in its own subprocess (ru_maxrss), printed side by side. A plain causal step (SDPA's
fused causal kernel, no mask at all) is printed as the floor.
`rule`: attention alone (8 query heads, 2 key heads, head dim 32), the numbers behind
`accel.flex.choose_attention`: dense mask vs block-sparse (block mask build included) by length, mask density
and dtype, forward only (prefill) and forward + backward (training).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from decoderlab import ModelConfig, Transformer, masks
from decoderlab.accel import flex
from decoderlab.training import TrainConfig
from decoderlab.training.optim import build_optimizers


def packed_documents(context: int, seed: int = 0) -> torch.Tensor:
    """Document ids [context] for one packed row: random lengths, mean context / 8."""
    g = torch.Generator().manual_seed(seed)
    ids, doc, used = torch.empty(context, dtype=torch.long), 0, 0
    while used < context:
        n = int(torch.randint(context // 16, context * 3 // 16 + 1, (1,), generator=g))
        ids[used:used + n] = doc
        used, doc = used + n, doc + 1
    return ids


def train_step_child(context: int, mode: str, steps: int) -> None:
    """Runs in its own process, so that ru_maxrss is this configuration's peak alone; prints one JSON line."""
    cfg = ModelConfig.preset("llama-tiny", context_length=context, vocab_size=8192)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    model.attention_backend = "dense" if mode == "dense" else "auto"
    opts = build_optimizers(model, TrainConfig(optimizer="adamw", lr=1e-3, steps=1), torch.device("cpu"))
    x, y = torch.randint(0, cfg.vocab_size, (2, 1, context)).unbind(0)
    docs = packed_documents(context).unsqueeze(0)
    mask = None if mode == "causal" else masks.causal() & masks.document(docs)
    density = None
    if mode == "blocks":
        density = flex.block_density(mask.to_block_mask(None, context, context))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step() -> None:
        logits = model(x, positions=None, mask=mask)
        F.cross_entropy(logits.flatten(0, 1), y.flatten()).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # warm-up (allocator, optimizer state)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps(dict(step_s=statistics.median(times), peak_mb=peak / 1024, before_mb=before / 1024,
                          docs=int(docs.max()) + 1, density=density)))


def run_child(context: int, mode: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "_child", str(context), mode, str(steps)], check=True,
                         capture_output=True, text=True, env=os.environ)
    return json.loads(out.stdout.strip().splitlines()[-1])


def train(args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
          f"llama-tiny (vocab 8192), batch 1, fp32, median of {args.steps} steps")
    print(f"{'context':>7s} {'docs':>4s} {'density':>7s} | {'dense mask':>20s} | {'block mask':>20s} | "
          f"{'time':>6s} {'memory':>6s} | {'causal, no mask':>20s}")
    for context in args.contexts:
        r = {mode: run_child(context, mode, args.steps) for mode in ("dense", "blocks", "causal")}

        def cell(m: dict) -> str:
            return f"{m['step_s']:7.2f} s {m['peak_mb']:7.0f} MB"

        d, b = r["dense"], r["blocks"]
        print(f"{context:7d} {b['docs']:4d} {b['density']:7.3f} | {cell(d):>20s} | {cell(b):>20s} | "
              f"{d['step_s'] / b['step_s']:5.2f}x {b['peak_mb'] / d['peak_mb']:6.2f} | {cell(r['causal']):>20s}",
              flush=True)
    print("time: dense step / block step (above 1: blocks faster); memory: block peak / dense peak "
          f"(whole process, {r['causal']['before_mb']:.0f} MB before the first step)")


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def attention_call(T: int, mask: masks.Mask, dtype: torch.dtype, backward: bool, sparse: bool):
    """One attention pass under `mask` as the model runs it: dense materialises the mask, sparse builds the
    block mask and gathers the non-empty blocks."""
    q = torch.randn(1, 8, T, 32, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, 2, T, 32, dtype=dtype, requires_grad=True) for _ in range(2))

    def call() -> None:
        with torch.set_grad_enabled(backward):
            if sparse:
                out = flex.block_sparse_attention(q, k, v, mask, mask.to_block_mask(None, T, T))
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.materialize(T, T), enable_gqa=True)
            if backward:
                out.sum().backward()

    return call


def rule(args: argparse.Namespace) -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; "
          f"attention only, B=1, 8 heads / 2 kv heads, head dim 32, median of {args.repeats}; "
          "block = block mask build + block-sparse attention")
    print(f"{'length':>6s} {'mask':>16s} {'density':>7s} {'dtype':>5s} {'pass':>8s} {'dense ms':>9s} "
          f"{'block ms':>9s} {'speed-up':>8s}")
    for T in args.lengths:
        cases = {"8 documents": masks.causal() & masks.document(torch.arange(T) // (T // 8)),
                 "2 documents": masks.causal() & masks.document(torch.arange(T) // (T // 2)),
                 "window T/8": masks.causal() & masks.window(T // 8),
                 "prefix-LM T/2": masks.causal() | masks.prefix(T // 2)}
        for name, mask in cases.items():
            density = flex.block_density(mask.to_block_mask(None, T, T))
            for dtype in (torch.float32, torch.bfloat16):
                for backward in (False, True):
                    td, tb = (median_time(attention_call(T, mask, dtype, backward, sparse), args.repeats)
                              for sparse in (False, True))
                    print(f"{T:6d} {name:>16s} {density:7.3f} {str(dtype)[6:].replace('float', 'fp'):>5s} "
                          f"{'fwd+bwd' if backward else 'fwd':>8s} {td * 1e3:9.1f} {tb * 1e3:9.1f} {td / tb:7.2f}x",
                          flush=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        train_step_child(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="what", required=True)
    t = sub.add_parser("train", help="packed-document training step: dense vs block mask")
    t.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    t.add_argument("--steps", type=int, default=3)
    r = sub.add_parser("rule", help="attention alone by length, density and dtype (the auto rule's numbers)")
    r.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    r.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    train(args) if args.what == "train" else rule(args)


if __name__ == "__main__":
    main()
