"""Training data: text files -> tokenizer -> flat token shards on disk (`prepare`), and the batches the trainer
and evaluator read from them (`get_batch`, `iter_eval_batches`).

A prepared folder holds `tokenizer.json` (+ `tokenizer_config.json`), `train.bin` / `val.bin` (token ids, one
flat array per split), `train.docs.npy` / `val.docs.npy` (where each document starts) and `meta.json`.
"""

from __future__ import annotations

import codecs
import contextlib
import glob
import hashlib
import json
import math
import os
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from decoderlab.atomic import atomic_write
from decoderlab.errors import UserError
from decoderlab.tokenizer import Tokenizer

__all__ = [
    "DEFAULT_CORPUS_DESCRIPTION",
    "Batch",
    "PreparedData",
    "TokenData",
    "default_corpus_files",
    "describe_change",
    "fingerprint",
    "get_batch",
    "input_files",
    "input_stats",
    "iter_eval_batches",
    "prepare",
    "read_documents",
]

#: What `prepare(None, ...)` trains on, in words (for the README and the CLI's help).
DEFAULT_CORPUS_DESCRIPTION = (
    "the Python standard library's own .py source files on this machine (found with sysconfig; "
    "site-packages and test folders left out): about 730 files, 12 MB of text for CPython 3.11"
)

# Bump when the on-disk format or the way text becomes tokens changes: old folders then re-prepare.
FORMAT_VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
IGNORE_INDEX = -100  # torch.nn.functional.cross_entropy's default ignore_index

_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
_STDLIB_SKIP = {"site-packages", "dist-packages", "test", "tests", "idle_test"}
_GLOB_CHARS = set("*?[")
_CHUNK_BYTES = 1 << 18  # read size: pieces of this order also let encode_batch use every core
_MAX_PIECE_CHARS = 1 << 22  # a piece with no clean cut is cut anyway past this, to bound memory
_FLUSH_CHARS = 1 << 22  # characters buffered per split before they are encoded and written

# Invalid UTF-8 is replaced by U+FFFD exactly as errors="replace" does, and the bad bytes are counted here.
_REPLACE = "decoderlab.data.replace"
_replaced_bytes = 0


def _replace_and_count(exc: UnicodeError) -> tuple[str, int]:
    global _replaced_bytes
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    _replaced_bytes += exc.end - exc.start
    return "\ufffd", exc.end


codecs.register_error(_REPLACE, _replace_and_count)


# ---------------------------------------------------------------------------------------------- corpus files


def default_corpus_files() -> list[Path]:
    """The default corpus: the running Python's standard-library `.py` files, without site-packages and tests."""
    files = []
    for dirpath, dirnames, filenames in os.walk(sysconfig.get_paths()["stdlib"]):
        # Pruned while walking: site-packages alone can be far bigger than the standard library.
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_SKIP]
        files += [Path(dirpath, f) for f in filenames if f.endswith(".py") and os.path.isfile(Path(dirpath, f))]
    return sorted(files, key=str)


def _search_folder(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        # Hidden folders (.git, .venv, ...) hold tooling, not corpus text.
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f) for f in filenames if not f.startswith(".") and f.lower().endswith(_SUFFIXES)]
    return found


def _resolve_inputs(inputs: Sequence[str | os.PathLike] | None) -> list[Path]:
    if inputs is None:
        files = default_corpus_files()
        if not files:
            raise UserError(f"no default corpus: no .py files under {sysconfig.get_paths()['stdlib']}")
        return files
    if not inputs:
        raise UserError("no inputs given: pass files, folders or glob patterns")
    files: set[Path] = set()
    unmatched = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            matched = [path]
        elif path.is_dir():
            matched = _search_folder(path)
        elif _GLOB_CHARS & set(str(item)):
            matched = []
            for hit in map(Path, glob.glob(str(item), recursive=True)):
                matched += _search_folder(hit) if hit.is_dir() else [hit] if hit.is_file() else []
        else:
            matched = []
        if not matched:
            unmatched.append(str(item))
        files.update(p.resolve() for p in matched)
    if unmatched:
        raise UserError(
            f"no input files found for {', '.join(map(repr, unmatched))} (paths must exist; folders are searched "
            f"for {', '.join(_SUFFIXES)} files; globs like 'data/**/*.txt' are expanded)"
        )
    return sorted(files, key=str)


def input_files(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """The files `prepare` reads for `inputs` (files; folders searched recursively, hidden ones skipped, for
    .txt .md .py .jsonl; globs), resolved and sorted; a one-line UserError when an input matches nothing."""
    return _resolve_inputs(list(inputs))


def read_documents(path: str | os.PathLike, text_field: str = "text") -> Iterator[str]:
    """The documents of one input file exactly as `prepare` reads them: each line's `text_field` of a .jsonl
    file (blank lines skipped), any other file whole; invalid UTF-8 becomes U+FFFD."""
    path = Path(path)
    if path.suffix.lower() == ".jsonl":
        for _, text in _iter_jsonl(path, text_field, lambda n: None):
            yield text
    else:
        yield "".join(_iter_text_pieces(path, lambda n: None))


class _Corpus:
    """The input files as a stream of documents; each pass over it re-reads the files."""

    def __init__(self, files: list[Path], text_field: str) -> None:
        self.files = files
        self.text_field = text_field
        # Document keys are paths relative to this root, so the val split survives moving the corpus.
        self.root = Path(os.path.commonpath([p.parent for p in files]))
        self.total_bytes = sum(p.stat().st_size for p in files)

    def documents(self, advance: Callable[[int], None]) -> Iterator[tuple[str, Iterator[str]]]:
        """Yields (key, pieces of text) per document, in a fixed order; consume each one's pieces before the next."""
        for path in self.files:
            key = path.relative_to(self.root).as_posix()
            if path.suffix.lower() == ".jsonl":
                for line_no, text in _iter_jsonl(path, self.text_field, advance):
                    yield f"{key}:{line_no}", iter((text,))
            else:
                yield key, _iter_text_pieces(path, advance)


def _cut_point(text: str) -> int:
    """Where `text` can be cut without changing how it tokenizes: after a newline followed by a non-space.

    GPT-2-style pre-tokenizers never make a token that spans such a boundary (whitespace runs stop before the
    non-space), so encoding the pieces separately gives the same ids as encoding the whole. 0 if none."""
    p = text.rfind("\n", 0, len(text) - 1)
    while p >= 0 and text[p + 1].isspace():
        p = text.rfind("\n", 0, p)
    return p + 1


def _iter_text_pieces(path: Path, advance: Callable[[int], None]) -> Iterator[str]:
    # Incremental decoding: a multi-byte character split across two reads still decodes as one.
    decoder = codecs.getincrementaldecoder("utf-8")(errors=_REPLACE)
    carry = ""
    with path.open("rb") as f:
        while raw := f.read(_CHUNK_BYTES):
            advance(len(raw))
            text = carry + decoder.decode(raw)
            cut = _cut_point(text)
            if cut == 0 and len(text) >= _MAX_PIECE_CHARS:
                cut = len(text)
            carry = text[cut:]
            if cut:
                yield text[:cut]
        carry += decoder.decode(b"", final=True)
    if carry:
        yield carry


def _iter_jsonl(path: Path, text_field: str, advance: Callable[[int], None]) -> Iterator[tuple[int, str]]:
    with path.open("rb") as f:
        for line_no, raw in enumerate(f, 1):
            advance(len(raw))
            line = raw.decode("utf-8", errors=_REPLACE)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UserError(f"{path} line {line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict) or text_field not in record:
                fields = f"; it has {sorted(record)[:8]}" if isinstance(record, dict) else ""
                raise UserError(
                    f"{path} line {line_no}: no {text_field!r} field{fields} (pick the field with text_field=)"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise UserError(f"{path} line {line_no}: {text_field!r} is a {type(text).__name__}, not a string")
            if not text.isascii():
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    # JSON can spell lone surrogates ("\ud800"), which are not text; replace them like bad bytes.
                    text = text.encode("utf-8", "surrogatepass").decode("utf-8", errors=_REPLACE)
            yield line_no, text


# ---------------------------------------------------------------------------------------------- token data


@dataclass
class TokenData:
    """One split: a flat array of token ids and where each document starts in it."""

    tokens: np.ndarray  # np.memmap of uint16 / uint32 ids (a plain array for an empty split)
    doc_starts: np.ndarray  # int64 offsets into `tokens`, increasing, doc_starts[0] == 0
    n_bytes: int = 0  # UTF-8 bytes of the text these tokens encode: bits per byte = loss sum / ln 2 / n_bytes
    n_chars: int = 0
    name: str = "data"

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def n_docs(self) -> int:
        return len(self.doc_starts)

    def bits_per_byte(self, loss_sum: float) -> float:
        """Bits per UTF-8 byte from the summed cross-entropy (nats) over `iter_eval_batches`' targets."""
        return loss_sum / math.log(2) / max(self.n_bytes, 1)

    def bits_per_char(self, loss_sum: float) -> float:
        """Bits per character from the summed cross-entropy (nats) over `iter_eval_batches`' targets."""
        return loss_sum / math.log(2) / max(self.n_chars, 1)


def _too_small(name: str, n: int, context_length: int, where: str = "") -> str:
    fix = f"use context_length <= {n - 1}" if n >= 2 else "use a smaller context"
    return (
        f"the {name} split{where} has {n:,} tokens, too few for one window of context_length={context_length} "
        f"(needs {context_length + 1:,}); {fix} or prepare more data"
    )


@dataclass
class PreparedData:
    """A prepared folder: its tokenizer, train and val splits, and meta.json's contents."""

    dir: Path
    meta: dict[str, Any]
    tokenizer: Tokenizer
    train: TokenData
    val: TokenData

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @classmethod
    def load(cls, dir: str | os.PathLike) -> PreparedData:
        """Opens a folder written by `prepare` (token files memory-mapped, nothing read up front)."""
        folder = Path(dir)
        meta_file = folder / META_FILE
        hint = "prepare your text into it first (decoderlab.data.prepare)"
        if not meta_file.is_file():
            raise UserError(f"{folder} is not a prepared data folder (no {META_FILE}); {hint}")
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{meta_file} is not valid JSON ({exc}); {hint}") from None
        if not isinstance(meta, dict) or meta.get("format") != "decoderlab.data":
            raise UserError(f"{meta_file} was not written by decoderlab's prepare; {hint}")
        if meta.get("version") != FORMAT_VERSION:
            raise UserError(f"{folder} holds data format {meta.get('version')}, this decoderlab reads "
                            f"{FORMAT_VERSION}; prepare it again")
        try:
            dtype = np.dtype(meta["dtype"])
            stats_of = {name: {k: int(meta[name][k]) for k in ("tokens", "bytes", "chars")} for name in SPLITS}
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{meta_file} is incomplete; prepare the data again") from None
        splits = {}
        for name in SPLITS:
            stats = stats_of[name]
            bin_file, docs_file = folder / f"{name}.bin", folder / f"{name}.docs.npy"
            if not bin_file.is_file() or not docs_file.is_file():
                raise UserError(f"{folder} is missing {bin_file.name} or {docs_file.name}; prepare it again")
            if bin_file.stat().st_size != stats["tokens"] * dtype.itemsize:
                raise UserError(f"{bin_file} does not hold the {stats['tokens']:,} tokens meta.json says; "
                                "prepare it again")
            # np.memmap cannot map an empty file.
            tokens = np.memmap(bin_file, dtype=dtype, mode="r") if stats["tokens"] else np.zeros(0, dtype)
            splits[name] = TokenData(tokens, np.load(docs_file), stats["bytes"], stats["chars"], name)
        return cls(folder, meta, Tokenizer.from_folder(folder), splits["train"], splits["val"])

    def check_context(self, context_length: int) -> None:
        """UserError (one line) unless both splits hold at least one window of `context_length` + 1 tokens."""
        for split in (self.train, self.val):
            if len(split) < context_length + 1:
                raise UserError(_too_small(split.name, len(split), context_length, f" of {self.dir}"))


# ---------------------------------------------------------------------------------------------- prepare


class _Progress:
    """A rich progress bar per pass (bytes read), or nothing when disabled."""

    def __init__(self, enabled: bool) -> None:
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("{task.description:<22}"), BarColumn(), DownloadColumn(),
                                 TimeRemainingColumn(), console=Console(stderr=True))

    def __enter__(self) -> _Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def task(self, description: str, total: int) -> Callable[[int], None]:
        if self._bar is None:
            return lambda n: None
        bar, task = self._bar, self._bar.add_task(description, total=total)
        return lambda n: bar.advance(task, n)


class _CharTable:
    """Vectorised encoding for the char-level tokenizers `Tokenizer.train_char` builds (one id per character):
    a numpy lookup, ~50x faster than the generic path. Anything else returns None from `of`."""

    def __init__(self, codes: np.ndarray, ids: np.ndarray) -> None:
        self.codes, self.ids = codes, ids

    @classmethod
    def of(cls, tok: Tokenizer) -> _CharTable | None:
        spec = json.loads(tok.backend.to_str())
        model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
        simple = (
            model.get("type") == "WordLevel"
            and not spec.get("added_tokens")
            and spec.get("normalizer") is None
            and pre.get("type") == "Split"
            and pre.get("pattern") == {"Regex": r"[\s\S]"}
            and pre.get("behavior") == "Isolated"
            and not pre.get("invert")
            and all(len(ch) == 1 for ch in model["vocab"])
        )
        if not simple:
            return None
        pairs = sorted((ord(ch), i) for ch, i in model["vocab"].items())
        return cls(np.array([c for c, _ in pairs], np.uint32), np.array([i for _, i in pairs], np.int64))

    def encode(self, text: str) -> np.ndarray | None:
        codes = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        j = np.minimum(np.searchsorted(self.codes, codes), len(self.codes) - 1)
        if not np.array_equal(self.codes[j], codes):
            return None  # a character the vocabulary lacks: the caller's slow path names it
        return self.ids[j]


class _SplitWriter:
    """Appends one split's documents to a temp .bin file, encoding buffered text in batches (in parallel)."""

    def __init__(self, name: str, out_dir: Path, dtype: np.dtype, encode: Callable, eos_id: int | None) -> None:
        self.name, self.dtype, self._encode, self.eos_id = name, dtype, encode, eos_id
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.bin.", suffix=".tmp")
        self.tmp, self._file = Path(tmp), os.fdopen(fd, "wb")
        self.n_tokens = self.n_bytes = self.n_chars = 0
        self.doc_starts: list[int] = []
        # Ops replayed in order after encoding: ("doc",) starts a document, ("text", text, key), ("eos",).
        self._ops: list[tuple] = []
        self._pending_chars = 0

    def start_doc(self) -> None:
        self._ops.append(("doc",))

    def add_text(self, text: str, key: str) -> None:
        self._ops.append(("text", text, key))
        self.n_chars += len(text)
        self.n_bytes += len(text) if text.isascii() else len(text.encode("utf-8"))
        self._pending_chars += len(text)
        if self._pending_chars >= _FLUSH_CHARS:
            self.flush()

    def end_doc(self) -> None:
        if self.eos_id is not None:
            self._ops.append(("eos",))

    def flush(self) -> None:
        texts = [op for op in self._ops if op[0] == "text"]
        encoded = iter(self._encode([op[1] for op in texts], [op[2] for op in texts]))
        eos = np.array([self.eos_id if self.eos_id is not None else 0], self.dtype)
        for op in self._ops:
            if op[0] == "doc":
                self.doc_starts.append(self.n_tokens)
                continue
            ids = np.asarray(next(encoded), self.dtype) if op[0] == "text" else eos
            self._file.write(ids.tobytes())
            self.n_tokens += len(ids)
        self._ops, self._pending_chars = [], 0

    def close(self) -> None:
        self.flush()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def discard(self) -> None:
        self._file.close()
        self.tmp.unlink(missing_ok=True)  # gone already once moved into place


def _tokenizer_spec(tokenizer: str | os.PathLike | Tokenizer, vocab_size: int) -> tuple[str, Tokenizer | None, Any]:
    """(kind, the tokenizer to reuse or None to train one, what identifies it in the fingerprint)."""
    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
        kind = "given"
    elif tokenizer in ("char", "bpe"):
        # Checked here as well as in train_bpe, so a bad value fails before the corpus is read.
        if tokenizer == "bpe" and (not isinstance(vocab_size, int) or isinstance(vocab_size, bool) or vocab_size < 257):
            raise UserError(f"vocab_size must be an integer >= 257 (256 bytes + <|endoftext|>), got {vocab_size!r}")
        return str(tokenizer), None, {"kind": tokenizer, "vocab_size": vocab_size if tokenizer == "bpe" else None}
    elif isinstance(tokenizer, (str, os.PathLike)):
        if not Path(tokenizer).exists():
            raise UserError(
                f"tokenizer must be 'char', 'bpe', or a tokenizer folder / tokenizer.json; {tokenizer} not found"
            )
        tok = Tokenizer.from_folder(tokenizer)
        kind = "file"
    else:
        raise UserError(f"tokenizer must be 'char', 'bpe', a path or a Tokenizer, got {type(tokenizer).__name__}")
    digest = hashlib.sha256((tok.backend.to_str() + json.dumps(tok.special_tokens, sort_keys=True)).encode())
    return kind, tok, {"kind": "reuse", "sha256": digest.hexdigest()}


def _fingerprint_of(folder: Path) -> str | None:
    try:
        meta = json.loads((folder / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return meta.get("fingerprint") if isinstance(meta, dict) else None


def _val_share(key: str) -> float:
    """A stable pseudo-random number in [0, 1) per document: it is in val when this is below val_fraction."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") / 2**64


def document_split(files: Sequence[str | os.PathLike], val_fraction: float) -> dict[Path, str]:
    """The split ("train" or "val") `prepare` puts each of these (non-JSONL) files in, as one document each: a
    held-out set made from the same files can then avoid everything a model trained on them has seen."""
    paths = [Path(f) for f in files]
    root = Path(os.path.commonpath([p.parent for p in paths]))
    return {p: "val" if _val_share(p.relative_to(root).as_posix()) < val_fraction else "train" for p in paths}


def _given(inputs: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[str | os.PathLike] | None:
    return None if inputs is None else [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)


def _plan(given: list[str | os.PathLike] | None, tokenizer: str | os.PathLike | Tokenizer, vocab_size: int,
          text_field: str, val_fraction: float) -> tuple[list[Path], str, Tokenizer | None, str]:
    """(input files, tokenizer kind, the tokenizer to reuse or None, the fingerprint of this preparation)."""
    if not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise UserError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction!r}")
    if not isinstance(text_field, str):
        raise UserError(f"text_field must be a string, got {text_field!r}")
    files = _resolve_inputs(given)
    kind, tok, tok_id = _tokenizer_spec(tokenizer, vocab_size)
    stamp = hashlib.sha256(json.dumps({
        "version": FORMAT_VERSION,
        "files": [[str(p), st.st_size, st.st_mtime_ns] for p in files for st in [p.stat()]],
        "tokenizer": tok_id,
        "text_field": text_field,
        "val_fraction": val_fraction,
    }).encode()).hexdigest()
    return files, kind, tok, stamp


def fingerprint(
    inputs: str | os.PathLike | Sequence[str | os.PathLike] | None,
    tokenizer: str | os.PathLike | Tokenizer = "char",
    vocab_size: int = 4096,
    text_field: str = "text",
    val_fraction: float = 0.1,
) -> str:
    """What `prepare` with these arguments records in meta.json's "fingerprint": the input files (paths, sizes,
    modification times), the tokenizer and the settings. Reads no file contents."""
    return _plan(_given(inputs), tokenizer, vocab_size, text_field, val_fraction)[3]


def input_stats(inputs: str | os.PathLike | Sequence[str | os.PathLike] | None) -> list[list[Any]]:
    """[path, size, mtime_ns] of each input file (as `prepare` finds them), to tell later whether they changed."""
    return [[str(p), st.st_size, st.st_mtime_ns] for p in _resolve_inputs(_given(inputs)) for st in [p.stat()]]


def describe_change(before: list[list[Any]], after: list[list[Any]]) -> str | None:
    """What differs between two `input_stats`, in a few words, or None when nothing does."""
    old = {str(p): (int(size), int(mtime)) for p, size, mtime in before}
    new = {str(p): (int(size), int(mtime)) for p, size, mtime in after}
    gone, added = sorted(old.keys() - new.keys()), sorted(new.keys() - old.keys())
    changed = sorted(p for p in old.keys() & new.keys() if old[p] != new[p])
    parts = []
    if changed:
        p = changed[0]
        what = (f"{old[p][0]:,} -> {new[p][0]:,} bytes" if old[p][0] != new[p][0] else "modified since")
        parts.append(f"{len(changed)} file(s) changed, e.g. {p} ({what})")
    if added:
        parts.append(f"{len(added)} new file(s), e.g. {added[0]}")
    if gone:
        parts.append(f"{len(gone)} file(s) gone, e.g. {gone[0]}")
    return "; ".join(parts) or None


def _refuse_model_folder(out: Path) -> None:
    # Preparing writes tokenizer.json: into a model or a run folder it would replace that model's tokenizer.
    for marker, what in (("train_config.json", "a training run"), ("config.json", "a model")):
        if (out / marker).is_file():
            raise UserError(f"output folder {out} holds {what} ({marker}); prepare data into its own folder")


def prepare(
    inputs: str | os.PathLike | Sequence[str | os.PathLike] | None,
    out_dir: str | os.PathLike,
    tokenizer: str | os.PathLike | Tokenizer = "char",
    vocab_size: int = 4096,
    text_field: str = "text",
    val_fraction: float = 0.1,
    progress: bool = True,
) -> PreparedData:
    """Tokenizes a corpus into `out_dir` (train/val token files, tokenizer, meta.json) and returns it opened.

    `inputs`: files, folders (searched recursively for .txt/.md/.py/.jsonl), glob patterns, or None for the
    default corpus (`DEFAULT_CORPUS_DESCRIPTION`). A .jsonl file gives one document per line (its `text_field`);
    any other file is one document. `tokenizer`: "char", "bpe" (byte-level, `vocab_size`, `<|endoftext|>`
    appended to every document), or a tokenizer folder / tokenizer.json / Tokenizer to reuse.

    One document: val is its last `val_fraction` of characters, cut as nanoGPT's prepare.py cuts
    (`data[int(n * 0.9):]`). Several: whole documents go to val by a stable hash of their path (and line).
    If `out_dir` already holds this corpus (same paths, sizes, mtimes) and settings, it is reused as it is.
    """
    global _replaced_bytes
    given = _given(inputs)
    files, kind, tok, stamp = _plan(given, tokenizer, vocab_size, text_field, val_fraction)

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"output folder {out} exists and is not a folder")
    _refuse_model_folder(out)
    if _fingerprint_of(out) == stamp:
        with contextlib.suppress(UserError, OSError, KeyError, TypeError, ValueError):
            return PreparedData.load(out)
    out.mkdir(parents=True, exist_ok=True)
    # Until the new meta.json lands, the folder must not pass for prepared: old meta with new shards would.
    (out / META_FILE).unlink(missing_ok=True)

    corpus = _Corpus(files, text_field)
    with _Progress(progress) as bars:
        # Pass 1: find the documents (and check every jsonl line) before spending time on a tokenizer.
        _replaced_bytes = 0
        shares: list[float] = []
        doc_chars: list[int] = []
        for key, pieces in corpus.documents(bars.task("reading", corpus.total_bytes)):
            shares.append(_val_share(key))
            doc_chars.append(sum(map(len, pieces)))
        replaced = _replaced_bytes
        split_of, cut_at = _plan_splits(shares, doc_chars, val_fraction)
        if not any(s is not None for s in split_of):
            raise UserError(f"the corpus is empty: {len(files)} input file(s) hold no text")

        # Pass 2: train the tokenizer on all the text (as nanoGPT's char vocabulary is built from all of it).
        if tok is None:
            advance = bars.task(f"training {kind} tokenizer", corpus.total_bytes)
            texts = (piece for _, pieces in corpus.documents(advance) for piece in pieces)
            if kind == "char":
                tok = Tokenizer.train_char(texts=texts)
            else:
                tok = Tokenizer.train_bpe(texts=texts, vocab_size=vocab_size, special_tokens=("<|endoftext|>",))

        # Pass 3: encode into temp files, then move everything into place; meta.json last.
        dtype = np.dtype(np.uint16 if tok.vocab_size < 2**16 else np.uint32)
        writers = [_SplitWriter(name, out, dtype, _make_encoder(tok), tok.eos_id) for name in SPLITS]
        try:
            for i, (key, pieces) in enumerate(corpus.documents(bars.task("encoding", corpus.total_bytes))):
                if split_of[i] is None:
                    for _ in pieces:
                        pass
                elif cut_at is None:
                    w = writers[split_of[i]]
                    w.start_doc()
                    for piece in pieces:
                        w.add_text(piece, key)
                    w.end_doc()
                else:
                    _write_cut_document(key, pieces, cut_at, *writers)
            for w in writers:
                w.close()
            tok.save(out)
            for w in writers:
                os.replace(w.tmp, out / f"{w.name}.bin")
                atomic_write(out / f"{w.name}.docs.npy", lambda f, w=w: np.save(f, np.array(w.doc_starts, np.int64)))
        except BaseException:
            for w in writers:
                w.discard()
            raise

    meta = {
        "format": "decoderlab.data",
        "version": FORMAT_VERSION,
        "fingerprint": stamp,
        "inputs": None if given is None else [str(x) for x in given],
        "n_files": len(files),
        "text_field": text_field,
        "val_fraction": val_fraction,
        "split_by": "characters" if cut_at is not None else "documents",
        "tokenizer": kind,
        "vocab_size": tok.vocab_size,
        "dtype": dtype.name,
        "eos_id": tok.eos_id,
        "eos_appended": tok.eos_id is not None,
        "replaced_bytes": replaced,
        **{w.name: {"tokens": w.n_tokens, "documents": len(w.doc_starts), "bytes": w.n_bytes, "chars": w.n_chars}
           for w in writers},
    }
    atomic_write(out / META_FILE, lambda f: f.write(json.dumps(meta, indent=2) + "\n"), mode="w")
    if replaced:
        print(f"warning: {replaced:,} bytes of invalid UTF-8 in the corpus were replaced by U+FFFD", file=sys.stderr)
    return PreparedData.load(out)


def _plan_splits(
    shares: list[float], doc_chars: list[int], val_fraction: float
) -> tuple[list[int | None], int | None]:
    """The split of each document (0 train, 1 val, None: empty, skipped), and for a lone document the
    character where val starts (nanoGPT's `int(n * 0.9)`), else None."""
    kept = [i for i, n in enumerate(doc_chars) if n > 0]
    split_of: list[int | None] = [None] * len(doc_chars)
    if len(kept) == 1:
        split_of[kept[0]] = 0
        return split_of, int(doc_chars[kept[0]] * (1 - val_fraction))
    for i in kept:
        split_of[i] = int(shares[i] < val_fraction)
    # Both splits need a document; move the one closest to the threshold.
    if kept and all(split_of[i] == 0 for i in kept):
        split_of[min(kept, key=shares.__getitem__)] = 1
    if kept and all(split_of[i] == 1 for i in kept):
        split_of[max(kept, key=shares.__getitem__)] = 0
    return split_of, None


def _write_cut_document(key: str, pieces: Iterator[str], cut_at: int, train: _SplitWriter, val: _SplitWriter) -> None:
    # The text before character `cut_at` goes to train and the rest to val, each encoded on its own (as nanoGPT).
    seen = 0
    if cut_at > 0:
        train.start_doc()
    val.start_doc()
    for piece in pieces:
        head = piece[: max(cut_at - seen, 0)]
        if head:
            train.add_text(head, key)
        if len(head) < len(piece):
            val.add_text(piece[len(head):], key)
        seen += len(piece)
    val.end_doc()


def _make_encoder(tok: Tokenizer) -> Callable[[list[str], list[str]], list]:
    table = _CharTable.of(tok)
    backend = tok.backend
    batch = getattr(backend, "encode_batch_fast", backend.encode_batch)  # _fast skips offsets (tokenizers>=0.21)

    def encode(texts: list[str], keys: list[str]) -> list:
        try:
            if table is None:
                return [e.ids for e in batch(texts, add_special_tokens=False)]
            ids = [table.encode(t) for t in texts]
            if all(x is not None for x in ids):
                return ids
        except Exception:
            pass
        # Something does not encode: find which text, and let Tokenizer.encode say what is wrong with it.
        for text, key in zip(texts, keys, strict=True):
            try:
                tok.encode(text, add_special_tokens=False)
            except UserError as exc:
                raise UserError(f"{key}: {exc}") from None
        return [tok.encode(t, add_special_tokens=False) for t in texts]

    return encode


# ---------------------------------------------------------------------------------------------- batches


@dataclass
class Batch:
    """int64 CPU tensors, [B, T] each. `targets` is -100 where nothing is to be predicted (across a document
    boundary, or past the end of the split). `doc_ids` (numbered from 0 in each row) and `positions` (restarting
    at 0 at each document start and at the window start) are None for unpacked batches."""

    inputs: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor | None = None
    positions: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=non_blocking)

        return Batch(move(self.inputs), move(self.targets), move(self.doc_ids), move(self.positions))


def _batch_from_windows(data: TokenData, idx: np.ndarray, packed: bool) -> Batch:
    """The batch of windows `idx` ([B, T+1] token offsets, clipped to the split; offsets past it repeat the last
    token and get no target)."""
    n = len(data.tokens)
    over = idx >= n
    if over.any():
        clipped = np.minimum(idx, n - 1)
    else:
        over, clipped = None, idx
    x = data.tokens[clipped].astype(np.int64)
    inputs, targets = x[:, :-1], x[:, 1:]
    doc_ids = positions = None
    if packed:
        doc = np.searchsorted(data.doc_starts, clipped, side="right") - 1
        targets = np.where(doc[:, 1:] == doc[:, :-1], targets, IGNORE_INDEX)
        # Each token's position counts from its document's start, or from the window's start if that is later.
        first = np.maximum(data.doc_starts[doc[:, :-1]], clipped[:, :1])
        positions = torch.from_numpy(clipped[:, :-1] - first)
        doc_ids = torch.from_numpy(doc[:, :-1] - doc[:, :1])
    if over is not None:
        targets = np.where(over[:, 1:], IGNORE_INDEX, targets)
    return Batch(torch.from_numpy(np.ascontiguousarray(inputs)), torch.from_numpy(np.ascontiguousarray(targets)),
                 doc_ids, positions)


def get_batch(
    data: TokenData,
    batch_size: int,
    context_length: int,
    step: int,
    seed: int,
    rank: int = 0,
    world_size: int = 1,
    packed: bool = True,
) -> Batch:
    """B random windows of T + 1 tokens (uniform start offsets, as nanoGPT's get_batch), a pure function of
    (seed, step, rank, world_size): a resumed run sees exactly the batches the first one would have.

    The windows for all ranks are drawn together from (seed, step) and rank r takes rows [r*B, (r+1)*B), so
    world_size ranks of batch B see the same data as one process of batch world_size * B.
    """
    n = len(data.tokens)
    if n < context_length + 1:
        raise UserError(_too_small(data.name, n, context_length))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    rng = np.random.default_rng((seed, step))
    starts = rng.integers(0, n - context_length, size=world_size * batch_size)[rank * batch_size:][:batch_size]
    idx = starts[:, None] + np.arange(context_length + 1)
    return _batch_from_windows(data, idx, packed)


def iter_eval_batches(
    data: TokenData, batch_size: int, context_length: int, packed: bool = True
) -> Iterator[Batch]:
    """Non-overlapping windows over the whole split, in order: every token after the first is a target exactly
    once (the last window padded, with -100 targets), so the loss summed over all batches is the split's loss.

    Sum the loss (`cross_entropy(..., reduction="sum")`) and count the targets that are not -100 over all batches,
    rather than averaging per-batch means (the last batch is partial). `TokenData.bits_per_byte(loss_sum)` turns
    the sum into bits per byte.
    """
    n = len(data.tokens)
    n_windows = max(n - 1, 0) // context_length + (max(n - 1, 0) % context_length > 0)
    offsets = np.arange(context_length + 1)
    for first in range(0, n_windows, batch_size):
        starts = np.arange(first, min(first + batch_size, n_windows)) * context_length
        yield _batch_from_windows(data, starts[:, None] + offsets, packed)
