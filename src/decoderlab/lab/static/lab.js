// The lab page: reads the JSON endpoints of decoderlab.lab.app and draws them (canvas for attention, SVG grids
// for the trace and the patching sweep). No libraries, no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { info: null, tokens: [], attention: null };

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function post(path, body) {
  setStatus("working...");
  const response = await fetch(path, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const data = await response.json();
  if (!response.ok) {
    const message = (data.error && data.error.message) || response.statusText;
    setStatus("error: " + message, true);
    throw new Error(message);
  }
  setStatus("");
  return data;
}

function shown(token) {
  return JSON.stringify(token).slice(1, -1);  // newlines and tabs visible
}

function el(tag, attrs = {}, text = null) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

function svgEl(tag, attrs = {}, text = null) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== null) node.textContent = text;
  return node;
}

// White -> dark blue for a value in [0, 1].
function color(v) {
  const t = Math.max(0, Math.min(1, v));
  const r = Math.round(255 - 225 * t), g = Math.round(255 - 175 * t), b = Math.round(255 - 75 * t);
  return `rgb(${r},${g},${b})`;
}

async function loadInfo() {
  const response = await fetch("/api/info");
  state.info = await response.json();
  $("model-info").textContent =
    `${state.info.model}: ${state.info.n_layers} layers, ${state.info.n_heads} heads, up to ${state.info.max_tokens} tokens`;
  for (let i = 0; i < state.info.n_layers; i++) $("layer").append(el("option", { value: i }, String(i)));
  for (let h = 0; h < state.info.n_heads; h++) $("head").append(el("option", { value: h }, String(h)));
}

async function runPrompt() {
  const data = await post("/api/prompt", { prompt: $("prompt").value, top_k: 10 });
  state.tokens = data.tokens;
  const box = $("tokens");
  box.replaceChildren();
  data.tokens.forEach((t, i) => {
    const span = el("span", { class: "tok", title: `position ${i}, id ${data.ids[i]}` }, shown(t));
    span.append(el("small", {}, String(i)));
    box.append(span);
  });
  const table = $("topk");
  table.replaceChildren(el("tr"));
  table.firstChild.append(el("th", {}, "token"), el("th", {}, "id"), el("th", {}, "probability"));
  for (const row of data.top_k) {
    const tr = el("tr");
    tr.append(el("td", {}, shown(row.token)), el("td", {}, String(row.id)), el("td", {}, row.prob.toFixed(4)));
    table.append(tr);
  }
  $("subject-end").max = data.tokens.length;
  $("subject-start").max = data.tokens.length - 1;
}

async function showAttention() {
  const layer = Number($("layer").value);
  if (!state.attention || state.attention.layer !== layer || state.attention.prompt !== $("prompt").value) {
    const data = await post("/api/attention", { prompt: $("prompt").value, layer });
    state.attention = { ...data, prompt: $("prompt").value };
  }
  drawAttention();
}

function drawAttention() {
  const { heads, tokens } = state.attention;
  const pattern = heads[Number($("head").value)];
  const n = tokens.length, cell = Math.max(6, Math.min(24, Math.floor(480 / n))), margin = 90;
  const canvas = $("attn-canvas");
  canvas.width = margin + n * cell;
  canvas.height = margin + n * cell;
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  for (let q = 0; q < n; q++) {
    for (let k = 0; k < n; k++) {
      ctx.fillStyle = color(pattern[q][k]);
      ctx.fillRect(margin + k * cell, margin + q * cell, cell, cell);
    }
  }
  ctx.fillStyle = "#222";
  ctx.font = `${Math.min(12, cell)}px monospace`;
  ctx.textBaseline = "middle";
  tokens.forEach((t, i) => {
    ctx.textAlign = "right";
    ctx.fillText(shown(t).slice(0, 10), margin - 4, margin + i * cell + cell / 2);  // queries down the side
    ctx.save();
    ctx.translate(margin + i * cell + cell / 2, margin - 4);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "left";
    ctx.fillText(shown(t).slice(0, 10), 0, 0);  // keys along the top
    ctx.restore();
  });
}

async function showLens() {
  const data = await post("/api/lens", { prompt: $("prompt").value, top_k: 3 });
  const table = $("lens-table");
  table.replaceChildren();
  const head = el("tr");
  head.append(el("th", {}, "layer \\ token"));
  data.tokens.forEach((t) => head.append(el("th", {}, shown(t))));
  table.append(head);
  data.layers.forEach((label, l) => {
    const tr = el("tr");
    tr.append(el("th", {}, label));
    for (const top of data.top[l]) {
      const td = el("td", { title: top.map((c) => `${shown(c.token)} ${c.prob.toFixed(3)}`).join("\n") },
        shown(top[0].token));
      td.style.background = color(top[0].prob);
      td.style.color = top[0].prob > 0.6 ? "#fff" : "#222";
      tr.append(td);
    }
    table.append(tr);
  });
}

// A heat map grid as SVG: rows x columns cells (class "cell", data-row / data-col / data-value), labelled.
function drawGrid(svg, grid, rowLabels, colLabels, low, high) {
  const cell = 22, left = 100, top = 24;
  svg.replaceChildren();
  const rows = grid.length, cols = rows ? grid[0].length : 0;
  svg.setAttribute("width", left + cols * cell + 10);
  svg.setAttribute("height", top + rows * cell + 10);
  const span = high - low || 1;
  colLabels.forEach((c, j) =>
    svg.append(svgEl("text", { x: left + j * cell + cell / 2, y: top - 8, "text-anchor": "middle" }, c)));
  grid.forEach((row, i) => {
    svg.append(svgEl("text", { x: left - 6, y: top + i * cell + cell / 2 + 4, "text-anchor": "end" },
      rowLabels[i]));
    row.forEach((v, j) => {
      const rect = svgEl("rect", {
        class: "cell", x: left + j * cell, y: top + i * cell, width: cell - 1, height: cell - 1,
        fill: color((v - low) / span), "data-row": i, "data-col": j, "data-value": v,
      });
      rect.append(svgEl("title", {}, `${rowLabels[i]}, ${colLabels[j]}: ${v.toFixed(4)}`));
      svg.append(rect);
    });
  });
}

// The colour scale of a sweep: from its lowest to its highest value, the clean and corrupted runs included.
function range(grid, data) {
  const values = [...grid.flat(), data.clean_prob, data.corrupted_prob];
  return [Math.min(...values), Math.max(...values)];
}

async function runTrace() {
  const body = {
    prompt: $("prompt").value,
    subject: [Number($("subject-start").value), Number($("subject-end").value)],
    samples: Number($("samples").value),
  };
  const data = await post("/api/trace", body);
  $("trace-info").textContent =
    `answer ${JSON.stringify(data.answer.token)}: clean p=${data.clean_prob.toFixed(4)}, ` +
    `corrupted p=${data.corrupted_prob.toFixed(4)} (noise std ${data.noise.toFixed(3)}); ` +
    `cells: p of the answer with one layer's output restored at one token`;
  const labels = data.tokens.map((t, i) =>
    (i >= data.subject[0] && i < data.subject[1] ? "*" : "") + shown(t).slice(0, 10));
  const layers = data.hidden.length ? data.hidden[0].map((_, l) => String(l)) : [];
  drawGrid($("trace-svg"), data.hidden, labels, layers, ...range(data.hidden, data));
}

async function runPatch() {
  const data = await post("/api/patch", { prompt: $("prompt").value, corrupted: $("corrupted").value });
  $("patch-info").textContent =
    `answer ${JSON.stringify(data.answer.token)}: clean p=${data.clean_prob.toFixed(4)}, ` +
    `corrupted p=${data.corrupted_prob.toFixed(4)}; cells: p with the clean resid_pre patched in`;
  const layers = data.grid.map((_, l) => "L" + l);
  const cols = data.tokens.map((_, i) => String(i));
  drawGrid($("patch-svg"), data.grid, layers, cols, ...range(data.grid, data));
}

function guard(fn) {
  return () => fn().catch((e) => console.warn(e));
}

$("run").addEventListener("click", guard(runPrompt));
$("show-attention").addEventListener("click", guard(showAttention));
$("head").addEventListener("change", () => state.attention && drawAttention());
$("layer").addEventListener("change", guard(async () => state.attention && showAttention()));
$("show-lens").addEventListener("click", guard(showLens));
$("run-trace").addEventListener("click", guard(runTrace));
$("run-patch").addEventListener("click", guard(runPatch));
loadInfo().catch((e) => setStatus("error: " + e.message, true));
