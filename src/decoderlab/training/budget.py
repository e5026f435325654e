"""The recipe for a budget: the model shape, batch, context, regularisation and compilation a fresh run gets from
how long it trains and how much data it has, by a rule fitted on this CPU (benchmarks/README.md, "Training for a
budget"). Every choice is printed at the start of a run; any flag that sets one overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import UserError
from .config import swiglu_width

# The rule's unit: seconds of training at the speed of the short-budget shape on the CPU it was fitted on (2 layers,
# width 256, context 64, batch 32: ~22k tokens/s in bf16 on 2 AVX-512/AMX cores). A --tokens or --steps budget is
# converted at that speed; a --time budget is taken as it is.
REFERENCE_TOKENS_PER_SECOND = 22_000
REFERENCE_TOKENS_PER_STEP = 32 * 64


@dataclass(frozen=True)
class Tier:
    """One row of the rule: the shape for budgets up to `up_to` reference seconds."""

    up_to: float
    n_layers: int
    d_model: int
    context: int
    batch: int
    compile: bool
    tokens_per_second: float  # measured here with this tier's settings (for the data-epochs estimate)
    # Regularise (per-token branch dropping, BRANCH_DROP) where the run sees its data more often (None: never).
    regularise_epochs: float | None = None


# Fitted on tinyshakespeare (character level), bf16, 2 cores (benchmarks/README.md, "Training for a budget"). Short
# budgets want the fastest steps (context 64, eager: compiling would eat the budget); from about a minute, context
# 128 through torch.compile (about 20 s to compile cold, 3 s from torch's on-disk cache, then ~1.5x faster steps);
# from a few minutes, a deeper model at context 256 (the 2-layer one overfits by then).
TIERS: tuple[Tier, ...] = (
    Tier(45.0, 2, 256, 64, 32, False, 22_000),
    Tier(200.0, 2, 256, 128, 16, True, 33_000),
    Tier(float("inf"), 4, 256, 256, 8, True, 16_000, regularise_epochs=4.0),
)
# The deep tier's regulariser for runs that see their training data many times (a small corpus and a long budget):
# each block's attention and MLP output dropped per token with this probability (`ModelConfig.branch_drop`). At
# 300 s on tinyshakespeare it matched dropout 0.1 (val 1.4774 against 1.4796, mean of 2 seeds; 1.4759 against
# 1.4814 on a third pair) at ~1.3x dropout's speed (dropout's random masks cost ~25-33 % of a compiled step). The
# 2-layer tiers measured worse with dropout even overfitting.
BRANCH_DROP = 0.1


@dataclass(frozen=True)
class BudgetPlan:
    """What a run's budget chose; `applied` lists the choices the run took (not set by the user)."""

    seconds: float  # the budget in reference seconds
    tier: Tier
    applied: dict[str, Any]
    epochs: float | None = None  # planned passes over the training split (None: corpus size unknown yet)

    def describe(self) -> str:
        chosen = ", ".join(f"{k}={v}" for k, v in self.applied.items()) or "nothing (all set by flags)"
        epochs = f", ~{self.epochs:.1f} epochs of the data" if self.epochs is not None else ""
        return f"budget ~{self.seconds:.0f}s of training{epochs}: chose {chosen}"


def budget_seconds(steps: int | None, tokens: int | None, time: float | None) -> float:
    """The budget in reference seconds (the first limit reached)."""
    options = []
    if time is not None:
        options.append(time)
    if tokens is not None:
        options.append(tokens / REFERENCE_TOKENS_PER_SECOND)
    if steps is not None:
        options.append(steps * REFERENCE_TOKENS_PER_STEP / REFERENCE_TOKENS_PER_SECOND)
    return min(options)  # a TrainConfig always has one (two minutes when none is given)


def tier_for(seconds: float) -> Tier:
    return next(t for t in TIERS if seconds <= t.up_to)


def plan_shape(cfg) -> BudgetPlan:
    """Fill in what `cfg` (a `TrainConfig` with preset None) leaves open: layers, width, heads, MLP width,
    context, batch and compile; the user's values stay. Mutates `cfg`."""
    seconds = budget_seconds(cfg.steps, cfg.tokens, cfg.time)
    tier = tier_for(seconds)
    applied: dict[str, Any] = {}
    model = dict(cfg.model)
    width = model.get("d_model", tier.d_model)
    shape = {"n_layers": tier.n_layers, "d_model": tier.d_model}
    if "d_model" not in model:
        # Heads of 64 and a SwiGLU width of 8/3 of the model's, rounded to 16 (as the recipe): only where the user
        # set neither, so that --width alone rescales them.
        shape |= {"n_heads": max(1, width // 64), "d_mlp": swiglu_width(width)}
    for key, value in shape.items():
        if key not in model:
            model[key] = applied[key] = value
    cfg.model = model
    if cfg.context_length is None:
        cfg.context_length = applied["context"] = tier.context
    if cfg.batch_size is None:
        cfg.batch_size = applied["batch_size"] = tier.batch
        if cfg.batch_size % cfg.grad_accum:
            raise UserError(f"--grad-accum {cfg.grad_accum} does not divide the batch of {cfg.batch_size} rows this "
                            "budget chose; pass --batch-size as a multiple of it")
    if cfg.compile is None:
        cfg.compile = applied["compile"] = tier.compile
    return BudgetPlan(seconds, tier, applied)


def planned_tokens(cfg, tier: Tier) -> float:
    """The training tokens the run will see: exact for --steps and --tokens, estimated for --time at the tier's
    speed here."""
    options = []
    if cfg.steps is not None:
        options.append(cfg.steps * cfg.batch_size * cfg.context_length)
    if cfg.tokens is not None:
        options.append(cfg.tokens)
    if cfg.time is not None:
        options.append(cfg.time * tier.tokens_per_second)
    return min(options)


def plan_regularisation(cfg, plan: BudgetPlan, train_tokens: int) -> BudgetPlan:
    """Branch dropping where the tier asks for it and the run will see its training split more than the tier's
    `regularise_epochs` times, unless the user set `dropout` or `branch_drop` (their choice of regulariser
    stands). Mutates `cfg.model`."""
    epochs = planned_tokens(cfg, plan.tier) / max(1, train_tokens)
    applied = dict(plan.applied)
    if "dropout" not in cfg.model and "branch_drop" not in cfg.model:
        limit = plan.tier.regularise_epochs
        cfg.model = {**cfg.model, "branch_drop": BRANCH_DROP if limit is not None and epochs > limit else 0.0}
        applied["branch_drop"] = cfg.model["branch_drop"]
    return BudgetPlan(plan.seconds, plan.tier, applied, epochs)
