"""decoderlab.masks against a brute-force reference written with plain Python loops."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decoderlab.errors import MaskError
from decoderlab.masks import (
    Mask,
    causal,
    document,
    full,
    none,
    padding,
    prefix,
    segments,
    tree,
    window,
)

FAST = settings(max_examples=150, deadline=None)

# -- brute-force reference ---------------------------------------------------------------------------
# Each reference is a plain function ref(b, q, k) -> bool over Python ints.


def table_form(draw) -> str:
    """How a per-slot input is given: shared [S], one row [1, S], or per row [B, S]."""
    return draw(st.sampled_from(["shared", "one", "rows"]))


def pick(rows: list, form: str, b: int):
    return rows[b] if form == "rows" else rows[0]


def as_input(rows: list, form: str, as_tensor: bool, dtype):
    data = rows[0] if form == "shared" else rows
    return torch.tensor(data, dtype=dtype) if as_tensor else data


def ref_lookup(row: list, i: int, fill):
    return row[i] if 0 <= i < len(row) else fill


def ref_ancestors(parents: list[int]) -> list[set[int]]:
    out = []
    for i in range(len(parents)):
        seen, j = {i}, parents[i]
        while j != -1:
            seen.add(j)
            j = parents[j]
        out.append(seen)
    return out


@st.composite
def leaf(draw, B: int):
    kind = draw(
        st.sampled_from(
            ["causal", "full", "none", "padding", "document", "prefix", "segments", "window", "tree"]
        )
    )
    as_tensor = draw(st.booleans())
    if kind == "causal":
        return causal(), lambda b, q, k: k <= q
    if kind == "full":
        return full(), lambda b, q, k: True
    if kind == "none":
        return none(), lambda b, q, k: False
    if kind == "window":
        w = draw(st.integers(1, 6))
        return window(w), lambda b, q, k: q - k < w
    if kind == "prefix":
        if draw(st.booleans()):
            n = draw(st.integers(0, 14))
            return prefix(n), lambda b, q, k: q < n and k < n
        lengths = draw(st.lists(st.integers(0, 14), min_size=B, max_size=B))
        arg = torch.tensor(lengths) if as_tensor else lengths
        return prefix(arg), lambda b, q, k: q < lengths[b] and k < lengths[b]
    if kind == "tree":
        form = table_form(draw)
        nrows = B if form == "rows" else 1
        n = draw(st.integers(1, 8))
        # Lean towards "parent = previous node" so that deep chains (the hard case for the closure) show up.
        parent = [st.one_of(st.just(i - 1), st.integers(-1, i - 1)) for i in range(n)]
        rows = [[draw(parent[i]) for i in range(n)] for _ in range(nrows)]
        start = draw(st.integers(0, 10))
        anc = [ref_ancestors(r) for r in rows]

        def ref_tree(b, q, k):
            qi, ki = q - start, k - start
            if 0 <= qi < n and 0 <= ki < n:
                return ki in pick(anc, form, b)[qi]
            return True

        return tree(as_input(rows, form, as_tensor, torch.long), start), ref_tree

    form = table_form(draw)
    nrows = B if form == "rows" else 1
    S = draw(st.integers(0 if kind == "padding" else 1, 14))
    if kind == "padding":
        rows = [draw(st.lists(st.booleans(), min_size=S, max_size=S)) for _ in range(nrows)]
        mask = padding(as_input(rows, form, as_tensor, torch.bool))
        return mask, lambda b, q, k: ref_lookup(pick(rows, form, b), k, False)
    if kind == "document":
        rows = [sorted(draw(st.lists(st.integers(-2, 3), min_size=S, max_size=S))) for _ in range(nrows)]

        def ref_doc(b, q, k):
            row = pick(rows, form, b)
            return 0 <= q < len(row) and 0 <= k < len(row) and row[q] == row[k]

        return document(as_input(rows, form, as_tensor, torch.long)), ref_doc
    rows = [draw(st.lists(st.integers(0, 3), min_size=S, max_size=S)) for _ in range(nrows)]

    def ref_seg(b, q, k):
        row = pick(rows, form, b)
        sq, sk = ref_lookup(row, q, 0), ref_lookup(row, k, 0)
        return sq > 0 and sk > 0 and sq != sk

    return segments(as_input(rows, form, as_tensor, torch.long)), ref_seg


def composed(B: int):
    def extend(children):
        both = st.tuples(children, children)
        return st.one_of(
            both.map(lambda p: (p[0][0] & p[1][0], lambda b, q, k: p[0][1](b, q, k) and p[1][1](b, q, k))),
            both.map(lambda p: (p[0][0] | p[1][0], lambda b, q, k: p[0][1](b, q, k) or p[1][1](b, q, k))),
            children.map(lambda c: (~c[0], lambda b, q, k: not c[1](b, q, k))),
        )

    return st.recursive(leaf(B), extend, max_leaves=5)


def reference(ref, B: int, q_rows: list[list[int]], k_rows: list[list[int]]) -> torch.Tensor:
    out = torch.zeros(B, 1, len(q_rows[0]), len(k_rows[0]), dtype=torch.bool)
    for b in range(B):
        qs = q_rows[b] if len(q_rows) > 1 else q_rows[0]
        ks = k_rows[b] if len(k_rows) > 1 else k_rows[0]
        for i, q in enumerate(qs):
            for j, k in enumerate(ks):
                out[b, 0, i, j] = bool(ref(b, q, k))
    return out


# -- property tests ----------------------------------------------------------------------------------


@FAST
@given(data=st.data(), B=st.integers(1, 3), Tq=st.integers(1, 12), offset=st.integers(0, 4))
def test_matches_reference_with_cache_offset(data, B, Tq, offset):
    mask, ref = data.draw(composed(B))
    assert mask.batch_size in (None, 1, B)
    q = list(range(offset, offset + Tq))
    k = list(range(offset + Tq))
    expected = reference(ref, B, [q], [k])

    got = mask.materialize(torch.tensor(q), torch.tensor(k), batch_size=B)
    assert got.shape == (B, 1, Tq, offset + Tq) and got.dtype == torch.bool
    assert torch.equal(got, expected)
    assert torch.equal(mask.materialize_for(Tq, offset, batch_size=B), expected)


@FAST
@given(data=st.data(), B=st.integers(1, 3))
def test_matches_reference_on_arbitrary_batched_slots(data, B):
    """Per-row slot tensors [B, T] with gaps, repeats and slots past every table's end."""
    mask, ref = data.draw(composed(B))
    Tq, Tk = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 12))
    q_rows = [data.draw(st.lists(st.integers(0, 16), min_size=Tq, max_size=Tq)) for _ in range(B)]
    k_rows = [data.draw(st.lists(st.integers(0, 16), min_size=Tk, max_size=Tk)) for _ in range(B)]
    got = mask.materialize(torch.tensor(q_rows), torch.tensor(k_rows))
    assert torch.equal(got, reference(ref, B, q_rows, k_rows))


@FAST
@given(data=st.data())
def test_default_batch_size_comes_from_the_mask(data):
    B = data.draw(st.integers(1, 3))
    mask, ref = data.draw(composed(B))
    got = mask.materialize(5, range(7))
    expected_B = mask.batch_size or 1
    assert torch.equal(got, reference(ref, expected_B, [list(range(5))], [list(range(7))]))


# -- unit tests --------------------------------------------------------------------------------------


def test_is_causal_detection():
    assert causal().is_causal
    assert (causal() & causal()).is_causal
    assert (causal() & full()).is_causal
    assert (causal() | none()).is_causal
    assert not (causal() & padding([[True, False]])).is_causal
    assert not (causal() | prefix(2)).is_causal
    assert not full().is_causal
    assert not (~causal()).is_causal
    assert not Mask(lambda b, q, k: k <= q, "causal()").is_causal


def test_plain_causal_with_cache_offset():
    got = causal().materialize_for(2, cache_len=3)
    assert got.shape == (1, 1, 2, 5)
    assert got[0, 0].tolist() == [[True] * 4 + [False], [True] * 5]


def test_prefix_lm():
    got = (causal() | prefix([3, 1])).materialize(5, 5)
    assert got[0, 0].int().tolist() == [
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],
    ]
    assert torch.equal(got[1, 0], causal().materialize(5, 5)[0, 0])


def test_pine_style():
    # A shared prefix (slot 0), two parallel documents (1-2 and 3-4), then a question (slot 5).
    seg = [0, 1, 1, 2, 2, 0]
    got = (causal() | segments(seg)).materialize(6, 6)
    assert got[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 1, 1, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1],
    ]


def test_tree_hand_checked():
    # Context slots 0-1; nodes 0..3 at slots 2..5: 0 and 1 are roots, 2 is a child of 0, 3 of 2.
    got = (causal() & tree([-1, -1, 0, 2], start=2)).materialize_for(6)
    assert got[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 1, 0, 1, 0],
        [1, 1, 1, 0, 1, 1],
    ]
    # Decoding the tree after the context is cached: queries are the tree slots only.
    step = (causal() & tree(torch.tensor([-1, -1, 0, 2]), 2)).materialize_for(4, cache_len=2)
    assert torch.equal(step, got[:, :, 2:, :])


def test_tree_deep_chain():
    n = 9
    got = tree(torch.arange(-1, n - 1), start=0).materialize(n, n)
    assert torch.equal(got[0, 0], torch.ones(n, n, dtype=torch.bool).tril())


def test_batched_tree_rows_differ():
    parents = torch.tensor([[-1, 0, 1], [-1, -1, -1]])
    got = tree(parents, start=torch.tensor([1, 1])).materialize(4, 4)
    assert got.shape == (2, 1, 4, 4)
    assert got[0, 0, 1:, 1:].int().tolist() == [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    assert got[1, 0, 1:, 1:].int().tolist() == [[1, 0, 0], [0, 1, 0], [0, 0, 1]]
    assert got[:, 0, 0, :].all() and got[:, 0, :, 0].all()


def test_document_packing_and_padding():
    docs = torch.tensor([[0, 0, 1, 1, 1]])
    valid = torch.tensor([[True, True, True, True, False]])
    got = (causal() & document(docs) & padding(valid)).materialize(5, 5)
    assert got[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 1, 1, 0],
    ]


def test_out_of_range_slots_are_false():
    k = torch.arange(6)
    assert padding([True, True]).materialize(1, k)[0, 0, 0].tolist() == [True, True] + [False] * 4
    assert document([0, 0]).materialize(k, k)[0, 0, 5].tolist() == [False] * 6
    assert not segments([1, 2]).materialize(k, k)[0, 0, 2:].any()


def test_window():
    got = (causal() & window(2)).materialize(4, 4)
    assert got[0, 0].int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 1]]


def test_repr_shows_composition():
    m = (causal() | prefix(3)) & ~padding(torch.ones(2, 4, dtype=torch.bool))
    assert repr(m) == "(causal() | prefix(3)) & ~padding(bool[2, 4])"
    assert repr(causal() & window(4) & full()) == "causal() & window(4) & full()"


def test_batch_size_metadata_and_broadcast():
    assert causal().batch_size is None
    assert padding([True]).batch_size is None
    assert (padding([[True]]) & document([[0, 1], [0, 1], [1, 1]])).batch_size == 3
    got = (causal() & padding([[True, False]])).materialize(2, 2, batch_size=3)
    assert got.shape == (3, 1, 2, 2)


def one_line(err: pytest.ExceptionInfo) -> bool:
    return "\n" not in str(err.value) and str(err.value) != ""


def test_batch_size_conflict_raises():
    with pytest.raises(MaskError) as err:
        padding([[True], [True]]) & document([[0], [0], [0]])
    assert one_line(err)
    with pytest.raises(MaskError) as err:
        padding([[True], [True]]).materialize(1, 1, batch_size=3)
    assert one_line(err)
    with pytest.raises(MaskError) as err:
        causal().materialize(torch.zeros(2, 1, dtype=torch.long), torch.zeros(3, 1, dtype=torch.long))
    assert one_line(err)


@pytest.mark.parametrize("parents", [[0], [-1, 1], [-1, 2, 0], [-2], [[-1, 0], [-1, -3]]])
def test_bad_tree_parents_raise(parents):
    with pytest.raises(MaskError) as err:
        tree(parents, start=0)
    assert one_line(err)


def test_bad_inputs_raise():
    for build in (
        lambda: window(0),
        lambda: prefix(-1),
        lambda: padding(torch.zeros(1, 1, 1, dtype=torch.bool)),
        lambda: document(torch.zeros(3)),
        lambda: tree([], start=0),
        lambda: causal().materialize(torch.zeros(2), 2),
    ):
        with pytest.raises(MaskError) as err:
            build()
        assert one_line(err)
