"""Fine-tuning examples: JSONL records rendered to token ids with a per-token loss mask.

A record is one of the shapes TRL's SFTTrainer reads: `{"messages": [...]}` (rendered with the tokenizer's chat
template; the assistant turns are trained), `{"prompt": ..., "completion": ...}` (the completion is trained; either
side may be a list of chat messages), `{"text": ...}` (all of it is trained); and for preference tuning `{"prompt",
"chosen", "rejected"}`. Prompt and completion are encoded separately and joined, so the model is trained on the
tokens it will see at inference: the prompt as `encode(prompt)` gives it, then the answer it must generate.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from ..tokenizer import Tokenizer

LOSS_ON = ("response", "all")


@dataclass
class Example:
    """One tokenized example. `trained[i]` says whether token i is a training target (predicted from the tokens
    before it); `prompt_length` counts the tokens before the first trained one (the instruction part, which
    attends bidirectionally under Bitune)."""

    ids: np.ndarray  # int64 [n]
    trained: np.ndarray  # bool [n]
    prompt_length: int

    def __len__(self) -> int:
        return len(self.ids)

    def truncated(self, length: int) -> Example:
        """The first `length` tokens (right truncation, as TRL's max_length)."""
        if len(self.ids) <= length:
            return self
        return Example(self.ids[:length], self.trained[:length], min(self.prompt_length, length))


@dataclass
class PreferencePair:
    """A prompt with a preferred and a dispreferred completion (DPO): two examples sharing the prompt's tokens."""

    chosen: Example
    rejected: Example


def _example(prompt_ids: Sequence[int], response_ids: Sequence[int]) -> Example:
    ids = np.asarray(list(prompt_ids) + list(response_ids), dtype=np.int64)
    trained = np.zeros(len(ids), dtype=bool)
    trained[len(prompt_ids):] = True
    return Example(ids, trained, len(prompt_ids))


def _is_messages(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "role" in m for m in value)


def _end_of_text(tokenizer: Tokenizer) -> list[int]:
    return [tokenizer.eos_id] if tokenizer.eos_id is not None else []


def render_messages(messages: list[dict[str, Any]], tokenizer: Tokenizer) -> Example:
    """A conversation through the chat template; the assistant turns (as the template writes them, end-of-turn
    token included) are trained. The template must render each conversation prefix as a prefix of the whole
    (true of ChatML, Llama and Qwen2 templates), so that the trained tokens are exactly what generation yields."""
    if not _is_messages(messages) or not messages:
        raise UserError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    full = tokenizer.encode_chat(messages, add_generation_prompt=False)
    trained = np.zeros(len(full), dtype=bool)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.encode_chat(messages[:i], add_generation_prompt=True) if i else []
        upto = tokenizer.encode_chat(messages[:i + 1], add_generation_prompt=False)
        if full[:len(upto)] != upto or upto[:len(before)] != before:
            raise UserError("the chat template does not render a conversation's beginning as the beginning of the "
                            "whole conversation, so the assistant turns cannot be located; use prompt/completion "
                            "records or another template (--chat-template)")
        trained[len(before):len(upto)] = True
    if not trained.any():
        raise UserError("a messages record has no assistant turn to train on")
    return Example(np.asarray(full, dtype=np.int64), trained, int(np.argmax(trained)))


def _prompt_ids(prompt: Any, tokenizer: Tokenizer) -> list[int]:
    if _is_messages(prompt):
        return tokenizer.encode_chat(prompt, add_generation_prompt=True)
    if not isinstance(prompt, str):
        raise UserError(f"prompt must be a string or a list of chat messages, got {type(prompt).__name__}")
    return tokenizer.encode(prompt, add_special_tokens=True)


def _response_ids(prompt: Any, response: Any, tokenizer: Tokenizer, name: str) -> list[int]:
    if _is_messages(prompt) or _is_messages(response):
        if not (_is_messages(prompt) and _is_messages(response)):
            raise UserError(f"prompt and {name} must both be strings or both be lists of chat messages")
        before = tokenizer.encode_chat(prompt, add_generation_prompt=True)
        whole = tokenizer.encode_chat(prompt + response, add_generation_prompt=False)
        if whole[:len(before)] != before:
            raise UserError("the chat template does not render the prompt as the beginning of prompt + "
                            f"{name}; use string records or another template (--chat-template)")
        return whole[len(before):]
    if not isinstance(response, str):
        raise UserError(f"{name} must be a string or a list of chat messages, got {type(response).__name__}")
    return tokenizer.encode(response, add_special_tokens=False) + _end_of_text(tokenizer)


def render(record: dict[str, Any], tokenizer: Tokenizer, loss_on: str = "response") -> Example:
    """The training example of one SFT record (`messages`, `prompt` + `completion`, or `text`).

    `loss_on="all"` trains every token after the first (continued pre-training on the rendered text)."""
    if not isinstance(record, dict):
        raise UserError(f"a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        example = render_messages(record["messages"], tokenizer)
    elif "prompt" in record and "completion" in record:
        prompt = _prompt_ids(record["prompt"], tokenizer)
        example = _example(prompt, _response_ids(record["prompt"], record["completion"], tokenizer, "completion"))
    elif "text" in record:
        if not isinstance(record["text"], str):
            raise UserError(f"text must be a string, got {type(record['text']).__name__}")
        ids = tokenizer.encode(record["text"], add_special_tokens=True) + _end_of_text(tokenizer)
        example = _example([], ids)
        example.trained[0] = False  # the first token has nothing before it to be predicted from
    else:
        raise UserError(f"a record needs 'messages', 'prompt' and 'completion', or 'text'; got keys "
                        f"{sorted(record)[:8]}")
    if loss_on == "all":
        example.trained[1:] = True
    elif loss_on != "response":
        raise UserError(f"unknown loss_on {loss_on!r}; choose {', '.join(LOSS_ON)}")
    return example


def render_pair(record: dict[str, Any], tokenizer: Tokenizer) -> PreferencePair:
    """The two examples of one preference record {"prompt", "chosen", "rejected"}."""
    if not isinstance(record, dict) or not all(k in record for k in ("prompt", "chosen", "rejected")):
        keys = sorted(record)[:8] if isinstance(record, dict) else type(record).__name__
        raise UserError(f"a preference record needs 'prompt', 'chosen' and 'rejected'; got {keys}")
    prompt = _prompt_ids(record["prompt"], tokenizer)
    return PreferencePair(
        _example(prompt, _response_ids(record["prompt"], record["chosen"], tokenizer, "chosen")),
        _example(prompt, _response_ids(record["prompt"], record["rejected"], tokenizer, "rejected")))


def iter_records(path: str | os.PathLike) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, record) for each non-blank line of a JSONL file."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{number}: not valid JSON ({e.msg}); each line must be one JSON "
                                    "record") from None
    except FileNotFoundError:
        raise UserError(f"no such data file: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text; fine-tuning data is JSONL (one JSON record per line)") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a folder; pass JSONL files") from None


def read_examples(paths: str | os.PathLike | Sequence[str | os.PathLike], tokenizer: Tokenizer,
                  loss_on: str = "response", preference: bool = False) -> list[Example] | list[PreferencePair]:
    """Every record of the JSONL files, rendered (`render`, or `render_pair` with `preference`); an error names
    the file and line."""
    if isinstance(paths, str | os.PathLike):
        paths = [paths]
    out: list = []
    for path in paths:
        for number, record in iter_records(path):
            try:
                out.append(render_pair(record, tokenizer) if preference else render(record, tokenizer, loss_on))
            except UserError as e:
                raise UserError(f"{path}:{number}: {e}") from None
    if not out:
        raise UserError(f"no records in {', '.join(map(str, paths))}")
    return out
