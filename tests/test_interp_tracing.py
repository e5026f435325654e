"""Causal tracing (ROME): restorations that must give the clean run back, the batched sweep against one
restoration at a time, ROME's noise and windows, token groups, the average indirect effect, the figure and CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_hf_model

import decoderlab
from decoderlab import interp
from decoderlab.errors import UserError


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny random folders, loaded: GPT-2 (learned positions, 4 layers) and Llama (RoPE, GQA, 3 layers)."""
    out = {}
    for case, overrides in (("gpt2", {"n_layer": 4}), ("llama", {"num_hidden_layers": 3})):
        folder = tmp_path_factory.mktemp(f"trace-{case}")
        make_hf_model(case, seed=3, **overrides).save_pretrained(folder)
        out[case] = decoderlab.load(folder, dtype="fp32").eval()
    return out


IDS = [5, 17, 42, 8, 33, 61, 2, 19, 40]
SUBJECT = (2, 5)


@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_restoring_every_hidden_state_gives_the_clean_probability(models, case):
    model = models[case]
    L = model.config.n_layers
    result = interp.trace(model, IDS, SUBJECT, kinds=["hidden"], samples=4)
    assert abs(result.clean_prob - result.corrupted_prob) > 1e-3  # the noise does change the answer
    every = [(f"blocks.{layer}.hook_resid_post", t) for layer in range(L) for t in range(len(IDS))]
    assert interp.restored_prob(model, IDS, SUBJECT, every, samples=4) == pytest.approx(result.clean_prob, abs=1e-5)
    # The first block's output from the subject on carries everything the noise changed.
    first = [("blocks.0.hook_resid_post", t) for t in range(SUBJECT[0], len(IDS))]
    assert interp.restored_prob(model, IDS, SUBJECT, first, samples=4) == pytest.approx(result.clean_prob, abs=1e-5)
    # Nothing restored is the corrupted run.
    assert interp.restored_prob(model, IDS, SUBJECT, [], samples=4) == pytest.approx(result.corrupted_prob, abs=1e-6)


def test_noise_zero_gives_the_clean_probability_in_every_cell(models):
    result = interp.trace(models["gpt2"], IDS, SUBJECT, noise=0.0, samples=3, window=3)
    assert result.corrupted_prob == pytest.approx(result.clean_prob, abs=1e-6)
    for grid in result.grids.values():
        torch.testing.assert_close(grid, torch.full_like(grid, result.clean_prob), atol=1e-6, rtol=0)


def _full_run_prob(model, states, samples, target, noise_std, noise=3.0, seed=1):
    """ROME's trace_with_patch written out: every block run from the ids, the subject's embeddings noised,
    `states` put back to their clean values; the target's probability averaged over the noised copies."""
    ids = torch.tensor([IDS])
    names = sorted({name for name, _ in states})
    _, clean = interp.run_with_cache(model, ids, names=names) if names else (None, {})
    draw = np.random.RandomState(seed).randn(samples, SUBJECT[1] - SUBJECT[0], model.config.d_model)
    added = torch.from_numpy(draw * noise * noise_std).float()

    def corrupt(x, hook):
        x = x.clone()
        x[:, SUBJECT[0]:SUBJECT[1]] += added
        return x

    def restore(x, hook):
        x = x.clone()
        for name, token in states:
            if name == hook.name:
                x[:, token] = clean[name][0, token]
        return x

    fwd = [("hook_embed", corrupt)] + [(name, restore) for name in names]
    with torch.no_grad():
        logits = interp.run_with_hooks(model, ids.expand(samples, -1), fwd)
    return float(logits[:, -1].softmax(-1)[:, target].mean())


@pytest.mark.parametrize("case", ["gpt2", "llama"])
def test_the_batched_sweep_equals_one_restoration_at_a_time(models, case):
    model = models[case]
    L, T, window = model.config.n_layers, len(IDS), 3
    result = interp.trace(model, IDS, SUBJECT, samples=3, window=window, target=7)
    single_pass = interp.trace(model, IDS, SUBJECT, samples=3, window=window, target=7, batch_tokens=1)
    for kind, site in interp.tracing.KIND_SITES.items():
        assert result.grids[kind].shape == (T, L)
        torch.testing.assert_close(single_pass.grids[kind], result.grids[kind], atol=1e-6, rtol=0)
        for token in range(T):
            for layer in range(L):
                layers = [layer] if kind == "hidden" else interp.tracing.window_layers(layer, L, window)
                states = [(f"blocks.{lay}.{site}", token) for lay in layers]
                one = interp.restored_prob(model, IDS, SUBJECT, states, samples=3, target=7)
                assert float(result.grids[kind][token, layer]) == pytest.approx(one, abs=1e-6), (kind, token, layer)
                full = _full_run_prob(model, states, 3, 7, result.noise_std)
                assert float(result.grids[kind][token, layer]) == pytest.approx(full, abs=1e-5), (kind, token, layer)
    # Tokens before the subject see no noise: their cells are the corrupted probability.
    assert torch.all(result.grids["hidden"][:SUBJECT[0]] == result.corrupted_prob)
    # The last layer's state at the last token is the output: restoring it restores the clean probability.
    assert float(result.grids["hidden"][-1, -1]) == pytest.approx(result.clean_prob, abs=1e-5)


def test_the_noise_is_romes(models):
    """Gaussian noise from RandomState(seed).randn(samples, span, d), times noise x std, on the subject's
    token embeddings only (before learned positions are added), clean tokens untouched."""
    model = models["gpt2"]
    seen = {}
    with interp.hooks(model, {"blocks.0.hook_resid_pre": lambda x, hook: seen.__setitem__("x", x.clone())}):
        interp.restored_prob(model, IDS, SUBJECT, [], samples=5, noise=3.0, noise_std=0.25, seed=1)
    _, cache = interp.run_with_cache(model, torch.tensor([IDS]), names="blocks.0.hook_resid_pre")
    added = seen["x"] - cache["blocks.0.hook_resid_pre"]
    expected = torch.from_numpy(np.random.RandomState(1).randn(5, 3, model.config.d_model) * 0.75).float()
    torch.testing.assert_close(added[:, 2:5], expected, atol=1e-5, rtol=1e-5)
    assert torch.all(added[:, :2] == 0) and torch.all(added[:, 5:] == 0)
    # Without noise_std, the std of this prompt's subject-token embeddings.
    ids = torch.tensor(IDS[2:5])
    assert interp.trace(model, IDS, SUBJECT, samples=1, kinds=["hidden"]).noise_std == pytest.approx(
        float(model.embed(ids).detach().std()), rel=1e-5)
    assert interp.embedding_std(model, [IDS[2:5]]) == pytest.approx(float(model.embed(ids).detach().std()), rel=1e-5)


def test_windows_and_token_groups_follow_rome():
    # range(max(0, l - w // 2), min(L, l - (-w // 2))), as causal_trace.trace_important_window.
    assert list(interp.tracing.window_layers(0, 48, 10)) == list(range(0, 5))
    assert list(interp.tracing.window_layers(20, 48, 10)) == list(range(15, 25))
    assert list(interp.tracing.window_layers(47, 48, 10)) == list(range(42, 48))
    assert list(interp.tracing.window_layers(1, 4, 3)) == [0, 1, 2]
    assert list(interp.tracing.window_layers(2, 4, 1)) == [2]
    assert interp.token_groups(9, (2, 5)) == [[2], [3], [4], [5], [6, 7], [8]]
    assert interp.token_groups(3, (1, 2)) == [[1], [], [1], [2], [], [2]]
    assert interp.token_groups(6, (0, 4)) == [[0], [1, 2], [3], [4], [], [5]]
    with pytest.raises(UserError, match="followed by"):
        interp.token_groups(5, (2, 5))


def test_average_indirect_effect_by_token_group(models):
    model = models["llama"]
    a = interp.trace(model, IDS, SUBJECT, samples=2, window=3)
    b = interp.trace(model, IDS[:4] + IDS[5:], (1, 2), samples=2, window=3)  # a one-token subject
    aie = interp.average_indirect_effect([a, b])
    L = model.config.n_layers
    low = (a.corrupted_prob + b.corrupted_prob) / 2
    assert aie.counts == [2, 1, 2, 2, 2 + 4, 2] and aie.n == 2
    for kind in ("hidden", "mlp", "attn"):
        assert aie.effects[kind].shape == (6, L)
        ga, gb = a.grids[kind], b.grids[kind]
        expected = torch.stack([(ga[2] + gb[1]) / 2, ga[3], (ga[4] + gb[1]) / 2, (ga[5] + gb[2]) / 2,
                                (ga[6] + ga[7] + gb[3:7].sum(0)) / 6, (ga[8] + gb[7]) / 2]) - low
        torch.testing.assert_close(aie.effects[kind], expected, atol=1e-6, rtol=0)
    assert aie.total_effect == pytest.approx((a.clean_prob + b.clean_prob) / 2 - low)
    assert json.loads(aie.to_json())["counts"] == aie.counts
    # ROME averages only facts the model gets right.
    wrong = interp.trace(model, IDS, SUBJECT, samples=2, window=3, target=(a.predicted + 1) % 50,
                         kinds=["hidden", "mlp", "attn"])
    assert interp.average_indirect_effect([a, wrong]).n == 1
    with pytest.raises(UserError, match="correct_only"):
        interp.average_indirect_effect([wrong])


def test_trace_result_shapes_json_and_figure(models, tmp_path):
    model = models["gpt2"]
    labels = [f"t{i}" for i in range(len(IDS))]
    result = interp.trace(model, IDS, slice(2, 5), samples=2, window=2, tokens=labels, kinds=("mlp", "hidden"))
    assert list(result.grids) == ["mlp", "hidden"] and result.subject == (2, 5)
    assert result.target == result.predicted and result.correct
    data = json.loads(result.to_json())
    assert data["tokens"] == labels and np.array(data["grids"]["hidden"]).shape == (9, 4)
    assert data["clean_prob"] == result.clean_prob and data["subject"] == [2, 5]
    interp.plot_trace(result, tmp_path / "sub" / "t.png")
    interp.plot_average_effect(interp.average_indirect_effect([result]), tmp_path / "aie.png")
    for png in (tmp_path / "sub" / "t.png", tmp_path / "aie.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_trace_input_is_a_one_line_error(models):
    model = models["gpt2"]
    for kwargs, match in [({"subject": (4, 2)}, "subject span"), ({"subject": (0, 99)}, "subject span"),
                          ({"kinds": ["mlp", "heads"]}, "unknown trace kind"), ({"samples": 0}, "samples"),
                          ({"window": 0}, "window"), ({"noise": -1.0}, "noise"), ({"target": 10**6}, "vocabulary")]:
        kwargs = {"subject": SUBJECT} | kwargs
        with pytest.raises(UserError, match=match):
            interp.trace(model, IDS, **kwargs)


def test_find_subject_and_target_on_real_tokenizers(tmp_path):
    text = ["Yesterday Tamora Belvik lives in Oslo.", "the city of Lima is far"] * 20
    for tok in (decoderlab.Tokenizer.train_char(texts=text), decoderlab.Tokenizer.train_bpe(texts=text,
                                                                                            vocab_size=300)):
        prompt = "Yesterday Tamora Belvik lives in"
        ids = tok.encode(prompt)
        start, end = interp.find_subject(tok, ids, "Tamora Belvik")
        assert tok.decode(ids[start:end]).strip() == "Tamora Belvik"
        assert interp.tracing.target_id(tok, ids, prompt, " Oslo") == tok.encode(prompt + " Oslo")[len(ids)]
        with pytest.raises(UserError, match="not in the prompt"):
            interp.find_subject(tok, ids, "Lima")


@pytest.fixture(scope="module")
def char_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trace-cli")
    tok = decoderlab.Tokenizer.train_char(texts=["the cat sat on the mat, said Ada Lovel"])
    torch.manual_seed(0)
    model = decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=3,
                                                          n_heads=4, context_length=64))
    decoderlab.save(model, folder, tokenizer=tok)
    return folder


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "decoderlab", *args], capture_output=True, text=True, timeout=300)


def test_cli_writes_the_figure_and_numbers(char_folder, tmp_path):
    out = tmp_path / "tr"
    r = _cli("trace", str(char_folder), "--prompt", "said Ada Lovel the cat sat on", "--subject", "Ada Lovel",
             "--target", " t", "--samples", "3", "--window", "2", "--out", str(out))
    assert r.returncode == 0, r.stderr
    data = json.loads((out / "trace.json").read_text())
    assert data["subject"] == [5, 14] and data["target_token"] == " "  # the first (char) token of " t"
    assert np.array(data["grids"]["attn"]).shape == (29, 3) and data["samples"] == 3 and data["window"] == 2
    assert (out / "trace.png").read_bytes()[:4] == b"\x89PNG"
    assert "wrote" in r.stdout


def test_cli_subject_not_in_prompt_is_one_line_exit_2(char_folder, tmp_path):
    r = _cli("trace", str(char_folder), "--prompt", "the cat sat", "--subject", "mat", "--out", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.startswith("error: subject 'mat' is not in the prompt") and r.stderr.count("\n") == 1
    assert not (tmp_path / "trace.json").exists()


def test_cli_out_that_cannot_be_created_is_one_line_exit_2(char_folder, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    r = _cli("trace", str(char_folder), "--prompt", "the cat sat", "--subject", "cat", "--samples", "2",
             "--out", str(blocker / "out"))
    assert r.returncode == 2
    assert r.stderr.startswith("error: cannot create --out") and r.stderr.count("\n") == 1
    assert blocker.read_text() == "not a folder"
