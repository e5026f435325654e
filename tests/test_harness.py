"""decoderlab's lm-eval model against the harness's own HF model, through the real harness on local YAML tasks.

One tiny GPT-2-shaped model with a byte-level BPE tokenizer trained here; a multiple-choice task written by
`decoderlab.suites.write_suite` (acc, acc_norm; one question longer than the context, so left truncation is
exercised), a rolling task (word_perplexity, byte_perplexity, bits_per_byte; texts longer than the context, so
several windows each) and a generation task (until, max_gen_toks).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")

import lm_eval  # noqa: E402

import decoderlab  # noqa: E402
from decoderlab.errors import UserError  # noqa: E402
from decoderlab.harness import DecoderlabLM, resolve_tasks  # noqa: E402
from decoderlab.suites import TaskSpec, write_suite  # noqa: E402

CONTEXT = 128
WORDS = "the king queen lord night day sword crown love death heaven earth fair foul good bad".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import transformers

    root = tmp_path_factory.mktemp("harness")
    # A corpus made here (tests run without the shared data folder): sentences of words, lines, punctuation.
    words = random.Random(1)
    vocabulary = WORDS + ["thou", "art", "my", "O", "doth"]
    text = "".join(" ".join(words.choice(vocabulary) for _ in range(words.randint(3, 9)))
                   + words.choice([".\n", ", ", "!\n", "; ", "?\n\n"]) for _ in range(4000))
    folder = root / "model"
    tok = decoderlab.Tokenizer.train_bpe(texts=[text[:100_000]], vocab_size=400)
    tok.save(folder)
    config = transformers.GPT2Config(vocab_size=tok.vocab_size, n_positions=CONTEXT, n_embd=32, n_layer=2, n_head=4,
                                     bos_token_id=tok.eos_id, eos_token_id=tok.eos_id, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" not in name:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)

    rng = random.Random(0)
    tasks = root / "tasks"

    def question(n: int) -> dict:
        return {"question": " ".join(rng.choice(WORDS) for _ in range(n)),
                "choices": [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(4)],
                "label": rng.randrange(4)}

    docs = [question(rng.randint(3, 12)) for _ in range(10)] + [question(150)]  # the last one is left-truncated
    write_suite(tasks / "mc", TaskSpec(name="tiny_mc", doc_to_text="Q: {{question}}\nA:", doc_to_target="label",
                                       doc_to_choice="choices"),
                {"train": [question(5) for _ in range(3)], "test": docs})
    rolling = [{"text": text[1000 * i: 1000 * i + rng.randint(40, 700)]} for i in range(5)]
    write_suite(tasks / "roll", TaskSpec(name="tiny_roll", doc_to_text="", doc_to_target="{{text}}",
                                         output_type="loglikelihood_rolling",
                                         metrics=("word_perplexity", "byte_perplexity", "bits_per_byte")),
                {"test": rolling})
    prompts = [{"prompt": text[500 * i: 500 * i + rng.randint(20, 80)], "answer": ""} for i in range(5)]
    write_suite(tasks / "gen", TaskSpec(name="tiny_gen", doc_to_text="{{prompt}}", doc_to_target="answer",
                                        output_type="generate_until", metrics=("exact_match",),
                                        extra={"generation_kwargs": {"until": ["\n", " the"], "max_gen_toks": 10,
                                                                     "do_sample": False}}),
                {"test": prompts})
    return folder, tasks


def run(model: str, model_args: str, tasks: Path, batch_size: int = 4) -> dict:
    names, manager = resolve_tasks([str(tasks)])
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=names, task_manager=manager,
                                   batch_size=batch_size, log_samples=True)


@pytest.fixture(scope="module")
def hf_results(setup):
    folder, tasks = setup
    return run("hf", f"pretrained={folder},device=cpu,dtype=float32", tasks)


METRICS = {"tiny_mc": ("acc", "acc_norm"), "tiny_roll": ("word_perplexity", "byte_perplexity", "bits_per_byte"),
           "tiny_gen": ("exact_match",)}


def assert_same(ours: dict, theirs: dict) -> None:
    for task, metrics in METRICS.items():
        for metric in metrics:
            a, b = ours["results"][task][f"{metric},none"], theirs["results"][task][f"{metric},none"]
            assert a == pytest.approx(b, rel=1e-4, abs=0), (task, metric)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_same_numbers_as_the_harness_hf_model(setup, hf_results, batch_size):
    folder, tasks = setup
    ours = run("decoderlab", f"pretrained={folder},device=cpu", tasks, batch_size=batch_size)
    assert_same(ours, hf_results)
    # Every request, not only the aggregates: each choice's log-likelihood and greedy flag, each text's total,
    # each generated string.
    for task in METRICS:
        mine, theirs = ours["samples"][task], hf_results["samples"][task]
        assert [s["doc_id"] for s in mine] == [s["doc_id"] for s in theirs]
        for a, b in zip(mine, theirs, strict=True):
            for ra, rb in zip(a["resps"], b["resps"], strict=True):
                if task == "tiny_gen":
                    assert ra == rb
                elif task == "tiny_mc":
                    assert ra[0][0] == pytest.approx(rb[0][0], rel=1e-4) and ra[0][1] == rb[0][1]
                else:
                    assert ra[0] == pytest.approx(rb[0], rel=1e-4)
    generated = [s["resps"][0][0] for s in ours["samples"]["tiny_gen"]]
    assert any(generated) and all("\n" not in g and " the" not in g for g in generated)


def test_model_object_and_registered_name(setup, hf_results):
    """simple_evaluate(model=DecoderlabLM(...)) with an already loaded model and tokenizer."""
    folder, tasks = setup
    lm = DecoderlabLM(model=decoderlab.load(folder), tokenizer=decoderlab.Tokenizer.from_folder(folder),
                      batch_size=3)
    names, manager = resolve_tasks([str(tasks / "mc" / "tiny_mc.yaml"), str(tasks / "roll")])
    assert names == ["tiny_mc", "tiny_roll"]
    ours = lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager)
    for task in ("tiny_mc", "tiny_roll"):
        for metric in METRICS[task]:
            assert ours["results"][task][f"{metric},none"] == pytest.approx(
                hf_results["results"][task][f"{metric},none"], rel=1e-4)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "decoderlab", *args], capture_output=True, text=True,
                          env=os.environ.copy(), timeout=600)


def test_cli_eval_writes_the_harness_json(setup, hf_results, tmp_path):
    folder, tasks = setup
    out = tmp_path / "res" / "results.json"
    done = cli("eval", str(folder), "--tasks", str(tasks), "--batch-size", "2", "--device", "cpu", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "tiny_mc" in done.stdout and "acc_norm" in done.stdout and "bits_per_byte" in done.stdout
    assert_same(json.loads(out.read_text()), hf_results)


def test_cli_eval_bad_input_is_one_line(setup, tmp_path):
    folder, tasks = setup
    cases = [("eval", str(folder), "--tasks", str(tmp_path / "missing.yaml")),
             ("eval", str(tmp_path / "no-model"), "--tasks", str(tasks / "mc"))]
    for args in cases:
        done = cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    # A name neither local nor built in (in process: it has the harness index its own task files, ~10-30 s).
    with pytest.raises(UserError, match="unknown task 'no_such_task_here'"):
        resolve_tasks(["no_such_task_here", str(tasks / "mc")])
    with pytest.raises(UserError, match="not a folder"):
        DecoderlabLM(pretrained=str(tmp_path / "nothing"))


def test_a_char_model_without_bos_or_eos(tmp_path):
    """A character-level run has no BOS/EOS: loglikelihood and generate_until work (no end-of-text stop string),
    and a rolling request, which needs a token to start from, is a one-line error naming prefix_token_id."""
    from lm_eval.api.instance import Instance

    tok = decoderlab.Tokenizer.train_char(texts=["abc def\n"])
    assert tok.bos_id is None and tok.eos_id is None
    torch.manual_seed(0)
    model = decoderlab.Transformer(decoderlab.ModelConfig(vocab_size=tok.vocab_size, n_layers=1, n_heads=2,
                                                          d_model=16, context_length=32)).eval()
    lm = DecoderlabLM(model=model, tokenizer=tok, batch_size=2, max_gen_toks=5)
    [(logprob, _)] = lm.loglikelihood([Instance("loglikelihood", {}, ("abc", " def"), 0)])
    ids = tok.encode("abc def", add_special_tokens=False)
    with torch.no_grad():
        logits = model(torch.tensor([ids])).log_softmax(-1)[0]
    assert logprob == pytest.approx(sum(float(logits[i - 1, ids[i]]) for i in range(3, len(ids))), abs=1e-5)
    [text] = lm.generate_until([Instance("generate_until", {}, ("abc", {"until": ["\n"], "max_gen_toks": 5}), 0)])
    expected = decoderlab.generate(model, [tok.encode("abc", add_special_tokens=False)], max_new_tokens=5,
                                   temperature=0.0).tokens[0]
    assert text == tok.decode(expected).split("\n")[0]
    with pytest.raises(UserError, match="prefix_token_id"):
        lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("abc def",), 0)])
