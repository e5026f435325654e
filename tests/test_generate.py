"""Generation: greedy parity with transformers, sampling and its processors, stops, streaming, defaults from
generation_config, KV-cache growth, NaN refusal, logprobs, bad input."""

from __future__ import annotations

import itertools
import math
import string

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import decoderlab
from decoderlab import GenerationConfig, KVCache, ModelConfig, Tokenizer, Transformer, UserError
from decoderlab.generation import (
    Decoded,
    DecodeRequest,
    SamplingParams,
    engine,
    generate,
    resolve_sampling,
    sampling,
    stream,
)

FAST = settings(max_examples=100, deadline=None)
# 97 one-character tokens: the vocabulary size of the tiny GPT-2 in conftest.HF_CASES.
ALPHABET = string.ascii_letters + string.digits + string.punctuation + " " + "é日"


@pytest.fixture(scope="module")
def chars() -> Tokenizer:
    tok = Tokenizer.train_char(texts=[ALPHABET])
    assert tok.vocab_size == 97
    return tok


@pytest.fixture(scope="module")
def tiny_gpt2(hf_folder):
    """(decoderlab model, transformers model) with the same random weights, fp32."""
    import transformers

    folder = hf_folder("gpt2")
    return decoderlab.load(folder).eval(), transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def _tiny(vocab_size: int = 50, seed: int = 0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=vocab_size, n_layers=2, n_heads=2, d_model=32, context_length=64,
                         **overrides)
    return Transformer(config).eval()


class Scripted(Transformer):
    """A real (tiny) Transformer, run as usual to fill the cache, whose logits then force fixed per-row
    token sequences: generation tests can then say exactly what comes out."""

    def __init__(self, scripts: list[list[int]], vocab_size: int, context_length: int = 64) -> None:
        super().__init__(ModelConfig(vocab_size=vocab_size, n_layers=1, n_heads=2, d_model=16,
                                     context_length=context_length))
        self.scripts = scripts
        self.prompt_length = 0
        self.eval()

    def forward(self, input_ids, positions=None, mask=None, cache=None, **kwargs):
        if cache.length == 0:
            self.prompt_length = input_ids.shape[1]
        step = cache.length - self.prompt_length + 1 if cache.length else 0
        logits = super().forward(input_ids, positions, mask, cache, **kwargs)
        forced = torch.full_like(logits, -10.0)
        for row, script in enumerate(self.scripts):
            forced[row, -1, script[step] if step < len(script) else 0] = 10.0
        return forced


def _hf_greedy(hf_model, prompt: list[int], n: int) -> tuple[list[int], float]:
    """transformers' greedy continuation of one unpadded prompt, and the smallest top-2 logit gap on the way."""
    out = hf_model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0,
                            output_scores=True, return_dict_in_generate=True)
    gap = min(float(s[0].topk(2).values.diff().abs()) for s in out.scores)
    return out.sequences[0, len(prompt):].tolist(), gap


def _prompts(vocab_size: int, lengths: tuple[int, ...], seed: int = 1) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


# -- greedy parity ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["gpt2", "llama", "mistral-window"])
def test_greedy_matches_transformers_single_and_ragged_batch(hf_folder, case):
    import transformers

    folder = hf_folder(case)
    ours = decoderlab.load(folder).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = _prompts(ours.config.vocab_size, (5, 11, 1, 17))
    n = 20
    batch = generate(ours, prompts, n, stop_tokens=[])
    for i, prompt in enumerate(prompts):
        expected, gap = _hf_greedy(theirs, prompt, n)
        # Random tiny models can have near-ties; these prompts were picked with clear margins.
        assert gap > 1e-4, f"prompt {i} has a near-tie ({gap:.1e}); pick another prompt"
        assert len(expected) == n
        assert generate(ours, [prompt], n, stop_tokens=[]).tokens[0] == expected
        assert batch.tokens[i] == expected
    assert batch.finish_reasons == ["length"] * 4
    assert batch.prompt_tokens == [5, 11, 1, 17] and batch.completion_tokens == [n] * 4


def test_tensor_input_and_equal_lengths_take_the_unpadded_path(tiny_gpt2):
    ours, _ = tiny_gpt2
    prompts = _prompts(97, (6, 6, 6))
    from_tensor = generate(ours, torch.tensor(prompts), 12, stop_tokens=[])
    assert from_tensor.tokens == generate(ours, prompts, 12, stop_tokens=[]).tokens
    for i, p in enumerate(prompts):
        assert from_tensor.tokens[i] == generate(ours, [p], 12, stop_tokens=[]).tokens[0]


@pytest.mark.parametrize("variant", [dict(), dict(positions="rope", norm="rmsnorm", activation="swiglu")])
def test_batch_result_equals_each_prompt_alone(variant):
    model = _tiny(**variant)
    prompts = _prompts(50, (3, 9, 1, 6, 9), seed=3)
    batch = generate(model, prompts, 15, stop_tokens=[])
    assert batch.tokens == [generate(model, [p], 15, stop_tokens=[]).tokens[0] for p in prompts]


@pytest.mark.parametrize("cache_dtype", [None, torch.float32])
def test_bf16_model_generates(cache_dtype):
    model = _tiny().to(torch.bfloat16)
    result = generate(model, _prompts(50, (4, 7)), 6, temperature=0.8, seed=0, cache_dtype=cache_dtype)
    assert [len(t) for t in result.tokens] == [6, 6]


# -- sampling --------------------------------------------------------------------------------------------


def test_seed_makes_sampling_reproducible_and_leaves_the_global_rng_alone():
    model = _tiny()
    prompts = _prompts(50, (4, 8))
    kwargs = dict(temperature=1.2, top_k=20, top_p=0.95, min_p=0.01, repetition_penalty=1.1,
                  frequency_penalty=0.2, stop_tokens=[])
    rng = torch.get_rng_state()
    a = generate(model, prompts, 20, seed=7, **kwargs).tokens
    assert torch.equal(torch.get_rng_state(), rng)
    assert generate(model, prompts, 20, seed=7, **kwargs).tokens == a
    assert generate(model, prompts, 20, seed=8, **kwargs).tokens != a
    torch.manual_seed(0)
    b = generate(model, prompts, 20, seed=7, **kwargs).tokens
    assert b == a  # whatever the global RNG holds


@pytest.mark.parametrize("kwargs", [dict(top_k=1), dict(top_p=1e-6), dict(min_p=1.0)])
def test_filters_that_keep_one_token_are_greedy(kwargs):
    model = _tiny()
    prompts = _prompts(50, (4, 8))
    greedy = generate(model, prompts, 20, stop_tokens=[]).tokens
    assert generate(model, prompts, 20, temperature=1.5, seed=3, stop_tokens=[], **kwargs).tokens == greedy


def test_greedy_repetition_penalty_matches_transformers(tiny_gpt2):
    ours, theirs = tiny_gpt2
    prompt = _prompts(97, (9,))[0]
    expected = theirs.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 9, dtype=torch.long),
                               max_new_tokens=20, do_sample=False, eos_token_id=None, pad_token_id=0,
                               repetition_penalty=1.3)[0, 9:].tolist()
    result = generate(ours, [prompt], 20, repetition_penalty=1.3, stop_tokens=[]).tokens[0]
    assert result == expected
    assert result != generate(ours, [prompt], 20, stop_tokens=[]).tokens[0]  # the penalty did something


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def test_temperature_sampling_matches_softmax_of_scaled_logits():
    model = _tiny(vocab_size=8, tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(5)  # logits spread over a few units, so temperature matters
    prompt = [1, 2, 3]
    with torch.no_grad():
        logits = model(torch.tensor([prompt]))[0, -1].double()
    n, T = 6000, 0.5
    result = generate(model, [prompt] * n, 1, temperature=T, seed=0, stop_tokens=[])
    counts = torch.bincount(torch.tensor([t[0] for t in result.tokens]), minlength=8).double()
    right = (logits / T).softmax(-1)
    assert right.max() < 0.6 and right.min() > 0.005  # a distribution worth testing (>= 30 expected each)
    # chi-square, 7 degrees of freedom: 24.3 is its 0.1% tail. A temperature a little off lands far beyond it.
    assert _chi2(counts, right) < 24.3
    assert _chi2(counts, (logits / 0.6).softmax(-1)) > 40
    assert _chi2(counts, logits.softmax(-1)) > 200


def test_frequency_penalty_stops_repeats():
    model = _tiny()
    result = generate(model, [[1, 2, 3]], 30, frequency_penalty=1e4, stop_tokens=[])
    assert len(set(result.tokens[0])) == 30


def test_repetition_penalty_covers_the_prompt():
    model = _tiny()
    prompt = list(range(40))
    result = generate(model, [prompt], 10, repetition_penalty=1e6, stop_tokens=[])
    assert not set(result.tokens[0]) & set(prompt)


# -- processors (property tests) -------------------------------------------------------------------------

distinct_rows = st.integers(2, 30).flatmap(
    lambda V: st.lists(st.lists(st.floats(-20, 20), min_size=V, max_size=V, unique=True), min_size=1,
                       max_size=4))


@FAST
@given(rows=distinct_rows, k=st.integers(1, 35))
def test_top_k_keeps_the_k_largest(rows, k):
    logits = torch.tensor(rows, dtype=torch.float64)
    out = sampling.top_k(logits, k)
    kept = out.isfinite()
    assert (kept.sum(-1) == min(k, logits.shape[-1])).all()
    for row, keep in zip(logits, kept, strict=True):
        assert row[keep].min() > row[~keep].max() if (~keep).any() else True
    assert torch.equal(out[kept], logits[kept])


@FAST
@given(rows=distinct_rows, p=st.floats(0.01, 1.0))
def test_top_p_keeps_the_smallest_set_reaching_p(rows, p):
    logits = torch.tensor(rows, dtype=torch.float64)
    kept = sampling.top_p(logits, p).isfinite()
    probs = logits.softmax(-1)
    for row, prob, keep in zip(logits, probs, kept, strict=True):
        if (~keep).any():
            assert row[keep].min() > row[~keep].max()  # the most likely tokens
        mass = float(prob[keep].sum())
        assert mass >= p - 1e-9  # reaches p ...
        assert mass - float(prob[keep].min()) < p + 1e-9  # ... and one token fewer would not


@FAST
@given(rows=distinct_rows, p=st.floats(0.0, 1.0))
def test_min_p_keeps_tokens_at_least_p_times_the_top(rows, p):
    logits = torch.tensor(rows, dtype=torch.float64)
    kept = sampling.min_p(logits, p).isfinite()
    probs = logits.softmax(-1)
    ratio = probs / probs.max(-1, keepdim=True).values
    clear = (ratio - p).abs() > 1e-9
    assert torch.equal(kept[clear], (ratio >= p)[clear])
    assert kept.any(-1).all()


@FAST
@given(rows=distinct_rows, penalty=st.floats(1.01, 5.0), data=st.data())
def test_repetition_penalty_lowers_seen_tokens_only(rows, penalty, data):
    logits = torch.tensor(rows, dtype=torch.float64)
    seen = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=logits.shape[1],
                                                    max_size=logits.shape[1]),
                                           min_size=logits.shape[0], max_size=logits.shape[0])))
    out = sampling.repetition_penalty(logits, seen, penalty)
    assert torch.equal(out[~seen], logits[~seen])
    expected = torch.where(logits > 0, logits / penalty, logits * penalty)
    assert torch.allclose(out[seen], expected[seen])
    assert (out[seen] <= logits[seen]).all()


@FAST
@given(rows=distinct_rows, penalty=st.floats(-2.0, 2.0), data=st.data())
def test_frequency_penalty_subtracts_penalty_times_count(rows, penalty, data):
    logits = torch.tensor(rows, dtype=torch.float64)
    counts = torch.tensor(data.draw(st.lists(st.lists(st.integers(0, 5), min_size=logits.shape[1],
                                                      max_size=logits.shape[1]),
                                             min_size=logits.shape[0], max_size=logits.shape[0]))).double()
    out = sampling.frequency_penalty(logits, counts, penalty)
    assert torch.allclose(out, logits - penalty * counts)
    assert torch.equal(out[counts == 0], logits[counts == 0])


def test_sample_draws_only_from_kept_tokens():
    logits = sampling.top_k(torch.randn(2000, 10, generator=torch.Generator().manual_seed(0)), 3)
    tokens = sampling.sample(logits, torch.Generator().manual_seed(1))
    assert logits.gather(1, tokens[:, None]).isfinite().all()


# -- stops and streaming ---------------------------------------------------------------------------------


def test_stop_token_ends_each_row_and_is_not_included():
    model = _tiny()
    prompts = _prompts(50, (5, 8))
    free = generate(model, prompts, 20, stop_tokens=[]).tokens
    stop = free[0][6]
    cut = generate(model, prompts, 20, stop_tokens=[stop])
    first = free[0].index(stop)
    assert cut.tokens[0] == free[0][:first]
    assert cut.finish_reasons[0] == "stop" and cut.stopped_by[0] == stop
    assert cut.completion_tokens[0] == first + 1
    if stop in free[1]:
        assert cut.tokens[1] == free[1][:free[1].index(stop)]
    else:
        assert cut.tokens[1] == free[1] and cut.finish_reasons[1] == "length"


def test_default_stop_tokens_are_the_eos_ids():
    model = Scripted([[5, 6, 7, 8]], vocab_size=20)
    assert generate(model, [[1]], 4).tokens == [[5, 6, 7, 8]]
    model.config.eos_token_id = 7
    result = generate(model, [[1]], 4)
    assert result.tokens == [[5, 6]] and result.stopped_by == [7]
    assert generate(model, [[1]], 4, stop_tokens=[]).tokens == [[5, 6, 7, 8]]


def test_finished_rows_freeze_and_generation_stops_when_all_have():
    model = Scripted([[3, 4, 9, 5, 5, 5], [3, 9, 5, 5, 5, 5], [3, 4, 4, 9, 5, 5]], vocab_size=20)
    steps = list(stream(model, [[1, 2], [1], [2, 2, 2]], 6, stop_tokens=[9]))
    assert len(steps) == 4  # the last row stops at step 4 of 6
    assert [s.tokens for s in steps] == [[[3], [3], [3]], [[4], [], [4]], [[], [], [4]], [[], [], []]]
    assert [s.finish_reasons for s in steps] == [[None] * 3, [None, "stop", None], ["stop", None, None],
                                                 [None, None, "stop"]]


def test_stop_strings_cut_text_and_tokens(chars):
    model = Scripted([[chars.token_to_id(c) for c in "ab<|end|>cd"], [chars.token_to_id(c) for c in "xyz<|qq"]],
                     vocab_size=97)
    result = generate(model, [[0], [0]], 11, tokenizer=chars, stop_strings=["<|end|>", "z<"])
    assert result.texts == ["ab", "xy"]
    assert result.tokens[0] == [chars.token_to_id(c) for c in "ab<|end|>"]  # through the completing token
    assert result.tokens[1] == [chars.token_to_id(c) for c in "xyz<"]
    assert result.finish_reasons == ["stop", "stop"] and result.stopped_by == ["<|end|>", "z<"]


def test_stop_string_on_a_real_model(tiny_gpt2, chars):
    ours, _ = tiny_gpt2
    prompts = _prompts(97, (4, 9))
    # Sampled (greedy text of this tiny model is one repeated letter); the other rows' draws do not depend on
    # when a row stops, so the free run shows what the stopped one would have produced.
    kwargs = dict(temperature=1.0, seed=0, stop_tokens=[], tokenizer=chars)
    free = generate(ours, prompts, 30, **kwargs)
    assert free.texts == [chars.decode(t) for t in free.tokens]
    stop = free.texts[0][10:12]
    result = generate(ours, prompts, 30, stop_strings=[stop], **kwargs)
    at = free.texts[0].index(stop)
    assert result.texts[0] == free.texts[0][:at]
    assert result.tokens[0] == free.tokens[0][:at + len(stop)]
    assert result.finish_reasons[0] == "stop" and result.stopped_by[0] == stop
    if stop in free.texts[1]:
        assert result.texts[1] == free.texts[1][:free.texts[1].index(stop)]
    else:
        assert result.tokens[1] == free.tokens[1] and result.finish_reasons[1] == "length"


def test_stream_yields_what_generate_returns(tiny_gpt2, chars):
    ours, _ = tiny_gpt2
    prompts = _prompts(97, (3, 12, 7))
    kwargs = dict(temperature=0.9, seed=5, tokenizer=chars)
    free = generate(ours, prompts, 40, stop_tokens=[], **kwargs)
    kwargs |= dict(stop_tokens=[free.tokens[0][8]], stop_strings=[free.texts[1][15:17], "Q"])
    result = generate(ours, prompts, 40, **kwargs)
    assert {type(s) for s in result.stopped_by} >= {int, str}  # both kinds of stop are exercised
    tokens, texts, reasons = [[], [], []], ["", "", ""], [None] * 3
    for step in stream(ours, prompts, 40, **kwargs):
        for i in range(3):
            tokens[i] += step.tokens[i]
            texts[i] += step.texts[i]
            assert reasons[i] is None or not step.tokens[i]  # nothing after a row finishes
            reasons[i] = reasons[i] or step.finish_reasons[i]
    assert tokens == result.tokens and texts == result.texts and reasons == result.finish_reasons


def test_stream_holds_back_a_possible_stop_string(chars):
    text = "ab<|en<|end|>"
    model = Scripted([[chars.token_to_id(c) for c in text]], vocab_size=97)
    deltas = [s.texts[0] for s in stream(model, [[0]], len(text), tokenizer=chars, stop_strings=["<|end|>"])]
    assert "".join(deltas) == "ab<|en"
    assert deltas[:3] == ["a", "b", ""]  # "<" could begin the stop string
    assert all("<|end" not in d for d in deltas)


def test_stream_text_never_splits_a_utf8_character():
    tok = Tokenizer.train_bpe(texts=["x"], vocab_size=257)  # byte tokens only: "日" is 3 tokens
    text = "héllo 日本 👋!"
    ids = tok.encode(text)
    assert len(ids) > len(text)
    model = Scripted([ids], vocab_size=257)
    deltas = [s.texts[0] for s in stream(model, [[0]], len(ids), tokenizer=tok, stop_tokens=[])]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    assert deltas.count("") >= len(ids) - len(text)
    # Cut mid-character by the length limit: the rest comes out as the decoder renders it.
    cut = generate(model, [[0]], 8, tokenizer=tok, stop_tokens=[])
    assert cut.texts == [tok.decode(ids[:8])] and cut.finish_reasons == ["length"]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return Tokenizer.train_bpe(texts=["Ünïcödé 日本語のテキスト 👋🏽 and ascii; κόσμε\n" * 20], vocab_size=300)


@settings(max_examples=40, deadline=None)
@given(ids=st.lists(st.integers(0, 299), min_size=1, max_size=25))
def test_text_is_the_decoded_tokens_whatever_they_are(bpe, ids):
    model = Scripted([ids], vocab_size=300)
    result = generate(model, [[0]], len(ids), tokenizer=bpe, stop_tokens=[])
    assert result.texts == [bpe.decode(ids)]


def test_context_length_caps_new_tokens():
    model = _tiny()  # context 64
    result = generate(model, [[1] * 60, [2] * 10], 50, stop_tokens=[])
    assert [len(t) for t in result.tokens] == [5, 5]  # the batch shares slots 60..64
    assert result.finish_reasons == ["length", "length"]
    assert len(generate(model, [[1] * 64], 9, stop_tokens=[]).tokens[0]) == 1


def test_zero_new_tokens():
    result = generate(_tiny(), [[1, 2]], 0)
    assert result.tokens == [[]] and result.finish_reasons == ["length"] and result.completion_tokens == [0]


def test_training_mode_is_restored():
    model = _tiny(dropout=0.5).train()
    prompts = _prompts(50, (5,))
    a = generate(model, prompts, 10, stop_tokens=[]).tokens
    assert model.training
    assert generate(model, prompts, 10, stop_tokens=[]).tokens == a  # dropout was off


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, match", [
    (dict(input_ids=[[1] * 65]), "exceeds the model's context length"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(temperature=1.0, top_p=0.0), "top_p"),
    (dict(temperature=1.0, top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(logprobs=21), "logprobs"),
    (dict(logprobs=True), "logprobs"),
    (dict(min_p=2.0), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(input_ids=[]), "no prompts"),
    (dict(input_ids=[[1], []]), "prompt 1 is empty"),
    (dict(input_ids=[[1, 50]]), "not a token id"),
    (dict(input_ids=[1, 2, 3]), "for one prompt pass"),
    (dict(input_ids=[[1.5, 2.0]]), "integer token ids"),
    (dict(input_ids=torch.ones(3, dtype=torch.long)), "tensor \\[batch, time\\]"),
    (dict(input_ids=torch.ones(1, 3)), "integer token ids"),
    (dict(input_ids="hello"), "list of token-id lists"),
    (dict(stop_strings=["x"]), "need a tokenizer"),
    (dict(stop_tokens=["x"]), "stop_tokens"),
    (dict(seed=1.5), "seed"),
    (dict(cache_dtype=torch.long), "cache_dtype"),
])
def test_bad_input_is_a_one_line_user_error(kwargs, match):
    model = _tiny()
    args = dict(input_ids=[[1, 2, 3]], max_new_tokens=4) | kwargs
    for fn in (generate, stream):
        with pytest.raises(UserError, match=match) as info:
            fn(model, **args)
        assert "\n" not in str(info.value)


# -- defaults from generation_config ----------------------------------------------------------------------


def test_sampling_defaults_come_from_the_generation_config():
    model = _tiny()
    assert resolve_sampling(model) == SamplingParams()  # no generation_config.json: greedy
    # Llama-3-Instruct's file: do_sample, temperature 0.6, top_p 0.9 (top_k left to transformers' default, 50).
    model.generation_config = GenerationConfig(eos_token_id=[7, 9], do_sample=True, temperature=0.6, top_p=0.9)
    assert resolve_sampling(model) == SamplingParams(0.6, 50, 0.9)
    # Arguments given win, one by one; 0 / 1 switch a filter off; temperature 0 is greedy.
    assert resolve_sampling(model, temperature=1.0, top_k=0, top_p=1.0) == SamplingParams(1.0, None, 1.0)
    assert resolve_sampling(model, temperature=0).greedy
    model.generation_config = GenerationConfig(do_sample=False, temperature=0.6, repetition_penalty=1.3)
    assert resolve_sampling(model) == SamplingParams(repetition_penalty=1.3)  # greedy, the penalty still applies


def test_generation_config_defaults_and_end_ids_match_transformers(hf_folder, tmp_path):
    import json
    import shutil

    import transformers

    folder = tmp_path / "llama"
    shutil.copytree(hf_folder("llama"), folder)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    prompt = _prompts(101, (7,), seed=4)[0]
    ids = torch.tensor([prompt])
    free = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=25, do_sample=False,
                           eos_token_id=None, pad_token_id=0, repetition_penalty=1.3)[0, 7:].tolist()
    at = max(i for i, t in enumerate(free[:15]) if t not in free[:i])
    # A checkpoint that does not sample, with a repetition penalty and an end id that config.json lacks.
    (folder / "generation_config.json").write_text(json.dumps(
        {"do_sample": False, "temperature": 0.6, "top_p": 0.9, "repetition_penalty": 1.3, "eos_token_id": [free[at]],
         "pad_token_id": 0}))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    expected = theirs.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=25)[0, 7:].tolist()
    ours = decoderlab.load(folder)
    assert ours.config.eos_token_id != [free[at]]
    result = generate(ours, [prompt], 25)  # no arguments: every default from the checkpoint
    assert expected == free[:at + 1]
    assert result.tokens[0] + [result.stopped_by[0]] == expected and result.finish_reasons == ["stop"]
    # The same checkpoint, sampling by default: the resolved settings are transformers' (top_k 50 by default).
    (folder / "generation_config.json").write_text(json.dumps({"do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    ours = decoderlab.load(folder)
    config = transformers.GenerationConfig.from_pretrained(folder)
    defaults = transformers.GenerationConfig._get_default_generation_params()  # what generate() fills in

    def used(name: str):
        return defaults[name] if getattr(config, name) is None else getattr(config, name)

    assert resolve_sampling(ours) == SamplingParams(used("temperature"), used("top_k"), used("top_p"))
    assert generate(ours, [prompt], 20, seed=1).tokens != generate(ours, [prompt], 20, seed=2).tokens
    assert generate(ours, [prompt], 20, temperature=0).tokens == generate(
        decoderlab.load(hf_folder("llama")), [prompt], 20).tokens


# -- KV cache growth --------------------------------------------------------------------------------------


def test_cache_reserve_grows_geometrically_and_keeps_contents():
    config = ModelConfig(vocab_size=50, n_layers=2, n_heads=2, d_model=32, context_length=1 << 20)
    cache = KVCache(config, 2, 8)
    k = torch.randn(2, 2, 5, 16)
    cache.update(0, k, -k)
    cache.advance(5)
    assert not cache.reserve(8) and cache.max_length == 8
    assert cache.reserve(9) and cache.max_length == 16  # twice, not just enough
    assert cache.reserve(100, limit=50) and cache.max_length == 100  # at least what is needed
    assert cache.reserve(101, limit=150) and cache.max_length == 150  # at most the limit
    assert cache.reserve(151, round_up=lambda n: 1 << (n - 1).bit_length()) and cache.max_length == 512
    keys, values = cache.update(0, torch.zeros(2, 2, 1, 16), torch.zeros(2, 2, 1, 16))
    assert torch.equal(keys[:, :, :5], k) and torch.equal(values[:, :, :5], -k)
    assert cache.nbytes == 2 * 2 * 2 * 2 * 512 * 16 * 4
    with pytest.raises(UserError):
        cache.resize(4)


def test_long_request_holds_memory_for_what_it_generated(monkeypatch, one_thread):
    # A 32k-context model asked for 10**6 tokens: the cache starts at prompt + CACHE_CHUNK and doubles, so after
    # 300 tokens it holds at most twice that, not the context (which would be 64x more here).
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=50, n_layers=2, n_heads=2, d_model=32, context_length=32768,
                                    positions="rope", init_std=0.3)).eval()
    caches = []
    new_cache = model.new_cache
    monkeypatch.setattr(model, "new_cache", lambda *a, **kw: caches.append(new_cache(*a, **kw)) or caches[-1])
    prompts = _prompts(50, (5, 9))
    steps = stream(model, prompts, 10**6, stop_tokens=[])
    grown = [s.tokens for s in itertools.islice(steps, 300)]
    (cache,) = caches
    assert 9 + 256 < cache.max_length <= 2 * (9 + 256) and cache.length == 9 + 299
    assert cache.nbytes <= 2 * (9 + 256) * 2 * 2 * 2 * 16 * 4 * 2
    steps.close()
    # The same tokens as with the whole request preallocated.
    monkeypatch.setattr(engine, "CACHE_CHUNK", 10**6)
    big = stream(model, prompts, 10**6, stop_tokens=[])
    assert [s.tokens for s in itertools.islice(big, 300)] == grown
    assert caches[-1].max_length == 32768


# -- NaN weights and logprobs -----------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_logits_for_the_prompt_are_refused(value):
    model = _tiny()
    with torch.no_grad():
        model.lm_head.weight[3, 0] = value
    kind = "NaN" if math.isnan(value) else "(NaN|infinite)"
    for fn in (generate, lambda *a, **kw: list(stream(*a, **kw))):
        with pytest.raises(UserError, match=f"produced {kind} logits for the prompt") as info:
            fn(model, _prompts(50, (4, 6)), 5)
        assert "\n" not in str(info.value)


def test_logprobs_are_the_log_softmax_of_the_raw_logits(tiny_gpt2):
    ours, _ = tiny_gpt2
    prompts = _prompts(97, (4, 9, 6))
    kwargs = dict(temperature=1.3, top_k=5, repetition_penalty=1.2, seed=3, stop_tokens=[])
    result = generate(ours, prompts, 12, logprobs=4, **kwargs)
    assert result.tokens == generate(ours, prompts, 12, **kwargs).tokens  # asking for logprobs changes nothing
    for prompt, tokens, logprobs in zip(prompts, result.tokens, result.logprobs, strict=True):
        with torch.inference_mode():
            # Before temperature, penalties and filters: the model's own distribution at each position.
            want = ours(torch.tensor([prompt + tokens]))[0, len(prompt) - 1:-1].log_softmax(-1)
        assert [lp.token for lp in logprobs] == tokens
        for i, lp in enumerate(logprobs):
            assert lp.logprob == pytest.approx(float(want[i, lp.token]), abs=1e-4)
            assert [t for t, _ in lp.top] == want[i].topk(4).indices.tolist()
            values = [v for _, v in lp.top]
            assert values == sorted(values, reverse=True) and values == pytest.approx(want[i].topk(4).values.tolist(),
                                                                                        abs=1e-4)
    # Streamed: one TokenLogprob per new token, in step; k=0 gives the tokens' own logprobs and no alternatives.
    for step in stream(ours, prompts, 5, logprobs=0, **kwargs):
        assert [[lp.token for lp in row] for row in step.logprobs] == step.tokens
        assert all(lp.top == [] for row in step.logprobs for lp in row)
    assert generate(ours, prompts, 3, **kwargs).logprobs is None


# -- the decoder protocol ---------------------------------------------------------------------------------


class Echo:
    """A decoder through the public protocol alone: each step repeats each prompt's last token, twice."""

    def __init__(self, request: DecodeRequest) -> None:
        self.last = [p[-1] for p in request.prompts]
        self.closed = False
        self.finished: list[int] = []

    def step(self, allowed=None, forced=None) -> Decoded:
        return Decoded([[t, t] for t in self.last])

    def finish(self, rows: list[int]) -> None:
        self.finished += rows

    def close(self) -> None:
        self.closed = True


def test_a_decoder_of_several_tokens_a_step_gets_the_hosts_budget_and_stops(chars):
    model = _tiny()
    steps = stream(model, [[5, 7]], 5, decoder=Echo, stop_tokens=[])
    assert [s.tokens for s in steps] == [[[7, 7]], [[7, 7]], [[7]]]  # the budget cuts the last step
    assert steps.decoder.closed
    # Two rows: one stops on a stop id mid-step (the stop id counts, nothing after it is kept), the other runs on.
    result = generate(model, [[1, 2], [3, 9]], 5, decoder=Echo, stop_tokens=[9])
    assert result.tokens == [[2, 2, 2, 2, 2], []] and result.finish_reasons == ["length", "stop"]
    assert result.completion_tokens == [5, 1]
    # Stop strings and text through the same host loop.
    a, b = chars.token_to_id("a"), chars.token_to_id("b")
    result = generate(_tiny(vocab_size=97), [[a], [b]], 9, decoder=Echo, stop_strings=["bbb"], tokenizer=chars,
                      stop_tokens=[])
    assert result.texts == ["aaaaaaaaa", ""] and result.tokens[1] == [b, b, b]
    assert result.stopped_by == [None, "bbb"]


def test_a_decoder_that_gives_no_token_or_no_logprobs_is_a_one_line_error():
    class Mute(Echo):
        def step(self, allowed=None, forced=None) -> Decoded:
            return Decoded([[] for _ in self.last])

    for decoder, kwargs, match in ((Mute, {}, "gave no token for row 0"), (Echo, dict(logprobs=2), "logprobs")):
        with pytest.raises(UserError, match=match) as info:
            generate(_tiny(), [[1, 2]], 5, decoder=decoder, **kwargs)
        assert "\n" not in str(info.value)


# -- the CLI ----------------------------------------------------------------------------------------------


def test_cli_generate_stops_on_the_checkpoint_end_ids_on_every_path(tmp_path):
    import json
    import subprocess
    import sys

    tok = Tokenizer.train_char(texts=["abcdefghij klmnop\n"])
    # A chat template whose text the char vocabulary covers: a user turn is its content then "\n".
    tok = Tokenizer(tok.backend, dict(tok.special_tokens),
                    chat_template="{% for m in messages %}{{ m['content'] }}\n{% endfor %}")
    torch.manual_seed(2)  # a wide init: varied greedy text, so the end id first comes after several tokens
    model = Transformer(ModelConfig.preset("char-baby", vocab_size=tok.vocab_size, init_std=0.3)).eval()
    prompt = tok.encode("abc")
    free = generate(model, [prompt], 30, temperature=0, stop_tokens=[]).tokens[0]
    at = max(i for i, t in enumerate(free[:15]) if t not in free[:i])
    assert at >= 2 and tok.eos_id is None and model.config.eos_token_id is None
    model.generation_config = GenerationConfig(eos_token_id=[free[at]])  # an end id only generation_config.json has
    folder = tmp_path / "m"
    decoderlab.save(model, folder, tokenizer=tok)
    assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == free[at]
    want = "abc" + tok.decode(free[:at]) + "\n"
    for extra in ([], ["--speculative", "recycle"], ["--speculative", str(folder)]):
        out = subprocess.run([sys.executable, "-m", "decoderlab", "generate", str(folder), "abc", "--tokens", "30",
                              *extra], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        if extra:
            assert out.stdout.startswith(want) and "tokens per forward pass" in out.stdout[len(want):]
        else:
            assert out.stdout == want
    # --chat: the prompt goes through the template (Tokenizer.encode_chat), and the text printed is the reply alone.
    chat = generate(model, [tok.encode_chat([{"role": "user", "content": "abc"}])], 30, tokenizer=tok)
    out = subprocess.run([sys.executable, "-m", "decoderlab", "generate", str(folder), "abc", "--tokens", "30",
                          "--chat"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == chat.texts[0] + "\n"
