"""`lab`: load a checkpoint folder and its tokenizer and serve the lab page with uvicorn until interrupted.

The address is checked and bound before the model loads, so a busy port fails at once, in one line.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import uvicorn

from ..serve.launch import bind_address, check_port, is_loopback, tokenizer_folder
from ..tokenizer import Tokenizer
from .app import create_lab_app


def lab(path: str | Path, host: str = "127.0.0.1", port: int = 8000, *, tokenizer: str | Path | None = None,
        device: str | None = None, dtype: str | None = None) -> None:
    """Serve the lab page for the checkpoint folder `path` (tokenizer from it, or from `tokenizer`) until
    interrupted. The page has no access control: on an address other than loopback a warning is printed."""
    from ..checkpoint import load

    check_port(port)
    tok_path = tokenizer_folder(path, tokenizer, "the lab")
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
