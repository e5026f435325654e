"""`lab`: load a checkpoint folder and its tokenizer and serve the lab page with uvicorn until interrupted.

The address is checked and bound before the model loads, so a busy port fails at once, in one line.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import uvicorn

from ..errors import UserError
from ..serve.launch import bind_address, is_loopback
from ..tokenizer import Tokenizer
from .app import create_lab_app


def lab(path: str | Path, host: str = "127.0.0.1", port: int = 8000, *, tokenizer: str | Path | None = None,
        device: str | None = None, dtype: str | None = None) -> None:
    """Serve the lab page for the checkpoint folder `path` (tokenizer from it, or from `tokenizer`) until
    interrupted. The page has no access control: on an address other than loopback a warning is printed."""
    from ..checkpoint import load

    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {port!r}")
    tok_path = Path(tokenizer if tokenizer is not None else path)
    if not tok_path.is_dir():
        raise UserError(f"the lab needs a tokenizer: {path} is not a checkpoint folder; pass a folder holding "
                        "tokenizer.json, or --tokenizer FOLDER")
    sock = bind_address(host, port)
    try:
        tok = Tokenizer.from_folder(tok_path)
        model = load(path, device=device, dtype=dtype)
        name = Path(str(path)).resolve().name
        if not is_loopback(host):
            print(f"warning: the lab on {host} has no access control: anyone who can reach port "
                  f"{sock.getsockname()[1]} can run the model", file=sys.stderr)
        config = uvicorn.Config(create_lab_app(model, tok, name), host=host, port=port, log_level="info",
                                lifespan="off")
        shown = f"[{host}]" if ":" in host else host
        logging.getLogger("uvicorn.error").info("lab for %r at http://%s:%d/ (Ctrl-C to stop)", name, shown,
                                                sock.getsockname()[1])
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
