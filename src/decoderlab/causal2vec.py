"""Causal2Vec: a trained sentence-embedding head for a decoder-only `Transformer` (PAPERS.md, "Causal2Vec").

A small bidirectional encoder (a few blocks of our own `Transformer`, causal mask lifted: padding mask only)
reads the text and is mean-pooled into ONE vector; an MLP projects it to the decoder's width, and it goes into
the decoder's input as a "contextual token" before the text (after any BOS). The decoder keeps its causal mask,
so every text token sees a summary of the whole text. The embedding is the concatenation of the final hidden
states of the contextual token and of the last token (the EOS when the tokenizer has one) [N, 2 d].

`train_causal2vec` fits the head with in-batch InfoNCE on (query, document) pairs, the decoder frozen (default)
or with LoRA adapters (`decoderlab.lora.apply_lora`, put on the decoder in place); `save_causal2vec` /
`load_causal2vec` write and read the head as a folder (safetensors + json, each file atomic);
`decoderlab.embed(model, texts, tok, pooling="causal2vec", head=...)` embeds with it. `function_pairs` makes
training pairs without a download: docstring <-> function body from the standard library, with a file-level
train / eval split (`corpus_split`) so that evaluation pairs are never trained on.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import sysconfig
import textwrap
import time as _time
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_bytes
from torch import nn

from . import masks
from .atomic import atomic_write, atomic_write_text
from .config import ModelConfig
from .errors import CheckpointError, UserError
from .lora import LoraConfig, apply_lora, has_lora, load_adapter, lora_parameters, save_adapter
from .model import Transformer
from .tokenizer import Tokenizer

HEAD_CONFIG = "causal2vec.json"
HEAD_WEIGHTS = "head.safetensors"
ADAPTER_FOLDER = "adapter"
FORMAT = "decoderlab-causal2vec-1"
# One file in five is held out (by a hash of its path): its pairs are the evaluation set, never trained on.
EVAL_BUCKETS, EVAL_MODULUS = 1, 5


# ----------------------------------------------------------------------------------------------- training pairs

def corpus_split(path: str | Path, root: str | Path | None = None) -> str:
    """"train" or "eval" for a source file, fixed by a hash of its path relative to `root` (default: the stdlib),
    so the split is the same on every machine and run, and whole files (not pairs) are held out."""
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    try:
        rel = Path(path).relative_to(root).as_posix()
    except ValueError:
        rel = Path(path).as_posix()
    return "eval" if zlib.crc32(rel.encode()) % EVAL_MODULUS < EVAL_BUCKETS else "train"


def function_pairs(files: Iterable[str | Path] | None = None, split: str | None = None,
                   min_doc_words: int = 3, root: str | Path | None = None) -> Iterator[tuple[str, str]]:
    """(docstring, body without the docstring) of each documented function with two or more further statements.

    files: Python sources; None = the default corpus (the standard library, `decoderlab.data.default_corpus_files`).
    split: "train" or "eval" keeps the files `corpus_split` (paths relative to `root`, default the stdlib) puts
    there; None keeps all. The query is the
    docstring with whitespace collapsed; the document the lines after it up to the function's end, dedented.
    """
    if split not in (None, "train", "eval"):
        raise UserError(f"split must be 'train', 'eval' or None, got {split!r}")
    if files is None:
        from .data import default_corpus_files

        files = default_corpus_files()
    for path in sorted((Path(f) for f in files), key=str):
        if split is not None and corpus_split(path, root) != split:
            continue
        source = path.read_text(encoding="utf-8", errors="replace")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences and the like in old files
                tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        lines = source.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or len(node.body) < 3:
                continue
            doc = ast.get_docstring(node, clean=True)
            first, second = node.body[0], node.body[1]
            if not doc or second.lineno <= first.end_lineno:  # no docstring, or code on its last line
                continue
            query = " ".join(doc.split())
            # The lines after the docstring's last line, up to the function's end (comments and decorators kept).
            body = textwrap.dedent("\n".join(lines[first.end_lineno:node.end_lineno])).strip()
            if len(query.split()) >= min_doc_words and len(body) >= 20:
                yield query, body


# ------------------------------------------------------------------------------------------------------ the head

@dataclass
class Causal2VecConfig:
    """Shape and training settings of a Causal2Vec head.

    encoder_layers: blocks of the bidirectional encoder. encoder_width: its width; None = the decoder's, and then
    the encoder starts as a copy of the decoder's embeddings and first `encoder_layers` blocks (a warm start that
    already reads the tokens), else it starts random. max_tokens: texts are cut to this many tokens.
    decoder_tokens: the decoder reads only the first this-many of them (the encoder reads all): the paper's
    shortening of the decoder's input, cheaper to train and run; None = the decoder reads the whole text.
    temperature: InfoNCE's. lora_r > 0 trains LoRA adapters (rank r, `lora_alpha`)
    on the decoder's attention too. The `base_*` fields record the decoder the head was trained on.
    """

    encoder_layers: int = 2
    encoder_width: int | None = None
    encoder_heads: int | None = None
    max_tokens: int = 128
    decoder_tokens: int | None = None
    temperature: float = 0.05
    lora_r: int = 0
    lora_alpha: float = 16.0
    base_model: str | None = None
    base_width: int = 0
    base_vocab: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("encoder_layers", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"causal2vec {name} must be a positive integer, got {value!r}")
        if self.decoder_tokens is not None and (isinstance(self.decoder_tokens, bool) or
                                                not isinstance(self.decoder_tokens, int) or self.decoder_tokens < 1):
            raise UserError(f"causal2vec decoder_tokens must be a positive integer or None, got "
                            f"{self.decoder_tokens!r}")
        if self.encoder_width is not None and (not isinstance(self.encoder_width, int) or self.encoder_width < 1):
            raise UserError(f"causal2vec encoder_width must be a positive integer, got {self.encoder_width!r}")
        if not isinstance(self.temperature, int | float) or not self.temperature > 0:
            raise UserError(f"causal2vec temperature must be > 0, got {self.temperature!r}")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 0:
            raise UserError(f"causal2vec lora_r must be 0 (frozen decoder) or a positive rank, got {self.lora_r!r}")


class Causal2Vec(nn.Module):
    """The trained part: `encoder` (a bidirectional `Transformer`) and `projection` (MLP to the decoder's width).

    `Causal2Vec.for_decoder(model, config)` makes a fresh one; `embed_ids` runs it with a decoder.
    """

    def __init__(self, encoder_config: ModelConfig, config: Causal2VecConfig) -> None:
        super().__init__()
        if config.base_width < 1 or config.base_vocab < 1:
            raise UserError("a Causal2Vec head needs its decoder's width and vocabulary (base_width, base_vocab)")
        self.config = config
        self.encoder = Transformer(encoder_config)
        d_enc, d_dec = encoder_config.d_model, config.base_width
        self.projection = nn.Sequential(nn.Linear(d_enc, d_dec), nn.GELU(), nn.Linear(d_dec, d_dec))

    @classmethod
    def for_decoder(cls, model: Transformer, config: Causal2VecConfig | None = None,
                    base_model: str | None = None) -> Causal2Vec:
        """A fresh head for `model` (seed torch for a reproducible start)."""
        config = dataclasses.replace(config or Causal2VecConfig(), base_width=model.config.d_model,
                                     base_vocab=model.config.vocab_size,
                                     base_model=base_model if base_model is not None else
                                     (config.base_model if config else None))
        dc = model.config
        if config.max_tokens + 3 > dc.context_length:  # BOS, contextual token and EOS around the text
            raise UserError(f"causal2vec max_tokens {config.max_tokens} does not fit the decoder's context "
                            f"{dc.context_length} (3 slots go to BOS, the contextual token and EOS); lower it")
        # The encoder is the decoder's architecture, shallower, tied (no separate LM head), without the decoder's
        # windows, future heads or HF family; the same vocabulary (it reads the same tokenizer's ids).
        enc = dc.replace(n_layers=config.encoder_layers, n_future=0, dropout=0.0, hf_family=None,
                         sliding_window=None, sliding_layers=None, tie_embeddings=True, logit_softcap=None,
                         bos_token_id=None, eos_token_id=None)
        warm = config.encoder_width is None or config.encoder_width == dc.d_model
        if not warm:
            heads = config.encoder_heads or max(1, config.encoder_width // 64)
            if config.encoder_width % heads:
                raise UserError(f"causal2vec encoder_width {config.encoder_width} is not divisible by "
                                f"{heads} heads; set encoder_heads")
            enc = enc.replace(d_model=config.encoder_width, n_heads=heads, n_kv_heads=None, head_dim=None,
                              d_mlp=None)
        head = cls(enc, config).to(model.device)
        if warm:
            if config.encoder_layers > dc.n_layers:
                raise UserError(f"causal2vec encoder_layers {config.encoder_layers} is more than the decoder's "
                                f"{dc.n_layers} blocks it starts from; lower it or set encoder_width")
            own = head.encoder.state_dict()
            copied = {k: v for k, v in model.state_dict().items() if k in own and own[k].shape == v.shape}
            head.encoder.load_state_dict(copied, strict=False)
        return head

    def check_decoder(self, model: Transformer) -> None:
        """A one-line UserError if `model` is not a decoder this head fits (width, vocabulary, adapters)."""
        c = self.config
        if model.config.d_model != c.base_width or model.config.vocab_size != c.base_vocab:
            raise UserError(f"this Causal2Vec head was trained for a decoder of width {c.base_width} and vocabulary "
                            f"{c.base_vocab} ({c.base_model or 'unknown path'}), not {model.config.d_model} / "
                            f"{model.config.vocab_size}; use its base model or train a head for this one")
        if c.lora_r and not has_lora(model):
            raise UserError("this Causal2Vec head trained LoRA adapters on the decoder, which this model lacks; "
                            "load the head with decoderlab.load_causal2vec(folder, model) to put them on")

    def contextual(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """The contextual token [B, decoder width]: the encoder's mean final state over each row, projected."""
        ids, valid, positions, _ = _pad(rows, self.projection[0].weight.device, "right")
        out = self.encoder(ids, positions=positions, mask=masks.padding(valid), hidden_states=True, logits_to_keep=1)
        h = out.hidden_states[-1].float()
        w = valid.float()[..., None]
        return self.projection((h * w).sum(1) / w.sum(1))

    def embed_ids(self, model: Transformer, rows: Sequence[Sequence[int]], bos: Sequence[int] = (),
                  eos: Sequence[int] = (), padding_side: str = "left") -> torch.Tensor:
        """Unnormalised embeddings [B, 2 d] of token rows (already cut to `max_tokens`): gradients flow to the
        head (and adapters) when enabled. The decoder reads bos + [contextual token] + row + eos."""
        device = model.device
        ctx = self.contextual(rows)
        slot = len(bos)
        cut = self.config.decoder_tokens
        # Id 0 in the contextual slot: its embedding is replaced.
        full = [[*bos, 0, *(r if cut is None else r[:cut]), *eos] for r in rows]
        ids, valid, positions, offset = _pad(full, device, padding_side)
        b = torch.arange(len(rows), device=device)
        x = model.embed(ids)
        x = x.index_put((b, offset + slot), ctx.to(x.dtype))  # out of place: autograd reaches the projection
        if model.pos_embed is not None:
            x = x + model.pos_embed(positions)
        out = model(None, positions=positions, mask=masks.causal() & masks.padding(valid), residual=x,
                    hidden_states=True, logits_to_keep=1)
        h = out.hidden_states[-1].float()
        last = offset + valid.sum(1) - 1
        return torch.cat([h[b, offset + slot], h[b, last]], dim=-1)


def _pad(rows: Sequence[Sequence[int]], device: torch.device,
         side: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, valid, positions, offset) of padded rows; positions count real tokens only, so a row gets the same
    positions (and vector) whatever batch it is in."""
    lengths = torch.tensor([len(r) for r in rows], device=device)
    T = int(lengths.max())
    offset = T - lengths if side == "left" else torch.zeros_like(lengths)
    slot = torch.arange(T, device=device)
    valid = (slot >= offset[:, None]) & (slot < (offset + lengths)[:, None])
    ids = torch.zeros(len(rows), T, dtype=torch.long, device=device)
    ids[valid] = torch.tensor([t for r in rows for t in r], dtype=torch.long, device=device)
    positions = (valid.long().cumsum(-1) - 1).clamp(min=0)
    return ids, valid, positions, offset


def _special(tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
    """(BOS ids, EOS ids) around every text: what the tokenizer puts before a text, and its EOS if it has one."""
    bos = list(tokenizer.added_tokens[0])
    return bos, ([] if tokenizer.eos_id is None else [tokenizer.eos_id])


def token_rows(tokenizer: Tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Each text's own tokens (no special tokens), cut to `max_tokens`."""
    return [tokenizer.encode(t, add_special_tokens=False)[:max_tokens] for t in texts]


def embed_texts(head: Causal2Vec, model: Transformer, texts: Sequence[str], tokenizer: Tokenizer,
                batch_size: int = 32, padding_side: str = "left", normalize: bool = True) -> torch.Tensor:
    """Causal2Vec embeddings [N, 2 d] (float32) of `texts`; `decoderlab.embed(..., pooling="causal2vec")` calls
    this. Texts are cut to the head's `max_tokens`."""
    head.check_decoder(model)
    rows = token_rows(tokenizer, texts, head.config.max_tokens)
    for i, r in enumerate(rows):
        if not r:
            raise UserError(f"text #{i} has no tokens; there is nothing to embed")
    bos, eos = _special(tokenizer)
    out = []
    was_training = (model.training, head.training)
    model.eval()
    head.eval()
    try:
        with torch.no_grad():
            for s in range(0, len(rows), batch_size):
                out.append(head.embed_ids(model, rows[s:s + batch_size], bos, eos, padding_side))
    finally:
        model.train(was_training[0])
        head.train(was_training[1])
    emb = torch.cat(out).float()
    return F.normalize(emb, dim=-1) if normalize else emb


def resolve_head(head: Causal2Vec | str | Path | None, model: Transformer) -> Causal2Vec:
    """The head `embed` uses: a `Causal2Vec`, or a folder `save_causal2vec` wrote (loaded onto `model`)."""
    if head is None:
        raise UserError("pooling 'causal2vec' needs a trained head: pass head=<folder or Causal2Vec> "
                        "(train one with decoderlab.train_causal2vec or `decoderlab embed-train`)")
    if isinstance(head, str | Path):
        return load_causal2vec(head, model)
    if not isinstance(head, Causal2Vec):
        raise UserError(f"head must be a Causal2Vec or a folder path, got {type(head).__name__}")
    return head


# -------------------------------------------------------------------------------------------------------- training

def info_nce(queries: torch.Tensor, documents: torch.Tensor, temperature: float = 0.05) -> torch.Tensor:
    """In-batch InfoNCE: cross-entropy of query i picking document i among the batch's documents, by cosine
    similarity / temperature; mean over queries."""
    q, d = F.normalize(queries.float(), dim=-1), F.normalize(documents.float(), dim=-1)
    logits = q @ d.T / temperature
    return F.cross_entropy(logits, torch.arange(len(q), device=q.device))


@dataclass
class Causal2VecResult:
    """What `train_causal2vec` returns: the trained head, the loss of every step, steps taken, seconds spent."""

    head: Causal2Vec
    losses: list[float]
    steps: int
    seconds: float
    pairs: int


def train_causal2vec(model: Transformer, tokenizer: Tokenizer, pairs: Sequence[tuple[str, str]],
                     config: Causal2VecConfig | None = None, *, steps: int | None = None,
                     time: str | float | None = None, batch_size: int = 32, lr: float = 1e-3,
                     weight_decay: float = 0.01, seed: int = 0, bf16: bool = False, base_model: str | None = None,
                     head: Causal2Vec | None = None, out: str | Path | None = None,
                     progress: bool = False) -> Causal2VecResult:
    """Train a Causal2Vec head for `model` on (query, document) `pairs` with in-batch InfoNCE and AdamW.

    The budget is `steps` and/or `time` ("90s", "3m" or seconds), whichever ends first (200 steps if neither).
    The decoder is frozen; with `config.lora_r > 0` LoRA adapters are put on it in place and trained too.
    Pairs with a character the tokenizer cannot encode are skipped. `bf16`: CPU/GPU autocast. `out`: the head
    is saved there at the end (`save_causal2vec`). `head`: continue training that head instead of a fresh one.
    """
    from .training.config import parse_duration

    config = config or Causal2VecConfig()
    seconds = parse_duration(time)
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise UserError(f"steps must be a positive integer, got {steps!r}")
    if steps is None and seconds is None:
        steps = 200
    if not isinstance(batch_size, int) or batch_size < 2:
        raise UserError(f"batch_size must be an integer >= 2 (in-batch negatives need company), got {batch_size!r}")
    rows_q, rows_d = [], []
    for q, d in pairs:
        try:
            rq, rd = token_rows(tokenizer, [q, d], config.max_tokens)
        except UserError:  # a character this tokenizer does not know
            continue
        if rq and rd:
            rows_q.append(rq)
            rows_d.append(rd)
    if len(rows_q) < batch_size:
        raise UserError(f"{len(rows_q)} usable pairs is fewer than one batch of {batch_size}; give more pairs "
                        "or a smaller batch_size")
    torch.manual_seed(seed)
    if head is None:
        if config.lora_r and has_lora(model):
            raise UserError("the decoder already has LoRA adapters; load it again without them to train new ones")
        head = Causal2Vec.for_decoder(model, config, base_model)
        if config.lora_r:
            apply_lora(model, LoraConfig(r=config.lora_r, alpha=config.lora_alpha))
    else:
        head.check_decoder(model)
    config = head.config
    adapters = lora_parameters(model) if config.lora_r else []
    model.requires_grad_(False)  # the decoder's own weights stay frozen; only the adapters train on it
    for p in adapters:
        p.requires_grad_(True)
    params = list(head.parameters()) + adapters
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    bos, eos = _special(tokenizer)
    device = model.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    losses: list[float] = []
    model.eval()  # the frozen decoder runs as at inference (no dropout); adapters train through it
    head.train()
    t0 = _time.perf_counter()
    step = 0
    while (steps is None or step < steps) and (seconds is None or _time.perf_counter() - t0 < seconds):
        if len(order) < batch_size:
            order = torch.randperm(len(rows_q), generator=gen).tolist()
        batch, order = order[:batch_size], order[batch_size:]
        with autocast:
            eq = head.embed_ids(model, [rows_q[i] for i in batch], bos, eos)
            ed = head.embed_ids(model, [rows_d[i] for i in batch], bos, eos)
        loss = info_nce(eq, ed, config.temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if progress and (step == 1 or step % 20 == 0):
            print(f"step {step}: loss {loss.item():.4f} ({_time.perf_counter() - t0:.0f}s)", flush=True)
    head.eval()
    result = Causal2VecResult(head, losses, step, _time.perf_counter() - t0, len(rows_q))
    head.config.extra = {"steps": step, "seconds": round(result.seconds, 1), "pairs": len(rows_q),
                         "batch_size": batch_size, "lr": lr, "seed": seed, "bf16": bf16,
                         "final_loss": (sum(losses[-10:]) / len(losses[-10:])) if losses else None}
    if out is not None:
        save_causal2vec(head, out, model)
    return result


# --------------------------------------------------------------------------------------------------- save / load

def save_causal2vec(head: Causal2Vec, folder: str | Path, model: Transformer | None = None) -> Path:
    """Write the head to `folder`: head.safetensors (encoder + projection), adapter/ (the decoder's LoRA adapters,
    PEFT's layout, when it has them; `model` is then needed) and causal2vec.json (settings, the encoder's config,
    the base model's path and shape), the json last. Each file is replaced atomically."""
    folder = Path(folder)
    if head.config.lora_r and (model is None or not has_lora(model)):
        raise UserError("this head trains LoRA adapters on the decoder: pass the adapted decoder as model= to "
                        "save them")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CheckpointError(f"cannot create {folder} ({e.strerror}); choose a writable folder") from None
    state = {k: v.detach().contiguous() for k, v in head.state_dict().items() if k != "encoder.lm_head.weight"}
    data = safetensors_bytes(state, metadata={"format": "pt"})
    meta = {"format": FORMAT, "config": dataclasses.asdict(head.config),
            "encoder": head.encoder.config.to_dict()}
    try:
        atomic_write(folder / HEAD_WEIGHTS, lambda f: f.write(data))
        if head.config.lora_r:
            save_adapter(model, folder / ADAPTER_FOLDER, head.config.base_model)
        atomic_write_text(folder / HEAD_CONFIG, json.dumps(meta, indent=2) + "\n")
    except OSError as e:
        raise CheckpointError(f"could not save the Causal2Vec head to {folder} ({e.strerror or e})") from None
    return folder


def load_causal2vec(folder: str | Path, model: Transformer) -> Causal2Vec:
    """The head saved in `folder`, for decoder `model` (checked: width, vocabulary). A head with LoRA adapters puts
    them on `model` in place (unless it has adapters already)."""
    folder = Path(folder)
    if not (folder / HEAD_CONFIG).is_file() or not (folder / HEAD_WEIGHTS).is_file():
        raise CheckpointError(f"{folder} is not a Causal2Vec head: it needs {HEAD_CONFIG} and {HEAD_WEIGHTS} "
                              "(written by decoderlab.save_causal2vec or `decoderlab embed-train`)")
    try:
        meta = json.loads((folder / HEAD_CONFIG).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{folder / HEAD_CONFIG} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{folder / HEAD_CONFIG} is not a {FORMAT} file")
    try:
        config = Causal2VecConfig(**meta["config"])
        enc = ModelConfig.from_dict(meta["encoder"])
    except (TypeError, KeyError) as e:
        raise CheckpointError(f"{folder / HEAD_CONFIG} has bad settings ({e})") from None
    head = Causal2Vec(enc, config)
    if model.config.d_model != config.base_width or model.config.vocab_size != config.base_vocab:
        head.check_decoder(model)  # raises the one-line width/vocabulary error
    try:
        state = safetensors_load((folder / HEAD_WEIGHTS).read_bytes())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{folder / HEAD_WEIGHTS} is truncated or corrupt ({e}); save it again") from None
    missing, unexpected = head.load_state_dict(state, strict=False)
    if [k for k in missing if k != "encoder.lm_head.weight"] or unexpected:
        raise CheckpointError(f"{folder / HEAD_WEIGHTS} does not match its {HEAD_CONFIG} "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    head.encoder.tie_weights()
    head = head.to(model.device).eval()
    if config.lora_r and not has_lora(model):
        load_adapter(model, folder / ADAPTER_FOLDER)
    head.check_decoder(model)
    return head


def retrieval_mrr(queries: torch.Tensor, documents: torch.Tensor, k: int = 10) -> float:
    """MRR@k of document i for query i among all documents (ties counted against the gold document)."""
    sims = queries @ documents.T
    rank = (sims >= sims.diagonal()[:, None]).sum(1).float()
    return torch.where(rank <= k, 1.0 / rank, torch.zeros_like(rank)).mean().item()


__all__ = ["Causal2Vec", "Causal2VecConfig", "Causal2VecResult", "corpus_split", "embed_texts", "function_pairs",
           "info_nce", "load_causal2vec", "resolve_head", "retrieval_mrr", "save_causal2vec", "token_rows",
           "train_causal2vec"]
