"""Constrained decoding (llguidance): every sampled output of a random model parses under its grammar."""

from __future__ import annotations

import json
import re

import pytest
import torch

from decoderlab import ModelConfig, Tokenizer, Transformer, UserError
from decoderlab.generation import constrained, generate
from decoderlab.generation.counterfactual import counterfactual

pytest.importorskip("llguidance")

CORPUS = ['{"name": "alice", "age": 31, "tags": ["a", "b"]}', "(1 + 2) * 3 - (4 / 5)", "hello world 0123456789",
          "abc-123 xyz-42 ((()))", "true false null [1, 2, 3]"] * 10


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_bpe(texts=CORPUS, vocab_size=400)


@pytest.fixture(scope="module")
def model(tok) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=tok.vocab_size, n_layers=1, n_heads=2, d_model=32,
                                   context_length=256)).eval()


def _prompts(tok):
    return [tok.encode("hello"), tok.encode("(1 + 2) * 3 and then some"), tok.encode("x")]


SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False}


def _check_schema(value):
    try:
        import jsonschema
    except ImportError:
        assert set(value) == {"name", "age"} and isinstance(value["name"], str) and type(value["age"]) is int
    else:
        jsonschema.validate(value, SCHEMA)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_outputs_parse_and_validate(tok, model, seed):
    result = generate(model, _prompts(tok), 80, temperature=1.0, seed=seed, tokenizer=tok,
                      grammar=constrained.json_schema(SCHEMA))
    assert result.finish_reasons == ["stop"] * 3
    for text in result.texts:
        _check_schema(json.loads(text))


REGEX = r"[a-z]{2,5}-[0-9]{1,3}"


@pytest.mark.parametrize("seed", [0, 3, 4])
def test_regex_outputs_match_in_full(tok, model, seed):
    result = generate(model, _prompts(tok), 40, temperature=1.0, seed=seed, tokenizer=tok,
                      grammar={"regex": REGEX})
    assert result.finish_reasons == ["stop"] * 3
    for text in result.texts:
        assert re.fullmatch(REGEX, text), text


ARITH = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")"
NUMBER: /[0-9]{1,3}/
"""


def _arith(text: str) -> bool:
    """A recursive-descent recogniser for ARITH (no spaces)."""
    pos = 0

    def expr():
        nonlocal pos
        term()
        while pos < len(text) and text[pos] in "+-":
            pos += 1
            term()

    def term():
        nonlocal pos
        factor()
        while pos < len(text) and text[pos] in "*/":
            pos += 1
            factor()

    def factor():
        nonlocal pos
        if pos < len(text) and text[pos] == "(":
            pos += 1
            expr()
            if pos >= len(text) or text[pos] != ")":
                raise ValueError
            pos += 1
            return
        m = re.match(r"[0-9]{1,3}", text[pos:])
        if not m:
            raise ValueError
        pos += m.end()

    try:
        expr()
    except (ValueError, RecursionError):
        return False
    return pos == len(text)


@pytest.mark.parametrize("seed", [0, 5, 6])
def test_cfg_outputs_are_sentences(tok, model, seed):
    result = generate(model, _prompts(tok), 60, temperature=1.0, seed=seed, tokenizer=tok,
                      grammar=constrained.lark(ARITH))
    done = [t for t, r in zip(result.texts, result.finish_reasons, strict=True) if r == "stop"]
    assert done, result.texts  # a random model may run out of tokens mid-expression, but not every time
    for text in done:
        assert _arith(text), text


def test_greedy_and_per_row_grammars(tok, model):
    grammars = [{"regex": r"[0-9]{3}"}, None, constrained.regex(r"(ab)+c")]
    result = generate(model, _prompts(tok), 12, tokenizer=tok, grammar=grammars, stop_tokens=[])
    assert re.fullmatch(r"[0-9]{3}", result.texts[0]) and re.fullmatch(r"(ab)+c", result.texts[2])
    assert result.finish_reasons[0] == "stop" and result.finish_reasons[1] == "length"
    alone = generate(model, [_prompts(tok)[1]], 12, tokenizer=tok, stop_tokens=[])
    assert result.tokens[1] == alone.tokens[0]  # the unconstrained row is untouched


def test_filters_and_penalties_work_with_a_grammar(tok, model):
    result = generate(model, _prompts(tok), 40, temperature=1.5, top_k=20, top_p=0.9, min_p=0.01,
                      repetition_penalty=1.3, seed=0, tokenizer=tok, grammar={"regex": REGEX})
    for text in result.texts:
        assert re.fullmatch(REGEX, text), text


def test_constrained_counterfactual_replays(tok, model):
    factual = generate(model, _prompts(tok), 40, temperature=1.0, seed=1, tokenizer=tok,
                       grammar={"regex": REGEX}, trace=True)
    assert counterfactual(model, factual.trace).texts == factual.texts
    with pytest.raises(UserError, match="not allowed by the grammar"):
        counterfactual(model, factual.trace, {"token": (0, tok.encode("7")[0]), "row": 0})


@pytest.mark.parametrize("grammar, match", [
    ({"regex": "[0-9"}, "invalid regex grammar"),
    (constrained.lark("start: foo"), "invalid lark grammar"),
    ({"json_schema": "{not json"}, "not valid JSON"),
    ({"json_schema": {"type": "nonsense"}}, "invalid json_schema grammar"),
    ({"yaml": "x"}, "one-key dict"),
    ([{"regex": "a"}], "one per prompt"),
])
def test_bad_grammar_is_a_one_line_user_error(tok, model, grammar, match):
    with pytest.raises(UserError, match=match) as e:
        generate(model, _prompts(tok)[:2], 5, tokenizer=tok, grammar=grammar)
    assert "\n" not in str(e.value)


def test_grammar_needs_a_tokenizer(tok, model):
    with pytest.raises(UserError, match="tokenizer"):
        generate(model, _prompts(tok), 5, grammar={"regex": "a"})
