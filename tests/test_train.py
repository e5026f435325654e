"""Training: a real run end to end, exact resume after a kill, objectives, torchrun DDP, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import decoderlab
from decoderlab.errors import UserError
from decoderlab.training import Muon, TrainConfig, lr_factor, parse_duration, train
from decoderlab.training.optim import newton_schulz

TINY = dict(n_layers=2, n_heads=2, d_model=32)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A few KB of real text: the start of tinyshakespeare if present, else this test file."""
    from conftest import TINYSHAKESPEARE

    folder = tmp_path_factory.mktemp("corpus")
    text = TINYSHAKESPEARE.read_text()[:40_000] if TINYSHAKESPEARE.exists() else Path(__file__).read_text() * 8
    (folder / "text.txt").write_text(text)
    return folder / "text.txt"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DECODERLAB_CACHE", str(tmp_path / "cache"))


def _cli(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "decoderlab", *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **(env or {})})
    if check:
        assert out.returncode == 0, out.stderr[-2000:]
    return out


def _error(out: subprocess.CompletedProcess) -> str:
    """The one-line error a failed command printed last (progress output may come before it)."""
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-2000:]
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ")
    return line


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_end_to_end(corpus, tmp_path):
    result = train(data=[str(corpus)], out=str(tmp_path / "run"), steps=30, batch_size=8, context_length=32,
                   model=TINY, eval_interval=15, log_interval=5, progress=False, sample_tokens=0)
    run = result.run_dir
    records = _metrics(run)
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    for r in records:
        assert {"step", "tokens", "elapsed_s", "train_loss"} <= set(r)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [15, 30]
    assert records[-1]["train_loss"] < records[0]["train_loss"]  # it learns
    assert (run / "loss.png").stat().st_size > 1000
    model = decoderlab.load(run)
    assert model.config.n_layers == 2 and model.config.context_length == 32
    assert (run / "best" / "model.safetensors").exists()
    assert len(list((run / "checkpoints").glob("step-*"))) == 2
    assert abs(result.val_loss - evals[-1]["val_loss"]) < 1e-4


def test_resume_after_kill_gives_the_same_losses(corpus, tmp_path):
    common = ["--data", str(corpus), "--steps", "80", "--batch-size", "8", "--context", "32", "--set", "n_layers=2",
              "--set", "d_model=32", "--set", "n_heads=2", "--log-interval", "1", "--save-interval", "5",
              "--eval-interval", "1000", "--sample-tokens", "0", "--no-progress", "--dtype", "fp32"]
    env = {"DECODERLAB_CACHE": os.environ["DECODERLAB_CACHE"]}
    _cli("train", *common, "--out", str(tmp_path / "straight"), env=env)
    straight = {r["step"]: r["train_loss"] for r in _metrics(tmp_path / "straight")}

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "decoderlab", "train", *common, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
    deadline = time.time() + 240
    while time.time() < deadline:
        snaps = list((run / "checkpoints").glob("step-*")) if (run / "checkpoints").exists() else []
        if any(s.name >= "step-0000015" for s in snaps):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in _metrics(run))
    assert killed_at < 80, "the run finished before it could be killed; make it longer"
    _cli("train", "--resume", str(run), "--no-progress", env=env)
    resumed = {r["step"]: r["train_loss"] for r in _metrics(run)}
    assert sorted(resumed) == list(range(1, 81))
    assert resumed == straight


def test_objectives_run_and_learn(corpus, tmp_path):
    for objective, extra in [("mtp", dict(n_future=2)), ("prefix", {})]:
        result = train(data=[str(corpus)], out=str(tmp_path / objective), steps=25, batch_size=8, context_length=32,
                       model=TINY, objective=objective, progress=False, sample_tokens=0, eval_interval=25, **extra)
        records = _metrics(result.run_dir)
        assert records[-1]["train_loss"] < records[0]["train_loss"]
        assert result.val_loss is not None and result.val_loss < 4.0
    model = decoderlab.load(tmp_path / "mtp")
    assert model.config.n_future == 2 and len(model.future_heads) == 2
    out = model(torch.zeros(1, 5, dtype=torch.long), future=True)
    assert len(out.future_logits) == 2 and out.future_logits[0].shape == out.logits.shape


def test_muon_orthogonalises_and_optimises():
    torch.manual_seed(0)
    G = torch.randn(64, 32)
    X = newton_schulz(G).float()
    s = torch.linalg.svdvals(X)
    assert 0.5 < s.min() and s.max() < 1.3  # Muon's quintic: singular values near 1, not exact
    w = torch.nn.Parameter(torch.randn(16, 16) * 0.1)
    target = torch.randn(16, 16)
    opt = Muon([w], lr=0.1)
    first = None
    for _ in range(100):
        loss = ((w - target) ** 2).mean()
        first = first if first is not None else loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.2 * first


def test_schedule_and_durations():
    assert lr_factor(0.0, 0.1, "wsd") == 0.0 and lr_factor(0.05, 0.1, "wsd") == pytest.approx(0.5)
    assert lr_factor(0.3, 0.1, "wsd", decay=0.5) == 1.0 and lr_factor(1.0, 0.1, "wsd", floor=0.1) == pytest.approx(0.1)
    assert lr_factor(1.0, 0.0, "cosine") == pytest.approx(0.0)
    assert parse_duration("90s") == 90 and parse_duration("3m") == 180 and parse_duration("1h30m") == 5400
    with pytest.raises(UserError, match="cannot read duration"):
        parse_duration("soon")


def test_bad_input(tmp_path, corpus):
    (tmp_path / "empty.txt").write_text("")
    out = _cli("train", "--data", str(tmp_path / "empty.txt"), "--steps", "1", "--out", str(tmp_path / "r"),
               check=False)
    assert "empty" in _error(out)

    (tmp_path / "short.txt").write_text("To be, or not to be." * 2)
    out = _cli("train", "--data", str(tmp_path / "short.txt"), "--steps", "1", "--out", str(tmp_path / "r"),
               check=False)
    assert "context" in _error(out)

    out = _cli("train", "--resume", str(tmp_path), check=False)
    assert "not a training run" in _error(out)

    run = tmp_path / "run"
    train(data=[str(corpus)], out=str(run), steps=2, batch_size=4, context_length=16, model=TINY, progress=False,
          sample_tokens=0)
    out = _cli("train", "--resume", str(run), "--context", "64", check=False)
    assert "contradicts the run being resumed" in _error(out)

    (tmp_path / "blocker").write_text("a file where a folder should be")
    out = _cli("train", "--data", str(corpus), "--steps", "2", "--batch-size", "4", "--context", "16",
               "--set", "n_layers=1", "--out", str(tmp_path / "blocker" / "run"), check=False)
    assert str(tmp_path / "blocker") in _error(out)


def test_failed_checkpoint_keeps_previous(corpus, tmp_path, monkeypatch):
    from decoderlab.training import loop

    cfg = TrainConfig(data=[str(corpus)], out=str(tmp_path / "run"), steps=4, batch_size=4, context_length=16,
                      model=TINY, eval_interval=2, sample_tokens=0)
    trainer = loop.Trainer(cfg, progress=False)
    trainer.train_step()
    trainer.train_step()
    trainer.save(best=True)
    before = (tmp_path / "run" / "model.safetensors").read_bytes()

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(loop.torch, "save", disk_full)
    trainer.train_step()
    with pytest.raises(UserError, match="No space left on device.*previous checkpoint is intact"):
        trainer.save(best=True)
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == before
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000002"]
    decoderlab.load(tmp_path / "run" / "checkpoints" / "step-0000002")


@pytest.mark.parametrize("mode, extra, tol", [
    ("ddp", [], 3e-3),  # Muon's bf16 Newton-Schulz turns reduction-order noise into ~1e-3
    ("fsdp", ["--fsdp", "--optimizer", "adamw", "--lr", "3e-3"], 1e-4),
])
def test_torchrun_matches_single_process(corpus, tmp_path, mode, extra, tol):
    common = ["--data", str(corpus), "--steps", "10", "--batch-size", "8", "--context", "32", "--set", "n_layers=2",
              "--set", "d_model=32", "--set", "n_heads=2", "--log-interval", "1", "--eval-interval", "5",
              "--sample-tokens", "0", "--no-progress", "--dtype", "fp32", *extra]
    env = {"DECODERLAB_CACHE": os.environ["DECODERLAB_CACHE"]}
    _cli("train", *common, "--out", str(tmp_path / "single"), env=env)
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "decoderlab",
                          "train", *common, "--out", str(tmp_path / mode)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    single, multi = _metrics(tmp_path / "single"), _metrics(tmp_path / mode)
    assert [r["step"] for r in single] == [r["step"] for r in multi] == list(range(1, 11))
    for a, b in zip(single, multi, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= tol * max(1.0, a["train_loss"])
        if "val_loss" in a:
            assert abs(a["val_loss"] - b["val_loss"]) <= tol * max(1.0, a["val_loss"])
    decoderlab.load(tmp_path / mode)  # rank 0 saved a complete model


def test_default_corpus_train_then_sample_cli(tmp_path):
    env = {"DECODERLAB_CACHE": os.environ["DECODERLAB_CACHE"]}
    out = _cli("train", "--steps", "3", "--batch-size", "4", "--set", "n_layers=1", "--width", "32", "--heads", "2",
               "--out", str(tmp_path / "run"), "--sample-tokens", "20", "--no-progress", env=env)
    assert "trained 3 steps" in out.stdout and "sample:" in out.stdout and "def " in out.stdout
    cfg = json.loads((tmp_path / "run" / "train_config.json").read_text())
    assert cfg["data"] is None  # the built-in corpus
    out = _cli("sample", str(tmp_path / "run"), "class ", "--tokens", "15", "--num", "2", "--seed", "3", env=env)
    assert out.stdout.count("class ") >= 2 and "--- sample 2" in out.stdout
    again = _cli("sample", str(tmp_path / "run"), "class ", "--tokens", "15", "--num", "2", "--seed", "3", env=env)
    assert again.stdout == out.stdout  # seeded
    bad = _cli("sample", str(tmp_path / "missing"), check=False)
    assert "not a folder" in _error(bad)
