"""Reliability battery, training part: bad or hostile inputs to `decoderlab train` (and `prepare`, `sample`), run as a
user runs them. Each is refused with a single `error: ...` line and exit code 2, no traceback, and leaves every
existing run folder and checkpoint byte for byte as it was."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import decoderlab
from decoderlab.training import snapshot

TINY = dict(n_layers=2, n_heads=2, d_model=32)
ENV = {"OMP_NUM_THREADS": "1"}  # one thread per tiny model: much faster on a busy shared CPU


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> dict[str, Path]:
    """A finished 6-step run with snapshots at steps 3 and 6, its corpus and its data cache."""
    from conftest import TINYSHAKESPEARE

    root = tmp_path_factory.mktemp("pristine")
    corpus = root / "text.txt"
    text = TINYSHAKESPEARE.read_text()[:20_000] if TINYSHAKESPEARE.exists() else Path(__file__).read_text() * 4
    corpus.write_text(text)
    cache = root / "cache"
    old_cache, threads = os.environ.get("DECODERLAB_CACHE"), torch.get_num_threads()
    os.environ["DECODERLAB_CACHE"] = str(cache)
    torch.set_num_threads(1)
    try:
        decoderlab.train(data=[str(corpus)], out=str(root / "run"), steps=6, save_interval=3, eval_interval=3,
                         batch_size=4, context_length=16, model=TINY, sample_tokens=0, progress=False, dtype="fp32")
    finally:
        torch.set_num_threads(threads)
        if old_cache is None:
            os.environ.pop("DECODERLAB_CACHE")
        else:
            os.environ["DECODERLAB_CACHE"] = old_cache
    assert [p.name for p in snapshot.snapshots(root / "run")] == ["step-0000003", "step-0000006"]
    return {"run": root / "run", "corpus": corpus, "cache": cache}


@pytest.fixture
def run(pristine, tmp_path) -> Path:
    """A private copy of the pristine run (tests may plant things in it)."""
    return Path(shutil.copytree(pristine["run"], tmp_path / "run"))


def tree_hash(folder: Path) -> str:
    """Every path under `folder` (files and folders) and every file's bytes."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def refused(pristine, *args: str, code: int = 2, preexec_fn=None) -> str:
    """Run `decoderlab ARGS`; assert exit `code`, no traceback and exactly one `error:` line (the last); return it."""
    env = {**os.environ, **ENV, "DECODERLAB_CACHE": str(pristine["cache"])}
    out = subprocess.run([sys.executable, "-m", "decoderlab", *args], capture_output=True, text=True, timeout=300,
                         env=env, preexec_fn=preexec_fn)
    assert out.returncode == code, (out.returncode, out.stderr[-3000:])
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], out.stderr[-3000:]
    return errors[0]


def plant_payload(path: Path, marker: Path) -> None:
    """A pickle that would create `marker` when unpickled with weights_only=False."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save([Payload()], path)


# ---- --resume of something that is not a resumable run


@pytest.mark.parametrize("target", ["empty-folder", "a-file", "missing", "model-folder"])
def test_resume_of_what_is_not_a_run(pristine, tmp_path, target):
    path = tmp_path / target
    if target == "empty-folder":
        path.mkdir()
    elif target == "a-file":
        path.write_text("hello")
    elif target == "model-folder":
        decoderlab.save(decoderlab.load(pristine["run"]), path)
    before = tree_hash(path) if path.is_dir() else None
    assert "is not a training run" in refused(pristine, "train", "--resume", str(path))
    assert (tree_hash(path) if path.is_dir() else None) == before


def test_resume_of_a_run_stopped_before_its_first_snapshot(pristine, run):
    shutil.rmtree(run / "checkpoints")
    before = tree_hash(run)
    error = refused(pristine, "train", "--resume", str(run))
    assert "has no snapshot to resume from" in error and "--overwrite" in error
    assert tree_hash(run) == before


def test_resume_pickle_payload_with_forged_manifest_is_refused_unrun(pristine, run, tmp_path):
    marker = tmp_path / "pwned"
    newest = snapshot.snapshots(run)[-1]
    plant_payload(newest / "optimizer.pt", marker)
    snapshot.write_manifest(newest, 6)  # forged: the manifest now vouches for the payload
    before = tree_hash(run)
    error = refused(pristine, "train", "--resume", str(run), "--extend", "--steps", "2")
    assert "optimizer.pt cannot be read as plain tensors" in error and "nothing in it was run" in error
    assert not marker.exists()
    assert tree_hash(run) == before


def test_resume_pickle_payload_in_every_snapshot_is_skipped_unrun(pristine, run, tmp_path):
    marker = tmp_path / "pwned"
    for folder in snapshot.snapshots(run):
        plant_payload(folder / "optimizer.pt", marker)
    before = tree_hash(run)
    error = refused(pristine, "train", "--resume", str(run))
    assert "no complete snapshot" in error
    assert not marker.exists()
    assert tree_hash(run) == before


def test_resume_truncated_snapshots(pristine, run):
    for folder in snapshot.snapshots(run):
        data = (folder / "model.safetensors").read_bytes()
        (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    before = tree_hash(run)
    error = refused(pristine, "train", "--resume", str(run))
    assert "no complete snapshot" in error
    assert tree_hash(run) == before


def test_resume_snapshots_without_manifest(pristine, run):
    for folder in snapshot.snapshots(run):
        (folder / "manifest.json").unlink()
    before = tree_hash(run)
    assert "no complete snapshot" in refused(pristine, "train", "--resume", str(run))
    assert tree_hash(run) == before


def test_resume_garbage_state_json_with_forged_manifest(pristine, run):
    newest = snapshot.snapshots(run)[-1]
    (newest / "state.json").write_text('{"step": "six"')
    snapshot.write_manifest(newest, 6)
    before = tree_hash(run)
    assert "is not a decoderlab training state" in refused(pristine, "train", "--resume", str(run))
    assert tree_hash(run) == before


@pytest.mark.parametrize("content", ["[]", "null", "{not json", ""])
def test_resume_corrupt_train_config(pristine, run, content):
    (run / "train_config.json").write_text(content)
    before = tree_hash(run)
    assert "train_config.json" in refused(pristine, "train", "--resume", str(run))
    assert tree_hash(run) == before


# ---- the schedule: a finished run, --extend


def test_resume_of_a_finished_run(pristine, run):
    before = tree_hash(run)
    error = refused(pristine, "train", "--resume", str(run))
    assert "is finished (step 6 of 6)" in error and "--extend" in error
    error = refused(pristine, "train", "--resume", str(run), "--time", "3m")  # the TypeError traceback
    assert "differs from the run's" in error and "--extend" in error
    assert tree_hash(run) == before


def test_extend_misuse(pristine, run, tmp_path):
    before = tree_hash(run)
    assert "--extend needs the extra budget" in refused(pristine, "train", "--resume", str(run), "--extend")
    assert "use it with --resume" in refused(pristine, "train", "--extend", "--steps", "3",
                                             "--out", str(tmp_path / "new"))
    assert "--overwrite contradicts --resume" in refused(pristine, "train", "--resume", str(run), "--overwrite")
    assert "contradicts the run being resumed" in refused(pristine, "train", "--resume", str(run), "--batch-size",
                                                          "64")
    assert tree_hash(run) == before


# ---- --out and other arguments


def test_out_holding_a_run(pristine, run):
    before = tree_hash(run)
    error = refused(pristine, "train", "--data", str(pristine["corpus"]), "--steps", "2", "--out", str(run))
    assert "already holds a training run" in error and "--resume" in error and "--overwrite" in error
    assert tree_hash(run) == before


def test_out_holding_a_model_even_with_overwrite(pristine, run, tmp_path):
    model = tmp_path / "hf-model"
    decoderlab.save(decoderlab.load(run), model, tokenizer=decoderlab.Tokenizer.from_folder(run))
    before = tree_hash(model)
    for extra in ([], ["--overwrite"]):
        error = refused(pristine, "train", "--data", str(pristine["corpus"]), "--steps", "2", "--out", str(model),
                        *extra)
        assert "holds a model that was not trained there" in error
    assert tree_hash(model) == before


def test_out_not_empty(pristine, tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("buy milk")
    before = tree_hash(folder)
    assert "is not empty" in refused(pristine, "train", "--data", str(pristine["corpus"]), "--steps", "2", "--out",
                                     str(folder))
    assert tree_hash(folder) == before


def test_out_under_a_file(pristine, tmp_path):
    (tmp_path / "blocker").write_text("a file where a folder should be")
    error = refused(pristine, "train", "--data", str(pristine["corpus"]), "--steps", "2", "--out",
                    str(tmp_path / "blocker" / "run"))
    assert str(tmp_path / "blocker") in error


@pytest.mark.parametrize("flag, value, fragment", [
    ("--keep-last", "0", "--keep-last must be at least 1"),
    ("--keep-last", "-1", "--keep-last must be at least 1"),
    ("--log-interval", "0", "--log-interval must be at least 1"),
    ("--save-interval", "-5", "--save-interval must be at least 1"),
    ("--context", "0", "--context must be at least 1"),
])
def test_bad_numbers(pristine, tmp_path, flag, value, fragment):
    out = tmp_path / "run"
    assert fragment in refused(pristine, "train", "--data", str(pristine["corpus"]), "--steps", "2", flag, value,
                               "--out", str(out))
    assert not out.exists()


@pytest.mark.parametrize("args, fragment", [
    (["--batch-size", "1000000000"], "--batch-size 1,000,000,000 with --context 16 needs at least"),
    (["--batch-size", "32", "--context", "10000000"], "--batch-size 32 with --context 10,000,000 needs at least"),
])
def test_settings_that_cannot_fit_memory(pristine, tmp_path, args, fragment):
    args = ["--context", "16", *args] if "--context" not in args else args
    error = refused(pristine, "train", "--data", str(pristine["corpus"]), "--steps", "2", *args, "--out",
                    str(tmp_path / "run"))
    assert fragment in error and "available" in error and ("TB" in error or "PB" in error)


# ---- data, disk, other commands


def test_resume_after_the_data_changed(pristine, run):
    corpus = pristine["corpus"]
    stat = corpus.stat()
    before = tree_hash(run)
    os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    try:
        error = refused(pristine, "train", "--resume", str(run), "--extend", "--steps", "2")
    finally:
        os.utime(corpus, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert "the training data changed since step-0000006" in error and "--allow-data-change" in error
    assert tree_hash(run) == before


def test_disk_full_while_saving(pristine, run):
    """A real failed write (a file-size limit, as a full disk fails): one line, the snapshots untouched."""

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the process at the limit
        limit = (run / "checkpoints" / "step-0000006" / "model.safetensors").stat().st_size // 2
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    before = tree_hash(run / "checkpoints")
    error = refused(pristine, "train", "--resume", str(run), "--extend", "--steps", "2", "--save-interval", "1",
                    preexec_fn=small_files)
    assert "could not save a checkpoint" in error and "previous checkpoint is intact" in error
    assert "File too large" in error
    assert tree_hash(run / "checkpoints") == before
    assert snapshot.problem(run / "checkpoints" / "step-0000006") is None


def test_prepare_into_a_run_folder(pristine, run):
    before = tree_hash(run)
    assert "holds a training run" in refused(pristine, "prepare", str(pristine["corpus"]), "--out", str(run))
    assert tree_hash(run) == before


def test_sample_prompt_outside_the_vocabulary(pristine, run):
    before = tree_hash(run)
    error = refused(pristine, "sample", str(run), "\u20ac", "--tokens", "3")
    assert "not in this tokenizer's vocabulary" in error
    assert tree_hash(run) == before


def test_pristine_run_still_resumes(pristine, run):
    """The copies the cases above received came from a run that was valid to begin with."""
    assert json.loads((run / "train_config.json").read_text())["steps"] == 6
    assert all(snapshot.problem(s) is None for s in snapshot.snapshots(run))
