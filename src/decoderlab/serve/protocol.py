"""The requests this server accepts: OpenAI's completions and chat-completions schemas, checked strictly.

`parse_body` turns a raw body into a JSON object (UTF-8, no NaN or Infinity, nested at most `MAX_DEPTH` deep);
`parse_request` validates it against a request model. Types are strict (`"max_tokens": "5"` or `true` is an
error, not 5 or 1) and a field this server does not know is refused (400 naming it), as OpenAI does.

Fields that OpenAI defines but this server does not implement are decided one by one (`check_supported`):
refused with a 400 naming the field unless they hold their neutral value (`n: 1`, `echo: false`,
`presence_penalty: 0`, `logit_bias: {}`, ...), or ignored where OpenAI's semantics allow it because they do not
change the output (`user`, `metadata`, `service_tier`, `prediction`). Sampling extensions that vLLM also accepts
(`top_k`, `min_p`, `repetition_penalty`) are implemented.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import APIError

#: How deeply a request's JSON may nest (a JSON schema in response_format is the deepest legitimate part).
MAX_DEPTH = 64


def _bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (numbers must be finite)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:20]} is out of range")
    return value


def parse_body(body: bytes, content_type: str | None) -> dict[str, Any]:
    """The request body as a JSON object; anything else is an APIError (400, or 415 for a non-JSON type)."""
    if content_type:
        media = content_type.split(";")[0].strip().lower()
        if media != "application/json" and not (media.startswith("application/") and media.endswith("+json")):
            raise APIError(415, f"the request body must be JSON (Content-Type: application/json), got "
                                f"Content-Type {content_type[:60]!r}", code="unsupported_media_type")
    if not body.strip():
        raise _bad("the request body is empty; send a JSON object")
    try:
        data = json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except UnicodeDecodeError:
        raise _bad("the request body is not valid UTF-8; send JSON encoded as UTF-8") from None
    except json.JSONDecodeError as e:
        raise _bad(f"malformed JSON body: {e}") from None
    except RecursionError:
        raise _bad(f"the JSON body is nested too deeply (at most {MAX_DEPTH} levels)") from None
    except ValueError as e:  # a NaN / Infinity literal, a float out of range, an integer of too many digits
        raise _bad(f"malformed JSON body: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(data, dict):
        raise _bad(f"the request body must be a JSON object, got a JSON {_json_type(data)}")
    _check_depth(data)
    return data


def _json_type(value: Any) -> str:
    return {list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(value), "number")


def _check_depth(data: Any) -> None:
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise _bad(f"the JSON body is nested too deeply (at most {MAX_DEPTH} levels)")
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # padding against side channels; nothing to pad here


class JSONSchemaFormat(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | bool = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class BaseRequest(_Strict):
    """The fields completions and chat completions share."""

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1)  # vLLM's extension: -1 or 0 is off
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None


class CompletionRequest(BaseRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(None, ge=0)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None


class ChatCompletionRequest(BaseRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0)
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    parallel_tool_calls: Any = None
    audio: Any = None
    modalities: list[str] | None = None
    reasoning_effort: Any = None
    web_search_options: Any = None
    store: bool | None = None
    # Accepted and ignored: they do not change the output.
    metadata: dict[str, Any] | None = None
    service_tier: str | None = None
    prediction: Any = None


R = TypeVar("R", bound="BaseRequest")

_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|list\[.*\]|dict\[.*\]|.*\[.*\].*|literal\[.*)$", re.IGNORECASE)


def _path(loc: tuple[Any, ...]) -> str:
    """`('messages', 0, 'content')` -> `messages[0].content`, leaving out pydantic's union-member tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _TYPE_TAG.match(part):
            out += ("." if out else "") + part
    return out


def parse_request(cls: type[R], data: dict[str, Any]) -> R:
    """`data` validated as a `cls`; the first field at fault is named in a 400."""
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = _path(errors[0]["loc"])
        if errors[0]["type"] == "extra_forbidden":
            raise _bad(f"unrecognized request field {first!r}: this server does not implement it; leave it out",
                       param=first) from None
        if errors[0]["type"] == "missing":
            raise _bad(f"missing required field {first!r}", param=first) from None
        same = dict.fromkeys(err["msg"] for err in errors if _path(err["loc"]) == first)
        raise _bad(f"{first or 'body'}: {' or '.join(same)}", param=first or None) from None


def check_supported(req: BaseRequest) -> None:
    """Refuse (400, naming the field) what OpenAI defines but this server does not implement."""
    def refuse(field: str, why: str) -> None:
        raise _bad(f"{field} is not supported: {why}", param=field)

    if req.n is not None and req.n != 1:
        raise _bad(f"n must be 1 (this server returns one choice per request), got {req.n}", param="n")
    if req.presence_penalty:
        refuse("presence_penalty", "only 0 is; use frequency_penalty")
    if req.logit_bias:
        refuse("logit_bias", "leave it out or send {}")
    if req.stream_options is not None and not req.stream:
        raise _bad("stream_options is only allowed with stream: true", param="stream_options")
    rf = req.response_format
    if rf is not None and rf.type == "json_schema" and rf.json_schema is None:
        raise _bad("response_format of type json_schema needs a json_schema: {\"schema\": {...}}",
                   param="response_format")
    if isinstance(req, CompletionRequest):
        if req.best_of not in (None, 1):
            refuse("best_of", "only 1 is (one completion per request)")
        if req.echo:
            refuse("echo", "only false is")
        if req.suffix:
            refuse("suffix", "there is no fill-in-the-middle here")
        return
    assert isinstance(req, ChatCompletionRequest)
    for name in ("tools", "tool_choice", "functions", "function_call", "parallel_tool_calls"):
        if getattr(req, name) is not None:
            refuse(name, "this server does not implement tool calling; leave it out")
    if req.audio is not None:
        refuse("audio", "this server generates text only")
    if req.modalities is not None and req.modalities != ["text"]:
        refuse("modalities", 'this server generates text only (["text"])')
    if req.reasoning_effort is not None:
        refuse("reasoning_effort", "the model has no reasoning mode")
    if req.web_search_options is not None:
        refuse("web_search_options", "this server does not search the web")
    if req.store:
        refuse("store", "this server stores nothing (only false is)")
    if req.top_logprobs is not None and not req.logprobs:
        raise _bad("top_logprobs needs logprobs: true", param="top_logprobs")


def message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template sees them: content a string (text parts joined)."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                    raise _bad(f"messages[{i}].content[{j}]: only text content parts ({{\"type\": \"text\", "
                               f"\"text\": ...}}) are supported, got type {str(part.get('type'))[:40]!r}",
                               param="messages")
                texts.append(part["text"])
            content = "".join(texts)
        out.append({"role": m.role, "content": content or ""} | ({"name": m.name} if m.name is not None else {}))
    return out
