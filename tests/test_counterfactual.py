"""Counterfactual generation (Gumbel-Max SCM): factual replay, token and prompt interventions, noise per step."""

from __future__ import annotations

import pytest
import torch

from decoderlab import ModelConfig, Transformer, UserError
from decoderlab.generation import generate, sampling
from decoderlab.generation.counterfactual import Trace, counterfactual
from decoderlab.generation.engine import step_seed


def _tiny(vocab_size: int = 50, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab_size, n_layers=1, n_heads=2, d_model=32,
                                   context_length=64)).eval()


def _prompts(lengths, vocab_size=50, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in lengths]


MODEL = _tiny()
# Random tiny models have nearly flat logits, so the shared noise decides almost everything; a sharper one
# lets the prompt matter.
SHARP = Transformer(ModelConfig(vocab_size=50, n_layers=1, n_heads=2, d_model=32, context_length=64,
                                tie_embeddings=False)).eval()
with torch.no_grad():
    SHARP.lm_head.weight.mul_(30)


@pytest.mark.parametrize("seed", [0, 1, 7, 12345])
@pytest.mark.parametrize("kwargs", [dict(temperature=1.0), dict(temperature=0.7, top_k=10),
                                    dict(temperature=1.3, top_p=0.9, min_p=0.02, repetition_penalty=1.2),
                                    dict(temperature=0.0)])
def test_replay_without_intervention_is_the_factual_run(seed, kwargs):
    prompts = _prompts((3, 8, 5))
    factual = generate(MODEL, prompts, 16, seed=seed, stop_tokens=[], trace=True, **kwargs)
    assert isinstance(factual.trace, Trace) and factual.trace.seed == seed
    replay = counterfactual(MODEL, factual.trace)
    assert replay.tokens == factual.tokens
    assert counterfactual(MODEL, factual.trace, {}).tokens == factual.tokens


def test_unseeded_runs_record_their_seed():
    factual = generate(MODEL, _prompts((4,)), 12, temperature=1.0, stop_tokens=[], trace=True)
    assert counterfactual(MODEL, factual.trace).tokens == factual.tokens
    assert generate(MODEL, _prompts((4,)), 12, temperature=1.0, stop_tokens=[]).trace is None


def test_replay_keeps_stop_tokens_and_finish_reasons():
    factual = generate(MODEL, _prompts((3, 6)), 30, temperature=1.5, seed=3, stop_tokens=[1, 2, 3], trace=True)
    replay = counterfactual(MODEL, factual.trace)
    assert (replay.tokens, replay.finish_reasons, replay.stopped_by) == (
        factual.tokens, factual.finish_reasons, factual.stopped_by)


@pytest.mark.parametrize("seed", [0, 5, 9])
@pytest.mark.parametrize("position", [0, 4, 11])
def test_token_intervention_keeps_the_past_and_forces_the_token(seed, position):
    factual = generate(MODEL, _prompts((6,)), 15, temperature=1.0, seed=seed, stop_tokens=[], trace=True)
    old = factual.tokens[0][position]
    new_token = (old + 17) % 50
    cf = counterfactual(MODEL, factual.trace, {"token": (position, new_token)})
    assert cf.tokens[0][:position] == factual.tokens[0][:position]
    assert cf.tokens[0][position] == new_token
    assert len(cf.tokens[0]) == 15
    # Deterministic, and the counterfactual's own trace replays it.
    assert counterfactual(MODEL, factual.trace, {"token": (position, new_token)}).tokens == cf.tokens
    assert counterfactual(MODEL, cf.trace).tokens == cf.tokens


def test_token_intervention_in_a_batch_touches_only_its_row():
    factual = generate(MODEL, _prompts((2, 7, 4)), 12, temperature=1.0, seed=2, stop_tokens=[], trace=True)
    new_token = (factual.tokens[1][5] + 1) % 50
    cf = counterfactual(MODEL, factual.trace, {"token": (5, new_token), "row": 1})
    assert cf.tokens[0] == factual.tokens[0] and cf.tokens[2] == factual.tokens[2]
    assert cf.tokens[1][:5] == factual.tokens[1][:5] and cf.tokens[1][5] == new_token


def test_noise_is_shared_so_later_tokens_mostly_agree_after_a_late_intervention():
    # After an intervention, the continuation uses the same noise: with a peaked model it often re-agrees.
    # At least: a greedy trace is plain argmax, so an intervention there is the greedy continuation.
    prompt = _prompts((5,))
    factual = generate(MODEL, prompt, 10, seed=0, stop_tokens=[], trace=True)
    cf = counterfactual(MODEL, factual.trace, {"token": (3, 7)})
    expected = generate(MODEL, [prompt[0] + factual.tokens[0][:3] + [7]], 6, stop_tokens=[]).tokens[0]
    assert cf.tokens[0] == factual.tokens[0][:3] + [7] + expected


def test_prompt_intervention_changes_the_continuation_deterministically():
    prompt = _prompts((8,))[0]
    factual = generate(SHARP, [prompt], 20, temperature=0.5, seed=4, stop_tokens=[], trace=True)
    other = _prompts((8,), seed=2)[0]
    a = counterfactual(SHARP, factual.trace, {"prompt": other})
    b = counterfactual(SHARP, factual.trace, {"prompt": [other]})
    assert a.tokens == b.tokens and a.tokens != factual.tokens
    # Equal to generating from the new prompt with the same seed: the noise depends only on (seed, step).
    assert a.tokens == generate(SHARP, [other], 20, temperature=0.5, seed=4, stop_tokens=[]).tokens
    # A prompt of another length shifts nothing in the noise either.
    longer = counterfactual(SHARP, factual.trace, {"prompt": prompt + [3, 4]})
    assert longer.tokens == generate(SHARP, [prompt + [3, 4]], 20, temperature=0.5, seed=4, stop_tokens=[]).tokens


def test_step_noise_depends_only_on_seed_and_step():
    assert step_seed(1, 0) != step_seed(1, 1) != step_seed(2, 1)
    g = torch.Generator()
    a = sampling.gumbel_noise((3, 5), g.manual_seed(step_seed(1, 4)))
    b = sampling.gumbel_noise((3, 5), g.manual_seed(step_seed(1, 4)))
    assert torch.equal(a, b) and a.isfinite().all()


def test_gumbel_max_samples_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 0.5]]).expand(40000, 5)
    tokens = sampling.sample(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=5).double() / 40000
    assert torch.allclose(freq, logits[0].double().softmax(-1), atol=0.01)


def test_filters_stay_masks_under_gumbel_max():
    logits = sampling.top_k(torch.randn(500, 20, generator=torch.Generator().manual_seed(0)), 2)
    tokens = sampling.sample(logits, torch.Generator().manual_seed(1))
    assert logits.gather(1, tokens[:, None]).isfinite().all()


@pytest.mark.parametrize("intervention, match", [
    ({"token": (99, 1)}, "outside"),
    ({"token": (0, 500)}, "not a token id"),
    ({"token": "x"}, "position, token_id"),
    ({"nope": 1}, "unknown intervention"),
    ({"prompt": [[1], [2]]}, "has 2 prompts"),
    ({"row": 0}, "goes with"),
])
def test_bad_interventions_are_one_line_user_errors(intervention, match):
    factual = generate(MODEL, _prompts((4,)), 10, temperature=1.0, seed=0, stop_tokens=[], trace=True)
    with pytest.raises(UserError, match=match) as e:
        counterfactual(MODEL, factual.trace, intervention)
    assert "\n" not in str(e.value)


def test_batch_token_intervention_needs_a_row():
    factual = generate(MODEL, _prompts((4, 5)), 10, temperature=1.0, seed=0, stop_tokens=[], trace=True)
    with pytest.raises(UserError, match="which to intervene"):
        counterfactual(MODEL, factual.trace, {"token": (1, 2)})
    with pytest.raises(UserError, match="Trace"):
        counterfactual(MODEL, factual, {})
