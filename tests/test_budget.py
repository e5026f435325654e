"""The recipe for a budget (training/budget.py): what a fresh run chooses from its budget and data, and that flags,
presets, resumed runs and fine-tuning keep their own settings."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from decoderlab.training import TrainConfig, train
from decoderlab.training.budget import BRANCH_DROP, TIERS, budget_seconds, plan_regularisation, plan_shape, tier_for


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DECODERLAB_CACHE", str(tmp_path / "cache"))


def _cfg(**kw) -> TrainConfig:
    return TrainConfig(data=["x.txt"], **kw)


def test_budget_in_reference_seconds():
    assert budget_seconds(None, None, 90.0) == 90.0
    assert budget_seconds(100, None, None) == pytest.approx(100 * 2048 / 22_000)
    assert budget_seconds(None, 2_200_000, 300.0) == pytest.approx(100.0)  # the first limit reached
    assert tier_for(10.0) is TIERS[0] and tier_for(90.0) is TIERS[1] and tier_for(1e9) is TIERS[-1]
    # Longer budgets never get a shorter context or lose compilation.
    assert all(a.up_to < b.up_to and a.context <= b.context for a, b in zip(TIERS, TIERS[1:], strict=False))


def test_short_and_long_budgets_choose_different_shapes():
    short, long = _cfg(time="10s"), _cfg(time="90s")
    plan_short, plan_long = plan_shape(short), plan_shape(long)
    assert (short.context_length, short.batch_size, short.compile) == (64, 32, False)
    assert (long.context_length, long.batch_size, long.compile) == (128, 16, True)
    assert short.model == {"n_layers": 2, "d_model": 256, "n_heads": 4, "d_mlp": 688}
    assert set(plan_short.applied) == {"n_layers", "d_model", "n_heads", "d_mlp", "context", "batch_size", "compile"}
    assert "context=128" in plan_long.describe() and "compile=True" in plan_long.describe()
    longest = _cfg(time="5m")
    plan_shape(longest)
    assert (longest.model["n_layers"], longest.context_length, longest.batch_size) == (4, 256, 8)


def test_flags_override_the_plan():
    cfg = _cfg(time="5m", context_length=48, batch_size=8, compile=False, model={"n_layers": 3, "dropout": 0.0})
    plan = plan_shape(cfg)
    assert (cfg.context_length, cfg.batch_size, cfg.compile) == (48, 8, False)
    assert cfg.model["n_layers"] == 3 and "n_layers" not in plan.applied
    plan = plan_regularisation(cfg, plan, train_tokens=1000)  # many epochs, but dropout was set
    assert cfg.model["dropout"] == 0.0 and "dropout" not in plan.applied and "branch_drop" not in cfg.model
    other = _cfg(time="5m", model={"branch_drop": 0.3})
    plan = plan_regularisation(other, plan_shape(other), train_tokens=1000)
    assert other.model["branch_drop"] == 0.3 and "branch_drop" not in plan.applied and "dropout" not in other.model


def test_regularisation_follows_the_epochs_the_run_will_see():
    small, large, shallow = _cfg(steps=20_000), _cfg(steps=20_000), _cfg(steps=1000)
    plan_small = plan_regularisation(small, plan_shape(small), train_tokens=1_000_000)  # 41M tokens: 41 epochs
    plan_large = plan_regularisation(large, plan_shape(large), train_tokens=100_000_000)
    assert small.model["n_layers"] == 4 and small.model["branch_drop"] == BRANCH_DROP
    assert "dropout" not in small.model and "branch_drop=0.1" in plan_small.describe()
    assert plan_small.epochs == pytest.approx(20_000 * 8 * 256 / 1_000_000)
    assert large.model["branch_drop"] == 0.0 and "epochs" in plan_large.describe()
    # The 2-layer tiers are never regularised (dropout measured worse there even when they overfit).
    plan_regularisation(shallow, plan_shape(shallow), train_tokens=1000)
    assert shallow.model["n_layers"] == 2 and shallow.model["branch_drop"] == 0.0


def _tiny_corpus(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog.\n" * 400)
    return path


def test_a_run_records_and_prints_its_plan(tmp_path, capfd):
    corpus = _tiny_corpus(tmp_path)
    torch.manual_seed(0)
    result = train(data=[str(corpus)], out=str(tmp_path / "run"), steps=4, model={"d_model": 64, "n_heads": 1},
                   progress=False, sample_tokens=0)
    saved = json.loads((result.run_dir / "train_config.json").read_text())
    # Recorded as resolved values, so that --resume continues the same run whatever the rule says later.
    assert (saved["context_length"], saved["batch_size"], saved["compile"]) == (64, 32, False)
    assert saved["model"]["n_layers"] == 2 and saved["model"]["d_model"] == 64
    assert saved["model"]["branch_drop"] == 0.0
    err = capfd.readouterr().err
    assert "budget ~" in err and "context=64" in err and "n_layers=2" in err and "d_model=" not in err


def test_presets_and_finetuning_keep_fixed_defaults(tmp_path):
    corpus = _tiny_corpus(tmp_path)
    result = train(data=[str(corpus)], out=str(tmp_path / "p"), steps=2, preset="char-baby", progress=False,
                   sample_tokens=0, model={"n_layers": 1, "d_model": 32, "n_heads": 1})
    saved = json.loads((result.run_dir / "train_config.json").read_text())
    assert (saved["context_length"], saved["batch_size"], saved["compile"]) == (None, 32, False)
    assert "dropout" not in saved["model"] and "branch_drop" not in saved["model"]
    from decoderlab.finetuning import FinetuneConfig

    assert FinetuneConfig.__dataclass_fields__["batch_size"].default == 8


def test_cli_prints_the_plan(tmp_path):
    corpus = _tiny_corpus(tmp_path)
    out = subprocess.run([sys.executable, "-m", "decoderlab", "train", "--data", str(corpus), "--steps", "2",
                          "--width", "32", "--heads", "1", "--out", str(tmp_path / "run"), "--sample-tokens", "0",
                          "--no-progress"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "note: budget ~" in out.stderr and "batch_size=32" in out.stderr


def test_a_failed_compile_falls_back_to_eager(tmp_path, monkeypatch, capfd):
    corpus = _tiny_corpus(tmp_path)

    def broken_compile(model, *args, **kwargs):
        def fail(*a, **k):
            raise RuntimeError("no C++ compiler here\nlong details")
        return fail

    monkeypatch.setattr(torch, "compile", broken_compile)
    result = train(data=[str(corpus)], out=str(tmp_path / "run"), steps=3, compile=True, progress=False,
                   sample_tokens=0, model={"n_layers": 1, "d_model": 32, "n_heads": 1})
    assert result.steps == 3 and result.val_loss is not None
    err = capfd.readouterr().err
    assert "torch.compile failed (RuntimeError: no C++ compiler here); training without it" in err


def test_compiled_training_matches_eager_in_one_graph(tmp_path):
    """--compile trains the same model (fp32: same losses) and, on data with documents, compiles one graph: batches
    with and without a document boundary take the same path, both blocks run the same compiled graph, and the
    evaluations run eagerly (no graph of their own)."""
    import torch._dynamo

    corpus = tmp_path / "docs"
    corpus.mkdir()
    for i in range(40):  # 75-250 characters each: some batches of 4 x 32 cross a boundary, some do not
        (corpus / f"{i}.txt").write_text("all the world's a stage. " * (3 + i % 8))
    common = dict(data=[str(corpus)], steps=6, batch_size=4, context_length=32, dtype="fp32", log_interval=1,
                  eval_interval=1000, progress=False, sample_tokens=0,
                  model={"n_layers": 2, "d_model": 32, "n_heads": 1, "dropout": 0.0})
    eager = train(out=str(tmp_path / "eager"), compile=False, **common)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = train(out=str(tmp_path / "compiled"), compile=True, **common)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    losses = [[r["train_loss"] for r in result.history if "train_loss" in r] for result in (eager, compiled)]
    assert losses[0] == pytest.approx(losses[1], abs=1e-3)  # fused kernels round differently
    assert compiled.val_loss == pytest.approx(eager.val_loss, abs=2e-3)


def test_grad_accum_that_does_not_divide_the_planned_batch_is_a_one_line_error(tmp_path):
    corpus = _tiny_corpus(tmp_path)
    out = subprocess.run([sys.executable, "-m", "decoderlab", "train", "--data", str(corpus), "--time", "5m",
                          "--grad-accum", "3", "--out", str(tmp_path / "run"), "--no-progress"],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == ("error: --grad-accum 3 does not divide the batch of 8 rows this "
                                                   "budget chose; pass --batch-size as a multiple of it")
    assert not (tmp_path / "run").exists()  # refused before anything was written
    cfg = _cfg(time="5m", grad_accum=4)
    plan_shape(cfg)  # 8 rows in 4 micro-batches: fine
    assert cfg.batch_size == 8
