"""The lab page's app: one static page (`static/`, no CDN) and JSON endpoints over `compute`.

Endpoints (POST bodies are JSON; answers are the dicts documented in `compute`):
- `GET /` the page; `GET /static/...` its script and style
- `GET /api/info` -> {"model", "n_layers", "n_heads", "context_length", "max_tokens"}
- `POST /api/prompt` {"prompt", "top_k"=10} -> tokens and the next token's top-k
- `POST /api/attention` {"prompt", "layer"} -> every head's pattern in that layer
- `POST /api/lens` {"prompt", "top_k"=3} -> the logit lens table
- `POST /api/patch` {"prompt", "corrupted"} -> a resid_pre layer x position patching sweep
- `POST /api/trace` {"prompt", "subject": [start, end], "samples"=5, "seed"=0} -> a causal trace
Bad input answers 400 with {"error": {"message": "..."}} (one line) and the server keeps serving. The model runs
one request at a time (hooks are set on the model itself), in a worker thread so the event loop stays free.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool
from starlette.responses import FileResponse, JSONResponse
from starlette.staticfiles import StaticFiles

from ..errors import UserError
from ..model import Transformer
from ..tokenizer import Tokenizer
from . import compute


class PromptBody(BaseModel):
    prompt: str
    top_k: int = Field(10, ge=1, le=100)


class AttentionBody(BaseModel):
    prompt: str
    layer: int = 0


class LensBody(BaseModel):
    prompt: str
    top_k: int = Field(3, ge=1, le=20)


class PatchBody(BaseModel):
    prompt: str
    corrupted: str


class TraceBody(BaseModel):
    prompt: str
    subject: tuple[int, int]
    samples: int = 5
    seed: int = 0


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": {"message": " ".join(str(message).split())}}, status_code=status)


def create_lab_app(model: Transformer, tokenizer: Tokenizer, name: str = "model") -> FastAPI:
    """The lab app for `model` (put in eval mode) and its tokenizer."""
    model.eval()
    app = FastAPI(title=f"decoderlab lab: {name}", docs_url=None, redoc_url=None, openapi_url=None)
    static = resources.files("decoderlab.lab") / "static"
    app.mount("/static", StaticFiles(directory=str(static)), name="static")
    lock = threading.Lock()

    async def run(fn: Callable[..., dict[str, Any]], *args: Any) -> JSONResponse:
        def locked() -> dict[str, Any]:
            with lock:
                return fn(model, tokenizer, *args)

        try:
            return JSONResponse(await run_in_threadpool(locked))
        except UserError as e:
            return _error(400, str(e))

    @app.exception_handler(RequestValidationError)
    async def bad_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or "body"
        return _error(400, f"{where}: {first.get('msg', 'invalid request body')}")

    @app.get("/")
    async def page() -> FileResponse:
        return FileResponse(str(static / "index.html"))

    @app.get("/api/info")
    async def info() -> dict[str, Any]:
        c = model.config
        return {"model": name, "n_layers": c.n_layers, "n_heads": c.n_heads, "context_length": c.context_length,
                "max_tokens": min(compute.MAX_TOKENS, c.context_length)}

    @app.post("/api/prompt")
    async def prompt(body: PromptBody) -> JSONResponse:
        return await run(compute.prompt_view, body.prompt, body.top_k)

    @app.post("/api/attention")
    async def attention(body: AttentionBody) -> JSONResponse:
        return await run(compute.attention_view, body.prompt, body.layer)

    @app.post("/api/lens")
    async def lens(body: LensBody) -> JSONResponse:
        return await run(compute.lens_view, body.prompt, body.top_k)

    @app.post("/api/patch")
    async def patch(body: PatchBody) -> JSONResponse:
        return await run(compute.patch_view, body.prompt, body.corrupted)

    @app.post("/api/trace")
    async def trace(body: TraceBody) -> JSONResponse:
        return await run(compute.trace_view, body.prompt, tuple(body.subject), body.samples, body.seed)

    return app
