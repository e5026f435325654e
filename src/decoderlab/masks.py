"""Attention masks as composable predicates over (batch, query slot, key slot) indices.

The model turns one `Mask` into a boolean tensor per forward pass, or into a block mask whose empty blocks
attention skips (`Mask.to_block_mask`, `decoderlab.accel.flex`); constructors such as `causal()` or
`padding(valid)` combine with `&`, `|` and `~` (the approach of transformers' `masking_utils`).

Conventions:
- True means "this query may attend to this key".
- Slots are absolute indices into the sequence / KV cache, not RoPE positions (those are a model argument).
- A predicate gets broadcast index tensors b [B,1,1], q [1,Tq,1] or [B,Tq,1], k [1,1,Tk] or [B,1,Tk] and
  returns a bool tensor broadcastable to [B,Tq,Tk].
- Per-slot tables (padding, document, segments) say nothing about slots past their end or below 0: such a
  slot counts as padding, as in no document, as in no segment, so those predicates are False there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from decoderlab.errors import MaskError

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

Predicate = Callable[[Tensor, Tensor, Tensor], Tensor]
Slots = Tensor | range | int | Sequence[int]

# Operator precedence for __repr__, so that printed compositions read back the way they were built.
_PRECEDENCE = {"or": 1, "and": 2, "not": 3, "leaf": 3}
_SYMBOL = {"or": " | ", "and": " & "}


class Mask:
    """A predicate fn(b, q, k) -> bool tensor, with the metadata the model needs to use it.

    Build masks with the constructors below; `Mask(fn, name)` wraps a custom predicate, which must return
    a bool tensor broadcastable to [B, Tq, Tk] when given the index tensors described in the module docs.
    """

    def __init__(
        self,
        fn: Predicate,
        name: str = "custom",
        *,
        batch_size: int | None = None,
        device: torch.device | None = None,
    ) -> None:
        self.fn = fn
        self.name = name
        self._batch_size = batch_size
        self._device = device
        self._op = "leaf"
        self._kind = "custom"  # set by the constructors; is_causal trusts only this, never `name`
        self._children: tuple[Mask, ...] = ()

    # -- composition -------------------------------------------------------------------------------

    def __and__(self, other: Mask) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        return _combine("and", self, other)

    def __or__(self, other: Mask) -> Mask:
        if not isinstance(other, Mask):
            return NotImplemented
        return _combine("or", self, other)

    def __invert__(self) -> Mask:
        inner = self.fn
        mask = Mask(
            lambda b, q, k: torch.logical_not(inner(b, q, k)),
            batch_size=self._batch_size,
            device=self._device,
        )
        mask._op, mask._children = "not", (self,)
        return mask

    # -- metadata ----------------------------------------------------------------------------------

    @property
    def is_causal(self) -> bool:
        """True when this mask is exactly `causal()` (k <= q), so the model may use a fused causal kernel.

        Detection is structural and cheap: `causal()`, and `&` / `|` compositions of causal masks (ignoring
        `full()` inside `&` and `none()` inside `|`). Anything else answers False even if equivalent.
        """
        if self._kind == "causal":
            return True
        if self._op in ("and", "or"):
            neutral = "full" if self._op == "and" else "none"
            rest = [c for c in self._children if c._kind != neutral]
            return bool(rest) and all(c.is_causal for c in rest)
        return False

    @property
    def batch_size(self) -> int | None:
        """Batch size implied by the tensors inside the mask; None when nothing in it is per-row."""
        return self._batch_size

    def __repr__(self) -> str:
        if self._op == "leaf":
            return self.name
        if self._op == "not":
            (child,) = self._children
            return f"~{_wrap(child, _PRECEDENCE['not'])}"
        level = _PRECEDENCE[self._op]
        return _SYMBOL[self._op].join(_wrap(c, level) for c in self._children)

    # -- materialization ---------------------------------------------------------------------------

    def materialize(
        self,
        q_slots: Slots,
        k_slots: Slots,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Evaluate the mask into a bool tensor [B, 1, Tq, Tk] (the head axis broadcasts in attention).

        q_slots / k_slots: a LongTensor [T] (shared by every row) or [B, T] (per row), a range, a list of
        ints, or an int n meaning arange(n). B = batch_size, else the batch size of the mask or of the slot
        tensors, else 1. The result lives on `device`, else on the slot tensors' device, else on the device
        of the tensors inside the mask, else on the CPU. It is a fresh contiguous tensor.
        """
        if device is None:
            device = next((s.device for s in (q_slots, k_slots) if isinstance(s, Tensor)), None)
        device = torch.device(device if device is not None else (self._device or "cpu"))
        q = _as_slots(q_slots, "q_slots").to(device)
        k = _as_slots(k_slots, "k_slots").to(device)

        slot_batches = [s.shape[0] for s in (q, k) if s.dim() == 2]
        if batch_size is not None:
            for other in (self._batch_size, *slot_batches):
                if other not in (None, 1, batch_size):
                    raise MaskError(
                        f"batch_size={batch_size} conflicts with a mask or slots for batch size {other}"
                    )
            B = batch_size
        else:
            B = self._batch_size
            for other in slot_batches:
                B = _merge_batch(B, other)
            B = B or 1

        Tq, Tk = q.shape[-1], k.shape[-1]
        b = torch.arange(B, device=device).view(B, 1, 1)
        qi = q.view(-1, Tq, 1)
        ki = k.view(-1, 1, Tk)
        out = self.fn(b, qi, ki)
        if not isinstance(out, Tensor) or out.dtype != torch.bool:
            got = out.dtype if isinstance(out, Tensor) else type(out).__name__
            raise MaskError(f"mask {self!r} returned {got}; a predicate must return a bool tensor")
        return out.to(device).expand(B, Tq, Tk).unsqueeze(1).contiguous()

    def to_block_mask(
        self,
        batch_size: int | None,
        q_len: int,
        kv_len: int,
        device: torch.device | str = "cpu",
        block_size: int = 128,
        q_offset: int = 0,
    ) -> BlockMask:
        """This mask over query slots q_offset.. and key slots 0..kv_len-1 as a FlexAttention `BlockMask`, whose
        empty blocks attention can skip (`decoderlab.accel.flex.to_block_mask`)."""
        from .accel.flex import to_block_mask

        return to_block_mask(self, batch_size, q_len, kv_len, device, block_size, q_offset)

    def materialize_for(
        self,
        T_new: int,
        cache_len: int = 0,
        batch_size: int | None = None,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Mask [B, 1, T_new, cache_len + T_new] for T_new queries appended after cache_len cached slots."""
        device = torch.device(device if device is not None else (self._device or "cpu"))
        q = torch.arange(cache_len, cache_len + T_new, device=device)
        k = torch.arange(cache_len + T_new, device=device)
        return self.materialize(q, k, batch_size=batch_size, device=device)


# -- helpers -----------------------------------------------------------------------------------------


def _wrap(mask: Mask, level: int) -> str:
    text = repr(mask)
    return f"({text})" if _PRECEDENCE[mask._op] < level else text


def _merge_batch(a: int | None, b: int | None) -> int | None:
    # 1 broadcasts against anything, like a tensor dimension of size 1.
    if a is None or a == 1:
        return b if b is not None else a
    if b is None or b == 1 or b == a:
        return a
    raise MaskError(f"cannot combine masks built for batch sizes {a} and {b}; build every part for one batch")


def _combine(op: str, a: Mask, c: Mask) -> Mask:
    # Flatten nested same-op nodes: repr stays flat and is_causal sees every operand.
    parts = tuple(child for m in (a, c) for child in (m._children if m._op == op else (m,)))
    join = torch.logical_and if op == "and" else torch.logical_or
    fns = [m.fn for m in parts]

    def fn(b: Tensor, q: Tensor, k: Tensor) -> Tensor:
        out = fns[0](b, q, k)
        for f in fns[1:]:
            out = join(out, f(b, q, k))
        return out

    mask = Mask(fn, batch_size=_merge_batch(a._batch_size, c._batch_size), device=a._device or c._device)
    mask._op, mask._children = op, parts
    return mask


def _leaf(fn: Predicate, name: str, kind: str, batch_size: int | None = None, device=None) -> Mask:
    mask = Mask(fn, name, batch_size=batch_size, device=device)
    mask._kind = kind
    return mask


def _as_slots(slots: Slots, name: str) -> Tensor:
    if isinstance(slots, int):
        return torch.arange(slots)
    if isinstance(slots, range):
        return torch.arange(slots.start, slots.stop, slots.step)
    t = slots if isinstance(slots, Tensor) else torch.tensor(slots, dtype=torch.long)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise MaskError(f"{name} must hold integer slot indices, got dtype {t.dtype}")
    if t.dim() not in (1, 2):
        raise MaskError(f"{name} must have shape [T] or [B, T], got {list(t.shape)}")
    return t.long()


def _as_table(x: Tensor | Sequence, name: str, *, boolean: bool) -> tuple[Tensor, int | None]:
    """A per-slot table as [Bt, S] plus the batch size it implies (None for a shared [S] table)."""
    dtype = torch.bool if boolean else torch.long
    t = x if isinstance(x, Tensor) else torch.tensor(x, dtype=dtype)
    if t.dim() not in (1, 2):
        raise MaskError(f"{name} must have shape [S] or [B, S], got {list(t.shape)}")
    if t.dtype.is_floating_point or t.dtype.is_complex or (not boolean and t.dtype == torch.bool):
        raise MaskError(f"{name} must be {'bool' if boolean else 'integer'}, got dtype {t.dtype}")
    t = t != 0 if boolean else t.long()
    return (t.unsqueeze(0), None) if t.dim() == 1 else (t, t.shape[0])


def _as_rows(x: Tensor | Sequence[int] | int, name: str) -> tuple[Tensor, int | None]:
    """A per-row integer as [Bt] plus the batch size it implies (None for a plain int or 0-d tensor)."""
    t = x if isinstance(x, Tensor) else torch.tensor(x, dtype=torch.long)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise MaskError(f"{name} must be an integer or integer tensor, got dtype {t.dtype}")
    if t.dim() > 1:
        raise MaskError(f"{name} must be an int or have shape [B], got {list(t.shape)}")
    if (t < 0).any():
        raise MaskError(f"{name} must not be negative")
    return (t.long().view(1), None) if t.dim() == 0 else (t.long(), t.shape[0])


def _rows(table: Tensor, b: Tensor) -> Tensor:
    # A table built for one row (or shared by all rows) serves every batch row.
    return b if table.shape[0] > 1 else torch.zeros_like(b)


def _lookup(table: Tensor, b: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """table[b, idx] plus an in-range flag; out-of-range entries hold an arbitrary valid value."""
    table = table.to(idx.device)
    size = table.shape[-1]
    inside = (idx >= 0) & (idx < size)
    if size == 0:
        shape = torch.broadcast_shapes(b.shape, idx.shape)
        return torch.zeros(shape, dtype=table.dtype, device=idx.device), inside.expand(shape)
    return table[_rows(table, b.to(idx.device)), idx.clamp(0, size - 1)], inside


def _describe(t: Tensor) -> str:
    # Shapes only: printing values would sync with the GPU.
    return f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}"


# -- constructors ------------------------------------------------------------------------------------


def causal() -> Mask:
    """Each query sees itself and earlier slots: k <= q."""
    return _leaf(lambda b, q, k: k <= q, "causal()", "causal")


def full() -> Mask:
    """Everything allowed; the identity of `&`."""
    return _leaf(lambda b, q, k: torch.ones((), dtype=torch.bool, device=q.device), "full()", "full")


def none() -> Mask:
    """Nothing allowed; the identity of `|`."""
    return _leaf(lambda b, q, k: torch.zeros((), dtype=torch.bool, device=q.device), "none()", "none")


def padding(valid: Tensor | Sequence) -> Mask:
    """Keys must be real tokens: valid[b, k], valid bool [B, S] or [S] (True = real token).

    Key slots outside 0..S-1 count as padding (False), so a too-short `valid` hides keys instead of crashing.
    """
    table, bs = _as_table(valid, "padding(valid)", boolean=True)

    def fn(b: Tensor, q: Tensor, k: Tensor) -> Tensor:
        val, inside = _lookup(table, b, k)
        return val & inside

    return _leaf(fn, f"padding({_describe(table if bs else table[0])})", "padding", bs, table.device)


def document(doc_ids: Tensor | Sequence) -> Mask:
    """Queries see keys of the same document: doc_ids[b, q] == doc_ids[b, k]; use with causal().

    doc_ids: integer [B, S] or [S] for packed training rows. A slot outside 0..S-1 belongs to no document,
    so any pair involving one is False.
    """
    table, bs = _as_table(doc_ids, "document(doc_ids)", boolean=False)

    def fn(b: Tensor, q: Tensor, k: Tensor) -> Tensor:
        dq, in_q = _lookup(table, b, q)
        dk, in_k = _lookup(table, b, k)
        return (dq == dk) & in_q & in_k

    return _leaf(fn, f"document({_describe(table if bs else table[0])})", "document", bs, table.device)


def prefix(lengths: Tensor | Sequence[int] | int) -> Mask:
    """The bidirectional prefix block: q < L_b and k < L_b. A prefix LM is `causal() | prefix(lengths)`.

    lengths: an int shared by every row, or integer [B].
    """
    table, bs = _as_rows(lengths, "prefix(lengths)")

    def fn(b: Tensor, q: Tensor, k: Tensor) -> Tensor:
        t = table.to(q.device)
        length = t[_rows(t, b.to(q.device))]
        return (q < length) & (k < length)

    label = str(int(lengths)) if isinstance(lengths, int) else _describe(table if bs else table[0])
    return _leaf(fn, f"prefix({label})", "prefix", bs, table.device)


def segments(segment_ids: Tensor | Sequence) -> Mask:
    """Bidirectional attention between tokens of different segments (PINE: `causal() | segments(ids)`).

    segment_ids: integer [B, S] or [S]; 0 = in no segment. True iff seg[q] > 0, seg[k] > 0, seg[q] != seg[k].
    Slots outside 0..S-1 are in no segment.
    """
    table, bs = _as_table(segment_ids, "segments(segment_ids)", boolean=False)

    def fn(b: Tensor, q: Tensor, k: Tensor) -> Tensor:
        sq, in_q = _lookup(table, b, q)
        sk, in_k = _lookup(table, b, k)
        return in_q & in_k & (sq > 0) & (sk > 0) & (sq != sk)

    return _leaf(fn, f"segments({_describe(table if bs else table[0])})", "segments", bs, table.device)


def window(w: int) -> Mask:
    """Sliding window: q - k < w. Alone it allows every later key; use `causal() & window(w)`."""
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise MaskError(f"window size must be a positive int, got {w!r}")
    return _leaf(lambda b, q, k: (q - k) < w, f"window({w})", "window")


def tree(parents: Tensor | Sequence, start: Tensor | Sequence[int] | int) -> Mask:
    """A speculative-decoding draft tree of N nodes at slots start..start+N-1.

    parents: integer [N] or [B, N], each node's parent as an index into the tree, -1 for a root (a child of
    the last context token). Between two tree slots the mask is True iff k is q or an ancestor of q;
    everywhere else it is True, so `causal() & tree(parents, start)` lets each node see the context and its
    own ancestors only. start: an int or integer [B].
    """
    table, parents_bs = _as_table(parents, "tree(parents)", boolean=False)
    starts, start_bs = _as_rows(start, "tree(start)")
    bs = _merge_batch(parents_bs, start_bs)
    n = table.shape[-1]
    if n == 0:
        raise MaskError("tree(parents) needs at least one node")
    node = torch.arange(n, device=table.device)
    bad = (table < -1) | (table >= node)
    if bad.any():
        row, i = (int(x) for x in bad.nonzero()[0])
        raise MaskError(
            f"tree node {i} has parent {int(table[row, i])}; a parent must be -1 (root) or an earlier node"
        )
    # Ancestor-or-self closure by repeated squaring: after j squarings paths of length 2**j are covered.
    reach = (table.unsqueeze(-1) == node) | torch.eye(n, dtype=torch.bool, device=table.device)
    covered = 1
    while covered < n:
        r = reach.float()
        reach = (r @ r) > 0
        covered *= 2
    ancestors = reach  # [Bt, N, N]: ancestors[b, i, j] is True iff j is i or an ancestor of i

    def fn(b: Tensor, q: Tensor, k: Tensor) -> Tensor:
        anc, s = ancestors.to(q.device), starts.to(q.device)
        b = b.to(q.device)
        qi, ki = q - s[_rows(s, b)], k - s[_rows(s, b)]
        both = (qi >= 0) & (qi < n) & (ki >= 0) & (ki < n)
        seen = anc[_rows(anc, b), qi.clamp(0, n - 1), ki.clamp(0, n - 1)]
        return seen | ~both

    label = str(int(start)) if isinstance(start, int) else _describe(starts if start_bs else starts[0])
    name = f"tree({_describe(table if parents_bs else table[0])}, start={label})"
    return _leaf(fn, name, "tree", bs, table.device)
