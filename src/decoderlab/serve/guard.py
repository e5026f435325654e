"""The server's front door, as ASGI middleware: the API key, then the request-body limit.

`/v1` routes need `Authorization: Bearer KEY` when the server has a key (compared in constant time); without it
they are refused (401) before a byte of the body is read. Bodies are then read up to `max_body_bytes`: a larger
`Content-Length` is refused at once (413), and a body sent without one is cut off as soon as it passes the limit,
so a request never makes the server hold more than the limit. The body read here is handed to the app as one
message; later `receive` calls go to the server (that is how the app learns that a client left).
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError


class Guard:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            if self.api_key is not None and scope["path"].startswith("/v1"):
                self._check_key(scope)
            body = await self._read_body(scope, receive)
        except APIError as e:
            await e.response()(scope, receive, send)
            return
        if body is None:  # the client left while sending
            return
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _check_key(self, scope: Scope) -> None:
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        scheme, _, given = (header or b"").partition(b" ")
        if header is None or scheme.lower() != b"bearer":
            raise APIError(401, "this server needs an API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
        if not hmac.compare_digest(given.strip(), self.api_key):
            raise APIError(401, "incorrect API key", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        limit = self.max_body_bytes
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None:
            if not declared.isdigit():
                raise APIError(400, f"invalid Content-Length header {declared[:40].decode('latin-1')!r}")
            if int(declared) > limit:
                raise self._too_large(int(declared))
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise self._too_large(None)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self, size: int | None) -> APIError:
        what = f" ({size:,} bytes)" if size is not None else ""
        return APIError(413, f"the request body{what} is larger than {self.max_body_bytes:,} bytes, the most this "
                             "server reads (--max-body-bytes)", code="request_too_large")
