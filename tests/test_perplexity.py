"""decoderlab.perplexity against a hand-written loop of transformers' perplexity guide run on transformers' own
models, against lm-eval's rolling windows, on a decoderlab run, through the CLI, and on bad input."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from tokenizers import processors

import decoderlab
from decoderlab import UserError
from decoderlab.likelihood import windows


def _text(n_words: int, seed: int = 0) -> str:
    """Made-up prose (no shared data needed): words, punctuation and line breaks."""
    import random

    rng = random.Random(seed)
    words = ("the king speaks of war and peace while citizens ask for bread; a soldier answers with his sword "
             "First Citizen: Before we proceed any further, hear me speak. You are all resolved rather to die "
             "than to famish? Resolved. café naïve").split()
    out = []
    for i in range(n_words):
        out.append(rng.choice(words) + ("\n" if i % 11 == 10 else " "))
    return "".join(out)


TEXT = _text(240)
DOCS = [TEXT[:700], TEXT[700:1100], "First Citizen:\nSpeak.", TEXT[1100:]]


def _tokenizer(bos: bool) -> decoderlab.Tokenizer:
    tok = decoderlab.Tokenizer.train_char(texts=[TEXT, *DOCS], special_tokens=["<s>", "</s>"])
    if bos:  # Llama's way: BOS before every text, added by the tokenizer's post-processor
        tok.backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def _with_tokenizer(case, hf_folder, tmp_path_factory):
    import transformers

    folder = tmp_path_factory.mktemp(f"ppl-{case}")
    shutil.copytree(hf_folder(case), folder, dirs_exist_ok=True)
    _tokenizer(bos=case == "llama").save(folder)
    return folder, transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_model(request, hf_folder, tmp_path_factory):
    """(folder with a tokenizer, transformers model) of a tiny HF GPT-2 (no BOS) or Llama (BOS added)."""
    return _with_tokenizer(request.param, hf_folder, tmp_path_factory)


@pytest.fixture(scope="module")
def llama_model(hf_folder, tmp_path_factory):
    return _with_tokenizer("llama", hf_folder, tmp_path_factory)


def guide_nll(model, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """The transformers perplexity guide's loop on one document, summing each window's loss times the number of
    labels it averages over (the guide weights by `num_valid_tokens - batch_size`, one fewer once windows overlap)."""
    input_all = torch.tensor([ids])
    seq_len = input_all.size(1)
    nll_sum, n_tokens, prev_end_loc = 0.0, 0, 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc
        input_ids = input_all[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target_ids).loss
        scored = int((target_ids[:, 1:] != -100).sum())
        if scored:
            nll_sum += float(loss) * scored
            n_tokens += scored
        prev_end_loc = end_loc
        if end_loc == seq_len:
            break
    return nll_sum, n_tokens


def _close(a: float, b: float, rel: float = 1e-5) -> bool:
    return math.isclose(a, b, rel_tol=rel)


@pytest.mark.parametrize("context,stride", [(32, 8), (32, 32), (20, 7), (64, 64)])
def test_equals_the_guide_loop_on_transformers_model(hf_model, context, stride):
    folder, hf = hf_model
    tok = decoderlab.Tokenizer.from_folder(folder)
    result = decoderlab.perplexity(folder, texts=DOCS, context=context, stride=stride, batch_size=3)
    nll = tokens = 0
    for doc in DOCS:
        a, b = guide_nll(hf, tok.encode(doc), context, stride)
        nll, tokens = nll + a, tokens + b
    assert result.total.tokens == tokens
    assert _close(result.total.nll, nll)
    assert _close(result.perplexity, math.exp(nll / tokens))
    n_bytes = sum(len(d.encode()) for d in DOCS)
    assert result.total.bytes == n_bytes
    assert _close(result.bits_per_byte, nll / n_bytes / math.log(2))
    assert [s.name for s in result.sources] == [f"text[{i}]" for i in range(len(DOCS))]


def test_stride_below_context_predicts_every_token_but_the_first(hf_model):
    folder, _ = hf_model
    tok = decoderlab.Tokenizer.from_folder(folder)
    result = decoderlab.perplexity(folder, texts=[TEXT], context=16, stride=5)
    assert result.total.tokens == len(tok.encode(TEXT)) - 1
    # stride == context skips each later window's first token, as the guide's loop does
    n = len(tok.encode(TEXT))
    assert decoderlab.perplexity(folder, texts=[TEXT], context=16, stride=16).total.tokens == n - math.ceil(n / 16)


@pytest.mark.parametrize("n,context,stride", [(1, 4, 4), (5, 4, 4), (50, 8, 3), (50, 8, 8), (17, 17, 5)])
def test_windows_score_each_token_after_the_first_at_most_once(n, context, stride):
    scored = [i for _, first, end in windows(list(range(n)), context, stride) for i in range(first, end)]
    assert len(scored) == len(set(scored)) and 0 not in scored
    if stride < context:
        assert sorted(scored) == list(range(1, n))
    for begin, first, end in windows(list(range(n)), context, stride):
        assert end - begin <= context and begin < first < end
    rolling = windows(list(range(n)), context, stride, "lm-eval")
    assert [i for _, first, end in rolling for i in range(first, end)] == list(range(1, n))
    assert all(end - 1 - begin <= context and begin < first for begin, first, end in rolling)


@pytest.mark.parametrize("max_len,stride", [(24, 24), (24, 10), (64, 64)])
def test_equals_lm_eval_rolling_windows(hf_model, max_len, stride):
    lm_eval_utils = pytest.importorskip("lm_eval.utils")
    folder, hf = hf_model
    tok = decoderlab.Tokenizer.from_folder(folder)
    prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id  # lm-eval's HF model's prefix_token_id
    total = 0.0
    for doc in DOCS:
        for context, target in map(lm_eval_utils.make_disjoint_window, lm_eval_utils.get_rolling_token_windows(
                token_list=tok.encode(doc), prefix_token=prefix, max_seq_len=max_len,
                context_len=max_len - stride + 1)):
            # scored as lm-eval's HF model scores a (context, continuation) pair: the last len(target) logits
            inp = torch.tensor([(context + target)[:-1]])
            with torch.no_grad():
                logp = hf(inp).logits[0, -len(target):].float().log_softmax(-1)
            total -= float(logp[torch.arange(len(target)), torch.tensor(target)].sum())
    ours = decoderlab.perplexity(folder, texts=DOCS, context=max_len, stride=stride, mode="lm-eval", batch_size=4)
    assert ours.prefix_token == prefix
    assert _close(ours.total.nll, total)
    assert ours.total.tokens == sum(len(tok.encode(d)) for d in DOCS)


def test_lm_eval_mode_defaults_to_the_models_context(hf_model):
    folder, _ = hf_model
    model = decoderlab.load(folder)
    tok = decoderlab.Tokenizer.from_folder(folder)
    ctx = model.config.context_length
    prefix = tok.bos_id if tok.bos_id is not None else tok.eos_id
    a = decoderlab.perplexity(model, texts=DOCS, tokenizer=tok, mode="lm-eval")
    b = decoderlab.perplexity(model, texts=DOCS, tokenizer=tok, context=ctx, stride=ctx, mode="lm-eval",
                              prefix_token=prefix)
    assert (a.context, a.stride, a.prefix_token) == (ctx, ctx, prefix)
    assert _close(a.total.nll, b.total.nll) and a.total.tokens == b.total.tokens


def test_batch_size_does_not_change_the_result(hf_model):
    folder, _ = hf_model
    one = decoderlab.perplexity(folder, texts=DOCS[1:], context=20, stride=6, batch_size=1)
    many = decoderlab.perplexity(folder, texts=DOCS[1:], context=20, stride=6, batch_size=16)
    assert _close(one.total.nll, many.total.nll) and one.total.tokens == many.total.tokens


def test_files_folders_and_jsonl_as_data_reads_them(tmp_path, hf_model):
    folder, _ = hf_model
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    (tmp_path / "corpus" / "a.txt").write_text(DOCS[0])
    (tmp_path / "corpus" / "sub" / "b.md").write_text(DOCS[1])
    (tmp_path / "corpus" / "sub" / "c.jsonl").write_text(
        json.dumps({"text": DOCS[2]}) + "\n\n" + json.dumps({"text": DOCS[3], "id": 3}) + "\n")
    (tmp_path / "corpus" / "ignored.bin").write_bytes(b"\x00\x01")
    by_files = decoderlab.perplexity(folder, [tmp_path / "corpus"], context=16, stride=4)
    by_texts = decoderlab.perplexity(folder, texts=DOCS, context=16, stride=4)
    assert [os.path.basename(s.name) for s in by_files.sources] == ["a.txt", "b.md", "c.jsonl"]
    assert by_files.sources[2].documents == 2
    assert _close(by_files.total.nll, by_texts.total.nll)
    assert by_files.total.words == sum(len(__import__("re").split(r"\s+", d)) for d in DOCS)
    assert _close(by_files.word_perplexity, math.exp(by_files.total.nll / by_files.total.words))
    assert _close(by_files.byte_perplexity, 2 ** by_files.bits_per_byte)


def test_a_decoderlab_model_folder(tmp_path):
    """A model of decoderlab's own shape (RoPE, RMSNorm, SwiGLU, no HF family), built, saved and read back."""
    tok = _tokenizer(bos=False)
    config = decoderlab.ModelConfig(vocab_size=tok.vocab_size, n_layers=2, n_heads=2, d_model=32, context_length=48,
                                    norm="rmsnorm", positions="rope", activation="swiglu", bias_qkv=False,
                                    bias_attn_out=False, bias_mlp=False, init_std=0.3)
    torch.manual_seed(0)
    decoderlab.save(decoderlab.Transformer(config).eval(), tmp_path / "run", tokenizer=tok)
    model = decoderlab.load(tmp_path / "run")
    text = DOCS[1]
    result = decoderlab.perplexity(tmp_path / "run", texts=[text], context=32, stride=8, batch_size=4)
    ids = tok.encode(text)
    with torch.inference_mode():  # the same windows by hand, one unpadded forward pass each
        nll = 0.0
        for begin, first, end in windows(ids, 32, 8):
            logp = model(torch.tensor([ids[begin:end - 1]])).float().log_softmax(-1)[0]
            nll -= sum(float(logp[i - begin - 1, ids[i]]) for i in range(first, end))
    assert _close(result.total.nll, nll)
    assert result.total.tokens == len(ids) - 1


def test_bad_input_is_one_line_errors(hf_model, tmp_path):
    folder, _ = hf_model
    ctx = decoderlab.load(folder).config.context_length
    cases = [
        (dict(texts=["abc"], context=8, stride=9), "stride 9 is larger than context 8"),
        (dict(texts=["abc"], context=ctx + 1), f"model's context length of {ctx}"),
        (dict(texts=["abc"], mode="rolling"), "unknown mode"),
        (dict(texts=["abc"], context=1), "at least 2"),
        (dict(texts=["abc"], stride=0), "positive"),
        (dict(texts=["abc"], batch_size=0), "batch_size"),
        (dict(inputs=[]), "no files given"),
        (dict(), "nothing to score"),
        (dict(inputs=[tmp_path / "missing.txt"]), "no input files found"),
        (dict(texts=[3]), "not a string"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message) as info:
            decoderlab.perplexity(folder, **kwargs)
        assert "\n" not in str(info.value)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match="no 'text' field"):
        decoderlab.perplexity(folder, [bad])
    with pytest.raises(UserError, match="tokenizer="):
        decoderlab.perplexity(decoderlab.load(folder), texts=["abc"])


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "decoderlab", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={**os.environ, "COLUMNS": "200"})


def test_cli_table_and_json(llama_model, tmp_path):
    folder, _ = llama_model
    (tmp_path / "a.txt").write_text(DOCS[0])
    (tmp_path / "b.txt").write_text(DOCS[1])
    out = tmp_path / "res" / "ppl.json"
    r = _cli("perplexity", folder, tmp_path / "a.txt", tmp_path / "b.txt", "--context", 16, "--stride", 4,
             "--out", out)
    assert r.returncode == 0, r.stderr
    assert "a.txt" in r.stdout and "total" in r.stdout and "bits/byte" in r.stdout
    saved = json.loads(out.read_text())
    direct = decoderlab.perplexity(folder, [tmp_path / "a.txt", tmp_path / "b.txt"], context=16, stride=4)
    assert _close(saved["total"]["bits_per_byte"], direct.bits_per_byte)
    assert [s["name"] for s in saved["sources"]] == [s.name for s in direct.sources]
    assert f"{direct.bits_per_byte:.4f}" in r.stdout

    for args, message in [((folder,), "no files given"),
                          ((folder, tmp_path / "nope.txt"), "no input files found"),
                          ((folder, tmp_path / "a.txt", "--context", 8, "--stride", 9), "larger than context"),
                          ((folder, tmp_path / "a.txt", "--context", 999), "longer than the model's context"),
                          ((tmp_path / "a.txt", tmp_path / "a.txt"), "")]:
        r = _cli("perplexity", *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert r.stderr.startswith("error: ") and message in r.stderr and "Traceback" not in r.stderr
