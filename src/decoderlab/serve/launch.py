"""`serve`: load a checkpoint folder and serve it with uvicorn until SIGINT / SIGTERM.

Flags are checked and the socket bound before the model loads, so a bad port or a busy address fails at once, in
one line. A shutdown signal stops the running generation at its next decode step (its client gets a 503, or an
SSE error event) and refuses queued requests, so the process exits within a step instead of after the longest
request.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import Literal

import uvicorn

from ..errors import UserError
from ..tokenizer import Tokenizer
from .app import create_app
from .limits import ServerLimits


def bind_address(host: str, port: int) -> socket.socket:
    """A listening-ready socket bound to host:port (0: any free port), or a one-line UserError saying why not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
        sock = socket.socket(family, kind, proto)
    except (OSError, UnicodeError) as e:
        raise UserError(f"cannot listen on {host!r}: {e}; pass --host with an address of this machine "
                        "(127.0.0.1, 0.0.0.0, ::1, ...)") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as e:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}; pick another --port or --host") from None
    return sock


def check_port(port: int) -> None:
    """A one-line UserError unless `port` is a TCP port number (0: any free port)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port!r}")


def tokenizer_folder(path: str | Path, tokenizer: str | Path | None, needs: str) -> Path:
    """The folder to read the tokenizer from (`tokenizer`, else the checkpoint folder `path`), or a one-line
    UserError; `needs` names who needs it ("serving", "the lab")."""
    folder = Path(tokenizer if tokenizer is not None else path)
    if not folder.is_dir():
        raise UserError(f"{needs} needs a tokenizer: {folder} is not a checkpoint folder; pass a folder holding "
                        "tokenizer.json, or --tokenizer FOLDER")
    return folder


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(path_or_preset: str | Path, host: str = "127.0.0.1", port: int = 8000, *, model_name: str | None = None,
          tokenizer: str | Path | None = None, device: str | None = None, dtype: str | None = None,
          log_level: Literal["critical", "error", "warning", "info", "debug"] = "info", compile: bool = False,
          limits: ServerLimits | None = None, api_key: str | None = None, quantize: str | None = None,
          group_size: int = 64, draft: str | Path | None = None, tree: int | Sequence[int] = (3, 2, 1),
          depth: int | None = None) -> None:
    """Load a checkpoint folder (and its tokenizer, or the one at `tokenizer`) and serve it until interrupted.

    limits / api_key / compile as in `create_app`. Without an api_key, listening on an address other than loopback
    prints a warning. On the CPU the weights are packed for decoding (`Transformer.pack`), or quantized with
    `quantize` ("int8" / "int4", `group_size` inputs per int4 scale; `load`). `draft`: a draft model's folder;
    requests then decode by Recursive Speculative Decoding with a draft tree of `tree` children per node (or
    per-depth widths) over `depth` levels (`create_app`).
    """
    from ..checkpoint import load

    limits = limits or ServerLimits()
    check_port(port)
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key (or DECODERLAB_API_KEY) is empty; give a key, or leave it out")
    tok_path = tokenizer_folder(path_or_preset, tokenizer, "serving")
    sock = bind_address(host, port)
    try:
        tok = Tokenizer.from_folder(tok_path)
        model = load(path_or_preset, device=device, dtype=dtype, quantize=quantize, group_size=group_size).pack()
        name = model_name or Path(str(path_or_preset)).resolve().name or str(path_or_preset)
        small = None if draft is None else load(draft, device=device, dtype=dtype).pack()
        app = create_app(model, tok, name, compile=compile, limits=limits, api_key=api_key, draft=small, tree=tree,
                         depth=depth)
        if api_key is None and not is_loopback(host):
            print(f"warning: serving on {host} without --api-key: anyone who can reach port {sock.getsockname()[1]} "
                  "can use this model; set --api-key or DECODERLAB_API_KEY", file=sys.stderr)
        config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="off",
                                timeout_graceful_shutdown=10)
        shown = f"[{host}]" if ":" in host else host
        logging.getLogger("uvicorn.error").info("serving %r at http://%s:%d/v1 (Ctrl-C to stop)", name, shown,
                                                sock.getsockname()[1])
        _Uvicorn(config, on_exit=app.state.server.turns.close).run(sockets=[sock])
    finally:
        sock.close()


class _Uvicorn(uvicorn.Server):
    """uvicorn's server, calling `on_exit` the moment a shutdown signal arrives (to stop generating)."""

    def __init__(self, config: uvicorn.Config, on_exit: Callable[[], None]) -> None:
        super().__init__(config)
        self.on_exit = on_exit

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.on_exit()
        super().handle_exit(sig, frame)
