"""An OpenAI-compatible HTTP server over one model: `/v1/models`, `/v1/completions` and `/v1/chat/completions`.

`create_app` builds the FastAPI app (for tests or embedding); `serve` loads a checkpoint folder and serves it (uvicorn).
The model is not thread-safe, so requests take turns on it (one asyncio lock, held for a whole request, streamed or
not); each decode step runs in a worker thread so the event loop keeps serving while a request generates.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import UserError
from .generation import stream
from .generation.engine import GenerationStep, Stream
from .model import Transformer
from .tokenizer import Tokenizer


class APIError(Exception):
    """A request the server refuses: becomes `{"error": {...}}` with this status code."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class _Sampling(BaseModel):
    """The request fields that completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(16, ge=0)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":
            return f"malformed JSON body: {err.get('ctx', {}).get('error', err.get('msg', ''))}"
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        if err.get("type") == "missing":
            parts.append(f"missing required field {loc!r}")
        else:
            parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid value')}")
    return "; ".join(dict.fromkeys(parts)) or "invalid request body"


def _content_text(content: str | list[dict[str, Any]] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, "only text content parts are supported", param="messages")
        texts.append(part["text"])
    return "".join(texts)


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _completion_tokens(tokens: int, stopped_by: int | str | None) -> int:
    """Tokens generated, counting a stop token (which the output leaves out) as the engine does."""
    return tokens + (isinstance(stopped_by, int) and not isinstance(stopped_by, bool))


def _collect(steps: Iterable[GenerationStep]) -> tuple[str, str, int]:
    """Run a one-row stream to the end: (text, finish_reason, completion tokens)."""
    pieces: list[str] = []
    n_tokens, reason, stopped_by = 0, None, None
    for step in steps:
        n_tokens += len(step.tokens[0])
        pieces.append(step.texts[0] if step.texts else "")
        if step.finish_reasons[0] is not None:
            reason, stopped_by = step.finish_reasons[0], step.stopped_by[0]
    return "".join(pieces), reason or "length", _completion_tokens(n_tokens, stopped_by)


def create_app(model: Transformer, tokenizer: Tokenizer, model_name: str, *, compile: bool = False) -> FastAPI:
    """A FastAPI app serving `model` (with `tokenizer`) under the name `model_name`, in OpenAI's API schema.
    compile: decode through `torch.compile` graphs (`generate(..., compile=True)`)."""
    app = FastAPI(title="decoderlab", version="0.1.0")
    lock = asyncio.Lock()  # the model is not thread-safe: one request at a time
    created_at = int(time.time())
    ctx = model.config.context_length

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(UserError)
    async def _user_error(request: Request, exc: UserError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    def _check_model(name: str) -> None:
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    def _start(req: _Sampling, prompt_ids: list[int], max_tokens: int | None) -> Stream:
        """Check the request and build its (lazy) stream; bad arguments raise before any model work."""
        _check_model(req.model)
        if req.n != 1:
            raise APIError(400, f"n must be 1 (this server returns one choice per request), got {req.n}", param="n")
        if not prompt_ids and tokenizer.bos_id is not None:
            prompt_ids = [tokenizer.bos_id]
        return stream(model, [prompt_ids], ctx if max_tokens is None else max_tokens,
                      temperature=req.temperature, top_p=None if req.top_p >= 1.0 else req.top_p,
                      frequency_penalty=req.frequency_penalty or None, seed=req.seed,
                      stop_strings=req.stop or None, tokenizer=tokenizer, compile=compile)

    def _usage(prompt: int, completion: int) -> dict[str, int]:
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def _events(steps: Stream, chunk: Any, include_usage: bool, base: dict[str, Any]) -> AsyncIterator[str]:
        """SSE events for one streamed request; holds the model lock until the stream ends or the client leaves."""
        n_tokens, stopped_by = 0, None
        async with lock:
            try:
                first = chunk("", None, first=True)
                if first is not None:
                    yield _sse(first)
                while (step := await run_in_threadpool(next, steps, None)) is not None:
                    n_tokens += len(step.tokens[0])
                    text, reason = (step.texts[0] if step.texts else ""), step.finish_reasons[0]
                    if reason is not None:
                        stopped_by = step.stopped_by[0]
                    if text or reason is not None:
                        yield _sse(chunk(text, reason))
                    if reason is not None:
                        break
                else:  # max_tokens=0: no step at all
                    yield _sse(chunk("", "length"))
            finally:
                steps.close()
        if include_usage:
            usage = _usage(steps.prompt_lengths[0], _completion_tokens(n_tokens, stopped_by))
            yield _sse(base | {"choices": [], "usage": usage})
        yield _sse("[DONE]")

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list",
                "data": [{"id": model_name, "object": "model", "created": created_at, "owned_by": "decoderlab"}]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> dict[str, Any]:
        _check_model(name)
        return {"id": model_name, "object": "model", "created": created_at, "owned_by": "decoderlab"}

    @app.post("/v1/completions", response_model=None)
    async def completions(req: CompletionRequest) -> dict[str, Any] | StreamingResponse:
        _check_model(req.model)
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            if len(prompt) != 1:
                raise APIError(400, "only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        steps = _start(req, ids, req.max_tokens)
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        if req.stream:
            def chunk(text: str, reason: str | None, first: bool = False) -> dict[str, Any] | None:
                if first:
                    return None
                return base | {"choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]}

            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_events(steps, chunk, include_usage, base), media_type="text/event-stream")
        async with lock:
            text, reason, n = await run_in_threadpool(_collect, steps)
        return base | {"choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}],
                       "usage": _usage(steps.prompt_lengths[0], n)}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(req: ChatCompletionRequest) -> dict[str, Any] | StreamingResponse:
        _check_model(req.model)
        if tokenizer.chat_template is None:
            raise APIError(400, f"the model {model_name!r} has no chat template, so it cannot serve chat "
                                "completions; use /v1/completions, or give its tokenizer a chat_template",
                           param="messages")
        messages = [m.model_dump(exclude_none=True) | {"content": _content_text(m.content)} for m in req.messages]
        ids = tokenizer.encode(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        steps = _start(req, ids, max_tokens)
        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model_name}
        if req.stream:
            def chunk(text: str, reason: str | None, first: bool = False) -> dict[str, Any] | None:
                delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
                return base | {"choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}]}

            include_usage = bool((req.stream_options or {}).get("include_usage"))
            return StreamingResponse(_events(steps, chunk, include_usage, base), media_type="text/event-stream")
        async with lock:
            text, reason, n = await run_in_threadpool(_collect, steps)
        message = {"role": "assistant", "content": text}
        return base | {"object": "chat.completion",
                       "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": reason}],
                       "usage": _usage(steps.prompt_lengths[0], n)}

    return app


def serve(path_or_preset: str | Path, host: str = "127.0.0.1", port: int = 8000, *, model_name: str | None = None,
          tokenizer: str | Path | None = None, device: str | None = None, dtype: str | None = None,
          log_level: Literal["critical", "error", "warning", "info", "debug"] = "info", compile: bool = False) -> None:
    """Load a checkpoint folder (and its tokenizer, or the one at `tokenizer`) and serve it until interrupted.

    On the CPU the weights are packed for decoding (`Transformer.pack`); `compile` as in `create_app`."""
    import uvicorn

    from .checkpoint import load

    tok_path = Path(tokenizer if tokenizer is not None else path_or_preset)
    if not tok_path.exists():
        raise UserError(f"serving needs a tokenizer: {path_or_preset} is not a checkpoint folder; "
                        "pass a folder holding tokenizer.json, or --tokenizer FOLDER")
    tok = Tokenizer.from_folder(tok_path)
    model = load(path_or_preset, device=device, dtype=dtype).pack()
    name = model_name or Path(str(path_or_preset)).resolve().name or str(path_or_preset)
    uvicorn.run(create_app(model, tok, name, compile=compile), host=host, port=port, log_level=log_level)
