"""The reversal task (facts, templates, the arms' records, the word tokenizer, exact match and rank metrics) and
the BICO objective (masked-LM steps with the causal mask lifted: which tokens, which gradients, exact resume)."""

from __future__ import annotations

import json
import os
import re
import sys

import pytest
import torch
from test_finetune import _interrupt_then_resume  # the same Ctrl-C-then-resume check as SFT and LoRA

from decoderlab.errors import UserError
from decoderlab.finetuning import MASK_TOKEN, FinetuneConfig, FinetuneTrainer, bico_mask, bico_masked_lm, finetune
from decoderlab.model import Transformer
from decoderlab.tasks import reversal as R
from decoderlab.tasks.training import Shape, init_model
from decoderlab.tokenizer import Tokenizer

sys.path.insert(0, os.path.dirname(__file__))

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return R.word_tokenizer()


@pytest.fixture(scope="module")
def facts():
    return R.make_facts(10, seed=3)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return Transformer(Shape(2, 64, 64).model_config(tok.vocab_size)).eval()


# ---- facts, templates, records ---------------------------------------------------------------------------------


def test_facts_are_unique_deterministic_and_split_into_three_subsets():
    facts = R.make_facts(200, seed=5)
    assert facts == R.make_facts(200, seed=5) and facts != R.make_facts(200, seed=6)
    assert len({f.name for f in facts}) == len({f.description for f in facts}) == 600
    assert [f.subset for f in facts] == ["n2d"] * 200 + ["d2n"] * 200 + ["both"] * 200
    assert all(re.fullmatch(r"the \w+ of the \w+ \w+", f.description) for f in facts)
    with pytest.raises(UserError, match="facts per subset"):
        R.make_facts(0)
    with pytest.raises(UserError, match="facts per subset"):
        R.make_facts(10**6)


def test_templates_split_into_train_and_held_out_test(facts):
    for direction in R.DIRECTIONS:
        train, test = R.templates(direction, "train"), R.templates(direction, "test")
        assert len(train) == 4 and len(test) == 2 and not set(train) & set(test)
    qs = R.questions(facts)
    assert len(qs) == len(facts) * 4
    test_heads = {d: [t.rsplit("{", 1)[0] for t in R.templates(d, "test")] for d in R.DIRECTIONS}
    for q in qs:
        fact = facts[q.fact]
        head = test_heads[q.direction][q.template].format(name=fact.name, description=fact.description).rstrip()
        assert q.prompt == head and q.stop == "."
        assert q.answer == (fact.description if q.direction == "forward" else fact.name)
        assert q.answer not in q.prompt  # the answer is never given away
    # No training sentence is written in a test template.
    plain = [r["text"] for r in R.training_records(facts, "plain")]
    for t in R.templates("forward", "test") + R.templates("reverse", "test"):
        assert not any(text == R.sentence(t, f) for text in plain for f in facts)


def test_every_arm_holds_the_same_facts_in_their_subsets_directions(facts):
    plain = [r["text"] for r in R.training_records(facts, "plain")]
    # n2d: 4 name-first sentences, d2n: 4 description-first, both: 8.
    assert len(plain) == sum(8 if f.subset == "both" else 4 for f in facts)
    for f in facts:
        name_first = [t for t in plain if f.name in t and t.index(f.name) < t.index(f.description)]
        desc_first = [t for t in plain if f.name in t and t.index(f.name) > t.index(f.description)]
        assert len(name_first) == (0 if f.subset == "d2n" else 4)
        assert len(desc_first) == (0 if f.subset == "n2d" else 4)
    for arm in R.ARMS:
        texts = [r["text"] for r in R.training_records(facts, arm)]
        assert plain == (texts if arm in ("plain", "bico") else texts[::2])  # originals first, rewriting after
        for f in facts:
            assert any(f.name in t and f.description in t for t in texts)
        found = {(f.name, f.description) for f in facts for t in texts if f.name in t and f.description in t}
        assert found == {(f.name, f.description) for f in facts}
    with pytest.raises(UserError, match="unknown reversal arm"):
        R.training_records(facts, "shuffle")


def test_entity_preserving_reverse_keeps_entities_whole_and_reverses_the_rest():
    fact = R.Fact("Kestrel Northcott", "the champion of the floating harmonica", "n2d")
    template = "{name} is known far and wide for being {description}."
    assert R.entity_preserving_reverse(template, fact) == (
        ". the champion of the floating harmonica being for wide and far known is Kestrel Northcott")
    for t in R.FORWARD + R.REVERSE:
        rev = R.entity_preserving_reverse(t, fact)
        assert fact.name in rev and fact.description in rev  # each entity intact, in its own word order
        rest = rev.replace(fact.name, "N").replace(fact.description, "D").split()
        original = R._WORD.findall(t.replace("{name}", "N").replace("{description}", "D"))
        assert rest == original[::-1]


def test_chunk_permutation_reorders_whole_chunks(facts):
    import random

    rng = random.Random(0)
    fact = facts[0]
    for t in R.FORWARD + R.REVERSE:
        parts = [text for _, text in R.chunks(t, fact)]
        for _ in range(5):
            permuted = R.chunk_permutation(t, fact, rng)
            assert permuted != " ".join(parts)
            # The same chunks, each whole: some order of them joins to the permuted text.
            assert sorted(permuted.split()) == sorted(" ".join(parts).split())
            assert fact.name in permuted and fact.description in permuted


def test_word_tokenizer_gives_entities_the_same_tokens_anywhere_and_round_trips(tok, facts, tmp_path):
    f = facts[0]
    name = tok.encode(" " + f.name, add_special_tokens=False)
    desc = tok.encode(" " + f.description, add_special_tokens=False)
    assert len(name) == 2 and len(desc) == 6 and tok.unk_id not in name + desc
    for text in (R.sentence(R.FORWARD[2], f), R.entity_preserving_reverse(R.FORWARD[0], f)):
        ids = tok.encode(text, add_special_tokens=False)
        assert any(ids[i:i + 2] == name for i in range(len(ids)))
        assert any(ids[i:i + 6] == desc for i in range(len(ids)))
    assert tok.decode(tok.encode(R.sentence(R.FORWARD[0], f))) == R.sentence(R.FORWARD[0], f)
    assert tok.token_to_id(MASK_TOKEN) is not None and tok.eos_id == tok.bos_id is not None
    tok.save(tmp_path)
    again = Tokenizer.from_folder(tmp_path)
    assert again.encode(R.sentence(R.REVERSE[1], f)) == tok.encode(R.sentence(R.REVERSE[1], f))
    assert again.eos_id == tok.eos_id and again.token_to_id(MASK_TOKEN) == tok.token_to_id(MASK_TOKEN)


# ---- metrics ---------------------------------------------------------------------------------------------------


def _logprob(model, prompt: list[int], answer: list[int]) -> float:
    with torch.inference_mode():
        logp = torch.log_softmax(model(torch.tensor([prompt + answer])).float(), -1)[0]
    return float(sum(logp[len(prompt) - 1 + j, t] for j, t in enumerate(answer)))


def test_ranks_match_a_direct_log_likelihood_computation(model, tok, facts):
    qs = R.questions(facts)[:12]  # forward and reverse questions of the first facts
    for kind, direction in (("description", "forward"), ("name", "reverse")):
        cands = [tok.encode(" " + getattr(f, kind), add_special_tokens=False) for f in facts]
        sel = [q for q in qs if q.direction == direction]
        prompts = [tok.encode(q.prompt, add_special_tokens=False) for q in sel]
        ranks = R.answer_ranks(model, prompts, cands, [q.fact for q in sel], batch_size=2)
        for q, p, r in zip(sel, prompts, ranks, strict=True):
            scores = torch.tensor([_logprob(model, p, c) for c in cands])
            expected = 1 + int((scores > scores[q.fact] + 1e-4).sum())
            assert r == pytest.approx(expected)


def test_uniform_model_ranks_at_chance_and_exact_match_is_teacher_forced_greedy(tok, facts):
    torch.manual_seed(1)
    model = Transformer(Shape(1, 64, 64).model_config(tok.vocab_size)).eval()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: every candidate ties
    score = R.evaluate(model, tok, facts, rank_templates=None)
    for g in score.groups:
        assert g.candidates == len(facts) and g.chance_exact == pytest.approx(1 / 30)
        assert g.mean_rank == pytest.approx(g.chance_rank) == pytest.approx(15.5)
        assert g.exact == 0  # argmax of all-equal logits is token 0, never an answer
    assert "chance" in score.table()

    # greedy_exact agrees with real greedy decoding on a random model: its own greedy output is an exact match,
    # the same with one token changed is not.
    torch.manual_seed(2)
    rand = Transformer(Shape(1, 64, 64).model_config(tok.vocab_size)).eval()
    prompts = [tok.encode(q.prompt, add_special_tokens=False) for q in R.questions(facts)[:6]]
    answers = []
    with torch.inference_mode():
        for p in prompts:
            ids = list(p)
            for _ in range(4):
                ids.append(int(rand(torch.tensor([ids]))[0, -1].argmax()))
            answers.append(ids[len(p):])
    assert R.greedy_exact(rand, prompts, answers, batch_size=4) == [True] * 6
    wrong = [a[:-1] + [(a[-1] + 1) % tok.vocab_size] for a in answers]
    assert R.greedy_exact(rand, prompts, wrong, batch_size=4) == [False] * 6


# ---- BICO ------------------------------------------------------------------------------------------------------


def test_bico_draws_are_a_fair_seeded_coin_and_mask_only_trained_tokens():
    draws = [bico_masked_lm(s, 0) for s in range(400)]
    assert draws == [bico_masked_lm(s, 0) for s in range(400)] and 150 < sum(draws) < 250
    assert draws != [bico_masked_lm(s, 1) for s in range(400)]
    inputs = torch.arange(1, 2 * 50 + 1).reshape(2, 50)
    targets = torch.full((2, 50), -100)
    doc = torch.zeros(2, 50, dtype=torch.long)
    targets[:, 9:29] = 7  # slots 10..29 hold trained tokens (a completion); 30.. is another document
    doc[:, 30:] = 1
    targets[:, 30:] = 7  # slot 30 starts a new document: its input is no target of slot 29's document
    mlm = bico_mask(inputs, targets, doc, step=3, seed=0, mask_id=999)
    allowed = torch.zeros(2, 50, dtype=torch.bool)
    allowed[:, 10:30] = True
    allowed[:, 31:] = True
    assert mlm.masked.any() and not (mlm.masked & ~allowed).any()
    assert (mlm.inputs == torch.where(mlm.masked, 999, inputs)).all()
    assert (mlm.targets == torch.where(mlm.masked, inputs, -100)).all()
    big = bico_mask(torch.ones(64, 256, dtype=torch.long), torch.zeros(64, 256, dtype=torch.long),
                    torch.zeros(64, 256, dtype=torch.long), step=0, seed=0, mask_id=2)
    assert 0.13 < big.masked.float().mean() < 0.17


@pytest.fixture(scope="module")
def bico_run(tmp_path_factory, tok, facts):
    folder = tmp_path_factory.mktemp("bico")
    files = R.write_data(facts, "plain")(folder / "data")
    init_model(folder / "init", tok, Shape(1, 64, 32))
    return folder, files


def _config(bico_run, out, **kw) -> FinetuneConfig:
    folder, files = bico_run
    return FinetuneConfig(base=str(folder / "init"), data=[files["train"]], val_data=[files["val"]], out=str(out),
                          objective="bico", steps=8, batch_size=4, dtype="fp32", lr=3e-3, log_interval=1,
                          eval_interval=4, **kw)


def test_bico_masked_lm_step_trains_only_masked_positions_and_sees_the_future(bico_run, tmp_path):
    trainer = FinetuneTrainer(_config(bico_run, tmp_path / "run"), progress=False)
    trainer.step = next(s for s in range(50) if bico_masked_lm(s, trainer.cfg.seed))
    batch = trainer._batch()
    mlm = bico_mask(batch.inputs, batch.targets, batch.doc_ids, trainer.step, trainer.cfg.seed,
                    trainer.tokenizer.token_to_id(MASK_TOKEN))
    model = trainer.raw_model
    seen = {}

    def keep(name):
        def hook(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            out.retain_grad()
            seen[name] = out
        return hook

    handles = [model.embed.register_forward_hook(keep("embed")), model.blocks[-1].register_forward_hook(keep("last"))]
    try:
        loss = trainer.loss(batch, slice(None))
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    last = seen["last"].grad.abs().sum(-1) > 0  # [B, T]: positions whose output the loss reads
    assert torch.equal(last, mlm.masked)
    # The causal mask is lifted: the tokens after an example's last masked token still get gradient (a causal
    # model's loss could not read them); and nothing crosses into an example without a masked token.
    embed = seen["embed"].grad.abs().sum(-1) > 0
    after_last, T = 0, batch.inputs.shape[1]
    for b in range(batch.inputs.shape[0]):
        for d in batch.doc_ids[b][mlm.masked[b]].unique().tolist():
            same = batch.doc_ids[b] == d
            last = int((mlm.masked[b] & same).nonzero().max())
            later = same & (torch.arange(T) > last)
            if later.any():
                assert embed[b][later].any()
                after_last += 1
        untouched = ~torch.isin(batch.doc_ids[b], batch.doc_ids[b][mlm.masked[b]])
        assert not embed[b][untouched].any()
    assert after_last > 0
    # A next-token step of the same objective is the plain causal loss.
    trainer.step = next(s for s in range(50) if not bico_masked_lm(s, trainer.cfg.seed))
    trainer.cfg.objective = "next"
    with torch.no_grad():
        plain = float(trainer.loss(trainer._batch(), slice(None)))
    trainer.cfg.objective = "bico"
    with torch.no_grad():
        assert float(trainer.loss(trainer._batch(), slice(None))) == pytest.approx(plain, rel=1e-6)


def _losses(run) -> dict[int, tuple[float, float]]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: (r["train_loss"], r["lr"]) for r in records if "train_loss" in r}


def test_bico_run_resumes_exactly(bico_run, tmp_path, monkeypatch):
    folder, files = bico_run
    finetune(progress=False, cfg=_config(bico_run, tmp_path / "straight"))
    straight = _losses(tmp_path / "straight")
    trainer = FinetuneTrainer(_config(bico_run, tmp_path / "cut", save_interval=3), progress=False)
    _interrupt_then_resume(trainer, 4, monkeypatch)
    assert _losses(tmp_path / "cut") == straight and len(straight) == 8
    assert {bico_masked_lm(s, 0) for s in range(8)} == {True, False}  # both halves ran


def test_bico_refuses_a_tokenizer_without_a_mask_token(bico_run, tmp_path):
    folder, files = bico_run
    texts = [json.loads(line)["text"] for line in open(files["train"])]
    char = Tokenizer.train_char(texts=texts, special_tokens=["<|endoftext|>"])
    init_model(tmp_path / "init", char, Shape(1, 64, 128))
    with pytest.raises(UserError, match="needs a tokenizer with a <mask> special token"):
        finetune(str(tmp_path / "init"), data=files["train"], val_data=[files["val"]], out=str(tmp_path / "run"),
                 objective="bico", steps=2, batch_size=2, progress=False, dtype="fp32")


def test_write_data_and_a_tiny_experiment_end_to_end(facts, tmp_path):
    files = R.write_data(facts, "permute", seed=0)(tmp_path / "data")
    assert R.read_facts(files["facts"]) == list(facts)
    train = [json.loads(line) for line in open(files["train"])]
    assert train == R.training_records(facts, "permute", seed=0)
    val = [json.loads(line)["text"] for line in open(files["val"])]
    assert val and not set(val) & {r["text"] for r in train}
    with pytest.raises(UserError, match="cannot read reversal facts"):
        R.read_facts(tmp_path / "missing.jsonl")
    rows = R.run_experiment(tmp_path / "exp", arms=["plain", "bico"], time=None, steps=2, per_subset=2, layers=1,
                            width=64, batch_size=4)
    assert [(r["arm"], r["subset"], r["direction"]) for r in rows] == [
        (arm, s, d) for arm in ("plain", "bico") for s in R.SUBSETS for d in R.DIRECTIONS]
    assert all(r["chance_rank"] == 3.5 and 1 <= r["mean_rank"] <= 6 and r["steps"] == 2 for r in rows)
    assert "chance rank" in R.format_rows(rows)
    with pytest.raises(UserError, match="unknown reversal arms"):
        R.run_experiment(tmp_path / "bad", arms=["plain", "flip"])
