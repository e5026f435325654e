"""Text <-> token ids: a thin wrapper over Hugging Face `tokenizers` that trains char-level and byte-level BPE
vocabularies, loads and saves Hugging Face tokenizer folders, and renders Jinja chat templates.

Folders written by `Tokenizer.save` load with `transformers.AutoTokenizer.from_pretrained`, and folders
written by transformers (`tokenizer.json` + `tokenizer_config.json`) load with `Tokenizer.from_folder`.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from itertools import chain
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import tokenizers
from jinja2 import nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers

from decoderlab.atomic import atomic_write_text
from decoderlab.errors import UserError

__all__ = ["Tokenizer", "SPECIAL_TOKEN_ROLES"]

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"

#: The special-token roles this class tracks, named as in transformers' tokenizer_config.json.
SPECIAL_TOKEN_ROLES = ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token")

# When a trained tokenizer's special tokens carry one of these well-known names they get the role without the
# caller having to say so. "<|endoftext|>" is both bos and eos, as in GPT-2.
_ROLE_GUESSES: dict[str, tuple[str, ...]] = {
    "bos_token": (
        "<|endoftext|>",
        "<s>",
        "<bos>",
        "<|bos|>",
        "[BOS]",
        "<|begin_of_text|>",
        "<|startoftext|>",
    ),
    "eos_token": ("<|endoftext|>", "</s>", "<eos>", "<|eos|>", "[EOS]", "<|end_of_text|>"),
    "pad_token": ("<pad>", "<|pad|>", "[PAD]", "<|padding|>"),
    "unk_token": ("<unk>", "<|unk|>", "[UNK]"),
    "mask_token": ("<mask>", "<|mask|>", "[MASK]"),
}

# transformers writes int(1e30) as model_max_length when the length is unknown.
_UNKNOWN_MAX_LENGTH = 10**29

# Characters per read when streaming training files: bounded memory whatever the file size.
_CHUNK_CHARS = 1 << 20

# The Rust WordLevel model's message when a token is not in the vocabulary and there is no unk token.
_MISSING_UNK = "Missing [UNK] token"

# `[\s\S]` rather than `.`: Oniguruma's `.` does not match "\n", and every character must be its own token.
_EVERY_CHAR = Regex(r"[\s\S]")


def _one_line(message: object) -> str:
    return " ".join(str(message).split())


def _guess_roles(special_tokens: Sequence[str]) -> dict[str, str]:
    roles: dict[str, str] = {}
    for role, names in _ROLE_GUESSES.items():
        found = next((tok for tok in special_tokens if tok in names), None)
        if found is not None:
            roles[role] = found
    return roles


def _check_special_tokens(special_tokens: Iterable[str]) -> list[str]:
    if isinstance(special_tokens, str):
        special_tokens = [special_tokens]
    tokens = list(special_tokens)
    for tok in tokens:
        if not isinstance(tok, str) or not tok:
            raise UserError(f"special tokens must be non-empty strings, got {tok!r}")
    if len(set(tokens)) != len(tokens):
        raise UserError(f"special tokens must be distinct, got {tokens}")
    return tokens


def _check_files(files: str | os.PathLike | Iterable[str | os.PathLike] | None) -> list[Path]:
    if files is None:
        return []
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.exists():
            raise UserError(f"training file not found: {p}")
        if not p.is_file():
            raise UserError(f"training path is not a file: {p}")
    return paths


def _check_texts(texts: Iterable[str] | None) -> Iterable[str] | None:
    # A bare string is an iterable of characters; treating it as one text is what the caller meant.
    if isinstance(texts, str):
        return [texts]
    return texts


def _iter_file_text(path: Path) -> Iterator[str]:
    """Yields a UTF-8 file's text in bounded pieces, cut after a newline where possible (BPE sees words)."""
    carry = ""
    try:
        # newline="": keep "\r\n" as written; the tokenizer sees exactly the file's characters.
        with path.open(encoding="utf-8", newline="") as f:
            while chunk := f.read(_CHUNK_CHARS):
                chunk = carry + chunk
                cut = chunk.rfind("\n") + 1
                if cut == 0 and len(chunk) >= 8 * _CHUNK_CHARS:
                    # A very long line: cut anywhere rather than let the carry grow without bound.
                    cut = len(chunk)
                carry = chunk[cut:]
                if cut:
                    yield chunk[:cut]
    except UnicodeDecodeError as exc:
        raise UserError(f"training file is not UTF-8 text: {path} ({_one_line(exc)})") from None
    if carry:
        yield carry


class _GenerationTag(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (in some Hub templates); renders its body as is."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Same as transformers' override: Jinja's own tojson HTML-escapes, which chat templates must not do.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=16)
def _compile_chat_template(source: str) -> jinja2.Template:
    # The environment mirrors transformers' so templates from the Hub render the same string.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise UserError(
            f"chat template does not parse (line {exc.lineno}): {_one_line(exc.message)}"
        ) from None


def _token_content(value: Any, role: str, source: Path) -> str | None:
    # transformers writes special tokens either as plain strings or as AddedToken dicts.
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise UserError(f"{source}: {role} must be a string or a dict with a 'content' string, got {value!r}")


def _parse_chat_templates(value: Any, source: Path) -> dict[str, str]:
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list):
        try:
            items = [(entry["name"], entry["template"]) for entry in value]
        except (TypeError, KeyError):
            raise UserError(
                f"{source}: chat_template list entries must be {{'name': ..., 'template': ...}}"
            ) from None
    else:
        raise UserError(f"{source}: chat_template must be a string or a list of {{name, template}}")
    for name, template in items:
        if not isinstance(name, str) or not isinstance(template, str):
            raise UserError(f"{source}: chat_template names and templates must be strings")
    return dict(items)


class Tokenizer:
    """A `tokenizers.Tokenizer` plus what transformers keeps beside it: special-token roles, chat templates,
    and the model's maximum length.

    Build one with `train_char`, `train_bpe` or `from_folder`; `save` writes a folder both this class and
    transformers load.
    """

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
        extra_chat_templates: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(backend, tokenizers.Tokenizer):
            raise TypeError(f"backend must be a tokenizers.Tokenizer, got {type(backend).__name__}")
        special_tokens = dict(special_tokens or {})
        unknown = sorted(set(special_tokens) - set(SPECIAL_TOKEN_ROLES))
        if unknown:
            raise UserError(
                f"unknown special-token roles {unknown}; expected some of {list(SPECIAL_TOKEN_ROLES)}"
            )
        self._tk = backend
        #: role ("bos_token", "eos_token", "pad_token", "unk_token", "mask_token") -> token; only the roles present.
        self.special_tokens: dict[str, str] = special_tokens
        #: The Jinja template `apply_chat_template` renders by default; None if the tokenizer has none.
        self.chat_template: str | None = chat_template
        #: Other named templates (e.g. "tool_use", "rag"), as some Hub models ship.
        self.extra_chat_templates: dict[str, str] = dict(extra_chat_templates or {})
        #: The longest sequence the model takes, if known; saved for transformers.
        self.model_max_length: int | None = model_max_length
        self._literal: tokenizers.Tokenizer | None = None  # a copy that reads special-token text as plain text
        self._added: tuple[list[int], list[int]] | None = None

    # ------------------------------------------------------------------ building

    @classmethod
    def train_char(
        cls,
        files: str | os.PathLike | list[str | os.PathLike] | None = None,
        texts: Iterable[str] | None = None,
        special_tokens: Sequence[str] = (),
    ) -> Tokenizer:
        """Character-level vocabulary: one id per distinct character seen, in sorted order (as nanoGPT's
        shakespeare_char), then the special tokens, in the order given.

        With no unk token among `special_tokens`, encoding a character not seen here raises UserError naming
        it; with one ("<unk>", "[UNK]" or "<|unk|>") such characters map to it. Files are streamed in chunks.
        """
        paths = _check_files(files)
        texts = _check_texts(texts)
        if not paths and texts is None:
            raise UserError("train_char needs training data: pass files=[...] or texts=[...]")
        specials = _check_special_tokens(special_tokens)

        chars: set[str] = set()
        for piece in chain(*(_iter_file_text(p) for p in paths), texts or ()):
            if not isinstance(piece, str):
                raise UserError(f"texts must be strings, got {type(piece).__name__}")
            chars.update(piece)
        if not chars:
            raise UserError("train_char found no characters in its training data")

        # A special token that is itself one character would collide with that character's id.
        clash = [tok for tok in specials if tok in chars]
        if clash:
            raise UserError(f"special tokens {clash} are single characters of the training text; rename them")

        vocab = {ch: i for i, ch in enumerate(sorted(chars))}
        for tok in specials:
            vocab[tok] = len(vocab)
        roles = _guess_roles(specials)
        # WordLevel looks unk up in its own vocab, so the unk token lives there too (at its special id).
        # Without one, the model's unk is a name absent from the vocab, so unseen characters raise.
        unk = roles.get("unk_token", "<unk>")
        backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=unk))
        backend.pre_tokenizer = pre_tokenizers.Split(_EVERY_CHAR, behavior="isolated")
        # Fuse joins tokens with nothing between them (the default decoder would join with spaces).
        backend.decoder = decoders.Fuse()
        if specials:
            backend.add_special_tokens(specials)
        return cls(backend, special_tokens=roles)

    @classmethod
    def train_bpe(
        cls,
        files: str | os.PathLike | list[str | os.PathLike] | None = None,
        texts: Iterable[str] | None = None,
        vocab_size: int = 4096,
        special_tokens: Sequence[str] = ("<|endoftext|>",),
        min_frequency: int = 2,
        show_progress: bool = False,
    ) -> Tokenizer:
        """Byte-level BPE as in GPT-2: every UTF-8 string encodes and decodes back exactly, with no unk token.

        `vocab_size` counts the 256 byte tokens, the merges and the special tokens; the special tokens get the
        first ids (0, 1, ...) in the order given. With only `files`, training reads them in Rust (streamed,
        parallel); with `texts` (alone or with files) it goes through an iterator.
        """
        paths = _check_files(files)
        texts = _check_texts(texts)
        if not paths and texts is None:
            raise UserError("train_bpe needs training data: pass files=[...] or texts=[...]")
        specials = _check_special_tokens(special_tokens)
        alphabet = pre_tokenizers.ByteLevel.alphabet()
        if not isinstance(vocab_size, int) or vocab_size < len(alphabet) + len(specials):
            raise UserError(
                f"vocab_size={vocab_size} is too small: byte-level BPE needs at least {len(alphabet)} byte "
                f"tokens + {len(specials)} special tokens = {len(alphabet) + len(specials)}"
            )
        if not isinstance(min_frequency, int) or min_frequency < 1:
            raise UserError(f"min_frequency must be a positive integer, got {min_frequency!r}")

        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=specials,
            initial_alphabet=alphabet,
            show_progress=show_progress,
        )
        try:
            if texts is None:
                backend.train([str(p) for p in paths], trainer)
            else:
                backend.train_from_iterator(chain(*(_iter_file_text(p) for p in paths), texts), trainer)
        except UserError:
            raise
        except Exception as exc:
            # The Rust trainer reports unreadable or non-UTF-8 files as plain Exceptions.
            raise UserError(f"BPE training failed: {_one_line(exc)}") from None
        return cls(backend, special_tokens=_guess_roles(specials))

    @classmethod
    def from_folder(cls, path: str | os.PathLike) -> Tokenizer:
        """Loads a Hugging Face tokenizer folder (`tokenizer.json`, plus `tokenizer_config.json`,
        `chat_template.jinja` and `additional_chat_templates/*.jinja` when present), or a `tokenizer.json`
        file directly, in which case the files beside it are read as for its folder.

        As in transformers, template files take precedence over a `chat_template` in the config. Without a
        config, special-token roles are guessed from well-known names among the tokenizer's special tokens.
        """
        path = Path(path)
        if not path.exists():
            raise UserError(f"tokenizer path not found: {path}")
        if path.is_dir():
            folder, tok_file = path, path / TOKENIZER_FILE
            if not tok_file.is_file():
                raise UserError(f"no {TOKENIZER_FILE} in {folder}{cls._missing_file_hint(folder)}")
        else:
            folder, tok_file = path.parent, path
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as exc:
            raise UserError(f"cannot load {tok_file}: {_one_line(exc)}") from None

        special_tokens: dict[str, str] = {}
        templates: dict[str, str] = {}
        model_max_length: int | None = None
        config_file = folder / CONFIG_FILE
        if config_file.is_file():
            try:
                config = json.loads(config_file.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise UserError(f"{config_file} is not valid JSON: {_one_line(exc)}") from None
            if not isinstance(config, dict):
                raise UserError(f"{config_file} must hold a JSON object")
            for role in SPECIAL_TOKEN_ROLES:
                token = _token_content(config.get(role), role, config_file)
                if token is not None:
                    special_tokens[role] = token
            templates = _parse_chat_templates(config.get("chat_template"), config_file)
            mml = config.get("model_max_length")
            if isinstance(mml, (int, float)) and not isinstance(mml, bool) and 0 < mml < _UNKNOWN_MAX_LENGTH:
                model_max_length = int(mml)
        else:
            specials = [t.content for t in backend.get_added_tokens_decoder().values() if t.special]
            special_tokens = _guess_roles(specials)

        file_templates: dict[str, str] = {}
        if (folder / CHAT_TEMPLATE_FILE).is_file():
            file_templates["default"] = (folder / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        if (folder / CHAT_TEMPLATE_DIR).is_dir():
            for f in sorted((folder / CHAT_TEMPLATE_DIR).glob("*.jinja")):
                file_templates[f.stem] = f.read_text(encoding="utf-8")
        if file_templates:
            templates = file_templates

        default = templates.pop("default", None)
        return cls(
            backend,
            special_tokens,
            chat_template=default,
            model_max_length=model_max_length,
            extra_chat_templates=templates,
        )

    @staticmethod
    def _missing_file_hint(folder: Path) -> str:
        slow = [
            name
            for name in ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")
            if (folder / name).exists()
        ]
        if slow:
            return (
                f" (found {', '.join(slow)}: only the fast-tokenizer format is supported; convert once with"
                " transformers: AutoTokenizer.from_pretrained(folder).save_pretrained(folder))"
            )
        return " (expected a Hugging Face tokenizer folder: tokenizer.json, optionally tokenizer_config.json)"

    def save(self, folder: str | os.PathLike) -> Path:
        """Writes `tokenizer.json` and `tokenizer_config.json` into `folder` (created if needed), atomically.

        Chat templates go into the config. A `chat_template.jinja` or `additional_chat_templates/` left in the
        folder by an earlier save would override them when loading, so they are removed. Returns the folder.
        """
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise UserError(f"cannot save tokenizer: {folder} exists and is not a folder") from None
        atomic_write_text(folder / TOKENIZER_FILE, self._tk.to_str(pretty=True))

        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            # Else transformers "cleans up" spaces before punctuation when decoding, which changes the text.
            "clean_up_tokenization_spaces": False,
        }
        config.update(
            {role: self.special_tokens[role] for role in SPECIAL_TOKEN_ROLES if role in self.special_tokens}
        )
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        if self.extra_chat_templates:
            named = {"default": self.chat_template} if self.chat_template is not None else {}
            named.update(self.extra_chat_templates)
            config["chat_template"] = [{"name": n, "template": t} for n, t in named.items()]
        elif self.chat_template is not None:
            config["chat_template"] = self.chat_template
        atomic_write_text(folder / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False) + "\n")

        (folder / CHAT_TEMPLATE_FILE).unlink(missing_ok=True)
        template_dir = folder / CHAT_TEMPLATE_DIR
        if template_dir.is_dir():
            for f in template_dir.glob("*.jinja"):
                f.unlink()
            if not any(template_dir.iterdir()):
                template_dir.rmdir()
        return folder

    # ------------------------------------------------------------------ encoding

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The underlying `tokenizers.Tokenizer`, for what this class does not wrap (offsets, truncation)."""
        return self._tk

    @property
    def vocab_size(self) -> int:
        """Number of tokens, added and special tokens included."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True, split_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`, as transformers' tokenizer gives them for the same folder.

        add_special_tokens: apply tokenizer.json's post-processor (a Llama or Mistral tokenizer's BOS; nothing for
            GPT-2, Qwen2 or the tokenizers trained here). As in transformers 5, tokenizer_config.json's
            add_bos_token / add_eos_token do not override it. Pass False for text that continues other tokens.
        split_special_tokens: read special-token text in `text` (e.g. "<|im_start|>") as plain text instead of as
            the control token, as transformers' flag of that name does: for untrusted input.
        """
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        backend = self._literal_backend() if split_special_tokens else self._tk
        try:
            # encode_batch of one, not encode: it releases the GIL (encode holds it: 1.1 s for 1 MB of text), so
            # a long text tokenized in a worker thread does not stall the other threads (a server's event loop).
            return backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        except Exception as exc:
            error = self._encode_error(text, exc)
            if error is None:
                raise
            raise error from None

    def encode_batch(self, texts: Iterable[str], add_special_tokens: bool = True,
                     split_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of each text (encoded in parallel by the Rust backend); arguments as in `encode`."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of strings; use encode for a single string")
        texts = list(texts)
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"encode_batch takes strings, got {type(t).__name__}")
        backend = self._literal_backend() if split_special_tokens else self._tk
        try:
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
        except Exception as exc:
            # Re-encode one by one to name the text at fault.
            for i, t in enumerate(texts):
                try:
                    backend.encode(t, add_special_tokens=add_special_tokens)
                except Exception as one_exc:
                    error = self._encode_error(t, one_exc)
                    if error is not None:
                        raise UserError(f"text #{i}: {error}") from None
            raise exc from None

    def _literal_backend(self) -> tokenizers.Tokenizer:
        # A second backend rather than toggling the flag on the shared one: encoding may run in several threads.
        if self._literal is None:
            literal = tokenizers.Tokenizer.from_str(self._tk.to_str())
            literal.encode_special_tokens = True
            self._literal = literal
        return self._literal

    @property
    def added_tokens(self) -> tuple[list[int], list[int]]:
        """The ids `encode(text)` puts before and after a text's own tokens (e.g. ([bos], []) for Llama)."""
        if self._added is None:
            sample = next((i for i in range(self.vocab_size) if not self._is_special_id(i)), None)
            if sample is None:
                return [], []
            enc = self._tk.encode(self._tk.decode([sample], skip_special_tokens=False), add_special_tokens=True)
            mask = enc.special_tokens_mask
            ids = enc.ids
            inner = [i for i, m in enumerate(mask) if not m]
            if not inner:
                self._added = (list(ids), [])
            else:
                self._added = (ids[:inner[0]], ids[inner[-1] + 1:])
        return self._added

    def _is_special_id(self, token_id: int) -> bool:
        added = self._tk.get_added_tokens_decoder().get(token_id)
        return added is not None and added.special

    def _encode_error(self, text: str, exc: Exception) -> UserError | None:
        if _MISSING_UNK not in str(exc):
            return None
        unknown = next((ch for ch in text if self._tk.token_to_id(ch) is None), None)
        what = f"character {unknown!r} (U+{ord(unknown):04X})" if unknown is not None else "part of the text"
        return UserError(
            f"{what} is not in this tokenizer's vocabulary of {self.vocab_size} tokens and it has no unk "
            "token; train on text that contains it, or train with special_tokens=['<unk>'] to map unseen "
            "characters to <unk>"
        )

    def _id_list(self, ids: Any) -> list[int]:
        # Tensors and arrays come straight from the model; tokenizers wants a plain list of ints.
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            raise TypeError("decode takes a sequence of ids, not a single id")
        ids = list(ids)
        if not ids:
            return ids
        try:
            lo, hi = min(ids), max(ids)
        except TypeError:
            raise TypeError("decode takes a flat sequence of int ids; use decode_batch for several") from None
        n = self.vocab_size
        if lo < 0 or hi >= n:
            bad = lo if lo < 0 else hi
            # The Rust decoder would silently drop it; a model whose vocab is padded past the tokenizer's can
            # sample such ids, and the caller should mask them rather than lose text.
            raise UserError(f"token id {bad} is out of range for a vocabulary of {n} tokens")
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (a list of ints, or a 1-D tensor / array). Out-of-range ids raise UserError."""
        return self._tk.decode(self._id_list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Iterable[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        """Text of each id sequence (a list of lists, or a 2-D tensor / array)."""
        if hasattr(batch, "tolist"):
            batch = batch.tolist()
        return self._tk.decode_batch(
            [self._id_list(ids) for ids in batch], skip_special_tokens=skip_special_tokens
        )

    def add_special_token(self, token: str, role: str | None = None) -> int:
        """Add `token` as a special token (matched whole in text, never split) unless the vocabulary has it, give
        it `role` (one of SPECIAL_TOKEN_ROLES) if asked, and return its id. A new token takes the next free id."""
        if not isinstance(token, str) or not token:
            raise UserError(f"a special token must be a non-empty string, got {token!r}")
        if role is not None and role not in SPECIAL_TOKEN_ROLES:
            raise UserError(f"unknown special-token role {role!r}; expected one of {list(SPECIAL_TOKEN_ROLES)}")
        if self._tk.token_to_id(token) is None:
            self._tk.add_special_tokens([token])
            self._literal = None  # the cached copies predate the new token
            self._added = None
        if role is not None:
            self.special_tokens[role] = token
        return self._tk.token_to_id(token)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (special tokens included), or None if the vocabulary lacks it."""
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id (byte-level tokens come back in their printable GPT-2 form), or None."""
        return self._tk.id_to_token(token_id)

    def _role_id(self, role: str) -> int | None:
        token = self.special_tokens.get(role)
        return None if token is None else self._tk.token_to_id(token)

    @property
    def bos_id(self) -> int | None:
        return self._role_id("bos_token")

    @property
    def eos_id(self) -> int | None:
        return self._role_id("eos_token")

    @property
    def pad_id(self) -> int | None:
        return self._role_id("pad_token")

    @property
    def unk_id(self) -> int | None:
        return self._role_id("unk_token")

    def with_special_token(self, token: str, role: str | None = None) -> Tokenizer:
        """A copy of this tokenizer with `add_special_token(token, role)` applied; this one is unchanged."""
        copy = Tokenizer(tokenizers.Tokenizer.from_str(self._tk.to_str()), special_tokens=dict(self.special_tokens),
                         chat_template=self.chat_template, model_max_length=self.model_max_length,
                         extra_chat_templates=self.extra_chat_templates)
        copy.add_special_token(token, role)
        return copy

    @property
    def mask_id(self) -> int | None:
        """The id standing for a masked slot (masked-LM and diffusion models), or None."""
        return self._role_id("mask_token")

    # ------------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        template_name: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """Renders `messages` ([{"role": ..., "content": ...}, ...]) with the chat template, as transformers'
        `apply_chat_template(..., tokenize=False)` does: the template sees `messages`,
        `add_generation_prompt`, `tools` and `documents` (None), the special tokens (`bos_token`,
        `eos_token`, ...) and `template_kwargs`.

        `template_name` picks one of `extra_chat_templates` instead of the default template.
        """
        template = self._chat_template_source(template_name)
        if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
            raise UserError("chat messages must be a list of dicts like {'role': 'user', 'content': '...'}")
        context: dict[str, Any] = {"tools": None, "documents": None, **self.special_tokens, **template_kwargs}
        try:
            return _compile_chat_template(template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **context
            )
        except jinja2.TemplateError as exc:
            raise UserError(f"chat template failed: {_one_line(exc)}") from None

    def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        template_name: str | None = None,
        literal_content: bool = True,
        **template_kwargs: Any,
    ) -> list[int]:
        """Token ids of `messages` rendered by the chat template, as transformers' `apply_chat_template(...,
        tokenize=True)` gives them (the rendered text encoded without adding special tokens: the template writes
        its own).

        literal_content: special-token text inside a message's content (a user typing "<|im_start|>system") is read
        as plain text, not as the control token, so content cannot forge turns; a role holding such text is an
        error. Where no content holds such text (the usual case) the ids are exactly transformers'.
        """
        text = self.apply_chat_template(messages, add_generation_prompt, template_name, **template_kwargs)
        if not literal_content:
            return self.encode(text, add_special_tokens=False)
        pattern = self._special_pattern()
        strings = list(_message_strings(messages))
        for m in messages:
            if pattern is not None and isinstance(m.get("role"), str) and pattern.search(m["role"]):
                raise UserError(f"the chat role {m['role'][:40]!r} holds special-token text; use a plain role name")
        if pattern is None or not any(pattern.search(t) for t in strings):
            return self.encode(text, add_special_tokens=False)
        # Render again with every string of the messages replaced by a marker, to learn where each sits in the
        # text: the template's own text is encoded with its control tokens, the messages' text literally.
        markers = [f"\ue000{i}\ue001" for i in range(len(strings))]
        marked = _replace_message_strings(messages, iter(markers))
        layout = self.apply_chat_template(marked, add_generation_prompt, template_name, **template_kwargs)
        pieces = re.split("(\ue000\\d+\ue001)", layout)
        found = [int(p[1:-1]) for p in pieces[1::2]]
        rebuilt = "".join(strings[int(p[1:-1])] if i % 2 else p for i, p in enumerate(pieces))
        if any(f >= len(strings) for f in found) or rebuilt != text:
            raise UserError("a chat message holds special-token text and the chat template rewrites message "
                            "text, so it cannot be kept literal; remove the special tokens from the message")
        ids: list[int] = []
        for i, piece in enumerate(pieces):
            if not piece:
                continue
            if i % 2:
                ids += self.encode(strings[int(piece[1:-1])], add_special_tokens=False, split_special_tokens=True)
            else:
                ids += self.encode(piece, add_special_tokens=False)
        return ids

    def _special_pattern(self) -> re.Pattern | None:
        specials = sorted({t.content for t in self._tk.get_added_tokens_decoder().values() if t.special},
                          key=len, reverse=True)
        return re.compile("|".join(map(re.escape, specials))) if specials else None

    def _chat_template_source(self, template_name: str | None) -> str:
        if template_name is not None and template_name != "default":
            if template_name not in self.extra_chat_templates:
                names = sorted(self.extra_chat_templates) + (["default"] if self.chat_template else [])
                raise UserError(f"no chat template named {template_name!r}; available: {names}")
            return self.extra_chat_templates[template_name]
        if self.chat_template is not None:
            return self.chat_template
        if self.extra_chat_templates:
            raise UserError(
                f"this tokenizer has no default chat template; pick one with template_name= from "
                f"{sorted(self.extra_chat_templates)}"
            )
        raise UserError(
            "this tokenizer has no chat template; set one with tokenizer.chat_template = '<jinja template>' "
            "(or add chat_template to tokenizer_config.json)"
        )

    def __repr__(self) -> str:
        kind = type(self._tk.model).__name__
        extras = ", chat_template=True" if self.chat_template is not None else ""
        return (
            f"Tokenizer(model={kind}, vocab_size={self.vocab_size}, "
            f"special_tokens={self.special_tokens}{extras})"
        )


def _message_strings(messages: list[Mapping[str, Any]]) -> Iterator[str]:
    """The text of every message, in order (text parts of list contents included)."""
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                    yield part["text"]


def _replace_message_strings(messages: list[Mapping[str, Any]], new: Iterator[str]) -> list[dict[str, Any]]:
    """`messages` with the strings `_message_strings` yields replaced, in the same order, by `new`'s."""
    out = []
    for m in messages:
        m = dict(m)
        content = m.get("content")
        if isinstance(content, str):
            m["content"] = next(new)
        elif isinstance(content, list):
            m["content"] = [dict(part, text=next(new)) if isinstance(part, Mapping) and isinstance(
                part.get("text"), str) else part for part in content]
        out.append(m)
    return out
