"""The masked diffusion sampler (LLaDA): reduction to greedy causal decoding, the step schedule, stops, batching,
seeds, grammars on a trained model, bad input and the CLI."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import decoderlab
from decoderlab import ModelConfig, Tokenizer, Transformer, UserError
from decoderlab.generation import DiffusionSampler, diffusion_generate, stream
from decoderlab.generation.diffusion import schedule, transfer_counts
from decoderlab.masked import diffusion_noise, masked_loss

CORPUS = ["abc-12 xyz-345 hello world", "the cat sat on the mat", "ab-1 cd-23 ef-456 gh-7",
          '{"name": "ann", "age": 31}', "one two three four five six"] * 8
SMALL = dict(n_layers=2, n_heads=2, d_model=64, context_length=96, positions="rope", norm="rmsnorm",
             activation="swiglu", hf_family=None)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train_bpe(texts=CORPUS, vocab_size=300, special_tokens=("<|endoftext|>", "<mask>"))


def _train(tok: Tokenizer, steps: int = 100, seed: int = 0, **changes) -> Transformer:
    """A diffusion model trained for a few AdamW steps on CORPUS (packed, each text followed by eos)."""
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=tok.vocab_size, objective="diffusion", bidirectional=True,
                         mask_token_id=tok.mask_id, eos_token_id=tok.eos_id, **{**SMALL, **changes})
    model = Transformer(config)
    stream = [t for text in CORPUS for t in tok.encode(text) + [tok.eos_id]]  # packed documents
    data = torch.tensor(stream[:len(stream) // 24 * 24]).view(-1, 24)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        noised = diffusion_noise(data, tok.mask_id, gen, shift=config.shift_logits)
        loss = masked_loss(model(noised.inputs), noised, config.shift_logits)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def model(tok) -> Transformer:
    return _train(tok)


# ---- (a) the Done-when reduction --------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_one_token_per_step_on_a_causal_adapted_model_is_greedy_causal_decoding(family):
    """Causal attention + shifted logits is a causal LM: block length 1, one token per step, low-confidence order
    must reproduce `generate`'s greedy output token for token (batched prompts of different lengths too)."""
    torch.manual_seed(1)
    extra = dict(positions="rope", norm="rmsnorm", activation="swiglu") if family == "llama" else {}
    config = ModelConfig(vocab_size=97, n_layers=2, n_heads=4, d_model=64, context_length=64,
                         tie_embeddings=False, **extra)
    causal = Transformer(config).eval()
    prompts = [[5, 17, 3, 88, 41], [9, 2], [60, 61, 62]]
    greedy = decoderlab.generate(causal, prompts, 20, temperature=0, stop_tokens=[])
    used = {t for row in greedy.tokens for t in row} | {t for p in prompts for t in p}
    mask_id = next(t for t in range(96, 0, -1) if t not in used)
    adapted = Transformer(config.replace(objective="diffusion", shift_logits=True, bidirectional=False,
                                         mask_token_id=mask_id)).eval()
    adapted.load_state_dict(causal.state_dict())
    out = diffusion_generate(adapted, prompts, 20, steps=20, block_length=1, temperature=0, stop_tokens=[])
    assert out.tokens == greedy.tokens
    assert len({tuple(r) for r in greedy.tokens}) == 3 and any(len(set(r)) > 3 for r in greedy.tokens)
    # One by one too (no padding mask, no explicit positions).
    for p, expected in zip(prompts, greedy.tokens, strict=True):
        one = diffusion_generate(adapted, [p], 20, steps=20, block_length=1, stop_tokens=[])
        assert one.tokens == [expected]


def llada_generate(model, prompt, steps, gen_length, block_length, mask_id):
    """LLaDA's reference `generate()` (GSAI-ML/LLaDA generate.py), greedy low-confidence remasking, one prompt."""
    x = torch.full((1, prompt.shape[1] + gen_length), mask_id, dtype=torch.long)
    x[:, :prompt.shape[1]] = prompt.clone()
    num_blocks = gen_length // block_length
    steps = steps // num_blocks
    for num_block in range(num_blocks):
        start = prompt.shape[1] + num_block * block_length
        block_mask_index = x[:, start:start + block_length] == mask_id
        mask_num = block_mask_index.sum(dim=1, keepdim=True)
        num_transfer_tokens = torch.zeros(1, steps, dtype=torch.long) + mask_num // steps
        num_transfer_tokens[0, :int(mask_num % steps)] += 1
        for i in range(steps):
            mask_index = x == mask_id
            logits = model(x)
            x0 = torch.argmax(logits, dim=-1)
            p = torch.softmax(logits, dim=-1)
            x0_p = torch.squeeze(torch.gather(p, dim=-1, index=torch.unsqueeze(x0, -1)), -1)
            x0_p[:, start + block_length:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer_index = torch.zeros_like(x0, dtype=torch.bool)
            _, select_index = torch.topk(confidence[0], k=int(num_transfer_tokens[0, i]))
            transfer_index[0, select_index] = True
            x[transfer_index] = x0[transfer_index]
    return x[0, prompt.shape[1]:].tolist()


@pytest.mark.parametrize("steps, block", [(24, 24), (8, 24), (12, 8), (6, 4)])
def test_matches_llada_reference_sampler(tok, model, steps, block):
    prompt = tok.encode("the cat sat on")
    with torch.no_grad():
        expected = llada_generate(model, torch.tensor([prompt]), steps, 24, block, tok.mask_id)
    out = diffusion_generate(model, [prompt], 24, steps=steps, block_length=block, stop_tokens=[])
    assert out.tokens == [expected]


# ---- (c) the schedule, stops, batching, seeds ---------------------------------------------------------------------


def test_transfer_counts_follow_llada():
    assert transfer_counts(10, 4) == [3, 3, 2, 2]
    assert transfer_counts(8, 8) == [1] * 8
    assert schedule(16, 4, 8) == [[4, 4], [4, 4]]
    assert schedule(16, 5, 8) == [[3, 3, 2], [4, 4]]
    assert schedule(8, 20, 8) == [[1] * 8]  # never more steps than tokens in a block


@given(st.integers(1, 64), st.integers(1, 80), st.integers(1, 16))
def test_schedule_commits_every_slot_once_as_evenly_as_possible(length, steps, block):
    blocks = -(-length // block)
    if steps < blocks:
        with pytest.raises(UserError, match="fewer than"):
            schedule(length, steps, block)
        return
    plan = schedule(length, steps, block)
    assert [sum(b) for b in plan] == [min(block, length - s) for s in range(0, length, block)]
    assert all(min(b) >= 1 and max(b) - min(b) <= 1 for b in plan)
    assert sum(len(b) for b in plan) == min(steps, length) if blocks == 1 else sum(len(b) for b in plan) <= steps


@pytest.mark.parametrize("steps, block, passes", [(16, 8, 16), (4, 8, 4), (6, 4, 6), (4, 16, 4)])
def test_forward_passes_are_the_steps(tok, model, steps, block, passes):
    s = stream(model, [tok.encode("the cat")], 16, stop_tokens=[], tokenizer=tok,
               decoder=DiffusionSampler(steps, block))
    tokens = [t for step in s for t in step.tokens[0]]
    assert len(tokens) == 16 and tok.mask_id not in tokens
    assert s.decoder.forward_passes == passes


def test_stops_at_the_first_stop_token_once_everything_before_it_is_committed(tok, model):
    prompt = [tok.encode("one two")]
    full = diffusion_generate(model, prompt, 24, steps=24, block_length=4, stop_tokens=[], tokenizer=tok)
    assert full.finish_reasons == ["length"] and len(full.tokens[0]) == 24
    # The third distinct token of the output, as a stop token: the output must be the prefix before it.
    row = full.tokens[0]
    stop = list(dict.fromkeys(row))[min(2, len(set(row)) - 1)]
    at = row.index(stop)
    s = stream(model, prompt, 24, stop_tokens=[stop], tokenizer=tok, decoder=DiffusionSampler(24, 4))
    out = s.result()
    assert out.tokens == [row[:at]] and out.finish_reasons == ["stop"] and out.stopped_by == [stop]
    assert out.texts == [tok.decode(row[:at])]
    # The block loop ended early: no pass past the block holding the stop token.
    assert s.decoder.forward_passes <= (at // 4 + 1) * 4 < 24


def test_default_stop_ids_are_the_checkpoints_end_ids(tok, model):
    """Without stop_tokens, the model config's eos ids end a row (as `generate`'s defaults)."""
    prompt = [tok.encode("one two")]
    full = diffusion_generate(model, prompt, 16, block_length=8, stop_tokens=[], tokenizer=tok).tokens[0]
    end = full[len(full) // 2]
    copy = Transformer(model.config.replace(eos_token_id=[end])).eval()
    copy.load_state_dict(model.state_dict())
    out = diffusion_generate(copy, prompt, 16, block_length=8, tokenizer=tok)
    assert out.tokens == [full[:full.index(end)]] and out.stopped_by == [end] and out.finish_reasons == ["stop"]
    assert out.completion_tokens == [full.index(end) + 1]


@pytest.mark.parametrize("steps, block, remasking", [(24, 8, "low_confidence"), (6, 8, "low_confidence"),
                                                     (12, 24, "low_confidence")])
def test_batch_equals_one_by_one_when_greedy(tok, model, steps, block, remasking):
    prompts = [tok.encode("the cat sat on"), tok.encode("ab"), tok.encode('{"name": "ann",')]
    kw = dict(steps=steps, block_length=block, remasking=remasking, stop_tokens=[], tokenizer=tok, seed=5)
    batch = diffusion_generate(model, prompts, 24, **kw)
    assert batch.tokens == [diffusion_generate(model, [p], 24, **kw).tokens[0] for p in prompts]
    assert batch.texts == [tok.decode(t) for t in batch.tokens]


def test_temperature_is_reproducible_under_a_seed(tok, model):
    prompt = [tok.encode("one two")]
    kw = dict(steps=8, block_length=8, temperature=1.0, stop_tokens=[], tokenizer=tok)
    a = diffusion_generate(model, prompt, 16, seed=11, **kw)
    assert a.tokens == diffusion_generate(model, prompt, 16, seed=11, **kw).tokens
    others = {tuple(diffusion_generate(model, prompt, 16, seed=s, **kw).tokens[0]) for s in range(4)}
    assert len(others) > 1, "different seeds never changed the sample"
    greedy = diffusion_generate(model, prompt, 16, steps=8, block_length=8, temperature=0, stop_tokens=[])
    assert greedy.tokens == diffusion_generate(model, prompt, 16, steps=8, block_length=8, stop_tokens=[],
                                               seed=99).tokens


def test_random_remasking_is_reproducible_under_a_seed(tok, model):
    prompt = [tok.encode("one two")]
    kw = dict(steps=6, block_length=24, remasking="random", stop_tokens=[], tokenizer=tok)
    runs = {s: diffusion_generate(model, prompt, 24, seed=s, **kw).tokens[0] for s in range(5)}
    assert runs[3] == diffusion_generate(model, prompt, 24, seed=3, **kw).tokens[0]
    assert len({tuple(r) for r in runs.values()}) > 1, "the commit order never changed the greedy output"


def test_generate_dispatches_a_diffusion_model_to_the_sampler(tok, model):
    prompt = [tok.encode("the cat")]
    via_generate = decoderlab.generate(model, prompt, 16, tokenizer=tok, stop_tokens=[])
    assert via_generate.tokens == diffusion_generate(model, prompt, 16, tokenizer=tok, stop_tokens=[]).tokens
    out = decoderlab.generate(model, prompt, 16, tokenizer=tok, stop_tokens=[], logprobs=2)
    assert [lp.token for lp in out.logprobs[0]] == out.tokens[0]
    assert all(lp.logprob <= 0 and len(lp.top) == 2 for lp in out.logprobs[0])


def test_an_mlm_model_can_be_sampled(tok):
    mlm = Transformer(ModelConfig(vocab_size=tok.vocab_size, objective="mlm", bidirectional=True,
                                  mask_token_id=tok.mask_id, **SMALL)).eval()
    out = diffusion_generate(mlm, [tok.encode("the")], 8, steps=4, stop_tokens=[], tokenizer=tok)
    assert len(out.tokens[0]) == 8 and tok.mask_id not in out.tokens[0]


# ---- (b) grammars on a trained model ----------------------------------------------------------------------------


REGEX = r"[a-z]{2,5}-[0-9]{1,3}"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "age"], "additionalProperties": False,
          "x-guidance": {"whitespace_flexible": False}}  # no unbounded whitespace: every output must end


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_grammar_outputs_are_always_in_the_language(tok, model, seed):
    pytest.importorskip("llguidance")
    prompts = [tok.encode("ab-1 cd-23"), tok.encode("the cat"), tok.encode('{"name":')]
    for temperature in (0.0, 1.0):
        out = diffusion_generate(model, prompts, 40, steps=10, block_length=8, temperature=temperature, seed=seed,
                                 tokenizer=tok, grammar={"regex": REGEX})
        assert out.finish_reasons == ["stop"] * 3
        assert all(re.fullmatch(REGEX, t) for t in out.texts), out.texts
        out = diffusion_generate(model, prompts, 60, block_length=4, temperature=temperature, seed=seed,
                                 tokenizer=tok, grammar={"json_schema": SCHEMA})
        assert out.finish_reasons == ["stop"] * 3, out.texts
        for text in out.texts:
            value = json.loads(text)
            assert set(value) == {"name", "age"} and type(value["age"]) is int and len(value["name"]) <= 6


def test_grammar_with_several_tokens_per_step_checks_each_in_order(tok, model):
    pytest.importorskip("llguidance")
    pattern = r"(ab|cd|ef)-[0-9]{2}( (ab|cd|ef)-[0-9]{2}){3}"
    prompts = [tok.encode("ab-1 cd-23"), tok.encode("the cat")]
    for seed in range(3):
        s = stream(model, prompts, 32, temperature=1.0, seed=seed, tokenizer=tok, grammar={"regex": pattern},
                   decoder=DiffusionSampler(8, 8))
        out = s.result()
        assert out.finish_reasons == ["stop"] * 2 and all(re.fullmatch(pattern, t) for t in out.texts), out.texts
        longest = max(len(t) for t in out.tokens)
        assert s.decoder.forward_passes <= -(-longest // 4) + 1 < longest  # 4 tokens a pass, each checked


def test_grammar_on_a_causal_adapted_model_is_constrained_greedy_decoding(tok):
    pytest.importorskip("llguidance")
    torch.manual_seed(3)
    config = ModelConfig(vocab_size=tok.vocab_size, tie_embeddings=False, **SMALL)
    causal = Transformer(config).eval()
    adapted = Transformer(config.replace(objective="diffusion", shift_logits=True, mask_token_id=tok.mask_id)).eval()
    adapted.load_state_dict(causal.state_dict())
    prompts = [tok.encode("ab-1 cd-23"), tok.encode("the")]
    grammar = {"json_schema": SCHEMA}
    expected = decoderlab.generate(causal, prompts, 40, temperature=0, tokenizer=tok, grammar=grammar)
    out = diffusion_generate(adapted, prompts, 40, steps=40, block_length=1, tokenizer=tok, grammar=grammar)
    assert out.tokens == expected.tokens and out.finish_reasons == expected.finish_reasons == ["stop"] * 2


# ---- (d) bad input ----------------------------------------------------------------------------------------------


def test_bad_input_gets_one_line_errors(tok, model):
    prompt = [tok.encode("the")]
    cases = [(dict(steps=0), "steps must be an integer >= 1"),
             (dict(block_length=3), "block_length=3 does not divide"),
             (dict(block_length=0), "block_length must be an integer >= 1"),
             (dict(block_length=-4), "block_length must be an integer >= 1"),
             (dict(steps=1, block_length=4), "steps=1 is fewer than the 4 blocks"),
             (dict(remasking="entropy"), "unknown remasking")]
    for kw, message in cases:
        with pytest.raises(UserError, match=message) as info:
            diffusion_generate(model, prompt, 16, **kw)
        assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="exceeds the context length 96; ask for at most"):
        diffusion_generate(model, prompt, 200)
    causal = Transformer(ModelConfig(vocab_size=tok.vocab_size, **SMALL)).eval()
    with pytest.raises(UserError, match=r"objective diffusion or mlm\), this one is 'causal'"):
        diffusion_generate(causal, prompt, 8)
    with pytest.raises(UserError, match="trained to fill masked slots"):
        decoderlab.generate(causal, prompt, 8, decoder=DiffusionSampler(4))
    with pytest.raises(UserError, match="SinkWindow decodes causal models .* diffusion_generate"):
        decoderlab.generate(model, prompt, 8, window=16)
    with pytest.raises(UserError, match="penalties are not defined"):
        decoderlab.generate(model, prompt, 8, repetition_penalty=1.3)
    from decoderlab.serve import create_app

    with pytest.raises(UserError, match="served by masked diffusion sampling .* leave out compile"):
        create_app(model, tok, "m", compile=True)


# ---- the CLI ----------------------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "decoderlab", *args], capture_output=True, text=True, timeout=120)


def test_cli_generate_samples_a_diffusion_model(tok, model, tmp_path):
    decoderlab.save(model, tmp_path / "m", tokenizer=tok)
    loaded = decoderlab.load(tmp_path / "m")
    for flags, steps in (([], None), (["--diffusion-steps", "8", "--remasking", "random", "--seed", "3"], 8)):
        out = _cli("generate", str(tmp_path / "m"), "the cat", "-n", "16", "--block-length", "8", *flags)
        assert out.returncode == 0, out.stderr
        expected = diffusion_generate(loaded, [tok.encode("the cat")], 16, steps=steps, block_length=8,
                                      remasking="random" if steps else "low_confidence", seed=3, tokenizer=tok)
        assert out.stdout == "the cat" + expected.texts[0] + "\n"  # no flag: one step per token
    bad = _cli("generate", str(tmp_path / "m"), "the", "-n", "16", "--block-length", "5")
    assert bad.returncode == 2 and "does not divide" in bad.stderr and bad.stderr.count("\n") == 1
    served = _cli("serve", str(tmp_path / "m"), "--port", "0", "--compile")
    assert served.returncode == 2 and "served by masked diffusion sampling" in served.stderr


def test_a_diffusion_model_is_served(tok, model):
    httpx = pytest.importorskip("httpx")
    from serve_helpers import running

    from decoderlab.serve import create_app

    prompt = "the cat"
    expected = diffusion_generate(model, [tok.encode(prompt)], 16, tokenizer=tok)  # the checkpoint's stop ids
    with running(create_app(model, tok, "m")) as base:
        body = {"model": "m", "prompt": prompt, "max_tokens": 16, "temperature": 0}
        got = httpx.post(f"{base}/completions", json=body, timeout=60).json()
        assert got["choices"][0]["text"] == expected.texts[0]
        assert got["choices"][0]["finish_reason"] == expected.finish_reasons[0]
        bad = httpx.post(f"{base}/completions", json={**body, "frequency_penalty": 0.5}, timeout=60)
        assert bad.status_code == 400 and "penalties" in bad.json()["error"]["message"]
        assert httpx.get(f"{base}/models", timeout=60).status_code == 200  # still serving
