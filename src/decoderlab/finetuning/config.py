"""`FinetuneConfig`: a `TrainConfig` that starts from a checkpoint and trains on instruction data.

Every training option keeps its meaning (dtype, schedule, exact resume, evaluation, torchrun); the defaults change
to what fine-tuning a trained model wants (AdamW, a small learning rate, cosine decay, one epoch), and the fields
below add the base model, the data's split and loss mask, LoRA, Bitune and the objectives.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from ..errors import UserError
from ..training.config import FROZEN_ON_RESUME, TrainConfig
from .examples import LOSS_ON

# "next": next-token loss on the trained tokens (SFT); "distill": KL to a teacher's distribution (plus, with
# distill_weight < 1, the next-token loss); "taid": TAID's adaptive interpolation between student and teacher;
# "dpo": direct preference optimisation on {"prompt", "chosen", "rejected"} records; "bico": half the steps
# next-token, half masked-LM with the causal mask lifted (`objectives.bico_masked_lm`; the tokenizer needs <mask>);
# "diffusion": adapt a causal model to masked diffusion (`finetuning.diffusion`: shifted logits, the attention
# annealed from causal to full, LLaDA's 1/t-weighted loss; a <mask> token added where the tokenizer has none).
FINETUNE_OBJECTIVES = ("next", "distill", "taid", "dpo", "bico", "diffusion")


@dataclass
class FinetuneConfig(TrainConfig):
    objectives: ClassVar[tuple[str, ...]] = FINETUNE_OBJECTIVES
    run_kind: ClassVar[str] = "finetune"
    frozen_on_resume: ClassVar[tuple[str, ...]] = FROZEN_ON_RESUME + (
        "base", "val_data", "val_fraction", "loss_on", "chat_template", "bitune", "lora_r", "lora_alpha",
        "lora_dropout", "lora_targets", "quantize", "teacher", "distill_temperature", "distill_weight", "dpo_beta",
        "epochs", "anneal_steps")

    # The fine-tuning defaults (fields of TrainConfig given other values).
    optimizer: str = "adamw"
    lr: float | None = None  # None: 1e-4 for the whole model, 1e-3 for LoRA adapters
    batch_size: int = 8
    schedule: str = "cosine"
    warmup: float = 0.03
    lr_floor: float = 0.1
    sample_tokens: int = 0
    out: str = "runs/finetune"

    base: str = ""  # the model folder to start from (Hugging Face folder or a decoderlab run)
    val_data: list[str] | None = None  # JSONL files; None = hold out val_fraction of the training records
    val_fraction: float = 0.05  # of the records, at least 1 and at most 500
    epochs: float | None = None  # budget in passes over the training records (default 1 when no budget given)
    loss_on: str = "response"  # "response": assistant turns / completions only; "all": every token
    chat_template: str | None = None  # a Jinja file (or template text) replacing the tokenizer's chat template
    bitune: bool = False  # each example's prompt attends bidirectionally (causal | prompt block)
    lora_r: int = 0  # 0 = train the whole model; r > 0 = LoRA adapters of rank r, base frozen
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None  # module names or regexes (None = the family's default)
    quantize: str | None = None  # QLoRA-style: "int8" or "int4" weight-only base under the LoRA adapters
    teacher: str | None = None  # distill / taid: the teacher model folder (same vocabulary)
    distill_temperature: float = 1.0
    distill_weight: float = 1.0  # distill: weight of the KL term; 1 - weight goes to the next-token loss
    dpo_beta: float = 0.1
    # diffusion: optimiser steps over which the attention goes from causal to full (None: the first half of the run)
    anneal_steps: int | None = None
    show: int = 3  # held-out examples generated at the end (CLI)

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(msg)

        # Paths may come as Path objects; the config is saved as JSON.
        self.base = str(self.base) if self.base else ""
        self.teacher = None if self.teacher is None else str(self.teacher)
        self.chat_template = None if self.chat_template is None else str(self.chat_template)
        for name in ("data", "val_data"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, [str(value)] if isinstance(value, str | os.PathLike) else [str(v) for v in value])
        if isinstance(self.lora_targets, str):
            self.lora_targets = [t.strip() for t in self.lora_targets.split(",") if t.strip()]
        if self.lr is None:
            self.lr = 1e-3 if self.lora_r else 1e-4
        need(bool(self.base), "fine-tuning needs a base model: a Hugging Face folder or a decoderlab run")
        need(bool(self.data), "fine-tuning needs data: JSONL files of messages, prompt/completion or text records")
        need(self.loss_on in LOSS_ON, f"unknown loss_on {self.loss_on!r}; choose {', '.join(LOSS_ON)}")
        need(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        need(self.epochs is None or self.epochs > 0, f"--epochs must be positive, got {self.epochs}")
        need(self.lora_r >= 0, f"--lora-r must be 0 (whole model) or a positive rank, got {self.lora_r}")
        need(self.lora_alpha > 0 and 0 <= self.lora_dropout < 1, "lora_alpha must be positive and lora_dropout in "
                                                                "[0, 1)")
        need(not (self.bitune and self.loss_on == "all"),
             "--bitune lets the prompt see its own future, so it cannot also be trained on (--loss-on all)")
        need(self.objective not in ("distill", "taid") or bool(self.teacher),
             f"--objective {self.objective} needs --teacher MODEL")
        need(self.teacher is None or self.objective in ("distill", "taid"),
             "--teacher is for --objective distill or taid")
        need(self.distill_temperature > 0 and 0 <= self.distill_weight <= 1,
             "distill_temperature must be positive and distill_weight in [0, 1]")
        need(self.dpo_beta > 0, f"dpo_beta must be positive, got {self.dpo_beta}")
        need(not (self.objective == "dpo" and self.bitune), "--bitune applies to SFT and distillation, not DPO")
        need(not (self.objective == "bico" and self.bitune), "--objective bico has its own bidirectional steps; "
                                                            "drop --bitune")
        need(self.quantize in (None, "int8", "int4"), f"--quantize is int8 or int4, got {self.quantize!r}")
        need(not self.quantize or bool(self.lora_r), "--quantize freezes the base in int8/int4: train LoRA "
                                                     "adapters on it (--lora-r 8)")
        need(not (self.fsdp and self.lora_r), "LoRA with FSDP is not supported; use DDP (--ddp)")
        need(self.anneal_steps is None or isinstance(self.anneal_steps, int) and not isinstance(
            self.anneal_steps, bool) and self.anneal_steps >= 1,
             f"--anneal-steps must be a whole number of steps, at least 1, got {self.anneal_steps!r}")
        need(self.anneal_steps is None or self.objective == "diffusion",
             "--anneal-steps is for --objective diffusion (the attention annealed from causal to full)")
        need(not (self.objective == "diffusion" and (self.lora_r or self.bitune)),
             "--objective diffusion trains the whole model with its own attention schedule; drop --lora-r / --bitune")
        need(self.show >= 0, f"--show must be 0 or more, got {self.show}")
        super().__post_init__()

    def _default_budget(self) -> None:
        if self.epochs is None:
            self.epochs = 1.0
