"""Block-sparse attention from the mask algebra: a `Mask` as a FlexAttention `BlockMask`, and attention that
skips the blocks where the mask is all False.

`to_block_mask` builds the `BlockMask` with the mask's predicate as its `mask_mod` (every constructor in
`decoderlab.masks` works under FlexAttention's vmap as it is) and the block lists from the dense mask.
Two ways run attention over it:
- `flex_attention`: PyTorch's FlexAttention kernel (compiled). On CUDA it runs forward and backward. On CPU
  (torch 2.13) it has no backward and compiles once per shape (6-10 s here), so it serves inference only.
- `block_sparse_attention`: the block mask's lists of non-empty key blocks, gathered per query block and run
  through SDPA with the mask evaluated on those tiles only. Plain autograd ops, no compile: the CPU path for
  training and prefill. Memory and work go as (non-empty blocks) x block², not T².
`choose_attention` is the measured rule that decides between these and the dense mask.

A query row that may see no key at all (a padding query) gives an arbitrary finite output here, where the
dense path lets it see every key; such rows are never used.
"""

from __future__ import annotations

import functools
import math
import os
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask

from ..errors import UserError

if TYPE_CHECKING:
    from ..masks import Mask

ATTENTION_BACKENDS = ("auto", "dense", "flex", "blocks")
DEFAULT_BLOCK_SIZE = 128


def to_block_mask(mask: Mask, batch_size: int | None, q_len: int, kv_len: int,
                  device: torch.device | str = "cpu", block_size: int = DEFAULT_BLOCK_SIZE,
                  q_offset: int = 0) -> BlockMask:
    """`mask` over query slots q_offset..q_offset+q_len-1 and key slots 0..kv_len-1 as a FlexAttention
    `BlockMask` (one head, broadcast over heads). batch_size None takes the mask's own (`mask.batch_size`),
    and for a mask without per-row tables builds one block mask that every row shares."""
    if batch_size is None:
        batch_size = mask.batch_size
    elif mask.batch_size not in (None, 1, batch_size):
        raise UserError(f"batch_size={batch_size} conflicts with mask {mask!r}, built for batch size {mask.batch_size}")
    if block_size < 1 or q_len < 1 or kv_len < 1:
        raise UserError(f"to_block_mask needs positive lengths and block size, got q_len={q_len}, "
                        f"kv_len={kv_len}, block_size={block_size}")
    fn = mask.fn

    def mask_mod(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
        out = fn(b, q_idx + q_offset if q_offset else q_idx, kv_idx)
        # A constant leaf (full(), none()) returns an unbatched 0-d tensor; vmap wants one per index.
        return out if out.shape == q_idx.shape else out.expand(q_idx.shape)

    # Which blocks hold a True, and which hold nothing else, from the mask materialised a band of query blocks
    # at a time: the same block mask `create_block_mask` builds (its vmap evaluates the predicate once per
    # pair, 3x slower here), with O(band x kv_len) memory instead of O(q_len x kv_len).
    device = torch.device(device)
    Bm, bs = batch_size or 1, block_size
    nq, nk = math.ceil(q_len / bs), math.ceil(kv_len / bs)
    any_true = torch.empty(Bm, nq, nk, dtype=torch.bool, device=device)
    all_true = torch.empty(Bm, nq, nk, dtype=torch.bool, device=device)
    band = bs * max(1, (1 << 22) // (Bm * bs * nk * bs))  # about 4M pairs per band
    keys = torch.arange(kv_len, device=device)
    for start in range(0, q_len, band):
        stop = min(q_len, start + band)
        rows = mask.materialize(torch.arange(q_offset + start, q_offset + stop, device=device), keys,
                                batch_size=Bm, device=device)[:, 0]
        n = math.ceil((stop - start) / bs)
        # Padding past the ends is False: a ragged edge block is never full, as in create_block_mask.
        tiles = F.pad(rows, (0, nk * bs - kv_len, 0, n * bs - (stop - start))).view(Bm, n, bs, nk, bs)
        any_true[:, start // bs:start // bs + n] = tiles.any(4).any(2)
        all_true[:, start // bs:start // bs + n] = tiles.all(4).all(2)

    def ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # FlexAttention's layout: per query block, the count and the listed key blocks first, in order.
        order = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True)
        return blocks.sum(-1).to(torch.int32)[:, None], order.to(torch.int32)[:, None]

    return BlockMask.from_kv_blocks(*ordered(any_true & ~all_true), *ordered(all_true), BLOCK_SIZE=bs,
                                    mask_mod=mask_mod, seq_lengths=(q_len, kv_len))


def block_density(block_mask: BlockMask) -> float:
    """Fraction of (query block, key block) tiles that hold at least one True: the work a block-sparse
    kernel does relative to the dense one."""
    n_q, n_kv = block_mask.kv_num_blocks.shape[-1], math.ceil(block_mask.seq_lengths[1] / block_mask.BLOCK_SIZE[1])
    visited = block_mask.kv_num_blocks.sum()
    if block_mask.full_kv_num_blocks is not None:
        visited = visited + block_mask.full_kv_num_blocks.sum()
    return float(visited) / (block_mask.kv_num_blocks.shape[0] * block_mask.kv_num_blocks.shape[1] * n_q * n_kv)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention as flex

    # One graph per shape: recompiling for every new length is what costs seconds on CPU.
    return torch.compile(flex, dynamic=False)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask) -> torch.Tensor:
    """FlexAttention over `block_mask` (compiled; on CPU forward only): q [B, H, Tq, D], k, v [B, Hkv, Tk, D]."""
    if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise UserError("FlexAttention has no backward on CPU in this torch; use attention='blocks' or 'dense' "
                        "for training on CPU")
    return _compiled_flex()(q, k, v, block_mask=block_mask, enable_gqa=k.shape[1] != q.shape[1])


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Mask, block_mask: BlockMask,
                           q_offset: int = 0, dropout_p: float = 0.0) -> torch.Tensor:
    """Attention of q [B, H, Tq, D] over k, v [B, Hkv, Tk, D] under `mask`, visiting only the key blocks
    `block_mask` (from `to_block_mask` with the same mask, lengths and q_offset) lists for each query block.

    Each query block gets its non-empty key blocks gathered side by side (padded to the longest list) and one
    SDPA call runs all query blocks as a batch, with `mask` evaluated on those tiles alone. Differentiable.
    """
    B, H, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    bq, bk = block_mask.BLOCK_SIZE
    if bq != bk:
        raise UserError(f"block_sparse_attention needs square blocks, got {bq}x{bk}")
    bs = bq
    nq, nk = math.ceil(Tq / bs), math.ceil(Tk / bs)
    # Key blocks per query block: partial blocks then full ones, the rest of each list padding.
    counts, lists = block_mask.kv_num_blocks[:, 0], block_mask.kv_indices[:, 0, :nq]
    if block_mask.full_kv_num_blocks is not None:
        # Lists are ordered (valid entries first): take the partial ones, then append the full ones.
        width = lists.shape[-1]
        slot = torch.arange(width, device=q.device)
        partial = torch.where(slot < counts[..., None], lists[..., :width], -1)
        full = torch.where(slot < block_mask.full_kv_num_blocks[:, 0, :, None],
                           block_mask.full_kv_indices[:, 0, :nq, :width], -1)
        lists = torch.cat((partial, full), dim=-1)
        counts = counts + block_mask.full_kv_num_blocks[:, 0]
        # Move the valid entries of each list to the front.
        order = torch.sort((lists < 0).to(torch.int8), dim=-1, stable=True).indices
        lists = lists.gather(-1, order)
    counts = counts[:, :nq]
    width = max(int(counts.max()), 1)
    lists = lists[..., :width]
    Bm = lists.shape[0]
    valid_slot = torch.arange(width, device=q.device) < counts[..., None]  # [Bm, nq, width]
    blocks = torch.where(valid_slot, lists, 0).clamp(max=nk - 1).long()

    # Query and key slots of every tile, for the predicate: [Bm*nq, bs, 1] and [Bm*nq, 1, width*bs].
    q_slots = (torch.arange(nq * bs, device=q.device).view(1, nq, bs) + q_offset).expand(Bm, nq, bs)
    k_slots = (blocks.unsqueeze(-1) * bs + torch.arange(bs, device=q.device)).view(Bm, nq, width * bs)
    k_ok = (valid_slot.repeat_interleave(bs, dim=-1) & (k_slots < Tk))
    rows = torch.arange(Bm, device=q.device).repeat_interleave(nq).view(Bm * nq, 1, 1)
    allowed = mask.fn(rows, q_slots.reshape(Bm * nq, bs, 1), k_slots.reshape(Bm * nq, 1, width * bs))
    allowed = (allowed & k_ok.view(Bm * nq, 1, width * bs)).expand(Bm * nq, bs, width * bs)
    allowed = allowed.reshape(Bm, nq, bs, width * bs)
    # A row that sees nothing in its tile (padding queries, the rows past Tq) sees its tile instead: no NaN.
    allowed = allowed | ~allowed.any(-1, keepdim=True)
    allowed = allowed.expand(B, nq, bs, width * bs).reshape(B * nq, 1, bs, width * bs)

    pad_q, pad_k = nq * bs - Tq, nk * bs - Tk
    qb = (F.pad(q, (0, 0, 0, pad_q)) if pad_q else q).view(B, H, nq, bs, D).transpose(1, 2).reshape(B * nq, H, bs, D)

    def gather(x: torch.Tensor) -> torch.Tensor:  # [B, Hkv, Tk, D] -> [B*nq, Hkv, width*bs, D]
        xb = (F.pad(x, (0, 0, 0, pad_k)) if pad_k else x).view(B, Hkv, nk, bs, D).transpose(1, 2)  # [B, nk, Hkv, bs, D]
        idx = blocks.expand(B, nq, width).reshape(B, nq * width)
        picked = xb[torch.arange(B, device=x.device).unsqueeze(-1), idx]  # [B, nq*width, Hkv, bs, D]
        return picked.view(B, nq, width, Hkv, bs, D).permute(0, 1, 3, 2, 4, 5).reshape(B * nq, Hkv, width * bs, D)

    out = F.scaled_dot_product_attention(qb, gather(k), gather(v), attn_mask=allowed, dropout_p=dropout_p,
                                         enable_gqa=Hkv != H)
    return out.view(B, nq, H, bs, D).transpose(1, 2).reshape(B, H, nq * bs, D)[:, :, :Tq]


def attention_backend(requested: str | None = None) -> str:
    """The backend asked for: `requested`, else the DECODERLAB_ATTENTION environment variable, else "auto"."""
    name = requested or os.environ.get("DECODERLAB_ATTENTION") or "auto"
    if name not in ATTENTION_BACKENDS:
        raise UserError(f"unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    return name


# Thresholds of `choose_attention`, measured on this CPU (2 cores, torch 2.13, 8 query / 2 key heads of 32;
# `benchmarks/block_mask.py rule`, block mask build included in every call). Block-sparse speed-up over the
# dense mask for 8 documents (tile density 0.08-0.13) / a window of T/8 (0.15-0.23) / 2 documents (0.27-0.31):
#   training, fp32:  1 024 keys 1.57x / 1.18x / 1.86x; 2 048 2.09x / 1.87x / 1.16x; 4 096 2.09x / 4.05x / 0.92x
#   training, bf16:  1 024 keys 1.39x / 2.12x / 0.80x; 2 048 3.49x / 3.21x / 1.93x; 4 096 4.23x / 4.35x / 1.71x
#   forward only:    2 048 keys 0.61-1.03x;  4 096 keys fp32 1.13x / 1.64x / 0.72x, bf16 1.05x / 2.42x / 1.00x
# A prefix-LM mask over half the row (density 0.63-0.66) loses or ties everywhere (0.48-1.13x).
MIN_KEYS_TRAINING = {torch.float32: 1024, torch.bfloat16: 2048}
MAX_DENSITY_TRAINING = {torch.float32: 0.25, torch.bfloat16: 0.5}
MIN_KEYS_FORWARD, MAX_DENSITY_FORWARD = 4096, 0.2  # prefill pays the build against fewer saved FLOPs
MIN_KEYS_CUDA = 1024  # not measured (no GPU here); CUDA takes density <= 0.5


def min_keys(device: torch.device, dtype: torch.dtype, backward: bool) -> int:
    """Fewest keys at which the auto rule considers a block mask (below it the dense mask always wins)."""
    if device.type == "cuda":
        return MIN_KEYS_CUDA
    return MIN_KEYS_TRAINING.get(dtype, MIN_KEYS_TRAINING[torch.float32]) if backward else MIN_KEYS_FORWARD


def wants_block_mask(device: torch.device, kv_len: int, dtype: torch.dtype, backward: bool,
                     backend: str = "auto") -> bool:
    """Whether a block mask is worth building at all (building one materialises the mask band by band)."""
    if backend == "dense":
        return False
    return backend in ("flex", "blocks") or kv_len >= min_keys(device, dtype, backward)


def choose_attention(device: torch.device, q_len: int, kv_len: int, density: float, dtype: torch.dtype,
                     backward: bool, backend: str = "auto") -> str:
    """"dense", "flex" or "blocks" for one forward pass; `backward` says whether autograd records it.

    The auto rule, measured (thresholds above): on CPU, block-sparse for fp32 training from 1 024 keys at tile
    density <= 0.25, bf16 training from 2 048 keys at density <= 0.5, a forward pass alone from 4 096 keys at
    density <= 0.2, with at least one full query block; else dense. On CUDA the block path is FlexAttention
    (forward and backward). On CPU it is `block_sparse_attention`: compiled FlexAttention has no backward
    there and recompiles for every new length (6-10 s each).
    """
    if backend != "auto":
        return backend
    if device.type == "cuda":
        max_density = 0.5
    elif backward:
        max_density = MAX_DENSITY_TRAINING.get(dtype, MAX_DENSITY_TRAINING[torch.float32])
    else:
        max_density = MAX_DENSITY_FORWARD
    if kv_len < min_keys(device, dtype, backward) or q_len < DEFAULT_BLOCK_SIZE or density > max_density:
        return "dense"
    return "flex" if device.type == "cuda" else "blocks"
