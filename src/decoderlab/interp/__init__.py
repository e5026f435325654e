"""Look inside: named hook points (TransformerLens names) on the one model, activation caches, and the
interventions (patching, ablation, subspace interchange, steering, causal tracing) and readouts (logit lens,
head detectors, sinks, Lookback Lens, pictures) built on them."""

from .ablation import ablate, ablated, ablation_hooks
from .cache import ActivationCache, Recording, act_name, record, run_with_cache
from .heads import (
    HeadScores,
    LookbackFeatures,
    head_scores,
    lookback_lens,
    repeated_tokens,
    scores_from_patterns,
    sink_shares,
)
from .hooks import HookPoint, hook_names, hooks, run_with_hooks
from .lens import LogitLens, logit_lens
from .patching import (
    attn_out_by_pos,
    head_out,
    head_out_by_pos,
    logit_diff,
    mlp_out_by_pos,
    normalized,
    patch,
    patch_cells,
    path_patch,
    path_patch_cells,
    path_patch_heads,
    resid_pre_by_pos,
    sweep,
)
from .pictures import attention_heads, attention_html, head_score_maps, heatmap, lens_table
from .steering import mean_activation, steer, steering_vector
from .subspace import LearnedSubspace, interchange, learn_subspace
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

__all__ = [
    # hooks and caches
    "ActivationCache", "HookPoint", "Recording", "act_name", "hook_names", "hooks", "record", "run_with_cache",
    "run_with_hooks",
    # interventions
    "LearnedSubspace", "ablate", "ablated", "ablation_hooks", "attn_out_by_pos", "head_out", "head_out_by_pos",
    "interchange", "learn_subspace", "logit_diff", "mean_activation", "mlp_out_by_pos", "normalized", "patch",
    "patch_cells", "path_patch", "path_patch_cells", "path_patch_heads", "resid_pre_by_pos", "steer",
    "steering_vector", "sweep",
    # causal tracing
    "KINDS", "TOKEN_GROUPS", "AverageEffect", "CausalTrace", "average_indirect_effect", "embedding_std",
    "find_subject", "plot_average_effect", "plot_trace", "restored_prob", "token_groups", "trace", "trace_text",
    # readouts and pictures
    "HeadScores", "LogitLens", "LookbackFeatures", "attention_heads", "attention_html", "head_score_maps",
    "head_scores", "heatmap", "lens_table", "logit_lens", "lookback_lens", "repeated_tokens",
    "scores_from_patterns", "sink_shares",
]
