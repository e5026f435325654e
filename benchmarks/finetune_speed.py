"""LoRA fine-tuning speed and memory: decoderlab (our model + apply_lora) vs transformers + PEFT, same run.

Run: .venv/bin/python benchmarks/finetune_speed.py [--models gpt2 llama] [--dtypes fp32 bf16] [--batch 4]
     [--context 128] [--steps 4] [--rank 8]

Each base is a random Hugging Face folder made here with transformers: GPT-2 124M's shape (12 x 768, vocab 50257)
and a Llama shape of about the same size (12 x 768, 12 heads, 4 KV heads, SwiGLU 2048, vocab 32000). Both sides
load that folder, put rank-r LoRA adapters on the same modules (PEFT's defaults: GPT-2's c_attn, Llama's q_proj and
v_proj), and run the same plain loop on the same random tokens: forward, cross-entropy, backward, AdamW on the
adapters. fp32, and bf16 autocast (weights fp32). Each (side, model, dtype) runs in a fresh subprocess: tokens/s is
the median of --steps timed steps after one warm-up step, memory the process's peak RSS (getrusage's ru_maxrss)
minus its RSS once its libraries were imported (what loading and training added), and the peak itself.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    "gpt2": ("GPT2Config", dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12,
                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)),
    "llama": ("LlamaConfig", dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                                  num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
                                  tie_word_embeddings=False)),
}
MODEL_CLASS = {"GPT2Config": "GPT2LMHeadModel", "LlamaConfig": "LlamaForCausalLM"}


def make_folder(name: str, root: Path) -> Path:
    import torch
    import transformers

    folder = root / name
    if not (folder / "config.json").exists():
        config_cls, kwargs = SHAPES[name]
        torch.manual_seed(0)
        model = getattr(transformers, MODEL_CLASS[config_cls])(getattr(transformers, config_cls)(**kwargs))
        model.save_pretrained(folder)
    return folder


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_side(side: str, folder: str, dtype: str, batch: int, context: int, steps: int, rank: int) -> dict:
    """One side's measurement, in this (fresh) process."""
    import contextlib

    import torch
    import torch.nn.functional as F

    if side == "decoderlab":
        import decoderlab
    else:
        import peft
        import transformers
    baseline = current_rss()
    if side == "decoderlab":
        model = decoderlab.apply_lora(decoderlab.load(folder, pack=False),
                                      decoderlab.LoraConfig(r=rank, alpha=2 * rank)).train()
        params = decoderlab.lora_parameters(model)

        def logits_of(x):
            return model(x)
    else:
        base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0)).train()
        params = [p for p in model.parameters() if p.requires_grad]

        def logits_of(x):
            return model(input_ids=x).logits
    vocab = model.config.vocab_size
    opt = torch.optim.AdamW(params, lr=1e-4)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (steps + 1, batch, context + 1), generator=gen)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    times, losses = [], []
    for step in range(steps + 1):
        x, y = data[step, :, :-1], data[step, :, 1:]
        t0 = time.perf_counter()
        with autocast:
            logits = logits_of(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    median = statistics.median(times[1:])
    return {"tokens_per_s": batch * context / median, "step_s": median, "peak_mb": peak / 2**20,
            "added_mb": (peak - baseline) / 2**20, "loss": losses[0],
            "trainable": sum(p.numel() for p in params)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "decoderlab-finetune-speed"))
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: measure one side in this process
    parser.add_argument("--model-folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = run_side(args.side, args.model_folder, args.dtypes[0], args.batch, args.context, args.steps,
                          args.rank)
        print(json.dumps(result))
        return
    root = Path(args.folder)
    root.mkdir(parents=True, exist_ok=True)
    print(f"LoRA r={args.rank} on PEFT's default targets, batch {args.batch} x {args.context} tokens, median of "
          f"{args.steps} steps after 1 warm-up; torch threads {os.cpu_count()} cores")
    print(f"{'model':6} {'dtype':5} {'side':11} {'tokens/s':>9} {'step s':>7} {'added MB':>9} {'peak MB':>8} "
          f"{'loss':>7}")
    for name in args.models:
        folder = make_folder(name, root)
        for dtype in args.dtypes:
            results = {}
            for side in ("decoderlab", "peft"):
                cmd = [sys.executable, __file__, "--side", side, "--model-folder", str(folder), "--dtypes", dtype,
                       "--batch", str(args.batch), "--context", str(args.context), "--steps", str(args.steps),
                       "--rank", str(args.rank)]
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{side} failed:\n{done.stderr[-2000:]}")
                r = results[side] = json.loads(done.stdout.strip().splitlines()[-1])
                print(f"{name:6} {dtype:5} {side:11} {r['tokens_per_s']:9.0f} {r['step_s']:7.3f} "
                      f"{r['added_mb']:9.0f} {r['peak_mb']:8.0f} {r['loss']:7.3f}", flush=True)
            ours, theirs = results["decoderlab"], results["peft"]
            print(f"{name:6} {dtype:5} {'ratio':11} {ours['tokens_per_s'] / theirs['tokens_per_s']:8.2f}x "
                  f"{'':7} {ours['added_mb'] / theirs['added_mb']:8.2f}x {ours['peak_mb'] / theirs['peak_mb']:7.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
