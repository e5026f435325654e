"""The key-value retrieval suite: determinism, positions, answers, the YAML, plain and PINE scoring, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

import decoderlab
from decoderlab import UserError
from decoderlab.suites import kv_retrieval_accuracy, kv_retrieval_items, write_kv_retrieval
from decoderlab.suites.kv_retrieval import INSTRUCTION, first_uuid, pine_input


def _object(record):
    """The JSON object in a record's prompt, parsed (its pair lines end with a comma, the last one too)."""
    body = record["prompt"][len(INSTRUCTION) - 1:record["prompt"].index("}\n\nKey:") + 1]
    return json.loads(body.replace(",\n}", "\n}"))


def test_same_seed_same_items_other_seed_other_items():
    a, b = kv_retrieval_items(5, 3, seed=7), kv_retrieval_items(5, 3, seed=7)
    assert a == b
    assert kv_retrieval_items(5, 3, seed=8) != a


@pytest.mark.parametrize("n_pairs", [1, 4, 10])
def test_every_position_holds_the_queried_pair_once_per_example(n_pairs):
    records = kv_retrieval_items(n_pairs, 4, seed=1)
    assert len(records) == 4 * n_pairs
    for example in range(4):
        mine = [r for r in records if r["example"] == example]
        assert sorted(r["position"] for r in mine) == list(range(n_pairs))
        for r in mine:
            assert r["pairs"][r["position"]] == [r["key"], r["value"]]
            others = [p for p in r["pairs"] if p[0] != r["key"]]
            assert others == [p for p in mine[0]["pairs"] if p[0] != r["key"]]  # the rest keep their order
        keys = [k for k, _ in mine[0]["pairs"]] + [v for _, v in mine[0]["pairs"]]
        assert len(set(keys)) == 2 * n_pairs and all(first_uuid(k) == k for k in keys)


def test_the_answer_is_the_queried_keys_value_in_the_prompt():
    for r in kv_retrieval_items(6, 3, seed=2):
        obj = _object(r)
        assert list(obj.items()) == [tuple(p) for p in r["pairs"]]
        assert obj[r["key"]] == r["value"]
        assert r["prompt"].endswith(f'Key: "{r["key"]}"\nCorresponding value:')
        assert r["prompt"].startswith("Extract the value corresponding to the specified key")


def test_bad_arguments_are_one_line_errors():
    for kwargs, message in [(dict(n_pairs=0), "n_pairs"), (dict(n_pairs=3, n_examples=0), "n_examples"),
                            (dict(n_pairs=3, positions=[3]), "positions")]:
        with pytest.raises(UserError, match=message):
            kv_retrieval_items(**kwargs)


def test_written_suite_is_deterministic_and_its_yaml_is_well_formed(tmp_path):
    path = write_kv_retrieval(tmp_path / "a", 4, n_examples=2, seed=3, n_train=1)
    again = write_kv_retrieval(tmp_path / "b", 4, n_examples=2, seed=3, n_train=1)
    for name in ("test.jsonl", "train.jsonl"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    spec = yaml.safe_load(path.read_text())
    assert again.name == path.name == "kv_retrieval_4.yaml"
    assert spec["task"] == "kv_retrieval_4" and spec["output_type"] == "generate_until"
    assert spec["doc_to_text"] == "prompt" and spec["doc_to_target"] == "value"
    assert spec["generation_kwargs"]["until"] == ["\n"]
    assert [m["metric"] for m in spec["metric_list"]] == ["exact_match"]
    test = [json.loads(line) for line in open(spec["dataset_kwargs"]["data_files"]["test"])]
    train = [json.loads(line) for line in open(spec["dataset_kwargs"]["data_files"]["train"])]
    assert test == kv_retrieval_items(4, 2, seed=3) and len(train) == 4
    assert not {r["key"] for r in train} & {r["key"] for r in test}
    # the filter's regex reads the value out of a quoted answer as a model would write it
    import re

    pattern = spec["filter_list"][0]["filter"][0]["regex_pattern"]
    assert re.search(pattern, f' "{test[0]["value"]}"').group(1) == test[0]["value"]


def test_the_yaml_loads_in_lm_eval(tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    write_kv_retrieval(tmp_path, 3, n_examples=1, seed=0)
    task = TaskManager(include_path=str(tmp_path)).load(["kv_retrieval_3"])["tasks"]["kv_retrieval_3"]
    docs = list(task.test_docs())
    assert len(docs) == 3
    assert task.doc_to_text(docs[0]) == docs[0]["prompt"] and task.doc_to_target(docs[0]) == docs[0]["value"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random RoPE model of decoderlab's own shape with a character tokenizer for the suite's text, saved."""
    texts = [r["prompt"] + " " + r["value"] + "\n" for r in kv_retrieval_items(3, 2, seed=0)]
    tok = decoderlab.Tokenizer.train_char(texts=texts + ["0123456789abcdef"], special_tokens=["<|endoftext|>"])
    config = decoderlab.ModelConfig(vocab_size=tok.vocab_size, n_layers=2, n_heads=2, d_model=32,
                                    context_length=512, norm="rmsnorm", positions="rope", activation="swiglu",
                                    bias_qkv=False, bias_attn_out=False, bias_mlp=False, init_std=0.2)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("kv-model")
    decoderlab.save(decoderlab.Transformer(config).eval(), folder, tokenizer=tok)
    return folder, decoderlab.load(folder), tok


def test_plain_and_pine_scoring_run_on_real_prompts(tiny):
    _, model, tok = tiny
    items = kv_retrieval_items(3, 2, seed=0)
    for r in items:  # the plain prompt is the record's text, tokenized part by part
        assert tok.decode(pine_input(tok, r).tokens) == r["prompt"]
    results = {m: kv_retrieval_accuracy(model, tok, items, method=m, batch_size=4, max_new_tokens=6)
               for m in ("plain", "pine")}
    for m, res in results.items():
        assert res.method == m and res.items == 6 and len(res.outputs) == 6
        assert 0.0 <= res.accuracy <= 1.0 and len(res.accuracy_by_position) == 3
        assert all(0.0 <= a <= 1.0 for a in res.accuracy_by_position)
        assert all(isinstance(o, str) and "\n" not in o for o in res.outputs)
    # PINE reads the pairs order-free: every position of one example gets the same answer
    pine_out = results["pine"].outputs
    assert pine_out[0] == pine_out[1] == pine_out[2] and pine_out[3] == pine_out[4] == pine_out[5]
    # and plain decoding is the engine's greedy decoding of the record's prompt
    plain = decoderlab.generate(model, [pine_input(tok, items[4]).tokens], 6, temperature=0.0, stop_strings=["\n"],
                                tokenizer=tok)
    assert results["plain"].outputs[4] == plain.texts[0]


def test_a_right_answer_counts(tiny, monkeypatch):
    """The scoring rule on known outputs: the first UUID of the output must be the value."""
    _, model, tok = tiny
    items = kv_retrieval_items(2, 1, seed=5)
    answers = iter([f' "{items[0]["value"]}"', f' "{items[0]["key"]}"'])
    from decoderlab import generation

    class Fake:
        def __init__(self, n):
            self.texts = [next(answers) for _ in range(n)]

    monkeypatch.setattr(generation, "generate", lambda model, prompts, *a, **k: Fake(len(prompts)))
    res = kv_retrieval_accuracy(model, tok, items, method="plain", batch_size=1)
    assert res.accuracy_by_position == [1.0, 0.0] and res.accuracy == 0.5


def test_cli_writes_and_scores(tiny, tmp_path):
    folder, _, _ = tiny
    run = [sys.executable, "-m", "decoderlab", "suite", "kv-retrieval"]
    env = {**os.environ, "COLUMNS": "200"}
    r = subprocess.run([*run, "--pairs", "3", "--out", tmp_path / "s", "--seed", "0", "--examples", "1",
                        "--model", folder, "--method", "pine"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "s" / "kv_retrieval_3.yaml").is_file()
    assert [json.loads(x) for x in open(tmp_path / "s" / "test.jsonl")] == kv_retrieval_items(3, 1, seed=0)
    scores = json.loads((tmp_path / "s" / "scores.json").read_text())
    assert list(scores) == ["model", "pairs", "seed", "pine"] and len(scores["pine"]["accuracy_by_position"]) == 3
    assert "pos 2" in r.stdout
    r = subprocess.run([*run, "--pairs", "0", "--out", tmp_path / "t"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("error: n_pairs") and "Traceback" not in r.stderr
