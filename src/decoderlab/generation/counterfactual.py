"""Counterfactual token generation with the Gumbel-Max structural causal model (Chatzi et al. 2024, "Counterfactual
Token Generation in Large Language Models"; Oberst & Sontag 2019).

Sampling is argmax(logits / T + g): the exogenous noise g of step t comes from a generator seeded from
(seed, t) alone. Replaying a `Trace` with the same noise and an intervention answers "what would the model have
said if the prompt had been Y" or "if token i had been X": the replay with no intervention is the factual output.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import UserError
from ..model import Transformer
from .engine import GenerationResult, Stream, Trace, check_prompts

__all__ = ["Trace", "counterfactual"]


def counterfactual(model: Transformer, trace: Trace, intervention: Mapping[str, Any] | None = None, *,
                   max_new_tokens: int | None = None) -> GenerationResult:
    """Replay `trace` (from `generate(..., trace=True)`) with its sampling noise under `intervention`.

    intervention (None or {} replays the factual run exactly):
      {"prompt": ids}: a new prompt (a list of ids for a one-prompt trace; for a batch, a list of id lists, one
          per row);
      {"token": (position, token_id)}: force the generated token at `position` (0 = the first new token) to
          `token_id`, then continue with the same noise; tokens before it are the factual ones. For a batch add
          "row": i (only that row is forced; the others replay unchanged).
      Both keys may be given together.
    max_new_tokens: defaults to the trace's.
    Returns a `GenerationResult` whose `trace` is the counterfactual's own (same seed).
    """
    if not isinstance(trace, Trace):
        raise UserError(f"trace must be the Trace of generate(..., trace=True), got {type(trace).__name__}")
    intervention = dict(intervention or {})
    unknown = set(intervention) - {"prompt", "token", "row"}
    if unknown:
        raise UserError(f"unknown intervention keys {sorted(unknown)}; use 'prompt', 'token' (and 'row')")
    B = len(trace.prompts)
    prompts = trace.prompts
    if "prompt" in intervention:
        new = intervention["prompt"]
        if B == 1 and new and not isinstance(new[0], (list, tuple)) and not hasattr(new[0], "tolist"):
            new = [new]
        if hasattr(new, "tolist"):
            new = new.tolist()
        prompts = check_prompts(new, model)
        if len(prompts) != B:
            raise UserError(f"the prompt intervention has {len(prompts)} prompts; the trace has {B}")
    force = {step: dict(rows) for step, rows in trace.forced.items()}  # a counterfactual's own interventions
    forced_row = forced_at = forced_token = None
    if "token" in intervention:
        spec = intervention["token"]
        if not (isinstance(spec, Sequence) and len(spec) == 2
                and all(isinstance(x, int) and not isinstance(x, bool) for x in spec)):
            raise UserError(f"the token intervention must be (position, token_id), got {spec!r}")
        forced_at, forced_token = spec
        forced_row = intervention.get("row", 0 if B == 1 else None)
        if forced_row is None:
            raise UserError(f"the trace holds {B} rows; say which to intervene on with 'row': i")
        if not (isinstance(forced_row, int) and 0 <= forced_row < B):
            raise UserError(f"row must be in [0, {B}), got {forced_row!r}")
        if not 0 <= forced_token < model.config.vocab_size:
            raise UserError(f"token {forced_token} is not a token id in [0, {model.config.vocab_size})")
        n = trace.max_new_tokens if max_new_tokens is None else max_new_tokens
        if not 0 <= forced_at < n:
            raise UserError(f"position {forced_at} is outside the {n} generated positions")
        force.setdefault(forced_at, {})[forced_row] = forced_token
    elif "row" in intervention:
        raise UserError("'row' goes with a 'token' intervention")
    n = trace.max_new_tokens if max_new_tokens is None else max_new_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UserError(f"max_new_tokens must be an integer >= 0, got {n!r}")
    steps = Stream(model, prompts, n, trace.params, seed=trace.seed, stop_ids=trace.stop_tokens,
                   stop_strings=trace.stop_strings, tokenizer=trace.tokenizer, cache_dtype=trace.cache_dtype,
                   grammar=trace.grammar, force=force, compile=trace.compile)
    result = steps.result(trace=True)
    if forced_row is not None:
        row = result.tokens[forced_row]
        applied = (len(row) > forced_at and row[forced_at] == forced_token) or (
            len(row) == forced_at and result.stopped_by[forced_row] == forced_token)
        if not applied:
            raise UserError(f"row {forced_row} ended after {len(row)} tokens, before position {forced_at}: "
                            f"nothing to intervene on there")
    return result
