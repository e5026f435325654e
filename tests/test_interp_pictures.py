"""Pictures: each PNG writer produces a real, non-empty PNG; the HTML view is one offline file (no URL at all)
holding the tokens and the weights; the lens and heads commands write their files and refuse bad input in one
line with exit code 2."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

import decoderlab
from decoderlab import interp
from decoderlab.errors import UserError

PNG = b"\x89PNG\r\n\x1a\n"


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG and len(data) > 2000


def _model(vocab: int = 30) -> decoderlab.Transformer:
    torch.manual_seed(0)
    return decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4,
                                                         context_length=64, positions="rope")).eval()


def test_png_writers_write_pngs(tmp_path):
    model = _model()
    ids = torch.randint(0, 30, (1, 8), generator=torch.Generator().manual_seed(0))
    _, cache = interp.run_with_cache(model, ids, "blocks.0.attn.hook_pattern")
    tokens = [f"t{i}" for i in ids[0].tolist()]
    assert _is_png(interp.attention_heads(cache["pattern", 0], tokens, tmp_path / "attn.png", layer=0))
    lens = interp.logit_lens(model, ids, target="next")
    assert _is_png(interp.lens_table(lens, tmp_path / "lens.png"))
    assert _is_png(interp.lens_table(lens, tmp_path / "lens-target.png", by="target"))
    grid = torch.randn(6, 9)
    assert _is_png(interp.heatmap(grid, [f"r{i}" for i in range(6)], list("abcdefghi"), tmp_path / "h.png",
                                  title="patching", center=0.0))
    scores = interp.head_scores(model, seq_len=8, batch=2)
    assert _is_png(interp.head_score_maps(scores, tmp_path / "heads.png"))
    assert _is_png(interp.head_score_maps({"sink": interp.sink_shares(model, ids)}, tmp_path / "sinks.png"))


def test_png_writers_refuse_bad_input(tmp_path):
    with pytest.raises(UserError):
        interp.heatmap(torch.ones(2, 3), ["a"], None, tmp_path / "x.png")
    with pytest.raises(UserError):
        interp.heatmap(torch.ones(3), None, None, tmp_path / "x.png")
    with pytest.raises(UserError):
        interp.heatmap(torch.ones(2, 2), None, None, tmp_path / "missing" / "x.png")
    with pytest.raises(UserError):
        interp.attention_heads(torch.ones(2, 3, 3), ["a", "b"], tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def _data(page: str) -> dict:
    match = re.search(r'<script id="data" type="application/json">(.*?)</script>', page, re.S)
    return json.loads(match.group(1))


def test_attention_html_is_offline_and_holds_tokens_and_weights(tmp_path):
    model = _model()
    tok = decoderlab.Tokenizer.train_char(texts=["the cat sat on a mat </script> <b>"])
    model = _model(tok.vocab_size)
    text = "the cat sat </script>"
    ids = tok.encode(text)
    _, cache = interp.run_with_cache(model, torch.tensor([ids]), lambda n: n.endswith("hook_pattern"))
    patterns = torch.stack([cache["pattern", i][0] for i in range(2)])
    tokens = [tok.decode([i]) for i in ids]
    path = interp.attention_html(tokens, patterns, tmp_path / "attn.html", values={"position": range(len(ids))},
                                 title="a <test>")
    page = path.read_text(encoding="utf-8")
    assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}/|\bsrc=|<link|@import", page, re.I)
    assert page.count("</script>") == 2  # the data's "</script>" token is escaped, the page's two scripts close
    assert "<title>a &lt;test&gt;</title>" in page
    data = _data(page)
    assert data["tokens"] == tokens and "".join(data["tokens"]) == text
    assert torch.allclose(torch.tensor(data["patterns"]), patterns, atol=1e-4)
    assert data["values"]["position"] == list(range(len(ids)))
    for word in ("the", "cat", "sat"):
        assert all(c in page for c in word)
    with pytest.raises(UserError):
        interp.attention_html(tokens[:-1], patterns, tmp_path / "bad.html")
    with pytest.raises(UserError):
        interp.attention_html(tokens, patterns, tmp_path / "bad.html", values={"x": [1.0]})


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "decoderlab", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def char_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("char-model")
    tok = decoderlab.Tokenizer.train_char(texts=["def add(a, b):\n    return a + b\n"])
    torch.manual_seed(0)
    model = decoderlab.Transformer(decoderlab.ModelConfig.preset("char-baby", vocab_size=tok.vocab_size))
    decoderlab.save(model, folder, tokenizer=tok)
    return folder


def test_lens_and_heads_commands_write_their_files(char_folder, tmp_path):
    out = _run("lens", str(char_folder), "--prompt", "def add(a, b):", "--top-k", "3", "--out", str(tmp_path / "l"))
    assert out.returncode == 0, out.stderr
    assert _is_png(tmp_path / "l" / "lens.png")
    lens = json.loads((tmp_path / "l" / "lens.json").read_text())
    n_layers = decoderlab.load(char_folder).config.n_layers
    assert len(lens["layers"]) == n_layers + 1 and "".join(lens["rows"][0]["tokens"]) == "def add(a, b):"
    assert len(lens["rows"][0]["top"][0][0]) == 3 and lens["rows"][0]["target"]["tokens"][0] == "e"
    out = _run("heads", str(char_folder), "--seq-len", "10", "--batch", "2", "--out", str(tmp_path / "h"))
    assert out.returncode == 0, out.stderr
    assert "best induction head" in out.stdout
    assert _is_png(tmp_path / "h" / "heads.png")
    heads = json.loads((tmp_path / "h" / "heads.json").read_text())
    for key in ("induction", "previous", "duplicate", "sink"):
        assert len(heads[key]) == n_layers and all(0 <= v <= 1 for row in heads[key] for v in row)
    assert heads["seq_len"] == 10 and heads["batch"] == 2


# Each case is a fresh interpreter (seconds): the API's own checks are tested in-process elsewhere.
@pytest.mark.parametrize("args, fragment", [
    (("lens", "{folder}", "--prompt", "zzz~"), "zzz"),  # characters the tokenizer does not know
    (("heads", "{folder}", "--seq-len", "1000"), "context length"),
])
def test_bad_input_is_one_line_exit_2(char_folder, tmp_path, args, fragment):
    args = [a.format(folder=char_folder, missing=tmp_path / "missing") for a in args]
    out = _run(*args, "--out", str(tmp_path / "o"))
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error:") and out.stderr.strip().count("\n") == 0
    assert "Traceback" not in out.stderr
