"""PINE: matches a slow, literal reference; order-free over segments; one segment = plain; batching; errors;
and the position-bias probe on a model trained by decoderlab on a task with options."""

from __future__ import annotations

import itertools
import json
import math
import string
import subprocess
import sys

import pytest
import torch

import decoderlab
from decoderlab import evaluate, pine
from decoderlab.errors import UserError


def _random_model(**overrides) -> decoderlab.Transformer:
    torch.manual_seed(0)
    cfg = dict(vocab_size=60, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, context_length=128,
               positions="rope", norm="rmsnorm", activation="swiglu", qk_norm=True, init_std=0.2)
    cfg.update(overrides)
    return decoderlab.Transformer(decoderlab.ModelConfig(**cfg)).eval()


def _ids(seed: int, *lengths: int, vocab: int = 50) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _reference_attention(model, prefix, segments, suffix):
    """PINE as the paper states it, one head and one query at a time: rank the other segments by attention
    without positions, move their keys back by the lengths of the segments ranked above them, apply RoPE."""
    P, lens = len(prefix), [len(s) for s in segments]
    L = sum(lens)
    group = [0] * P + [j + 1 for j, s in enumerate(segments) for _ in s] + [0] * len(suffix)
    base = (list(range(P)) + [P + L - n + r for n in lens for r in range(n)]
            + list(range(P + L, P + L + len(suffix))))
    inv_freq = model.rope_inv_freq.double()

    def rope(x, pos):
        angle = pos * inv_freq
        cos, sin = torch.cat([angle.cos()] * 2), torch.cat([angle.sin()] * 2)
        half = x.shape[-1] // 2
        return x * cos + torch.cat([-x[half:], x[:half]]) * sin

    def attend(layer, q, k, v):
        q, k, v = q.double(), k.double(), v.double()
        _, H, T, D = q.shape
        groups = H // k.shape[1]
        out = torch.zeros_like(q)
        for h in range(H):
            kh, vh = k[0, h // groups], v[0, h // groups]
            # Attention of each query to each segment, no positions, own segment excluded; mean per segment.
            per_segment = torch.zeros(T, len(segments), dtype=torch.double)
            for t in range(T):
                keys = [s for s in range(T) if group[s] > 0 and group[s] != group[t]]
                if not keys:
                    continue
                w = torch.softmax(torch.stack([q[0, h, t] @ kh[s] for s in keys]) / math.sqrt(D), 0)
                for weight, s in zip(w, keys, strict=True):
                    per_segment[t, group[s] - 1] += weight / lens[group[s] - 1]
            for t in range(T):
                if group[t] > 0:  # a segment's tokens rank from their summed attention
                    score = sum(per_segment[u] for u in range(T) if group[u] == group[t]).clone()
                    score[group[t] - 1] = math.inf
                else:
                    score = per_segment[t]
                ranked = sorted(range(len(segments)), key=lambda j: -float(score[j]))
                shift = {j: sum(lens[i] for i in ranked[:ranked.index(j)]) for j in range(len(segments))}
                visible = [s for s in range(T) if s <= t or (group[t] > 0 and group[s] > 0 and group[s] != group[t])]
                qt = rope(q[0, h, t], base[t])
                logits = torch.stack([qt @ rope(kh[s], base[s] - (shift[group[s] - 1] if group[s] else 0))
                                      for s in visible]) / math.sqrt(D)
                out[0, h, t] = torch.softmax(logits, 0) @ vh[visible]
        return out.float()

    return attend


def test_matches_slow_reference():
    model = _random_model()
    prefix, suffix = _ids(1, 3, 3)
    segments = _ids(2, 4, 2, 5)
    with torch.no_grad():
        expected = model(torch.tensor([prefix + sum(segments, []) + suffix]),
                         attention=_reference_attention(model, prefix, segments, suffix))[0, -1]
    got = pine.logits(model, prefix, segments, suffix, sort_segments=False)
    assert (got - expected).abs().max() < 1e-4
    with torch.no_grad():
        plain = model(torch.tensor([prefix + sum(segments, []) + suffix]))[0, -1]
    assert (got - plain).abs().max() > 1e-2


def _model_for(kind, hf_folder, choice_model):
    if kind == "trained":
        return choice_model[0]
    return decoderlab.load(hf_folder(kind))


KINDS = ["llama", "qwen2", "trained"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_order_of_the_segments_gives_the_same_logits(kind, hf_folder, choice_model):
    model = _model_for(kind, hf_folder, choice_model)
    vocab = min(model.config.vocab_size, 18)
    prefix, suffix = _ids(3, 4, 3, vocab=vocab)
    segments = _ids(4, 3, 5, 2, 4, vocab=vocab)
    orders = list(itertools.permutations(range(4)))
    items = [(prefix, [segments[j] for j in order], suffix) for order in orders]
    out = pine.batch_logits(model, items, sort_segments=False)  # the method alone, in one batch
    assert (out - out[0]).abs().max() <= 1e-4
    exact = [pine.logits(model, *item) for item in items[:6]]  # canonical order first: bit-for-bit equal
    assert all(torch.equal(e, exact[0]) for e in exact)
    assert (exact[0] - out[0]).abs().max() <= 1e-4
    plain = model(torch.tensor([it[0] + sum(it[1], []) + it[2] for it in items[:2]]))[:, -1]
    assert (plain[0] - plain[1]).abs().max() > 1e-3  # the plain reading does depend on the order


@pytest.mark.parametrize("kind", KINDS)
def test_one_segment_is_the_plain_forward_pass(kind, hf_folder, choice_model):
    model = _model_for(kind, hf_folder, choice_model)
    vocab = min(model.config.vocab_size, 18)
    prefix, segment, suffix = _ids(5, 6, 7, 3, vocab=vocab)
    plain = model(torch.tensor([prefix + segment + suffix]))[0]
    assert (pine.logits(model, prefix, [segment], suffix) - plain[-1]).abs().max() <= 1e-4
    rows = pine.suffix_logits(model, [(prefix, [segment], suffix)])[0]
    assert (rows - plain[-len(suffix):]).abs().max() <= 1e-4


def test_batch_equals_alone_and_suffix_rows():
    model = _random_model()
    items = [(_ids(6, 3)[0], _ids(7, 2, 6, 3), _ids(8, 4)[0]), ([], _ids(9, 5), _ids(10, 1)[0]),
             (_ids(11, 1)[0], _ids(12, 1, 1, 2, 7), _ids(13, 2)[0])]
    together = pine.batch_logits(model, items)
    rows = pine.suffix_logits(model, items)
    for i, item in enumerate(items):
        alone = pine.logits(model, *item)
        assert (together[i] - alone).abs().max() <= 1e-4
        assert rows[i].shape == (len(item[2]), model.config.vocab_size)
        assert (rows[i][-1] - alone).abs().max() <= 1e-4
    # The suffix rows are the next-token logits of shorter suffixes.
    prefix, segments, suffix = items[0]
    shorter = pine.logits(model, prefix, segments, suffix[:2])
    assert (rows[0][1] - shorter).abs().max() <= 1e-4


def test_generate_is_order_free_and_plain_with_one_segment():
    model = _random_model()
    prefix, suffix = _ids(14, 4, 2)
    segments = _ids(15, 3, 4, 2)
    outs = {tuple(pine.generate(model, prefix, [segments[j] for j in order], suffix, 12,
                                stop_tokens=[]).tokens[0])
            for order in itertools.permutations(range(3))}
    assert len(outs) == 1 and len(next(iter(outs))) == 12
    one = pine.generate(model, prefix, [segments[0]], suffix, 12, stop_tokens=[]).tokens[0]
    assert one == decoderlab.generate(model, [prefix + segments[0] + suffix], 12, stop_tokens=[]).tokens[0]
    # Each generated token re-ranks from its own view: the first token equals argmax of the PINE logits, and
    # a batch decodes as its rows would alone.
    first = int(pine.logits(model, prefix, segments, suffix).argmax())
    items = [(prefix, segments, suffix), ([], segments[:2], suffix[:1])]
    batch = pine.batch_generate(model, items, 6, stop_tokens=[]).tokens
    assert batch[0][0] == first
    for row, item in zip(batch, items, strict=True):
        assert row == pine.generate(model, *item, 6, stop_tokens=[]).tokens[0]
    sampled = [pine.generate(model, prefix, segments, suffix, 8, temperature=1.0, seed=3, stop_tokens=[]).tokens
               for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_build_from_text():
    tok = decoderlab.Tokenizer.train_char(texts=[string.printable])
    item = pine.build(tok, "Q: which?\n{segments}A:", ["red", "blue"], segment_template="- {document}\n")
    assert tok.decode(item.prefix) == "Q: which?\n"
    assert [tok.decode(s) for s in item.segments] == ["- red\n", "- blue\n"]
    assert tok.decode(item.suffix) == "A:"
    assert tok.decode(item.tokens) == "Q: which?\n- red\n- blue\nA:"


def test_bad_input_is_one_line_errors():
    model = _random_model()
    cases = [
        (lambda: pine.logits(model, [1], [], [2]), "no segments"),
        (lambda: pine.logits(model, [1], [[3], []], [2]), "segment 1 is empty"),
        (lambda: pine.logits(model, [1], [[3]], []), "suffix is empty"),
        (lambda: pine.logits(model, [1], [[3] * 70, [4] * 70], [2]), "context length of 128"),
        (lambda: pine.generate(model, [1], [[3] * 60], [2], 80), "context length of 128"),
        (lambda: pine.logits(model, [1], [[99]], [2]), "not a token id"),
        (lambda: pine.logits(_random_model(positions="learned", norm="layernorm"), [1], [[3]], [2]),
         "needs a RoPE model"),
        (lambda: pine.logits(_random_model(positions="none"), [1], [[3]], [2]), "needs a RoPE model"),
    ]
    for call, words in cases:
        with pytest.raises(UserError, match=words) as info:
            call()
        assert "\n" not in str(info.value)
    tok = decoderlab.Tokenizer.train_char(texts=[string.printable])
    with pytest.raises(UserError, match="exactly once"):
        pine.build(tok, "no placeholder", ["a"])
    with pytest.raises(UserError, match="at least one document"):
        pine.build(tok, "{segments}", [])


def test_position_bias_probe_plain_flips_and_pine_does_not(choice_model):
    model, tok = choice_model
    items = [evaluate.ChoiceItem.from_text(tok, it["prefix"], it["options"], it["suffix"], it["answer"])
             for it in evaluate.max_number_task(100, seed=999)]
    plain = evaluate.position_bias(model, items, method="plain")
    with_pine = evaluate.position_bias(model, items, method="pine")
    assert plain.flip_rate > 0  # the plain reading changes its choice when the options are rotated
    assert with_pine.flip_rate == 0
    assert len(set(with_pine.accuracy_by_position)) == 1
    assert with_pine.accuracy > 0.5 and plain.accuracy > 0.5  # the model did learn the task
    assert abs(sum(plain.chosen_position) - 1) < 1e-9


def test_choice_scores_and_probe_errors(choice_model):
    model, tok = choice_model
    item = evaluate.ChoiceItem.from_text(tok, "max:", [" 12", " 97", " 40"], " ->", 1)
    scores = evaluate.choice_scores(model, item)
    assert scores.shape == (3,) and int(scores.argmax()) == 1
    # Scores follow the options, not the slots: reordering moves no score with PINE.
    a = evaluate.choice_scores(model, item, order=[2, 0, 1], method="pine")
    b = evaluate.choice_scores(model, item, method="pine")
    assert torch.equal(a, b)
    with pytest.raises(UserError, match="unknown method"):
        evaluate.position_bias(model, [item], method="magic")
    with pytest.raises(UserError, match="at least two"):
        evaluate.position_bias(model, [evaluate.ChoiceItem([1], [[2]], [3], 0)])
    with pytest.raises(UserError, match="not an option index"):
        evaluate.position_bias(model, [evaluate.ChoiceItem([1], [[2], [3]], [3], 5)])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "decoderlab", *args], capture_output=True, text=True, timeout=120)


def test_cli_pine_and_position_bias(choice_run, choice_model, tmp_path):
    model, tok = choice_model
    options = [" 37", " 82", " 15", " 64"]
    out = _cli("pine", str(choice_run), "max:{segments} ->", *(f"--segment={o}" for o in options), "-n", "3",
               "--compare")
    assert out.returncode == 0, out.stderr
    item = pine.build(tok, "max:{segments} ->", options)
    expected = pine.generate(model, item.prefix, item.segments, item.suffix, 3, tokenizer=tok).texts[0]
    assert out.stdout.splitlines()[0] == f"pine:  {expected}" and out.stdout.splitlines()[1].startswith("plain: ")
    items = tmp_path / "items.jsonl"
    items.write_text("".join(json.dumps(it) + "\n" for it in evaluate.max_number_task(12, seed=5)))
    out = _cli("position-bias", str(choice_run), "--items", str(items))
    assert out.returncode == 0, out.stderr
    ours = evaluate.position_bias(model, [evaluate.ChoiceItem.from_text(tok, it["prefix"], it["options"],
                                                                        it["suffix"], it["answer"])
                                          for it in evaluate.max_number_task(12, seed=5)], method="plain")
    assert f"{ours.accuracy:.3f}" in out.stdout and "pine" in out.stdout
    for args, words in [(("pine", str(choice_run), "max:{segments} ->"), "no segments"),
                        (("pine", str(choice_run), "max: ->", "-s", " 1"), "exactly once"),
                        (("position-bias", str(choice_run)), "exactly one of"),
                        (("position-bias", str(choice_run), "--synthetic", "3", "--method", "x"), "unknown method")]:
        out = _cli(*args)
        assert out.returncode == 2 and words in out.stderr and out.stderr.count("\n") == 1, out.stderr
