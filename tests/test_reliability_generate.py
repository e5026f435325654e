"""Bad and hostile input to generation, as a user would try it: each a one-line `UserError` (the CLI: `error: ...`,
exit code 2, no traceback), and nothing allocated for what a request cannot use."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest
import torch

import decoderlab
from decoderlab import ModelConfig, Transformer, UserError
from decoderlab.generation import (
    TokenRecycler,
    draft_decoder,
    generate,
    mtp_decoder,
    speculative_generate,
    stream,
)


def _model(seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    fields = dict(vocab_size=40, n_layers=1, n_heads=2, d_model=16, context_length=64, positions="rope", init_std=0.3)
    config = ModelConfig(**(fields | overrides))
    return Transformer(config).eval()


def _one_line(fn) -> str:
    with pytest.raises(UserError) as info:
        fn()
    message = str(info.value)
    assert message and "\n" not in message
    return message


@pytest.mark.parametrize("logprobs", [-1, 21, "5", True, 2.0])
def test_bad_logprobs(logprobs):
    model = _model()
    for fn in (generate, stream):
        assert "logprobs" in _one_line(lambda fn=fn: fn(model, [[1, 2]], 3, logprobs=logprobs))


@pytest.mark.parametrize("kwargs", [dict(temperature="0.7"), dict(top_k=True), dict(top_p=2), dict(min_p=-0.1),
                                    dict(repetition_penalty=0), dict(temperature=float("inf"))])
def test_bad_sampling_settings_on_every_entry(kwargs):
    model = _model()
    draft = _model(1)
    for fn in (lambda: generate(model, [[1, 2]], 3, **kwargs),
               lambda: speculative_generate(model, draft, [[1, 2]], 3, **kwargs),
               lambda: decoderlab.pine.generate(model, [1], [[2, 3]], [4], 3, **{
                   k: v for k, v in kwargs.items() if k != "frequency_penalty"})):
        _one_line(fn)


def test_bad_decoders_and_combinations():
    model, draft = _model(), _model(1)
    heads = _model(n_future=2)
    cases = [
        (lambda: stream(model, [[1, 2]], 3, decoder=5), "decoder"),
        (lambda: stream(model, [[1, 2]], 3, decoder=draft_decoder("not a model")), "Transformer"),
        (lambda: stream(model, [[1, 2]], 3, decoder=draft_decoder(draft, k=0)), "k"),
        (lambda: stream(model, [[1, 2]], 3, decoder=TokenRecycler(draft).decoder), "another model"),
        (lambda: stream(model, [[1, 2], [3]], 3, decoder=draft_decoder(draft)), "batch size 1"),
        (lambda: stream(heads, [[1, 2]], 3, decoder=mtp_decoder(5)), "n_draft"),
        (lambda: stream(heads, [[1, 2]], 3, temperature=1.0, decoder=mtp_decoder()), "greedily"),
        (lambda: speculative_generate(model, _model(vocab_size=41), [[1, 2]], 3), "vocabulary"),
    ]
    for fn, fragment in cases:
        assert fragment in _one_line(fn)


def test_a_huge_max_new_tokens_allocates_for_what_is_generated():
    # 10**18 new tokens on a 64k-context model: the stream starts at once and its cache is prompt + CACHE_CHUNK.
    model = _model(context_length=65536)
    caches = []
    new_cache = model.new_cache
    model.new_cache = lambda *a, **kw: caches.append(new_cache(*a, **kw)) or caches[-1]
    steps = stream(model, [[1, 2, 3]], 10**18, stop_tokens=[])
    assert len(list(itertools.islice(steps, 3))) == 3
    assert caches[0].max_length == 3 + 256
    steps.close()


def test_nan_weights_refused_not_generated():
    model = _model()
    with torch.no_grad():
        model.blocks[0].attn_norm.weight.fill_(float("nan"))
    assert "NaN logits" in _one_line(lambda: generate(model, [[1, 2]], 3))
    assert "NaN logits" in _one_line(lambda: TokenRecycler(model).generate([[1, 2]], 3))


# ---- the CLI ----------------------------------------------------------------------------------------------------


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "decoderlab", *args], capture_output=True, text=True, timeout=300)


def _error(out: subprocess.CompletedProcess, fragment: str) -> None:
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0
    assert fragment in out.stderr, out.stderr


@pytest.fixture(scope="module")
def char_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gen-cli") / "m"
    tok = decoderlab.Tokenizer.train_char(texts=["abcdefghij klmnop\n"])
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("char-baby", vocab_size=tok.vocab_size))
    decoderlab.save(model, folder, tokenizer=tok)
    return folder


def test_cli_refuses_sampling_with_greedy_speculation_and_empty_prompts(char_folder):
    _error(_run("generate", str(char_folder), "abc", "--speculative", "recycle", "--temperature", "0.8"),
           "--speculative recycle decodes greedily; leave out --temperature")
    _error(_run("generate", str(char_folder), "", "--tokens", "3"), "the prompt is empty")


def test_cli_refuses_nan_weights(char_folder, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "nan"
    shutil.copytree(char_folder, folder)
    weights = load_file(folder / "model.safetensors")
    name = next(k for k in weights if k.endswith("norm.weight"))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    json.loads((folder / "config.json").read_text())  # still a valid folder
    # `load` checks the weights first (the engine's own check on the logits is tested from Python above).
    _error(_run("generate", str(folder), "abc", "--tokens", "3"), "holds NaN or infinite values")
