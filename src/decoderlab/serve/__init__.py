"""An OpenAI-compatible HTTP server over one model: `/v1/models`, `/v1/completions`, `/v1/chat/completions`.

`create_app` builds the FastAPI app (for tests or embedding); `serve` loads a checkpoint folder and serves it with
uvicorn. Safe to expose: an optional API key, bounded bodies, prompts, outputs and queue (`ServerLimits`), work
stopped when its client leaves or the server shuts down, and every failure an OpenAI-style JSON error.

Modules: `app` (routes, running a request), `protocol` (the request schema and its checks), `guard` (API key,
body limit), `turns` (the model's queue, client disconnects), `logprobs` (OpenAI's logprob shapes), `limits`,
`errors`, `launch` (`serve`).
"""

from .app import Server, create_app
from .errors import APIError
from .launch import serve
from .limits import ServerLimits

__all__ = ["APIError", "Server", "ServerLimits", "create_app", "serve"]
