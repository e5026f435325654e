"""The training loop: batches, objectives, optimiser steps, evaluation, logging and checkpoints.

A run folder holds the latest model in Hugging Face layout (so `decoderlab.load(run)` works), the
best model in `best/`, resumable snapshots in `checkpoints/step-N/` (model, optimiser, RNG, step),
`metrics.jsonl`, `loss.png` and `train_config.json`. The batch for step s depends only on (seed, s),
so a resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .. import masks
from ..atomic import atomic_write_text
from ..checkpoint import save as save_model
from ..data import Batch, PreparedData, get_batch, iter_eval_batches, prepare
from ..errors import UserError
from ..model import Transformer
from . import distributed as dist
from .config import FROZEN_ON_RESUME, TrainConfig, resolve_model_config
from .optim import build_optimizers, lr_factor

STATE_FILE = "state.json"
# Full-split evaluations per run (by steps or time, unless --eval-interval says otherwise).
EVALS_PER_RUN = 5
# The default corpus is 12 MB: 2 % of its documents (~240k characters, twice tinyshakespeare's
# validation split) measure loss as well as 10 % would, at a fifth of the cost per evaluation.
DEFAULT_CORPUS_VAL_FRACTION = 0.02
OPTIM_FILE = "optimizer.pt"


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    tokens: int
    train_seconds: float
    val_loss: float | None
    val_bits_per_byte: float | None
    best_val_loss: float | None
    history: list[dict[str, Any]] = field(default_factory=list)


def data_cache_dir(cfg: TrainConfig) -> Path:
    """Where prepared data for these inputs and tokenizer settings live (shared between runs)."""
    import hashlib

    root = Path(os.environ.get("DECODERLAB_CACHE", Path.home() / ".cache" / "decoderlab")) / "prepared"
    inputs = sorted(str(Path(p).resolve()) if Path(p).exists() else p for p in (cfg.data or ["<default>"]))
    tok = cfg.tokenizer if cfg.tokenizer in ("char", "bpe") else str(Path(cfg.tokenizer).resolve())
    key = json.dumps([inputs, tok, cfg.vocab_size if cfg.tokenizer == "bpe" else None,
                      None if cfg.data else DEFAULT_CORPUS_VAL_FRACTION])
    return root / hashlib.sha1(key.encode()).hexdigest()[:16]


class Trainer:
    """One training run: `run()` loops until the stop criterion, evaluating and checkpointing on the way."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        self.ctx = dist.setup(cfg.device)
        self.device = self.ctx.device
        self.progress = progress and self.ctx.is_main
        if self.ctx.is_main:
            _check_writable(self.run_dir)
        self.data = self._prepare_data()
        self.tokenizer = self.data.tokenizer
        self.model_config = resolve_model_config(cfg, self.tokenizer.vocab_size)
        self.data.check_context(self.model_config.context_length)
        torch.manual_seed(cfg.seed)
        self.raw_model = Transformer(self.model_config).to(self.device)
        self.model = dist.wrap(self.raw_model, self.ctx, fsdp=cfg.fsdp)
        self.optimizers = build_optimizers(self.raw_model, cfg, self.device)
        self.step = 0
        self.tokens = 0
        self.train_seconds = 0.0
        self.best_val: float | None = None
        self.last_val: float | None = None
        self.last_val_bpb: float | None = None
        if resume:
            self._load_state()
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16"
                         else contextlib.nullcontext())
        self.forward = torch.compile(self.model) if cfg.compile else self.model

    # ---- setup ---------------------------------------------------------------------------------

    def _prepare_data(self) -> PreparedData:
        folder = data_cache_dir(self.cfg)
        if self.ctx.is_main:
            prepare(self.cfg.data, folder, tokenizer=self.cfg.tokenizer, vocab_size=self.cfg.vocab_size,
                    progress=self.progress, val_fraction=0.1 if self.cfg.data else DEFAULT_CORPUS_VAL_FRACTION)
        dist.barrier(self.ctx)
        return PreparedData.load(folder)

    # ---- the loop ------------------------------------------------------------------------------

    def progress_fraction(self) -> float:
        cfg = self.cfg
        fractions = [0.0]
        if cfg.steps:
            fractions.append(self.step / cfg.steps)
        if cfg.tokens:
            fractions.append(self.tokens / cfg.tokens)
        if cfg.time:
            fractions.append(self.train_seconds / cfg.time)
        return max(fractions)

    def done(self) -> bool:
        return self.progress_fraction() >= 1.0

    def eval_interval(self) -> int:
        if self.cfg.eval_interval:
            return self.cfg.eval_interval
        if self.cfg.steps:
            return max(1, self.cfg.steps // EVALS_PER_RUN)
        return 0  # by time: evaluate every tenth of the budget (see run)

    def train_step(self) -> float:
        cfg, ctx = self.cfg, self.ctx
        factor = lr_factor(self.progress_fraction(), cfg.warmup, cfg.schedule, cfg.decay, cfg.lr_floor)
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
        batch = get_batch(self.data.train, cfg.batch_size, self.model_config.context_length, self.step, cfg.seed,
                          packed=cfg.packed)
        rows = _shard_rows(cfg.batch_size, ctx.rank, ctx.world_size)
        micro = max(1, len(rows) // cfg.grad_accum)
        loss_sum = torch.zeros((), device=self.device)
        for i in range(0, len(rows), micro):
            part = rows[i:i + micro]
            sync = i + micro >= len(rows)
            with dist.maybe_no_sync(self.model, sync):
                with self.autocast:
                    loss = self.loss(batch, part)
                (loss * len(part) / cfg.batch_size * ctx.world_size).backward()
            loss_sum += loss.detach() * len(part)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += cfg.batch_size * self.model_config.context_length
        return float(dist.mean(loss_sum / len(rows), ctx))

    def loss(self, batch: Batch, rows: slice | list[int]) -> torch.Tensor:
        """The objective's loss on some rows of a batch."""
        cfg = self.cfg
        x = batch.inputs[rows].to(self.device, non_blocking=True)
        y = batch.targets[rows].to(self.device, non_blocking=True)
        positions, mask = None, None
        if _crosses_documents(batch, rows):
            positions = batch.positions[rows].to(self.device)
            mask = masks.causal() & masks.document(batch.doc_ids[rows].to(self.device))
        if cfg.objective == "prefix":
            T = x.shape[1]
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
            lengths = torch.randint(0, int(T * cfg.prefix_max) + 1, (x.shape[0],), generator=gen).to(self.device)
            prefix = masks.causal() | masks.prefix(lengths)
            mask = prefix if mask is None else prefix & masks.document(batch.doc_ids[rows].to(self.device))
            # No loss inside the prefix: those tokens saw their own future.
            inside = torch.arange(T, device=self.device) < (lengths - 1).clamp(min=0).unsqueeze(1)
            y = y.masked_fill(inside, -100)
        want_future = cfg.objective == "mtp"
        out = self.forward(x, positions=positions, mask=mask, future=want_future)
        logits = out.logits if want_future else out
        loss = _cross_entropy(logits, y)
        if want_future:
            weight = cfg.mtp_weight
            for k, future in enumerate(out.future_logits, start=1):
                loss = loss + weight * _cross_entropy(future[:, :-k], _shift_targets(y, k, batch, rows, self.device))
                weight /= 2
        return loss

    @torch.inference_mode()
    def evaluate(self) -> tuple[float, float]:
        """(mean loss in nats per token, bits per byte) over the validation split."""
        model, cfg = self.raw_model, self.cfg
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        batches = iter_eval_batches(self.data.val, 64, self.model_config.context_length)
        for i, batch in enumerate(batches):
            if cfg.eval_batches is not None and i >= cfg.eval_batches:
                break
            if i % self.ctx.world_size != self.ctx.rank:
                continue
            x, y = batch.inputs.to(self.device), batch.targets.to(self.device)
            positions, mask = None, None
            if _crosses_documents(batch, slice(None)):
                positions = batch.positions.to(self.device)
                mask = masks.causal() & masks.document(batch.doc_ids.to(self.device))
            with self.autocast:
                logits = model(x, positions=positions, mask=mask)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
            count += (y != -100).sum()
        model.train()
        if hasattr(model, "reshard"):  # FSDP2 leaves the root unsharded after a forward without backward
            model.reshard()
        total, count = dist.sum(total, self.ctx), dist.sum(count, self.ctx)
        loss = float(total / count.clamp(min=1))
        bpb = self.data.val.bits_per_byte(float(total)) if cfg.eval_batches is None else math.nan
        return loss, bpb

    def run(self) -> TrainResult:
        cfg = self.cfg
        if self.ctx.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _write_json(self.run_dir / "train_config.json", cfg.to_dict())
        self.raw_model.train()
        history: list[dict[str, Any]] = []
        eval_every = self.eval_interval()
        period = cfg.time / EVALS_PER_RUN if cfg.time else math.inf
        next_eval_time = (self.train_seconds // period + 1) * period
        save_every = cfg.save_interval
        bar = _ProgressBar(self) if self.progress else None
        window_tokens, window_start = 0, time.perf_counter()
        try:
            while not self.done():
                t0 = time.perf_counter()
                loss = self.train_step()
                self.train_seconds += time.perf_counter() - t0
                window_tokens += cfg.batch_size * self.model_config.context_length
                if not math.isfinite(loss):
                    raise UserError(f"training diverged at step {self.step} (loss {loss}); lower --lr/--muon-lr")
                record = None
                if self.step % cfg.log_interval == 0 or self.done():
                    now = time.perf_counter()
                    record = self._record(loss, window_tokens / max(1e-9, now - window_start))
                    window_tokens, window_start = 0, now
                evaluate = self.done() or (eval_every and self.step % eval_every == 0) or (
                    not eval_every and self.train_seconds >= next_eval_time)
                save, best = bool(save_every and self.step % save_every == 0), False
                if evaluate:
                    next_eval_time = (self.train_seconds // period + 1) * period
                    record = record or self._record(loss, None)
                    val, bpb = self.evaluate()
                    self.last_val, self.last_val_bpb = val, bpb
                    record.update(val_loss=round(val, 5))
                    if not math.isnan(bpb):  # bits/byte needs the whole split; metrics.jsonl stays strict JSON
                        record.update(val_bpb=round(bpb, 5))
                    best = self.best_val is None or val < self.best_val
                    self.best_val = val if best else self.best_val
                    save = save or save_every is None or self.done()
                # The step's record goes to metrics.jsonl before its checkpoint: a kill in between must not
                # leave a snapshot whose step has no record (resume keeps records up to the snapshot's step).
                if record is not None:
                    history.append(record)
                    if self.ctx.is_main:
                        with open(self.run_dir / "metrics.jsonl", "a") as f:
                            f.write(json.dumps(record) + "\n")
                if save:
                    self.save(best=best)
                if evaluate or save:
                    window_start = time.perf_counter()
                if bar:
                    bar.update(loss, record)
        except KeyboardInterrupt:
            if self.ctx.is_main:
                print(f"\ninterrupted at step {self.step}; saving a checkpoint to resume from")
            self.save(best=False)
            raise
        finally:
            if bar:
                bar.close()
            if self.ctx.is_main:
                _plot_losses(self.run_dir)
        return TrainResult(self.run_dir, self.step, self.tokens, self.train_seconds, self.last_val,
                           self.last_val_bpb, self.best_val, history)

    def _record(self, loss: float, tok_per_s: float | None) -> dict[str, Any]:
        lr = self.optimizers[0].param_groups[0]["lr"]
        record = {"step": self.step, "tokens": self.tokens, "elapsed_s": round(self.train_seconds, 3),
                  "train_loss": round(loss, 5), "lr": lr}
        if tok_per_s is not None:
            record["tok_per_s"] = round(tok_per_s)
        return record

    # ---- checkpoints ---------------------------------------------------------------------------

    def save(self, best: bool) -> None:
        """A resumable snapshot in checkpoints/step-N (renamed into place whole), then the latest model."""
        state_dicts = [dist.optimizer_state(opt, self.model, self.ctx) for opt in self.optimizers]
        model = dist.full_model(self.raw_model, self.ctx)
        if not self.ctx.is_main:
            return
        snapshots = self.run_dir / "checkpoints"
        final = snapshots / f"step-{self.step:07d}"
        staging = snapshots / f".step-{self.step:07d}.tmp"
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            save_model(model, staging, tokenizer=self.tokenizer)
            torch.save(state_dicts, staging / OPTIM_FILE)
            rng = {"torch": torch.get_rng_state().tolist()}
            _write_json(staging / STATE_FILE, {"step": self.step, "tokens": self.tokens,
                                               "train_seconds": self.train_seconds, "best_val": self.best_val,
                                               "last_val": self.last_val, "rng": rng,
                                               "train_config": self.cfg.to_dict()})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(staging, final)
            save_model(model, self.run_dir, tokenizer=self.tokenizer)
            if best:
                save_model(model, self.run_dir / "best", tokenizer=self.tokenizer)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise UserError(f"could not save a checkpoint in {self.run_dir} ({e.strerror or e}); "
                            "the previous checkpoint is intact — free space or choose another --out") from None
        for old in sorted(snapshots.glob("step-*"))[:-self.cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)

    def _load_state(self) -> None:
        snapshot = latest_snapshot(self.run_dir)
        state = json.loads((snapshot / STATE_FILE).read_text())
        from ..checkpoint import load as load_model

        loaded = load_model(snapshot, device=self.device, dtype=torch.float32)
        dist.load_model_state(self.raw_model, loaded.state_dict(), self.ctx)
        for opt, sd in zip(self.optimizers, torch.load(snapshot / OPTIM_FILE, weights_only=False), strict=True):
            dist.load_optimizer_state(opt, sd, self.model, self.ctx)
        self.step, self.tokens = state["step"], state["tokens"]
        self.train_seconds, self.best_val, self.last_val = state["train_seconds"], state["best_val"], state["last_val"]
        torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
        # Metrics written after this snapshot belong to the lost part of the run.
        metrics = self.run_dir / "metrics.jsonl"
        if metrics.exists() and self.ctx.is_main:
            kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= self.step]
            metrics.write_text("".join(line + "\n" for line in kept))


def latest_snapshot(run_dir: Path) -> Path:
    snapshots = sorted(Path(run_dir).glob("checkpoints/step-*"))
    complete = [s for s in snapshots if (s / STATE_FILE).is_file() and (s / OPTIM_FILE).is_file()]
    if not complete:
        raise UserError(f"{run_dir} is not a training run (no checkpoints/step-*/ with a saved state); "
                        "pass the --out folder of an earlier `decoderlab train`")
    return complete[-1]


def resume_config(run_dir: str | Path, overrides: dict[str, Any]) -> TrainConfig:
    """The run's saved TrainConfig with `overrides` applied; contradictions are a one-line error."""
    run_dir = Path(run_dir)
    saved_path = run_dir / "train_config.json"
    if not run_dir.is_dir() or not saved_path.is_file():
        raise UserError(f"{run_dir} is not a training run (no train_config.json); "
                        "pass the --out folder of an earlier `decoderlab train`")
    latest_snapshot(run_dir)
    saved = json.loads(saved_path.read_text())
    for key, value in overrides.items():
        if key in FROZEN_ON_RESUME and value is not None and saved.get(key) != value:
            raise UserError(f"--{key.replace('_', '-')} {value!r} contradicts the run being resumed "
                            f"({saved.get(key)!r}); drop it or start a new run with another --out")
    merged = {**saved, **{k: v for k, v in overrides.items() if v is not None}, "out": str(run_dir)}
    return TrainConfig.from_dict(merged)


def train(cfg: TrainConfig | None = None, resume: bool = False, progress: bool = True, **overrides) -> TrainResult:
    """Train a model; `decoderlab.train(data=[...], time="90s", out="runs/x")` or with a TrainConfig."""
    if cfg is None:
        cfg = TrainConfig(**overrides)
    trainer = Trainer(cfg, resume=resume, progress=progress)
    try:
        result = trainer.run()
        # Leave together: a rank that tears down while rank 0 still writes its checkpoint closes the gloo
        # connection under it, and that process aborts. (On an error torchrun stops the other ranks.)
        dist.barrier(trainer.ctx)
        return result
    finally:
        dist.teardown(trainer.ctx)


# ---- helpers ---------------------------------------------------------------------------------------


def _crosses_documents(batch: Batch, rows) -> bool:
    """Whether any row holds a document boundary (else plain causal attention is exact, and faster)."""
    if batch.doc_ids is None:
        return False
    doc = batch.doc_ids[rows]
    return bool((doc[:, 0] != doc[:, -1]).any())


def _cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def _shift_targets(y: torch.Tensor, k: int, batch: Batch, rows, device: torch.device) -> torch.Tensor:
    """Targets k places further ahead for positions 0..T-k-1; -100 where that crosses a document."""
    future = y[:, k:]
    if batch.doc_ids is not None:
        doc = batch.doc_ids[rows].to(device)
        future = future.masked_fill(doc[:, k:] != doc[:, :-k], -100)
    return future.masked_fill(y[:, :-k] == -100, -100)


def _shard_rows(batch_size: int, rank: int, world: int) -> list[int]:
    per = batch_size // world
    if per * world != batch_size:
        raise UserError(f"batch_size {batch_size} must be divisible by the number of processes {world}")
    return list(range(rank * per, (rank + 1) * per))


def _check_writable(folder: Path) -> None:
    """Fail before training, not at the first checkpoint, when the run folder cannot be written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"cannot write to the run folder {folder} ({e.strerror or e}); choose another --out") from None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _plot_losses(run_dir: Path) -> None:
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["elapsed_s"] for r in records], [r["train_loss"] for r in records], label="train", alpha=0.7)
    evals = [r for r in records if "val_loss" in r]
    ax.plot([r["elapsed_s"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val (full split)")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = run_dir / ".loss.png.tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, run_dir / "loss.png")


class _ProgressBar:
    """A rich progress bar over the run's stop criterion: loss, tokens/s, ETA."""

    def __init__(self, trainer: Trainer) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        self.trainer = trainer
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                                 TextColumn("step {task.fields[step]}"), TextColumn("loss {task.fields[loss]}"),
                                 TextColumn("val {task.fields[val]}"), TextColumn("{task.fields[tps]} tok/s"),
                                 TimeRemainingColumn(), transient=False)
        self.task = self.progress.add_task("train", total=1000, step=0, loss="-", val="-", tps="-")
        self.progress.start()

    def update(self, loss: float, record: dict[str, Any] | None) -> None:
        fields = {"step": self.trainer.step, "loss": f"{loss:.4f}"}
        if record and "tok_per_s" in record:
            fields["tps"] = f"{record['tok_per_s']:,}"
        if record and "val_loss" in record:
            fields["val"] = f"{record['val_loss']:.4f}"
        self.progress.update(self.task, completed=1000 * min(1.0, self.trainer.progress_fraction()), **fields)

    def close(self) -> None:
        self.progress.stop()
