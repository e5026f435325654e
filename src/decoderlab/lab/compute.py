"""What the lab page shows, computed on `decoderlab.interp`'s hook points and returned as plain JSON-ready dicts.

The logit lens, the patching sweep and the causal trace are `interp.logit_lens`, `interp.resid_pre_by_pos` and
`interp.trace` (ROME's noise and seeds); this module only shapes their results for the page.

JSON shapes (every grid is a list of rows, numbers rounded to 5 decimals):
- `prompt_view`:  {"tokens": [str], "ids": [int], "top_k": [{"token", "id", "prob"}]}  (next token after the prompt)
- `attention_view`: {"tokens", "layer", "heads": [head][query][key]}  (probabilities; masked keys are 0)
- `lens_view`: {"tokens", "layers": [label], "top": [layer][position] -> [{"token", "prob"}] (top_k each)}
  rows: "embed" (the stream entering block 0), then "L{i}" (after block i); the last row is the model's output
- `patch_view`: {"tokens", "corrupted_tokens", "answer": {"token", "id"}, "clean_prob", "corrupted_prob",
  "grid": [layer][position]}  the answer's probability when the clean run's resid_pre at (layer, position) is
  patched into the corrupted run; the answer is the clean run's top next token
- `trace_view`: {"tokens", "subject": [start, end], "answer", "clean_prob", "corrupted_prob", "noise",
  "hidden": [token][layer]}  the answer's probability (mean over the noised copies) when the clean resid_post of
  (layer, token) is restored into runs whose subject-token embeddings got Gaussian noise
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import UserError
from ..interp import logit_lens, resid_pre_by_pos, run_with_cache, trace
from ..model import Transformer
from ..tokenizer import Tokenizer

# Longest prompt the page computes on: the attention view sends heads x T x T numbers, the sweeps run
# layers x T forward passes.
MAX_TOKENS = 256


def _r(x: float) -> float:
    return round(float(x), 5)


def encode(model: Transformer, tok: Tokenizer, prompt: str, what: str = "prompt") -> torch.Tensor:
    """The prompt as ids [1, T] on the model's device, refused in one line when empty or too long."""
    if not isinstance(prompt, str) or not prompt:
        raise UserError(f"the {what} is empty; type some text")
    ids = tok.encode(prompt)
    if not ids:
        raise UserError(f"the {what} has no tokens; type some text")
    limit = min(MAX_TOKENS, model.config.context_length)
    if len(ids) > limit:
        raise UserError(f"the {what} has {len(ids)} tokens; the lab takes at most {limit}, shorten it")
    return torch.tensor([ids], device=next(model.parameters()).device)


def token_texts(tok: Tokenizer, ids: torch.Tensor) -> list[str]:
    return [tok.decode([int(i)]) for i in ids.reshape(-1)]


def _top(tok: Tokenizer, probs: torch.Tensor, k: int) -> list[dict[str, Any]]:
    values, ids = probs.topk(min(k, probs.shape[-1]))
    return [{"token": tok.decode([int(i)]), "id": int(i), "prob": _r(v)} for v, i in zip(values, ids, strict=True)]


@torch.no_grad()
def prompt_view(model: Transformer, tok: Tokenizer, prompt: str, top_k: int = 10) -> dict[str, Any]:
    ids = encode(model, tok, prompt)
    probs = model(ids)[0, -1].float().softmax(-1)
    return {"tokens": token_texts(tok, ids), "ids": ids[0].tolist(), "top_k": _top(tok, probs, top_k)}


@torch.no_grad()
def attention_view(model: Transformer, tok: Tokenizer, prompt: str, layer: int) -> dict[str, Any]:
    n = model.config.n_layers
    if not isinstance(layer, int) or not 0 <= layer < n:
        raise UserError(f"layer must be in 0..{n - 1}, got {layer!r}")
    ids = encode(model, tok, prompt)
    _, cache = run_with_cache(model, ids, f"blocks.{layer}.attn.hook_pattern", dtype=torch.float32)
    pattern = cache["pattern", layer][0]  # [H, T, T]
    return {"tokens": token_texts(tok, ids), "layer": layer,
            "heads": [[[_r(p) for p in row] for row in head] for head in pattern.tolist()]}


@torch.no_grad()
def lens_view(model: Transformer, tok: Tokenizer, prompt: str, top_k: int = 3) -> dict[str, Any]:
    """Logit lens (`interp.logit_lens`): each stage of the residual stream read through the final norm and the
    LM head."""
    ids = encode(model, tok, prompt)
    lens = logit_lens(model, ids, top_k=top_k)
    top = [[[{"token": tok.decode([int(i)]), "id": int(i), "prob": _r(p)} for i, p in zip(ids_k, probs_k, strict=True)]
            for ids_k, probs_k in zip(layer_ids[0].tolist(), layer_probs[0].tolist(), strict=True)]
           for layer_ids, layer_probs in zip(lens.top_ids, lens.top_probs, strict=True)]
    n = model.config.n_layers
    return {"tokens": token_texts(tok, ids), "layers": ["embed"] + [f"L{i}" for i in range(n)], "top": top}


def _last_probs(model: Transformer, ids: torch.Tensor) -> torch.Tensor:
    return model(ids)[:, -1].float().softmax(-1)


@torch.no_grad()
def patch_view(model: Transformer, tok: Tokenizer, prompt: str, corrupted: str) -> dict[str, Any]:
    """Activation patching of resid_pre, layer x position: clean values into the corrupted run, one position at a
    time (the positions of a layer run as one batch)."""
    clean, bad = encode(model, tok, prompt), encode(model, tok, corrupted, "corrupted prompt")
    T = clean.shape[1]
    if bad.shape[1] != T:
        raise UserError(f"the corrupted prompt has {bad.shape[1]} tokens and the prompt {T}; patching by position "
                        "needs the same number of tokens")
    clean_probs = _last_probs(model, clean)[0]
    answer = int(clean_probs.argmax())
    corrupted_prob = _last_probs(model, bad)[0, answer]
    grid = resid_pre_by_pos(model, bad, clean, lambda logits: logits[:, -1].float().softmax(-1)[:, answer].mean())
    grid = [[_r(p) for p in row] for row in grid.tolist()]
    return {"tokens": token_texts(tok, clean), "corrupted_tokens": token_texts(tok, bad),
            "answer": {"token": tok.decode([answer]), "id": answer}, "clean_prob": _r(clean_probs[answer]),
            "corrupted_prob": _r(corrupted_prob), "grid": grid}


@torch.no_grad()
def trace_view(model: Transformer, tok: Tokenizer, prompt: str, subject: tuple[int, int], samples: int = 5,
               seed: int = 1) -> dict[str, Any]:
    """ROME's causal trace (`interp.trace`): noise (3 x the std of the subject tokens' embeddings, fixed seed) on
    the subject tokens' embeddings in `samples` copies, and each (token, layer) resid_post restored."""
    ids = encode(model, tok, prompt)
    T = ids.shape[1]
    start, end = subject
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= T):
        raise UserError(f"subject must be token positions [start, end) with 0 <= start < end <= {T}, "
                        f"got {list(subject)}")
    if not isinstance(samples, int) or not 1 <= samples <= 32:
        raise UserError(f"samples must be between 1 and 32, got {samples!r}")
    result = trace(model, ids, (start, end), samples=samples, seed=seed, kinds=("hidden",))
    return {"tokens": token_texts(tok, ids), "subject": [start, end],
            "answer": {"token": tok.decode([result.target]), "id": result.target},
            "clean_prob": _r(result.clean_prob), "corrupted_prob": _r(result.corrupted_prob),
            "noise": _r(result.noise * result.noise_std),
            "hidden": [[_r(p) for p in row] for row in result.grids["hidden"].tolist()]}
