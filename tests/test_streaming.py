"""Streaming generation with attention sinks (StreamingLLM): `generate(..., window=W, sinks=S)`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import decoderlab
from decoderlab import ModelConfig, Transformer
from decoderlab.errors import UserError
from decoderlab.generation import generate, stream
from decoderlab.generation.sinks import SinkWindow


def _model(positions: str = "rope", layers: int = 2, ctx: int = 32, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=29, n_layers=layers, n_heads=4, n_kv_heads=2 if positions == "rope" else None,
                         d_model=32, context_length=ctx, positions=positions,
                         norm="rmsnorm" if positions == "rope" else "layernorm", **kw)
    model = Transformer(config).eval()
    with torch.no_grad():  # larger weights than the init's: sharper, position-sensitive attention
        for block in model.blocks:
            block.attn.qkv.weight.mul_(8)
    return model


PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_identical_to_plain_generate_while_the_cache_holds_everything(positions):
    model = _model(positions, ctx=64)
    plain = generate(model, [PROMPT], 40, temperature=1.0, seed=5, stop_tokens=[])
    streamed = generate(model, [PROMPT], 40, temperature=1.0, seed=5, stop_tokens=[], window=44, sinks=4)
    assert streamed.tokens == plain.tokens and len(plain.tokens[0]) == 40


def _context(seq: list[int], window: int, sinks: int) -> list[int]:
    """What StreamingLLM attends to for the next token: the sinks and the last `window` tokens."""
    return seq if len(seq) <= window + sinks else seq[:sinks] + seq[len(seq) - window:]


@pytest.mark.parametrize("sinks", [0, 3])
def test_one_layer_model_equals_recompute_on_sinks_plus_window_at_cache_positions(sinks):
    """With one layer, cached keys and values depend only on token and position, so StreamingLLM's rule is
    exact: each step's logits equal a fresh forward over sinks + last W at positions 0..S+W-1. This checks the
    positions (re-rotated sinks, ring order, rebasing: 120 tokens pass 2 (S + W) many times) and what is seen."""
    window = 8
    model = _model("rope", layers=1, ctx=16)
    out = generate(model, [PROMPT], 120, temperature=1.0, seed=1, stop_tokens=[], window=window, sinks=sinks,
                   logprobs=0)
    seq = list(PROMPT)
    for token, lp in zip(out.tokens[0], out.logprobs[0], strict=True):
        ctx = _context(seq, window, sinks)
        with torch.no_grad():
            expected = model(torch.tensor([ctx]))[0, -1].log_softmax(-1)[token].item()
        assert lp.logprob == pytest.approx(expected, abs=2e-4)
        seq.append(token)
    assert len(seq) > 6 * model.config.context_length


def test_attention_sinks_matter_and_positions_are_not_text_positions():
    """The recompute above is not trivially satisfied: plain text positions, or no sinks, give other logits."""
    model = _model("rope", layers=1, ctx=16)
    out = generate(model, [PROMPT], 40, temperature=1.0, seed=1, stop_tokens=[], window=8, sinks=3, logprobs=0)
    seq = PROMPT + out.tokens[0][:30]
    ctx = _context(seq, 8, 3)
    with torch.no_grad():
        at_cache = model(torch.tensor([ctx]))[0, -1]
        text_positions = torch.tensor(list(range(3)) + list(range(len(seq) - 8, len(seq))))
        at_text = model(torch.tensor([ctx]), positions=text_positions)[0, -1]
        no_sinks = model(torch.tensor([seq[-8:]]))[0, -1]
    lp = out.logprobs[0][30].logprob
    assert lp == pytest.approx(at_cache.log_softmax(-1)[out.tokens[0][30]].item(), abs=2e-4)
    assert (at_text - at_cache).abs().max() > 1e-2 and (no_sinks - at_cache).abs().max() > 1e-2


@pytest.mark.parametrize("positions", ["rope", "learned"])
def test_constant_memory_and_cache_holds_sinks_plus_last_window(positions):
    """Over 10x the context, the cache's buffers never move or grow, and layer 0's values (a function of the
    token alone for RoPE) are exactly the sinks' and the last W tokens', each at its ring slot."""
    window, sinks, ctx = 12, 4, 24
    model = _model(positions, ctx=ctx)
    table = None
    if positions == "rope":
        cache = model.new_cache(model.config.vocab_size, 1, dtype=torch.float32)
        with torch.no_grad():
            model(torch.arange(model.config.vocab_size)[:, None], cache=cache)
        table = cache.values[0, :, :, 0]  # [V, Hkv, D]
    steps = stream(model, [PROMPT], 10 * ctx, temperature=1.0, seed=0, stop_tokens=[], window=window, sinks=sinks)
    seq, ptrs, sizes = list(PROMPT), set(), set()
    for step in steps:
        cache = steps.decoder.cache
        ptrs.add((cache.keys.data_ptr(), cache.values.data_ptr()))
        sizes.add((tuple(cache.keys.shape), cache.nbytes))
        if table is not None and len(seq) >= window + sinks:
            fed = seq  # this step's new token is chosen, not fed yet
            for j in list(range(sinks)) + list(range(len(fed) - window, len(fed))):
                slot = j if j < sinks else sinks + (j - sinks) % window
                torch.testing.assert_close(cache.values[0, 0, :, slot], table[fed[j]])
        seq += step.tokens[0]
    assert len(seq) == len(PROMPT) + 10 * ctx
    shape = (2, 1, model.config.kv_heads, window + sinks, 8)
    assert len(ptrs) == 1 and sizes == {(shape, 2 * 4 * torch.Size(shape).numel())}


def test_slot_positions_follow_streamingllm():
    model = _model("rope", ctx=16)
    steps = stream(model, [PROMPT], 30, seed=0, stop_tokens=[], window=5, sinks=2)
    for _ in steps:
        decoder = steps.decoder
        if decoder.evicted:
            pos = decoder.slot_positions()
            # sinks first; the newest token (ring slot of the last write) at S + W - 1; ages descend round the ring
            newest = 2 + (decoder.evicted - 1) % 5
            assert pos[:2].tolist() == [0, 1] and pos[newest] == 6
            assert sorted(pos[2:].tolist()) == [2, 3, 4, 5, 6]
            assert [int(pos[2 + (newest - 2 - a) % 5]) for a in range(5)] == [6, 5, 4, 3, 2]


def test_batch_of_equal_length_prompts_matches_each_row_alone():
    model = _model("rope", ctx=16)
    prompts = [PROMPT, [7, 7, 2, 8, 1, 8, 2, 8]]
    batch = generate(model, prompts, 50, stop_tokens=[], window=9, sinks=2)
    for row, prompt in zip(batch.tokens, prompts, strict=True):
        assert row == generate(model, [prompt], 50, stop_tokens=[], window=9, sinks=2).tokens[0]


def test_long_prompt_streams_through_the_cache_and_stop_tokens_still_apply():
    model = _model("rope", layers=1, ctx=16)
    prompt = (PROMPT * 3)[:20]  # longer than S + W = 10 and the context (16)
    out = generate(model, [prompt], 30, temperature=1.0, seed=2, stop_tokens=[], window=7, sinks=3, logprobs=0)
    seq = list(prompt)
    for token, lp in zip(out.tokens[0], out.logprobs[0], strict=True):
        with torch.no_grad():
            expected = model(torch.tensor([_context(seq, 7, 3)]))[0, -1].log_softmax(-1)[token].item()
        assert lp.logprob == pytest.approx(expected, abs=2e-4)
        seq.append(token)
    stop = out.tokens[0][20]
    cut = generate(model, [prompt], 30, temperature=1.0, seed=2, stop_tokens=[stop], window=7, sinks=3)
    assert cut.finish_reasons == ["stop"] and cut.tokens[0] == out.tokens[0][:out.tokens[0].index(stop)]


@pytest.mark.parametrize(("kwargs", "fragment"), [
    (dict(window=0), "window must be an integer >= 1"),
    (dict(window=4, sinks=-1), "sinks must be an integer >= 0"),
    (dict(window=True), "window must be an integer"),
    (dict(window=30, sinks=4), "exceeds the model's context length 32"),
    (dict(sinks=4), "sinks needs a window"),
    (dict(window=8, compile=True), "leave out compile"),
    (dict(window=8, decoder=SinkWindow(8)), "not both"),
])
def test_bad_window_arguments_are_one_line_errors(kwargs, fragment):
    model = _model("rope", ctx=32)
    with pytest.raises(UserError, match=fragment) as info:
        generate(model, [PROMPT], 5, **kwargs)
    assert "\n" not in str(info.value)


def test_refuses_ragged_batches_and_sliding_window_models():
    with pytest.raises(UserError, match="prompts of one length"):
        generate(_model("rope"), [PROMPT, PROMPT[:3]], 5, window=8)
    with pytest.raises(UserError, match="sliding-window"):
        generate(_model("rope", sliding_window=6), [PROMPT], 5, window=8)


def test_cli_generates_past_the_context(tmp_path):
    text = "the quick brown fox jumps over the lazy dog\n"
    tok = decoderlab.Tokenizer.train_char(texts=[text])
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("char-baby", vocab_size=tok.vocab_size, context_length=32))
    decoderlab.save(model, tmp_path / "m", tokenizer=tok)
    run = [sys.executable, "-m", "decoderlab", "generate", str(tmp_path / "m"), "the ", "--temperature", "0.8",
           "--seed", "1", "--tokens", "100"]
    out = subprocess.run([*run, "--window", "20", "--sinks", "4"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = generate(decoderlab.load(tmp_path / "m"), [tok.encode("the ")], 100, temperature=0.8, seed=1,
                        tokenizer=tok, window=20, sinks=4)
    assert len(expected.tokens[0]) == 100 or expected.finish_reasons == ["stop"]
    assert out.stdout == "the " + expected.texts[0] + "\n"
    bad = subprocess.run([*run, "--window", "40"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "context length" in bad.stderr and "Traceback" not in bad.stderr
