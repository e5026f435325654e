"""Training: a real run end to end, exact resume after a kill, objectives, torchrun DDP, bad input."""

from __future__ import annotations

import json
import os
import shutil
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
    text = TINYSHAKESPEARE.read_text() if TINYSHAKESPEARE.exists() else Path(__file__).read_text() * 8
    text = text[:40_000]  # 36,000 train and 4,000 val characters either way
    (folder / "text.txt").write_text(text)
    return folder / "text.txt"


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DECODERLAB_CACHE", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread for the in-process runs too (see ONE_THREAD), restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# One intra-op thread in the subprocesses: on a busy shared CPU, two threads per tiny model run ~10x slower.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _cli(*args: str, check: bool = True, env: dict | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "decoderlab", *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, **ONE_THREAD, **(env or {})})
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


def _losses(run: Path) -> list[tuple]:
    """What a resumed run must reproduce exactly: per record, the step, losses and learning rate (not timings)."""
    return [(r["step"], r["train_loss"], r["lr"], r.get("val_loss")) for r in _metrics(run)]


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
    # The default dtype ("auto") is resolved once and recorded: bf16 only where this CPU multiplies in it natively.
    recorded = json.loads((run / "train_config.json").read_text())["dtype"]
    assert recorded == ("bf16" if decoderlab.accel.fast_bf16("cpu") else "fp32")


RESUMABLE = ["--steps", "80", "--batch-size", "8", "--context", "32", "--set", "n_layers=2", "--set", "d_model=32",
             "--set", "n_heads=2", "--log-interval", "1", "--save-interval", "5", "--eval-interval", "1000",
             "--sample-tokens", "0", "--no-progress", "--dtype", "fp32"]


@pytest.fixture(scope="module")
def straight(corpus, tmp_path_factory) -> dict[int, tuple[float, float]]:
    """The uninterrupted run's (train loss, lr) per step, which interrupted-then-resumed runs must reproduce."""
    cache = tmp_path_factory.mktemp("straight-cache")
    run = tmp_path_factory.mktemp("straight") / "run"
    _cli("train", "--data", str(corpus), *RESUMABLE, "--out", str(run), env={"DECODERLAB_CACHE": str(cache)})
    return {r["step"]: (r["train_loss"], r["lr"]) for r in _metrics(run)}


def _start_and_wait(corpus: Path, run: Path, until_step: int) -> subprocess.Popen:
    """A run of RESUMABLE in a subprocess, returned once metrics.jsonl has reached `until_step`."""
    proc = subprocess.Popen([sys.executable, "-m", "decoderlab", "train", "--data", str(corpus), *RESUMABLE, "--out",
                             str(run)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ONE_THREAD})
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= until_step:
            break
        time.sleep(0.02)
    return proc


def test_resume_after_kill_gives_the_same_losses(corpus, tmp_path, straight):
    run = tmp_path / "killed"
    proc = _start_and_wait(corpus, run, until_step=17)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(r["step"] for r in _metrics(run))
    assert killed_at < 80, "the run finished before it could be killed; make it longer"
    _cli("train", "--resume", str(run), "--no-progress")
    resumed = {r["step"]: (r["train_loss"], r["lr"]) for r in _metrics(run)}
    assert sorted(resumed) == list(range(1, 81))
    assert resumed == straight  # losses and learning rates: the schedule continued, not restarted


def test_resume_after_sigint_gives_the_same_losses(corpus, tmp_path, straight):
    """Ctrl-C finishes the step under way, saves a snapshot at that step (not only at --save-interval) and exits
    130; a second Ctrl-C while it saves changes nothing."""
    run = tmp_path / "interrupted"
    proc = _start_and_wait(corpus, run, until_step=12)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    stopped_at = max(r["step"] for r in _metrics(run))
    assert 12 <= stopped_at < 80
    assert f"interrupted by SIGINT at step {stopped_at}" in stderr.strip().splitlines()[-1]
    newest = sorted((run / "checkpoints").glob("step-*"))[-1]
    assert newest.name == f"step-{stopped_at:07d}" and (newest / "manifest.json").is_file()
    out = _cli("train", "--resume", str(run), "--no-progress")
    assert f"from step-{stopped_at:07d}" in out.stderr
    resumed = {r["step"]: (r["train_loss"], r["lr"]) for r in _metrics(run)}
    assert sorted(resumed) == list(range(1, 81))
    assert resumed == straight


def test_sigint_between_the_two_optimizers_saves_whole_steps(corpus, tmp_path, monkeypatch):
    """The issue's case: Ctrl-C lands after AdamW stepped and before Muon did. The step still completes (both
    optimizers), and the snapshot holds exactly the weights after it; a further signal during the save is ignored."""
    from decoderlab.training import TrainingInterrupted, loop, snapshot

    cfg = TrainConfig(data=[str(corpus)], out=str(tmp_path / "run"), steps=50, batch_size=4, context_length=16,
                      model=TINY, save_interval=100, eval_interval=100, sample_tokens=0, dtype="fp32")
    trainer = loop.Trainer(cfg, progress=False)
    adamw, muon = trainer.optimizers
    assert isinstance(muon, Muon)
    muon_step = muon.step

    def step_after_a_signal(*args, **kwargs):
        if trainer.step == 6:
            os.kill(os.getpid(), signal.SIGINT)  # handled between bytecodes: before Muon's update below
        return muon_step(*args, **kwargs)

    monkeypatch.setattr(muon, "step", step_after_a_signal)
    write_manifest = snapshot.write_manifest

    def signal_while_saving(folder, step):
        os.kill(os.getpid(), signal.SIGINT)
        return write_manifest(folder, step)

    monkeypatch.setattr(snapshot, "write_manifest", signal_while_saving)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingInterrupted) as info:
        trainer.run()
    assert info.value.step == 7 and info.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is handler  # restored after the run
    saved = decoderlab.load(tmp_path / "run" / "checkpoints" / "step-0000007")
    for name, value in trainer.raw_model.state_dict().items():
        assert torch.equal(saved.state_dict()[name], value), name
    states = torch.load(tmp_path / "run" / "checkpoints" / "step-0000007" / "optimizer.pt", weights_only=True)
    assert int(states[0]["state"][0]["step"]) == 7  # AdamW
    assert len(states[1]["state"]) == len(muon.param_groups[0]["params"])  # Muon's momentum for every matrix
    assert snapshot.problem(tmp_path / "run" / "checkpoints" / "step-0000007") is None


def test_time_run_fixes_its_length_and_resumes_exactly(corpus, tmp_path, monkeypatch):
    """A --time run turns its budget into a step count once it has measured its speed; from there an interrupted
    and resumed run takes exactly the uninterrupted run's steps. (A fake clock makes both runs see the same speed.)"""
    from decoderlab.training import TrainingInterrupted, loop

    clock = {"t": 0.0}

    def fake_perf_counter():
        clock["t"] += 0.01
        return clock["t"]

    monkeypatch.setattr(loop.time, "perf_counter", fake_perf_counter)
    common = dict(data=[str(corpus)], time="1s", batch_size=4, context_length=16, model=TINY, sample_tokens=0,
                  dtype="fp32", progress=False, log_interval=1)
    clock["t"] = 0.0
    whole = train(out=str(tmp_path / "whole"), **common)
    state = json.loads(sorted((tmp_path / "whole" / "checkpoints").glob("step-*"))[-1].joinpath("state.json")
                       .read_text())
    assert state["schedule"]["segments"] == [[0, whole.steps, 0.0]] and whole.steps > 10

    clock["t"] = 0.0
    original_step = loop.Trainer.train_step

    def interrupt_at_step_8(self):
        loss = original_step(self)
        if self.step == 8:
            os.kill(os.getpid(), signal.SIGTERM)
        return loss

    monkeypatch.setattr(loop.Trainer, "train_step", interrupt_at_step_8)
    with pytest.raises(TrainingInterrupted) as info:
        train(out=str(tmp_path / "split"), **common)
    assert info.value.step == 8 and info.value.exit_code == 143
    monkeypatch.setattr(loop.Trainer, "train_step", original_step)
    clock["t"] = 1000.0  # the resumed process's clock reads differently; the schedule must not care
    resumed = train(out=str(tmp_path / "split"), resume=True, progress=False)
    assert resumed.steps == whole.steps
    assert _losses(tmp_path / "split") == _losses(tmp_path / "whole")


def test_schedule_frozen_finished_run_and_extend(corpus, tmp_path):
    """A finished run refuses --resume (one line, naming --extend) and a new budget on resume; --extend trains on
    with a new segment that re-warms from the final LR and decays again."""
    run = tmp_path / "run"
    common = dict(batch_size=4, context_length=16, model=TINY, sample_tokens=0, progress=False, log_interval=1)
    train(data=[str(corpus)], out=str(run), steps=20, **common)
    first = _losses(run)
    out = _cli("train", "--resume", str(run), "--time", "3m", check=False)
    assert "differs from the run's" in _error(out) and "--extend" in _error(out)
    out = _cli("train", "--resume", str(run), check=False)
    assert "is finished (step 20 of 20)" in _error(out) and "--extend" in _error(out)
    out = _cli("train", "--resume", str(run), "--extend", check=False)
    assert "--extend needs the extra budget" in _error(out)

    result = train(out=str(run), resume=True, extend=True, steps=10, progress=False)
    assert result.steps == 30
    records = _metrics(run)
    assert _losses(run)[:20] == first  # the run's own history is kept
    lrs = [r["lr"] for r in records[20:]]
    peak = TrainConfig().lr
    assert lrs[0] == pytest.approx(first[-1][2])  # the ramp starts at the LR the run ended with
    assert max(lrs) == pytest.approx(peak) and lrs[-1] < 0.5 * peak  # back to the peak, then decayed again
    state = json.loads((run / "checkpoints" / "step-0000030" / "state.json").read_text())
    assert [s[:2] for s in state["schedule"]["segments"]] == [[0, 20], [20, 30]]
    # Five evaluations per schedule segment.
    assert [r["step"] for r in records if "val_loss" in r] == [4, 8, 12, 16, 20, 22, 24, 26, 28, 30]
    out = _cli("train", "--resume", str(run), "--extend", "--steps", "5", "--sample-tokens", "0", "--no-progress")
    assert "trained 35 steps" in out.stdout


def test_unfinished_run_refuses_extend_and_new_budget(corpus, tmp_path):
    run = tmp_path / "run"
    train(data=[str(corpus)], out=str(run), steps=2, batch_size=4, context_length=16, model=TINY, sample_tokens=0,
          progress=False)
    state_dir = run / "checkpoints" / "step-0000002"
    state = json.loads((state_dir / "state.json").read_text())
    assert state["schedule"]["segments"] == [[0, 2, 0.0]]
    with pytest.raises(UserError, match="differs from the run's"):
        train(out=str(run), resume=True, steps=10, progress=False)
    with pytest.raises(UserError, match="continues a finished run"):
        train(data=[str(corpus)], out=str(tmp_path / "new"), extend=True, steps=3, progress=False)


def test_snapshot_manifest_skips_incomplete_and_corrupt(corpus, tmp_path, capsys):
    run = tmp_path / "run"
    common = dict(batch_size=4, context_length=16, model=TINY, sample_tokens=0, progress=False, log_interval=1,
                  dtype="fp32", save_interval=3, keep_last=3)
    train(data=[str(corpus)], out=str(run), steps=9, **common)
    straight = _losses(run)
    snaps = sorted((run / "checkpoints").glob("step-*"))
    assert [s.name for s in snaps] == ["step-0000003", "step-0000006", "step-0000009"]
    manifest = json.loads((snaps[-1] / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"state.json", "optimizer.pt", "config.json", "model.safetensors"}
    # The newest lost its manifest (a save cut short), the middle one has a flipped byte in its weights.
    (snaps[-1] / "manifest.json").unlink()
    weights = snaps[1] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0xFF
    weights.write_bytes(bytes(data))
    (run / "checkpoints" / "step-0000009" / "state.json").write_text("{}")  # never read: no manifest
    capsys.readouterr()
    train(out=str(run), resume=True, progress=False)
    err = capsys.readouterr().err
    assert "skipping snapshot" in err and "step-0000009: no manifest.json" in err
    assert "step-0000006: model.safetensors does not match the hash in its manifest" in err
    assert "resuming" in err and "from step-0000003" in err
    assert _losses(run) == straight  # steps 4..9 again, the same
    assert sorted(s.name for s in (run / "checkpoints").glob("step-*")) == [
        "step-0000003", "step-0000006", "step-0000009"]
    for s in (run / "checkpoints").glob("step-*"):
        from decoderlab.training import snapshot

        assert snapshot.problem(s) is None  # the bad ones were replaced by whole snapshots


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


def test_muon_batches_tall_and_wide_matrices_as_each_alone():
    """Muon orthogonalises a tall matrix as its transpose, batched with the wide ones of that shape (and the
    pieces of a fused matrix each on its own): the update is what each matrix alone would get."""
    torch.manual_seed(0)
    wide, tall, fused = (torch.nn.Parameter(torch.randn(*s)) for s in ((32, 64), (64, 32), (96, 64)))
    grads = [torch.randn_like(p) for p in (wide, tall, fused)]
    before = [p.detach().clone() for p in (wide, tall, fused)]
    opt = Muon([wide, tall, fused], lr=0.1, momentum=0.0, nesterov=False, splits={fused: [32, 64]})
    for p, g in zip((wide, tall, fused), grads, strict=True):
        p.grad = g
    opt.step()

    def alone(g):
        return newton_schulz(g).float() * max(1.0, g.size(0) / g.size(1)) ** 0.5

    expected = [alone(grads[0]), alone(grads[1]), torch.cat([alone(grads[2][:32]), alone(grads[2][32:])])]
    for p, b, e in zip((wide, tall, fused), before, expected, strict=True):
        torch.testing.assert_close((b - p.detach()) / 0.1, e, atol=3e-2, rtol=0)


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


# --standalone: a free rendezvous port, so concurrent or leftover torchrun jobs (other test runs on this machine)
# cannot join ours through the default port 29500.
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "decoderlab",
            "train"]


@pytest.mark.parametrize("mode, extra, tol", [
    ("ddp", [], 3e-3),  # Muon's bf16 Newton-Schulz turns reduction-order noise into ~1e-3
    # Context 64: the 4,000 val tokens make one evaluation batch, which only rank 0 reads; FSDP's forward is a
    # collective, so rank 1 must run one too (it used to wait in the all-reduce while rank 0 waited in the forward).
    ("fsdp", ["--fsdp", "--optimizer", "adamw", "--lr", "3e-3", "--context", "64"], 1e-4),
])
def test_torchrun_matches_single_process(corpus, tmp_path, mode, extra, tol):
    common = ["--data", str(corpus), "--steps", "10", "--batch-size", "8", "--context", "32", "--set", "n_layers=2",
              "--set", "d_model=32", "--set", "n_heads=2", "--log-interval", "1", "--eval-interval", "5",
              "--sample-tokens", "0", "--no-progress", "--dtype", "fp32", *extra]
    env = {"DECODERLAB_CACHE": os.environ["DECODERLAB_CACHE"]}
    _cli("train", *common, "--out", str(tmp_path / "single"), env=env)
    out = subprocess.run([*TORCHRUN, *common, "--out", str(tmp_path / mode)], capture_output=True, text=True,
                         timeout=300, env={**os.environ, **ONE_THREAD, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    single, multi = _metrics(tmp_path / "single"), _metrics(tmp_path / mode)
    assert [r["step"] for r in single] == [r["step"] for r in multi] == list(range(1, 11))
    for a, b in zip(single, multi, strict=True):
        assert abs(a["train_loss"] - b["train_loss"]) <= tol * max(1.0, a["train_loss"])
        if "val_loss" in a:
            assert abs(a["val_loss"] - b["val_loss"]) <= tol * max(1.0, a["val_loss"])
    decoderlab.load(tmp_path / mode)  # rank 0 saved a complete model


def test_torchrun_sigterm_stops_every_rank_at_one_step_then_resumes(corpus, tmp_path):
    """torchrun forwards SIGTERM to its workers; they agree (through the per-step all-reduce) on the step to stop
    after, rank 0 saves it, and a resumed torchrun run gives the uninterrupted torchrun run's losses exactly."""
    run = tmp_path / "ddp"
    torchrun = TORCHRUN
    whole = subprocess.run([*torchrun, "--data", str(corpus), *RESUMABLE, "--out", str(tmp_path / "whole")],
                           capture_output=True, text=True, timeout=300, env={**os.environ, **ONE_THREAD})
    assert whole.returncode == 0, whole.stderr[-3000:]
    proc = subprocess.Popen([*torchrun, "--data", str(corpus), *RESUMABLE, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **ONE_THREAD})
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (run / "metrics.jsonl").exists() and len((run / "metrics.jsonl").read_text().splitlines()) >= 12:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    stopped_at = max(r["step"] for r in _metrics(run))
    assert stopped_at < 80
    assert f"interrupted by SIGTERM at step {stopped_at}: saved" in stderr  # (torchrun adds its own traceback)
    from decoderlab.training import snapshot

    assert snapshot.snapshots(run)[-1].name == f"step-{stopped_at:07d}"
    assert snapshot.problem(snapshot.snapshots(run)[-1]) is None
    out = subprocess.run([*torchrun, "--resume", str(run), "--no-progress"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, **ONE_THREAD})
    assert out.returncode == 0, out.stderr[-3000:]
    assert [r[0] for r in _losses(run)] == list(range(1, 81))
    assert _losses(run) == _losses(tmp_path / "whole")


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


def test_out_refusals_and_overwrite(corpus, tmp_path):
    """A second run into the same --out is refused; --overwrite replaces the first run's files (so the two never
    mix: no old snapshot outlives it) and leaves files that are not a run's alone."""
    run = tmp_path / "run"
    common = dict(data=[str(corpus)], batch_size=4, context_length=16, model=TINY, sample_tokens=0, progress=False,
                  save_interval=2, keep_last=5, log_interval=1)
    train(out=str(run), steps=6, **common)
    (run / "NOTES.md").write_text("my notes about this run")
    with pytest.raises(UserError, match="already holds a training run"):
        train(out=str(run), steps=2, **common)
    assert len(list((run / "checkpoints").glob("step-*"))) == 3
    result = train(out=str(run), steps=2, overwrite=True, **common)
    assert result.steps == 2
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000002"]
    assert [r["step"] for r in _metrics(run)] == [1, 2]
    assert (run / "NOTES.md").read_text() == "my notes about this run"
    assert json.loads((run / "train_config.json").read_text())["steps"] == 2

    parent = tmp_path / "does" / "not" / "exist" / "run"  # missing parents are created
    train(out=str(parent), steps=1, **common)
    decoderlab.load(parent)


def test_checkpoint_failures_are_one_line(corpus, tmp_path, monkeypatch):
    """torch.save reports a full disk as a RuntimeError ("[enforce fail ...] unexpected pos"), safetensors as its
    own error: both are one line, and the previous snapshot stays whole."""
    from decoderlab.training import loop, snapshot

    cfg = TrainConfig(data=[str(corpus)], out=str(tmp_path / "run"), steps=6, batch_size=4, context_length=16,
                      model=TINY, eval_interval=100, sample_tokens=0)
    trainer = loop.Trainer(cfg, progress=False)
    trainer.train_step()
    trainer.save(best=False)

    def torch_disk_full(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 513408 vs 513296")

    monkeypatch.setattr(loop.torch, "save", torch_disk_full)
    monkeypatch.setattr(loop.shutil, "disk_usage", lambda path: shutil_usage(free=1024))
    trainer.train_step()
    with pytest.raises(UserError, match=r"No space left on device \(\[enforce fail.*previous checkpoint is intact"):
        trainer.save(best=False)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["step-0000001"]
    assert snapshot.problem(tmp_path / "run" / "checkpoints" / "step-0000001") is None


def shutil_usage(free: int):
    return shutil._ntuple_diskusage(10**9, 10**9 - free, free)


def test_corpus_without_newline_samples_from_a_known_token(tmp_path):
    """The end-of-run sample's default prompt is a newline; a corpus without one still trains and samples (exit 0)."""
    corpus = tmp_path / "one-line.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog " * 60)
    out = _cli("train", "--data", str(corpus), "--steps", "3", "--batch-size", "4", "--context", "16", "--set",
               "n_layers=1", "--width", "32", "--heads", "2", "--sample-tokens", "10", "--no-progress", "--out",
               str(tmp_path / "run"))
    assert "trained 3 steps" in out.stdout and "sample:" in out.stdout
    assert "the tokenizer has no '\\n'; the sample starts from 'a'" in out.stdout  # its first visible token


def test_resume_reuses_the_snapshot_tokenizer_and_checks_the_data(corpus, tmp_path, monkeypatch, capsys):
    """Resume never trains a tokenizer (even with the data cache gone); changed input files are refused unless
    --allow-data-change, which continues on them with the run's own tokenizer."""
    from decoderlab.tokenizer import Tokenizer

    text = tmp_path / "text.txt"
    text.write_text(corpus.read_text())
    run = tmp_path / "run"
    common = dict(batch_size=4, context_length=16, model=TINY, sample_tokens=0, progress=False, save_interval=3,
                  dtype="fp32", log_interval=1)
    train(data=[str(text)], out=str(run), steps=6, **common)
    straight = _losses(run)
    tokenizer = (run / "tokenizer.json").read_bytes()
    shutil.rmtree(run / "checkpoints" / "step-0000006")  # as if killed before its save: resume from step 3
    shutil.rmtree(tmp_path / "cache")  # the prepared data is gone too

    def no_training(*a, **k):
        raise AssertionError("resume trained a tokenizer")

    monkeypatch.setattr(Tokenizer, "train_char", no_training)
    train(out=str(run), resume=True, progress=False)
    assert _losses(run) == straight
    assert (run / "tokenizer.json").read_bytes() == tokenizer

    shutil.rmtree(run / "checkpoints" / "step-0000006")
    text.write_text(text.read_text() + "more text, in the same alphabet.\n")
    with pytest.raises(UserError, match=r"training data changed since step-0000003 was saved \(1 file\(s\) changed"):
        train(out=str(run), resume=True, progress=False)
    capsys.readouterr()
    result = train(out=str(run), resume=True, progress=False, allow_data_change=True)
    assert result.steps == 6 and "warning: the training data changed" in capsys.readouterr().err
    assert (run / "tokenizer.json").read_bytes() == tokenizer


def test_resume_tolerates_a_torn_metrics_line(corpus, tmp_path, capsys):
    """A kill while appending to metrics.jsonl leaves half a line: resume drops it with a warning."""
    run = tmp_path / "run"
    train(data=[str(corpus)], out=str(run), steps=4, batch_size=4, context_length=16, model=TINY, sample_tokens=0,
          progress=False, save_interval=2, log_interval=1, dtype="fp32")
    straight = _losses(run)
    shutil.rmtree(run / "checkpoints" / "step-0000004")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "tokens": 3')
    capsys.readouterr()
    train(out=str(run), resume=True, progress=False)
    assert "dropped 1 unreadable line" in capsys.readouterr().err
    assert _losses(run) == straight


def test_memory_estimate_refuses_only_what_cannot_fit():
    """The estimate is a lower bound: the quick start and these tests' settings pass on this machine; a batch of a
    billion rows does not, with a one-line message naming the settings, the estimate and the memory available."""
    from decoderlab.accel import available_memory
    from decoderlab.training import check_memory, estimate_memory, resolve_model_config

    cpu = torch.device("cpu")
    from decoderlab.training.budget import plan_shape

    quick_start = TrainConfig()
    plan_shape(quick_start)  # as the trainer does first
    model = resolve_model_config(quick_start, vocab_size=200)
    est = check_memory(quick_start, model, cpu)
    assert est.total < 200e6  # 2 layers x 256 wide x 16 rows x 128 tokens
    check_memory(TrainConfig(batch_size=8, context_length=32, model=TINY), resolve_model_config(
        TrainConfig(context_length=32, model=TINY), 65), cpu)
    # A measured point (batch 64, context 512, char vocab): 1.65 GB of new peak RSS; the lower bound is 0.42 GB.
    big = TrainConfig(batch_size=64, context_length=512)
    assert estimate_memory(big, resolve_model_config(big, 65)).total < 1.65e9
    huge = TrainConfig(batch_size=10**9)
    with pytest.raises(UserError) as info:
        check_memory(huge, resolve_model_config(huge, 65), cpu, host_available=21 * 10**9)
    message = str(info.value)
    assert message.startswith("--batch-size 1,000,000,000 with --context 64 needs at least")
    assert "this machine has 21.0 GB available" in message and "\n" not in message
    accum = TrainConfig(batch_size=256, grad_accum=8, context_length=64)
    assert estimate_memory(accum, model).rows == 32  # activations are per micro-batch
    assert available_memory() is None or available_memory() > 0


def test_embedding_and_head_take_their_own_learning_rates(corpus, tmp_path):
    from decoderlab.training.optim import build_optimizers

    def rates(model, **kwargs):
        adam = build_optimizers(model, TrainConfig(data=["x"], steps=1, **kwargs), torch.device("cpu"))[0]
        names = {id(p): n for n, p in model.named_parameters()}
        return {names[id(p)]: g["lr"] for g in adam.param_groups for p in g["params"]}, len(adam.param_groups)

    torch.manual_seed(0)
    untied = decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=40, n_layers=1, n_heads=2, d_model=32,
                                                           tie_embeddings=False, norm="rmsnorm"))
    lrs, groups = rates(untied, embed_lr=0.05, head_lr=0.005)
    assert lrs["embed.weight"] == 0.05 and lrs["lm_head.weight"] == 0.005 and groups == 4
    assert {lr for name, lr in lrs.items() if "norm" in name} == {0.01}
    # Unset (a run from before these fields, fine-tuning) or tied: `lr` for all, in the original two groups, so
    # that an old snapshot's optimizer state still loads.
    lrs, groups = rates(untied)
    assert set(lrs.values()) == {0.01} and groups == 2
    tied = decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=40, n_layers=1, n_heads=2, d_model=32))
    lrs, groups = rates(tied, embed_lr=0.05, head_lr=0.005)
    assert set(lrs.values()) == {0.01}
    # A fresh run of the recipe records the rates it resolved (5x and 0.5x lr), and resumes with them.
    result = train(data=[str(corpus)], out=str(tmp_path / "run"), steps=4, batch_size=4, context_length=16,
                   model=TINY, progress=False, sample_tokens=0, eval_interval=2)
    saved = json.loads((result.run_dir / "train_config.json").read_text())
    assert (saved["embed_lr"], saved["head_lr"]) == (0.05, 0.005)
    train(out=str(tmp_path / "run"), resume=True, extend=decoderlab.training.Budget(steps=2), progress=False)
