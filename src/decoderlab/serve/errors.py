"""Errors as OpenAI's API writes them: `{"error": {"message", "type", "param", "code"}}` with an HTTP status.

`APIError` is a refusal the server chose (a bad field, a full queue); `api_error` turns anything else raised while
serving into one: a `UserError` from the library is the caller's fault (400), running out of memory is 503 (try
later or ask for less), anything else is a bug (500), reported in one line while the server keeps serving.
"""

from __future__ import annotations

from typing import Any

import torch
from starlette.responses import JSONResponse

from ..errors import UserError


class APIError(Exception):
    """A request the server refuses: becomes `{"error": {...}}` with this status code (and these headers)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        message = _one_line(message)  # a request may echo something huge or multi-line back: keep it short
        param = None if param is None else _one_line(param, 100)
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _one_line(text: str, limit: int = 500) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether `exc` is an allocation failure (torch raises a plain RuntimeError for the CPU's)."""
    if isinstance(exc, (MemoryError, torch.OutOfMemoryError)):
        return True
    return isinstance(exc, RuntimeError) and ("can't allocate memory" in str(exc) or "out of memory" in str(exc))


def api_error(exc: BaseException, param: str | None = None) -> APIError:
    """The `APIError` that `exc`, raised while handling a request, is answered with."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, UserError):
        return APIError(400, _one_line(str(exc)), param=param)
    if is_out_of_memory(exc):
        return APIError(503, "the server ran out of memory for this request; retry later, or ask for fewer tokens "
                             f"(max_tokens) or a shorter prompt ({_one_line(str(exc), 200)})",
                        "server_error", code="out_of_memory", headers={"Retry-After": "1"})
    return APIError(500, f"internal error: {type(exc).__name__}: {_one_line(str(exc), 300)}", "server_error")
