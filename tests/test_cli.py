"""The command line, run as a user runs it: a subprocess, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "decoderlab", *args], capture_output=True, text=True,
                          timeout=120)


def test_info_on_hf_folder(hf_folder):
    folder = hf_folder("qwen2")
    out = _run("info", str(folder))
    assert out.returncode == 0, out.stderr
    cfg = json.loads((folder / "config.json").read_text())
    assert "Qwen2ForCausalLM" in out.stdout and "float32" in out.stdout
    assert str(cfg["max_position_embeddings"]) in out.stdout


def test_info_on_preset():
    out = _run("info", "gpt2")
    assert out.returncode == 0 and "124,439,808" in out.stdout and "1024" in out.stdout


def test_user_errors_are_one_line_exit_2(tmp_path):
    for target, fragment in [(tmp_path / "missing", "not a folder"), (tmp_path, "has no config.json")]:
        out = _run("info", str(target))
        assert out.returncode == 2
        assert out.stderr.strip().count("\n") == 0 and fragment in out.stderr
        assert "Traceback" not in out.stderr


def _tiny_char_model(folder, text: str, seed: int = 0):
    """A random char-baby model with a char tokenizer over `text`, saved to `folder`; returns the tokenizer."""
    import torch

    import decoderlab

    tok = decoderlab.Tokenizer.train_char(texts=[text])
    torch.manual_seed(seed)
    model = decoderlab.Transformer(decoderlab.ModelConfig.preset("char-baby", vocab_size=tok.vocab_size))
    decoderlab.save(model, folder, tokenizer=tok)
    return tok


def test_generate_streams_the_same_text_as_the_api(tmp_path):
    import decoderlab

    tok = _tiny_char_model(tmp_path / "m", "the quick brown fox jumps over the lazy dog\n", seed=0)
    out = _run("generate", str(tmp_path / "m"), "the ", "--temperature", "0", "--tokens", "12")
    assert out.returncode == 0, out.stderr
    expected = decoderlab.generate(decoderlab.load(tmp_path / "m"), [tok.encode("the ")], max_new_tokens=12,
                                   tokenizer=tok).texts[0]
    assert out.stdout == "the " + expected + "\n"
    bad = _run("generate", str(tmp_path / "m"), "the ", "--temperature", "-1")
    assert bad.returncode == 2 and "temperature" in bad.stderr and "Traceback" not in bad.stderr


def test_generate_compiled_matches_eager(tmp_path):
    _tiny_char_model(tmp_path / "m", "the quick brown fox jumps over the lazy dog\n", seed=2)
    args = ("generate", str(tmp_path / "m"), "the ", "--temperature", "0.8", "--seed", "3", "--tokens", "30")
    eager, compiled = _run(*args), _run(*args, "--compile")
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == eager.stdout and len(compiled.stdout) > len("the ") + 10


def test_generate_speculative_matches_greedy(tmp_path):
    _tiny_char_model(tmp_path / "m", "abcabcabd abcabcabd\n", seed=1)
    plain = _run("generate", str(tmp_path / "m"), "abc", "--temperature", "0", "--tokens", "20")
    fast = _run("generate", str(tmp_path / "m"), "abc", "--tokens", "20", "--speculative", "recycle")
    assert fast.returncode == 0, fast.stderr
    assert fast.stdout.splitlines()[0] == plain.stdout.splitlines()[0]
    compiled = _run("generate", str(tmp_path / "m"), "abc", "--tokens", "20", "--speculative", "recycle", "--compile")
    assert compiled.returncode == 0, compiled.stderr
    assert compiled.stdout.splitlines()[0] == plain.stdout.splitlines()[0]
    assert "tokens per forward pass" in fast.stdout
    bad = _run("generate", str(tmp_path / "m"), "abc", "--speculative", "mtp")
    assert bad.returncode == 2 and "--objective mtp" in bad.stderr


def test_embed_command_writes_unit_vectors(tmp_path):
    import numpy as np

    import decoderlab

    tok = _tiny_char_model(tmp_path / "m", "the quick brown fox jumps over the lazy dog\n", seed=0)
    (tmp_path / "texts.txt").write_text("the fox\n\nthe lazy dog\nquick\n")
    out = _run("embed", str(tmp_path / "m"), "--input", str(tmp_path / "texts.txt"), "--output",
               str(tmp_path / "e.npy"), "--pooling", "last")
    assert out.returncode == 0, out.stderr
    vectors = np.load(tmp_path / "e.npy")
    assert vectors.shape == (3, 128) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    expected = decoderlab.embed(decoderlab.load(tmp_path / "m"), ["the fox", "the lazy dog", "quick"], tok,
                                pooling="last").numpy()
    assert np.allclose(vectors, expected, atol=1e-5)
    bad = _run("embed", str(tmp_path / "m"), "--input", str(tmp_path / "texts.txt"), "--output",
               str(tmp_path / "e.npy"), "--pooling", "max")
    assert bad.returncode == 2 and "prompt-eol" in bad.stderr and "Traceback" not in bad.stderr
