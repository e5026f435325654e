"""Constrained decoding: grammars (JSON schema, regex, Lark context-free grammar) as per-step token masks.

The grammar engine is llguidance (`pip install llguidance`): it builds its token trie straight from the
tokenizer's `tokenizer.json` (`tokenizers.Tokenizer.to_str()`), so no transformers tokenizer is needed.
This module is the adapter: `Grammar` (what a caller asks for), `GrammarState` (the per-row matchers of one
batch: the allowed-token mask before each step, then the chosen tokens).

A row stops when its grammar is complete and allows nothing more ("stop"), or when it picks the grammar's EOS
token, which the mask allows only where the grammar accepts.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..errors import UserError
from ..tokenizer import Tokenizer

_KINDS = ("json_schema", "regex", "lark")


@dataclass(frozen=True)
class Grammar:
    """A constraint on generated text. kind: "json_schema" (a dict or JSON string), "regex" (the whole output
    must match; Rust regex syntax) or "lark" (llguidance's Lark dialect: `start: ...`, rules, /regex/ terminals).
    Build one with `json_schema(...)`, `regex(...)` or `lark(...)`, or pass a dict such as {"regex": "[0-9]+"}."""

    kind: str
    source: str

    def compiled(self) -> str:
        """The grammar in llguidance's own form (a string for `LLMatcher`)."""
        llg = _llguidance()
        if self.kind == "json_schema":
            return llg.LLMatcher.grammar_from_json_schema(self.source)
        if self.kind == "regex":
            return llg.LLMatcher.grammar_from_regex(self.source)
        return llg.LLMatcher.grammar_from_lark(self.source)


def json_schema(schema: dict[str, Any] | str) -> Grammar:
    """Output must be a JSON value valid under `schema` (a dict or its JSON text)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise UserError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise UserError(f"a JSON schema must be a dict (or its JSON text), got {type(schema).__name__}")
    return Grammar("json_schema", json.dumps(schema))


def regex(pattern: str) -> Grammar:
    """Output must match `pattern` in full."""
    if not isinstance(pattern, str):
        raise UserError(f"a regex grammar must be a string, got {type(pattern).__name__}")
    return Grammar("regex", pattern)


def lark(source: str) -> Grammar:
    """Output must be a sentence of the context-free grammar `source` (Lark syntax, starting at `start`)."""
    if not isinstance(source, str):
        raise UserError(f"a lark grammar must be a string, got {type(source).__name__}")
    return Grammar("lark", source)


def as_grammar(spec: Any) -> Grammar:
    """A `Grammar`, or a one-key dict {"json_schema": ...} / {"regex": ...} / {"lark": ...}."""
    if isinstance(spec, Grammar):
        return spec
    if isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in _KINDS:
        kind, source = next(iter(spec.items()))
        return {"json_schema": json_schema, "regex": regex, "lark": lark}[kind](source)
    raise UserError(f"a grammar must be a Grammar or a one-key dict with key json_schema, regex or lark, "
                    f"got {_short(spec)}")


def _short(x: Any) -> str:
    r = repr(x)
    return r if len(r) <= 80 else r[:77] + "..."


def _one_line(message: str, limit: int = 300) -> str:
    line = " ".join(str(message).split())
    return line if len(line) <= limit else line[:limit - 3] + "..."


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise UserError("constrained decoding needs llguidance: pip install llguidance") from None
    return llguidance


# One llguidance tokenizer per (Tokenizer, vocab size): building one reads the whole vocabulary.
_TOKENIZERS: dict[tuple[int, int], tuple[Tokenizer, Any]] = {}


def llg_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> Any:
    """llguidance's tokenizer for `tokenizer`, with `vocab_size` ids (the model's; ids past the tokenizer's
    vocabulary are never allowed) and the tokenizer's eos token as the grammar's end."""
    key = (id(tokenizer), vocab_size)
    hit = _TOKENIZERS.get(key)
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    llg = _llguidance()
    if tokenizer.eos_id is None:
        raise UserError("constrained decoding needs a tokenizer with an eos token (the grammar's end); "
                        "train or load one with special_tokens=['<|endoftext|>']")
    if vocab_size < tokenizer.vocab_size:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size}")
    try:
        llt = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=tokenizer.eos_id)
    except Exception as e:  # the library's own error type
        raise UserError(f"llguidance cannot read this tokenizer: {_one_line(e)}") from None
    if len(_TOKENIZERS) > 16:
        _TOKENIZERS.clear()
    _TOKENIZERS[key] = (tokenizer, llt)
    return llt


def grammars_for_batch(grammar: Any, batch: int) -> list[Grammar | None]:
    """One grammar (or None) per row from `generate`'s `grammar` argument: one spec for every row, or a list."""
    if grammar is None:
        return [None] * batch
    if isinstance(grammar, (list, tuple)):
        if len(grammar) != batch:
            raise UserError(f"grammar lists {len(grammar)} grammars for {batch} prompts; give one per prompt "
                            f"(None for an unconstrained row) or a single grammar for all")
        return [None if g is None else as_grammar(g) for g in grammar]
    g = as_grammar(grammar)
    return [g] * batch


class GrammarState:
    """The matchers of one batch (None for unconstrained rows); built, and checked, before the first step."""

    def __init__(self, grammars: Sequence[Grammar | None], tokenizer: Tokenizer | None, vocab_size: int) -> None:
        if tokenizer is None:
            raise UserError("a grammar needs the tokenizer the model uses; pass tokenizer=...")
        llg = _llguidance()
        llt = llg_tokenizer(tokenizer, vocab_size)
        self.eos = tokenizer.eos_id
        self.vocab_size = vocab_size
        self.matchers: list[Any | None] = []
        compiled: dict[Grammar, str] = {}
        for g in grammars:
            if g is None:
                self.matchers.append(None)
                continue
            if g not in compiled:
                try:
                    compiled[g] = g.compiled()
                except (ValueError, TypeError) as e:
                    raise UserError(f"invalid {g.kind} grammar: {_one_line(e)}") from None
            m = llg.LLMatcher(llt, compiled[g], log_level=0)
            if m.is_error():
                raise UserError(f"invalid {g.kind} grammar: {_one_line(m.get_error())}")
            self.matchers.append(m)
        self.executor = llg.LLExecutor()
        words = (vocab_size + 31) // 32
        self.bitmask = torch.full((len(grammars), words), -1, dtype=torch.int32)
        self.bits = torch.arange(32, dtype=torch.int32)

    @property
    def any(self) -> bool:
        return any(m is not None for m in self.matchers)

    def allowed(self, live: Sequence[bool], device: torch.device) -> Tensor | None:
        """bool [B, V]: the tokens each row may take next (all, for unconstrained or finished rows)."""
        rows = [(m, i) for i, m in enumerate(self.matchers) if m is not None and live[i]]
        if not rows:
            return None
        self.bitmask.fill_(-1)
        # What llguidance.torch.fill_next_token_bitmask_par does (without importing its torch.compile kernels).
        words = self.bitmask.shape[1]
        self.executor.unsafe_compute_mask_ptr(rows, self.bitmask.data_ptr(), words * 4, self.bitmask.shape[0])
        allowed = ((self.bitmask[:, :, None] >> self.bits) & 1).view(self.bitmask.shape[0], -1)
        return allowed[:, :self.vocab_size].bool().to(device)

    def advance(self, row: int, token: int) -> bool:
        """Feed a row its chosen token; True when the row's grammar is now finished (it accepts and allows
        nothing more, or the token was its EOS). A token the grammar rejects (only a forced one can be) raises."""
        m = self.matchers[row]
        if m is None:
            return False
        if token == self.eos:
            if not m.is_accepting():
                raise UserError(f"row {row}: the eos token {token} came before the grammar was complete")
            return True
        if not m.consume_token(token):
            raise UserError(f"row {row}: token {token} is not allowed by the grammar here "
                            f"({_one_line(m.get_error())})")
        return m.is_stopped()
