"""Block masks from the mask algebra (decoderlab.accel.flex) against the dense masks they stand for."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.flex_attention import create_block_mask, create_mask

from decoderlab import ModelConfig, Transformer, masks
from decoderlab.accel import flex
from decoderlab.errors import UserError

FAST = settings(max_examples=60, deadline=None)


@st.composite
def leaf(draw, B: int, S: int) -> masks.Mask:
    kind = draw(st.sampled_from(["causal", "full", "none", "padding", "document", "prefix", "segments",
                                 "window", "tree"]))
    rows = draw(st.sampled_from([None, 1, B]))  # shared table, one row, one per batch row
    size = draw(st.integers(1, S + 3))  # tables shorter or longer than the sequence

    def table(lo: int, hi: int, sort: bool = False) -> torch.Tensor:
        t = torch.tensor(draw(st.lists(st.lists(st.integers(lo, hi), min_size=size, max_size=size),
                                       min_size=rows or 1, max_size=rows or 1)))
        t = t.sort(-1).values if sort else t
        return t[0] if rows is None else t

    if kind == "causal":
        return masks.causal()
    if kind == "full":
        return masks.full()
    if kind == "none":
        return masks.none()
    if kind == "padding":
        return masks.padding(table(0, 1).bool())
    if kind == "document":
        return masks.document(table(0, 3, sort=True))
    if kind == "segments":
        return masks.segments(table(0, 3))
    if kind == "prefix":
        return masks.prefix(draw(st.integers(0, S)) if rows is None else torch.tensor(
            draw(st.lists(st.integers(0, S), min_size=rows, max_size=rows))))
    if kind == "window":
        return masks.window(draw(st.integers(1, S)))
    n = draw(st.integers(1, 6))
    parents = [draw(st.integers(-1, i - 1)) for i in range(n)]
    return masks.tree(parents, draw(st.integers(0, S)))


@st.composite
def composed(draw, B: int, S: int, depth: int = 2) -> masks.Mask:
    if depth == 0 or draw(st.booleans()):
        return draw(leaf(B, S))
    op = draw(st.sampled_from(["and", "or", "not"]))
    a = draw(composed(B, S, depth - 1))
    if op == "not":
        return ~a
    b = draw(composed(B, S, depth - 1))
    return a & b if op == "and" else a | b


@st.composite
def case(draw):
    B = draw(st.integers(1, 3))
    block = draw(st.sampled_from([8, 16, 32]))
    Tq = draw(st.integers(1, 70))
    offset = draw(st.integers(0, 20))
    Tk = offset + Tq + draw(st.integers(0, 10))
    return B, block, Tq, Tk, offset, draw(composed(B, Tk))


def dense(mask: masks.Mask, B: int, Tq: int, Tk: int, offset: int) -> torch.Tensor:
    return mask.materialize(torch.arange(offset, offset + Tq), Tk, batch_size=B)


@FAST
@given(case())
def test_block_mask_matches_dense_mask(c):
    B, block, Tq, Tk, offset, mask = c
    want = dense(mask, B, Tq, Tk, offset)  # [B, 1, Tq, Tk]
    bm = mask.to_block_mask(None, Tq, Tk, block_size=block, q_offset=offset)
    # The predicate FlexAttention calls (under vmap) gives the dense mask exactly.
    got = create_mask(bm.mask_mod, bm.kv_num_blocks.shape[0], 1, Tq, Tk, device="cpu")
    assert torch.equal(got.expand_as(want), want)
    # The same block mask torch builds from the predicate alone.
    theirs = create_block_mask(bm.mask_mod, bm.kv_num_blocks.shape[0], None, Tq, Tk, device="cpu",
                               BLOCK_SIZE=block)
    assert torch.equal(bm.to_dense(), theirs.to_dense())
    assert torch.equal(bm.full_kv_num_blocks, theirs.full_kv_num_blocks)
    # Block by block: listed iff it holds a True (partial or full).
    blocks = bm.to_dense()[:, 0].bool()  # [Bm, nq, nk]: partial or full
    nq, nk = math.ceil(Tq / block), math.ceil(Tk / block)
    padded = F.pad(want[:, 0], (0, nk * block - Tk, 0, nq * block - Tq))
    tiles = padded.view(B, nq, block, nk, block).transpose(2, 3)
    assert torch.equal(blocks[:, :nq, :nk].expand(B, nq, nk), tiles.any(-1).any(-1))
    if bm.full_kv_num_blocks is not None:
        # Full means every pair is allowed, so a ragged edge block (part past the end) is never full.
        all_true = tiles.all(-1).all(-1)
        full = torch.zeros_like(blocks[:, :nq, :nk])
        for b in range(full.shape[0]):
            for i in range(nq):
                n = int(bm.full_kv_num_blocks[b, 0, i])
                full[b, i, bm.full_kv_indices[b, 0, i, :n].long()] = True
        assert torch.equal(full.expand(B, nq, nk), all_true)


@FAST
@given(case(), st.sampled_from([(4, 4), (4, 2)]))
def test_block_sparse_attention_equals_sdpa_with_the_dense_mask(c, heads):
    B, block, Tq, Tk, offset, mask = c
    H, Hkv = heads
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Tq, 8, dtype=torch.float64, generator=g)
    k, v = (torch.randn(B, Hkv, Tk, 8, dtype=torch.float64, generator=g) for _ in range(2))
    want = dense(mask, B, Tq, Tk, offset)
    bm = mask.to_block_mask(None, Tq, Tk, block_size=block, q_offset=offset)
    got = flex.block_sparse_attention(q, k, v, mask, bm, offset)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=want | ~want.any(-1, keepdim=True), enable_gqa=True)
    seen = want.any(-1)[:, 0]  # rows that see no key are unused garbage on both paths
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.transpose(1, 2)[seen], ref.transpose(1, 2)[seen], atol=1e-10, rtol=1e-10)


def tiny(**kw) -> Transformer:
    cfg = ModelConfig(vocab_size=97, n_layers=2, n_heads=4, n_kv_heads=2, d_model=32, context_length=1024,
                      norm="rmsnorm", positions="rope", activation="swiglu", **kw)
    torch.manual_seed(0)
    return Transformer(cfg)


def logits_and_grads(model: Transformer, backend: str, ids, mask, dtype=None):
    model.attention_backend = backend
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast("cpu", dtype=dtype) if dtype else torch.autocast("cpu", enabled=False)
    with ctx:
        logits = model(ids, mask=mask)
    (logits.float().square().mean()).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("T", [300, 256])
def test_model_blocks_equal_dense_logits_and_gradients(T):
    model = tiny(sliding_window=64, sliding_layers=[1]).train()
    doc = (torch.arange(T) // 70).repeat(2, 1)
    doc[1] = torch.arange(T) // 45
    ids = torch.randint(0, 97, (2, T))
    mask = masks.causal() & masks.document(doc)
    want, want_g = logits_and_grads(model, "dense", ids, mask)
    got, got_g = logits_and_grads(model, "blocks", ids, mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for name in want_g:
        torch.testing.assert_close(got_g[name], want_g[name], atol=1e-5, rtol=1e-4)


def test_model_blocks_under_bf16_autocast_close_to_dense():
    model = tiny().train()
    T = 260
    ids = torch.randint(0, 97, (1, T))
    mask = masks.causal() | masks.prefix(40)
    want, _ = logits_and_grads(model, "dense", ids, mask, torch.bfloat16)
    got, _ = logits_and_grads(model, "blocks", ids, mask, torch.bfloat16)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)


def test_model_blocks_with_padding_and_cache_prefill():
    model = tiny().eval()
    T = 200
    valid = torch.ones(2, T, dtype=torch.bool)
    valid[1, :37] = False  # left padding: those query rows see nothing and are never used
    ids = torch.randint(0, 97, (2, T))
    mask = masks.causal() & masks.padding(valid)
    with torch.no_grad():
        model.attention_backend = "dense"
        want = model(ids, mask=mask)
        model.attention_backend = "blocks"
        cache = model.new_cache(2, T + 8)
        got = model(ids, mask=mask, cache=cache)
    torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)


def test_flex_backend_on_cpu_inference_equals_dense():
    model = tiny().eval()
    T = 200
    doc = torch.arange(T) // 50
    ids = torch.randint(0, 97, (1, T))
    mask = masks.causal() & masks.document(doc)
    with torch.no_grad():
        model.attention_backend = "dense"
        want = model(ids, mask=mask)
        model.attention_backend = "flex"
        got = model(ids, mask=mask)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_flex_backend_refuses_cpu_training_in_one_line():
    model = tiny().train()
    model.attention_backend = "flex"
    with pytest.raises(UserError) as err:
        model(torch.randint(0, 97, (1, 64)), mask=masks.causal() & masks.document(torch.arange(64) // 20))
    assert "\n" not in str(err.value) and "blocks" in str(err.value)


def test_backend_choice_rule_and_overrides(monkeypatch):
    cpu, fp32, bf16 = torch.device("cpu"), torch.float32, torch.bfloat16
    assert flex.choose_attention(cpu, 2048, 2048, 0.1, fp32, True) == "blocks"
    assert flex.choose_attention(cpu, 2048, 2048, 0.9, fp32, True) == "dense"
    assert flex.choose_attention(cpu, 2048, 2048, 0.3, fp32, True) == "dense"
    assert flex.choose_attention(cpu, 2048, 2048, 0.3, bf16, True) == "blocks"
    assert flex.choose_attention(cpu, 1024, 1024, 0.1, fp32, True) == "blocks"
    assert flex.choose_attention(cpu, 1024, 1024, 0.1, bf16, True) == "dense"
    assert flex.choose_attention(cpu, 2048, 2048, 0.1, fp32, False) == "dense"  # prefill: from 4 096 keys
    assert flex.choose_attention(cpu, 4096, 4096, 0.1, bf16, False) == "blocks"
    assert flex.choose_attention(cpu, 4096, 4096, 0.3, bf16, False) == "dense"
    assert flex.choose_attention(cpu, 512, 512, 0.1, fp32, True) == "dense"
    assert flex.choose_attention(torch.device("cuda"), 2048, 2048, 0.1, bf16, True) == "flex"
    assert flex.choose_attention(cpu, 512, 512, 0.9, fp32, True, "blocks") == "blocks"
    assert not flex.wants_block_mask(cpu, 1000, fp32, True)
    assert flex.wants_block_mask(cpu, 100, fp32, False, "blocks")
    assert not flex.wants_block_mask(cpu, 10**6, fp32, True, "dense")
    monkeypatch.setenv("DECODERLAB_ATTENTION", "dense")
    assert flex.attention_backend() == "dense"
    assert flex.attention_backend("blocks") == "blocks"
    monkeypatch.setenv("DECODERLAB_ATTENTION", "sparse")
    with pytest.raises(UserError, match="unknown attention backend 'sparse'"):
        flex.attention_backend()


def test_auto_uses_blocks_for_a_long_sparse_mask_and_dense_for_a_dense_one(monkeypatch):
    calls = []
    real = flex.block_sparse_attention
    monkeypatch.setattr(flex, "block_sparse_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny().train()
    T = flex.MIN_KEYS_TRAINING[torch.float32]
    ids = torch.randint(0, 97, (1, T))
    docs = masks.causal() & masks.document(torch.arange(T) // 100)
    model(ids, mask=docs)  # training: autograd records the forward
    assert len(calls) == 2  # one per layer
    model(ids, mask=masks.causal() | masks.prefix(T - 1))  # nearly every tile is non-empty
    assert len(calls) == 2
    with torch.no_grad():  # a forward pass alone pays the build for less: dense below 4 096 keys
        model(ids, mask=docs)
    assert len(calls) == 2


def test_to_block_mask_batch_conflict_is_one_line():
    mask = masks.document(torch.zeros(3, 10, dtype=torch.long))
    with pytest.raises(UserError) as err:
        mask.to_block_mask(2, 10, 10)
    assert "\n" not in str(err.value) and "batch size 3" in str(err.value)
