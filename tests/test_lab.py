"""The lab page's JSON endpoints (decoderlab.lab), checked against independent computations on the model."""

from __future__ import annotations

import pytest
import torch
from serve_helpers import char_model, char_tokenizer
from starlette.testclient import TestClient

import decoderlab
from decoderlab.lab import create_lab_app

PROMPT = "the cat sat on"
ROPE = dict(n_layers=3, n_heads=4, n_kv_heads=2, d_model=32, context_length=64, positions="rope", norm="rmsnorm",
            activation="swiglu", tie_embeddings=False)


@pytest.fixture(scope="module", params=["learned", "rope"])
def lab(request):
    tok = char_tokenizer()
    if request.param == "learned":
        model = char_model(tok)
    else:
        torch.manual_seed(1)
        model = decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=tok.vocab_size, **ROPE)).eval()
    with TestClient(create_lab_app(model, tok, "tiny")) as client:
        yield client, model, tok


def ok(client, path, body):
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    return r.json()


def bad(client, path, body, needle):
    r = client.post(path, json=body)
    assert r.status_code == 400, r.text
    message = r.json()["error"]["message"]
    assert needle in message and "\n" not in message, message


def ids_of(tok, text):
    return torch.tensor([tok.encode(text)])


def test_page_and_info(lab):
    client, model, _ = lab
    page = client.get("/")
    assert page.status_code == 200 and 'id="attn-canvas"' in page.text and "/static/lab.js" in page.text
    assert "http" not in page.text.replace("http://www.w3.org", "")  # nothing fetched from elsewhere
    assert client.get("/static/lab.js").status_code == 200 and client.get("/static/lab.css").status_code == 200
    info = client.get("/api/info").json()
    assert (info["n_layers"], info["n_heads"]) == (model.config.n_layers, model.config.n_heads)


def test_prompt_top_k_is_the_next_token_distribution(lab):
    client, model, tok = lab
    data = ok(client, "/api/prompt", {"prompt": PROMPT, "top_k": 5})
    ids = ids_of(tok, PROMPT)
    assert data["ids"] == ids[0].tolist() and "".join(data["tokens"]) == PROMPT
    with torch.no_grad():
        probs = model(ids)[0, -1].softmax(-1)
    top = probs.topk(5)
    assert [t["id"] for t in data["top_k"]] == top.indices.tolist()
    torch.testing.assert_close(torch.tensor([t["prob"] for t in data["top_k"]]), top.values, atol=1e-5, rtol=0)


def test_attention_equals_the_eager_attentions(lab):
    client, model, tok = lab
    layer = model.config.n_layers - 1
    data = ok(client, "/api/attention", {"prompt": PROMPT, "layer": layer})
    with torch.no_grad():
        expected = model(ids_of(tok, PROMPT), attentions=True).attentions[layer][0]
    got = torch.tensor(data["heads"])
    assert got.shape == (model.config.n_heads, len(PROMPT), len(PROMPT))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert got.triu(1).abs().max() == 0  # causal


def test_lens_last_row_is_the_output(lab):
    client, model, tok = lab
    data = ok(client, "/api/lens", {"prompt": PROMPT, "top_k": 2})
    n = model.config.n_layers
    assert data["layers"] == ["embed"] + [f"L{i}" for i in range(n)]
    assert len(data["top"]) == n + 1 and all(len(row) == len(PROMPT) for row in data["top"])
    with torch.no_grad():
        out = model(ids_of(tok, PROMPT), hidden_states=True)
    assert [cell[0]["id"] for cell in data["top"][-1]] == out.logits[0].argmax(-1).tolist()
    # The first row reads the embeddings; hidden_states[0] is the stream entering block 0.
    first = model.unembed(model.final_norm(out.hidden_states[0]))[0].softmax(-1)
    torch.testing.assert_close(torch.tensor([c[0]["prob"] for c in data["top"][0]]), first.max(-1).values,
                               atol=1e-5, rtol=0)


def test_patching_sweep(lab):
    client, model, tok = lab
    same = ok(client, "/api/patch", {"prompt": PROMPT, "corrupted": PROMPT})
    grid = torch.tensor(same["grid"])
    assert grid.shape == (model.config.n_layers, len(PROMPT))
    assert same["clean_prob"] == same["corrupted_prob"] and (grid - same["clean_prob"]).abs().max() < 1e-5
    j = 4  # the prompts differ at one position: patching it at layer 0 restores the clean run exactly
    corrupted = PROMPT[:j] + "b" + PROMPT[j + 1:]
    data = ok(client, "/api/patch", {"prompt": PROMPT, "corrupted": corrupted})
    grid = torch.tensor(data["grid"])
    assert data["corrupted_prob"] != data["clean_prob"]
    assert abs(grid[0, j] - data["clean_prob"]) < 1e-5
    others = torch.cat([grid[0, :j], grid[0, j + 1:]])  # same values as the corrupted run's: nothing changes
    assert (others - data["corrupted_prob"]).abs().max() < 1e-5
    assert data["answer"]["id"] == ok(client, "/api/prompt", {"prompt": PROMPT})["top_k"][0]["id"]


def test_causal_trace(lab):
    client, model, tok = lab
    body = {"prompt": PROMPT, "subject": [4, 7], "samples": 4, "seed": 3}
    data = ok(client, "/api/trace", body)
    T, n = len(PROMPT), model.config.n_layers
    hidden = torch.tensor(data["hidden"])
    assert hidden.shape == (T, n) and data["subject"] == [4, 7] and data["noise"] > 0
    assert data["corrupted_prob"] != data["clean_prob"]
    # The last layer's output at the last token is all the output reads: restoring it restores the clean answer.
    assert abs(hidden[-1, -1] - data["clean_prob"]) < 1e-5
    # Tokens before the subject never see the noise: restoring them changes nothing.
    assert (hidden[:4] - data["corrupted_prob"]).abs().max() < 1e-5
    assert ok(client, "/api/trace", body) == data  # fixed seed


def test_bad_input_is_one_line_400_and_serving_goes_on(lab):
    client, model, _ = lab
    bad(client, "/api/prompt", {"prompt": ""}, "empty")
    bad(client, "/api/prompt", {"prompt": "a" * 100}, "at most")
    bad(client, "/api/prompt", {}, "prompt")
    bad(client, "/api/attention", {"prompt": PROMPT, "layer": model.config.n_layers}, "layer must be in")
    bad(client, "/api/patch", {"prompt": PROMPT, "corrupted": "short"}, "same number of tokens")
    bad(client, "/api/trace", {"prompt": PROMPT, "subject": [3, 3]}, "subject must be")
    bad(client, "/api/trace", {"prompt": PROMPT, "subject": [0, 2], "samples": 0}, "samples")
    assert ok(client, "/api/prompt", {"prompt": PROMPT})["tokens"]


def test_cli_serves_the_page_and_refuses_bad_input(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx

    tok = char_tokenizer()
    decoderlab.save(char_model(tok), tmp_path / "m", tokenizer=tok)
    with socket.socket() as s:  # a free port (the server binds it again a moment later)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "decoderlab", "lab", str(tmp_path / "m"), "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "the lab did not start"
            try:
                info = httpx.get(f"http://127.0.0.1:{port}/api/info", timeout=5).json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert info["model"] == "m" and info["n_layers"] == 4
        r = httpx.post(f"http://127.0.0.1:{port}/api/prompt", json={"prompt": PROMPT}, timeout=30)
        assert r.status_code == 200 and "".join(r.json()["tokens"]) == PROMPT
        busy = subprocess.run([sys.executable, "-m", "decoderlab", "lab", str(tmp_path / "m"), "--port", str(port)],
                              capture_output=True, text=True, timeout=120)
        assert busy.returncode == 2 and busy.stderr.startswith("error: cannot listen"), busy.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    missing = subprocess.run([sys.executable, "-m", "decoderlab", "lab", str(tmp_path / "nope")], capture_output=True,
                             text=True, timeout=120)
    assert missing.returncode == 2 and "tokenizer" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
