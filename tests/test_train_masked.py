"""Training with masked objectives from scratch: `--objective mlm|diffusion` and the CLM -> MLM switch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import decoderlab
from decoderlab.masked import diffusion_nll
from decoderlab.training import TrainingInterrupted, train

TINY = dict(n_layers=2, n_heads=2, d_model=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    from conftest import TINYSHAKESPEARE

    folder = tmp_path_factory.mktemp("corpus")
    text = TINYSHAKESPEARE.read_text() if TINYSHAKESPEARE.exists() else Path(__file__).read_text() * 8
    (folder / "text.txt").write_text(text[:40_000])
    return folder / "text.txt"


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    monkeypatch.setenv("DECODERLAB_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _losses(run: Path) -> list[tuple]:
    return [(r["step"], r["train_loss"], r.get("val_loss")) for r in _metrics(run)]


COMMON = dict(batch_size=8, context_length=32, model=TINY, progress=False, sample_tokens=0, dtype="fp32")


@pytest.mark.parametrize("objective", ["diffusion", "mlm"])
def test_masked_objectives_learn_and_save_a_masked_model(corpus, tmp_path, objective):
    result = train(data=[str(corpus)], out=str(tmp_path / "run"), steps=40, objective=objective, eval_interval=5,
                   log_interval=5, **COMMON)
    vals = [r["val_loss"] for r in _metrics(result.run_dir) if "val_loss" in r]  # fixed noise: comparable
    print(vals)
    assert vals[-1] < vals[0] - 0.1
    assert result.val_loss is not None and result.val_loss < 3.8  # below a uniform guess (log 64 = 4.16)
    assert (result.val_bits_per_byte is not None and result.val_bits_per_byte > 0) == (objective == "diffusion")
    model = decoderlab.load(result.run_dir)
    tok = decoderlab.Tokenizer.from_folder(result.run_dir)
    cfg = model.config
    assert (cfg.objective, cfg.bidirectional, cfg.shift_logits) == (objective, True, False)
    assert cfg.mask_token_id == tok.mask_id == tok.vocab_size - 1 == cfg.vocab_size - 1
    assert tok.id_to_token(tok.mask_id) == "<mask>"
    if objective == "diffusion":
        # The trained model's bound is well below the untrained one's on held-out text.
        text = corpus.read_text()[-2000:]
        ids = torch.tensor([tok.encode(text[i * 32:(i + 1) * 32], add_special_tokens=False) for i in range(8)])
        fresh = decoderlab.Transformer(cfg)
        with torch.no_grad():
            trained = diffusion_nll(model, ids, cfg.mask_token_id, samples=8).mean() / 32
            untrained = diffusion_nll(fresh, ids, cfg.mask_token_id, samples=8).mean() / 32
        assert trained < untrained - 0.5


@pytest.mark.parametrize("stop_at", [3, 9])
def test_clm_then_mlm_switches_once_and_resumes_exactly(corpus, tmp_path, monkeypatch, stop_at):
    """--switch-to mlm at a quarter of 16 steps: the run switches at step 4, and a run interrupted before or after
    the switch and resumed takes exactly the uninterrupted run's losses."""
    from decoderlab.training import loop

    common = dict(data=[str(corpus)], steps=16, switch_to="mlm", switch_at=0.25, log_interval=1, eval_interval=4,
                  **COMMON)
    whole = train(out=str(tmp_path / "whole"), **common)
    model = decoderlab.load(whole.run_dir)
    assert (model.config.objective, model.config.bidirectional, model.config.shift_logits) == ("mlm", True, True)
    state = json.loads(sorted((whole.run_dir / "checkpoints").glob("step-*"))[-1].joinpath("state.json").read_text())
    assert state["switch_step"] == 4
    original = loop.Trainer.train_step

    def interrupt(self):
        loss = original(self)
        if self.step == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(loop.Trainer, "train_step", interrupt)
    with pytest.raises(TrainingInterrupted):
        train(out=str(tmp_path / "split"), **common)
    monkeypatch.setattr(loop.Trainer, "train_step", original)
    train(out=str(tmp_path / "split"), resume=True, progress=False)
    assert _losses(tmp_path / "split") == _losses(whole.run_dir)


def test_bad_objective_settings_are_one_line(corpus, tmp_path):
    env = {**os.environ, "DECODERLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    for args, message in [(["--objective", "mtp", "--n-future", "1", "--switch-to", "mlm"], "cannot switch"),
                          (["--switch-to", "next"], "--switch-to must be one of mlm, diffusion"),
                          (["--switch-to", "mlm", "--switch-at", "1.5"], "--switch-at is a fraction")]:
        out = subprocess.run([sys.executable, "-m", "decoderlab", "train", "--data", str(corpus), "--steps", "2",
                              "--out", str(tmp_path / "r"), *args], capture_output=True, text=True, env=env)
        assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr
