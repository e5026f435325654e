"""The lab page in a real headless browser: Debian's chromium driven by Playwright, against a live lab server on a
tiny model. Clicks through prompt -> attention -> logit lens -> trace -> patching and checks what is drawn."""

from __future__ import annotations

import os
import shutil

import pytest
from serve_helpers import char_model, char_tokenizer, running

from decoderlab.lab import create_lab_app

CHROMIUM = os.environ.get("DECODERLAB_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip(f"no chromium at {CHROMIUM} (apt-get install chromium, or set DECODERLAB_CHROMIUM)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")

PROMPT = "the cat sat on"


@pytest.fixture(scope="module")
def page():
    tok = char_tokenizer()
    model = char_model(tok)
    with running(create_lab_app(model, tok, "tiny")) as base, sync_api.sync_playwright() as p:
        # --no-sandbox: chromium refuses its sandbox as root (CI and containers run as root).
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            tab = browser.new_page()
            errors: list[str] = []
            tab.on("pageerror", lambda e: errors.append(str(e)))
            tab.goto(base.removesuffix("/v1") + "/")
            yield tab, model
            assert not errors, errors
        finally:
            browser.close()


def test_click_through_prompt_attention_trace(page):
    tab, model = page
    n_layers, n_heads, T = model.config.n_layers, model.config.n_heads, len(PROMPT)
    tab.wait_for_function(f"document.querySelectorAll('#head option').length === {n_heads}")
    assert tab.locator("#layer option").count() == n_layers

    tab.fill("#prompt", PROMPT)
    tab.click("#run")
    tab.wait_for_function(f"document.querySelectorAll('#tokens .tok').length === {T}")
    assert tab.locator("#tokens .tok").nth(4).inner_text().startswith("c")
    assert tab.locator("#topk tr").count() == 11  # header + top 10

    # Attention: a T x T heat map on the canvas. Check its size and that the cells are painted.
    tab.select_option("#layer", "1")
    tab.click("#show-attention")
    tab.wait_for_function("document.getElementById('attn-canvas').width > 100")
    drawn = tab.evaluate("""(n) => {
        const c = document.getElementById('attn-canvas'), ctx = c.getContext('2d');
        const px = ctx.getImageData(0, 0, c.width, c.height).data;
        let coloured = 0;  // pixels that are neither white nor transparent
        for (let i = 0; i < px.length; i += 4) if (px[i + 3] && (px[i] < 250 || px[i + 2] < 250)) coloured++;
        // The first query sees only itself (probability 1: darkest) and nothing above the diagonal (white).
        const cell = (c.width - 90) / n;
        const centre = (i) => 90 + i * cell + cell / 2;
        const at = (x, y) => Array.from(ctx.getImageData(centre(x), centre(y), 1, 1).data);
        return {coloured, total: c.width * c.height, diag: at(0, 0), above: at(3, 0)};
    }""", T)
    assert drawn["coloured"] > 0.1 * drawn["total"]
    assert drawn["diag"][:3] == [30, 80, 180] and drawn["above"][:3] == [255, 255, 255]
    before = tab.evaluate("document.getElementById('attn-canvas').toDataURL()")
    tab.select_option("#head", "2")  # another head redraws the canvas
    assert tab.evaluate("document.getElementById('attn-canvas').toDataURL()") != before

    # Logit lens: a table of (layers + 1) rows of T cells under a header.
    tab.click("#show-lens")
    tab.wait_for_function("document.querySelectorAll('#lens-table tr').length > 1")
    assert tab.locator("#lens-table tr").count() == n_layers + 2
    assert tab.locator("#lens-table tr").nth(1).locator("td").count() == T

    # Causal trace: a tokens x layers grid of SVG cells.
    tab.fill("#subject-start", "4")
    tab.fill("#subject-end", "7")
    tab.fill("#samples", "3")
    tab.click("#run-trace")
    tab.wait_for_function("document.querySelectorAll('#trace-svg rect.cell').length > 0")
    assert tab.locator("#trace-svg rect.cell").count() == T * n_layers
    assert tab.locator("#trace-svg rect.cell[data-row='13'][data-col='3']").count() == 1
    assert "clean p=" in tab.inner_text("#trace-info")
    fills = set(tab.eval_on_selector_all("#trace-svg rect.cell", "cells => cells.map(c => c.getAttribute('fill'))"))
    assert len(fills) > 1  # a heat map, not one flat colour

    # Patching sweep: layers x positions; a length mismatch shows a one-line error instead.
    tab.fill("#corrupted", "short")
    tab.click("#run-patch")
    tab.wait_for_function("document.getElementById('status').textContent.startsWith('error')")
    assert "same number of tokens" in tab.inner_text("#status")
    tab.fill("#corrupted", "the dog sat on")
    tab.click("#run-patch")
    tab.wait_for_function("document.querySelectorAll('#patch-svg rect.cell').length > 0")
    assert tab.locator("#patch-svg rect.cell").count() == n_layers * T
    assert tab.inner_text("#status") == ""
