"""The compiled decode step (`generate(..., compile=True)`): the same tokens as the eager loop, static-mode cache,
growing through graphs of power-of-two sizes."""

from __future__ import annotations

import pytest
import torch

import decoderlab
from decoderlab import ModelConfig, Transformer, UserError
from decoderlab.accel import Linear
from decoderlab.generation import counterfactual, generate
from decoderlab.generation.compiled import MIN_CACHE_SLOTS, cache_slots


def _prompts(vocab_size: int, lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


@pytest.mark.parametrize("case", ["gpt2", "llama", "mistral-window", "qwen2-window-mixed"])
def test_compiled_greedy_equals_eager_on_a_ragged_batch(hf_folder, case):
    # gpt2: learned positions; llama: RoPE, GQA, biases; mistral-window: a sliding window (7) shorter than
    # the 17 + 24 tokens, so the graph's window term matters; qwen2-window-mixed: a window (5) in two of
    # three layers, so the graph masks each layer its own way.
    model = decoderlab.load(hf_folder(case)).eval()
    prompts = _prompts(model.config.vocab_size, (5, 17, 1))
    eager = generate(model, prompts, 24, stop_tokens=[])
    compiled = generate(model, prompts, 24, stop_tokens=[], compile=True)
    assert compiled.tokens == eager.tokens
    assert compiled.finish_reasons == ["length"] * 3


def test_compiled_sampling_stops_and_counterfactual_replay(hf_folder):
    model = decoderlab.load(hf_folder("llama")).eval()
    prompts = _prompts(model.config.vocab_size, (5, 17, 1), seed=2)
    kwargs = dict(temperature=0.9, top_k=30, repetition_penalty=1.2, seed=7)
    eager = generate(model, prompts, 24, stop_tokens=[], **kwargs)
    compiled = generate(model, prompts, 24, stop_tokens=[], compile=True, trace=True, **kwargs)
    assert compiled.tokens == eager.tokens
    # A stop token ends its row while the others go on through the same graph.
    stop = eager.tokens[1][3]
    stopped = generate(model, prompts, 24, stop_tokens=[stop], compile=True, **kwargs)
    assert stopped.tokens == generate(model, prompts, 24, stop_tokens=[stop], **kwargs).tokens
    assert stopped.finish_reasons[1] == "stop"
    # The trace replays through the compiled step too, so the factual run comes back exactly.
    assert compiled.trace.compile
    assert counterfactual(model, compiled.trace).tokens == compiled.tokens


def test_compiled_step_repacks_weights_changed_after_pack():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, n_layers=2, n_heads=2, d_model=32, context_length=128,
                                    positions="rope", norm="rmsnorm", activation="swiglu")).eval()
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    for module in linears:  # packed whatever the model's size (pack() leaves small fp32 models alone)
        module.pack(1)
    prompts = _prompts(64, (6, 6))
    before = generate(model, prompts, 16, stop_tokens=[], compile=True)
    with torch.no_grad():  # new weights in place, as a training step would leave them
        for module in linears:
            module.weight.normal_(0, 0.3)
    assert all(m.stale for m in linears)
    after = generate(model, prompts, 16, stop_tokens=[], compile=True)
    assert not any(m.stale for m in linears)
    for module in linears:
        module.packed = None
    assert after.tokens == generate(model, prompts, 16, stop_tokens=[]).tokens
    assert after.tokens != before.tokens


def test_compiled_cache_grows_through_graphs_of_each_size(monkeypatch):
    # A first cache of cache_slots(prompt + 8) = 64 slots for 100 new tokens: it grows to 128 mid-generation, and
    # the step moves to that size's graph (guards checked again), with the eager loop's tokens.
    from decoderlab.generation import engine

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, n_layers=1, n_heads=2, d_model=32, context_length=1024,
                                    positions="rope", init_std=0.3)).eval()
    prompts = _prompts(50, (5, 9))
    eager = generate(model, prompts, 100, stop_tokens=[])
    monkeypatch.setattr(engine, "CACHE_CHUNK", 8)
    caches = []
    new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda *a, **kw: caches.append(new_cache(*a, **kw)) or caches[-1])
    compiled = generate(model, prompts, 100, stop_tokens=[], compile=True)
    assert compiled.tokens == eager.tokens
    assert caches[0].max_length == 128  # started at 64, doubled once: a power of two for the graph


def test_cache_slots_come_in_powers_of_two_within_the_context():
    assert cache_slots(1, 1024) == MIN_CACHE_SLOTS
    assert cache_slots(65, 1024) == 128 and cache_slots(128, 1024) == 128 and cache_slots(129, 1024) == 256
    assert cache_slots(600, 700) == 700  # capped at the context length
    assert cache_slots(40, 32) == 40  # a prompt that fills the context still gets its slots


def test_static_cache_writes_at_its_slots_and_needs_explicit_inputs():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, n_layers=2, n_heads=2, d_model=32, context_length=64,
                                    positions="rope", norm="rmsnorm", activation="swiglu")).eval()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.inference_mode():
        full = model(ids)
        cache = model.new_cache(1, 16)
        model(ids[:, :5], cache=cache)
        cache.write_slots = torch.tensor([5])
        mask = (torch.arange(16) <= 5).view(1, 1, 1, 16)
        step = model(ids[:, 5:], torch.tensor([[5]]), mask, cache)
        assert cache.length == 5  # left to the caller in static mode
        assert cache.keys[:, :, :, 5].abs().sum() > 0 and cache.keys[:, :, :, 6:].abs().sum() == 0
        torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)
        with pytest.raises(UserError, match="static mode"):
            model(ids[:, 5:], cache=cache)
        with pytest.raises(UserError, match=r"bool \[B or 1, 1, 1, 16\]"):
            model(ids[:, 5:], torch.tensor([[5]]), mask[..., :8], cache)


def test_a_missing_cxx_compiler_is_a_one_line_error():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=37, n_layers=1, n_heads=2, d_model=24, context_length=64)).eval()
    with torch._inductor.config.patch({"cpp.cxx": ("/nonexistent/g++",)}):
        with pytest.raises(UserError, match="install a C\\+\\+ compiler") as info:
            generate(model, [[1, 2, 3]], 5, compile=True)
    assert "\n" not in str(info.value)
    assert generate(model, [[1, 2, 3]], 5).finish_reasons == ["length"]  # eager generation is unaffected


def test_interleaved_compiled_streams_of_two_models():
    # Later steps skip dynamo's full guard check; two generations stepping in turn must still each get their own
    # model's graph (the guards that tell the graphs apart are kept).
    from decoderlab.generation import stream

    torch.manual_seed(0)
    small = Transformer(ModelConfig(vocab_size=50, n_layers=1, n_heads=2, d_model=32, context_length=64)).eval()
    large = Transformer(ModelConfig(vocab_size=50, n_layers=2, n_heads=4, d_model=48, context_length=64,
                                    positions="rope", norm="rmsnorm", activation="swiglu", init_std=0.3)).eval()
    torch.manual_seed(1)
    twin = Transformer(small.config).eval()  # same shapes as `small`, other weights: the same graph, other inputs
    prompts = {small: [[1, 2, 3]], large: [[4, 5, 6, 7]], twin: [[1, 2, 3]]}
    want = {m: generate(m, p, 20, stop_tokens=[]).tokens[0] for m, p in prompts.items()}
    streams = {m: stream(m, p, 20, stop_tokens=[], compile=True) for m, p in prompts.items()}
    got: dict = {m: [] for m in prompts}
    for _ in range(20):
        for m, s in streams.items():
            got[m] += next(s).tokens[0]
    assert got == want
    assert want[small] != want[large] and want[small] != want[twin]
