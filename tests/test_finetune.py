"""Fine-tuning: rendering and loss masks, packing, Bitune's masks, the objectives, exact resume, CLI."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys

import pytest
import torch

import decoderlab
from decoderlab import masks
from decoderlab.errors import UserError
from decoderlab.finetuning import (
    BidirectionalPromptDecoder,
    FinetuneConfig,
    FinetuneTrainer,
    RowPlan,
    build_batch,
    finetune,
    next_token_loss,
    read_examples,
    render,
    training_mask,
)
from decoderlab.training import TrainingInterrupted

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_hf_model  # noqa: E402
from serve_helpers import bpe_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return bpe_tokenizer()


@pytest.fixture(scope="module")
def base(tmp_path_factory, tok):
    """A tiny random Llama (transformers' save_pretrained) with a BPE tokenizer holding ChatML."""
    folder = tmp_path_factory.mktemp("base")
    make_hf_model("llama", vocab_size=tok.vocab_size).save_pretrained(folder)
    tok.save(folder)
    return folder


def _records(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        if i % 3 == 0:
            out.append({"prompt": f"add {a} {b} =", "completion": f" {a + b}"})
        elif i % 3 == 1:
            out.append({"messages": [{"role": "user", "content": f"add {a} {b}"},
                                     {"role": "assistant", "content": str(a + b)}]})
        else:
            out.append({"text": f"{a} plus {b} is {a + b}"})
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records(48)))
    return path


# ---- rendering ----------------------------------------------------------------------------------------------


def test_prompt_completion_trains_exactly_the_completion_and_eos(tok):
    ex = render({"prompt": "add 2 3 =", "completion": " 5"}, tok)
    prompt = tok.encode("add 2 3 =")
    assert ex.ids.tolist() == prompt + tok.encode(" 5", add_special_tokens=False) + [tok.eos_id]
    assert ex.prompt_length == len(prompt)
    assert ex.trained.tolist() == [False] * len(prompt) + [True] * (len(ex.ids) - len(prompt))


def test_messages_train_the_assistant_turns_as_the_template_writes_them(tok):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "sum 1 2"},
                {"role": "assistant", "content": "3"}]
    ex = render({"messages": messages}, tok)
    assert ex.ids.tolist() == tok.encode_chat(messages, add_generation_prompt=False)
    trained = tok.decode([i for i, t in zip(ex.ids.tolist(), ex.trained.tolist(), strict=True) if t])
    assert trained == "hello<|im_end|>\n3<|im_end|>\n"
    # The untrained part is the rest: system, users and the generation prompts.
    assert ex.prompt_length == len(tok.encode_chat(messages[:2], add_generation_prompt=True))


def test_loss_on_all_and_text_records(tok):
    ex = render({"text": "abc"}, tok)
    assert not ex.trained[0] and ex.trained[1:].all() and ex.ids[-1] == tok.eos_id
    ex = render({"prompt": "p", "completion": "c"}, tok, loss_on="all")
    assert not ex.trained[0] and ex.trained[1:].all()


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "x"}', "needs 'messages', 'prompt' and 'completion', or 'text'"),
    ("not json", "not valid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant turn"),
])
def test_bad_records_name_file_and_line(tmp_path, tok, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + line + "\n")
    with pytest.raises(UserError, match=message) as info:
        read_examples(path, tok)
    assert str(info.value).startswith(f"{path}:3:") and "\n" not in str(info.value)


# ---- packing and the loss mask ------------------------------------------------------------------------------


def _plan(tok, T=48, packed=True):
    examples = [render(r, tok) for r in _records(12)]
    return examples, RowPlan(examples, T, seed=0, packed=packed)


def test_packing_fills_rows_without_splitting_examples(tok):
    examples, plan = _plan(tok)
    rows = plan.epoch(0)
    assert sorted(i for row in rows for i in row) == list(range(len(examples)))
    assert all(sum(len(examples[i]) - 1 for i in row) <= 48 for row in rows)
    assert len(rows) < len(examples)  # several examples share a row
    assert plan.rows(0, 3) == rows[:3] and plan.rows(len(rows) - 1, 2)[1] == plan.epoch(1)[0]


@pytest.mark.parametrize("bitune", [False, True])
def test_packed_examples_compute_what_they_would_alone(base, tok, bitune):
    """No attention across examples: each example's logits in a packed row equal its logits run alone (with
    Bitune: alone under causal | prefix(prompt))."""
    model = decoderlab.load(base, pack=False, dtype=torch.float32)
    examples, plan = _plan(tok)
    row = max(plan.epoch(0), key=len)
    batch = build_batch(examples, [row], 48)
    mask = (training_mask(batch.doc_ids, batch.prompt) if bitune
            else masks.causal() & masks.document(batch.doc_ids))
    with torch.no_grad():
        packed = model(batch.inputs, positions=batch.positions, mask=mask)[0]
        at = 0
        for i in row:
            ex = examples[i]
            n = len(ex) - 1
            alone_mask = masks.causal() | masks.prefix(ex.prompt_length) if bitune else None
            alone = model(torch.from_numpy(ex.ids[:-1])[None], mask=alone_mask)[0]
            torch.testing.assert_close(packed[at:at + n], alone, atol=1e-5, rtol=1e-5)
            at += n
    assert len(row) >= 2


def test_response_only_loss_gives_prompt_tokens_zero_gradient(base, tok):
    model = decoderlab.load(base, pack=False, dtype=torch.float32)
    examples, plan = _plan(tok)
    batch = plan.batch(0, 2)
    logits = model(batch.inputs, positions=batch.positions, mask=masks.causal() & masks.document(batch.doc_ids))
    logits.retain_grad()
    loss = next_token_loss(logits, batch.targets)
    loss.backward()
    scored = batch.targets != -100
    grad_norm = logits.grad.norm(dim=-1)
    assert bool((grad_norm[~scored] == 0).all()) and bool((grad_norm[scored] > 0).all())
    # The loss is the mean over exactly the completion tokens.
    manual = torch.nn.functional.cross_entropy(logits[scored], batch.targets[scored])
    torch.testing.assert_close(loss, manual)
    assert next_token_loss(logits, torch.full_like(batch.targets, -100)).item() == 0.0  # no NaN without targets


# ---- Bitune at inference ------------------------------------------------------------------------------------


def test_bitune_inference_mask_equals_the_training_mask(base, tok):
    """Greedy generation with the prompt prefilled bidirectionally yields the tokens that the training mask's
    forward pass (prompt block + causal) predicts for that sequence, step by step; plain causal prefill does not."""
    model = decoderlab.load(base, pack=False, dtype=torch.float32)
    prompts = [tok.encode("add 12 30 ="), tok.encode("sum of 7 and 9 is")]
    out = decoderlab.generate(model, prompts, max_new_tokens=8, decoder=BidirectionalPromptDecoder,
                              stop_tokens=[])
    for prompt, new in zip(prompts, out.tokens, strict=True):
        ids = torch.tensor([prompt + new])
        doc = torch.zeros_like(ids)
        prompt_flags = torch.arange(ids.shape[1])[None] < len(prompt)
        with torch.no_grad():
            logits = model(ids, positions=torch.arange(ids.shape[1])[None], mask=training_mask(doc, prompt_flags))
        predicted = logits[0, len(prompt) - 1:-1].argmax(-1).tolist()
        assert predicted == new
    causal = decoderlab.generate(model, prompts, max_new_tokens=8, stop_tokens=[])
    assert causal.tokens != out.tokens  # the test can tell the two masks apart


# ---- runs -----------------------------------------------------------------------------------------------------


def test_sft_run_lowers_the_held_out_loss_and_saves_a_transformers_folder(base, data, tmp_path):
    result = finetune(base, data=str(data), out=str(tmp_path / "run"), epochs=3, lr=3e-3, progress=False,
                      dtype="fp32")
    assert result.val_loss < result.val_loss_before - 0.5
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0] == {"step": 0, "tokens": 0, "elapsed_s": 0.0, "val_loss": round(result.val_loss_before, 5)}
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run").eval()
    ours = decoderlab.load(tmp_path / "run", pack=False)
    ids = torch.tensor([[5, 17, 250, 3, 99]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits, atol=1e-4, rtol=1e-4)
    assert decoderlab.Tokenizer.from_folder(tmp_path / "run").chat_template is not None


def test_resume_of_a_finetuning_run_is_exact(base, data, tmp_path, monkeypatch):
    common = dict(steps=8, lr=3e-3, progress=False, dtype="fp32", log_interval=1, eval_interval=4, batch_size=4,
                  bitune=True)
    finetune(base, data=str(data), out=str(tmp_path / "straight"), **common)
    straight = _losses(tmp_path / "straight")
    cfg = FinetuneConfig(base=str(base), data=[str(data)], out=str(tmp_path / "cut"), save_interval=3,
                         **{k: v for k, v in common.items() if k != "progress"})
    _interrupt_then_resume(FinetuneTrainer(cfg, progress=False), 4, monkeypatch)
    assert _losses(tmp_path / "cut") == straight
    assert len(straight) == 8


def _interrupt_then_resume(trainer: FinetuneTrainer, at_step: int, monkeypatch) -> None:
    """Ctrl-C during step `at_step` (the run saves a snapshot and stops), then resume the run to its end."""
    opt = trainer.optimizers[0]
    step = opt.step

    def signalled(*args, **kwargs):
        if trainer.step == at_step:
            os.kill(os.getpid(), signal.SIGINT)
        return step(*args, **kwargs)

    monkeypatch.setattr(opt, "step", signalled)
    with pytest.raises(TrainingInterrupted):
        trainer.run()
    monkeypatch.undo()
    finetune(out=str(trainer.run_dir), resume=True, progress=False)


def _losses(run) -> dict[int, tuple[float, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["train_loss"], r["lr"]) for r in records if "train_loss" in r}


def test_dpo_starts_at_log2_and_learns_the_preference(base, tok, tmp_path):
    rng = random.Random(1)
    pairs = []
    for _ in range(40):
        a, b = rng.randint(0, 50), rng.randint(0, 50)
        pairs.append({"prompt": f"add {a} {b} =", "chosen": f" {a + b}", "rejected": f" {a * b + 7}"})
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    result = finetune(base, data=str(path), out=str(tmp_path / "dpo"), objective="dpo", epochs=4, lr=3e-3,
                      progress=False, dtype="fp32", dpo_beta=0.5)
    # Policy == reference at the start, so every margin is 0 and the loss is exactly log 2.
    assert result.val_loss_before == pytest.approx(math.log(2), abs=1e-5)
    assert result.val_loss < math.log(2) - 0.1


@pytest.mark.parametrize("objective", ["distill", "taid"])
def test_distillation_moves_the_student_toward_the_teacher(base, data, tmp_path, tok, objective):
    teacher = tmp_path / "teacher"
    finetune(base, data=str(data), out=str(teacher), epochs=3, lr=3e-3, progress=False, dtype="fp32")
    student = tmp_path / "student"
    make_hf_model("llama", seed=3, vocab_size=tok.vocab_size).save_pretrained(student)
    tok.save(student)
    result = finetune(str(student), data=str(data), out=str(tmp_path / objective), objective=objective,
                      teacher=str(teacher), epochs=3, lr=3e-3, progress=False, dtype="fp32")
    assert result.val_loss < result.val_loss_before - 0.5
    if objective == "taid":
        state = json.loads(sorted((tmp_path / objective / "checkpoints").glob("step-*"))[-1].joinpath(
            "state.json").read_text())
        assert 0.4 < state["taid"]["t"] <= 1.0


def test_distillation_refuses_a_teacher_with_another_vocabulary(base, data, tmp_path):
    other = tmp_path / "other"
    tok = decoderlab.Tokenizer.train_char(texts=["abcdefg 0123456789"])
    make_hf_model("llama", vocab_size=tok.vocab_size).save_pretrained(other)
    tok.save(other)
    with pytest.raises(UserError, match="does not share the student's vocabulary"):
        finetune(base, data=str(data), out=str(tmp_path / "x"), objective="distill", teacher=str(other), steps=1,
                 progress=False)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "decoderlab", *args], capture_output=True, text=True, timeout=600)


def test_cli_finetune_and_its_errors(base, data, tmp_path):
    out = _cli("finetune", str(base), "--data", str(data), "--out", str(tmp_path / "cli"), "--steps", "3",
               "--no-progress", "--show", "2")
    assert out.returncode == 0, out.stderr
    assert "held-out loss" in out.stdout and "reference:" in out.stdout and "held-out exact match" in out.stdout
    missing = _cli("finetune", str(base), "--data", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "y"))
    assert missing.returncode == 2 and "no input files found" in missing.stderr and "Traceback" not in missing.stderr
    bad = _cli("finetune", str(base), "--data", str(data), "--out", str(tmp_path / "z"), "--bitune",
               "--loss-on", "all")
    assert bad.returncode == 2 and "--bitune" in bad.stderr


def test_docstring_suite_follows_the_corpus_split(tmp_path):
    from decoderlab.data import document_split
    from decoderlab.suites import docstring_records

    files = []
    for i in range(40):
        path = tmp_path / f"mod{i}.py"
        path.write_text(f'import os\n\n\ndef f{i}(x, y=1):\n    """Add {i} to x."""\n    z = x + {i}\n'
                        '    return z * y\n\n\n'
                        f'@staticmethod\ndef skipped(x):\n    """Decorated."""\n    return x\n\n\n'
                        f'def nodoc(x):\n    return x\n')
        files.append(path)
    records = docstring_records(files, val_fraction=0.25)
    split = document_split(files, 0.25)
    assert len(records["train"]) + len(records["val"]) == 40  # one per file: the decorated and undocumented skipped
    assert len(records["val"]) == sum(s == "val" for s in split.values()) > 0
    for name in ("train", "val"):
        for r in records[name]:
            i = int(r["prompt"].split("(")[0].removeprefix("def f"))
            assert split[tmp_path / f"mod{i}.py"] == name
            assert r["prompt"] == f'def f{i}(x, y=1):\n    """Add {i} to x."""\n'
            assert r["completion"] == f"    z = x + {i}\n    return z * y\n"


def test_lora_finetuning_trains_only_adapters_and_resumes_exactly(base, data, tmp_path, monkeypatch):
    from decoderlab.lora import ADAPTER_CONFIG

    common = dict(steps=6, progress=False, dtype="fp32", log_interval=1, eval_interval=3, batch_size=4, lora_r=4,
                  lora_targets="q_proj,v_proj,down_proj")
    result = finetune(base, data=str(data), out=str(tmp_path / "straight"), **common)
    assert result.val_loss < result.val_loss_before
    assert (tmp_path / "straight" / ADAPTER_CONFIG).is_file() and not (tmp_path / "straight" / "config.json").exists()
    straight = _losses(tmp_path / "straight")
    cfg = FinetuneConfig(base=str(base), data=[str(data)], out=str(tmp_path / "cut"), save_interval=2,
                         **{k: v for k, v in common.items() if k != "progress"})
    trainer = FinetuneTrainer(cfg, progress=False)
    assert {n for n, p in trainer.raw_model.named_parameters() if p.requires_grad} == {
        n for n, _ in trainer.raw_model.named_parameters() if ".lora_adapters." in n}
    _interrupt_then_resume(trainer, 3, monkeypatch)
    assert _losses(tmp_path / "cut") == straight
    # The adapter folder loads back onto the base with the run's held-out behaviour.
    model = decoderlab.load(base, adapter=tmp_path / "straight", pack=False)
    plain = decoderlab.load(base, pack=False)
    itself = decoderlab.load(tmp_path / "straight", pack=False)  # the run folder: base + adapter
    ids = torch.tensor([[5, 17, 250, 3, 99]])
    with torch.no_grad():
        assert not torch.allclose(model(ids), plain(ids))
        torch.testing.assert_close(itself(ids), model(ids))


def test_qlora_on_an_int8_base_and_cli_bidirectional_prompt(base, data, tmp_path):
    result = finetune(base, data=str(data), out=str(tmp_path / "q"), steps=4, lora_r=4, quantize="int8",
                      progress=False, dtype="fp32", lr=3e-3, bitune=True)
    assert result.val_loss < result.val_loss_before
    with pytest.raises(UserError, match="--quantize freezes the base"):
        FinetuneConfig(base=str(base), data=[str(data)], quantize="int4")
    out = _cli("generate", str(base), "add 2 3 =", "--tokens", "4", "--adapter", str(tmp_path / "q"),
               "--quantize", "int8", "--bidirectional-prompt")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("add 2 3 =")


def test_a_run_resumes_only_with_the_command_that_started_it(base, data, tmp_path):
    finetune(base, data=str(data), out=str(tmp_path / "ft"), steps=1, progress=False, dtype="fp32")
    wrong = _cli("train", "--resume", str(tmp_path / "ft"))
    assert wrong.returncode == 2 and "decoderlab finetune --resume" in wrong.stderr


def test_chat_template_option_reads_a_file_and_refuses_a_missing_one(base, data, tmp_path):
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}]\n{{ m.content }}\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant]\n{% endif %}")
    finetune(base, data=str(data), out=str(tmp_path / "ok"), steps=1, chat_template=str(template), progress=False)
    assert decoderlab.Tokenizer.from_folder(tmp_path / "ok").chat_template == template.read_text()
    with pytest.raises(UserError, match="cannot read the chat template file"):
        finetune(base, data=str(data), out=str(tmp_path / "no"), steps=1, chat_template=str(tmp_path / "nope.jinja"),
                 progress=False)
