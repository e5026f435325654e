"""Look inside: named hook points (TransformerLens names) on the one model, activation caches, and the
interventions and readouts built on them."""

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
from .pictures import attention_heads, attention_html, head_score_maps, heatmap, lens_table

__all__ = ["ActivationCache", "HookPoint", "Recording", "act_name", "hook_names", "hooks", "record",
           "run_with_cache", "run_with_hooks"]
# Readouts and pictures (logit lens, head detectors, sinks, Lookback Lens; PNG and HTML views).
__all__ += ["HeadScores", "LogitLens", "LookbackFeatures", "attention_heads", "attention_html", "head_score_maps",
            "head_scores", "heatmap", "lens_table", "logit_lens", "lookback_lens", "repeated_tokens",
            "scores_from_patterns", "sink_shares"]
