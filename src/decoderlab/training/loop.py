"""The training loop: batches, objectives, optimiser steps, evaluation, logging and checkpoints.

A run folder holds the latest model in Hugging Face layout (so `decoderlab.load(run)` works), the best model in
`best/`, resumable snapshots in `checkpoints/step-N/` (see `snapshot`), `metrics.jsonl`, `loss.png` and
`train_config.json`. The batch for step s depends only on (seed, s) and the LR for step s only on the run's
frozen schedule (see `schedule`), so a resumed run takes exactly the steps an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import signal
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from .. import masks
from ..accel import fast_bf16
from ..accel.allocator import keep_freed_memory
from ..atomic import atomic_write_text
from ..checkpoint import save as save_model
from ..data import Batch, PreparedData, describe_change, fingerprint, get_batch, input_stats, iter_eval_batches, prepare
from ..errors import UserError
from ..finetuning.objectives import MASK_TOKEN
from ..masked import Noised, diffusion_nll, diffusion_noise, masked_loss, mlm_noise, scored_slots
from ..model import Transformer
from ..tokenizer import Tokenizer
from . import config as train_config
from . import distributed as dist
from . import snapshot as snap
from .budget import BudgetPlan, plan_regularisation, plan_shape
from .config import BUDGET, MASKED_OBJECTIVES, TrainConfig, parse_duration, resolve_model_config, uses_mask_token
from .optim import build_optimizers, lr_factor
from .regional import BlockCompiled
from .resources import check_memory
from .runfolder import RUN_CONFIG, check_out_folder
from .schedule import Budget, Schedule
from .signals import StopRequests, TrainingInterrupted

STATE_FILE = snap.STATE_FILE
OPTIM_FILE = snap.OPTIM_FILE
# Full-split evaluations per run (by steps or time, unless --eval-interval says otherwise).
EVALS_PER_RUN = 5
# The default corpus is 12 MB: 2 % of its documents (~240k characters, twice tinyshakespeare's
# validation split) measure loss as well as 10 % would, at a fifth of the cost per evaluation.
DEFAULT_CORPUS_VAL_FRACTION = 0.02
# A --time run fixes its length in steps once it has trained this fraction of its budget and at least
# CALIBRATION_STEPS steps after the first (which pays one-off costs: allocation, compilation): from then on it is
# a run of that many steps, and resumes exactly. Until then its LR follows the elapsed time, which changes nothing
# while the fraction ends before the schedule's decay (WSD holds the peak until half the run), and it ends before
# the first evaluation (a fifth of the run's steps). The speed is the median of the later half of those steps: the
# first few run slower (caches, allocator, CPU clocks); measured over 5 % of a 10 s run they had made it stop
# after 8.9 s.
CALIBRATION_FRACTION = 0.15
# Monte Carlo draws of the noise level per validation batch for diffusion's NLL bound (stratified).
EVAL_DIFFUSION_SAMPLES = 4
CALIBRATION_STEPS = 3


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


def data_cache_dir(cfg: TrainConfig, tokenizer: Tokenizer | None = None) -> Path:
    """Where prepared data for these inputs and tokenizer settings live (shared between runs); with `tokenizer`,
    the folder for these inputs encoded with exactly that tokenizer (a resumed run's own)."""
    root = Path(os.environ.get("DECODERLAB_CACHE", Path.home() / ".cache" / "decoderlab")) / "prepared"
    inputs = sorted(str(Path(p).resolve()) if Path(p).exists() else p for p in (cfg.data or ["<default>"]))
    if tokenizer is not None:
        tok: Any = hashlib.sha256(tokenizer.backend.to_str().encode()).hexdigest()
    else:
        tok = cfg.tokenizer if cfg.tokenizer in ("char", "bpe") else str(Path(cfg.tokenizer).resolve())
    key = json.dumps([inputs, tok, cfg.vocab_size if cfg.tokenizer == "bpe" else None,
                      None if cfg.data else DEFAULT_CORPUS_VAL_FRACTION])
    return root / hashlib.sha1(key.encode()).hexdigest()[:16]


class Trainer:
    """One training run: `run()` loops until the stop criterion, evaluating and checkpointing on the way.

    Subclasses change what is trained and on what by overriding `_prepare_data`, `_build_model`, `_batch`, `loss`,
    `evaluate` and `save_weights`/`load_weights` (`decoderlab.finetune.FinetuneTrainer`).

    `resume` continues the run in `cfg.out` from its newest complete snapshot; `extend` (with `resume`) adds a
    schedule segment of that much more training to a finished run; `overwrite` replaces an earlier run in `cfg.out`
    (see `runfolder`); `allow_data_change` resumes although the input files changed since the snapshot.
    """

    config_class: ClassVar[type[TrainConfig]] = TrainConfig
    # Whether a fresh run's unset shape, batch, context and compilation follow its budget (training/budget.py).
    plans_budget: ClassVar[bool] = True

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True, overwrite: bool = False,
                 extend: Budget | None = None, allow_data_change: bool = False) -> None:
        self.cfg = cfg
        self.run_dir = Path(cfg.out)
        if resume and overwrite:
            raise UserError("--overwrite contradicts --resume: resume continues the run, overwrite replaces it")
        if extend is not None and not resume:
            raise UserError(f"--extend continues a finished run: use it with --resume {self.run_dir}")
        if cfg.eval_tasks:  # a wrong task name fails here, not after the first stretch of training
            from ..harness import resolve_tasks

            resolve_tasks(cfg.eval_tasks)
        self.tasks_failed = False
        self.ctx = dist.setup(cfg.device)
        self.device = self.ctx.device
        self.progress = progress and self.ctx.is_main
        if cfg.dtype == "auto":  # resolved once, so the run folder records (and a resume reuses) what ran
            cfg.dtype = "bf16" if fast_bf16(self.device.type) else "fp32"
        elif cfg.dtype == "bf16" and not fast_bf16(self.device.type) and self.ctx.is_main:
            self._note(f"this {self.device.type} has no native bf16: bf16 training runs many times slower than "
                       "fp32 here (--dtype fp32 or auto)")
        self.autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16) if cfg.dtype == "bf16"
                         else contextlib.nullcontext())
        self.plan = self._plan_budget(resume)
        keep_freed_memory()  # every step allocates the same activations: reuse them, no fresh pages per step
        self._check_memory_early()
        snapshot, state = None, None
        if resume:
            snapshot = snap.find_snapshot(self.run_dir, note=self._warn)
            state = snap.read_state(snapshot)
        elif self.ctx.is_main:
            check_out_folder(self.run_dir, overwrite, note=self._note)
        if self.ctx.is_main:
            _check_writable(self.run_dir)
        self.schedule = Schedule(cfg.schedule, cfg.warmup, cfg.decay, cfg.lr_floor)
        if state is not None:
            try:
                self.schedule = Schedule.from_dict(state["schedule"])
            except UserError as e:
                raise UserError(f"{snapshot / STATE_FILE}: {e}; delete that snapshot to resume from an earlier one"
                                ) from None
            self._check_extension(state["step"], extend)
        self.data, self.data_files = self._prepare_data(snapshot, state, allow_data_change)
        self.tokenizer = self._run_tokenizer(self.data.tokenizer)
        if self.plan is not None:
            self.plan = plan_regularisation(cfg, self.plan, len(self.data.train.tokens))
            self._note(self.plan.describe())
        self.switch_step: int | None = None  # the step a --switch-to run changed objective at
        self.raw_model = self._build_model()
        self.model_config = self.raw_model.config
        self.model = dist.wrap(self.raw_model, self.ctx, fsdp=cfg.fsdp)
        self.optimizers = build_optimizers(self.raw_model, cfg, self.device)
        self.step = 0
        self.tokens = 0
        self.train_seconds = 0.0
        self.best_val: float | None = None
        self.last_val: float | None = None
        self.last_val_bpb: float | None = None
        self.stop = StopRequests(announce=self.ctx.is_main)
        self.stopping = False  # a stop signal reached some rank: every rank stops after this step
        self._step_seconds: list[float] = []
        self._saved_step: int | None = None
        if snapshot is not None:
            self._load_state(snapshot, state)
        elif cfg.time is None:
            self.schedule.freeze(self._step_limit())
        if extend is not None:
            seconds_per_step = self.train_seconds / self.step if self.step else None
            steps = extend.steps_for(self.tokens_per_step, seconds_per_step)
            segment = self.schedule.extend(steps or 1)
            self._note(f"--extend: steps {segment.start}..{segment.end}, the LR re-warming from "
                       f"{segment.start_factor:.3g} x peak")
        self.forward = BlockCompiled(self.raw_model, self.model) if cfg.compile else self.model
        self._compiled = self._compile_unproven = bool(cfg.compile)

    # ---- setup ---------------------------------------------------------------------------------

    def _plan_budget(self, resume: bool) -> BudgetPlan | None:
        """A fresh run of our recipe (no preset) takes its shape, batch, context and compilation from its budget
        (`training/budget.py`); what the user set stays. Otherwise (a preset, a resumed run from before the plan,
        fine-tuning) unset values take the fixed defaults."""
        cfg = self.cfg
        plan = None
        if self.plans_budget and not resume and cfg.preset is None:
            plan = plan_shape(cfg)
        if self.plans_budget and not resume and cfg.optimizer == "muon":
            # Resolved (and so recorded) for fresh runs only: a resumed run from before these fields keeps `lr`.
            cfg.embed_lr = cfg.embed_lr or train_config.EMBED_LR_FACTOR * cfg.lr
            cfg.head_lr = cfg.head_lr or train_config.HEAD_LR_FACTOR * cfg.lr
        if cfg.batch_size is None:
            cfg.batch_size = 32
        if cfg.compile is None:
            cfg.compile = False
        return plan

    def _note(self, message: str) -> None:
        if self.ctx.is_main:
            print(f"note: {message}", file=sys.stderr, flush=True)

    def _warn(self, message: str) -> None:
        if self.ctx.is_main:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def _run_tokenizer(self, data_tokenizer: Tokenizer) -> Tokenizer:
        """The run's tokenizer: the data's, plus a mask token (the next free id) for masked objectives."""
        if uses_mask_token(self.cfg):
            return data_tokenizer.with_special_token(MASK_TOKEN, "mask_token")
        return data_tokenizer

    def objective(self) -> str:
        """The objective of the current step (a --switch-to run changes it once, at --switch-at)."""
        return self.cfg.objective if self.switch_step is None else self.cfg.switch_to

    def _follow_objective(self) -> None:
        """At a --switch-to run's switch: the model becomes a masked model predicting each masked token from the
        slot before it (it was trained to predict the next token); the best validation loss starts afresh."""
        cfg = self.cfg
        if cfg.switch_to is None or self.switch_step is not None or self.progress_fraction() < cfg.switch_at:
            return
        self.switch_step = self.step
        self.best_val = None
        self._note(f"step {self.step}: switching from --objective {cfg.objective} to {cfg.switch_to}")
        self._apply_switch()

    def _apply_switch(self) -> None:
        config = self.raw_model.config.replace(objective=self.cfg.switch_to, bidirectional=True, shift_logits=True,
                                               mask_token_id=self.tokenizer.mask_id)
        self.raw_model.config = self.model_config = config

    def _check_memory_early(self) -> None:
        """Refuse what cannot fit before touching any folder or data (the vocabulary is not known yet: a lower
        bound)."""
        cfg = self.cfg
        vocab_floor = 257 if cfg.tokenizer == "bpe" else 1
        check_memory(cfg, resolve_model_config(cfg, vocab_floor, mask_token_id=0), self.device, self.ctx.world_size)

    def _build_model(self) -> Transformer:
        """The model this run trains, on the run's device: here a fresh one of the configured shape."""
        cfg = self.cfg
        config = resolve_model_config(cfg, self.tokenizer.vocab_size, mask_token_id=self.tokenizer.mask_id)
        self.data.check_context(config.context_length)
        check_memory(cfg, config, self.device, self.ctx.world_size)
        torch.manual_seed(cfg.seed)
        return Transformer(config).to(self.device)

    def _batch(self) -> Batch:
        """The global batch of the current step: a pure function of (seed, step), so resume is exact."""
        cfg = self.cfg
        return get_batch(self.data.train, cfg.batch_size, self.model_config.context_length, self.step, cfg.seed,
                         packed=cfg.packed)

    def save_weights(self, model: Transformer, folder: Path) -> None:
        """Write the model (with the run's tokenizer) into `folder`, loadable by `decoderlab.load`."""
        save_model(model, folder, tokenizer=self.tokenizer)

    def load_weights(self, snapshot: Path) -> None:
        """Restore the model's weights from a snapshot written by `save_weights`."""
        from ..checkpoint import load as load_model

        loaded = load_model(snapshot, device=self.device, dtype=torch.float32, pack=False)
        try:
            dist.load_model_state(self.raw_model, loaded.state_dict(), self.ctx)
        except RuntimeError as e:
            raise UserError(f"the weights in {snapshot} do not fit this run's model ({str(e).splitlines()[0]})"
                            ) from None

    @property
    def tokens_per_step(self) -> int:
        return self.cfg.batch_size * self.model_config.context_length

    def _check_extension(self, step: int, extend: Budget | None) -> None:
        """A finished run resumes only with --extend (and a budget); an unfinished one only without."""
        end = self.schedule.end
        run = self.run_dir
        if extend is None:
            if step >= end:
                raise UserError(f"{run} is finished (step {step} of {end}); to train it further pass --extend with "
                                f"the extra budget, e.g. decoderlab train --resume {run} --extend --steps 500 "
                                "(or --time 3m / --tokens N)")
            return
        if not extend.given():
            raise UserError("--extend needs the extra budget: add --steps N, --tokens N or --time 3m")
        if step < end:
            raise UserError(f"{run} is at step {step} of {end}; resume it without --extend to finish its schedule, "
                            "then extend it")

    def _prepare_data(self, snapshot: Path | None, state: dict[str, Any] | None,
                      allow_change: bool) -> tuple[PreparedData, list[list[Any]]]:
        """The prepared data and the input files' [path, size, mtime_ns]. A resumed run reuses its snapshot's
        tokenizer (never trains a new one) and refuses inputs that changed since, unless `allow_change`."""
        cfg = self.cfg
        val_fraction = 0.1 if cfg.data else DEFAULT_CORPUS_VAL_FRACTION
        options = dict(vocab_size=cfg.vocab_size, progress=self.progress, val_fraction=val_fraction)
        if snapshot is None:
            files = input_stats(cfg.data)
            folder = data_cache_dir(cfg)
            if self.ctx.is_main:
                prepare(cfg.data, folder, tokenizer=cfg.tokenizer, **options)
            dist.barrier(self.ctx)
            return PreparedData.load(folder), files
        tok = Tokenizer.from_folder(snapshot)
        try:
            files = input_stats(cfg.data)
        except UserError as e:
            raise UserError(f"cannot resume {self.run_dir}: its training data is not there any more ({e})") from None
        saved = state.get("data_files")
        try:
            change = describe_change(saved, files)
        except (TypeError, ValueError):
            change = "the snapshot does not record its input files"
        if change is not None:
            if not allow_change:
                raise UserError(f"the training data changed since {snapshot.name} was saved ({change}); resuming "
                                "would not reproduce the run — restore the files, or pass --allow-data-change to "
                                "continue on the new data with the run's tokenizer")
            self._warn(f"the training data changed since {snapshot.name} ({change}); continuing on it with the "
                       "run's tokenizer (--allow-data-change)")
        else:
            # The run's own prepared data, when still cached for exactly these inputs and the run's tokenizer.
            folder = data_cache_dir(cfg)
            with contextlib.suppress(UserError, OSError, ValueError, KeyError):
                cached = PreparedData.load(folder)
                same = (cached.meta.get("fingerprint") == fingerprint(cfg.data, cfg.tokenizer, cfg.vocab_size,
                                                                      val_fraction=val_fraction)
                        and self._run_tokenizer(cached.tokenizer).backend.to_str() == tok.backend.to_str())
                if same:
                    return cached, files
        folder = data_cache_dir(cfg, tok)
        if self.ctx.is_main:
            prepare(cfg.data, folder, tokenizer=tok, **options)
        dist.barrier(self.ctx)
        return PreparedData.load(folder), files

    # ---- the schedule --------------------------------------------------------------------------

    def _step_limit(self) -> int | None:
        """The run's length in steps where --steps or --tokens fix it up front (None: only --time)."""
        return Budget(self.cfg.steps, self.cfg.tokens).steps_for(self.tokens_per_step, None)

    def _freeze(self, force: bool = False) -> None:
        """Fix a --time run's length in steps once its speed is measured (or now, with `force`)."""
        cfg = self.cfg
        measured = self._step_seconds[1:] or self._step_seconds  # the first step pays one-off costs
        measured = measured[len(measured) // 2:]
        limit = self._step_limit()
        calibrated = (self.train_seconds >= CALIBRATION_FRACTION * cfg.time and len(measured) >= CALIBRATION_STEPS)
        over = self.train_seconds >= cfg.time or (limit is not None and self.step >= limit)
        if not (force or calibrated or over):
            return
        remaining = cfg.time - self.train_seconds
        more = math.floor(remaining / statistics.median(measured)) if measured and remaining > 0 else 0
        total = self.step + max(0, more)
        self.schedule.freeze(max(self.step, total if limit is None else min(limit, total)))

    def progress_fraction(self) -> float:
        if self.schedule.frozen:
            return self.step / max(1, self.schedule.end)
        limit = self._step_limit()
        return max(self.step / limit if limit else 0.0, self.train_seconds / self.cfg.time)

    def lr_factor(self) -> float:
        """The LR multiplier for the next step: the frozen schedule's, or a --time run's by elapsed time until its
        length is fixed."""
        cfg = self.cfg
        if self.schedule.frozen:
            return self.schedule.factor(self.step)
        return lr_factor(self.progress_fraction(), cfg.warmup, cfg.schedule, cfg.decay, cfg.lr_floor)

    def done(self) -> bool:
        if self.schedule.frozen:
            return self.step >= self.schedule.end
        return self.progress_fraction() >= 1.0

    def eval_interval(self) -> int:
        """Steps between evaluations: --eval-interval, else a fifth of the current schedule segment (0 while a
        --time run's length is not fixed yet: no evaluation before then but at the end)."""
        if self.cfg.eval_interval:
            return self.cfg.eval_interval
        if not self.schedule.frozen:
            return 0
        seg = self.schedule.segments[-1]
        return max(1, (seg.end - seg.start) // EVALS_PER_RUN)

    # ---- the loop ------------------------------------------------------------------------------

    def train_step(self) -> float:
        cfg, ctx = self.cfg, self.ctx
        t0 = time.perf_counter()
        self._follow_objective()
        factor = self.lr_factor()
        for opt in self.optimizers:
            for group in opt.param_groups:
                group["lr"] = group["initial_lr"] * factor
        batch = self._batch()
        rows = _shard_rows(cfg.batch_size, ctx.rank, ctx.world_size)
        if self._compile_unproven:
            loss_sum = self._first_compiled_step(batch, rows)
        else:
            loss_sum = self._accumulate(batch, rows)
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.grad_clip)
        for opt in self.optimizers:
            opt.step()
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += self.tokens_per_step
        local = [float(loss_sum / len(rows)), time.perf_counter() - t0, float(self.stop.signum is not None)]
        # One all-reduce carries the loss, the step time and any stop request, so that every rank agrees on when
        # a --time run's length is fixed and on the step after which a signalled run stops.
        loss_value, seconds, stop = dist.mean_values(local, self.ctx)
        self.train_seconds += seconds
        self._step_seconds.append(seconds)
        self.stopping = self.stopping or stop > 0
        if not self.schedule.frozen:
            self._freeze()
        return loss_value

    def _accumulate(self, batch: Batch, rows: list[int]) -> torch.Tensor:
        """Forward and backward over this rank's rows in --grad-accum micro-batches; the summed loss."""
        cfg, ctx = self.cfg, self.ctx
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
        return loss_sum

    def _first_compiled_step(self, batch: Batch, rows: list[int]) -> torch.Tensor:
        """The first step through torch.compile, which compiles the forward and backward graphs: where that fails
        (no C++ compiler, an unsupported op), the run goes on eagerly with a warning rather than dying."""
        self._compile_unproven = False
        try:
            return self._accumulate(batch, rows)
        except (UserError, MemoryError):
            raise
        except Exception as e:  # torch raises many kinds (BackendCompilerFailed, InductorError, CalledProcessError)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            self._warn(f"torch.compile failed ({type(e).__name__}: {first}); training without it (--no-compile "
                       "skips the attempt)")
            self.forward = self.model
            self._compiled = False
            for opt in self.optimizers:
                opt.zero_grad(set_to_none=True)
            return self._accumulate(batch, rows)

    def loss(self, batch: Batch, rows: slice | list[int]) -> torch.Tensor:
        """The objective's loss on some rows of a batch."""
        cfg = self.cfg
        x = batch.inputs[rows].to(self.device, non_blocking=True)
        y = batch.targets[rows].to(self.device, non_blocking=True)
        positions, mask = None, None
        # A compiled model always gets the document mask where the data has documents: one graph for every step,
        # rather than a second compilation (~10 s, after the --time run has fixed its length) the first time a batch
        # has no boundary.
        if _crosses_documents(batch, rows) or (self._compiled and batch.doc_ids is not None
                                               and self.data.train.n_docs > 1):
            positions = batch.positions[rows].to(self.device)
            mask = masks.causal() & masks.document(batch.doc_ids[rows].to(self.device))
        objective = self.objective()
        if objective in MASKED_OBJECTIVES:
            return self._masked_loss(batch, rows, objective)
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

    def _masked_loss(self, batch: Batch, rows: slice | list[int], objective: str) -> torch.Tensor:
        """MLM or masked-diffusion loss on `rows`. The noise is drawn for the whole batch from (seed, step), so a
        resumed run and any micro-batching see the same; documents packed in a row do not see each other."""
        cfg, config = self.cfg, self.raw_model.config
        shift = config.shift_logits
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
        maskable = None
        if shift:  # slot i predicts slot i + 1: only within a document
            maskable = torch.zeros_like(batch.inputs, dtype=torch.bool)
            maskable[:, 1:] = batch.doc_ids[:, 1:] == batch.doc_ids[:, :-1]
        if objective == "diffusion":
            noised = diffusion_noise(batch.inputs, config.mask_token_id, gen, maskable=maskable, shift=shift)
        else:
            noised = mlm_noise(batch.inputs, config.mask_token_id, config.vocab_size, gen, maskable=maskable,
                               shift=shift)
        # The rows at hand, normalised as the next-token loss is (over their own tokens): diffusion per maskable
        # token, MLM per chosen token.
        if objective == "mlm":
            count = (noised.targets[rows] != -100).sum()
        elif maskable is not None:
            count = maskable[rows].sum()
        else:
            count = torch.tensor(noised.inputs[rows].numel())
        noised = Noised(*(t[rows].to(self.device, non_blocking=True) for t in
                          (noised.inputs, noised.targets, noised.weights)), count=count.to(self.device))
        positions, mask = None, masks.full()
        if _crosses_documents(batch, rows):
            positions = batch.positions[rows].to(self.device)
            mask = masks.document(batch.doc_ids[rows].to(self.device))
        logits = self.forward(noised.inputs, positions=positions, mask=mask,
                              logits_to_keep=scored_slots(noised, shift))
        return masked_loss(logits, noised, shift)

    def _evaluate_masked(self, objective: str) -> tuple[float, float]:
        """Validation for masked objectives, with fixed noise (the same at every evaluation): diffusion's bound on
        the NLL per token (and in bits per byte: a bound on the compression rate), or MLM's loss on its masked
        tokens."""
        model, config = self.raw_model, self.raw_model.config
        shift = config.shift_logits
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        for i, batch in enumerate(iter_eval_batches(self.data.val, 64, self.model_config.context_length)):
            if self.cfg.eval_batches is not None and i >= self.cfg.eval_batches:
                break
            if i % self.ctx.world_size != self.ctx.rank:
                continue
            x = batch.inputs.to(self.device)
            mask, positions = masks.full(), None
            if _crosses_documents(batch, slice(None)):
                positions = batch.positions.to(self.device)
                mask = masks.document(batch.doc_ids.to(self.device))
            maskable = torch.ones_like(x, dtype=torch.bool)
            if shift:
                maskable[:, 0] = False
                maskable[:, 1:] = (batch.doc_ids[:, 1:] == batch.doc_ids[:, :-1]).to(self.device)
            with self.autocast:
                if objective == "diffusion":
                    total += diffusion_nll(model, x, config.mask_token_id, samples=EVAL_DIFFUSION_SAMPLES, seed=i,
                                           shift=shift, mask=mask, positions=positions, maskable=maskable).sum()
                    count += maskable.sum()
                else:
                    gen = torch.Generator().manual_seed(i)
                    noised = mlm_noise(x, config.mask_token_id, config.vocab_size, gen, maskable=maskable, shift=shift)
                    logits = model(noised.inputs, positions=positions, mask=mask,
                                   logits_to_keep=scored_slots(noised, shift))
                    n = (noised.targets != -100).sum()
                    total += masked_loss(logits, noised, shift).double() * n
                    count += n
        total, count = dist.sum(total, self.ctx), dist.sum(count, self.ctx)
        loss = float(total / count.clamp(min=1))
        bpb = (self.data.val.bits_per_byte(float(total)) if objective == "diffusion" and self.cfg.eval_batches is None
               else math.nan)
        return loss, bpb

    @torch.inference_mode()
    def evaluate(self) -> tuple[float, float]:
        """(mean loss in nats per token, bits per byte) over the validation split."""
        model, cfg = self.raw_model, self.cfg
        objective = self.objective()
        if objective in MASKED_OBJECTIVES:
            model.eval()
            try:
                return self._evaluate_masked(objective)
            finally:
                model.train()
        model.eval()
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        batches = iter_eval_batches(self.data.val, 64, self.model_config.context_length)
        seen, forwards, spare = 0, 0, None
        for i, batch in enumerate(batches):
            if cfg.eval_batches is not None and i >= cfg.eval_batches:
                break
            seen = i + 1
            if i % self.ctx.world_size != self.ctx.rank:
                spare = spare or batch
                continue
            forwards += 1
            x, y = batch.inputs.to(self.device), batch.targets.to(self.device)
            positions, mask = None, None
            if _crosses_documents(batch, slice(None)):
                positions = batch.positions.to(self.device)
                mask = masks.causal() & masks.document(batch.doc_ids.to(self.device))
            with self.autocast:
                logits = model(x, positions=positions, mask=mask)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
            count += (y != -100).sum()
        if dist.is_fsdp(self.model, self.ctx):
            # An FSDP forward gathers every block's weights from all ranks: each rank must run as many forwards as
            # the others, or the one with more waits forever. Ranks short of a batch run one they skipped, unused.
            for _ in range(-(-seen // self.ctx.world_size) - forwards):
                with self.autocast:
                    model(spare.inputs.to(self.device))
        model.train()
        if hasattr(model, "reshard"):  # FSDP2 leaves the root unsharded after a forward without backward
            model.reshard()
        total, count = dist.sum(total, self.ctx), dist.sum(count, self.ctx)
        loss = float(total / count.clamp(min=1))
        bpb = self.data.val.bits_per_byte(float(total)) if cfg.eval_batches is None else math.nan
        return loss, bpb

    def evaluate_tasks(self) -> dict[str, dict[str, float]]:
        """The `eval_tasks` metrics of the model as it is now, through lm-eval (`decoderlab.harness`):
        {task: {metric: value}}, the harness's `acc`, `acc_norm`, `word_perplexity`, ... without stderr."""
        from ..harness import DecoderlabLM, evaluate

        model, cfg = self.raw_model, self.cfg
        # The harness seeds the global generators; training (dropout, resume) must not see that.
        states = torch.random.get_rng_state(), np.random.get_state(), random.getstate()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        try:
            lm = DecoderlabLM(model=model, tokenizer=self.tokenizer, batch_size=8)
            with torch.inference_mode(), self.autocast:
                results = evaluate(lm, cfg.eval_tasks, limit=cfg.eval_limit, seed=False)
        finally:
            model.train()
            torch.random.set_rng_state(states[0])
            np.random.set_state(states[1])
            random.setstate(states[2])
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
        out: dict[str, dict[str, float]] = {}
        for task, metrics in results["results"].items():
            for key, value in metrics.items():
                metric, _, filt = key.partition(",")
                if ("_stderr" in metric or metric == "sample_len" or not isinstance(value, int | float)
                        or isinstance(value, bool)):
                    continue
                name = metric if filt in ("", "none") else f"{metric},{filt}"
                out.setdefault(task, {})[name] = round(float(value), 6)
        return out

    def run(self) -> TrainResult:
        cfg = self.cfg
        if self.ctx.is_main:
            try:
                _write_json(self.run_dir / RUN_CONFIG, cfg.to_dict())
            except OSError as e:
                raise UserError(f"cannot write to the run folder {self.run_dir} ({e.strerror or e}); "
                                "free space or choose another --out") from None
        self.raw_model.train()
        history: list[dict[str, Any]] = []
        save_every = cfg.save_interval
        bar = _ProgressBar(self) if self.progress else None
        window_tokens, window_start = 0, time.perf_counter()
        # The handlers stay until the run has fully stopped (plotting included): a second Ctrl-C then is ignored.
        with self.stop:
            try:
                while not self.done():
                    loss = self.train_step()
                    window_tokens += self.tokens_per_step
                    if not math.isfinite(loss):
                        raise UserError(f"training diverged at step {self.step} (loss {loss}); lower --lr/--muon-lr")
                    record = None
                    if self.step % cfg.log_interval == 0 or self.done():
                        now = time.perf_counter()
                        record = self._record(loss, window_tokens / max(1e-9, now - window_start))
                        window_tokens, window_start = 0, now
                    eval_every = self.eval_interval()
                    segment_start = self.schedule.segments[-1].start if self.schedule.frozen else 0
                    evaluate = self.done() or bool(eval_every and (self.step - segment_start) % eval_every == 0)
                    save, best = bool(save_every and self.step % save_every == 0), False
                    if evaluate:
                        record = record or self._record(loss, None)
                        val, bpb = self.evaluate()
                        self.last_val, self.last_val_bpb = val, bpb
                        record.update(val_loss=round(val, 5))
                        if not math.isnan(bpb):  # bits/byte needs the whole split; metrics.jsonl stays strict JSON
                            record.update(val_bpb=round(bpb, 5))
                        if cfg.eval_tasks and self.ctx.is_main and not self.tasks_failed:
                            try:
                                record.update(tasks=self.evaluate_tasks())
                            except UserError as e:  # a bad task must not cost the training run
                                self.tasks_failed = True
                                print(f"warning: --eval-tasks failed at step {self.step} and are skipped for the "
                                      f"rest of this run: {e}", file=sys.stderr)
                        best = self.best_val is None or val < self.best_val
                        self.best_val = val if best else self.best_val
                        save = save or save_every is None or self.done()
                    # The step's record goes to metrics.jsonl before its checkpoint: a kill in between must not
                    # leave a snapshot whose step has no record (resume keeps records up to the snapshot's step).
                    if record is not None:
                        history.append(record)
                        self._append_metrics(record)
                    if save:
                        self.save(best=best)
                    # One process stops at once; ranks stop together, on the flag their all-reduce shared.
                    if (self.stopping or (not self.ctx.distributed and self.stop.signum is not None)) and (
                            not self.done()):
                        if self._saved_step != self.step:
                            self.save(best=False)
                        # Leave together: a rank that tears down while rank 0 still writes breaks its connection.
                        dist.barrier(self.ctx)
                        where = self.run_dir / snap.SNAPSHOT_DIR / snap.snapshot_name(self.step)
                        raise TrainingInterrupted(self.stop.signum or signal.SIGTERM, self.step, str(where))
                    if evaluate or save:
                        window_start = time.perf_counter()
                    if bar:
                        bar.update(loss, record)
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

    def _append_metrics(self, record: dict[str, Any]) -> None:
        if not self.ctx.is_main:
            return
        try:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            raise UserError(f"cannot write {self.run_dir / 'metrics.jsonl'} ({e.strerror or e}); the last snapshot "
                            "is intact — free space and resume") from None

    # ---- checkpoints ---------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        rng: dict[str, Any] = {"torch": torch.get_rng_state().tolist()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device).tolist()
        return {"step": self.step, "tokens": self.tokens, "train_seconds": self.train_seconds,
                "best_val": self.best_val, "last_val": self.last_val, "rng": rng,
                "schedule": self.schedule.to_dict(), "data_files": self.data_files, "switch_step": self.switch_step,
                "train_config": self.cfg.to_dict()}

    def save(self, best: bool) -> None:
        """A snapshot in checkpoints/step-N (staged, manifest last, renamed into place), then the latest model.

        Called between optimizer steps only. A failure (disk full, ...) is a one-line UserError and leaves the
        previous snapshot as it was."""
        if not self.schedule.frozen:
            self._freeze(force=True)  # a snapshot always holds the run's length
        state_dicts = [dist.optimizer_state(opt, self.model, self.ctx) for opt in self.optimizers]
        model = dist.full_model(self.raw_model, self.ctx)
        self._saved_step = self.step
        if not self.ctx.is_main:
            return
        snapshots = self.run_dir / snap.SNAPSHOT_DIR
        final = snapshots / snap.snapshot_name(self.step)
        staging = snapshots / f".{final.name}.tmp"
        try:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            self.save_weights(model, staging)
            torch.save(state_dicts, staging / OPTIM_FILE)
            _write_json(staging / STATE_FILE, self._state())
            snap.write_manifest(staging, self.step)
            if final.exists():
                snap.remove(final)  # a snapshot of a lost future (skipped on resume) at the same step
            os.replace(staging, final)
            snap.fsync_dir(snapshots)
            self.save_weights(model, self.run_dir)
            if best:
                self.save_weights(model, self.run_dir / "best")
        except (OSError, RuntimeError, UserError) + _SAVE_ERRORS as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise UserError(f"could not save a checkpoint in {self.run_dir} ({_reason(e, self.run_dir)}); the previous "
                            "checkpoint is intact — free space or choose another --out") from None
        snap.prune(self.run_dir, self.step, self.cfg.keep_last)

    def _load_state(self, snapshot: Path, state: dict[str, Any]) -> None:
        if state["step"] != snap.snapshot_step(snapshot):
            raise UserError(f"{snapshot / STATE_FILE} says step {state['step']}, not the folder's; delete that "
                            "snapshot to resume from an earlier one")
        self.load_weights(snapshot)
        states = snap.load_tensors(snapshot / OPTIM_FILE)
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise UserError(f"{snapshot / OPTIM_FILE} does not hold this run's {len(self.optimizers)} optimizer "
                            "state(s); delete that snapshot to resume from an earlier one")
        for opt, sd in zip(self.optimizers, states, strict=True):
            try:
                dist.load_optimizer_state(opt, sd, self.model, self.ctx)
            except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
                raise UserError(f"{snapshot / OPTIM_FILE} does not fit this run's optimizers ({e}); delete that "
                                "snapshot to resume from an earlier one") from None
        self.step, self.tokens = state["step"], state["tokens"]
        self.train_seconds = float(state["train_seconds"])
        self.best_val, self.last_val = state.get("best_val"), state.get("last_val")
        self.switch_step = state.get("switch_step")
        if self.switch_step is not None:
            self._apply_switch()
        try:
            torch.set_rng_state(torch.tensor(state["rng"]["torch"], dtype=torch.uint8))
            if self.device.type == "cuda" and "cuda" in state["rng"]:
                torch.cuda.set_rng_state(torch.tensor(state["rng"]["cuda"], dtype=torch.uint8), self.device)
        except (RuntimeError, TypeError, ValueError, OverflowError):
            raise UserError(f"{snapshot / STATE_FILE} holds an invalid random-number state; delete that snapshot "
                            "to resume from an earlier one") from None
        if self.ctx.is_main:
            self._trim_metrics()
        self._note(f"resuming {self.run_dir} from {snapshot.name} (step {self.step} of {self.schedule.end})")

    def _trim_metrics(self) -> None:
        """Records after the snapshot belong to the lost part of the run; unreadable lines (a write cut short) go."""
        path = self.run_dir / "metrics.jsonl"
        if not path.exists():
            return
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                step = json.loads(line)["step"]
                if not isinstance(step, int):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                dropped += line.strip() != ""
                continue
            if step <= self.step:
                kept.append(line)
        if dropped:
            self._warn(f"{path}: dropped {dropped} unreadable line(s)")
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def resume_config(run_dir: str | Path, overrides: dict[str, Any], extend: bool = False,
                  config_class: type[TrainConfig] = TrainConfig) -> TrainConfig:
    """The run's saved TrainConfig (or `config_class`, a subclass) with `overrides` applied; contradictions are a
    one-line error.

    The budget (steps, tokens, time) is frozen in the run's schedule: without `extend` a different value is refused
    (with `extend` it is the extra budget, passed to `train` separately, and the saved config keeps the original).
    """
    run_dir = Path(run_dir)
    saved_path = run_dir / RUN_CONFIG
    if not run_dir.is_dir() or not saved_path.is_file():
        raise UserError(f"{run_dir} is not a training run (no {RUN_CONFIG}); "
                        "pass the --out folder of an earlier `decoderlab train`")
    try:
        saved = json.loads(saved_path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
            raise TypeError("not a JSON object")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as e:
        raise UserError(f"{saved_path} is unreadable ({e}); the run cannot be resumed") from None
    kind = saved.get("run_kind", "train")
    if kind != config_class.run_kind:
        raise UserError(f"{run_dir} is a `decoderlab {kind}` run; continue it with decoderlab {kind} --resume "
                        f"{run_dir}")
    for key, value in overrides.items():
        if value is None:
            continue
        if key in config_class.frozen_on_resume and _jsonable(saved.get(key)) != _jsonable(value):
            raise UserError(f"--{key.replace('_', '-')} {value!r} contradicts the run being resumed "
                            f"({saved.get(key)!r}); drop it or start a new run with another --out")
        if key in BUDGET and not extend:
            given = parse_duration(value) if key == "time" else value
            if given != saved.get(key):
                raise UserError(f"--{key} {value} differs from the run's ({saved.get(key)}): a resumed run "
                                "continues its frozen schedule; once it has finished, --extend trains it further "
                                f"by that much more: --resume {run_dir} --extend --{key} N")
    merged = {**saved, **{k: v for k, v in overrides.items() if v is not None and k not in BUDGET},
              "out": str(run_dir)}
    try:
        return config_class.from_dict(merged)
    except (TypeError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"{saved_path} does not describe a valid run ({e})") from None


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def train(cfg: TrainConfig | None = None, resume: bool = False, progress: bool = True, overwrite: bool = False,
          extend: bool | Budget | dict[str, Any] | None = None, allow_data_change: bool = False,
          trainer_class: type[Trainer] | None = None, **overrides: Any) -> TrainResult:
    """Train a model: `decoderlab.train(data=[...], time="90s", out="runs/x")` or with a TrainConfig.

    `resume=True` continues the run in `out` (keyword overrides as at the command line); `extend=True` with
    `steps=`/`tokens=`/`time=` (or a `Budget`) trains a finished run further; `overwrite=True` replaces an earlier
    run in `out`. SIGINT/SIGTERM end the run after the current step with a snapshot (`TrainingInterrupted`).
    `trainer_class` runs another kind of run through the same loop (`decoderlab.finetune`).
    """
    trainer_class = trainer_class or Trainer
    config_class = trainer_class.config_class
    budget = None
    if extend is not None and extend is not False:
        if isinstance(extend, Budget):
            budget = extend
        else:
            given = extend if isinstance(extend, dict) else {k: overrides.get(k) for k in BUDGET}
            budget = Budget(given.get("steps"), given.get("tokens"), parse_duration(given.get("time")))
    if cfg is None:
        if resume:
            if overrides.get("out") is None:
                raise UserError("resume=True needs out= (the run folder to continue)")
            cfg = resume_config(overrides["out"], overrides, extend=budget is not None, config_class=config_class)
        else:
            cfg = config_class(**overrides)
    trainer = trainer_class(cfg, resume=resume, progress=progress, overwrite=overwrite, extend=budget,
                      allow_data_change=allow_data_change)
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


def _save_errors() -> tuple[type[BaseException], ...]:
    try:
        from safetensors import SafetensorError
    except ImportError:  # older safetensors
        return ()
    return (SafetensorError,)


# What writing a checkpoint raises when the disk is full or the folder goes away: OSError from Python, RuntimeError
# from torch.save ("PytorchStreamWriter failed writing file"), SafetensorError, CheckpointError from checkpoint.save.
_SAVE_ERRORS = _save_errors()


def _reason(error: BaseException, folder: Path) -> str:
    """Why a write failed, in words: torch.save reports a full disk only as "[enforce fail ...] unexpected pos"."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    message = (lines[0] if lines else type(error).__name__)[:200]
    if isinstance(error, RuntimeError):
        with contextlib.suppress(OSError):
            if shutil.disk_usage(folder).free < 64 << 20:
                return f"No space left on device ({message})"
        with contextlib.suppress(ImportError, OSError, ValueError):
            import resource

            soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
            if soft != resource.RLIM_INFINITY:
                return f"File too large: the file-size limit (ulimit -f) is {soft:,} bytes ({message})"
    return message


def _write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def _plot_losses(run_dir: Path) -> None:
    """loss.png from metrics.jsonl; a plot that cannot be drawn (unreadable lines, a full disk) is skipped."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = []
    for line in metrics.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("elapsed_s"), int | float) and isinstance(
                    record.get("train_loss"), int | float):
                records.append(record)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["elapsed_s"] for r in records], [r["train_loss"] for r in records], label="train", alpha=0.7)
    evals = [r for r in records if isinstance(r.get("val_loss"), int | float)]
    ax.plot([r["elapsed_s"] for r in evals], [r["val_loss"] for r in evals], "o-", label="val (full split)")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(run_dir.name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = run_dir / ".loss.png.tmp.png"
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, run_dir / "loss.png")
    except OSError as e:
        tmp.unlink(missing_ok=True)
        print(f"warning: could not write {run_dir / 'loss.png'} ({e.strerror or e})", file=sys.stderr)
    finally:
        plt.close(fig)


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
