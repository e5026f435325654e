"""The OpenAI-compatible app: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

A generation request goes: body (read by `guard`, bounded) -> parsed, checked and tokenized in a worker thread
(`Server.prepare`, so a large body never stalls the event loop) -> a turn on the model (`turns`, bounded queue)
-> decode steps, each in a worker thread, with a check between two steps that the client is still there and the
server is not shutting down -> one JSON answer, or SSE chunks. A streamed request runs its first step (the
prompt's forward pass, where a cache that does not fit fails) before answering, so such failures get a proper
status; a failure after that becomes an SSE error event followed by `data: [DONE]`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from ..errors import UserError
from ..generation import DecoderFactory, GenerationStep, Stream, rsd_decoder, stream
from ..model import Transformer
from ..tokenizer import Tokenizer
from .errors import APIError, api_error
from .guard import Guard
from .limits import ServerLimits
from .logprobs import TokenText, chat_logprobs, completion_logprobs
from .protocol import (
    BaseRequest,
    ChatCompletionRequest,
    CompletionRequest,
    check_supported,
    message_dicts,
    parse_body,
    parse_request,
)
from .turns import ClientLeft, ClientWatch, Turn, Turns

log = logging.getLogger("decoderlab.serve")


def _sse(payload: dict[str, Any] | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


@dataclass
class _Job:
    """A checked request, ready to run: its lazy stream and what its answer needs."""

    chat: bool
    steps: Stream
    prompt_tokens: int
    logprobs: bool
    stream: bool
    include_usage: bool


class _EventStream(Response):
    """An SSE response over `events`; `on_close` runs when it ends, however it ends (the turn's release)."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        # No super().__init__: with no `body`, init_headers sets no Content-Length (the length is unknown).
        self.status_code, self.background = 200, None
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.events, self.on_close = events, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            await self.events.aclose()
            self.on_close()


class Server:
    """One model served: checks requests against `limits`, and runs them a turn at a time."""

    def __init__(self, model: Transformer, tokenizer: Tokenizer, model_name: str, limits: ServerLimits,
                 compile: bool, speculative: DecoderFactory | None = None) -> None:
        self.model, self.tokenizer, self.model_name, self.limits, self.compile = (
            model, tokenizer, model_name, limits, compile)
        self.speculative = speculative
        self.turns = Turns(limits.max_queue, limits.queue_timeout)
        self.token_text = TokenText(tokenizer)
        self.created = int(time.time())

    # ------------------------------------------------------------------ checking a request (worker thread)

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def prepare(self, chat: bool, body: bytes, content_type: str | None) -> _Job:
        """Parse, check and tokenize a request; build its (lazy) stream. Runs in a worker thread."""
        req = parse_request(ChatCompletionRequest if chat else CompletionRequest, parse_body(body, content_type))
        self.check_model(req.model)
        check_supported(req)
        ids = self._chat_ids(req) if chat else self._prompt_ids(req)
        ctx = self.model.config.context_length
        prompt_limit = min(self.limits.max_prompt_tokens or ctx - 1, ctx - 1)
        if len(ids) > prompt_limit:
            flag = ", --max-prompt-tokens" if self.limits.max_prompt_tokens else ""
            raise APIError(400, f"the prompt is {len(ids)} tokens; this server takes at most {prompt_limit} (the "
                                f"model's context length is {ctx}{flag}); shorten it",
                           param="messages" if chat else "prompt", code="context_length_exceeded")
        max_tokens = self._max_tokens(req, len(ids), chat)
        stops = self._stops(req.stop)
        if req.seed is not None and not -(2 ** 63) <= req.seed < 2 ** 64:
            raise APIError(400, f"seed must be a 64-bit integer, got {req.seed}", param="seed")
        k = self._top_logprobs(req, chat)
        grammar = self._grammar(req)
        sampling = self._sampling(req)
        try:
            steps = stream(self.model, [ids], max_tokens, **sampling, seed=req.seed,
                           stop_strings=stops or None, tokenizer=self.tokenizer, compile=self.compile,
                           grammar=grammar, logprobs=k, decoder=self._decoder(sampling, grammar))
        except UserError as e:
            if grammar is not None and "grammar" in str(e):
                raise APIError(400, f"response_format: {e}", param="response_format") from None
            raise
        return _Job(chat, steps, len(ids), k is not None, bool(req.stream),
                    bool(req.stream_options and req.stream_options.include_usage))

    def _prompt_ids(self, req: CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise APIError(400, f"only one prompt per request is supported, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)  # with the tokenizer's special tokens (a Llama's BOS), as HF does
        else:
            ids = list(prompt)  # token ids are taken as they are
            vocab = self.model.config.vocab_size
            if (bad := next((i for i in ids if not 0 <= i < vocab), None)) is not None:
                raise APIError(400, f"the prompt holds {bad}, not a token id in [0, {vocab})", param="prompt")
        if not ids and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id]
        if not ids:
            raise APIError(400, "the prompt is empty (and the tokenizer has no BOS token to start from)",
                           param="prompt")
        return ids

    def _chat_ids(self, req: ChatCompletionRequest) -> list[int]:
        if self.tokenizer.chat_template is None:
            raise APIError(400, f"the model {self.model_name!r} has no chat template, so it cannot serve chat "
                                "completions; use /v1/completions, or give its tokenizer a chat_template",
                           param="messages")
        try:
            # Special-token text typed in a message's content is read as plain text: content cannot forge turns.
            return self.tokenizer.encode_chat(message_dicts(req.messages), add_generation_prompt=True)
        except UserError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None

    def _max_tokens(self, req: BaseRequest, prompt: int, chat: bool) -> int:
        ctx, limits = self.model.config.context_length, self.limits
        cap = min(limits.max_tokens_cap or ctx, ctx)
        name, asked = "max_tokens", req.max_tokens
        if chat and req.max_completion_tokens is not None:
            name, asked = "max_completion_tokens", req.max_completion_tokens
        if asked is None:
            gc_default = getattr(getattr(self.model, "generation_config", None), "max_new_tokens", None)
            return min(limits.default_max_tokens, gc_default or limits.default_max_tokens, cap, ctx - prompt)
        if asked > cap:
            why = "--max-tokens-cap" if cap < ctx else "the model's context length"
            raise APIError(400, f"{name} is {asked}; this server allows at most {cap} ({why})", param=name)
        if prompt + asked > ctx:
            raise APIError(400, f"the model's context length is {ctx} tokens, and the prompt ({prompt} tokens) plus "
                                f"{name} ({asked}) asks for {prompt + asked}; lower {name} or shorten the prompt",
                           param=name, code="context_length_exceeded")
        return asked

    def _stops(self, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > self.limits.max_stop:
            raise APIError(400, f"stop holds {len(stops)} strings; at most {self.limits.max_stop} are allowed "
                                "(--max-stop)", param="stop")
        for s in stops:
            if not s:
                raise APIError(400, "stop strings must not be empty", param="stop")
            if len(s) > self.limits.max_stop_length:
                raise APIError(400, f"a stop string is {len(s)} characters; at most {self.limits.max_stop_length} "
                                    "are allowed (--max-stop-length)", param="stop")
        return stops

    def _top_logprobs(self, req: BaseRequest, chat: bool) -> int | None:
        if chat:
            k, name = (req.top_logprobs or 0) if req.logprobs else None, "top_logprobs"
        else:
            k, name = req.logprobs, "logprobs"
        if k is not None and k > self.limits.max_top_logprobs:
            raise APIError(400, f"{name} is {k}; at most {self.limits.max_top_logprobs} alternatives per token "
                                "are allowed (--max-top-logprobs)", param=name)
        return k

    def _grammar(self, req: BaseRequest) -> dict[str, Any] | None:
        rf = req.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object":
            return {"json_schema": {"type": "object"}}
        return {"json_schema": rf.json_schema.schema_}

    def _decoder(self, sampling: dict[str, Any], grammar: dict[str, Any] | None) -> DecoderFactory | None:
        """The speculative decoder for a request, if the server has one and the request allows it: a grammar
        (response_format) or repetition/frequency penalties decode plainly. Either way the output follows plain
        decoding's distribution (and is plain greedy's at temperature 0)."""
        if self.speculative is None or grammar is not None:
            return None
        if sampling["repetition_penalty"] != 1.0 or sampling["frequency_penalty"]:
            return None
        return self.speculative

    def _sampling(self, req: BaseRequest) -> dict[str, Any]:
        """Sampling arguments: the request's, else those the checkpoint's generation_config.json sets (as vLLM
        does), else OpenAI's defaults (temperature 1, top_p 1)."""
        gc = getattr(self.model, "generation_config", None)

        def pick(name: str, default: Any) -> Any:
            value = getattr(req, name)
            if value is None and gc is not None:
                value = getattr(gc, name, None)
            return default if value is None else value

        # Every value explicit: `stream` reads None as "the checkpoint's default", which was resolved here already.
        # top_k 0, top_p 1, min_p 0 and penalties of 1 / 0 switch a filter off.
        top_k = pick("top_k", 0)
        return {"temperature": pick("temperature", 1.0), "top_p": pick("top_p", 1.0),
                "top_k": top_k if top_k > 0 else 0, "min_p": pick("min_p", 0.0),
                "repetition_penalty": pick("repetition_penalty", 1.0),
                "frequency_penalty": req.frequency_penalty or 0.0}

    # ------------------------------------------------------------------ running it (event loop)

    async def next_step(self, steps: Stream, watch: ClientWatch) -> GenerationStep | None:
        """One decode step, in a worker thread, unless the client has left or the server is shutting down."""
        if watch.left.is_set():
            raise ClientLeft()
        if self.turns.closed:
            raise APIError(503, "the server is shutting down", "server_error", code="shutting_down")
        return await run_in_threadpool(next, steps, None)

    async def handle(self, request: Request, chat: bool) -> Response:
        body = await request.body()
        watch = ClientWatch(request.receive)
        steps: Stream | None = None
        turn: Turn | None = None
        streaming = False
        try:
            job = await run_in_threadpool(self.prepare, chat, body, request.headers.get("content-type"))
            steps = job.steps
            turn = await self.turns.acquire(watch)
            if job.stream:
                first = await self.next_step(steps, watch)
                response = _EventStream(self.events(job, first, watch),
                                        on_close=lambda: self._finish(job.steps, turn, watch))
                streaming = True
                return response
            return JSONResponse(await self.complete(job, watch))
        except ClientLeft:
            return Response(status_code=499)  # nobody reads it
        except Exception as e:
            raise self.error(e) from None
        finally:
            if not streaming:
                self._finish(steps, turn, watch)

    def _finish(self, steps: Stream | None, turn: Turn | None, watch: ClientWatch) -> None:
        if steps is not None:
            steps.close()  # frees the KV cache before the next request allocates its own
        if turn is not None:
            turn.release()
        watch.stop()

    def error(self, exc: BaseException) -> APIError:
        err = api_error(exc)
        if err.status >= 500 and err.code not in ("out_of_memory", "shutting_down"):
            log.error("request failed", exc_info=exc)
        return err

    def _base(self, job: _Job) -> dict[str, Any]:
        kind = ("chatcmpl-", "chat.completion.chunk") if job.chat else ("cmpl-", "text_completion")
        return {"id": f"{kind[0]}{uuid.uuid4().hex}", "object": kind[1], "created": int(time.time()),
                "model": self.model_name}

    def _usage(self, job: _Job, tokens: int, stopped_by: int | str | None) -> dict[str, int]:
        # A stop token ends the output without being part of it, but was generated: it counts.
        completion = tokens + (isinstance(stopped_by, int) and not isinstance(stopped_by, bool))
        return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion,
                "total_tokens": job.prompt_tokens + completion}

    def _logprobs(self, job: _Job, items: list, offset: int, chunk: bool) -> dict[str, Any] | None:
        if not job.logprobs:
            return None
        if job.chat:
            return {"content": chat_logprobs(items, self.token_text)} | ({} if chunk else {"refusal": None})
        return completion_logprobs(items, self.token_text, offset)

    async def complete(self, job: _Job, watch: ClientWatch) -> dict[str, Any]:
        """Run a request to the end and answer it in one piece."""
        pieces: list[str] = []
        items: list = []
        tokens, reason, stopped_by = 0, None, None
        while (step := await self.next_step(job.steps, watch)) is not None:
            tokens += len(step.tokens[0])
            pieces.append(step.texts[0])
            items += step.logprobs[0] if step.logprobs else []
            if step.finish_reasons[0] is not None:
                reason, stopped_by = step.finish_reasons[0], step.stopped_by[0]
                break
        text, reason = "".join(pieces), reason or "length"
        logprobs = self._logprobs(job, items, 0, chunk=False)
        if job.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}
        base = self._base(job) | ({"object": "chat.completion"} if job.chat else {})
        return base | {"choices": [choice], "usage": self._usage(job, tokens, stopped_by)}

    async def events(self, job: _Job, first: GenerationStep | None, watch: ClientWatch) -> AsyncIterator[str]:
        """A streamed request's SSE events, from its first step on; ends with `data: [DONE]`, after an error
        event if generation fails."""
        base = self._base(job)

        def chunk(text: str, reason: str | None, items: list, offset: int) -> dict[str, Any]:
            logprobs = self._logprobs(job, items, offset, chunk=True)
            if job.chat:
                choice = {"index": 0, "delta": {"content": text} if text else {}, "logprobs": logprobs,
                          "finish_reason": reason}
            else:
                choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": reason}
            return base | {"choices": [choice]}

        tokens, stopped_by, offset = 0, None, 0
        try:
            if job.chat:
                yield _sse(base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]})
            step, reason = first, None
            while step is not None:
                tokens += len(step.tokens[0])
                text, reason = step.texts[0], step.finish_reasons[0]
                items = step.logprobs[0] if step.logprobs else []
                if reason is not None:
                    stopped_by = step.stopped_by[0]
                if text or items or reason is not None:
                    yield _sse(chunk(text, reason, items, offset))
                    offset += sum(len(self.token_text(lp.token)[0]) for lp in items)
                if reason is not None:
                    break
                step = await self.next_step(job.steps, watch)
            if reason is None:  # max_tokens 0: no step at all
                yield _sse(chunk("", "length", [], offset))
            if job.include_usage:
                yield _sse(base | {"choices": [], "usage": self._usage(job, tokens, stopped_by)})
        except ClientLeft:
            return
        except Exception as e:
            yield _sse(self.error(e).body())
        yield _sse("[DONE]")


def create_app(model: Transformer, tokenizer: Tokenizer, model_name: str, *, compile: bool = False,
               limits: ServerLimits | None = None, api_key: str | None = None, draft: Transformer | None = None,
               tree: int | Sequence[int] = (3, 2, 1), depth: int | None = None) -> FastAPI:
    """A FastAPI app serving `model` (with `tokenizer`) under the name `model_name`, in OpenAI's API schema.

    limits: what a request may ask for and how many may wait (`ServerLimits`; the defaults are safe on a laptop).
    api_key: when set, every /v1 route needs `Authorization: Bearer <api_key>` (401 without it).
    compile: decode through `torch.compile` graphs (`generate(..., compile=True)`).
    A model with objective "diffusion" or "mlm" is sampled by masked diffusion (`generation.diffusion`, one
    denoising step per token, blocks of 32), as `generate` does.
    draft: a small model with the same vocabulary: requests decode by Recursive Speculative Decoding
    (`rsd_decoder(draft, tree, depth)`: `tree` children per node, or per-depth widths), whose output follows the
    same distribution as plain sampling (plain greedy at temperature 0); requests with response_format or
    repetition/frequency penalties decode plainly.
    `app.state.server.turns.close()` makes running generations stop at their next step (shutdown).
    """
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise UserError("the API key must be a non-empty string")
    if model.config.objective != "causal" and (compile or draft is not None):
        raise UserError(f"a model with objective {model.config.objective!r} is served by masked diffusion sampling "
                        "(one step per token); leave out compile and the draft model")
    speculative = None
    if draft is not None:
        if compile:
            raise UserError("compile applies to plain decoding; leave it out when serving with a draft model")
        if not isinstance(draft, Transformer) or draft.config.vocab_size != model.config.vocab_size:
            got = draft.config.vocab_size if isinstance(draft, Transformer) else type(draft).__name__
            raise UserError(f"the draft model must be a decoderlab Transformer with the target's vocabulary "
                            f"({model.config.vocab_size} tokens), got {got}; use a draft trained with the same "
                            "tokenizer")
        speculative = rsd_decoder(draft, tree, depth)
    server = Server(model, tokenizer, model_name, limits or ServerLimits(), compile, speculative)
    app = FastAPI(title="decoderlab", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(Guard, api_key=api_key, max_body_bytes=server.limits.max_body_bytes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return APIError(400, f"invalid request: {exc.errors()[0].get('msg', '')}").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        what = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = f"{exc.detail}: {request.method} {request.url.path}" if what else str(exc.detail)
        return APIError(exc.status_code, message, code=what).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return server.error(exc).response()

    def model_card() -> dict[str, Any]:
        return {"id": model_name, "object": "model", "created": server.created, "owned_by": "decoderlab",
                "context_length": model.config.context_length}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str) -> dict[str, Any]:
        server.check_model(name)
        return model_card()

    @app.post("/v1/completions", response_model=None)
    async def completions(request: Request) -> Response:
        return await server.handle(request, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        return await server.handle(request, chat=True)

    return app

