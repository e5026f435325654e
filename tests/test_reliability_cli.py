"""Hostile and mistaken input to the CLI's model commands (embed, pine, position-bias, info): one line, exit 2,
no traceback, and nothing written where it should not be."""

from __future__ import annotations

import subprocess
import sys

import pytest

TEXT = "the quick brown fox jumps over the lazy dog\n"


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "decoderlab", *args], capture_output=True, text=True, timeout=120)


def _one_line_error(out: subprocess.CompletedProcess, fragment: str) -> None:
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and out.stderr.strip().count("\n") == 0, out.stderr[-2000:]
    assert out.stderr.startswith("error: ") and fragment in out.stderr, out.stderr


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    import torch

    import decoderlab

    folder = tmp_path_factory.mktemp("cli") / "m"
    tok = decoderlab.Tokenizer.train_char(texts=[TEXT + "{}:->0123456789"])
    torch.manual_seed(0)
    cfg = decoderlab.ModelConfig.preset("char-baby", vocab_size=tok.vocab_size, positions="rope")
    decoderlab.save(decoderlab.Transformer(cfg), folder, tokenizer=tok)
    return folder


def test_embed_input_not_utf8(model_folder, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    _one_line_error(_run("embed", str(model_folder), "-i", str(bad), "-o", str(tmp_path / "e.npy")), "not UTF-8")
    assert not (tmp_path / "e.npy").exists()


def test_embed_output_folder_missing(model_folder, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("the fox\n")
    _one_line_error(_run("embed", str(model_folder), "-i", str(src), "-o", str(tmp_path / "no" / "e.npy")),
                    "does not exist")


def test_embed_input_is_a_folder(model_folder, tmp_path):
    _one_line_error(_run("embed", str(model_folder), "-i", str(tmp_path), "-o", str(tmp_path / "e.npy")),
                    "is not a file")


def test_embed_writes_npy_atomically(model_folder, tmp_path):
    import numpy as np

    src = tmp_path / "in.txt"
    src.write_text("the fox\nthe dog\n")
    out = _run("embed", str(model_folder), "-i", str(src), "-o", str(tmp_path / "vectors"))
    assert out.returncode == 0, out.stderr
    assert np.load(tmp_path / "vectors.npy").shape[0] == 2  # named as np.save names it
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_pine_segments_file_not_utf8(model_folder, tmp_path):
    bad = tmp_path / "segs.txt"
    bad.write_bytes(b"\xff\xfe\x00odd\n")
    _one_line_error(_run("pine", str(model_folder), "q{segments}", "--segments-file", str(bad)), "not UTF-8")


def test_position_bias_items_not_utf8(model_folder, tmp_path):
    bad = tmp_path / "items.jsonl"
    bad.write_bytes(b'{"prefix": "\xe9"}\n')
    _one_line_error(_run("position-bias", str(model_folder), "--items", str(bad)), "not UTF-8")


def test_position_bias_items_not_json(model_folder, tmp_path):
    bad = tmp_path / "items.jsonl"
    bad.write_text("this is not json\n")
    _one_line_error(_run("position-bias", str(model_folder), "--items", str(bad)), "line 1")


def test_info_on_a_file(tmp_path):
    f = tmp_path / "x.txt"
    f.write_text("hello")
    _one_line_error(_run("info", str(f)), "not a folder")


def test_unknown_preset_or_path(tmp_path):
    _one_line_error(_run("info", "gpt-5"), "not a folder")
