"""Training throughput: tokens/s and achieved model GFLOP/s against this machine's matmul peak.

Run: .venv/bin/python benchmarks/train_speed.py [--steps 8] [--shapes char-baby gpt2]

For the `char-baby` and `gpt2` shapes, in fp32 and bf16 (autocast), one full optimiser step
(forward, backward, AdamW) on random tokens, median of --steps after warm-up. Model FLOPs per token
are 6 N (N = non-embedding parameters plus the LM head) + 12 L T d for attention (the PaLM
convention); the peak is the best of large square matmuls timed in the same script.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F

from decoderlab import ModelConfig, Transformer
from decoderlab.training import TrainConfig
from decoderlab.training.optim import build_optimizers

SHAPES = {"char-baby": dict(batch=12, context=64), "gpt2": dict(batch=4, context=256)}


def matmul_peak(dtype: torch.dtype, n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / min(times) / 1e9


def flops_per_token(cfg: ModelConfig) -> float:
    n = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.d_model
    return 6 * n + 12 * cfg.n_layers * cfg.context_length * cfg.d_model


def step_time(cfg: ModelConfig, batch: int, dtype: str, steps: int) -> float:
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    opts = build_optimizers(model, TrainConfig(optimizer="adamw", lr=1e-3, steps=1), torch.device("cpu"))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    x = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length))
    y = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length))

    def one_step() -> None:
        with autocast:
            logits = model(x)
        F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)

    one_step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = ap.parse_args()
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; matmul peak (2048^2): "
          f"fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s")
    print(f"{'shape':10s} {'dtype':5s} {'batch x ctx':>11s} {'tokens/s':>10s} {'GFLOP/s':>8s} {'of peak':>8s}")
    for name in args.shapes:
        cfg = ModelConfig.preset(name, dropout=0.0)
        shape = SHAPES[name]
        cfg = cfg.replace(context_length=shape["context"])
        for dtype in ("fp32", "bf16"):
            t = step_time(cfg, shape["batch"], dtype, args.steps)
            tokens = shape["batch"] * cfg.context_length
            gflops = flops_per_token(cfg) * tokens / t / 1e9
            print(f"{name:10s} {dtype:5s} {shape['batch']:>4d} x {cfg.context_length:<4d} {tokens / t:10.0f} "
                  f"{gflops:8.1f} {gflops / peak[dtype]:8.1%}")


if __name__ == "__main__":
    main()
