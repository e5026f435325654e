"""Steering vectors: the mean difference of two prompt sets' activations, added at every position during
`generate`; scale 0 changes nothing, a large scale changes the generations, and the CLI is a thin layer."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import decoderlab
from decoderlab import interp
from decoderlab.errors import UserError


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=40, d_model=32, n_layers=2, n_heads=4,
                                                         context_length=64)).eval()


def test_the_vector_is_the_mean_difference_of_the_activations(model):
    a = [[1, 2, 3, 4], [5, 6]]
    b = [[7, 8, 9], [10, 11, 12, 13, 14]]
    name = "blocks.1.hook_resid_pre"

    def acts(prompts, reduce):
        rows = []
        for p in prompts:  # one prompt at a time: no padding involved
            _, cache = interp.run_with_cache(model, torch.tensor([p]), name)
            x = cache[name][0]
            rows.append(x.mean(0) if reduce == "mean" else x[-1])
        return torch.stack(rows).mean(0)

    for reduce in ("mean", "last"):
        v = interp.steering_vector(model, None, a, b, 1, reduce=reduce)
        assert v.shape == (32,)
        assert (v - (acts(a, reduce) - acts(b, reduce))).abs().max() <= 1e-5
    post = interp.steering_vector(model, None, a, b, 0, site="resid_post")
    assert (post - interp.steering_vector(model, None, a, b, 1)).abs().max() <= 1e-5


def test_steering_adds_at_every_position_of_every_generation_step(model):
    v = torch.randn(32, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 2, 3]])
    seen = []
    with interp.steer(model, v, 1, 2.0), interp.hooks(model, {"blocks.1.hook_resid_pre": lambda x, h: seen.append(
            x.clone())}):
        decoderlab.generate(model, ids, 4, temperature=0, stop_tokens=[])
    assert [s.shape[1] for s in seen] == [3, 1, 1, 1]  # the prompt, then one token per step
    _, cache = interp.run_with_cache(model, ids, "blocks.1.hook_resid_pre")
    plain_pre = cache["resid_pre", 1]
    assert (seen[0] - (plain_pre + 2.0 * v)).abs().max() <= 1e-5
    assert model.hooks is None


def test_scale_zero_is_a_no_op_and_a_large_scale_changes_the_generations(model):
    prompts = [[1, 2, 3], [4, 5, 6, 7]]
    plain = decoderlab.generate(model, prompts, 12, temperature=0, stop_tokens=[])
    v = interp.steering_vector(model, None, [[9, 9, 9, 9]], [[3, 3, 3, 3]], 1)
    with interp.steer(model, v, 1, 0.0):
        zero = decoderlab.generate(model, prompts, 12, temperature=0, stop_tokens=[])
    assert zero.tokens == plain.tokens
    with interp.steer(model, v, 1, 0.0):
        steered_logits = model(torch.tensor([prompts[1]]))
    assert (steered_logits - model(torch.tensor([prompts[1]]))).abs().max() <= 1e-5
    with interp.steer(model, v, 1, 20.0):
        big = decoderlab.generate(model, prompts, 12, temperature=0, stop_tokens=[])
    assert big.tokens != plain.tokens
    # Steered towards the "9 9 9 9" side, the model says more of what followed it there.
    after_a = model(torch.tensor([[9, 9, 9, 9]]))[0, -1].argmax()
    share = sum(t == after_a for row in big.tokens for t in row) / 24
    assert share > sum(t == after_a for row in plain.tokens for t in row) / 24


def test_bad_input(model):
    with pytest.raises(UserError, match="out of range"):
        interp.steering_vector(model, None, [[1]], [[2]], 5)
    with pytest.raises(UserError, match="site"):
        interp.steering_vector(model, None, [[1]], [[2]], 0, site="mlp_out")
    with pytest.raises(UserError, match="tokenizer"):
        interp.steering_vector(model, None, ["text"], [[2]], 0)
    with pytest.raises(UserError, match="non-empty"):
        interp.steering_vector(model, None, [], [[2]], 0)
    with pytest.raises(UserError, match="d_model"):
        with interp.steer(model, torch.zeros(7), 0):
            pass
    with pytest.raises(UserError, match="NaN"):
        with interp.steer(model, torch.full((32,), float("nan")), 0):
            pass


def test_cli_steer(tmp_path):
    tok = decoderlab.Tokenizer.train_char(texts=["abcdefgh ABCDEFGH\n"])
    torch.manual_seed(0)
    decoderlab.save(decoderlab.Transformer(decoderlab.ModelConfig.preset("char-baby", vocab_size=tok.vocab_size)),
                    tmp_path / "m", tokenizer=tok)
    (tmp_path / "a.txt").write_text("ABCD\nEFGH\n")
    (tmp_path / "b.txt").write_text("abcd\nefgh\n")
    base = [sys.executable, "-m", "decoderlab", "steer", str(tmp_path / "m"), "--a", str(tmp_path / "a.txt"),
            "--b", str(tmp_path / "b.txt"), "--layer", "1", "--prompt", "abc", "--tokens", "12", "--json"]
    outs = {}
    for scale in ("0", "50"):
        run = subprocess.run(base + ["--scale", scale], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        outs[scale] = json.loads(run.stdout)
    assert outs["0"]["unsteered"] == outs["0"]["steered"] == outs["50"]["unsteered"]
    assert outs["50"]["steered"] != outs["50"]["unsteered"]
    assert outs["50"]["vector_norm"] > 0
    bad = subprocess.run(base + ["--layer", "9"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "out of range" in bad.stderr
    missing = subprocess.run(base[:6] + [str(tmp_path / "nope.txt")] + base[7:], capture_output=True, text=True,
                             timeout=120)
    assert missing.returncode == 2 and "nope.txt" in missing.stderr and "Traceback" not in missing.stderr
