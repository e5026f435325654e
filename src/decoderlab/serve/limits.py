"""`ServerLimits`: what one request may ask of the server, and how many may wait for the model.

Every field is a flag of `decoderlab serve` of the same name (`max_body_bytes` is `--max-body-bytes`). The
defaults are safe on a laptop: a request cannot make the server read more than 1 MiB, generate more than the
context allows (256 tokens when it does not say), or pile up more than 16 requests behind the one generating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..errors import UserError


@dataclass(frozen=True)
class ServerLimits:
    """Limits on requests; None means "the model's own bound" where the field says so.

    max_body_bytes: request bodies larger than this are refused (413) while being read.
    max_prompt_tokens: longer prompts are refused (400); None: the context length minus one (room for at least
        one new token). Never more than that.
    default_max_tokens: the length of a request that gives no max_tokens (also bounded by the checkpoint's
        generation_config max_new_tokens, by max_tokens_cap and by the room the context leaves).
    max_tokens_cap: a larger max_tokens is refused (400); None: the context length.
    max_queue: requests that may wait for the model while one generates; more are refused (429, Retry-After).
    queue_timeout: seconds a request may wait for the model before it is refused (503, Retry-After); None: no
        limit.
    max_stop: stop strings per request (OpenAI allows 4); max_stop_length: characters per stop string.
    max_top_logprobs: alternatives per token that `top_logprobs` (chat) or `logprobs` (completions) may ask for.
    """

    max_body_bytes: int = 1 << 20
    max_prompt_tokens: int | None = None
    default_max_tokens: int = 256
    max_tokens_cap: int | None = None
    max_queue: int = 16
    queue_timeout: float | None = None
    max_stop: int = 4
    max_stop_length: int = 256
    max_top_logprobs: int = 20

    def __post_init__(self) -> None:
        lowest = {"max_body_bytes": 1, "max_prompt_tokens": 1, "default_max_tokens": 1, "max_tokens_cap": 1,
                  "max_queue": 0, "max_stop": 0, "max_stop_length": 1, "max_top_logprobs": 0}
        for f in fields(self):
            value, flag = getattr(self, f.name), "--" + f.name.replace("_", "-")
            if value is None and f.default is None:
                continue
            if f.name == "queue_timeout":
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                        or value <= 0:
                    raise UserError(f"{flag} must be a number of seconds > 0, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < lowest[f.name]:
                raise UserError(f"{flag} must be an integer >= {lowest[f.name]}, got {value!r}")
