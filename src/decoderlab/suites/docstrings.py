"""Docstring -> function body: an instruction set made from the Python standard library, for fine-tuning.

Each record is {"prompt": "def name(args):\n    \"\"\"docstring\"\"\"\n", "completion": the body}. The split
follows the default corpus's own (`data.document_split`): validation records come only from files that a model
trained with `decoderlab train` on the default corpus held out, so its held-out loss measures what fine-tuning
taught, not what pre-training memorised.
"""

from __future__ import annotations

import ast
import json
import os
import textwrap
import warnings
from pathlib import Path

from ..data import default_corpus_files, document_split

# The default corpus's validation share (`decoderlab.training.loop.DEFAULT_CORPUS_VAL_FRACTION`).
DEFAULT_VAL_FRACTION = 0.02


def _functions(source: str) -> list[dict[str, str]]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid escape sequences in old files
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return []
    lines = source.splitlines(keepends=True)
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.decorator_list:
            continue
        doc = ast.get_docstring(node, clean=True)
        body = node.body[1:]
        if not doc or not body or not isinstance(node.body[0], ast.Expr):
            continue
        header = "".join(lines[node.lineno - 1:node.body[0].lineno - 1])
        if not header.rstrip().endswith(":"):
            continue  # the signature shares a line with something else
        code = "".join(lines[body[0].lineno - 1:node.end_lineno])
        first = doc.splitlines()[0].strip()
        prompt = textwrap.dedent(header) + f'    """{first}"""\n'
        body_text = textwrap.indent(textwrap.dedent(code), "    ")
        out.append({"prompt": prompt, "completion": body_text})
    return out


def docstring_records(files: list[str | os.PathLike] | None = None, val_fraction: float = DEFAULT_VAL_FRACTION,
                      max_chars: int = 600) -> dict[str, list[dict[str, str]]]:
    """{"train": [...], "val": [...]}: the (first docstring line -> body) records of every undecorated function
    in `files` (default: the standard library, as the default corpus), prompt + completion at most `max_chars`
    characters, split by file as `decoderlab train` splits those files."""
    paths = [Path(f) for f in files] if files is not None else default_corpus_files()
    split = document_split(paths, val_fraction)
    out: dict[str, list[dict[str, str]]] = {"train": [], "val": []}
    for path in paths:
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for record in _functions(source):
            if len(record["prompt"]) + len(record["completion"]) <= max_chars:
                out[split[path]].append(record)
    return out


def write_docstrings(out: str | os.PathLike, **kwargs) -> dict[str, int]:
    """Write train.jsonl and val.jsonl under `out`; returns the record counts."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, records in docstring_records(**kwargs).items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        counts[name] = len(records)
    return counts
