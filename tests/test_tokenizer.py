"""Tests for decoderlab.tokenizer: training, round trips, folders shared with transformers, chat templates."""

from __future__ import annotations

import json
import tempfile
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import decoderlab.tokenizer as tokenizer_module
from decoderlab.errors import UserError
from decoderlab.tokenizer import Tokenizer

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared/data/tinyshakespeare.txt"
needs_shakespeare = pytest.mark.skipif(
    not SHAKESPEARE.is_file(), reason=f"shared corpus not found at {SHAKESPEARE}"
)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hello, world!"},
    {"role": "assistant", "content": "Hi."},
    {"role": "user", "content": "Bye"},
]

# An alphabet with the characters that break naive char tokenizers: whitespace of every kind, a regex
# metacharacter, a combining accent, a character outside the BMP and a NUL.
ODD_ALPHABET = "ab .\n\r\t\u2028\u00a0\u0301é😀\x00\\$<|>"

# A few stdlib sources: a varied, always-present corpus for BPE.
STDLIB_FILES = [Path(json.__file__), Path(tempfile.__file__), Path(textwrap.__file__)]


def _assert_one_line_user_error(excinfo: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert isinstance(excinfo.value, UserError)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


@pytest.fixture(scope="module")
def char_tok() -> Tokenizer:
    return Tokenizer.train_char(texts=[ODD_ALPHABET])


@pytest.fixture(scope="module")
def bpe_tok() -> Tokenizer:
    return Tokenizer.train_bpe(files=STDLIB_FILES, vocab_size=500)


# ---------------------------------------------------------------- char-level


@needs_shakespeare
def test_char_tinyshakespeare_matches_nanogpt() -> None:
    tok = Tokenizer.train_char(files=[SHAKESPEARE])
    text = SHAKESPEARE.read_text(encoding="utf-8")
    stoi = {ch: i for i, ch in enumerate(sorted(set(text)))}
    assert tok.vocab_size == len(tok) == 65 == len(stoi)
    assert tok.special_tokens == {} and tok.bos_id is None and tok.eos_id is None and tok.pad_id is None
    piece = text[10_000:60_000]
    ids = tok.encode(piece)
    assert ids == [stoi[ch] for ch in piece]
    assert tok.decode(ids) == piece
    assert all(tok.id_to_token(i) == ch for ch, i in stoi.items())


def test_char_ids_sorted_and_specials_after() -> None:
    tok = Tokenizer.train_char(texts=["cab", "ba\n"], special_tokens=["<unk>", "<|endoftext|>"])
    assert [tok.token_to_id(c) for c in "\nabc"] == [0, 1, 2, 3]
    assert tok.token_to_id("<unk>") == 4 and tok.token_to_id("<|endoftext|>") == 5
    assert tok.special_tokens == {
        "unk_token": "<unk>",
        "bos_token": "<|endoftext|>",
        "eos_token": "<|endoftext|>",
    }
    assert tok.eos_id == tok.bos_id == 5 and tok.unk_id == 4
    # Unseen characters map to <unk> when there is one; special tokens in the text stay one id.
    assert tok.encode("az<|endoftext|>") == [1, 4, 5]
    assert tok.decode([1, 4, 5], skip_special_tokens=True) == "a"
    assert tok.decode([1, 4, 5]) == "a<unk><|endoftext|>"


def test_char_streams_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = ("é😀 line one\r\n" * 50) + "tail without newline ✓" * 20
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8", newline="")
    # Tiny chunks: pieces end mid-line and next to multi-byte characters, and very long "lines" get cut.
    monkeypatch.setattr(tokenizer_module, "_CHUNK_CHARS", 7)
    pieces = list(tokenizer_module._iter_file_text(path))
    assert "".join(pieces) == text and len(pieces) > 10
    from_file = Tokenizer.train_char(files=[path])
    from_text = Tokenizer.train_char(texts=text)
    assert from_file.backend.get_vocab() == from_text.backend.get_vocab()
    assert from_file.token_to_id("\r") is not None
    assert from_file.decode(from_file.encode(text)) == text


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet=ODD_ALPHABET, max_size=200))
def test_char_round_trip(char_tok: Tokenizer, text: str) -> None:
    ids = char_tok.encode(text)
    assert len(ids) == len(text)
    assert char_tok.decode(ids) == text


def test_char_unknown_character_raises(char_tok: Tokenizer) -> None:
    with pytest.raises(UserError) as excinfo:
        char_tok.encode("abZ")
    _assert_one_line_user_error(excinfo, "'Z'", "U+005A", "<unk>")
    with pytest.raises(UserError) as excinfo:
        char_tok.encode_batch(["ab", "aQ"])
    _assert_one_line_user_error(excinfo, "text #1", "'Q'")


def test_char_rejects_bad_training_input(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="needs training data"):
        Tokenizer.train_char()
    with pytest.raises(UserError, match="no characters"):
        Tokenizer.train_char(texts=[""])
    with pytest.raises(UserError, match="not found"):
        Tokenizer.train_char(files=[tmp_path / "nope.txt"])
    with pytest.raises(UserError, match="single characters"):
        Tokenizer.train_char(texts=["abc"], special_tokens=["a"])
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(UserError, match="not UTF-8"):
        Tokenizer.train_char(files=[tmp_path / "latin1.txt"])


# ---------------------------------------------------------------- byte-level BPE


def test_bpe_basics(bpe_tok: Tokenizer) -> None:
    assert bpe_tok.vocab_size == 500
    assert bpe_tok.token_to_id("<|endoftext|>") == 0
    assert bpe_tok.bos_id == bpe_tok.eos_id == 0 and bpe_tok.pad_id is None
    ids = bpe_tok.encode("import json\n")
    # Merges learnt from Python source make common words shorter than their bytes.
    assert len(ids) < len("import json\n")
    assert bpe_tok.encode_batch(["import json\n", "x"]) == [ids, bpe_tok.encode("x")]
    assert bpe_tok.decode_batch([ids, []]) == ["import json\n", ""]
    assert bpe_tok.encode("a<|endoftext|>b")[1] == 0


def test_bpe_trains_from_texts_and_files_alike() -> None:
    texts = [f.read_text(encoding="utf-8") for f in STDLIB_FILES]
    from_texts = Tokenizer.train_bpe(texts=texts, vocab_size=400)
    from_both = Tokenizer.train_bpe(files=STDLIB_FILES[:1], texts=texts[1:], vocab_size=400)
    assert from_texts.vocab_size == from_both.vocab_size == 400
    sample = texts[0][:2000]
    assert from_texts.decode(from_texts.encode(sample)) == sample
    assert from_both.decode(from_both.encode(sample)) == sample


def test_bpe_rejects_tiny_vocab() -> None:
    with pytest.raises(UserError, match="too small"):
        Tokenizer.train_bpe(texts=["abc"], vocab_size=200)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_bpe_round_trip_any_unicode(bpe_tok: Tokenizer, text: str) -> None:
    assert bpe_tok.decode(bpe_tok.encode(text)) == text


def test_decode_checks_ids(bpe_tok: Tokenizer) -> None:
    torch = pytest.importorskip("torch")
    ids = bpe_tok.encode("hello world")
    assert bpe_tok.decode(torch.tensor(ids)) == "hello world"
    assert bpe_tok.decode_batch(torch.tensor([ids, ids])) == ["hello world"] * 2
    with pytest.raises(UserError, match="out of range"):
        bpe_tok.decode([1, 500])
    with pytest.raises(UserError, match="out of range"):
        bpe_tok.decode([-1])
    with pytest.raises(TypeError):
        bpe_tok.decode(5)  # type: ignore[arg-type]
    assert bpe_tok.id_to_token(10**6) is None and bpe_tok.token_to_id("no such token") is None


# ---------------------------------------------------------------- folders


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_save_load_round_trip_and_transformers_parity(
    kind: str, char_tok: Tokenizer, bpe_tok: Tokenizer, tmp_path: Path
) -> None:
    tok = Tokenizer(char_tok.backend) if kind == "char" else bpe_tok
    tok = Tokenizer(tok.backend, dict(tok.special_tokens), chat_template=CHATML, model_max_length=256)
    sample = ODD_ALPHABET * 3 if kind == "char" else "Grüße, 世界! 😀\n\tdef f(x): return x  <|endoftext|>"
    tok.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]

    for source in (tmp_path, tmp_path / "tokenizer.json"):
        loaded = Tokenizer.from_folder(source)
        assert loaded.encode(sample) == tok.encode(sample)
        assert loaded.special_tokens == tok.special_tokens
        assert loaded.vocab_size == tok.vocab_size
        assert loaded.chat_template == CHATML and loaded.model_max_length == 256

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ids = hf.encode(sample, add_special_tokens=False)
    assert ids == tok.encode(sample)
    assert hf.decode(ids) == tok.decode(ids) == sample
    assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special_tokens=True)
    assert len(hf) == tok.vocab_size
    assert hf.eos_token_id == tok.eos_id and hf.bos_token_id == tok.bos_id
    assert hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True) == (
        tok.apply_chat_template(MESSAGES)
    )


def test_save_is_atomic_and_clears_stale_templates(bpe_tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "chat_template.jinja").write_text("stale", encoding="utf-8")
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "rag.jinja").write_text("stale", encoding="utf-8")
    bpe_tok.save(tmp_path / ".")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    loaded = Tokenizer.from_folder(tmp_path)
    assert loaded.chat_template is None and loaded.extra_chat_templates == {}
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == "<|endoftext|>" and "chat_template" not in config


def test_loads_folder_written_by_transformers(bpe_tok: Tokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    bpe_tok.save(tmp_path / "ours")
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(tmp_path / "ours" / "tokenizer.json"),
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )
    hf.save_pretrained(str(tmp_path / "theirs"))
    loaded = Tokenizer.from_folder(tmp_path / "theirs")
    assert loaded.special_tokens["eos_token"] == "<|endoftext|>"
    assert loaded.pad_id == loaded.eos_id == 0
    assert loaded.chat_template == CHATML
    assert loaded.encode("some text") == bpe_tok.encode("some text")


# ---------------------------------------------------------------- chat templates


def _chat_folder(tmp_path: Path, tok: Tokenizer, config: dict) -> Path:
    tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return tmp_path


def test_chat_template_from_config_matches_transformers(bpe_tok: Tokenizer, tmp_path: Path) -> None:
    # Indented block tags and newlines after them: trim_blocks and lstrip_blocks must remove both.
    template = (
        "{{ bos_token }}{% for m in messages %}\n"
        "  {% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}\n"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}\n"
        "    {% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}"
    )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # Older transformers wrote special tokens as AddedToken dicts.
        "bos_token": {"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": False, "special": True},
        "eos_token": "<|endoftext|>",
        "chat_template": template,
    }
    folder = _chat_folder(tmp_path, bpe_tok, config)
    tok = Tokenizer.from_folder(folder)
    rendered = tok.apply_chat_template(MESSAGES[:2])
    assert rendered == (
        "<|endoftext|><|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nHello, world!<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tok.apply_chat_template(MESSAGES[:2], add_generation_prompt=False) == rendered.removesuffix(
        "<|im_start|>assistant\n"
    )
    with pytest.raises(UserError) as excinfo:
        tok.apply_chat_template([{"role": "tool", "content": "x"}])
    _assert_one_line_user_error(excinfo, "no tools here")

    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    for add in (True, False):
        assert hf.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=add) == (
            tok.apply_chat_template(MESSAGES, add_generation_prompt=add)
        )


def test_chat_template_list_form_and_jinja_file(bpe_tok: Tokenizer, tmp_path: Path) -> None:
    config = {
        "eos_token": "<|endoftext|>",
        "chat_template": [
            {"name": "default", "template": CHATML},
            {
                "name": "terse",
                "template": "{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}",
            },
        ],
    }
    folder = _chat_folder(tmp_path, bpe_tok, config)
    tok = Tokenizer.from_folder(folder)
    assert tok.chat_template == CHATML and set(tok.extra_chat_templates) == {"terse"}
    assert tok.apply_chat_template(MESSAGES[1:2], template_name="terse") == "Hello, world!<|endoftext|>"
    with pytest.raises(UserError, match="no chat template named"):
        tok.apply_chat_template(MESSAGES, template_name="missing")

    # Saving keeps both templates; transformers reads the list form too.
    tok.save(tmp_path / "resaved")
    again = Tokenizer.from_folder(tmp_path / "resaved")
    assert again.chat_template == CHATML and again.extra_chat_templates == tok.extra_chat_templates

    # As in transformers, a chat_template.jinja file wins over the config's template.
    (folder / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    tok = Tokenizer.from_folder(folder)
    assert tok.apply_chat_template(MESSAGES) == "You are terse."


def test_no_chat_template_raises(bpe_tok: Tokenizer) -> None:
    with pytest.raises(UserError) as excinfo:
        bpe_tok.apply_chat_template(MESSAGES)
    _assert_one_line_user_error(excinfo, "no chat template", "tokenizer.chat_template =")


def test_bad_chat_template_syntax_raises(bpe_tok: Tokenizer) -> None:
    tok = Tokenizer(bpe_tok.backend, chat_template="{% for m in messages %}")
    with pytest.raises(UserError) as excinfo:
        tok.apply_chat_template(MESSAGES)
    _assert_one_line_user_error(excinfo, "does not parse")


# ---------------------------------------------------------------- bad folders


def test_missing_folder_raises(tmp_path: Path) -> None:
    with pytest.raises(UserError) as excinfo:
        Tokenizer.from_folder(tmp_path / "nowhere")
    _assert_one_line_user_error(excinfo, "not found", "nowhere")


def test_folder_without_tokenizer_json_raises(tmp_path: Path) -> None:
    with pytest.raises(UserError) as excinfo:
        Tokenizer.from_folder(tmp_path)
    _assert_one_line_user_error(excinfo, "no tokenizer.json", str(tmp_path))
    (tmp_path / "tokenizer.model").write_bytes(b"")
    with pytest.raises(UserError) as excinfo:
        Tokenizer.from_folder(tmp_path)
    _assert_one_line_user_error(excinfo, "tokenizer.model", "save_pretrained")


def test_corrupt_files_raise(bpe_tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(UserError) as excinfo:
        Tokenizer.from_folder(tmp_path)
    _assert_one_line_user_error(excinfo, "cannot load")
    bpe_tok.save(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2", encoding="utf-8")
    with pytest.raises(UserError) as excinfo:
        Tokenizer.from_folder(tmp_path)
    _assert_one_line_user_error(excinfo, "not valid JSON")


def test_bare_tokenizer_json_guesses_roles(bpe_tok: Tokenizer, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(bpe_tok.backend.to_str(), encoding="utf-8")
    tok = Tokenizer.from_folder(tmp_path / "tokenizer.json")
    assert tok.eos_id == 0 and tok.chat_template is None
    assert "BPE" in repr(tok) and "vocab_size=500" in repr(tok)


def test_chat_template_generation_tag_and_extra_variables(bpe_tok: Tokenizer) -> None:
    # `{% generation %}` comes from Hub templates that mark assistant turns; extra kwargs reach the template.
    template = (
        "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}|{% endfor %}"
        "{{ greeting }}{{ tools is none }}"
    )
    tok = Tokenizer(bpe_tok.backend, chat_template=template)
    assert tok.apply_chat_template(MESSAGES[1:3], greeting="!") == "Hello, world!|Hi.|!True"
