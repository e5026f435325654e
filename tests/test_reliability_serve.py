"""The server under bad and hostile input: every case gets its status code and an OpenAI-style JSON error (one
line naming what is wrong), and the server answers a normal request right after. `decoderlab serve` with bad
flags prints one line and exits 2."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch
from serve_helpers import MODEL, bpe_model, bpe_tokenizer, char_model, char_tokenizer, error_of, running, still_serves

import decoderlab
from decoderlab.serve import create_app

pytest.importorskip("uvicorn")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: faster, and steady on a loaded machine
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    """A char model (context 64, no eos) with the default limits."""
    tok = char_tokenizer()
    with running(create_app(char_model(tok), tok, MODEL)) as url:
        yield url


@pytest.fixture(scope="module")
def bpe_base() -> Iterator[str]:
    """A byte-level BPE model with an eos token and a ChatML template."""
    tok = bpe_tokenizer()
    with running(create_app(bpe_model(tok), tok, "bpe")) as url:
        yield url


def _completion(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "prompt": "ab", "max_tokens": 2} | fields


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2} | fields


def _deep(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


JSON = {"content-type": "application/json"}

# (id, path, body: dict -> JSON, bytes -> sent as they are, headers, status, text the message holds, param)
CASES = [
    ("malformed-json", "completions", b'{"model": "tiny', JSON, 400, "malformed JSON", None),
    ("json-array", "completions", b"[1, 2]", JSON, 400, "must be a JSON object", None),
    ("json-string", "completions", b'"hello"', JSON, 400, "must be a JSON object", None),
    ("empty-body", "completions", b"", JSON, 400, "empty", None),
    ("non-utf8-body", "completions", b'{"model": "tiny-char", "prompt": "\xff\xfe\xfa"}', JSON, 400, "UTF-8", None),
    ("deep-nesting-recursion", "completions", b'{"prompt": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", JSON, 400,
     "nested too deeply", None),
    ("deep-nesting", "chat/completions", _chat(response_format=_deep(100)), {}, 400, "nested too deeply", None),
    ("nan-literal", "completions", b'{"model": "tiny-char", "prompt": "a", "temperature": NaN}', JSON, 400,
     "NaN is not valid JSON", None),
    ("infinite-number", "completions", b'{"model": "tiny-char", "prompt": "a", "temperature": 1e999}', JSON, 400,
     "out of range", None),
    ("number-of-5000-digits", "completions", b'{"model": "tiny-char", "prompt": "a", "max_tokens": ' + b"9" * 5000
     + b"}", JSON, 400, "malformed JSON", None),
    ("text-content-type", "completions", json.dumps(_completion()).encode(), {"content-type": "text/plain"}, 415,
     "must be JSON", None),
    ("form-content-type", "completions", b"model=tiny-char&prompt=a",
     {"content-type": "application/x-www-form-urlencoded"}, 415, "must be JSON", None),
    ("max-tokens-as-string", "completions", _completion(max_tokens="5"), {}, 400, "valid integer", "max_tokens"),
    ("max-tokens-as-bool", "completions", _completion(max_tokens=True), {}, 400, "valid integer", "max_tokens"),
    ("temperature-as-string", "completions", _completion(temperature="hot"), {}, 400, "valid number",
     "temperature"),
    ("stream-as-string", "completions", _completion(stream="yes"), {}, 400, "valid boolean", "stream"),
    ("prompt-as-number", "completions", _completion(prompt=5), {}, 400, "prompt", "prompt"),
    ("messages-as-string", "chat/completions", _chat(messages="hi"), {}, 400, "messages", "messages"),
    ("no-messages", "chat/completions", _chat(messages=[]), {}, 400, "at least 1", "messages"),
    ("message-without-role", "chat/completions", _chat(messages=[{"content": "hi"}]), {}, 400,
     "missing required field 'messages[0].role'", "messages[0].role"),
    ("image-content", "chat/completions",
     _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]), {},
     400, "only text content parts", "messages"),
    ("missing-model", "completions", {"prompt": "a"}, {}, 400, "missing required field 'model'", "model"),
    ("missing-prompt", "completions", {"model": MODEL}, {}, 400, "missing required field 'prompt'", "prompt"),
    ("negative-max-tokens", "completions", _completion(max_tokens=-1), {}, 400, "greater than or equal to 0",
     "max_tokens"),
    ("huge-max-tokens", "completions", _completion(max_tokens=10 ** 20), {}, 400, "at most 64", "max_tokens"),
    ("prompt-plus-max-tokens-past-context", "completions", _completion(prompt="a" * 40, max_tokens=40), {}, 400,
     "context length is 64", "max_tokens"),
    ("prompt-too-long", "completions", _completion(prompt="a" * 100), {}, 400, "context length", "prompt"),
    ("chat-prompt-too-long", "chat/completions", _chat(messages=[{"role": "user", "content": "a" * 100}]), {}, 400,
     "context length", "messages"),
    ("temperature-3", "completions", _completion(temperature=3), {}, 400, "less than or equal to 2", "temperature"),
    ("top-p-0", "completions", _completion(top_p=0), {}, 400, "greater than 0", "top_p"),
    ("seed-past-64-bits", "completions", _completion(seed=2 ** 70), {}, 400, "64-bit", "seed"),
    ("token-id-past-vocab", "completions", _completion(prompt=[99999]), {}, 400, "not a token id", "prompt"),
    ("negative-token-id", "completions", _completion(prompt=[-1]), {}, 400, "not a token id", "prompt"),
    ("huge-token-id", "completions", _completion(prompt=[10 ** 30]), {}, 400, "not a token id", "prompt"),
    ("field-name-of-100k-characters", "completions", _completion(**{"x" * 100_000: 1}), {}, 400,
     "unrecognized request field", "x" * 97 + "..."),
    ("empty-prompt-ids", "completions", _completion(prompt=[]), {}, 400, "prompt is empty", "prompt"),
    ("two-prompts", "completions", _completion(prompt=["a", "b"]), {}, 400, "one prompt per request", "prompt"),
    ("unknown-model", "completions", _completion(model="gpt-5"), {}, 404, "does not exist", "model"),
    ("unknown-model-chat", "chat/completions", _chat(model="gpt-5"), {}, 404, "does not exist", "model"),
    ("tools", "chat/completions", _chat(tools=[{"type": "function", "function": {"name": "f"}}]), {}, 400,
     "tool calling", "tools"),
    ("tool-choice", "chat/completions", _chat(tool_choice="auto"), {}, 400, "tool calling", "tool_choice"),
    ("functions", "chat/completions", _chat(functions=[{"name": "f"}]), {}, 400, "tool calling", "functions"),
    ("logit-bias", "completions", _completion(logit_bias={"5": 10}), {}, 400, "logit_bias", "logit_bias"),
    ("presence-penalty", "chat/completions", _chat(presence_penalty=0.5), {}, 400, "presence_penalty",
     "presence_penalty"),
    ("best-of", "completions", _completion(best_of=2), {}, 400, "best_of", "best_of"),
    ("echo", "completions", _completion(echo=True), {}, 400, "echo", "echo"),
    ("suffix", "completions", _completion(suffix="x"), {}, 400, "suffix", "suffix"),
    ("n-2", "chat/completions", _chat(n=2), {}, 400, "n must be 1", "n"),
    ("audio", "chat/completions", _chat(audio={"voice": "alloy", "format": "wav"}), {}, 400, "text only", "audio"),
    ("audio-modality", "chat/completions", _chat(modalities=["text", "audio"]), {}, 400, "text only",
     "modalities"),
    ("unknown-field", "completions", _completion(frobnicate=1), {}, 400, "unrecognized request field 'frobnicate'",
     "frobnicate"),
    ("unknown-message-field", "chat/completions",
     _chat(messages=[{"role": "assistant", "content": "", "tool_calls": []}]), {}, 400,
     "unrecognized request field 'messages[0].tool_calls'", "messages[0].tool_calls"),
    ("five-stops", "completions", _completion(stop=["a", "b", "c", "d", "e"]), {}, 400, "at most 4", "stop"),
    ("empty-stop", "completions", _completion(stop=""), {}, 400, "must not be empty", "stop"),
    ("long-stop", "completions", _completion(stop="x" * 300), {}, 400, "--max-stop-length", "stop"),
    ("stop-as-number", "completions", _completion(stop=5), {}, 400, "stop", "stop"),
    ("top-logprobs-without-logprobs", "chat/completions", _chat(top_logprobs=2), {}, 400, "needs logprobs",
     "top_logprobs"),
    ("top-logprobs-50", "chat/completions", _chat(logprobs=True, top_logprobs=50), {}, 400, "at most 20",
     "top_logprobs"),
    ("completion-logprobs-100", "completions", _completion(logprobs=100), {}, 400, "at most 20", "logprobs"),
    ("response-format-xml", "chat/completions", _chat(response_format={"type": "xml"}), {}, 400, "response_format",
     "response_format.type"),
    ("json-schema-missing", "chat/completions", _chat(response_format={"type": "json_schema"}), {}, 400,
     "needs a json_schema", "response_format"),
    ("response-format-without-eos", "chat/completions", _chat(response_format={"type": "json_object"}), {}, 400,
     "eos token", "response_format"),
    ("stream-options-without-stream", "completions", _completion(stream_options={"include_usage": True}), {}, 400,
     "only allowed with stream", "stream_options"),
]


@pytest.mark.parametrize("path, body, headers, status, needle, param", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_request(base, path, body, headers, status, needle, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{base}/{path}", content=content, headers=headers or JSON, timeout=60)
    error = error_of(r, status)
    assert needle in error["message"], error["message"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"
    still_serves(base)


def test_bad_request_streaming_gets_a_status_not_a_stream(base):
    for body in (_completion(prompt="a" * 100, stream=True), _chat(tools=[{"type": "function"}], stream=True)):
        r = httpx.post(f"{base}/{'completions' if 'prompt' in body else 'chat/completions'}", json=body, timeout=30)
        assert error_of(r, 400)["type"] == "invalid_request_error"
    still_serves(base)


BAD_SCHEMA_CASES = [
    ({"type": "json_schema", "json_schema": {"schema": {"type": "frobnicate"}}}, "response_format"),
    ({"type": "json_schema", "json_schema": {"schema": {"$ref": "#/nowhere"}}}, "response_format"),
    ({"type": "json_schema", "json_schema": {"schema": "not a schema"}}, "response_format.json_schema.schema"),
]


@pytest.mark.parametrize("fmt, param", BAD_SCHEMA_CASES)
def test_bad_json_schema(bpe_base, fmt, param):
    r = httpx.post(f"{bpe_base}/chat/completions", json=_chat(model="bpe", response_format=fmt), timeout=60)
    error = error_of(r, 400)
    assert error["param"] == param and "\n" not in error["message"]
    still_serves(bpe_base, "bpe")


def test_special_token_text_in_a_role(bpe_base):
    r = httpx.post(f"{bpe_base}/chat/completions", timeout=30,
                   json=_chat(model="bpe", messages=[{"role": "user<|im_end|>", "content": "hi"}]))
    assert "special-token text" in error_of(r, 400)["message"]
    still_serves(bpe_base, "bpe")


@pytest.mark.parametrize("method, path, status", [("POST", "/v1/nothing", 404), ("GET", "/v1/completions", 405),
                                                  ("DELETE", "/v1/models", 405), ("GET", "/v1/models/gpt-5", 404),
                                                  ("GET", "/docs", 404)])
def test_routes_that_do_not_exist(base, method, path, status):
    r = httpx.request(method, base.removesuffix("/v1") + path, timeout=30)
    error_of(r, status)
    still_serves(base)


def _port(base: str) -> int:
    return int(base.rsplit(":", 1)[1].split("/")[0])


def _raw(port: int, request: bytes) -> tuple[int, dict[str, Any]]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while not data.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def test_oversized_bodies(base):
    port = _port(base)
    status, body = _raw(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Content-Length: 50000000\r\n\r\n")
    assert status == 413 and body["error"]["code"] == "request_too_large"
    chunk = b"[" * 100_000
    chunked = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(11)) + b"0\r\n\r\n"
    status, body = _raw(port, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                              b"Transfer-Encoding: chunked\r\n\r\n" + chunked)
    assert status == 413 and "1,048,576" in body["error"]["message"]
    still_serves(base)


def test_bad_api_keys():
    tok = char_tokenizer()
    with running(create_app(char_model(tok), tok, MODEL, api_key="k3y")) as url:
        for headers in ({}, {"Authorization": "Bearer"}, {"Authorization": "Bearer k3"},
                        {"Authorization": "Bearer k3y2"}, {"Authorization": "Basic k3y"}, {"Authorization": "k3y"},
                        {"X-Api-Key": "k3y"}):
            for method, path in (("POST", "completions"), ("GET", "models"), ("POST", "nothing")):
                r = httpx.request(method, f"{url}/{path}", json=_completion(), headers=headers, timeout=30)
                assert error_of(r, 401)["code"] == "invalid_api_key"
        still_serves(url, headers={"Authorization": "Bearer k3y"})
    with pytest.raises(decoderlab.UserError, match="API key"):
        create_app(char_model(tok), tok, MODEL, api_key="  ")


# ---------------------------------------------------------------- decoderlab serve with bad flags


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> str:
    folder = tmp_path_factory.mktemp("serve") / "m"
    tok = char_tokenizer()
    decoderlab.save(char_model(tok), folder, tokenizer=tok)
    return str(folder)


BAD_FLAGS = [
    (["--port", "99999"], "--port must be between 0 and 65535"),
    (["--port", "-1"], "--port must be between 0 and 65535"),
    (["--host", "no-such-host.invalid"], "cannot listen on 'no-such-host.invalid'"),
    (["--max-queue", "-1"], "--max-queue must be an integer >= 0"),
    (["--max-body-bytes", "0"], "--max-body-bytes must be an integer >= 1"),
    (["--default-max-tokens", "0"], "--default-max-tokens must be an integer >= 1"),
    (["--max-stop-length", "0"], "--max-stop-length must be an integer >= 1"),
    (["--queue-timeout", "0"], "--queue-timeout must be a number of seconds > 0"),
    (["--queue-timeout", "nan"], "--queue-timeout must be a number of seconds > 0"),
    (["--api-key", ""], "--api-key (or DECODERLAB_API_KEY) is empty"),
    (["--tokenizer", "/nonexistent/folder"], "serving needs a tokenizer"),
]


@pytest.mark.parametrize("flags, needle", BAD_FLAGS, ids=[" ".join(f) for f, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_errors(model_folder, flags, needle, monkeypatch, capsys):
    from decoderlab import cli
    from decoderlab.serve import launch

    def must_not_serve(*args, **kwargs):
        raise AssertionError("the server started")

    monkeypatch.setattr(launch._Uvicorn, "run", must_not_serve)
    monkeypatch.setattr(sys, "argv", ["decoderlab", "serve", model_folder, *flags])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("error: ") and err.strip().count("\n") == 0 and needle in err, err


def test_bad_port_from_the_shell(model_folder):
    """As a user runs it: `decoderlab serve PATH --port 99999`, and a port another process holds."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases = [(["--port", "99999"], "--port must be between 0 and 65535, got 99999"),
                 (["--port", str(busy.getsockname()[1])], "cannot listen on 127.0.0.1")]
        procs = [subprocess.Popen([sys.executable, "-m", "decoderlab", "serve", model_folder, *flags],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for flags, _ in cases]
        try:
            for proc, (_, needle) in zip(procs, cases, strict=True):
                err = proc.communicate(timeout=120)[1]
                assert proc.returncode == 2 and err.startswith("error: ") and err.strip().count("\n") == 0, err
                assert needle in err and "Traceback" not in err, err
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
