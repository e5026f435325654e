"""What the lab page shows, computed on `decoderlab.interp`'s hook points and returned as plain JSON-ready dicts.

NOTE for the merge: the logit lens, the patching sweep and the causal trace here are small local versions written
directly on `interp.run_with_cache` / `interp.hooks`, because the shared implementations
(`interp.lens.logit_lens`, `interp.patching`, `interp.tracing.trace`) are built on other branches at the same time.
The lead switches these three functions to the shared ones at merge; the JSON shapes below are what the page reads.

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
from ..interp import hooks, run_with_cache
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
    """Logit lens: each stage of the residual stream read through the final norm and the LM head."""
    ids = encode(model, tok, prompt)
    n = model.config.n_layers
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n)]
    _, cache = run_with_cache(model, ids, names)
    top = []
    for name in names:
        probs = model.unembed(model.final_norm(cache[name]))[0].float().softmax(-1)  # [T, V]
        top.append([_top(tok, row, top_k) for row in probs])
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
    n = model.config.n_layers
    names = [f"blocks.{i}.hook_resid_pre" for i in range(n)]
    logits, cache = run_with_cache(model, clean, names)
    clean_probs = logits[0, -1].float().softmax(-1)
    answer = int(clean_probs.argmax())
    corrupted_prob = _last_probs(model, bad)[0, answer]
    rows = torch.arange(T)
    grid = []
    for name in names:
        value = cache[name][0]  # [T, d]

        def patch(x: torch.Tensor, hook, value=value) -> torch.Tensor:
            x = x.clone()
            x[rows, rows] = value  # row p gets the clean value at position p
            return x

        with hooks(model, {name: patch}):
            grid.append([_r(p) for p in _last_probs(model, bad.expand(T, T))[:, answer].tolist()])
    return {"tokens": token_texts(tok, clean), "corrupted_tokens": token_texts(tok, bad),
            "answer": {"token": tok.decode([answer]), "id": answer}, "clean_prob": _r(clean_probs[answer]),
            "corrupted_prob": _r(corrupted_prob), "grid": grid}


@torch.no_grad()
def trace_view(model: Transformer, tok: Tokenizer, prompt: str, subject: tuple[int, int], samples: int = 5,
               seed: int = 0) -> dict[str, Any]:
    """A causal trace after ROME: noise (3 x the std of the subject tokens' embeddings, fixed seed) on the subject
    tokens' embeddings in `samples` copies, and each (token, layer) resid_post restored from the clean run."""
    ids = encode(model, tok, prompt)
    T, n = ids.shape[1], model.config.n_layers
    start, end = subject
    if not (isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= T):
        raise UserError(f"subject must be token positions [start, end) with 0 <= start < end <= {T}, "
                        f"got {list(subject)}")
    if not isinstance(samples, int) or not 1 <= samples <= 32:
        raise UserError(f"samples must be between 1 and 32, got {samples!r}")
    names = [f"blocks.{i}.hook_resid_post" for i in range(n)]
    logits, cache = run_with_cache(model, ids, ["hook_embed", *names])
    clean_probs = logits[0, -1].float().softmax(-1)
    answer = int(clean_probs.argmax())
    embed = cache["hook_embed"][0]
    scale = 3 * float(embed[start:end].float().std())
    gen = torch.Generator().manual_seed(seed)
    noise = (torch.randn(samples, end - start, embed.shape[-1], generator=gen) * scale).to(embed)

    def corrupt(x: torch.Tensor, hook) -> torch.Tensor:
        x = x.clone()
        x[:, start:end] += noise.repeat(x.shape[0] // samples, 1, 1)
        return x

    with hooks(model, {"hook_embed": corrupt}):
        corrupted_prob = _last_probs(model, ids.expand(samples, T))[:, answer].mean()
        # Rows: position p, sample s at row p * samples + s; row p's clean value is restored at position p.
        rows = torch.arange(T).repeat_interleave(samples)
        by_layer = []
        for name in names:
            value = cache[name][0]

            def restore(x: torch.Tensor, hook, value=value) -> torch.Tensor:
                x = x.clone()
                x[torch.arange(x.shape[0]), rows] = value[rows]
                return x

            with hooks(model, {name: restore}):
                by_layer.append(_last_probs(model, ids.expand(T * samples, T))[:, answer].view(T, samples).mean(1))
    hidden = torch.stack(by_layer, dim=1)  # [T, layers]
    return {"tokens": token_texts(tok, ids), "subject": [start, end],
            "answer": {"token": tok.decode([answer]), "id": answer}, "clean_prob": _r(clean_probs[answer]),
            "corrupted_prob": _r(corrupted_prob), "noise": _r(scale),
            "hidden": [[_r(p) for p in row] for row in hidden.tolist()]}
