"""The OpenAI-compatible server, end to end: a real uvicorn server on loopback, driven by the official client."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
import torch

import decoderlab
from decoderlab.serve import create_app

uvicorn = pytest.importorskip("uvicorn")

MODEL = "tiny-char"
TEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ :\n.,!?'"
TEMPLATE = ("{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module", params=[False, True], ids=["eager", "compiled"])
def server(request) -> Iterator[dict]:
    torch.manual_seed(0)
    tok = decoderlab.Tokenizer.train_char(texts=[TEXT + "<>"])
    tok.chat_template = TEMPLATE
    model = decoderlab.Transformer(decoderlab.ModelConfig.preset("char-baby", vocab_size=tok.vocab_size))
    app = create_app(model, tok, MODEL, compile=request.param)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    base = f"http://127.0.0.1:{port}/v1"
    client = openai.OpenAI(base_url=base, api_key="x", max_retries=0, timeout=30)
    try:
        yield {"base": base, "client": client, "tokenizer": tok, "model": model}
    finally:
        client.close()
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive()


def test_models_list(server):
    models = server["client"].models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_completion_greedy_and_seeded(server):
    client = server["client"]
    greedy = [client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0) for _ in range(2)]
    assert greedy[0].choices[0].text == greedy[1].choices[0].text
    assert len(greedy[0].choices[0].text) == 12  # a char tokenizer with no eos: 12 characters
    assert greedy[0].choices[0].finish_reason == "length"
    assert greedy[0].object == "text_completion" and greedy[0].model == MODEL
    assert greedy[0].usage.prompt_tokens == 5 and greedy[0].usage.completion_tokens == 12
    assert greedy[0].usage.total_tokens == 17

    seeded = [client.completions.create(model=MODEL, prompt="Hello", max_tokens=20, temperature=1.0, seed=s)
              for s in (7, 7, 8)]
    assert seeded[0].choices[0].text == seeded[1].choices[0].text
    assert seeded[0].choices[0].text != seeded[2].choices[0].text

    # A prompt as token ids gives the same as the text.
    ids = server["tokenizer"].encode("Hello")
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == greedy[0].choices[0].text


def test_completion_matches_engine_and_stop(server):
    client, tok, model = server["client"], server["tokenizer"], server["model"]
    expected = decoderlab.generate(model, [tok.encode("abc")], 10, tokenizer=tok).texts[0]
    got = client.completions.create(model=MODEL, prompt="abc", max_tokens=10, temperature=0)
    assert got.choices[0].text == expected
    stop = expected[3:5]
    cut = client.completions.create(model=MODEL, prompt="abc", max_tokens=10, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == expected[:expected.find(stop)]


def test_chat_completion(server):
    client, tok, model = server["client"], server["tokenizer"], server["model"]
    messages = [{"role": "user", "content": "Hi there"}]
    got = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0)
    ids = tok.encode(tok.apply_chat_template(messages))
    expected = decoderlab.generate(model, [ids], 8, tokenizer=tok).texts[0]
    assert got.object == "chat.completion"
    assert got.choices[0].message.role == "assistant"
    assert got.choices[0].message.content == expected
    assert got.usage.prompt_tokens == len(ids) and got.usage.completion_tokens == 8


def test_streaming_matches_non_streaming(server):
    client = server["client"]
    plain = client.completions.create(model=MODEL, prompt="Good day", max_tokens=15, temperature=0)
    chunks = list(client.completions.create(model=MODEL, prompt="Good day", max_tokens=15, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == plain.choices[0].text
    assert chunks[-1].choices[0].finish_reason == "length"

    messages = [{"role": "user", "content": "Tell me"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=15, temperature=0)
    events = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=15, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    content = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert content == chat.choices[0].message.content
    assert events[0].choices[0].delta.role == "assistant"
    assert events[-1].usage.completion_tokens == 15 and events[-1].usage.prompt_tokens == chat.usage.prompt_tokens


def test_sse_wire_format(server):
    body = {"model": MODEL, "prompt": "ab", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.Client(timeout=30) as http:
        r = http.post(f"{server['base']}/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = r.text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])


def test_concurrent_streams(server):
    client = server["client"]
    prompts = ["Alpha", "Bravo", "Charlie", "Delta"]
    expected = {p: client.completions.create(model=MODEL, prompt=p, max_tokens=20, temperature=0).choices[0].text
                for p in prompts}
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def run(p: str) -> None:
        try:
            chunks = client.completions.create(model=MODEL, prompt=p, max_tokens=20, temperature=0, stream=True)
            results[p] = "".join(c.choices[0].text for c in chunks)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors
    assert results == expected


@pytest.mark.parametrize("path, body, status, needle", [
    ("completions", {"model": "nope", "prompt": "a"}, 404, "does not exist"),
    ("completions", {"model": MODEL, "prompt": "a" * 100}, 400, "context length"),
    ("completions", {"model": MODEL, "prompt": "a", "max_tokens": -1}, 400, "max_tokens"),
    ("completions", {"model": MODEL, "prompt": "a", "temperature": 3}, 400, "temperature"),
    ("completions", {"model": MODEL, "prompt": "a", "temperature": -0.5}, 400, "temperature"),
    ("completions", {"model": MODEL}, 400, "prompt"),
    ("completions", {"prompt": "a"}, 400, "model"),
    ("completions", {"model": MODEL, "prompt": "a", "n": 2}, 400, "n must be 1"),
    ("completions", {"model": MODEL, "prompt": [1000]}, 400, "not a token id"),
    ("completions", {"model": MODEL, "prompt": "a", "stop": [""]}, 400, "stop"),
    ("completions", {"model": MODEL, "prompt": "a" * 100, "stream": True}, 400, "context length"),
    ("chat/completions", {"model": MODEL}, 400, "messages"),
    ("chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "a"}]}, 404, "does not exist"),
    ("chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": -3},
     400, "max_tokens"),
])
def test_bad_requests(server, path, body, status, needle):
    with httpx.Client(timeout=30) as http:
        r = http.post(f"{server['base']}/{path}", json=body)
        assert r.status_code == status, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and needle in error["message"]
        ok = http.post(f"{server['base']}/completions", json={"model": MODEL, "prompt": "a", "max_tokens": 2})
        assert ok.status_code == 200 and len(ok.json()["choices"][0]["text"]) == 2


def test_malformed_json_and_client_errors(server):
    with httpx.Client(timeout=30) as http:
        r = http.post(f"{server['base']}/completions", content=b'{"model": "tiny',
                      headers={"content-type": "application/json"})
        assert r.status_code == 400
        assert r.json()["error"]["type"] == "invalid_request_error"
        assert "malformed JSON" in r.json()["error"]["message"]
        r = http.post(f"{server['base']}/completions", content=b"[1, 2]", headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()
    client = server["client"]
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="a", max_tokens=-1)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "a"}])
    assert client.completions.create(model=MODEL, prompt="a", max_tokens=3).choices[0].text


def test_chat_without_template(server):
    tok = server["tokenizer"]
    saved, tok.chat_template = tok.chat_template, None
    try:
        with httpx.Client(timeout=30) as http:
            r = http.post(f"{server['base']}/chat/completions",
                          json={"model": MODEL, "messages": [{"role": "user", "content": "a"}]})
        assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]
    finally:
        tok.chat_template = saved
    chat = server["client"].chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a"}],
                                                    max_tokens=2)
    assert chat.choices[0].finish_reason == "length"


def test_client_leaving_mid_stream_frees_the_model(server):
    client = server["client"]
    with client.completions.create(model=MODEL, prompt="abc", max_tokens=60, temperature=0, stream=True) as chunks:
        next(iter(chunks))
    done = client.completions.create(model=MODEL, prompt="abc", max_tokens=5, temperature=0)
    assert len(done.choices[0].text) == 5


def test_event_loop_answers_while_a_stream_holds_the_model(server):
    client = server["client"]
    with client.completions.create(model=MODEL, prompt="abc", max_tokens=60, temperature=0, stream=True) as chunks:
        it = iter(chunks)
        first = next(it).choices[0].text
        assert [m.id for m in client.models.list().data] == [MODEL]  # served while the stream holds the lock
        rest = "".join(c.choices[0].text for c in it)
    full = client.completions.create(model=MODEL, prompt="abc", max_tokens=60, temperature=0).choices[0].text
    assert first + rest == full
