"""Tests for decoderlab.data: prepare (splits as nanoGPT, documents, jsonl, bad bytes, reuse, errors) and batches
(determinism, document boundaries, positions, full coverage in eval), the batches checked against loop references."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import decoderlab.data as data_module
from decoderlab.data import (
    Batch,
    PreparedData,
    TokenData,
    default_corpus_files,
    get_batch,
    iter_eval_batches,
    prepare,
)
from decoderlab.errors import UserError

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"

TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "Ünïcödé — “quotes”, 😀 and a tab\there.\n" * 7
)


def _one_line_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, UserError)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def _documents(split: TokenData) -> list[np.ndarray]:
    bounds = list(split.doc_starts) + [len(split)]
    return [np.asarray(split.tokens[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


# ---------------------------------------------------------------------------------------------- prepare


def test_single_file_char_split_as_nanogpt(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text(TEXT, encoding="utf-8")
    d = prepare(src, tmp_path / "out", progress=False)

    n = len(TEXT)
    cut = int(n * 0.9)
    assert len(d.train) == cut and len(d.val) == n - cut
    assert d.tokenizer.decode(d.train.tokens) == TEXT[:cut]
    assert d.tokenizer.decode(d.val.tokens) == TEXT[cut:]
    assert d.tokenizer.vocab_size == len(set(TEXT))
    assert d.train.tokens.dtype == np.uint16 and isinstance(d.train.tokens, np.memmap)
    assert d.train.doc_starts.tolist() == [0] and d.val.doc_starts.tolist() == [0]
    assert d.train.doc_starts.dtype == np.int64

    meta = json.loads((tmp_path / "out/meta.json").read_text())
    assert meta == d.meta
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == "char" and meta["vocab_size"] == len(set(TEXT))
    assert meta["split_by"] == "characters" and meta["replaced_bytes"] == 0 and not meta["eos_appended"]
    assert meta["train"] == {"tokens": cut, "documents": 1, "chars": cut, "bytes": len(TEXT[:cut].encode())}
    assert meta["val"] == {"tokens": n - cut, "documents": 1, "chars": n - cut, "bytes": len(TEXT[cut:].encode())}
    assert d.val.n_bytes == len(TEXT[cut:].encode()) and d.val.n_chars == n - cut
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "meta.json", "tokenizer.json", "tokenizer_config.json",
        "train.bin", "train.docs.npy", "val.bin", "val.docs.npy",
    ]


def test_rerun_reuses_and_changed_input_reprepares(tmp_path):
    src, out = tmp_path / "input.txt", tmp_path / "out"
    src.write_text(TEXT, encoding="utf-8")
    first = prepare(src, out, progress=False)
    written = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    again = prepare(str(src), out, progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == written  # nothing rewritten
    assert again.meta["fingerprint"] == first.meta["fingerprint"]

    src.write_text(TEXT + "More text.\n", encoding="utf-8")
    changed = prepare(src, out, progress=False)
    assert changed.meta["fingerprint"] != first.meta["fingerprint"]
    assert len(changed.train) + len(changed.val) == len(TEXT) + len("More text.\n")

    # Other settings re-prepare too.
    n = len(TEXT) + len("More text.\n")
    assert prepare(src, out, val_fraction=0.5, progress=False).meta["val"]["chars"] == n - int(n * 0.5)
    assert prepare(src, out, tokenizer="bpe", vocab_size=300, progress=False).meta["tokenizer"] == "bpe"


def test_fingerprint_and_input_changes(tmp_path):
    """`fingerprint` is what prepare records (without reading the files); `input_stats` / `describe_change` say
    which input files changed, appeared or went away."""
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text(TEXT, encoding="utf-8")
    b.write_text("second document\n", encoding="utf-8")
    prepared = prepare(tmp_path, tmp_path / "out", progress=False)
    assert data_module.fingerprint(tmp_path) == prepared.meta["fingerprint"]
    assert data_module.fingerprint(tmp_path, tokenizer="bpe") != prepared.meta["fingerprint"]
    before = data_module.input_stats(tmp_path)
    assert [Path(p).name for p, _, _ in before] == ["a.txt", "b.txt"]
    assert data_module.describe_change(before, data_module.input_stats(tmp_path)) is None

    a.write_text(TEXT + "x", encoding="utf-8")
    b.unlink()
    (tmp_path / "c.md").write_text("new", encoding="utf-8")
    change = data_module.describe_change(before, data_module.input_stats(tmp_path))
    assert change.startswith(f"1 file(s) changed, e.g. {a.resolve()} ({len(TEXT.encode()):,} -> ")
    assert "1 new file(s), e.g." in change and "c.md" in change and "1 file(s) gone, e.g." in change
    assert data_module.fingerprint(tmp_path) != prepared.meta["fingerprint"]


def test_prepare_never_writes_into_a_model_or_run_folder(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text(TEXT, encoding="utf-8")
    for marker, what in (("config.json", "a model"), ("train_config.json", "a training run")):
        folder = tmp_path / marker.replace(".", "-")
        folder.mkdir()
        (folder / marker).write_text("{}")
        with pytest.raises(UserError) as e:
            prepare(src, folder, progress=False)
        _one_line_error(e, f"holds {what}")
        assert [p.name for p in folder.iterdir()] == [marker]


def test_preparing_adds_no_special_tokens(tmp_path, monkeypatch):
    """Data preparation encodes with add_special_tokens=False whatever `Tokenizer.encode` defaults to: a tokenizer
    whose post-processor adds a BOS prepares the same tokens as one without."""
    from tokenizers import processors

    from decoderlab.tokenizer import Tokenizer

    plain = Tokenizer.train_char(texts=[TEXT])
    backend = Tokenizer.train_char(texts=[TEXT]).backend
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    with_bos = Tokenizer(backend, special_tokens={"bos_token": "<s>"})
    assert with_bos.encode("ab", add_special_tokens=True)[0] == bos
    encode = Tokenizer.encode
    monkeypatch.setattr(Tokenizer, "encode", lambda self, text, add_special_tokens=True: encode(
        self, text, add_special_tokens=add_special_tokens))  # the transformers-like default
    src = tmp_path / "input.txt"
    src.write_text(TEXT, encoding="utf-8")
    ours = prepare(src, tmp_path / "bos", tokenizer=with_bos, progress=False)
    reference = prepare(src, tmp_path / "plain", tokenizer=plain, progress=False)
    assert bos not in np.asarray(ours.train.tokens) and bos not in np.asarray(ours.val.tokens)
    assert np.array_equal(np.asarray(ours.train.tokens), np.asarray(reference.train.tokens))


def test_progress_bar_runs(tmp_path, capsys):
    src = tmp_path / "input.txt"
    src.write_text(TEXT, encoding="utf-8")
    prepare([src], tmp_path / "out", progress=True)
    assert "encoding" in capsys.readouterr().err


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"shared corpus not found at {SHAKESPEARE}")
def test_tinyshakespeare_as_nanogpt(tmp_path):
    d = prepare(SHAKESPEARE, tmp_path / "out", progress=False)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    n = len(text)
    # nanoGPT's data/shakespeare_char/prepare.py: vocab 65, train 1,003,854 tokens, val 111,540 tokens.
    assert d.tokenizer.vocab_size == 65
    assert (len(d.train), len(d.val)) == (1_003_854, 111_540) == (int(n * 0.9), n - int(n * 0.9))
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    nanogpt_val = np.array([stoi[c] for c in text[int(n * 0.9):]], dtype=np.uint16)
    assert np.array_equal(d.val.tokens, nanogpt_val)
    assert d.tokenizer.decode(d.train.tokens[-100:]) == text[int(n * 0.9) - 100:int(n * 0.9)]


@pytest.fixture()
def corpus(tmp_path) -> tuple[Path, list[str]]:
    """A folder of mixed files; returns it and the document texts in the order prepare reads them."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.py").write_text("def f(x):\n    return x + 1\n", encoding="utf-8")
    (root / "b.md").write_text("# Title\n\nSome *markdown* text.\n", encoding="utf-8")
    (root / "sub" / "c.jsonl").write_text(
        json.dumps({"text": "first record", "id": 1}) + "\n"
        + json.dumps({"text": "second, with ünïcode 😀"}) + "\n\n"
        + json.dumps({"text": ""}) + "\n"  # empty documents are skipped
        + json.dumps({"text": "third\nrecord\n"}) + "\n",
        encoding="utf-8",
    )
    (root / "sub" / "notes.csv").write_text("not,searched\n", encoding="utf-8")
    (root / ".hidden" / "x.txt").write_text("hidden\n", encoding="utf-8")
    (root / "sub" / "empty.txt").write_text("", encoding="utf-8")
    docs = [
        "def f(x):\n    return x + 1\n",
        "# Title\n\nSome *markdown* text.\n",
        "first record",
        "second, with ünïcode 😀",
        "third\nrecord\n",
    ]
    return root, docs


def _check_documents(d: PreparedData, docs: list[str], eos: str = "") -> None:
    decoded = {name: [d.tokenizer.decode(x) for x in _documents(getattr(d, name))] for name in ("train", "val")}
    assert decoded["train"] and decoded["val"]
    assert sorted(decoded["train"] + decoded["val"]) == sorted(doc + eos for doc in docs)
    for name in ("train", "val"):
        # Each split keeps the corpus order.
        order = [docs.index(text.removesuffix(eos) if eos else text) for text in decoded[name]]
        assert order == sorted(order)
        split = getattr(d, name)
        assert d.meta[name]["documents"] == split.n_docs == len(decoded[name])
        assert d.meta[name]["chars"] == sum(len(t.removesuffix(eos) if eos else t) for t in decoded[name])
        assert d.meta[name]["bytes"] == sum(len((t.removesuffix(eos) if eos else t).encode()) for t in decoded[name])
        assert d.meta[name]["tokens"] == len(split)


def test_folder_with_jsonl_bpe(corpus, tmp_path):
    root, docs = corpus
    d = prepare(root, tmp_path / "out", tokenizer="bpe", vocab_size=300, progress=False)
    assert d.meta["split_by"] == "documents" and d.meta["n_files"] == 4 and d.meta["eos_appended"]
    assert d.tokenizer.vocab_size <= 300 and d.tokenizer.eos_id is not None
    assert int(max(d.train.tokens.max(), d.val.tokens.max())) < d.tokenizer.vocab_size
    _check_documents(d, docs, eos="<|endoftext|>")
    # Every document ends with <|endoftext|>.
    for split in (d.train, d.val):
        ends = np.append(split.doc_starts[1:], len(split)) - 1
        assert (split.tokens[ends] == d.tokenizer.eos_id).all()

    # Reusing the tokenizer (folder or tokenizer.json) gives the same tokens.
    for reuse in (tmp_path / "out", tmp_path / "out" / "tokenizer.json"):
        again = prepare(root, tmp_path / "again", tokenizer=reuse, progress=False)
        assert again.meta["tokenizer"] == "file"
        assert np.array_equal(again.train.tokens, d.train.tokens) and np.array_equal(again.val.tokens, d.val.tokens)


def test_folder_char_and_glob_inputs(corpus, tmp_path):
    root, docs = corpus
    d = prepare([root / "*.py", root / "**/*.md", str(root / "sub")], tmp_path / "out", progress=False)
    assert d.meta["n_files"] == 4 and not d.meta["eos_appended"]
    _check_documents(d, docs)
    assert d.train.doc_starts[0] == 0 and np.all(np.diff(d.train.doc_starts) > 0)


def test_split_assignment_is_stable(tmp_path):
    root = tmp_path / "many"
    root.mkdir()
    for i in range(200):
        (root / f"doc{i:03d}.txt").write_text(f"document number {i}\n", encoding="utf-8")
    d = prepare(root, tmp_path / "out", progress=False)
    assert 5 <= d.val.n_docs <= 40 and d.train.n_docs + d.val.n_docs == 200
    # Moving the corpus keeps the split: documents are keyed by their path relative to the corpus.
    moved = root.rename(tmp_path / "moved")
    e = prepare(moved, tmp_path / "out2", progress=False)
    assert np.array_equal(d.val.tokens, e.val.tokens)


def test_two_documents_one_per_split(tmp_path):
    (tmp_path / "a.txt").write_text("aaa", encoding="utf-8")
    (tmp_path / "b.txt").write_text("bbb", encoding="utf-8")
    d = prepare([tmp_path / "a.txt", tmp_path / "b.txt"], tmp_path / "out", progress=False)
    assert (d.train.n_docs, d.val.n_docs) == (1, 1)


def test_invalid_utf8_replaced_and_counted(tmp_path, capsys):
    raw = b"abc \xff\xfe def \xe2\x82 ok \xc3\xa9\n" * 3
    (tmp_path / "bad.txt").write_bytes(raw)
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "x\\ud800y"}\n{"text": "caf\xe9"}\n')
    d = prepare(tmp_path, tmp_path / "out", progress=False)
    # .txt: 2 + 2 invalid bytes x 3 lines; .jsonl: a lone surrogate (its 3 bytes) and one bad byte.
    assert d.meta["replaced_bytes"] == 12 + 3 + 1
    texts = sorted(d.tokenizer.decode(x) for split in (d.train, d.val) for x in _documents(split))
    assert texts == sorted([raw.decode("utf-8", errors="replace"), "x\ufffd\ufffd\ufffdy", "caf\ufffd"])
    err = capsys.readouterr().err
    assert "16 bytes of invalid UTF-8" in err and len(err.strip().splitlines()) == 1


def test_chunked_reading_gives_the_same_tokens(tmp_path, monkeypatch):
    # Tiny reads: multi-byte characters straddle reads, and pieces are cut many times.
    text = "".join(f"def f{i}(x):\n    return 'é😀' * {i}\n\n\nclass C{i}:\n  pass\n" for i in range(40))
    (tmp_path / "code.py").write_text(text, encoding="utf-8")
    whole = prepare(tmp_path / "code.py", tmp_path / "whole", tokenizer="bpe", vocab_size=300, progress=False)
    monkeypatch.setattr(data_module, "_CHUNK_BYTES", 7)
    monkeypatch.setattr(data_module, "_FLUSH_CHARS", 50)
    chunked = prepare(tmp_path / "code.py", tmp_path / "chunked", tokenizer=tmp_path / "whole", progress=False)
    for name in ("train", "val"):
        assert np.array_equal(getattr(whole, name).tokens, getattr(chunked, name).tokens)
    cut = int(len(text) * 0.9)
    tok = whole.tokenizer
    assert whole.train.tokens.tolist() == tok.encode(text[:cut])
    assert whole.val.tokens.tolist() == tok.encode(text[cut:]) + [tok.eos_id]


def test_errors_are_one_line(tmp_path, corpus):
    root, _ = corpus
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "nothing").mkdir()
    with pytest.raises(UserError) as e:
        prepare(tmp_path / "empty.txt", tmp_path / "out", progress=False)
    _one_line_error(e, "empty")
    with pytest.raises(UserError) as e:
        prepare([root, tmp_path / "missing.txt", tmp_path / "nothing", str(tmp_path / "*.zzz")], tmp_path / "out")
    _one_line_error(e, "missing.txt", "nothing", "*.zzz")
    assert str(root) not in str(e.value).split("(")[0]

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        prepare(bad, tmp_path / "out", progress=False)
    _one_line_error(e, "bad.jsonl", "line 2", "'text'", "body")
    bad.write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(UserError) as e:
        prepare(bad, tmp_path / "out", progress=False)
    _one_line_error(e, "bad.jsonl", "line 2", "JSON")

    src = tmp_path / "small.txt"
    src.write_text("abcd" * 10, encoding="utf-8")  # 36 tokens in train, 4 in val
    d = prepare(src, tmp_path / "out", progress=False)
    d.check_context(3)
    with pytest.raises(UserError) as e:
        d.check_context(8)
    _one_line_error(e, "val", "4 tokens", "context_length <= 3")
    with pytest.raises(UserError) as e:
        get_batch(d.val, 2, 8, step=0, seed=0)
    _one_line_error(e, "val", "4 tokens")

    for kwargs, fragment in [
        ({"tokenizer": "nope"}, "nope"),
        ({"tokenizer": "bpe", "vocab_size": 10}, "vocab_size"),
        ({"val_fraction": 0.0}, "val_fraction"),
    ]:
        with pytest.raises(UserError) as e:
            prepare(src, tmp_path / "out2", progress=False, **kwargs)
        _one_line_error(e, fragment)
    with pytest.raises(UserError) as e:
        PreparedData.load(tmp_path / "nothing")
    _one_line_error(e, "not a prepared data folder")


def test_default_corpus_files():
    files = default_corpus_files()
    assert len(files) > 100
    assert files == sorted(files, key=str)
    assert all(f.suffix == ".py" and f.is_file() for f in files)
    skipped = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
    assert not any(skipped & set(f.parts) for f in files)
    assert any(f.name == "json" or f.parent.name == "json" for f in files)


# ---------------------------------------------------------------------------------------------- batches


def _token_data(n: int, doc_starts: list[int]) -> TokenData:
    # Distinct token values (= their offset), so a window's start can be read off its first input.
    return TokenData(np.arange(n, dtype=np.uint32), np.array(doc_starts, dtype=np.int64), name="train")


def _reference_window(data: TokenData, start: int, length: int, packed: bool = True) -> tuple[list, ...]:
    """inputs, targets, doc_ids, positions of the window at `start`, with Python loops; offsets >= n are padding."""
    n = len(data.tokens)
    starts = set(data.doc_starts.tolist())
    inputs, targets, doc_ids, positions = [], [], [], []
    doc = pos = 0
    for t in range(length):
        i = min(start + t, n - 1)
        if t > 0 and start + t < n and i in starts:
            doc, pos = doc + 1, 0
        elif t > 0:
            pos += 1 if start + t < n else 0
        inputs.append(int(data.tokens[i]))
        if start + t + 1 >= n or (packed and start + t + 1 in starts):
            targets.append(-100)
        else:
            targets.append(int(data.tokens[start + t + 1]))
        doc_ids.append(doc)
        positions.append(pos)
    return inputs, targets, doc_ids, positions


def _check_against_reference(batch: Batch, data: TokenData, starts: list[int], length: int, packed: bool) -> None:
    for b, start in enumerate(starts):
        inputs, targets, doc_ids, positions = _reference_window(data, start, length, packed)
        assert batch.inputs[b].tolist() == inputs
        assert batch.targets[b].tolist() == targets
        if packed:
            assert batch.doc_ids[b].tolist() == doc_ids
            assert batch.positions[b].tolist() == positions


@st.composite
def token_data(draw, min_tokens: int = 2) -> TokenData:
    n = draw(st.integers(min_tokens, 300))
    starts = draw(st.sets(st.integers(1, n - 1), max_size=20)) if n > 1 else set()
    return _token_data(n, sorted({0} | starts))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=token_data(), batch=st.integers(1, 6), length=st.integers(1, 40), step=st.integers(0, 10**6),
       seed=st.integers(0, 2**32), packed=st.booleans())
def test_get_batch_matches_reference(data, batch, length, step, seed, packed):
    length = min(length, len(data) - 1)
    out = get_batch(data, batch, length, step, seed, packed=packed)
    assert out.inputs.shape == out.targets.shape == (batch, length)
    assert out.inputs.dtype == out.targets.dtype == torch.int64
    starts = out.inputs[:, 0].tolist()
    assert all(0 <= s <= len(data) - length - 1 for s in starts)
    _check_against_reference(out, data, starts, length, packed)
    if not packed:
        assert out.doc_ids is None and out.positions is None


def test_get_batch_deterministic_and_varied():
    data = _token_data(10_000, [0, 100, 2500, 2600, 7000])
    a = get_batch(data, 16, 64, step=5, seed=1)
    b = get_batch(data, 16, 64, step=5, seed=1)
    for name in ("inputs", "targets", "doc_ids", "positions"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    assert not torch.equal(a.inputs, get_batch(data, 16, 64, step=6, seed=1).inputs)
    assert not torch.equal(a.inputs, get_batch(data, 16, 64, step=5, seed=2).inputs)
    r0 = get_batch(data, 8, 64, step=5, seed=1, rank=0, world_size=2)
    r1 = get_batch(data, 8, 64, step=5, seed=1, rank=1, world_size=2)
    assert not torch.equal(r0.inputs, r1.inputs)
    # The ranks together see the batch one process of twice the size would.
    assert torch.equal(torch.cat([r0.inputs, r1.inputs]), a.inputs)
    with pytest.raises(ValueError):
        get_batch(data, 8, 64, step=0, seed=0, rank=2, world_size=2)


def test_get_batch_boundaries_and_positions():
    data = _token_data(50, [0, 10, 13, 30])
    out = get_batch(data, 64, 20, step=0, seed=0)
    x, y = out.inputs, out.targets
    keep = y != -100
    assert torch.equal(y[:, :-1][keep[:, :-1]], x[:, 1:][keep[:, :-1]])  # targets are the next inputs
    starts = torch.tensor([10, 13, 30])
    # Ignored targets are exactly the document starts, and positions restart there.
    assert torch.equal(~keep, torch.isin(x + 1, starts))
    assert torch.equal(out.positions[:, 1:] == 0, torch.isin(x[:, 1:], starts))
    assert (out.positions[:, 0] == 0).all() and (out.doc_ids[:, 0] == 0).all()
    moved = out.to("cpu")
    assert torch.equal(moved.positions, out.positions)


def _covered_targets(data: TokenData, batch_size: int, length: int, packed: bool) -> list[int]:
    covered = []
    for batch in iter_eval_batches(data, batch_size, length, packed=packed):
        assert batch.inputs.shape[1] == length and batch.inputs.shape[0] <= batch_size
        covered += batch.targets[batch.targets != -100].tolist()
    return covered


@settings(max_examples=100, deadline=None)
@given(data=token_data(min_tokens=1), batch=st.integers(1, 5), length=st.integers(1, 30), packed=st.booleans())
def test_eval_batches_cover_every_target_once(data, batch, length, packed):
    # Token values are their offsets, so a target's value says which token it is.
    starts = set(data.doc_starts.tolist())
    expected = [j for j in range(1, len(data)) if not (packed and j in starts)]
    assert sorted(_covered_targets(data, batch, length, packed)) == expected
    window = 0
    for b in iter_eval_batches(data, batch, length, packed=packed):
        rows = b.inputs.shape[0]
        _check_against_reference(b, data, [w * length for w in range(window, window + rows)], length, packed)
        window += rows
    assert window == math.ceil((len(data) - 1) / length)


def test_eval_batches_on_prepared_split(corpus, tmp_path):
    root, _ = corpus
    d = prepare(root, tmp_path / "out", tokenizer="bpe", vocab_size=300, progress=False)
    n_targets = sum(int((b.targets != -100).sum()) for b in iter_eval_batches(d.val, 3, 8))
    assert n_targets == len(d.val) - d.val.n_docs
    assert d.val.bits_per_byte(math.log(2) * d.val.n_bytes) == pytest.approx(1.0)


def test_get_batch_speed_smoke():
    # The trainer calls this every step; a generous bound that still catches a Python loop over tokens.
    data = _token_data(1_000_000, list(range(0, 1_000_000, 777)))
    get_batch(data, 16, 64, step=0, seed=0)
    t = time.perf_counter()
    for step in range(200):
        get_batch(data, 16, 64, step=step, seed=0)
    assert (time.perf_counter() - t) / 200 < 2e-3


def test_load_detects_truncated_shard(tmp_path):
    src = tmp_path / "input.txt"
    src.write_text(TEXT, encoding="utf-8")
    prepare(src, tmp_path / "out", progress=False)
    with open(tmp_path / "out" / "train.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(UserError) as e:
        PreparedData.load(tmp_path / "out")
    _one_line_error(e, "train.bin")
    # prepare notices too and rebuilds.
    d = prepare(src, tmp_path / "out", progress=False)
    assert len(d.train) == int(len(TEXT) * 0.9)
    assert os.path.getsize(tmp_path / "out" / "train.bin") == 2 * len(d.train)
