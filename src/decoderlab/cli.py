"""The `decoderlab` command line: a thin typer layer over the Python API.

User errors print one line (`error: ...`) and exit with code 2; anything else is a bug and shows a
traceback.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys

import typer
from rich.console import Console
from rich.table import Table

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="decoderlab: one causal transformer with an explicit attention-mask algebra.")
console = Console()


@app.command()
def info(path: str = typer.Argument(..., help="A checkpoint folder (HF format) or a preset name.")) -> None:
    """Print a model's architecture, parameter count, dtype and context length."""
    from .checkpoint import describe

    summary = describe(path)
    table = Table(show_header=False, box=None)
    for key, value in summary.items():
        shown = f"{value:,}" if key == "parameters" else str(value)
        table.add_row(f"[bold]{key.replace('_', ' ')}[/bold]", shown)
    console.print(table)


@app.command()
def presets() -> None:
    """List the named model presets."""
    from .config import PRESETS

    table = Table("preset", "parameters", "layers", "heads", "width", "context", "positions")
    for name, cfg in PRESETS.items():
        table.add_row(name, f"{cfg.num_params():,}", str(cfg.n_layers), str(cfg.n_heads), str(cfg.d_model),
                      str(cfg.context_length), cfg.positions)
    console.print(table)


def _parse_sets(items: list[str] | None) -> dict[str, object]:
    """`--set key=value` pairs with JSON-ish values (numbers, true/false, null, strings)."""
    import json

    out: dict[str, object] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set expects key=value, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


@app.command()
def prepare(
    data: list[str] = typer.Argument(None, help="Files, folders or globs (.txt .md .py .jsonl); none: default corpus."),
    out: str = typer.Option(..., "--out", help="Folder for the token shards and tokenizer."),
    tokenizer: str = typer.Option("char", help="char, bpe, or a folder / tokenizer.json to reuse."),
    vocab_size: int = typer.Option(4096, help="BPE vocabulary size."),
    text_field: str = typer.Option("text", help="Field holding the text in .jsonl files."),
) -> None:
    """Tokenize a corpus into train/val token shards (re-running reuses what is there)."""
    from .data import prepare as prepare_data

    prepared = prepare_data(data or None, out, tokenizer=tokenizer, vocab_size=vocab_size, text_field=text_field)
    meta = prepared.meta
    console.print(f"prepared {out}: vocab {prepared.tokenizer.vocab_size}, "
                  f"train {len(prepared.train):,} tokens, val {len(prepared.val):,} tokens")
    if meta.get("replaced_bytes"):
        console.print(f"[yellow]{meta['replaced_bytes']} invalid UTF-8 byte(s) were replaced")


@app.command()
def train(
    data: list[str] = typer.Option(None, "--data", help="Files, folders or globs; default: the Python stdlib."),
    tokenizer: str = typer.Option(None, help="char (default), bpe, or a tokenizer folder."),
    vocab_size: int = typer.Option(None, help="BPE vocabulary size (default 4096)."),
    time: str = typer.Option(None, "--time", help="Stop after this much training time, e.g. 90s, 3m."),
    steps: int = typer.Option(None, help="Stop after this many optimiser steps."),
    tokens: int = typer.Option(None, help="Stop after this many training tokens."),
    out: str = typer.Option(None, "--out", help="Run folder (default runs/latest)."),
    preset: str = typer.Option(None, help="Model preset (default: our recipe for the data)."),
    layers: int = typer.Option(None, help="Model override: number of layers."),
    heads: int = typer.Option(None, help="Model override: attention heads."),
    width: int = typer.Option(None, help="Model override: model width (d_model)."),
    context: int = typer.Option(None, help="Context length (tokens per training row)."),
    set_: list[str] = typer.Option(None, "--set", help="Model override key=value (any ModelConfig field)."),
    batch_size: int = typer.Option(None, help="Rows per optimiser step (global)."),
    grad_accum: int = typer.Option(None, help="Micro-batches per step."),
    optimizer: str = typer.Option(None, help="muon (default) or adamw."),
    lr: float = typer.Option(None, help="AdamW learning rate."),
    muon_lr: float = typer.Option(None, help="Muon learning rate."),
    embed_lr: float = typer.Option(None, help="AdamW learning rate of the token embedding (default with Muon: 5x "
                                   "--lr)."),
    head_lr: float = typer.Option(None, help="AdamW learning rate of the LM head (default with Muon: 0.5x --lr)."),
    schedule: str = typer.Option(None, help="wsd (default), cosine or constant."),
    warmup: float = typer.Option(None, help="Warmup as a fraction of the run."),
    weight_decay: float = typer.Option(None, help="Weight decay."),
    dtype: str = typer.Option(None, help="auto (default: bf16 where the device runs it natively, GPUs and "
                              "AVX-512 CPUs; else fp32), bf16 or fp32."),
    compile: bool = typer.Option(None, "--compile/--no-compile", help="torch.compile the model."),
    objective: str = typer.Option(None, help="next (default), mtp, prefix, mlm (BERT-style masked LM) or diffusion "
                                  "(masked diffusion LM); mlm and diffusion lift the causal mask."),
    n_future: int = typer.Option(None, help="mtp: number of extra future-token heads."),
    switch_to: str = typer.Option(None, help="Continue a next-token run with mlm or diffusion from --switch-at on "
                                  "(CLM -> MLM)."),
    switch_at: float = typer.Option(None, help="--switch-to: the fraction of the run where it switches (default 0.5)."),
    eval_interval: int = typer.Option(None, help="Evaluate every N steps (default: ten times per run)."),
    eval_tasks: str = typer.Option(None, help="lm-eval tasks to run at every evaluation, logged in metrics.jsonl: "
                                   "names, task YAML files or folders, comma-separated (needs decoderlab[eval])."),
    eval_limit: int = typer.Option(None, help="--eval-tasks: documents per task at each evaluation (default 200)."),
    save_interval: int = typer.Option(None, help="Save a resumable checkpoint every N steps (default: at evals)."),
    log_interval: int = typer.Option(None, help="Log train loss every N steps (default 10)."),
    keep_last: int = typer.Option(None, help="Resumable checkpoints to keep (default 2; the best model is kept too)."),
    seed: int = typer.Option(None, help="Random seed."),
    device: str = typer.Option(None, help="auto, cpu or cuda."),
    fsdp: bool = typer.Option(None, "--fsdp/--ddp", help="Under torchrun: shard with FSDP instead of DDP."),
    resume: str = typer.Option(None, "--resume", help="Continue the run in this folder (its schedule, exactly)."),
    extend: bool = typer.Option(False, "--extend", help="With --resume of a finished run: train further by "
                                "--steps/--tokens/--time more (a new warmup-decay segment from its final LR)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out (its checkpoints, "
                                   "metrics and model files; nothing else there is deleted)."),
    allow_data_change: bool = typer.Option(False, "--allow-data-change", help="With --resume: continue although "
                                           "the input files changed since the snapshot (with the run's tokenizer)."),
    sample_tokens: int = typer.Option(None, help="Characters/tokens to sample at the end (0 = none)."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Train a model (defaults: our best small-model recipe on the Python standard library, 2 minutes).

    Ctrl-C (SIGINT) or SIGTERM finish the current step, save a snapshot and exit with code 130 / 143;
    `--resume RUN` then continues exactly where it stopped.
    """
    from .training import Budget, TrainConfig, TrainingInterrupted, parse_duration, resume_config
    from .training import train as run_training

    model = {"n_layers": layers, "n_heads": heads, "d_model": width}
    model = {k: v for k, v in model.items() if v is not None} | _parse_sets(set_)
    given = dict(data=data or None, tokenizer=tokenizer, vocab_size=vocab_size, time=time, steps=steps,
                 tokens=tokens, out=out, preset=preset, model=model or None, context_length=context,
                 batch_size=batch_size, grad_accum=grad_accum, optimizer=optimizer, lr=lr, muon_lr=muon_lr,
                 embed_lr=embed_lr, head_lr=head_lr,
                 schedule=schedule, warmup=warmup, weight_decay=weight_decay, dtype=dtype, compile=compile,
                 objective=objective, n_future=n_future, switch_to=switch_to, switch_at=switch_at,
                 eval_interval=eval_interval, save_interval=save_interval,
                 eval_tasks=eval_tasks, eval_limit=eval_limit,
                 log_interval=log_interval, keep_last=keep_last, seed=seed, device=device,
                 fsdp=fsdp, sample_tokens=sample_tokens)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    budget = None
    if extend:
        if not resume:
            raise UserError("--extend continues a finished run: use it with --resume RUN")
        budget = Budget(steps, tokens, parse_duration(time))
    if resume:
        if out is not None and out != resume:
            raise UserError("--out contradicts --resume; a resumed run continues in its own folder")
        cfg = resume_config(resume, given, extend=extend)
    else:
        if allow_data_change:
            raise UserError("--allow-data-change applies to --resume only")
        cfg = TrainConfig(**{k: v for k, v in given.items() if v is not None})
    try:
        result = run_training(cfg, resume=bool(resume), progress=progress, overwrite=overwrite, extend=budget,
                              allow_data_change=allow_data_change)
    except TrainingInterrupted as e:
        if main_rank:
            print(f"interrupted by {e.signal_name} at step {e.step}: saved {e.snapshot}; continue with: "
                  f"decoderlab train --resume {cfg.out}", file=sys.stderr)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        if main_rank:
            print("interrupted; the run folder's last complete snapshot, if any, is intact", file=sys.stderr)
        raise typer.Exit(130) from None
    if not main_rank:
        return
    val = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    bpb = "n/a" if result.val_bits_per_byte is None or math.isnan(result.val_bits_per_byte) else (
        f"{result.val_bits_per_byte:.3f}")
    console.print(f"trained {result.steps} steps, {result.tokens:,} tokens in {result.train_seconds:.1f}s; "
                  f"val loss {val} (bits/byte {bpb}); saved to {result.run_dir}")
    if cfg.sample_tokens:
        prompt = cfg.sample_prompt if cfg.sample_prompt is not None else ("def " if cfg.data is None else "\n")
        prompt = _known_prompt(str(result.run_dir), prompt)
        if prompt is None:
            return
        console.print("[bold]sample:[/bold]")
        try:
            text = _sample_text(str(result.run_dir), prompt, cfg.sample_tokens, 0.8, 40, cfg.seed)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None
        console.print(text, markup=False, highlight=False)


SCORED = 100  # held-out prompts `decoderlab finetune` scores at the end


@app.command("finetune")
def finetune_cmd(
    base: str = typer.Argument(None, help="The model to start from: a Hugging Face folder or a decoderlab run."),
    data: list[str] = typer.Option(None, "--data", help="JSONL files: {messages}, {prompt, completion} or {text} "
                                   "records ({prompt, chosen, rejected} for --objective dpo)."),
    out: str = typer.Option(None, "--out", help="Run folder (default runs/finetune)."),
    val: list[str] = typer.Option(None, "--val", help="Held-out JSONL files (default: 5 % of --data, at most 500)."),
    epochs: float = typer.Option(None, help="Passes over the training records (default 1 without another budget)."),
    steps: int = typer.Option(None, help="Stop after this many optimiser steps."),
    time: str = typer.Option(None, "--time", help="Stop after this much training time, e.g. 90s, 3m."),
    lr: float = typer.Option(None, help="Learning rate (default 1e-4; 1e-3 with LoRA)."),
    batch_size: int = typer.Option(None, help="Rows per optimiser step (pairs with dpo; default 8)."),
    grad_accum: int = typer.Option(None, help="Micro-batches per step."),
    context: int = typer.Option(None, help="Tokens per row (default: the longest example, up to the model's)."),
    packing: bool = typer.Option(None, "--packing/--no-packing", help="Pack several examples per row (default)."),
    loss_on: str = typer.Option(None, help="response (default: assistant turns / completions) or all."),
    chat_template: str = typer.Option(None, help="A Jinja chat template file replacing the tokenizer's."),
    lora_r: int = typer.Option(None, help="Train LoRA adapters of this rank (base frozen); 0 = the whole model."),
    lora_alpha: float = typer.Option(None, help="LoRA alpha (default 16)."),
    lora_dropout: float = typer.Option(None, help="LoRA dropout (default 0)."),
    lora_targets: str = typer.Option(None, help="Modules to adapt, comma-separated names or regexes (default: "
                                     "the attention's q and v projections)."),
    quantize: str = typer.Option(None, "--quantize", help="QLoRA-style: int8 or int4 frozen base under the LoRA "
                                 "adapters (needs --lora-r)."),
    bitune: bool = typer.Option(None, "--bitune/--no-bitune", help="Prompts attend bidirectionally (Bitune)."),
    objective: str = typer.Option(None, help="next (default: SFT), distill, taid, dpo, bico (half the steps "
                                  "masked-LM with the causal mask lifted; the tokenizer needs <mask>) or diffusion "
                                  "(adapt a causal model to masked diffusion; adds <mask> where missing)."),
    anneal_steps: int = typer.Option(None, "--anneal-steps", help="diffusion: optimiser steps over which the "
                                     "attention goes from causal to full (default: the first half of the run)."),
    teacher: str = typer.Option(None, help="distill / taid: the teacher model (same tokenizer)."),
    temperature: float = typer.Option(None, help="distill: temperature of the KL (default 1)."),
    distill_weight: float = typer.Option(None, help="distill: weight of the KL; the rest goes to next-token loss."),
    dpo_beta: float = typer.Option(None, help="dpo: beta (default 0.1)."),
    optimizer: str = typer.Option(None, help="adamw (default) or muon."),
    schedule: str = typer.Option(None, help="cosine (default), wsd or constant."),
    warmup: float = typer.Option(None, help="Warmup as a fraction of the run (default 0.03)."),
    weight_decay: float = typer.Option(None, help="Weight decay."),
    dtype: str = typer.Option(None, help="auto (default), bf16 or fp32."),
    eval_interval: int = typer.Option(None, help="Evaluate every N steps (default: five times per run)."),
    save_interval: int = typer.Option(None, help="Save a resumable checkpoint every N steps (default: at evals)."),
    log_interval: int = typer.Option(None, help="Log train loss every N steps (default 10)."),
    seed: int = typer.Option(None, help="Random seed."),
    device: str = typer.Option(None, help="auto, cpu or cuda."),
    show: int = typer.Option(None, help="Held-out examples to print generated at the end (default 3)."),
    score: bool = typer.Option(True, "--score/--no-score", help=f"At the end, greedy exact match on up to {SCORED} "
                               "held-out prompts, base model vs fine-tuned."),
    resume: str = typer.Option(None, "--resume", help="Continue the fine-tuning run in this folder, exactly."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out."),
    allow_data_change: bool = typer.Option(False, "--allow-data-change", help="With --resume: continue although "
                                           "the data files changed."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Fine-tune a checkpoint on instruction data (SFT with response-only loss, LoRA, Bitune, distillation, DPO).

    Ctrl-C saves a snapshot and exits 130; `--resume RUN` continues it exactly.
    """
    from .finetuning import FinetuneConfig, FinetuneTrainer, score_responses
    from .training import TrainingInterrupted, resume_config
    from .training import train as run_training

    given = dict(base=base, data=data or None, out=out, val_data=val or None, epochs=epochs, steps=steps, time=time,
                 lr=lr, batch_size=batch_size, grad_accum=grad_accum, context_length=context, packed=packing,
                 loss_on=loss_on, chat_template=chat_template, lora_r=lora_r, lora_alpha=lora_alpha,
                 lora_dropout=lora_dropout, lora_targets=lora_targets, quantize=quantize, bitune=bitune,
                 objective=objective, anneal_steps=anneal_steps,
                 teacher=teacher, distill_temperature=temperature, distill_weight=distill_weight, dpo_beta=dpo_beta,
                 optimizer=optimizer, schedule=schedule, warmup=warmup, weight_decay=weight_decay, dtype=dtype,
                 eval_interval=eval_interval, save_interval=save_interval, log_interval=log_interval, seed=seed,
                 device=device, show=show)
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if resume:
        if out is not None and out != resume:
            raise UserError("--out contradicts --resume; a resumed run continues in its own folder")
        cfg = resume_config(resume, given, config_class=FinetuneConfig)
    else:
        if base is None:
            raise UserError("give the model to fine-tune: decoderlab finetune MODEL --data FILE.jsonl")
        if allow_data_change:
            raise UserError("--allow-data-change applies to --resume only")
        cfg = FinetuneConfig(**{k: v for k, v in given.items() if v is not None})
    try:
        result = run_training(cfg, resume=bool(resume), progress=progress, overwrite=overwrite,
                              allow_data_change=allow_data_change, trainer_class=FinetuneTrainer)
    except TrainingInterrupted as e:
        if main_rank:
            print(f"interrupted by {e.signal_name} at step {e.step}: saved {e.snapshot}; continue with: "
                  f"decoderlab finetune --resume {cfg.out}", file=sys.stderr)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if not main_rank:
        return
    before = f"{result.val_loss_before:.4f}" if result.val_loss_before is not None else "n/a"
    after = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    console.print(f"fine-tuned {result.steps} steps, {result.tokens:,} tokens in {result.train_seconds:.1f}s; "
                  f"held-out loss {before} -> {after}; saved to {result.run_dir}")
    if cfg.objective == "diffusion":  # the causal decoder does not apply; the held-out loss is LLaDA's
        console.print("[dim]held-out loss: masked diffusion's (1/t-weighted, per trained token); sample with the "
                      "diffusion sampler[/dim]", highlight=False)
        return
    examples = [e for e in result.held_out if hasattr(e, "prompt_length") and e.prompt_length > 0][:SCORED]
    if not examples or not (cfg.show or score):
        return
    import decoderlab

    tok = decoderlab.Tokenizer.from_folder(result.run_dir)
    if cfg.lora_r:
        tuned = decoderlab.load(cfg.base, adapter=str(result.run_dir), quantize=cfg.quantize)
    else:
        tuned = decoderlab.load(result.run_dir)
    after = score_responses(tuned, tok, examples if score else examples[:cfg.show], bitune=cfg.bitune)
    if score:
        before = score_responses(decoderlab.load(cfg.base), tok, examples)
        console.print(f"held-out exact match ({len(examples)} prompts, greedy): {before.exact_match:.1%} -> "
                      f"{after.exact_match:.1%}")
    for prompt, reference, generated in list(zip(after.prompts, after.references, after.generated,
                                                 strict=True))[:cfg.show]:
        console.print(f"[bold]prompt:[/bold] {prompt!r}\n  reference: {reference!r}\n  generated: "
                      f"{generated!r}", highlight=False)


def _known_prompt(run: str, prompt: str) -> str | None:
    """`prompt` if the run's tokenizer can encode it; else (a corpus without newlines, say) a token it knows, with a
    note; None (and a note) when there is none."""
    import decoderlab

    tok = decoderlab.Tokenizer.from_folder(run)
    try:
        tok.encode(prompt, add_special_tokens=False)
        return prompt
    except UserError:
        pass
    for i in range(tok.vocab_size):
        text = tok.decode([i])
        if text.strip():
            with contextlib.suppress(UserError):
                tok.encode(text, add_special_tokens=False)
                console.print(f"[dim]note: the tokenizer has no {prompt!r}; the sample starts from {text!r}[/dim]",
                              highlight=False)
                return text
    console.print(f"[dim]note: the tokenizer has no {prompt!r} and no other text to start from; no sample[/dim]",
                  highlight=False)
    return None


def _sample_text(run: str, prompt: str, n: int, temperature: float, top_k: int | None, seed: int) -> str:
    """`n` new tokens after `prompt`; past the model's context, the window slides (re-reading its second half)."""
    import decoderlab

    from .generation import generate

    model = decoderlab.load(run)
    tok = decoderlab.Tokenizer.from_folder(run)
    ctx = model.config.context_length
    # The model's tokenizer decides about special tokens (a BOS where it adds one); a char tokenizer adds none.
    ids = tok.encode(prompt) or ([tok.bos_id] if tok.bos_id is not None else [0])
    new: list[int] = []
    while len(new) < n:
        window = (ids + new)[-max(1, ctx // 2):] if len(ids) + len(new) >= ctx else ids + new
        result = generate(model, [window], max_new_tokens=min(n - len(new), ctx - len(window)),
                          temperature=temperature, top_k=top_k, seed=seed + len(new), stop_tokens=[])
        if not result.tokens[0]:
            break
        new += result.tokens[0]
    return prompt + tok.decode(new)


def _unescape(text: str) -> str:
    """The shell-friendly escapes \\n, \\t and \\\\ in a prompt; anything else stays as typed (non-ASCII too)."""
    import re

    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


@app.command()
def sample(
    run: str = typer.Argument(..., help="A run folder or checkpoint folder."),
    prompt: str = typer.Argument("\n", help="Text to continue."),
    tokens: int = typer.Option(200, "--tokens", "-n", help="Tokens to generate."),
    temperature: float = typer.Option(0.8, help="Sampling temperature (0 = greedy)."),
    top_k: int = typer.Option(None, help="Sample among the k most likely tokens."),
    seed: int = typer.Option(0, help="Random seed."),
    num: int = typer.Option(1, "--num", help="Number of continuations."),
) -> None:
    """Print continuations of a prompt from a trained model."""
    prompt = _unescape(prompt)
    for i in range(num):
        if num > 1:
            console.print(f"[bold]--- sample {i + 1}[/bold]")
        console.print(_sample_text(run, prompt, tokens, temperature, top_k, seed + i), markup=False, highlight=False)


COMPILE_HELP = ("Decode through one torch.compile graph: seconds to compile at first use, then faster steps "
                "(mostly for small models and bf16).")


QUANTIZE_HELP = "int8 or int4: weight-only quantization of every linear layer for CPU decoding."


@app.command("quantize")
def quantize_cmd(
    path: str = typer.Argument(..., help="A checkpoint or run folder."),
    out: str = typer.Argument(..., help="Folder to write the quantized model to (with the tokenizer)."),
    bits: int = typer.Option(8, "--bits", help="8 (int8 per output channel) or 4 (int4 in groups)."),
    group_size: int = typer.Option(64, "--group-size", help="Inputs per int4 scale (32, 64, 128 or 256)."),
    lm_head: bool = typer.Option(True, "--lm-head/--no-lm-head", help="Quantize the LM head too."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a model already in OUT (never PATH itself)."),
) -> None:
    """Quantize a model's weights (int8 or int4) and save a folder that `load` reads back quantized."""
    from pathlib import Path

    import decoderlab

    if Path(out).resolve() == Path(path).resolve():
        raise UserError(f"OUT {out!r} is the model's own folder: quantizing in place would lose its float weights; "
                        "give another folder")
    if (Path(out) / "config.json").exists() and not overwrite:
        raise UserError(f"{out!r} already holds a model (config.json); pass --overwrite to replace it")
    model = decoderlab.load(path, pack=False).quantize(bits, group_size, lm_head=lm_head)
    try:
        tok = decoderlab.Tokenizer.from_folder(path)
    except UserError:
        tok = None  # a folder without a tokenizer: the weights alone
    decoderlab.save(model, out, tokenizer=tok)
    console.print(f"wrote {out} (int{bits}{f', group size {group_size}' if bits == 4 else ''})")


@app.command("serve")
def serve_cmd(
    path: str = typer.Argument(..., help="A checkpoint or run folder (with its tokenizer)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, help="Port to listen on (0: any free port)."),
    model_name: str = typer.Option(None, "--model-name", help="Name clients pass as `model` (default: folder name)."),
    tokenizer: str = typer.Option(None, help="Tokenizer folder, if not the checkpoint's own."),
    device: str = typer.Option(None, help="cpu or cuda (default: cpu)."),
    compile: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    quantize: str = typer.Option(None, "--quantize", help=QUANTIZE_HELP),
    group_size: int = typer.Option(64, "--group-size", help="Inputs per int4 scale (32, 64, 128 or 256)."),
    api_key: str = typer.Option(None, "--api-key", envvar="DECODERLAB_API_KEY",
                                help="Require 'Authorization: Bearer KEY' on /v1 routes (env DECODERLAB_API_KEY)."),
    max_body_bytes: int = typer.Option(1 << 20, help="Largest request body read (413 past it)."),
    max_prompt_tokens: int = typer.Option(None, help="Longest prompt (400 past it); default: context length - 1."),
    default_max_tokens: int = typer.Option(256, help="Tokens generated when a request gives no max_tokens."),
    max_tokens_cap: int = typer.Option(None, help="Largest max_tokens accepted (400 past it); default: context."),
    max_queue: int = typer.Option(16, help="Requests that may wait for the model (429 past it)."),
    queue_timeout: float = typer.Option(None, help="Seconds a request may wait for the model (503 past it)."),
    max_stop: int = typer.Option(4, help="Stop strings per request."),
    max_stop_length: int = typer.Option(256, help="Characters per stop string."),
    max_top_logprobs: int = typer.Option(20, help="Alternatives per token that logprobs may ask for."),
    speculative: str = typer.Option(None, help="A draft model's folder: requests decode by Recursive Speculative "
                                    "Decoding (same output distribution as plain decoding)."),
    tree: str = typer.Option("3,2,1", "--tree", help="With --speculative: the draft tree, WxD or per-depth widths."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (/v1/models, /v1/completions, /v1/chat/completions)."""
    from .serve import ServerLimits
    from .serve import serve as run_server

    limits = ServerLimits(max_body_bytes=max_body_bytes, max_prompt_tokens=max_prompt_tokens,
                          default_max_tokens=default_max_tokens, max_tokens_cap=max_tokens_cap, max_queue=max_queue,
                          queue_timeout=queue_timeout, max_stop=max_stop, max_stop_length=max_stop_length,
                          max_top_logprobs=max_top_logprobs)
    widths, depth = _tree_shape(tree)
    run_server(path, host=host, port=port, model_name=model_name, tokenizer=tokenizer, device=device,
               compile=compile, limits=limits, api_key=api_key, quantize=quantize, group_size=group_size,
               draft=speculative, tree=widths, depth=depth)


def _tree_shape(text: str) -> tuple[int | list[int], int | None]:
    """--tree: "WxD" (width x depth) or "3,2,1" (per-depth widths), as rsd_decoder's (width, depth)."""
    try:
        if "x" in text:
            width, depth = text.lower().split("x")
            return int(width), int(depth)
        return [int(w) for w in text.split(",")], None
    except ValueError:
        raise UserError(f"--tree must be WxD (e.g. 2x3) or per-depth widths (e.g. 3,2,1), got {text!r}") from None


@app.command("generate")
def generate_cmd(
    path: str = typer.Argument(..., help="A checkpoint or run folder (with its tokenizer)."),
    prompt: str = typer.Argument(..., help="Text to continue (encoded with the tokenizer's special tokens, e.g. BOS)."),
    tokens: int = typer.Option(200, "--tokens", "-n", help="New tokens at most (fewer past the context length)."),
    temperature: float = typer.Option(None, help="Sampling temperature (0 = greedy). Sampling flags left out take "
                                      "the checkpoint's generation_config.json (greedy without one)."),
    top_k: int = typer.Option(None, help="Sample among the k most likely tokens (0: off)."),
    top_p: float = typer.Option(None, help="Sample among the most likely tokens holding this much probability."),
    repetition_penalty: float = typer.Option(None, help="Penalise tokens already seen (1: off), as transformers."),
    seed: int = typer.Option(None, help="Random seed."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop at this text (repeatable)."),
    chat: bool = typer.Option(False, "--chat", help="Send the prompt as a user message through the chat template."),
    speculative: str = typer.Option(None, help="Speculative decoding: recycle (Token Recycling) or mtp (the "
                                    "model's future heads), both greedy; or a draft model's folder (samples as "
                                    "plain decoding does)."),
    tree: str = typer.Option(None, "--tree", help="With --speculative DRAFT_FOLDER: Recursive Speculative "
                             "Decoding with a draft tree, WxD (W children per node, D levels, e.g. 2x3) or "
                             "per-depth widths (e.g. 3,2,1); exact in distribution like chain speculation."),
    compile: bool = typer.Option(False, "--compile", help=COMPILE_HELP),
    window: int = typer.Option(None, "--window", help="Streaming with attention sinks (StreamingLLM): keep the "
                               "last W tokens (plus --sinks) in a fixed KV cache and generate past the context."),
    sinks: int = typer.Option(None, "--sinks", help="With --window: the first S tokens kept as attention sinks "
                              "(default 4)."),
    quantize: str = typer.Option(None, "--quantize", help=QUANTIZE_HELP),
    group_size: int = typer.Option(64, "--group-size", help="Inputs per int4 scale (32, 64, 128 or 256)."),
    bidirectional_prompt: bool = typer.Option(False, "--bidirectional-prompt", help="The prompt attends "
                                              "bidirectionally, as a model fine-tuned with --bitune was trained."),
    adapter: str = typer.Option(None, "--adapter", help="A LoRA adapter folder (PEFT's layout) to put on the model."),
    diffusion_steps: int = typer.Option(None, "--diffusion-steps", help="Masked diffusion sampling (LLaDA) in N "
                                        "denoising steps; a diffusion or MLM model defaults to one per token."),
    block_length: int = typer.Option(None, "--block-length", help="With diffusion sampling: tokens per "
                                     "semi-autoregressive block (must divide --tokens; default 32)."),
    remasking: str = typer.Option(None, "--remasking", help="With diffusion sampling: low_confidence (default) or "
                                  "random, the order in which masked tokens are committed."),
) -> None:
    """Stream a prompt's continuation to the terminal as it is generated; it stops at the checkpoint's end ids
    (generation_config.json, config.json, the tokenizer's eos) or a --stop text. A diffusion or MLM model is
    sampled by masked diffusion (--diffusion-steps, --block-length, --remasking)."""
    import decoderlab

    from .generation import TokenRecycler, draft_decoder, mtp_decoder, rsd_decoder, stream

    model = decoderlab.load(path, quantize=quantize, group_size=group_size, adapter=adapter).pack()
    tok = decoderlab.Tokenizer.from_folder(path)
    if chat:
        ids = tok.encode_chat([{"role": "user", "content": prompt}])
    else:
        ids = tok.encode(prompt) or ([tok.bos_id] if tok.bos_id is not None else [])
    if not ids:
        raise UserError("the prompt is empty and the tokenizer has no BOS token to start from; give some text")
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty)
    decoder = None
    if speculative in ("recycle", "mtp"):
        given = [f"--{k.replace('_', '-')}" for k, v in sampling.items()
                 if v is not None and not (k == "temperature" and v == 0)]
        if given:
            raise UserError(f"--speculative {speculative} decodes greedily; leave out {', '.join(given)} "
                            "(or use a draft model's folder, which samples)")
        # Greedy whatever the checkpoint's generation_config says: these decoders cannot sample.
        sampling = dict(temperature=0.0, repetition_penalty=1.0)
        if speculative == "recycle":
            decoder = TokenRecycler(model).decoder
        else:
            if compile:
                raise UserError("--compile applies to plain decoding and --speculative recycle; leave it out here")
            decoder = mtp_decoder()
    elif speculative:
        if compile:
            raise UserError("--compile applies to plain decoding and --speculative recycle; leave it out here")
        decoder = (draft_decoder(decoderlab.load(speculative)) if tree is None
                   else rsd_decoder(decoderlab.load(speculative), *_tree_shape(tree)))
    if tree is not None and (speculative is None or speculative in ("recycle", "mtp")):
        raise UserError("--tree shapes a draft model's tree; give --speculative DRAFT_FOLDER too")
    if (window is not None or sinks is not None) and speculative:
        raise UserError("--window/--sinks stream with plain decoding; leave out --speculative")
    if bidirectional_prompt:
        if speculative or window is not None or sinks is not None:
            raise UserError("--bidirectional-prompt decodes plainly; leave out --speculative/--window/--sinks")
        from .finetuning import BidirectionalPromptDecoder

        decoder = BidirectionalPromptDecoder
    diffusion = (diffusion_steps, block_length, remasking)
    if model.config.objective != "causal" or any(v is not None for v in diffusion):
        from .generation.diffusion import DiffusionSampler, check_length

        if decoder is not None or window is not None or sinks is not None or compile:
            raise UserError("diffusion sampling runs on its own; leave out --speculative, --window, --sinks, "
                            "--compile and --bidirectional-prompt")
        check_length(tokens, block_length)
        decoder = DiffusionSampler(diffusion_steps, block_length, remasking or "low_confidence")
    steps = stream(model, [ids], tokens, **sampling, seed=seed, stop_strings=stop or None, tokenizer=tok,
                   compile=compile, decoder=decoder, window=window, sinks=sinks)
    if not chat:
        sys.stdout.write(prompt)
    generated = 0
    for step in steps:
        generated += len(step.tokens[0]) + isinstance(step.stopped_by[0], int)
        sys.stdout.write(step.texts[0])
        sys.stdout.flush()
    sys.stdout.write("\n")
    if speculative:
        sys.stdout.flush()
        passes = max(steps.decoder.forward_passes, 1)
        console.print(f"[dim]{generated / passes:.2f} tokens per forward pass[/dim]", highlight=False)


@app.command("embed")
def embed_cmd(
    path: str = typer.Argument(..., help="A checkpoint or run folder (with its tokenizer)."),
    input_path: str = typer.Option(..., "--input", "-i", help="Text file, one text per line (blank lines skipped)."),
    output: str = typer.Option(..., "--output", "-o", help="Where to write the [N, d] float32 .npy array."),
    pooling: str = typer.Option("mean", help="last, mean, prompt-eol, echo, token-prepending, bidirectional or "
                                "causal2vec (needs --head)."),
    layer: int = typer.Option(None, help="Hidden state to pool (default: final output; token-prepending: its "
                              "early-exit layer)."),
    batch_size: int = typer.Option(32, help="Texts per forward pass."),
    padding_side: str = typer.Option("left", help="left or right (results agree; left is the usual choice)."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="L2-normalise each vector."),
    head: str = typer.Option(None, "--head", help="Causal2Vec head folder (from embed-train) for --pooling "
                             "causal2vec."),
) -> None:
    """Embed the lines of a text file into an .npy array of sentence vectors."""
    from pathlib import Path

    import numpy as np

    import decoderlab

    from .atomic import atomic_write
    from .embeddings import embed

    source = Path(input_path)
    if not source.is_file():
        raise UserError(f"--input {input_path!r} is not a file")
    texts = [line for line in _read_text(source, "--input").splitlines() if line.strip()]
    target = Path(output) if output.endswith(".npy") else Path(output + ".npy")  # as np.save names it
    if not target.parent.is_dir():
        raise UserError(f"--output {output!r}: the folder {str(target.parent)!r} does not exist; create it first")
    model = decoderlab.load(path)
    tok = decoderlab.Tokenizer.from_folder(path)
    vectors = embed(model, texts, tok, pooling, batch_size=batch_size, layer=layer, padding_side=padding_side,
                    normalize=normalize, head=head)
    try:
        atomic_write(target, lambda f: np.save(f, vectors.numpy()))
    except OSError as e:
        raise UserError(f"cannot write --output {output!r} ({e.strerror or e})") from None
    console.print(f"{len(texts)} texts -> {target} {tuple(vectors.shape)} ({pooling})", highlight=False)


@app.command("embed-train")
def embed_train_cmd(
    path: str = typer.Argument(..., help="The decoder: a checkpoint or run folder (with its tokenizer)."),
    out: str = typer.Option(..., "--out", "-o", help="Folder to write the Causal2Vec head to."),
    pairs: str = typer.Option(None, "--pairs", help="JSONL file of {\"query\": ..., \"document\": ...} pairs; "
                              "default: docstring/function pairs of the stdlib's training split."),
    time: str = typer.Option(None, "--time", help="Training time budget, e.g. 60s, 3m."),
    steps: int = typer.Option(None, "--steps", help="Step budget (default 200 if no --time)."),
    batch_size: int = typer.Option(32, help="Pairs per step (in-batch negatives)."),
    lr: float = typer.Option(1e-3, help="AdamW learning rate."),
    encoder_layers: int = typer.Option(2, help="Blocks of the bidirectional encoder."),
    max_tokens: int = typer.Option(128, help="Texts are cut to this many tokens."),
    decoder_tokens: int = typer.Option(None, help="The decoder reads only the first N of them (default: all)."),
    temperature: float = typer.Option(0.05, help="InfoNCE temperature."),
    lora_r: int = typer.Option(0, help="LoRA rank on the decoder (0: decoder frozen)."),
    seed: int = typer.Option(0, help="Random seed."),
    bf16: bool = typer.Option(False, "--bf16", help="bf16 autocast."),
) -> None:
    """Train a Causal2Vec embedding head for a decoder (for `embed --pooling causal2vec --head DIR`)."""
    import json as _json
    from pathlib import Path

    import decoderlab

    from .causal2vec import Causal2VecConfig, function_pairs, train_causal2vec

    if pairs is None:
        data = list(function_pairs(split="train"))
    else:
        source = Path(pairs)
        if not source.is_file():
            raise UserError(f"--pairs {pairs!r} is not a file")
        data = []
        for n, line in enumerate(_read_text(source, "--pairs").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = _json.loads(line)
                data.append((str(row["query"]), str(row["document"])))
            except (ValueError, KeyError, TypeError):
                raise UserError(f"--pairs line {n} is not a JSON object with \"query\" and \"document\"") from None
    model = decoderlab.load(path)
    tok = decoderlab.Tokenizer.from_folder(path)
    config = Causal2VecConfig(encoder_layers=encoder_layers, max_tokens=max_tokens, decoder_tokens=decoder_tokens,
                              temperature=temperature, lora_r=lora_r)
    result = train_causal2vec(model, tok, data, config, steps=steps, time=time, batch_size=batch_size, lr=lr,
                              seed=seed, bf16=bf16, base_model=str(Path(path).resolve()), out=out)
    first, last = result.losses[0], sum(result.losses[-10:]) / len(result.losses[-10:])
    console.print(f"{result.steps} steps in {result.seconds:.0f}s on {result.pairs} pairs: InfoNCE {first:.3f} -> "
                  f"{last:.3f}; head -> {out}", highlight=False)


@app.command("pine")
def pine_cmd(
    path: str = typer.Argument(..., help="A checkpoint or run folder (with its tokenizer) of a RoPE model."),
    template: str = typer.Argument(..., help="Prompt with '{segments}' once, where the documents or options go."),
    segment: list[str] = typer.Option(None, "--segment", "-s", help="A document or option (repeatable)."),
    segments_file: str = typer.Option(None, help="Text file with one document or option per line."),
    segment_template: str = typer.Option("{document}", help="How each segment is written; holds '{document}'."),
    tokens: int = typer.Option(64, "--tokens", "-n", help="New tokens at most."),
    temperature: float = typer.Option(0.0, help="Sampling temperature (0 = greedy)."),
    seed: int = typer.Option(None, help="Random seed."),
    stop: list[str] = typer.Option(None, "--stop", help="Stop at this text (repeatable)."),
    compare: bool = typer.Option(False, "--compare", help="Also print the plain (order-dependent) continuation."),
) -> None:
    """Continue a prompt with PINE: the answer does not depend on the order of the segments."""
    from pathlib import Path

    import decoderlab

    from . import pine

    docs = list(segment or [])
    if segments_file:
        source = Path(segments_file)
        if not source.is_file():
            raise UserError(f"--segments-file {segments_file!r} is not a file")
        docs += [line for line in _read_text(source, "--segments-file").splitlines() if line.strip()]
    if not docs:
        raise UserError("no segments: pass --segment TEXT (repeatable) or --segments-file FILE")
    model = decoderlab.load(path)
    tok = decoderlab.Tokenizer.from_folder(path)
    item = pine.build(tok, template, docs, segment_template=segment_template)
    result = pine.generate(model, item.prefix, item.segments, item.suffix, tokens, temperature=temperature,
                           seed=seed, stop_strings=stop or None, tokenizer=tok)
    label = "pine:  " if compare else ""
    sys.stdout.write(f"{label}{result.texts[0]}\n")
    if compare:
        plain = decoderlab.generate(model, [item.tokens], tokens, temperature=temperature, seed=seed,
                                    stop_strings=stop or None, tokenizer=tok)
        sys.stdout.write(f"plain: {plain.texts[0]}\n")


@app.command("position-bias")
def position_bias_cmd(
    path: str = typer.Argument(..., help="A checkpoint or run folder (with its tokenizer)."),
    items_path: str = typer.Option(None, "--items", help="JSONL: one {prefix, options, suffix, answer} per line "
                                   "(text; optional answers: the text to score per option)."),
    synthetic: int = typer.Option(None, help="Instead of --items: this many items of the built-in max-number "
                                  "task (evaluate.max_number_task)."),
    method: str = typer.Option("both", help="plain, pine, or both."),
    batch_size: int = typer.Option(16, help="Rows per forward pass."),
) -> None:
    """How often the chosen option changes when the options are reordered, plainly and with PINE."""
    import json
    from pathlib import Path

    import decoderlab

    from . import evaluate

    if (items_path is None) == (synthetic is None):
        raise UserError("pass exactly one of --items FILE.jsonl and --synthetic N")
    methods = list(evaluate.METHODS) if method == "both" else [method]
    if any(m not in evaluate.METHODS for m in methods):
        raise UserError(f"unknown method {method!r}; choose plain, pine or both")
    if synthetic is not None:
        if synthetic < 1:
            raise UserError(f"--synthetic must be at least 1, got {synthetic}")
        raw = evaluate.max_number_task(synthetic, seed=999)
    else:
        source = Path(items_path)
        if not source.is_file():
            raise UserError(f"--items {items_path!r} is not a file")
        raw = []
        for n, line in enumerate(_read_text(source, "--items").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                raw.append({k: obj[k] for k in ("prefix", "options", "suffix", "answer")}
                           | {"answers": obj.get("answers")})
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{items_path} line {n}: expected a JSON object with prefix, options, suffix and "
                                f"answer ({e})") from None
    model = decoderlab.load(path)
    tok = decoderlab.Tokenizer.from_folder(path)
    items = [evaluate.ChoiceItem.from_text(tok, r["prefix"], r["options"], r["suffix"], r["answer"], r.get("answers"))
             for r in raw]
    table = Table("method", "items", "flip rate", "accuracy", "accuracy by answer position", "chosen position")
    for m in methods:
        r = evaluate.position_bias(model, items, method=m, batch_size=batch_size)
        table.add_row(m, str(r.items), f"{r.flip_rate:.3f}", f"{r.accuracy:.3f}",
                      " ".join(f"{a:.2f}" for a in r.accuracy_by_position),
                      " ".join(f"{c:.2f}" for c in r.chosen_position))
    console.print(table)


@app.command("eval")
def eval_cmd(
    path: str = typer.Argument(..., help="A checkpoint or run folder (with its tokenizer)."),
    tasks: str = typer.Option(..., "--tasks", help="Comma-separated lm-eval task names, task YAML files and "
                              "folders of them (e.g. what `decoderlab suite` writes)."),
    include: list[str] = typer.Option(None, "--include", help="A folder of task YAMLs to find --tasks names in "
                                      "(repeatable), as lm-eval's --include_path."),
    num_fewshot: int = typer.Option(None, "--num-fewshot", help="Few-shot examples per prompt (default: the task's)."),
    limit: float = typer.Option(None, "--limit", help="Documents per task (a fraction if below 1)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Rows per forward pass (a row: one context and all of "
                                   "its continuations)."),
    device: str = typer.Option(None, "--device", help="cpu, cuda, ... (default: cuda if available)."),
    dtype: str = typer.Option(None, "--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's)."),
    out: str = typer.Option(None, "--out", help="Write the harness's results JSON here."),
) -> None:
    """Run lm-evaluation-harness tasks on a model through decoderlab's lm-eval model ("decoderlab"): prints the
    harness's table and writes its results JSON."""
    import json

    try:
        from .harness import evaluate, results_table
    except ImportError as e:
        raise UserError(f"decoderlab eval needs lm-eval ({e.name} missing); pip install 'decoderlab[eval]'") from None
    from lm_eval.utils import handle_non_serializable

    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    if limit is not None and limit <= 0:
        raise UserError(f"--limit must be positive, got {limit}")
    specs = [t.strip() for t in tasks.split(",") if t.strip()]
    results = evaluate(path, specs, include=include or (), num_fewshot=num_fewshot,
                       limit=int(limit) if limit is not None and limit >= 1 else limit, batch_size=batch_size,
                       device=device, dtype=dtype)
    sys.stdout.write(results_table(results) + "\n")
    if out is not None:
        from pathlib import Path

        target = Path(out)
        if target.parent != Path("."):
            _out_dir(str(target.parent))
        _write_json_text(target, json.dumps(results, indent=1, default=handle_non_serializable, ensure_ascii=False))
        sys.stdout.write(f"results -> {target}\n")


def _write_json_text(path, text: str) -> None:
    from .atomic import atomic_write_text

    try:
        atomic_write_text(path, text + "\n")
    except OSError as e:
        raise UserError(f"cannot write {str(path)!r} ({e.strerror or e})") from None


@app.command("trace")
def trace_cmd(
    path: str = typer.Argument(..., help="A checkpoint or run folder (with its tokenizer)."),
    prompt: str = typer.Option(..., "--prompt", help="The prompt whose next token states the fact."),
    subject: str = typer.Option(..., "--subject", help="The subject, as it is written in the prompt."),
    target: str = typer.Option(None, "--target", help="The expected continuation (its first token is scored; "
                               "give the leading space the tokenizer wants); default: the model's top token."),
    samples: int = typer.Option(10, "--samples", help="Noised copies of the prompt."),
    noise: float = typer.Option(3.0, "--noise", help="Noise std in multiples of the subject embeddings' std."),
    window: int = typer.Option(10, "--window", help="MLP/attention layers restored together around a layer."),
    seed: int = typer.Option(1, "--seed", help="Seed of the noise (ROME's is 1)."),
    out: str = typer.Option("trace", "--out", help="Folder for trace.png and trace.json."),
) -> None:
    """ROME's causal trace of a fact: which hidden states, MLPs and attention layers restore the answer."""
    import decoderlab

    from .interp import plot_trace, trace_text

    model = decoderlab.load(path)
    tok = decoderlab.Tokenizer.from_folder(path)
    result = trace_text(model, tok, _unescape(prompt), _unescape(subject),
                        target=None if target is None else _unescape(target), samples=samples, noise=noise,
                        window=window, seed=seed)
    folder = _out_dir(out)
    _write_json(folder / "trace.json", result.to_dict())
    plot_trace(result, folder / "trace.png")
    start, end = result.subject
    console.print(f"subject tokens {start}..{end - 1} {result.tokens[start:end]!r}; p({result.target_token!r}): "
                  f"clean {result.clean_prob:.4f}, corrupted {result.corrupted_prob:.4f}", highlight=False)
    for kind, grid in result.grids.items():
        token, layer = divmod(int(grid.argmax()), grid.shape[1])
        console.print(f"{kind}: highest {float(grid.max()):.4f} at token {token} {result.tokens[token]!r}, "
                      f"layer {layer}", highlight=False)
    console.print(f"wrote {folder / 'trace.png'} and {folder / 'trace.json'}", highlight=False)


@app.command("steer")
def steer_cmd(
    path: str = typer.Argument(..., help="A checkpoint or run folder (with its tokenizer)."),
    a: str = typer.Option(..., "--a", help="Prompts of the style to steer towards, one per line."),
    b: str = typer.Option(..., "--b", help="Prompts of the style to steer away from, one per line."),
    layer: int = typer.Option(..., "--layer", help="Block whose residual stream is steered."),
    scale: float = typer.Option(1.0, "--scale", help="Multiple of the vector added at every position."),
    prompt: str = typer.Option(..., "--prompt", help="Text to continue, with and without steering."),
    site: str = typer.Option("resid_pre", help="resid_pre, resid_mid or resid_post of the block."),
    reduce: str = typer.Option("mean", help="mean (over each prompt's tokens) or last (its last token)."),
    tokens: int = typer.Option(100, "--tokens", "-n", help="New tokens at most."),
    temperature: float = typer.Option(0.0, help="Sampling temperature (0 = greedy)."),
    seed: int = typer.Option(0, help="Random seed (both runs sample with the same noise)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON (unsteered, steered, vector norm)."),
) -> None:
    """Steer generation with a vector: the mean difference of the --a and --b prompts' activations at a layer,
    added with --scale at every position; prints the continuation without and with it."""
    import json
    from pathlib import Path

    import decoderlab
    from decoderlab import interp

    model = decoderlab.load(path)
    tok = decoderlab.Tokenizer.from_folder(path)
    sets = {}
    for flag, file in (("--a", a), ("--b", b)):
        lines = [line for line in _read_text(Path(file), flag).splitlines() if line.strip()]
        if not lines:
            raise UserError(f"{flag} {file!r} holds no prompts; write one prompt per line")
        sets[flag] = lines
    vector = interp.steering_vector(model, tok, sets["--a"], sets["--b"], layer, site=site, reduce=reduce)
    ids = [tok.encode(_unescape(prompt))]
    if not ids[0]:
        raise UserError("the prompt is empty; give some text")
    texts = {}
    for name, s in (("unsteered", 0.0), ("steered", scale)):
        with interp.steer(model, vector, layer, s, site=site):
            texts[name] = decoderlab.generate(model, ids, tokens, temperature=temperature, seed=seed,
                                              tokenizer=tok).texts[0]
    if as_json:
        print(json.dumps({**texts, "vector_norm": float(vector.norm()), "layer": layer, "scale": scale}))
        return
    print(f"unsteered: {texts['unsteered']}")
    print(f"steered x{scale:g} (|v| = {float(vector.norm()):.3g}): {texts['steered']}")


@app.command("patch")
def patch_cmd(
    path: str = typer.Argument(..., help="A checkpoint or run folder (with its tokenizer)."),
    clean: str = typer.Option(..., "--clean", help="The clean prompt."),
    corrupt: str = typer.Option(..., "--corrupt", help="The corrupted prompt (as many tokens as the clean one)."),
    answer: str = typer.Option(..., "--answer", help="The clean run's answer (text of one token)."),
    wrong: str = typer.Option(..., "--wrong", help="The corrupted run's answer (text of one token)."),
    act: str = typer.Option("resid_pre", "--act", help="Activation to patch: resid_pre, attn_out, mlp_out, z, ..."),
    by: str = typer.Option("pos", "--by", help="Swept dimensions after the layer: pos, head or head,pos."),
    batch: int = typer.Option(16, "--batch", help="Patched copies per forward pass."),
    out: str = typer.Option(None, "--json", help="Also write the grid and its labels to this JSON file."),
) -> None:
    """Activation patching: patch each cell of --act from the clean run into the corrupted run and print the
    normalised logit difference (answer - wrong; 1 = the clean run's, 0 = the corrupted run's) per cell."""
    import json
    from pathlib import Path

    import torch

    import decoderlab
    from decoderlab import interp

    model = decoderlab.load(path)
    tok = decoderlab.Tokenizer.from_folder(path)
    ids = [tok.encode(_unescape(t)) for t in (clean, corrupt)]
    if len(ids[0]) != len(ids[1]) or not ids[0]:
        raise UserError(f"--clean and --corrupt must have the same number of tokens (got {len(ids[0])} and "
                        f"{len(ids[1])}); patching matches them position by position")
    targets = []
    for flag, text in (("--answer", answer), ("--wrong", wrong)):
        token = tok.encode(_unescape(text), add_special_tokens=False)
        if len(token) != 1:
            raise UserError(f"{flag} {text!r} is {len(token)} tokens; give the text of exactly one token")
        targets.append(token[0])
    clean_ids, corrupt_ids = torch.tensor([ids[0]]), torch.tensor([ids[1]])
    with torch.no_grad():
        clean_logits, corrupt_logits = model(clean_ids), model(corrupt_ids)
    metric = interp.normalized(interp.logit_diff(*targets), clean_logits, corrupt_logits)
    dims = tuple(d.strip() for d in by.split(",") if d.strip())
    grid = interp.sweep(model, corrupt_ids, clean_ids, act, metric, by=dims, batch=batch)
    tokens = [tok.decode([i]) for i in ids[0]]
    if dims == ("pos",):
        columns = [repr(t) for t in tokens]
    elif len(dims) == 1:
        columns = [f"{dims[0]} {i}" for i in range(grid.shape[1])]
    else:
        columns = [f"cells ({' x '.join(dims)}, row-major)"]
    table = Table("layer", *columns)
    for layer in range(grid.shape[0]):
        values = [f"{v:.2f}" for v in grid[layer].flatten().tolist()]
        table.add_row(str(layer), *(values if len(dims) == 1 else [" ".join(values)]))
    console.print(table)
    if out:
        Path(out).write_text(json.dumps({"act": act, "by": ["layer", *dims], "tokens": tokens, "grid": grid.tolist(),
                                         "metric": "normalized logit difference"}))



def _out_dir(out: str):
    """The --out folder, created if missing; a one-line error if it cannot be."""
    from pathlib import Path

    folder = Path(out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create --out {out!r} ({e.strerror or e})") from None
    return folder


def _write_json(path, obj) -> None:
    import json

    from .atomic import atomic_write

    try:
        atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1, ensure_ascii=False).encode("utf-8")))
    except OSError as e:
        raise UserError(f"cannot write {str(path)!r} ({e.strerror or e})") from None


@app.command("lens")
def lens_cmd(
    path: str = typer.Argument(..., help="A checkpoint or run folder (with its tokenizer)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to read the residual stream of."),
    top_k: int = typer.Option(5, "--top-k", help="Tokens kept per layer and position (in lens.json)."),
    out: str = typer.Option(".", "--out", help="Folder for lens.png and lens.json (created if missing)."),
) -> None:
    """Logit lens: each layer's residual stream through the final norm and LM head; writes lens.png (top token
    per layer x position, coloured by its probability) and lens.json (top-k and the next token's rank/prob)."""
    import decoderlab

    from .interp import lens_table, logit_lens

    model = decoderlab.load(path)
    tok = decoderlab.Tokenizer.from_folder(path)
    ids = tok.encode(_unescape(prompt))
    if not ids:
        raise UserError("the prompt encodes to no tokens; give some text")
    if len(ids) > model.config.context_length:
        raise UserError(f"the prompt is {len(ids)} tokens, longer than the model's context "
                        f"{model.config.context_length}; shorten it")
    lens = logit_lens(model, ids, top_k=top_k, target="next")
    folder = _out_dir(out)
    lens_table(lens, folder / "lens.png", tokenizer=tok, title=f"logit lens: {path}")
    _write_json(folder / "lens.json", lens.to_json(tok, row=0))
    final = lens.top_ids[-1, 0, -1, 0]
    console.print(f"{len(lens.labels)} layers x {len(ids)} positions -> {folder / 'lens.png'}, "
                  f"{folder / 'lens.json'}; next token: {tok.decode([int(final)])!r}", highlight=False, soft_wrap=True)


@app.command("heads")
def heads_cmd(
    path: str = typer.Argument(..., help="A checkpoint or run folder."),
    seq_len: int = typer.Option(None, "--seq-len", help="Random tokens per half (default: a third of the context, "
                                "at most 100)."),
    batch: int = typer.Option(8, "--batch", help="Rows of repeated random tokens."),
    seed: int = typer.Option(0, help="Random seed for the tokens."),
    prompt: str = typer.Option(None, "--prompt", "-p", help="Text to measure attention sinks on (default: the "
                               "repeated random tokens)."),
    out: str = typer.Option(".", "--out", help="Folder for heads.png and heads.json (created if missing)."),
) -> None:
    """Head detectors: induction, previous-token and duplicate-token scores per layer x head on repeated random
    tokens, and the share of attention each head puts on the first token; writes heads.png and heads.json."""
    import decoderlab

    from .interp import head_score_maps, head_scores, sink_shares

    if batch < 1:
        raise UserError(f"--batch must be at least 1, got {batch}")
    model = decoderlab.load(path)
    try:
        tok = decoderlab.Tokenizer.from_folder(path)
    except UserError:
        tok = None
    bos = tok.bos_id if tok is not None else None
    prefix = [bos] if bos is not None else []
    if seq_len is None:
        seq_len = max(2, min(100, (model.config.context_length - len(prefix)) // 3))
    scores = head_scores(model, seq_len, batch, seed=seed, prefix=prefix)
    if prompt is not None:
        if tok is None:
            raise UserError(f"--prompt needs a tokenizer in {path!r}")
        ids = tok.encode(_unescape(prompt))
        if len(ids) < 2:
            raise UserError("--prompt must encode to at least 2 tokens to measure attention sinks")
        sinks = sink_shares(model, ids[:model.config.context_length])
    else:
        sinks = sink_shares(model, scores.tokens)
    folder = _out_dir(out)
    grids = {k: scores[k] for k in ("induction", "previous", "duplicate")} | {"first-token share": sinks}
    head_score_maps(grids, folder / "heads.png", title=f"heads: {path}")
    report = scores.to_json() | {"sink": [[round(float(v), 6) for v in row] for row in sinks.tolist()],
                                 "sink_inputs": "prompt" if prompt is not None else "repeated random tokens"}
    _write_json(folder / "heads.json", report)
    layer, head, value = scores.best("induction")
    console.print(f"best induction head L{layer}H{head}: {value:.3f}; previous-token best "
                  f"{scores.best('previous')[2]:.3f}; -> {folder / 'heads.png'}, {folder / 'heads.json'}",
                  highlight=False, soft_wrap=True)


@app.command("lab")
def lab_cmd(
    path: str = typer.Argument(..., help="A checkpoint or run folder (with its tokenizer)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, help="Port to listen on (0: any free port)."),
    tokenizer: str = typer.Option(None, help="Tokenizer folder, if not the checkpoint's own."),
    device: str = typer.Option(None, help="cpu or cuda (default: cpu)."),
) -> None:
    """A local web page to look inside a model: tokens, next-token top-k, attention per layer and head, the logit
    lens, a causal trace and a patching sweep."""
    from .lab import lab

    lab(path, host=host, port=port, tokenizer=tokenizer, device=device)


@app.command("perplexity")
def perplexity_cmd(
    path: str = typer.Argument(..., help="A model folder (Hugging Face or a decoderlab run, with its tokenizer)."),
    files: list[str] = typer.Argument(None, help="Text files, .jsonl files (their text field) or folders (searched "
                                      "for .txt .md .py .jsonl)."),
    context: int = typer.Option(None, help="Window length in tokens (the transformers guide's max_length; default: "
                                "the model's context length)."),
    stride: int = typer.Option(None, help="How far each window moves (default: the context)."),
    batch_size: int = typer.Option(8, help="Windows per forward pass."),
    text_field: str = typer.Option("text", help="The field of each .jsonl line holding its text."),
    lm_eval: bool = typer.Option(False, "--lm-eval", help="lm-eval's rolling loglikelihood windows instead of the "
                                 "guide's: each document starts with BOS (else EOS) and every token is predicted "
                                 "(--context is lm-eval's max_length, --stride its prediction length)."),
    prefix_token: int = typer.Option(None, help="A token id put before each document (with --lm-eval the default is "
                                     "BOS, else EOS; needed for tokenizers with neither)."),
    out: str = typer.Option(None, help="Write the result as JSON here."),
) -> None:
    """Perplexity, word and byte perplexity and bits per byte on files, with a sliding window as in the
    transformers perplexity guide; one row per file and the total."""
    from pathlib import Path

    from .likelihood import perplexity

    if not files:
        raise UserError("no files given: pass text files, .jsonl files or folders after the model")
    if not Path(path).is_dir():
        raise UserError(f"model {path!r} is not a folder; pass a Hugging Face model folder or a decoderlab run "
                        "first, then the files")
    result = perplexity(path, files, context=context, stride=stride, batch_size=batch_size, text_field=text_field,
                        mode="lm-eval" if lm_eval else "guide", prefix_token=prefix_token)
    import os

    table = Table("source", "docs", "tokens", "bytes", "perplexity", "word ppl", "byte ppl", "bits/byte")
    table.columns[0].overflow = "fold"
    rows = result.sources + [result.total] if len(result.sources) > 1 else result.sources
    # Sources named from the folder they share, so long absolute paths do not crowd the table.
    root = os.path.commonpath([os.path.dirname(s.name) for s in result.sources])
    for s in rows:
        name = os.path.relpath(s.name, root) if s is not result.total else s.name
        table.add_row(name, f"{s.documents:,}", f"{s.tokens:,}", f"{s.bytes:,}", f"{s.perplexity:.4f}",
                      f"{s.word_perplexity:.4f}", f"{s.byte_perplexity:.4f}", f"{s.bits_per_byte:.4f}")
    console.print(table)
    console.print(f"{result.mode} windows: context {result.context}, stride {result.stride}"
                  + (f", prefix token {result.prefix_token}" if result.prefix_token is not None else ""))
    if out:
        if Path(out).parent != Path("."):
            _out_dir(str(Path(out).parent))
        _write_json(out, {"model": path, **result.to_dict()})


lora_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                       help="LoRA adapters (PEFT's layout): merge one into its base.")
app.add_typer(lora_app, name="lora")


@lora_app.command("merge")
def lora_merge_cmd(
    base: str = typer.Argument(..., help="The base model's folder."),
    adapter: str = typer.Argument(..., help="A LoRA adapter folder for it (saved by decoderlab or PEFT)."),
    out: str = typer.Argument(..., help="Folder for the merged model (with the base's tokenizer)."),
) -> None:
    """Fold a LoRA adapter into its base's weights and save a plain folder (transformers loads it)."""
    from pathlib import Path

    import decoderlab

    if Path(out).resolve() == Path(base).resolve():
        raise UserError(f"OUT {out!r} is the base model's own folder: merging in place would lose the base "
                        "weights; give another folder")
    model = decoderlab.merge_lora(decoderlab.load(base, pack=False, adapter=adapter))
    try:
        tok = decoderlab.Tokenizer.from_folder(base)
    except UserError:
        tok = None  # a folder without a tokenizer: the weights alone
    decoderlab.save(model, out, tokenizer=tok)
    console.print(f"wrote {out} ({base} + {adapter})", highlight=False, soft_wrap=True)


suite_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                        help="Generate an evaluation suite: JSONL splits plus a ready lm-eval task YAML.")
app.add_typer(suite_app, name="suite")


@suite_app.command("docstrings")
def suite_docstrings_cmd(
    out: str = typer.Option(..., "--out", help="Folder for train.jsonl and val.jsonl."),
    max_chars: int = typer.Option(600, help="Longest prompt + completion kept, in characters."),
) -> None:
    """Docstring -> function body records from the standard library, for `decoderlab finetune`; val holds the
    functions of the files `decoderlab train` holds out of the default corpus."""
    from .suites.docstrings import write_docstrings

    counts = write_docstrings(out, max_chars=max_chars)
    console.print(f"wrote {out}: " + ", ".join(f"{name}.jsonl {n:,} records" for name, n in counts.items()))


@suite_app.command("corr2cause")
def suite_corr2cause_cmd(
    out: str = typer.Option(..., "--out", help="Folder for train.jsonl, test.jsonl and the task YAML."),
    nodes: str = typer.Option("2-6", help="Numbers of variables: a range '2-6', one '4' or a list '3,5'."),
    seed: int = typer.Option(0, help="Seed for the split, the sample and the wording."),
    variant: str = typer.Option("plain", help="plain (the paper's letters and templates), renamed (made-up "
                                "variable names) or paraphrased (hand-written paraphrases)."),
    max_per_n: int = typer.Option(None, help="Keep this many items per number of variables (default: all; "
                                  "n = 6 alone has 198,090)."),
    test_fraction: float = typer.Option(0.2, help="Share of the premises (equivalence classes) held out as test."),
    classes: int = typer.Option(2, help="2: valid or not (No / Yes); 3: entailment / neutral / contradiction."),
) -> None:
    """Corr2Cause: infer causation from correlation. Every DAG over 2-6 variables up to isomorphism, its
    independences by d-separation, one premise per Markov equivalence class, six causal hypotheses per pair."""
    from .suites.corr2cause import RELATIONS, corr2cause_items, corr2cause_task, label_counts, write_corr2cause

    corr2cause_task(classes=classes)  # a bad --classes fails before the generation, not after
    splits = corr2cause_items(_node_counts(nodes), seed=seed, variant=variant, max_per_n=max_per_n,
                              test_fraction=test_fraction)
    path = write_corr2cause(out, splits, classes=classes)
    rows = label_counts(splits)
    console.print(f"{'N':>3} {'premises':>8} {'train':>7} {'test':>6} " + " ".join(f"{r:>13}" for r in RELATIONS)
                  + f" {'valid':>6}", highlight=False)
    rows["all"] = {key: sum(row[key] for row in rows.values()) for key in next(iter(rows.values()))}
    for n, row in rows.items():
        items = row["train"] + row["test"]
        console.print(f"{n:>3} {row['premises']:>8} {row['train']:>7} {row['test']:>6} "
                      + " ".join(f"{row[r] / items:>13.1%}" for r in RELATIONS)
                      + f" {row['entailment'] / items:>6.1%}", highlight=False)
    console.print(f"-> {path}", highlight=False, soft_wrap=True)


def _node_counts(text: str) -> list[int]:
    """'2-6', '4' or '3,5' as a list of numbers of variables, or a one-line error."""
    try:
        out: list[int] = []
        for part in text.split(","):
            low, _, high = part.strip().partition("-")
            out += list(range(int(low), int(high or low) + 1))
    except ValueError:
        raise UserError(f"--nodes {text!r} is not a range like 2-6, a number like 4 or a list like 3,5") from None
    if not out:
        raise UserError(f"--nodes {text!r} names no numbers of variables; use e.g. 2-6")
    return out


@suite_app.command("cladder")
def suite_cladder_cmd(
    out: str = typer.Option(..., "--out", help="Folder for train.jsonl, test.jsonl and cladder.yaml."),
    per_graph: int = typer.Option(50, "--per-graph", help="Causal models sampled per graph shape (each gives "
                                  "one question per query type that applies, fewer where too close to call)."),
    seed: int = typer.Option(0, help="Random seed: the same seed writes the same suite."),
    test_fraction: float = typer.Option(0.2, "--test-fraction", help="Share of models (with all their "
                                        "questions) in the test split."),
) -> None:
    """CLadder-style causal questions (rungs 1-3 on the paper's ten graphs), answers computed exactly; prints the
    counts per rung, query type and label."""
    from .suites.cladder import cladder_counts, write_cladder

    if not 0.0 <= test_fraction <= 1.0:
        raise UserError(f"--test-fraction must be in [0, 1], got {test_fraction}")
    yaml_path, splits = write_cladder(_out_dir(out), per_graph=per_graph, seed=seed, test_fraction=test_fraction)
    counts = cladder_counts(splits)
    table = Table(title=f"cladder: {sum(counts['splits'].values())} questions "
                        f"({', '.join(f'{s} {n}' for s, n in counts['splits'].items())})")
    for column in ("rung", "query type", "questions", "yes share"):
        table.add_column(column)
    from .suites.cladder import QUERY_RUNG

    for query, n in counts["query_types"].items():
        table.add_row(str(QUERY_RUNG[query]), query, str(n), f"{counts['yes_share'][query]:.2f}")
    console.print(table)
    console.print("per rung: " + ", ".join(f"{r}: {n}" for r, n in counts["rungs"].items())
                  + f"; yes share {counts['yes_total']:.2f}; per graph: "
                  + ", ".join(f"{g} {n}" for g, n in counts["graphs"].items()), highlight=False, soft_wrap=True)
    console.print(f"-> {yaml_path}", highlight=False, soft_wrap=True)


@suite_app.command("kv-retrieval")
def suite_kv_retrieval_cmd(
    pairs: int = typer.Option(..., "--pairs", help="Key-value pairs per JSON object."),
    out: str = typer.Option(..., help="Folder for test.jsonl (and train.jsonl) and the task YAML."),
    seed: int = typer.Option(0, help="Seed: the same seed writes the same suite."),
    examples: int = typer.Option(10, help="Objects in the test split; each is asked with its key at every position."),
    train: int = typer.Option(0, help="Objects in a train split (0: none)."),
    model: str = typer.Option(None, help="Also score the test split with this model folder, by position."),
    method: str = typer.Option("both", help="With --model: plain, pine (RoPE models) or both."),
    batch_size: int = typer.Option(8, help="With --model: prompts per batch."),
) -> None:
    """Key-value retrieval of "Lost in the Middle": UUID pairs as a JSON object, the queried key at each position."""
    from .suites import kv_retrieval

    methods = ["plain", "pine"] if method == "both" else [method]
    if any(m not in kv_retrieval.METHODS for m in methods):
        raise UserError(f"unknown --method {method!r}; choose plain, pine or both")
    yaml_path = kv_retrieval.write_kv_retrieval(out, pairs, examples, seed, n_train=train)
    console.print(f"wrote {yaml_path} ({examples * pairs} test items" + (f", {train * pairs} train" if train else "")
                  + ")")
    if model is None:
        return
    import decoderlab

    net, tok = decoderlab.load(model), decoderlab.Tokenizer.from_folder(model)
    items = kv_retrieval.kv_retrieval_items(pairs, examples, seed)
    table = Table("method", "items", "accuracy", *(f"pos {p}" for p in range(pairs)))
    results = {}
    for m in methods:
        r = kv_retrieval.kv_retrieval_accuracy(net, tok, items, method=m, batch_size=batch_size)
        results[m] = {"accuracy": r.accuracy, "accuracy_by_position": r.accuracy_by_position}
        table.add_row(m, str(r.items), f"{r.accuracy:.3f}", *(f"{a:.2f}" for a in r.accuracy_by_position))
    console.print(table)
    from pathlib import Path

    _write_json(Path(yaml_path).parent / "scores.json", {"model": model, "pairs": pairs, "seed": seed, **results})


tasks_app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                        help="Reasoning tasks: make their data, train a fresh model on one, score it (sudoku, "
                             "reversal).")
app.add_typer(tasks_app, name="tasks")
TASKS = ("sudoku", "reversal")


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise UserError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")


@tasks_app.command("make")
def tasks_make_cmd(
    task: str = typer.Argument(..., help="sudoku or reversal"),
    out: str = typer.Option(..., "--out", help="Folder for the JSONL files."),
    size: int = typer.Option(6, help="sudoku: 4, 6 (2x3 boxes) or 9."),
    order: str = typer.Option("solver", help="sudoku: the fill order, solver, row-major or random."),
    puzzles: int = typer.Option(100_000, help="sudoku: puzzles in all (held-out ones included)."),
    heldout: int = typer.Option(1000, help="sudoku: the first this many go to heldout.jsonl."),
    arm: str = typer.Option("plain", help="reversal: how the facts are written, plain, reverse, permute or bico."),
    facts: int = typer.Option(100, help="reversal: facts per subset (name->description only, the reverse, both)."),
    seed: int = typer.Option(0, help="Seed of the puzzles or facts (and of the random orders)."),
) -> None:
    """Write a task's training and held-out records (sudoku: {"prompt", "completion"} JSONL, loss on the moves;
    reversal: {"text"} sentences, val.jsonl in held-out templates, facts.jsonl)."""
    from .tasks import reversal, sudoku

    _check_task(task)
    if task == "reversal":
        if arm not in reversal.ARMS:
            raise UserError(f"unknown reversal arm {arm!r}; use one of {list(reversal.ARMS)}")
        paths = reversal.write_data(reversal.make_facts(facts, seed), arm, seed)(out)
        what = "lines"
    else:
        paths = sudoku.write_dataset(out, sudoku.cached_puzzles(puzzles, size, seed), order, seed=seed,
                                     heldout=heldout)
        what = "puzzles"
    console.print("wrote " + ", ".join(f"{p} ({sum(1 for _ in open(p)):,} {what})" for p in paths.values()),
                  highlight=False)


@tasks_app.command("train")
def tasks_train_cmd(
    task: str = typer.Argument(..., help="sudoku or reversal"),
    out: str = typer.Option(None, "--out", help="Run folder (default runs/TASK)."),
    size: int = typer.Option(6, help="sudoku: 4, 6 (2x3 boxes) or 9."),
    order: str = typer.Option("solver", help="sudoku: the fill order, solver, row-major or random."),
    puzzles: int = typer.Option(100_000, help="sudoku: puzzles generated (cached between runs)."),
    heldout: int = typer.Option(1000, help="sudoku: puzzles held out for scoring."),
    shuffle_rounds: bool = typer.Option(False, "--shuffle-rounds", help="sudoku, solver order: the fills of each "
                                        "solver round in a seeded random order (each is forced whatever the order)."),
    arm: str = typer.Option("plain", help="reversal: plain, reverse (entity-preserving), permute (semantic "
                            "chunks) or bico (masked-LM steps with the causal mask lifted)."),
    facts: int = typer.Option(100, help="reversal: facts per subset."),
    layers: int = typer.Option(4, help="Layers of the fresh model."),
    width: int = typer.Option(None, help="Width of the fresh model, heads of 64 (default: sudoku 128, reversal "
                              "256)."),
    time: str = typer.Option(None, "--time", help="Training time, e.g. 10m (default 2m without --steps)."),
    steps: int = typer.Option(None, help="Stop after this many optimiser steps."),
    lr: float = typer.Option(None, help="AdamW learning rate (sudoku: of embeddings and head, default 0.01; "
                             "reversal: of everything, default 3e-3)."),
    muon_lr: float = typer.Option(None, help="sudoku: Muon learning rate of the matrices (default 0.03)."),
    batch_size: int = typer.Option(None, help="Rows per step (default 32)."),
    seed: int = typer.Option(0, help="Seed of the data and of the model."),
    score: int = typer.Option(1000, help="At the end, score the model: sudoku, this many held-out puzzles solved "
                              "greedily; reversal, every fact both ways (any number but 0)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out exactly."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the run already in --out."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show the progress bar."),
) -> None:
    """Train a fresh model on a task (the loss on the answers only), then score it on held-out items.

    Ctrl-C saves a snapshot and exits 130; `--resume` continues it exactly.
    """
    from .tasks import reversal, sudoku
    from .training import TrainingInterrupted

    _check_task(task)
    out = out or f"runs/{task}"
    settings = {k: v for k, v in dict(time=time, steps=steps, lr=lr, muon_lr=muon_lr, batch_size=batch_size).items()
                if v is not None}
    if not resume and "time" not in settings and "steps" not in settings:
        settings["time"] = "2m"
    width = width or (256 if task == "reversal" else 128)
    common = dict(seed=seed, layers=layers, width=width, resume=resume, overwrite=overwrite, progress=progress)
    try:
        if task == "reversal":
            result = reversal.train_model(out, arm=arm, per_subset=facts, **common, **settings)
        else:
            result = sudoku.train_model(out, size=size, order=order, puzzles=puzzles, heldout=heldout,
                                        shuffle_rounds=shuffle_rounds, **common, **settings)
    except TrainingInterrupted as e:
        print(f"interrupted by {e.signal_name} at step {e.step}: saved {e.snapshot}; continue with: "
              f"decoderlab tasks train {task} --out {out} --resume", file=sys.stderr)
        raise typer.Exit(e.exit_code) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    after = f"{result.val_loss:.4f}" if result.val_loss is not None else "n/a"
    console.print(f"trained {result.steps} steps, {result.tokens:,} tokens in {result.train_seconds:.1f}s; "
                  f"held-out loss {result.val_loss_before:.4f} -> {after}; saved to {result.run_dir}",
                  highlight=False)
    if score and task == "reversal":
        console.print(reversal.evaluate_model(out).table(), highlight=False)
    elif score:
        _print_sudoku_score(sudoku.evaluate_model(out, count=score), f"{score} held-out puzzles, greedy")


@tasks_app.command("eval")
def tasks_eval_cmd(
    run: str = typer.Argument(..., help="A run of decoderlab tasks train."),
    count: int = typer.Option(None, "--count", help="Score the first this many held-out items (default all)."),
    beam: int = typer.Option(1, help="sudoku: beam width (1 = greedy)."),
    json_out: str = typer.Option(None, "--json", help="Also write the scores to this JSON file."),
) -> None:
    """Score a task run on its held-out items: sudoku's cell and whole-puzzle accuracy (greedy or beam);
    reversal's exact match and answer rank per subset and direction, with chance baselines."""
    from .tasks import reversal, sudoku
    from .tasks.training import task_info

    info = task_info(run)
    _check_task(str(info.get("task")))
    if info["task"] == "reversal":
        result = reversal.evaluate_model(run)
        console.print(result.table(), highlight=False)
        if json_out:
            from pathlib import Path

            _write_json(Path(json_out), {"run": run, "task": "reversal", "arm": info.get("arm"),
                                         "groups": [{**vars(g), "chance_exact": g.chance_exact,
                                                     "chance_rank": g.chance_rank} for g in result.groups]})
        return
    score = sudoku.evaluate_model(run, count=count, beam=beam)
    _print_sudoku_score(score, f"{score.puzzles} held-out puzzles, " + ("greedy" if beam == 1 else f"beam {beam}"))
    if json_out:
        from pathlib import Path

        _write_json(Path(json_out), {"run": run, **{k: info.get(k) for k in ("task", "size", "order")}, "beam": beam,
                                     "puzzles": score.puzzles, "cell_accuracy": score.cell_accuracy,
                                     "puzzle_accuracy": score.puzzle_accuracy, "verdicts": score.verdict_counts})


def _print_sudoku_score(score, what: str) -> None:
    verdicts = ", ".join(f"{k} {v:,}" for k, v in sorted(score.verdict_counts.items(), key=lambda kv: -kv[1]))
    console.print(f"{what}: cell accuracy {score.cell_accuracy:.1%}, puzzles solved {score.puzzle_accuracy:.1%} "
                  f"(moves: {verdicts})", highlight=False)


def _read_text(path, flag: str) -> str:
    """A UTF-8 text file given on the command line, or a one-line error naming the flag."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{flag} {str(path)!r} is not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8") \
            from None
    except OSError as e:
        raise UserError(f"cannot read {flag} {str(path)!r} ({e.strerror or e})") from None


def main() -> None:
    try:
        app()  # standalone: typer reports usage errors itself (exit code 2)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
