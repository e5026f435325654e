"""`TrainConfig`: everything a training run needs to know, validated, saved with the run.

Defaults are our best recipe for a small model on a CPU (Muon, RoPE, ReLU², QK-norm, warmup-stable-
decay); `resolve_model_config` picks the model shape from a preset or the recipe, then overrides.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..config import ModelConfig
from ..errors import UserError

OPTIMIZERS = ("muon", "adamw")
SCHEDULES = ("wsd", "cosine", "constant")
OBJECTIVES = ("next", "mtp", "prefix", "mlm", "diffusion")
# Objectives trained on tokens replaced by a mask token, with the causal mask lifted (decoderlab.masked).
MASKED_OBJECTIVES = ("mlm", "diffusion")
DTYPES = ("auto", "bf16", "fp32")
# Changing these on --resume would make the run a different run.
FROZEN_ON_RESUME = ("data", "tokenizer", "vocab_size", "preset", "model", "seed", "objective", "n_future",
                    "switch_to", "switch_at", "batch_size", "context_length", "optimizer", "lr", "muon_lr", "embed_lr",
                    "head_lr", "betas", "weight_decay", "schedule", "warmup", "decay", "lr_floor", "packed", "fsdp")
# The run's budget: frozen in its schedule; on resume only `--extend` takes new values (for the extra training).
BUDGET = ("steps", "tokens", "time")


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds from "90s", "3m", "1h30m", "1.5h" or a bare number of seconds."""
    if text is None or isinstance(text, int | float):
        return None if text is None else float(text)
    s = str(text).strip().lower()
    if re.fullmatch(r"\d+(\.\d+)?", s):
        return float(s)
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*(h|m|s)", s)
    if not parts or "".join(f"{n}{u}" for n, u in parts) != s.replace(" ", ""):
        raise UserError(f"cannot read duration {text!r}; write it like 90s, 3m, 1h30m")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


@dataclass
class TrainConfig:
    # Subclasses (fine-tuning) extend these; class attributes, not fields.
    objectives: ClassVar[tuple[str, ...]] = OBJECTIVES
    frozen_on_resume: ClassVar[tuple[str, ...]] = FROZEN_ON_RESUME
    # Recorded in train_config.json, so that a run is resumed by the command that started it.
    run_kind: ClassVar[str] = "train"

    # Data: files, folders or globs; None = the built-in default corpus (the Python standard library).
    data: list[str] | None = None
    tokenizer: str = "char"  # "char", "bpe", or a folder / tokenizer.json to reuse
    vocab_size: int = 4096  # BPE only
    out: str = "runs/latest"
    # Model: a preset name (None = our recipe for the data), then field overrides.
    preset: str | None = None
    model: dict[str, Any] = field(default_factory=dict)
    context_length: int | None = None
    # Optimisation.
    optimizer: str = "muon"
    lr: float = 0.01  # AdamW's lr for embeddings/head/norms (and everything, with --optimizer adamw)
    muon_lr: float = 0.03
    # AdamW's lr for the token embedding and for the LM head (untied). None: a fresh Muon run takes the recipe's
    # EMBED_LR_FACTOR and HEAD_LR_FACTOR times `lr` (recorded in train_config.json); otherwise `lr`.
    embed_lr: float | None = None
    head_lr: float | None = None
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float | None = 1.0
    batch_size: int | None = None  # global rows per optimiser step, split over ranks and accumulation (None: the
    # budget's plan, training/budget.py)
    grad_accum: int = 1
    schedule: str = "wsd"
    warmup: float = 0.02  # fraction of the run
    decay: float = 0.5  # wsd: fraction of the run spent decaying
    lr_floor: float = 0.05
    dtype: str = "auto"  # bf16 autocast where the device runs bf16 natively, else fp32 (resolved at start)
    compile: bool | None = None  # None: the budget's plan (torch.compile where its start-up is repaid)
    objective: str = "next"
    n_future: int = 0  # mtp: extra future-token heads (predicting t+2 ..)
    mtp_weight: float = 0.5  # mtp: weight of the first extra head; halves for each further head
    prefix_max: float = 0.5  # prefix: prefix length drawn uniformly up to this fraction of the context
    # A two-phase run (e.g. CLM -> MLM): `objective` until `switch_at` (a fraction of the run's steps), then
    # `switch_to` (mlm or diffusion), the model then predicting each masked token from the slot before it.
    switch_to: str | None = None
    switch_at: float = 0.5
    packed: bool = True
    # When to stop (the first reached); with none given, `time` defaults to 2 minutes.
    steps: int | None = None
    tokens: int | None = None
    time: float | None = None
    # Bookkeeping.
    eval_interval: int | None = None  # steps; None = about 10 evaluations per run
    eval_batches: int | None = None  # None = the whole validation split
    eval_tasks: list[str] | None = None  # lm-eval tasks (names, YAML files, folders) run at every evaluation
    eval_limit: int | None = 200  # documents per task at each evaluation; None = all
    log_interval: int = 10
    save_interval: int | None = None  # steps; None = at every evaluation
    keep_last: int = 2
    seed: int = 1337
    device: str = "auto"
    fsdp: bool = False
    sample_tokens: int = 200
    sample_prompt: str | None = None  # None: "def " on the default (Python) corpus, else a newline

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise UserError(msg)

        self.time = parse_duration(self.time)
        need(self.optimizer in OPTIMIZERS, f"unknown optimizer {self.optimizer!r}; choose {', '.join(OPTIMIZERS)}")
        need(self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose {', '.join(SCHEDULES)}")
        need(self.objective in self.objectives,
             f"unknown objective {self.objective!r}; choose {', '.join(self.objectives)}")
        need(self.dtype in DTYPES, f"unknown dtype {self.dtype!r}; choose {', '.join(DTYPES)}")
        need((self.batch_size is None or self.batch_size >= 1) and self.grad_accum >= 1,
             "batch_size and grad_accum must be at least 1")
        need(self.batch_size is None or self.batch_size % self.grad_accum == 0,
             f"batch_size {self.batch_size} must be divisible by grad_accum {self.grad_accum}")
        need(self.lr > 0 and self.muon_lr > 0 and all(v is None or v > 0 for v in (self.embed_lr, self.head_lr)),
             "learning rates must be positive")
        for name in ("steps", "tokens", "eval_interval", "save_interval", "eval_batches", "context_length",
                     "eval_limit"):
            value = getattr(self, name)
            flag = "context" if name == "context_length" else name.replace("_", "-")
            need(value is None or value >= 1, f"--{flag} must be at least 1, got {value}")
        need(self.keep_last >= 1, f"--keep-last must be at least 1 (snapshots kept to resume from), got "
                                  f"{self.keep_last}")
        need(self.log_interval >= 1, f"--log-interval must be at least 1, got {self.log_interval}")
        need(self.sample_tokens >= 0, f"--sample-tokens must be 0 or more, got {self.sample_tokens}")
        need(0 <= self.lr_floor <= 1, f"lr_floor is a fraction of the peak LR in [0, 1], got {self.lr_floor}")
        need(self.grad_clip is None or self.grad_clip > 0, f"grad_clip must be positive or None, got {self.grad_clip}")
        need(self.time is None or self.time > 0, "--time must be positive")
        need(0 <= self.warmup < 1 and 0 <= self.decay <= 1, "warmup and decay are fractions of the run in [0, 1)")
        need(not (self.fsdp and self.optimizer == "muon"),
             "Muon needs whole matrices, which FSDP shards; use --optimizer adamw with --fsdp (or DDP)")
        need(self.objective != "mtp" or self.n_future >= 1, "--objective mtp needs --n-future 1 or more")
        need(self.switch_to is None or self.switch_to in MASKED_OBJECTIVES,
             f"--switch-to must be one of {', '.join(MASKED_OBJECTIVES)}, got {self.switch_to!r}")
        need(self.switch_to is None or self.objective in ("next", "prefix"),
             f"--switch-to continues a next-token (or prefix) run with a masked objective; --objective "
             f"{self.objective} cannot switch")
        need(0 < self.switch_at < 1, f"--switch-at is a fraction of the run in (0, 1), got {self.switch_at}")
        if isinstance(self.eval_tasks, str):
            self.eval_tasks = [t for t in self.eval_tasks.split(",") if t.strip()]
        need(not (self.eval_tasks and self.fsdp), "--eval-tasks runs the model on one process, which FSDP shards; "
                                                  "use DDP (--ddp) or evaluate the saved run with decoderlab eval")
        if self.steps is None and self.tokens is None and self.time is None:
            self._default_budget()

    def _default_budget(self) -> None:
        """The budget when none is given: two minutes of training."""
        self.time = 120.0

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "run_kind": self.run_kind}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in known}
        if "betas" in data:
            data["betas"] = tuple(data["betas"])
        return cls(**data)


# The recipe's AdamW rates for the token embedding and the LM head, as multiples of `lr` (with Muon): a fast
# embedding and a slow head (as modded-nanogpt's). On tinyshakespeare, 2 seeds each: 10 s 1.846 -> 1.790, 90 s
# 1.524 -> 1.500 (benchmarks/README.md, "Training for a budget").
EMBED_LR_FACTOR = 5.0
HEAD_LR_FACTOR = 0.5

# Our recipe for a small model on a CPU, from ablations on tinyshakespeare at a fixed token budget
# (benchmarks/README.md): shallow and wide enough, RoPE, SwiGLU, QK-norm, no biases, untied embeddings.
RECIPE = dict(n_layers=2, n_heads=4, d_model=256, d_mlp=688, norm="rmsnorm", positions="rope", activation="swiglu",
              qk_norm=True, bias_qkv=False, bias_attn_out=False, bias_mlp=False, tie_embeddings=False,
              hf_family=None)


def swiglu_width(d_model: int) -> int:
    """The recipe's MLP width for a model width: SwiGLU's usual 8/3 expansion, rounded up to a multiple of 16."""
    return (d_model * 8 // 3 + 15) // 16 * 16


def uses_mask_token(cfg: TrainConfig) -> bool:
    """Whether the run trains on masked tokens at some point (its tokenizer then gains a mask token)."""
    return cfg.objective in MASKED_OBJECTIVES or cfg.switch_to is not None


def resolve_model_config(cfg: TrainConfig, vocab_size: int, mask_token_id: int | None = None) -> ModelConfig:
    """The model to train: a preset or the recipe, sized to the vocabulary, with the overrides applied
    (`mask_token_id`: the run's mask token, for masked objectives)."""
    if cfg.preset is not None:
        base = ModelConfig.preset(cfg.preset)
    else:
        base = ModelConfig(vocab_size=vocab_size, context_length=cfg.context_length or 64, **RECIPE)
    changes: dict[str, Any] = {"vocab_size": vocab_size, **cfg.model}
    if cfg.context_length is not None:
        changes["context_length"] = cfg.context_length
    if cfg.objective == "mtp":
        changes["n_future"] = cfg.n_future
    if cfg.objective in MASKED_OBJECTIVES:
        if mask_token_id is None:
            raise UserError(f"--objective {cfg.objective} needs a tokenizer with a mask token")
        changes.update(objective=cfg.objective, bidirectional=True, mask_token_id=mask_token_id)
    if base.hf_family is not None and any(k not in ("vocab_size", "context_length", "n_layers", "n_heads",
                                                    "d_model", "d_mlp", "dropout", "branch_drop", "objective",
                                                    "bidirectional", "mask_token_id") for k in changes):
        changes["hf_family"] = None  # an architecture change leaves the HF family
    return base.replace(**changes)
