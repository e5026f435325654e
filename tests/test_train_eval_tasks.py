"""`decoderlab train --eval-tasks`: lm-eval tasks run at the run's evaluations and logged in metrics.jsonl,
without touching the training's random state; a bad task fails before training, a failing one is skipped."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("lm_eval")

import decoderlab  # noqa: E402
from decoderlab.errors import UserError  # noqa: E402
from decoderlab.suites import write_cladder  # noqa: E402


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    """A small CLadder suite and a corpus made of its train split's text (so the char vocabulary covers it)."""
    root = tmp_path_factory.mktemp("eval-tasks")
    yaml, _ = write_cladder(root / "cladder", per_graph=1, seed=0)
    corpus = root / "corpus.txt"
    lines = [json.loads(line) for line in (root / "cladder" / "train.jsonl").read_text().splitlines()]
    corpus.write_text("".join(" ".join(v for v in r.values() if isinstance(v, str)) + "\n" for r in lines * 4))
    return yaml, corpus


def _train(out, corpus, **kw):
    return decoderlab.train(data=[str(corpus)], out=str(out), model={"n_layers": 1, "n_heads": 2, "d_model": 32,
                            "dropout": 0.1}, context_length=64, batch_size=4, steps=6, eval_interval=3,
                            sample_tokens=0, progress=False, overwrite=True, seed=0, dtype="fp32", **kw)


def test_tasks_are_logged_at_every_evaluation_and_leave_training_alone(suite, tmp_path):
    yaml, corpus = suite
    _train(tmp_path / "with", corpus, eval_tasks=[str(yaml.parent)], eval_limit=6)
    records = [json.loads(line) for line in (tmp_path / "with" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [3, 6]
    for r in evals:
        metrics = r["tasks"]["cladder"]
        assert set(metrics) == {"acc", "acc_norm"} and all(0 <= v <= 1 for v in metrics.values())
    # The harness seeds Python's, numpy's and torch's generators; dropout draws from torch's: same weights without.
    _train(tmp_path / "without", corpus)
    a, b = decoderlab.load(tmp_path / "with"), decoderlab.load(tmp_path / "without")
    for (name, p), q in zip(a.unpack().state_dict().items(), b.unpack().state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_unknown_task_fails_before_training(suite, tmp_path):
    _, corpus = suite
    with pytest.raises(UserError, match="unknown task"):
        _train(tmp_path / "bad", corpus, eval_tasks=["no_such_task_xyz"])
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_a_task_that_fails_mid_run_is_skipped_and_the_run_finishes(suite, tmp_path, capsys):
    yaml, _ = suite
    corpus = tmp_path / "letters.txt"  # no digits: the suite's numbers cannot be encoded by this char vocabulary
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    result = _train(tmp_path / "run", corpus, eval_tasks=[str(yaml)], eval_limit=4)
    assert result.steps == 6
    assert "--eval-tasks failed at step 3" in capsys.readouterr().err
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert not any("tasks" in r for r in records)
