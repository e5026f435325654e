"""LoRA fine-tuning speed and memory: decoderlab (our model + apply_lora) vs transformers + PEFT, same run.

Run: .venv/bin/python benchmarks/finetune_speed.py [--models gpt2 llama] [--dtypes fp32 bf16] [--batch 4]
     [--context 128] [--steps 4] [--rank 8] [--prompt-fraction 0.5]

Each base is a random Hugging Face folder made here with transformers: GPT-2 124M's shape (12 x 768, vocab 50257)
and a Llama shape of about the same size (12 x 768, 12 heads, 4 KV heads, SwiGLU 2048, vocab 32000). Both sides
load that folder, put rank-r LoRA adapters on the same modules (PEFT's defaults: GPT-2's c_attn, Llama's q_proj and
v_proj), and run the same plain loop on the same random tokens: forward, cross-entropy, backward, AdamW on the
adapters. The rows are SFT-shaped: the first --prompt-fraction of each row is prompt, without loss; decoderlab computes
the LM head at the response positions only (as `decoderlab.finetune` does), transformers at every position and masks
the prompt out of the loss (as its models and TRL's SFTTrainer do); --prompt-fraction 0 trains every token.
fp32, and bf16 autocast (weights fp32). Memory: each side alone in a fresh subprocess, its peak RSS
(getrusage's ru_maxrss) minus its RSS once its libraries were imported (what loading and training added), and the
peak itself; "alone" is that process's tokens/s. Speed ("tokens/s"): both sides in one more subprocess, their steps
alternating, median of --steps timed steps after one warm-up each, so that other work on a shared machine slows
both alike.
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


def make_step(side: str, folder: str, dtype: str, batch: int, context: int, steps: int, rank: int,
              prompt_fraction: float):
    """One side's training step on its own copy of the base: step(i) runs step i of the data, returns the loss."""
    import contextlib

    import torch
    import torch.nn.functional as F

    if side == "decoderlab":
        import decoderlab

        model = decoderlab.apply_lora(decoderlab.load(folder, pack=False),
                                      decoderlab.LoraConfig(r=rank, alpha=2 * rank)).train()
        params = decoderlab.lora_parameters(model)

        def logits_of(x, keep):
            # As decoderlab.finetune computes it: the LM head only where a token is trained.
            return model(x, logits_to_keep=keep)
    else:
        import peft
        import transformers

        base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        model = peft.get_peft_model(base, peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0)).train()
        params = [p for p in model.parameters() if p.requires_grad]

        def logits_of(x, keep):
            # As transformers (and TRL's SFTTrainer, completion_only_loss) compute it: every position's logits,
            # the prompt's masked out of the loss afterwards.
            return model(input_ids=x).logits[keep]
    opt = torch.optim.AdamW(params, lr=1e-4)
    data = torch.randint(0, model.config.vocab_size, (steps + 1, batch, context + 1),
                         generator=torch.Generator().manual_seed(0))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()

    # SFT rows: the first prompt_fraction of each row is prompt (no loss), the rest response.
    keep = torch.arange(context).expand(batch, context) >= int(prompt_fraction * context)

    def step(i: int) -> float:
        x, y = data[i, :, :-1], data[i, :, 1:]
        with autocast:
            logits = logits_of(x, keep)
        loss = F.cross_entropy(logits.float(), y[keep])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def timed(step, i: int) -> float:
    t0 = time.perf_counter()
    step(i)
    return time.perf_counter() - t0


def run_memory(side: str, folder: str, dtype: str, batch: int, context: int, steps: int, rank: int,
               prompt_fraction: float) -> dict:
    """One side alone in this (fresh) process: its RSS high-water mark over loading and --steps + 1 steps."""
    if side == "decoderlab":
        import decoderlab  # noqa: F401  (libraries imported before the baseline)
    else:
        import peft  # noqa: F401
        import transformers  # noqa: F401
    baseline = current_rss()
    step = make_step(side, folder, dtype, batch, context, steps, rank, prompt_fraction)
    loss = step(0)
    times = [timed(step, i) for i in range(1, steps + 1)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"peak_mb": peak / 2**20, "added_mb": (peak - baseline) / 2**20, "loss": loss,
            "alone_tokens_per_s": batch * context / statistics.median(times)}


def run_both(folder: str, dtype: str, batch: int, context: int, steps: int, rank: int,
             prompt_fraction: float) -> dict:
    """Both sides in this process, their steps alternating, so that a machine shared with other work slows both
    alike: the median step time of each."""
    sides = {side: make_step(side, folder, dtype, batch, context, steps, rank, prompt_fraction)
             for side in ("decoderlab", "peft")}
    for step in sides.values():
        step(0)  # warm-up
    times: dict[str, list[float]] = {side: [] for side in sides}
    for i in range(1, steps + 1):
        for side in (("decoderlab", "peft") if i % 2 else ("peft", "decoderlab")):
            times[side].append(timed(sides[side], i))
    return {side: batch * context / statistics.median(t) for side, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--prompt-fraction", type=float, default=0.5,
                        help="share of each row that is prompt, trained on by neither side (0: every token)")
    parser.add_argument("--folder", default=str(Path(tempfile.gettempdir()) / "decoderlab-finetune-speed"))
    parser.add_argument("--side", help=argparse.SUPPRESS)  # internal: measure in this process
    parser.add_argument("--model-folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        common = (args.model_folder, args.dtypes[0], args.batch, args.context, args.steps, args.rank,
                  args.prompt_fraction)
        result = run_both(*common) if args.side == "both" else run_memory(args.side, *common)
        print(json.dumps(result))
        return
    root = Path(args.folder)
    root.mkdir(parents=True, exist_ok=True)
    print(f"LoRA r={args.rank} on PEFT's default targets, batch {args.batch} x {args.context} tokens (the first "
          f"{args.prompt_fraction:.0%} of each row prompt, no loss), median of {args.steps} steps after 1 warm-up; "
          f"{os.cpu_count()} cores")
    print(f"{'model':6} {'dtype':5} {'side':11} {'tokens/s':>9} {'alone':>7} {'added MB':>9} {'peak MB':>8} "
          f"{'loss':>7}")

    def measure(side: str, folder: Path, dtype: str) -> dict:
        cmd = [sys.executable, __file__, "--side", side, "--model-folder", str(folder), "--dtypes", dtype,
               "--batch", str(args.batch), "--context", str(args.context), "--steps", str(args.steps),
               "--rank", str(args.rank), "--prompt-fraction", str(args.prompt_fraction)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"{side} failed:\n{done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    for name in args.models:
        folder = make_folder(name, root)
        for dtype in args.dtypes:
            memory = {side: measure(side, folder, dtype) for side in ("decoderlab", "peft")}
            speed = measure("both", folder, dtype)
            for side, r in memory.items():
                print(f"{name:6} {dtype:5} {side:11} {speed[side]:9.0f} {r['alone_tokens_per_s']:7.0f} "
                      f"{r['added_mb']:9.0f} {r['peak_mb']:8.0f} {r['loss']:7.3f}", flush=True)
            ours, theirs = memory["decoderlab"], memory["peft"]
            print(f"{name:6} {dtype:5} {'ratio':11} {speed['decoderlab'] / speed['peft']:8.2f}x "
                  f"{ours['alone_tokens_per_s'] / theirs['alone_tokens_per_s']:6.2f}x "
                  f"{ours['added_mb'] / theirs['added_mb']:8.2f}x {ours['peak_mb'] / theirs['peak_mb']:7.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
