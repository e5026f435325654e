"""The fine-tuning run: the training loop of `decoderlab.training` started from a checkpoint, on packed examples.

`FinetuneTrainer` overrides only what differs from training from scratch: where the model and tokenizer come from
(the base folder, optionally with LoRA adapters), the batches (packed examples with response-only targets), the
loss (next-token, distillation, TAID, DPO, BICO's masked-LM steps; Bitune's mask) and the validation loss (on
held-out responses). The schedule, bf16 autocast, exact resume, metrics, loss plot and torchrun come from `Trainer`
unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from .. import masks
from ..checkpoint import load as load_model
from ..checkpoint import read_config
from ..data import describe_change, input_files, input_stats
from ..errors import UserError
from ..masked import Noised, masked_loss
from ..model import Transformer
from ..tokenizer import Tokenizer
from ..training import Trainer, TrainResult
from ..training.resources import check_memory
from ..vocab import MaskToken, ensure_mask_token, fit_token_row
from . import bitune
from . import diffusion as adapt
from .config import FinetuneConfig
from .examples import Example, PreferencePair, read_examples
from .objectives import (
    MASK_TOKEN,
    TAIDState,
    bico_mask,
    bico_masked_lm,
    dpo_loss,
    kl_to_teacher,
    next_token_loss,
    sequence_logprobs,
)
from .packing import RowPlan, SFTBatch, build_batch

MAX_VAL_RECORDS = 500
EVAL_ROWS = 16  # rows per evaluation forward
# diffusion: noise draws per held-out row (stratified t), so that the held-out loss is a steady estimate
DIFFUSION_EVAL_DRAWS = 4


@dataclass
class FinetuneResult(TrainResult):
    val_loss_before: float | None = None  # the held-out loss of the base model, before any step
    held_out: list = field(default_factory=list)  # the held-out examples (or preference pairs), rendered


@dataclass
class PairBatch(SFTBatch):
    """Rows 0..B-1 hold the chosen answers, B..2B-1 the rejected ones; `pairs` [B] the pairs' indices."""

    pairs: torch.Tensor | None = None


class PairPlan:
    """The stream of preference pairs over epochs (a permutation per epoch from (seed, e)); one row per answer."""

    def __init__(self, pairs: list[PreferencePair], context_length: int, seed: int) -> None:
        self.pairs, self.context_length, self.seed = pairs, context_length, seed
        self.rows_per_epoch = len(pairs)
        self._orders: dict[int, np.ndarray] = {}

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            self._orders = {epoch: np.random.default_rng((self.seed, epoch)).permutation(len(self.pairs))}
        return self._orders[epoch]

    def batch(self, step: int, batch_size: int, pad_id: int = 0) -> PairBatch:
        n = len(self.pairs)
        index = [int(self._order(g // n)[g % n]) for g in range(step * batch_size, (step + 1) * batch_size)]
        return pair_batch(self.pairs, index, self.context_length, pad_id)


def pair_batch(pairs: list[PreferencePair], index: list[int], context_length: int, pad_id: int = 0) -> PairBatch:
    examples = [pairs[i].chosen for i in index] + [pairs[i].rejected for i in index]
    b = build_batch(examples, [[i] for i in range(len(examples))], context_length, pad_id)
    return PairBatch(b.inputs, b.targets, b.doc_ids, b.positions, b.prompt, torch.tensor(index))


@dataclass
class FinetuneData:
    tokenizer: Tokenizer
    train: RowPlan | PairPlan
    val: list[Example] | list[PreferencePair]
    row_length: int
    val_rows: list[list[int]] = field(default_factory=list)  # the held-out examples packed in file order (SFT)


class FinetuneTrainer(Trainer):
    """A fine-tuning run (see the module doc); `cfg` is a `FinetuneConfig`."""

    config_class: ClassVar[type] = FinetuneConfig
    plans_budget: ClassVar[bool] = False  # the checkpoint gives the shape
    cfg: FinetuneConfig
    data: FinetuneData

    def __init__(self, cfg: FinetuneConfig, **kwargs: Any) -> None:
        if not isinstance(cfg, FinetuneConfig):
            raise TypeError("FinetuneTrainer needs a FinetuneConfig")
        self.teacher: Transformer | None = None
        self.taid = TAIDState() if cfg.objective == "taid" else None
        self.reference: torch.Tensor | None = None  # DPO: [pairs, 2] reference log-probs (train, then val)
        self.val_before: float | None = None
        self.mask_token: MaskToken | None = None  # diffusion: the tokenizer's mask token
        self.base_bidirectional = False  # diffusion: the base is an adapted model already past annealing
        self._step_noise: tuple[int, adapt.PackedNoise, Any] | None = None
        super().__init__(cfg, **kwargs)

    # ---- data and model -------------------------------------------------------------------------

    def _check_memory_early(self) -> None:
        base = read_config(self.cfg.base)  # a missing or unreadable base fails before anything is written
        if self.cfg.objective == "diffusion":
            adapt.check_base(base, self.cfg.base)
            self.base_bidirectional = base.objective == "diffusion" and base.bidirectional

    def _load_tokenizer(self, snapshot: Path | None) -> Tokenizer:
        """The run's tokenizer: the snapshot's on resume, else the base's (with --chat-template, and for diffusion a
        mask token, added before any example is encoded)."""
        cfg = self.cfg
        tokenizer = Tokenizer.from_folder(snapshot if snapshot is not None else cfg.base)
        if cfg.chat_template is not None and snapshot is None:
            tokenizer.chat_template = _chat_template(cfg.chat_template)
        if cfg.objective == "diffusion":
            self.mask_token = ensure_mask_token(tokenizer)
        return tokenizer

    def _prepare_data(self, snapshot: Path | None, state: dict[str, Any] | None,
                      allow_change: bool) -> tuple[FinetuneData, list[list[Any]]]:
        cfg = self.cfg
        files = input_stats(list(cfg.data) + list(cfg.val_data or []))
        if state is not None:
            try:
                change = describe_change(state.get("data_files"), files)
            except (TypeError, ValueError):
                change = "the snapshot does not record its input files"
            if change is not None and not allow_change:
                raise UserError(f"the fine-tuning data changed since {snapshot.name} was saved ({change}); resuming "
                                "would not reproduce the run — restore the files, or pass --allow-data-change")
        tokenizer = self._load_tokenizer(snapshot)
        preference = cfg.objective == "dpo"
        train = read_examples(_jsonl_files(cfg.data), tokenizer, cfg.loss_on, preference)
        if cfg.val_data:
            val = read_examples(_jsonl_files(cfg.val_data), tokenizer, cfg.loss_on, preference)
        else:
            if len(train) < 2:
                raise UserError("fine-tuning needs at least 2 records (one is held out for validation), or --val")
            n_val = min(MAX_VAL_RECORDS, max(1, round(cfg.val_fraction * len(train))))
            order = np.random.default_rng((cfg.seed, 7)).permutation(len(train))
            held = set(order[:n_val].tolist())
            val = [r for i, r in enumerate(train) if i in held]
            train = [r for i, r in enumerate(train) if i not in held]
        base_context = read_config(cfg.base).context_length
        wanted = cfg.context_length or base_context
        if wanted > base_context:
            raise UserError(f"--context {wanted} is longer than the base model's context ({base_context})")
        train, val, row_length = _fit(train, val, wanted, preference, self._warn)
        plan: RowPlan | PairPlan
        if preference:
            return FinetuneData(tokenizer, PairPlan(train, row_length, cfg.seed), val, row_length), files
        plan = RowPlan(train, row_length, cfg.seed, packed=cfg.packed)
        val_rows = RowPlan(val, row_length, cfg.seed, packed=cfg.packed, shuffle=False).all_rows()
        return FinetuneData(tokenizer, plan, val, row_length, val_rows), files

    def _build_model(self) -> Transformer:
        cfg = self.cfg
        model = load_model(cfg.base, device=self.device, dtype=torch.float32, pack=False,
                           quantize=cfg.quantize).train()
        if not cfg.lora_r:
            check_memory(cfg, model.config.replace(context_length=self.data.row_length), self.device,
                         self.ctx.world_size)
        torch.manual_seed(cfg.seed)
        if cfg.lora_r:
            from ..lora import LoraConfig, apply_lora

            apply_lora(model, LoraConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                                         target_modules=cfg.lora_targets))
        if cfg.teacher is not None:
            self.teacher = self._load_teacher(model)
        if cfg.objective == "dpo":
            self.reference = self._reference_logprobs(model)
        if cfg.objective == "diffusion":
            mask = self.mask_token
            if model.config.mask_token_id not in (None, mask.id):
                raise UserError(f"{cfg.base} records mask_token_id {model.config.mask_token_id} but its tokenizer's "
                                f"mask token is id {mask.id}; the model folder's tokenizer must be its own")
            fit_token_row(model, mask.id, fresh=mask.added)
            model.config = model.config.replace(objective="diffusion", shift_logits=True, mask_token_id=mask.id,
                                                bidirectional=self.base_bidirectional)
        return model

    # ---- diffusion: the annealing schedule ---------------------------------------------------------

    def anneal_steps(self) -> int | None:
        """Steps from causal to full attention: --anneal-steps, else the first half of the run (None while a
        --time run's length is still unknown: attention stays causal until then)."""
        if self.cfg.anneal_steps is not None:
            return self.cfg.anneal_steps
        if not self.schedule.frozen:
            return None
        return max(1, self.schedule.segments[0].end // 2)

    def anneal_progress(self, step: int) -> float:
        """The attention's progress from causal (0) to full (1) at optimiser step `step`."""
        if self.base_bidirectional:
            return 1.0
        steps = self.anneal_steps()
        return 0.0 if steps is None else adapt.anneal_progress(step, steps)

    def _load_teacher(self, student: Transformer) -> Transformer:
        cfg = self.cfg
        teacher = load_model(cfg.teacher, device=self.device, dtype=torch.float32, pack=False).eval()
        teacher.requires_grad_(False)
        try:
            same = Tokenizer.from_folder(cfg.teacher).backend.get_vocab() == self.tokenizer.backend.get_vocab()
        except UserError:
            same = False
        if not same:
            raise UserError(f"the teacher {cfg.teacher} does not share the student's vocabulary (tokenizer); "
                            "distillation compares their distributions token by token")
        return teacher

    @torch.inference_mode()
    def _reference_logprobs(self, model: Transformer) -> torch.Tensor:
        """DPO's reference: the starting model's sequence log-probs of every pair (train, then val), computed once
        (the same at every resume, since the starting model is the base), so no second model is kept."""
        pairs = list(self.data.train.pairs) + list(self.data.val)
        out = []
        model.eval()
        for first in range(0, len(pairs), EVAL_ROWS // 2):
            index = list(range(first, min(first + EVAL_ROWS // 2, len(pairs))))
            batch = pair_batch(pairs, index, self.data.row_length, self._pad_id)
            with self.autocast:
                logps = self._logprobs(model, batch, slice(None))
            n = len(index)
            out.append(torch.stack([logps[:n], logps[n:]], dim=1).float())
        model.train()
        return torch.cat(out)

    @property
    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_id
        return pad if pad is not None else (self.tokenizer.eos_id or 0)

    @property
    def tokens_per_step(self) -> int:
        rows = self.cfg.batch_size * (2 if self.cfg.objective == "dpo" else 1)
        return rows * self.data.row_length

    def _step_limit(self) -> int | None:
        limit = super()._step_limit()
        if self.cfg.epochs is not None:
            steps = max(1, math.ceil(self.cfg.epochs * self.data.train.rows_per_epoch / self.cfg.batch_size))
            limit = steps if limit is None else min(limit, steps)
        return limit

    def _batch(self) -> SFTBatch:
        return self.data.train.batch(self.step, self.cfg.batch_size, self._pad_id)

    # ---- weights ---------------------------------------------------------------------------------

    def save_weights(self, model: Transformer, folder: Path) -> None:
        if self.cfg.objective == "diffusion":
            # Bidirectional by default once annealing is complete; mid-annealing the model keeps causal attention
            # as its default (closest to what it has been trained with).
            model.config = model.config.replace(bidirectional=self.anneal_progress(self.step) >= 1)
        if not self.cfg.lora_r:
            return super().save_weights(model, folder)
        from ..lora import save_adapter

        save_adapter(model, folder, base_model_name_or_path=str(Path(self.cfg.base).resolve()))
        self.tokenizer.save(folder)

    def load_weights(self, snapshot: Path) -> None:
        if not self.cfg.lora_r:
            return super().load_weights(snapshot)
        from safetensors.torch import load_file

        from ..lora import ADAPTER_WEIGHTS, KEY_PREFIX, lora_layers

        # Into the adapters the optimizer holds (load_adapter would attach new ones).
        tensors = load_file(str(snapshot / ADAPTER_WEIGHTS))
        with torch.no_grad():
            for layer in lora_layers(self.raw_model).values():
                for adapter in layer.lora_adapters:
                    for part, param in (("A", adapter.A), ("B", adapter.B)):
                        key = f"{KEY_PREFIX}{adapter.name}.lora_{part}.weight"
                        if key not in tensors or tensors[key].shape != param.shape:
                            raise UserError(f"{snapshot / ADAPTER_WEIGHTS} does not hold this run's {key}; delete "
                                            "that snapshot to resume from an earlier one")
                        param.copy_(tensors[key])

    # ---- losses ----------------------------------------------------------------------------------

    def _layout(self, batch: SFTBatch, rows) -> tuple[torch.Tensor, masks.Mask]:
        """Positions and mask of some rows: examples kept apart; Bitune's prompt block where asked."""
        doc = batch.doc_ids[rows].to(self.device)
        positions = batch.positions[rows].to(self.device)
        if self.cfg.bitune:
            return positions, bitune.training_mask(doc, batch.prompt[rows].to(self.device))
        return positions, masks.causal() & masks.document(doc)

    def _logprobs(self, model, batch: PairBatch, pairs) -> torch.Tensor:
        """[2n] sequence log-probs of the chosen then the rejected answers of pairs `pairs` of the batch."""
        B = batch.inputs.shape[0] // 2
        index = torch.arange(B)[pairs]
        rows = torch.cat([index, index + B])
        positions, mask = self._layout(batch, rows)
        y = batch.targets[rows].to(self.device)
        keep = y != -100
        logits = model(batch.inputs[rows].to(self.device), positions=positions, mask=mask, logits_to_keep=keep)
        return sequence_logprobs(logits, y[keep], keep.nonzero()[:, 0], len(rows))

    def loss(self, batch: SFTBatch, rows) -> torch.Tensor:
        cfg = self.cfg
        if cfg.objective == "dpo":
            logps = self._logprobs(self.forward, batch, rows)
            n = logps.shape[0] // 2
            ref = self.reference[batch.pairs[rows]].to(self.device)
            return dpo_loss(logps[:n], logps[n:], ref[:, 0], ref[:, 1], cfg.dpo_beta)[0]
        if cfg.objective == "diffusion":
            return self._diffusion_loss(batch, rows)
        if cfg.objective == "bico":
            mask_id = self.tokenizer.token_to_id(MASK_TOKEN)
            if mask_id is None:
                raise UserError(f"--objective bico needs a tokenizer with a {MASK_TOKEN} special token (its masked-LM "
                                "steps replace tokens by it); add one, or use --objective next")
            if bico_masked_lm(self.step, cfg.seed):
                # BICO's masked-LM half: the same rows, 15 % of the trained tokens masked, each example attending
                # to all of itself (the document mask without causal()), loss on the masked tokens at their own
                # positions.
                mlm = bico_mask(batch.inputs, batch.targets, batch.doc_ids, self.step, cfg.seed, mask_id)
                masked = mlm.masked[rows].to(self.device)
                logits = self.forward(mlm.inputs[rows].to(self.device), positions=batch.positions[rows].to(self.device),
                                      mask=masks.document(batch.doc_ids[rows].to(self.device)), logits_to_keep=masked)
                return next_token_loss(logits, mlm.targets[rows].to(self.device)[masked])
        x = batch.inputs[rows].to(self.device)
        y = batch.targets[rows].to(self.device)
        positions, mask = self._layout(batch, rows)
        # The LM head (and its softmax) only where a token is trained: prompts, padding and boundaries skip it.
        keep = y != -100
        logits = self.forward(x, positions=positions, mask=mask, logits_to_keep=keep)
        y = y[keep]
        if cfg.objective in ("next", "bico"):
            return next_token_loss(logits, y)
        with torch.no_grad():
            teacher_mask = masks.causal() & masks.document(batch.doc_ids[rows].to(self.device))
            teacher_logits = self.teacher(x, positions=positions, mask=teacher_mask, logits_to_keep=keep)
        V = min(logits.shape[-1], teacher_logits.shape[-1], self.tokenizer.vocab_size)
        student, teacher = logits[..., :V], teacher_logits[..., :V]
        if cfg.objective == "taid":
            return kl_to_teacher(student, self.taid.target(student, teacher), y)
        kl = kl_to_teacher(student, teacher, y, cfg.distill_temperature)
        if cfg.distill_weight == 1:
            return kl
        return cfg.distill_weight * kl + (1 - cfg.distill_weight) * next_token_loss(logits, y)

    def _diffusion_loss(self, batch: SFTBatch, rows) -> torch.Tensor:
        """LLaDA's loss on some rows of this step's noised batch, under this step's annealed attention."""
        cfg, progress = self.cfg, self.anneal_progress(self.step)
        if self._step_noise is None or self._step_noise[0] != self.step:  # drawn once per step, for every row
            noised = adapt.step_noise(batch.inputs, batch.targets, batch.doc_ids, self.mask_token.id, cfg.seed,
                                      self.step)
            mask = adapt.attention(batch.doc_ids, progress, cfg.seed, self.step)
            self._step_noise = (self.step, noised, mask)
        _, noised, mask = self._step_noise
        part = noised.rows(rows)
        if isinstance(mask, torch.Tensor):  # mid-annealing: the rows of the batch's drawn mask
            mask = mask[rows].to(self.device)
        else:  # causal & document, or document alone: the mask algebra's fast paths
            mask = adapt.attention(batch.doc_ids[rows].to(self.device), progress, cfg.seed, self.step)
        keep = part.trained.to(self.device)
        logits = self.forward(part.inputs.to(self.device), positions=batch.positions[rows].to(self.device), mask=mask,
                              logits_to_keep=keep)
        return masked_loss(logits, _on(part, self.device), shift=False)

    def train_step(self) -> float:
        loss = super().train_step()
        if self.taid is not None:
            self.taid.update(loss, self.progress_fraction())
        return loss

    @torch.inference_mode()
    def evaluate(self) -> tuple[float, float]:
        """(held-out loss, NaN): mean next-token loss on the held-out responses (DPO: mean DPO loss)."""
        model, cfg = self.raw_model, self.cfg
        model.eval()
        try:
            if cfg.objective == "dpo":
                n_train = len(self.data.train.pairs)
                total, count = 0.0, 0
                for first in range(0, len(self.data.val), EVAL_ROWS // 2):
                    index = list(range(first, min(first + EVAL_ROWS // 2, len(self.data.val))))
                    batch = pair_batch(self.data.val, index, self.data.row_length, self._pad_id)
                    with self.autocast:
                        logps = self._logprobs(model, batch, slice(None))
                    n = len(index)
                    ref = self.reference[[n_train + i for i in index]].to(self.device)
                    loss = dpo_loss(logps[:n], logps[n:], ref[:, 0], ref[:, 1], cfg.dpo_beta)[0]
                    total, count = total + float(loss) * n, count + n
                return total / max(1, count), math.nan
            if cfg.objective == "diffusion":
                return self._diffusion_val_loss(model), math.nan
            rows = self.data.val_rows
            total_t = torch.zeros((), dtype=torch.float64)
            count_t = torch.zeros((), dtype=torch.float64)
            for first in range(0, len(rows), EVAL_ROWS):
                batch = build_batch(self.data.val, rows[first:first + EVAL_ROWS], self.data.row_length, self._pad_id)
                positions, mask = self._layout(batch, slice(None))
                y = batch.targets.to(self.device)
                keep = y != -100
                with self.autocast:
                    logits = model(batch.inputs.to(self.device), positions=positions, mask=mask, logits_to_keep=keep)
                y = y[keep]
                n = keep.sum()
                total_t += float(next_token_loss(logits, y)) * float(n)
                count_t += float(n)
            return float(total_t / count_t.clamp(min=1)), math.nan
        finally:
            model.train()

    def _diffusion_val_loss(self, model: Transformer) -> float:
        """LLaDA's loss per trainable held-out token, under the attention of the current annealing progress, with
        the same noise at every evaluation (stratified t, `DIFFUSION_EVAL_DRAWS` draws per row)."""
        cfg, rows, progress = self.cfg, self.data.val_rows, self.anneal_progress(self.step)
        total = torch.zeros((), dtype=torch.float64)
        count = 0
        draws = DIFFUSION_EVAL_DRAWS
        for index, first in enumerate(range(0, len(rows), EVAL_ROWS)):
            batch = build_batch(self.data.val, rows[first:first + EVAL_ROWS], self.data.row_length, self._pad_id)
            B = batch.inputs.shape[0]
            offsets = torch.rand(B, generator=adapt.generator(cfg.seed, index, 2))
            mask = adapt.attention(batch.doc_ids.to(self.device), progress, cfg.seed, index, part=3)
            for s in range(draws):
                noised = adapt.noise_examples(batch.inputs, batch.targets, batch.doc_ids, self.mask_token.id,
                                              adapt.generator(cfg.seed, index, 4 + s), t=(s + offsets) / draws)
                with self.autocast:
                    logits = model(noised.inputs.to(self.device), positions=batch.positions.to(self.device),
                                   mask=mask, logits_to_keep=noised.trained.to(self.device))
                total += float(masked_loss(logits, _on(noised, self.device), shift=False)) * float(noised.count)
            count += int(noised.count)
        return float(total / max(1, count * draws))

    # ---- state -----------------------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        state = super()._state()
        if self.taid is not None:
            state["taid"] = self.taid.to_dict()
        return state

    def _load_state(self, snapshot: Path, state: dict[str, Any]) -> None:
        super()._load_state(snapshot, state)
        if self.taid is not None and isinstance(state.get("taid"), dict):
            self.taid = TAIDState(**state["taid"])

    def run(self) -> FinetuneResult:
        if self.step == 0:
            self.val_before = self.evaluate()[0]
            self._note(f"held-out loss of the base model before fine-tuning: {self.val_before:.4f}")
            if self.ctx.is_main:
                self._append_metrics({"step": 0, "tokens": 0, "elapsed_s": 0.0,
                                      "val_loss": round(self.val_before, 5)})
        result = super().run()
        return FinetuneResult(**vars(result), val_loss_before=self.val_before, held_out=list(self.data.val))


def _on(noised: Noised, device: torch.device) -> Noised:
    """A noised batch's tensors on `device`."""
    return Noised(noised.inputs.to(device), noised.targets.to(device), noised.weights.to(device),
                  noised.count.to(device))


def _chat_template(value: str) -> str:
    """A chat template given as Jinja text (it holds "{{" or "{%") or as the path of a file holding one."""
    if "{{" in value or "{%" in value:
        return value
    try:
        return Path(value).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read the chat template file {value} ({getattr(e, 'strerror', None) or e}); give "
                        "a Jinja file or the template text") from None


def _jsonl_files(inputs: list[str]) -> list[Path]:
    """The files named (folders and globs expanded as for training data); all must be JSONL."""
    files = input_files(inputs)
    other = [f for f in files if f.suffix.lower() != ".jsonl"]
    if other:
        raise UserError(f"{other[0]} is not a .jsonl file; fine-tuning data is JSONL (one record per line)")
    return files


def _fit(train: list, val: list, wanted: int, preference: bool, warn) -> tuple[list, list, int]:
    """Examples cut to the row length (the longest example's, at most `wanted` slots); those left without a trained
    token are dropped. Returns (train, val, row_length)."""

    def examples(items):
        for item in items:
            yield from ((item.chosen, item.rejected) if preference else (item,))

    longest = max(len(e) for e in examples(train + val))
    row_length = max(1, min(wanted, longest - 1))
    cut = sum(len(e) > row_length + 1 for e in examples(train + val))

    def fits(item) -> bool:
        return all(e.trained[:row_length + 1].any() for e in ((item.chosen, item.rejected) if preference
                                                                else (item,)))

    def shorten(item):
        if preference:
            return PreferencePair(item.chosen.truncated(row_length + 1), item.rejected.truncated(row_length + 1))
        return item.truncated(row_length + 1)

    kept_train = [shorten(i) for i in train if fits(i)]
    kept_val = [shorten(i) for i in val if fits(i)]
    dropped = len(train) + len(val) - len(kept_train) - len(kept_val)
    if cut:
        warn(f"{cut} example(s) are longer than the context ({row_length + 1} tokens) and were cut"
             + (f"; {dropped} lost every trained token and were dropped" if dropped else ""))
    if not kept_train or not kept_val:
        raise UserError("no example keeps a trained token within the context; raise --context or shorten prompts")
    return kept_train, kept_val, row_length


def finetune(base: str | None = None, data: str | list[str] | None = None, cfg: FinetuneConfig | None = None,
             resume: bool = False, progress: bool = True, overwrite: bool = False, extend: Any = None,
             allow_data_change: bool = False, **overrides: Any) -> FinetuneResult:
    """Fine-tune a model: `decoderlab.finetune("runs/base", data="sft.jsonl", out="runs/sft", epochs=2)`.

    Keyword arguments are `FinetuneConfig` fields (`lora_r=8`, `bitune=True`, `objective="dpo"`, ...); `resume=True`
    continues the run in `out`, exactly. The result's `val_loss_before` is the base model's held-out loss.
    """
    from ..training.loop import train

    if base is not None:
        overrides["base"] = base
    if data is not None:
        overrides["data"] = [data] if isinstance(data, str) else list(data)
    return train(cfg, resume=resume, progress=progress, overwrite=overwrite, extend=extend,
                 allow_data_change=allow_data_change, trainer_class=FinetuneTrainer, **overrides)


@dataclass
class ResponseScore:
    """Greedy completions of held-out examples: each (prompt, reference, generated) text and whether the generated
    tokens are exactly the reference's (its end-of-turn or end-of-text token included)."""

    prompts: list[str]
    references: list[str]
    generated: list[str]
    exact: list[bool]

    @property
    def exact_match(self) -> float:
        return sum(self.exact) / max(1, len(self.exact))


def score_responses(model: Transformer, tokenizer: Tokenizer, examples: list[Example], bitune: bool = False,
                    batch_size: int = 16) -> ResponseScore:
    """Generate each example's response greedily from its prompt (`bitune`: the prompt prefilled bidirectionally)
    and compare it with the reference, token for token. Examples without a prompt (text records) are skipped."""
    from ..generation import generate
    from ..generation.engine import resolve_stop_tokens

    chosen = [e for e in examples if e.prompt_length > 0 and e.trained[e.prompt_length:].any()]
    stops = resolve_stop_tokens(model, tokenizer)
    score = ResponseScore([], [], [], [])
    decoder = bitune.BidirectionalPromptDecoder if bitune else None
    for first in range(0, len(chosen), batch_size):
        group = chosen[first:first + batch_size]
        prompts = [e.ids[:e.prompt_length].tolist() for e in group]
        references = [e.ids[e.prompt_length:].tolist() for e in group]
        out = generate(model, prompts, max_new_tokens=max(len(r) for r in references), stop_tokens=[],
                       decoder=decoder)
        for prompt, reference, tokens in zip(prompts, references, out.tokens, strict=True):
            tokens = tokens[:len(reference)]
            # Shown up to the first end id (what generation would return); compared token for token.
            end = next((i + 1 for i, t in enumerate(tokens) if t in stops), len(tokens))
            score.prompts.append(tokenizer.decode(prompt))
            score.references.append(tokenizer.decode(reference))
            score.generated.append(tokenizer.decode(tokens[:end]))
            score.exact.append(tokens == reference)
    return score
