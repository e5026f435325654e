"""`DecoderlabLM`: decoderlab as an lm-evaluation-harness model, registered with the harness as `decoderlab`.

It implements the harness's three request types with the semantics of its Hugging Face model (`lm_eval.models.
huggingface.HFLM`): the same tokenization of context and continuation (the harness's own `_encode_pair`, the same
BOS rules), the same left truncation to `max_length`, the same rolling windows (`get_rolling_token_windows` /
`make_disjoint_window`), the same greedy flag, the same post-processing of generated text. What differs is how
the work is done:

- loglikelihood: the requests that share a context are packed into one row, the context once and each
  continuation as a branch that sees the context and itself (a tree mask, positions restarting after the
  context), so a multiple-choice question costs one context, not one per choice; the LM head runs only where a
  continuation token is scored. Rows are sorted by length, longest first (as the harness's Collator does), over
  all requests at once (rolling windows included), and batched right-padded.
- generate_until: greedy through `decoderlab.generate` (KV cache, left-padded batches), stopping at the task's
  `until` strings and the end ids.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

try:
    import lm_eval.models  # noqa: F401  (the harness only registers its own models into an empty registry)
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
except ImportError as e:  # pragma: no cover - exercised only without the extra installed
    from ..errors import UserError

    raise UserError(f"lm-eval is not installed ({e.name} missing); install it with: pip install 'decoderlab[eval]'"
                    ) from None

from ..checkpoint import load
from ..errors import UserError
from ..generation import generate
from ..model import Transformer
from ..tokenizer import Tokenizer

__all__ = ["DecoderlabLM"]

# A request as the harness hands it to `_loglikelihood_tokens`: ((context, continuation) strings or None,
# context ids, continuation ids).
TokenRequest = tuple[Any, list[int], list[int]]
# Sampling settings a task's generation_kwargs may carry, besides until / max_gen_toks / do_sample / temperature.
_SAMPLING_KWARGS = ("top_k", "top_p", "min_p", "repetition_penalty", "seed")


class DecoderlabLM(TemplateLM):
    """An lm-eval model over `decoderlab.load(pretrained)` and the folder's tokenizer.

    model_args (as for the harness's `hf` model): `pretrained` (an HF folder or a decoderlab run), `batch_size`
    (rows per forward pass; a row holds one context with all its continuations), `max_length` (default: the
    model's context length), `dtype` (float32 / bfloat16 / float16; default: the checkpoint's), `device`
    (default: cuda if available, else cpu), `add_bos_token`, `prefix_token_id`, `max_gen_toks` (default 256).
    """

    def __init__(self, pretrained: str | None = None, batch_size: int | str = 1, max_length: int | None = None,
                 dtype: str | torch.dtype | None = None, device: str | None = None,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None, max_gen_toks: int = 256,
                 max_batch_size: int | None = None, *, model: Transformer | None = None,
                 tokenizer: Tokenizer | None = None) -> None:
        super().__init__()
        del max_batch_size  # The harness passes it to every model; batch sizes here are fixed.
        if model is None:
            if pretrained is None:
                raise UserError("the decoderlab lm-eval model needs pretrained=FOLDER (an HF folder or a decoderlab "
                                "run)")
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = load(pretrained, device=device, dtype=None if dtype in (None, "auto") else dtype)
        if tokenizer is None:
            if pretrained is None:
                raise UserError("pass tokenizer= with model=, or pretrained=FOLDER holding a tokenizer")
            tokenizer = Tokenizer.from_folder(pretrained)
        self.model = model.eval()
        self.tokenizer_dl = tokenizer
        try:
            self._batch_size = int(batch_size)
        except (TypeError, ValueError):
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r} "
                            "(the decoderlab model has no automatic batch size)") from None
        if self._batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        self._max_length = int(max_length) if max_length else model.config.context_length
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        # A sliding window counts cache slots, which a packed row's branches do not share with their positions:
        # such models score every request in a row of its own.
        self._pack = all(w is None for w in model.config.layer_windows)

    # ------------------------------------------------------------------ what the harness reads

    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer_dl.eos_id
        return eos if eos is not None else self.tokenizer_dl.bos_id

    def _prefix_or_none(self) -> int | None:
        # As HFLM: the given id, else BOS, else EOS is what an empty context is conditioned on.
        if self.custom_prefix_token_id is not None:
            return int(self.custom_prefix_token_id)
        bos = self.tokenizer_dl.bos_id
        return bos if bos is not None else self.eot_token_id

    @property
    def prefix_token_id(self) -> int:
        prefix = self._prefix_or_none()
        if prefix is None:  # e.g. a char-level run: only requests with a context can be scored without one
            raise UserError("this request needs a token to start a text from (a rolling or empty-context request), "
                            "and the tokenizer has neither a BOS nor an EOS token; pass prefix_token_id=ID")
        return prefix

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def tokenizer_name(self) -> str:
        return "decoderlab"

    def get_model_info(self) -> dict:
        return {"model_num_parameters": self.model.num_params(), "model_dtype": str(self.model.dtype)}

    # ------------------------------------------------------------------ tokenization (HFLM's rules)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs: Any) -> list[int]:
        """HFLM's `tok_encode`: add_special_tokens if given, else `add_bos_token` if set, else the tokenizer's
        default; nothing added to a string that already starts with the prefix token's text. As in transformers
        5, `add_bos_token=True` puts a BOS in front where the tokenizer's post-processor adds none."""
        if add_special_tokens is None:
            add = True if self.add_bos_token is None else bool(self.add_bos_token)
            prefix = self._prefix_or_none()
            if prefix is not None and string.startswith(self.tokenizer_dl.decode([prefix])):
                add = False
        else:
            add = add_special_tokens
        ids = self.tokenizer_dl.encode(string, add_special_tokens=add)
        bos = self.tokenizer_dl.bos_id
        if add and self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        if left_truncate_len:
            ids = ids[-left_truncate_len:]
        return ids

    def _encode_prompt(self, string: str) -> list[int]:
        """A generation prompt as HFLM's `tok_batch_encode` encodes it (BOS rule on the tokenizer's bos text)."""
        bos = self.tokenizer_dl.special_tokens.get("bos_token")
        if bos is not None and string.startswith(bos):
            return self.tok_encode(string, add_special_tokens=False)
        return self.tok_encode(string, add_special_tokens=None if self.add_bos_token is None else
                               bool(self.add_bos_token))

    def tok_decode(self, tokens: Iterable[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer_dl.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ loglikelihood

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        """(log-probability of the continuation, whether greedy decoding gives it) per request, in order."""
        # As HFLM: the model reads (context + continuation)[-(max_length + 1):][:-1] and scores the continuation.
        rows: dict[tuple[int, ...], dict[tuple[int, ...], list[int]]] = {}
        solo: list[tuple[tuple[int, ...], dict[tuple[int, ...], list[int]]]] = []
        for index, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise UserError("a loglikelihood request needs a non-empty context and continuation")
            if len(continuation) > self.max_length:
                raise UserError(f"a continuation of {len(continuation)} tokens exceeds max_length {self.max_length}")
            whole = (context + continuation)[-(self.max_length + 1):]
            prefix, cont = tuple(whole[:len(whole) - len(continuation)]), tuple(continuation)
            if self._pack:
                rows.setdefault(prefix, {}).setdefault(cont, []).append(index)
            else:
                solo.append((prefix, {cont: [index]}))
        work = list(rows.items()) + solo
        # Longest first, as the harness's Collator orders them (memory trouble shows at once, padding stays small).
        work.sort(key=lambda row: (-_row_length(*row), row[0]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        for start in range(0, len(work), self.batch_size):
            self._score_rows(work[start:start + self.batch_size], results)
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _score_rows(self, batch: list[tuple[tuple[int, ...], dict[tuple[int, ...], list[int]]]],
                    results: list[tuple[float, bool] | None]) -> None:
        """One forward pass over `batch` rows (right-padded): each row is a prefix followed by every continuation
        (but its last token) as a branch that sees the prefix and itself."""
        B, T = len(batch), max(_row_length(*row) for row in batch)
        ids = torch.zeros(B, T, dtype=torch.long)
        positions = torch.zeros(B, T, dtype=torch.long)
        branch = torch.full((B, T), -1, dtype=torch.long)  # 0: the prefix, k > 0: continuation k, -1: padding
        read_rows, read_slots, targets, owners = [], [], [], []
        branched = False
        for b, (prefix, conts) in enumerate(batch):
            P = len(prefix)
            ids[b, :P] = torch.tensor(prefix)
            positions[b, :P] = torch.arange(P)
            branch[b, :P] = 0
            slot = P
            for k, (cont, indices) in enumerate(conts.items(), start=1):
                n = len(cont) - 1
                ids[b, slot:slot + n] = torch.tensor(cont[:-1], dtype=torch.long)
                positions[b, slot:slot + n] = torch.arange(P, P + n)
                branch[b, slot:slot + n] = k
                branched = branched or (n > 0 and slot > P)
                # The logits at the prefix's last slot predict the first token; the branch's own slots the rest.
                read_slots.append(torch.cat([torch.tensor([P - 1]), torch.arange(slot, slot + n)]))
                read_rows.append(torch.full((n + 1,), b))
                targets.append(torch.tensor(cont))
                owners.append(indices)
                slot += n
        device = self.model.device
        if branched:
            # Tree attention: causal, and a continuation's tokens see the prefix and their own branch only.
            slots = torch.arange(T)
            causal = slots[None, :] <= slots[:, None]
            same = (branch[:, None, :] == 0) | (branch[:, None, :] == branch[:, :, None])
            mask = (causal & same).unsqueeze(1).to(device)
            out = self.model(ids.to(device), positions.to(device), mask, hidden_states=True, logits_to_keep=1)
        else:
            # Every row is one plain sequence: the causal fast path (right padding comes after what is scored).
            out = self.model(ids.to(device), hidden_states=True, logits_to_keep=1)
        hidden = out.hidden_states[-1]  # after the final norm, [B, T, d]
        rows_all, slots_all = torch.cat(read_rows).to(device), torch.cat(read_slots).to(device)
        # The LM head only where a continuation token is scored.
        logprobs = F.log_softmax(self.model.unembed(hidden[rows_all, slots_all]).float(), dim=-1)
        target_all = torch.cat(targets).to(device)
        picked = logprobs.gather(-1, target_all[:, None]).squeeze(-1)
        greedy = logprobs.argmax(dim=-1) == target_all
        lengths = [len(t) for t in targets]
        for indices, lp, hit in zip(owners, picked.split(lengths), greedy.split(lengths), strict=True):
            answer = (float(lp.sum()), bool(hit.all()))
            for index in indices:
                results[index] = answer

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of each whole text over HFLM's disjoint rolling windows of `max_length` tokens."""
        windows: list[TokenRequest] = []
        counts = []
        for (string,) in (req.args for req in requests):
            pieces = [lm_utils.make_disjoint_window(w) for w in lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)]
            windows.extend((None, context, continuation) for context, continuation in pieces)
            counts.append(len(pieces))
        # All windows of all texts sorted and batched together, not batch by batch in request order.
        scores = self._loglikelihood_tokens(windows)
        totals, at = [], 0
        for request, n in zip(requests, counts, strict=True):
            total = sum(score for score, _ in scores[at:at + n])
            at += n
            totals.append(total)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, where a task asks) continuations cut at the task's `until` strings, as HFLM."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[tuple[int, str, dict]]] = {}
        for index, req in enumerate(requests):
            context, gen_kwargs = req.args
            groups.setdefault(repr(sorted(gen_kwargs.items())), []).append((index, context, gen_kwargs))
        eot = self.eot_token_id  # None for a character-level run: no end-of-text string to stop at
        eos_text = self.tokenizer_dl.decode([eot]) if eot is not None else None
        for members in groups.values():
            gen_kwargs = members[0][2]
            kwargs = dict(normalize_gen_kwargs(gen_kwargs, self.max_gen_toks))
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = int(kwargs.pop("max_gen_toks"))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0))
            sampling = {k: kwargs.pop(k) for k in _SAMPLING_KWARGS if k in kwargs}
            if kwargs:
                raise UserError(f"generation_kwargs {sorted(kwargs)} are not supported by the decoderlab model; "
                                f"it takes until, max_gen_toks, do_sample, temperature, {', '.join(_SAMPLING_KWARGS)}")
            max_context = self.max_length - max_gen_toks
            if max_context <= 0:
                raise UserError(f"max_gen_toks {max_gen_toks} leaves no room for a prompt in max_length "
                                f"{self.max_length}; lower it in the task's generation_kwargs")
            encoded = [(index, self._encode_prompt(context)[-max_context:]) for index, context, _ in members]
            encoded.sort(key=lambda item: (-len(item[1]), requests[item[0]].args[0]))
            for start in range(0, len(encoded), self.batch_size):
                chunk = encoded[start:start + self.batch_size]
                out = generate(self.model, [ids for _, ids in chunk], max_new_tokens=max_gen_toks,
                               temperature=temperature if do_sample else 0.0, stop_strings=[s for s in until if s],
                               tokenizer=self.tokenizer_dl, **sampling)
                for (index, _), tokens in zip(chunk, out.tokens, strict=True):
                    text = postprocess_generated_text(self.tok_decode(tokens), stop=until, think_end_token=None)
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return results  # type: ignore[return-value]


def _row_length(prefix: tuple[int, ...], conts: dict[tuple[int, ...], list[int]]) -> int:
    return len(prefix) + sum(len(c) - 1 for c in conts)


register_model("decoderlab")(DecoderlabLM)
