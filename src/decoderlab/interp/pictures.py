"""Pictures of what the readouts measured: PNGs through matplotlib (Agg, imported inside each function so
`import decoderlab` stays fast), and a self-contained offline HTML view of attention.

- `heatmap(grid, row_labels, col_labels, path, title=...)`: a labelled heat map of any [rows, cols] grid
  (patching sweeps, tracing grids, head scores); values are written in the cells when the grid is small.
- `attention_heads(pattern, tokens, path, layer=...)`: one layer's heads side by side, [H, T, T] (or [B, H, T, T],
  first row), queries down, keys across, token labels on both axes.
- `lens_table(lens, path, tokenizer=None, row=0)`: a `LogitLens` as layers x positions, each cell coloured by the
  top token's probability and labelled with its text (or coloured by the target's probability, `by="target"`).
- `head_score_maps(scores, path)`: one panel per score ({name: [layers, heads]}, e.g. `HeadScores`).
- `attention_html(tokens, patterns, path, values=None)`: one .html file with inline data, CSS and JS (no CDN,
  no network): pick a layer and head (or the heads' mean), hover a token to see where it attends (and, in the
  "all heads" strip, where each head attends); `values` ({name: one number per token}) colour the tokens.
Each function writes `path` (parent folders must exist) and returns it as a `Path`.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..errors import UserError

# The HTML view writes every (layer, head, query, key) weight into the file; past this it would be unwieldy.
MAX_HTML_WEIGHTS = 4_000_000


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {str(path)!r}: the folder {str(path.parent)!r} does not exist")
    plt = _pyplot()
    try:
        fig.savefig(path, dpi=110, bbox_inches="tight")
    except OSError as e:
        raise UserError(f"cannot write {str(path)!r} ({e.strerror or e})") from None
    finally:
        plt.close(fig)
    return path


def _label(token: object, limit: int = 12) -> str:
    # Spaces drawn as "␣" (a space-only or leading-space token would be invisible); "$" would start mathtext.
    text = str(token).replace("\n", "\\n").replace("\t", "\\t").replace(" ", "␣").replace("$", r"\$")
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _grid(values, name: str) -> torch.Tensor:
    grid = torch.as_tensor(values).detach().float().cpu()
    if grid.dim() != 2 or grid.numel() == 0:
        raise UserError(f"{name} must be a non-empty 2-d grid, got shape {tuple(grid.shape)}")
    return grid


def heatmap(grid, row_labels: Sequence[object] | None, col_labels: Sequence[object] | None, path: str | Path, *,
            title: str = "", cmap: str = "viridis", center: float | None = None, value_label: str = "",
            xlabel: str = "", ylabel: str = "", annotate: bool | None = None) -> Path:
    """A labelled heat map of `grid` [rows, cols]. `center` gives a diverging map symmetric about it (effects
    that can be negative); `annotate` writes each value in its cell (default: when there are at most 400)."""
    plt = _pyplot()
    grid = _grid(grid, "grid")
    rows, cols = grid.shape
    for labels, n, what in ((row_labels, rows, "row_labels"), (col_labels, cols, "col_labels")):
        if labels is not None and len(labels) != n:
            raise UserError(f"{what} has {len(labels)} labels for {n} {what.split('_')[0]}s")
    fig, ax = plt.subplots(figsize=(min(2 + 0.55 * cols, 24), min(1.5 + 0.4 * rows, 24)))
    kwargs = {}
    if center is not None:
        span = float((grid - center).abs().max()) or 1.0
        kwargs = dict(vmin=center - span, vmax=center + span)
        cmap = "RdBu_r" if cmap == "viridis" else cmap
    image = ax.imshow(grid.numpy(), cmap=cmap, aspect="auto", **kwargs)
    fig.colorbar(image, ax=ax, label=value_label)
    if row_labels is not None:
        ax.set_yticks(range(rows), [_label(t) for t in row_labels])
    if col_labels is not None:
        ax.set_xticks(range(cols), [_label(t) for t in col_labels], rotation=90)
    if annotate if annotate is not None else rows * cols <= 400:
        low, high = image.get_clim()
        for r in range(rows):
            for c in range(cols):
                v = float(grid[r, c])
                dark = (v - low) / ((high - low) or 1.0) < 0.6
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if dark else "black")
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _save(fig, path)


def attention_heads(pattern, tokens: Sequence[object], path: str | Path, *, layer: int | None = None,
                    title: str = "") -> Path:
    """One layer's attention, a panel per head: `pattern` [H, T, T] or [B, H, T, T] (row 0 shown), queries as
    rows and keys as columns, labelled with `tokens`."""
    plt = _pyplot()
    p = torch.as_tensor(pattern).detach().float().cpu()
    if p.dim() == 4:
        p = p[0]
    if p.dim() != 3 or p.shape[1] != p.shape[2] or p.shape[2] != len(tokens):
        raise UserError(f"pattern must be [heads, T, T] with T = {len(tokens)} tokens, got {tuple(p.shape)}")
    H, T = p.shape[0], p.shape[2]
    cols = min(H, 4)
    rows = -(-H // cols)
    side = min(max(2.5, 0.22 * T), 8)
    fig, axes = plt.subplots(rows, cols, figsize=(side * cols + 1, side * rows + 0.6), squeeze=False)
    labels = [_label(t, 8) for t in tokens]
    for h in range(rows * cols):
        ax = axes[h // cols][h % cols]
        if h >= H:
            ax.axis("off")
            continue
        ax.imshow(p[h].numpy(), cmap="Blues", vmin=0, vmax=1)
        ax.set_title(f"head {h}" if layer is None else f"L{layer}H{h}", fontsize=9)
        if T <= 48:
            ax.set_xticks(range(T), labels, rotation=90, fontsize=6)
            ax.set_yticks(range(T), labels, fontsize=6)
        else:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(title or (f"attention, layer {layer}" if layer is not None else "attention"))
    return _save(fig, path)


def lens_table(lens, path: str | Path, *, tokenizer=None, row: int = 0, by: str = "top", title: str = "") -> Path:
    """A `LogitLens` as a table: a row per layer (embeddings at the bottom, the output at the top), a column per
    position read, each cell labelled with the top token and coloured by its probability (`by="top"`) or by
    the target token's probability (`by="target"`, needs a lens with a target)."""
    plt = _pyplot()
    if by not in ("top", "target"):
        raise UserError(f"by must be 'top' or 'target', got {by!r}")
    if by == "target" and lens.target_probs is None:
        raise UserError("by='target' needs a lens computed with a target")
    if not 0 <= row < lens.input_ids.shape[0]:
        raise UserError(f"row {row} is outside the lens's batch of {lens.input_ids.shape[0]}")

    def text(i: int) -> str:
        return _label(tokenizer.decode([int(i)]) if tokenizer is not None else int(i), 8)

    probs = lens.top_probs[:, row, :, 0] if by == "top" else lens.target_probs[:, row].nan_to_num(0.0)
    top = lens.top_ids[:, row, :, 0]
    R, P = probs.shape
    fig, ax = plt.subplots(figsize=(min(2.5 + 0.75 * P, 30), min(1.5 + 0.45 * R, 20)))
    image = ax.imshow(probs.flip(0).numpy(), cmap="Blues", vmin=0, vmax=1, aspect="auto")
    fig.colorbar(image, ax=ax, label="top-token probability" if by == "top" else "target probability")
    for r in range(R):
        for c in range(P):
            v = float(probs[r, c])
            ax.text(c, R - 1 - r, text(top[r, c]), ha="center", va="center", fontsize=7,
                    color="white" if v > 0.6 else "black")
    inputs = lens.input_ids[row, lens.positions].tolist()
    ax.set_xticks(range(P), [text(i) for i in inputs], rotation=90, fontsize=8)
    ax.set_yticks(range(R), list(reversed(lens.labels)), fontsize=8)
    ax.set_xlabel("input token (position)")
    ax.set_ylabel("layer (residual stream after)")
    ax.set_title(title or "logit lens: top prediction per layer")
    return _save(fig, path)


def head_score_maps(scores, path: str | Path, *, title: str = "") -> Path:
    """Panels of [layers, heads] scores: a mapping {name: grid} or a `HeadScores` (induction, previous,
    duplicate), each coloured 0..1 with the value in every cell."""
    plt = _pyplot()
    if not isinstance(scores, Mapping):
        from .heads import SCORES

        scores = {k: scores[k] for k in SCORES}
    if not scores:
        raise UserError("no scores to draw")
    grids = {name: _grid(g, name) for name, g in scores.items()}
    L, H = next(iter(grids.values())).shape
    fig, axes = plt.subplots(1, len(grids), figsize=(min(1.8 + 0.6 * H, 12) * len(grids), 1.2 + 0.5 * L),
                             squeeze=False)
    for ax, (name, grid) in zip(axes[0], grids.items(), strict=True):
        ax.imshow(grid.numpy(), cmap="viridis", vmin=0, vmax=max(1.0, float(grid.max())), aspect="auto")
        for r in range(grid.shape[0]):
            for c in range(grid.shape[1]):
                v = float(grid[r, c])
                ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if v < 0.6 else "black")
        ax.set_title(name)
        ax.set_xticks(range(grid.shape[1]))
        ax.set_yticks(range(grid.shape[0]))
        ax.set_xlabel("head")
        ax.set_ylabel("layer")
    if title:
        fig.suptitle(title, y=1.04)
    return _save(fig, path)


_HTML = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>__TITLE__</title>
<style>
body{font-family:system-ui,sans-serif;margin:16px;color:#222}
#controls{margin-bottom:10px} #controls label{margin-right:14px}
#tokens{line-height:2.1;font-family:ui-monospace,monospace;white-space:pre-wrap}
.tok{padding:2px 1px;border-radius:3px;cursor:pointer;border:1px solid #ddd}
.tok.focus{outline:2px solid #d33}
#heads{display:flex;flex-wrap:wrap;gap:6px;margin-top:14px}
.head{font-size:11px;border:1px solid #ccc;padding:3px;cursor:pointer}
.head.sel{border-color:#d33}
.bar{display:inline-block;width:4px;margin-right:1px;background:#36c;vertical-align:bottom}
#info{margin-top:8px;font-size:13px;color:#555;min-height:1.2em}
</style></head><body>
<h3>__TITLE__</h3>
<div id="controls"><label>layer <select id="layer"></select></label>
<label>head <select id="head"></select></label>
<label>colour tokens by <select id="value"></select></label></div>
<div id="tokens"></div><div id="info"></div><div id="heads"></div>
<script id="data" type="application/json">__DATA__</script>
<script>
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const L = D.patterns.length, H = D.patterns[0].length, T = D.tokens.length;
const $ = (id) => document.getElementById(id);
let focus = null;
function opt(sel, value, text) {
  const o = document.createElement("option"); o.value = value; o.textContent = text; sel.appendChild(o);
}
for (let l = 0; l < L; l++) opt($("layer"), l, String(l));
opt($("head"), "mean", "mean of heads");
for (let h = 0; h < H; h++) opt($("head"), h, String(h));
opt($("value"), "", "attention");
for (const name of Object.keys(D.values)) opt($("value"), name, name);
function row(l, h, q) {
  if (h !== "mean") return D.patterns[l][h][q];
  const out = new Array(T).fill(0);
  for (let k = 0; k < H; k++) { const r = D.patterns[l][k][q]; for (let j = 0; j < T; j++) out[j] += r[j] / H; }
  return out;
}
const spans = D.tokens.map((t, i) => {
  const s = document.createElement("span"); s.className = "tok"; s.textContent = t; s.dataset.i = i;
  s.title = "position " + i;
  s.addEventListener("mouseenter", () => { focus = i; draw(); });
  $("tokens").appendChild(s); return s;
});
function shade(v) { const a = Math.max(0, Math.min(1, v)); return "rgba(51,102,204," + a.toFixed(3) + ")"; }
function draw() {
  const l = Number($("layer").value), hv = $("head").value, h = hv === "mean" ? "mean" : Number(hv);
  const vname = $("value").value;
  let weights = null;
  if (vname) {
    const vals = D.values[vname]; const lo = Math.min(...vals), hi = Math.max(...vals);
    weights = vals.map((v) => hi > lo ? (v - lo) / (hi - lo) : 0);
    $("info").textContent = vname + " per token (min " + lo.toFixed(3) + ", max " + hi.toFixed(3) + ")";
  } else if (focus !== null) {
    weights = row(l, h, focus);
    $("info").textContent = "attention from position " + focus + " (" + JSON.stringify(D.tokens[focus]) +
      "), layer " + l + ", head " + h;
  } else { $("info").textContent = "hover a token to see where it attends"; }
  spans.forEach((s, i) => {
    s.style.background = weights ? shade(weights[i]) : "";
    s.style.color = weights && weights[i] > 0.6 ? "#fff" : "";
    s.classList.toggle("focus", i === focus && !vname);
  });
  const box = $("heads"); box.textContent = "";
  if (focus === null) return;
  for (let k = 0; k < H; k++) {
    const d = document.createElement("div"); d.className = "head" + (k === h ? " sel" : "");
    d.title = "layer " + l + " head " + k; d.appendChild(document.createTextNode("H" + k + " "));
    const r = D.patterns[l][k][focus];
    for (let j = 0; j <= focus; j++) {
      const b = document.createElement("span"); b.className = "bar"; b.style.height = (2 + 30 * r[j]) + "px";
      b.title = D.tokens[j] + ": " + r[j].toFixed(3); d.appendChild(b);
    }
    d.addEventListener("click", () => { $("head").value = k; draw(); });
    box.appendChild(d);
  }
}
["layer", "head", "value"].forEach((id) => $(id).addEventListener("change", draw));
draw();
</script></body></html>
"""


def attention_html(tokens: Sequence[str], patterns, path: str | Path, *,
                   values: Mapping[str, Sequence[float]] | None = None, title: str = "attention") -> Path:
    """A self-contained HTML view: `tokens` (their text), `patterns` [L, H, T, T] (a tensor, or a list of
    per-layer [H, T, T] / [1, H, T, T]), `values` {name: one number per token} (e.g. a lens probability or a
    patching effect). Everything is inline: the file opens offline and fetches nothing."""
    if isinstance(patterns, torch.Tensor):
        stacked = patterns.detach().float().cpu()
    else:
        layers = [torch.as_tensor(p).detach().float().cpu() for p in patterns]
        if not layers:
            raise UserError("patterns is empty: give one [heads, T, T] pattern per layer")
        stacked = torch.stack([p[0] if p.dim() == 4 else p for p in layers])
    T = len(tokens)
    if stacked.dim() != 4 or stacked.shape[2:] != (T, T) or T == 0:
        raise UserError(f"patterns must be [layers, heads, T, T] with T = {T} tokens, got {tuple(stacked.shape)}")
    if stacked.numel() > MAX_HTML_WEIGHTS:
        raise UserError(f"{stacked.numel():,} attention weights are too many for one page (at most "
                        f"{MAX_HTML_WEIGHTS:,}); pass fewer layers or a shorter text")
    shown = {}
    for name, vals in (values or {}).items():
        vals = [float(v) for v in torch.as_tensor(vals).flatten().tolist()]
        if len(vals) != T:
            raise UserError(f"values[{name!r}] has {len(vals)} numbers for {T} tokens")
        shown[str(name)] = [round(v, 5) for v in vals]
    data = {"tokens": [str(t) for t in tokens], "patterns": (stacked * 1e4).round().div(1e4).tolist(),
            "values": shown}
    # "<" escaped so no token can close the <script> element that holds the data.
    payload = json.dumps(data, ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")
    page = _HTML.replace("__TITLE__", html.escape(title)).replace("__DATA__", payload)
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {str(path)!r}: the folder {str(path.parent)!r} does not exist")
    try:
        path.write_text(page, encoding="utf-8")
    except OSError as e:
        raise UserError(f"cannot write {str(path)!r} ({e.strerror or e})") from None
    return path
