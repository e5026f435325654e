"""Look inside: named hook points (TransformerLens names) on the one model, activation caches, and the
interventions and readouts built on them."""

from .cache import ActivationCache, Recording, act_name, record, run_with_cache
from .hooks import HookPoint, hook_names, hooks, run_with_hooks

__all__ = ["ActivationCache", "HookPoint", "Recording", "act_name", "hook_names", "hooks", "record",
           "run_with_cache", "run_with_hooks"]
from .tracing import (
    KINDS,
    TOKEN_GROUPS,
    AverageEffect,
    CausalTrace,
    average_indirect_effect,
    embedding_std,
    find_subject,
    plot_average_effect,
    plot_trace,
    restored_prob,
    token_groups,
    trace,
    trace_text,
)

__all__ += ["KINDS", "TOKEN_GROUPS", "AverageEffect", "CausalTrace", "average_indirect_effect", "embedding_std",
            "find_subject", "plot_average_effect", "plot_trace", "restored_prob", "token_groups", "trace",
            "trace_text"]
