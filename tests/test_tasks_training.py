"""Training on a task and solving with the model: `decoderlab.tasks.training` (a fresh model, loss on the answers),
`sudoku.solve_with_model` (greedy and beam decoding over the KV cache, checked against brute force without a
cache) and the `decoderlab tasks` commands."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from decoderlab.checkpoint import load
from decoderlab.errors import UserError
from decoderlab.tasks import sudoku as S
from decoderlab.tasks.training import Shape, init_model, task_info
from decoderlab.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def run4(tmp_path_factory):
    """A tiny 4x4 run: 40 steps of a 1-layer model (enough to write well-formed moves, not to solve)."""
    out = tmp_path_factory.mktemp("sudoku4") / "run"
    torch.set_num_threads(1)
    result = S.train_model(out, size=4, puzzles=400, heldout=40, layers=1, width=64, steps=40, progress=False)
    return out, result


SLOTS4 = ["abcd", "ABCD", "1234"]


def _reference_greedy(model, tok, puzzle):
    """Greedy moves, each slot's token among its own characters, recomputing the whole text at every token."""
    text = S.prompt_text(puzzle.clues)
    for _ in range(int((puzzle.clues == 0).sum())):
        for chars in SLOTS4:
            ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
            logits = model(ids)[0, -1]
            text += chars[int(logits[[tok.token_to_id(ch) for ch in chars]].argmax())]
    return S.parse_line(text)[1]


def test_train_model_writes_a_task_run(run4):
    out, result = run4
    info = task_info(out)
    assert info["task"] == "sudoku" and info["size"] == 4 and info["order"] == "solver"
    assert info["shape"] == {"layers": 1, "width": 64, "context": S.text_length(4)}
    assert result.steps == 40 and result.val_loss < result.val_loss_before
    # the loss falls on the moves only: the held-out loss is over completion tokens
    rec = json.loads((out / "task" / "data" / "train.jsonl").read_text().splitlines()[0])
    assert rec["prompt"].endswith(">") and rec["completion"].endswith("\n")
    model = load(out)
    assert model.config.n_layers == 1 and model.config.vocab_size == len(S.alphabet(4))


def test_greedy_with_the_cache_equals_recomputing_without_it(run4):
    out, _ = run4
    model, tok = load(out, pack=False).eval(), Tokenizer.from_folder(out)
    held = S.read_puzzles(out / "task" / "data" / "heldout.jsonl")[:6]
    score = S.solve_with_model(model, tok, held, beam=1, batch_size=4)
    with torch.inference_mode():
        for puzzle, s in zip(held, score.scores, strict=True):
            want = S.score_moves(puzzle, _reference_greedy(model, tok, puzzle))
            assert s.verdicts == want.verdicts


def test_beam_over_one_move_finds_the_most_likely_move(run4):
    """With one move left and a beam as wide as all n^3 moves, the beam's best is the argmax over every move."""
    out, _ = run4
    model, tok = load(out, pack=False).eval(), Tokenizer.from_folder(out)
    puzzle = S.read_puzzles(out / "task" / "data" / "heldout.jsonl")[0]
    r, c = map(int, np.argwhere(puzzle.clues == 0)[0])
    one_left = S.Puzzle(puzzle.solution.copy(), puzzle.solution)
    one_left.clues[r, c] = 0
    slot_ids = [[tok.token_to_id(ch) for ch in chars] for chars in SLOTS4]
    prompt = S.prompt_text(one_left.clues)
    best, best_lp = None, -np.inf
    with torch.inference_mode():
        for r, c, v in np.ndindex(4, 4, 4):
            move = SLOTS4[0][r] + SLOTS4[1][c] + SLOTS4[2][v]
            ids = torch.tensor([tok.encode(prompt + move, add_special_tokens=False)])
            logp = torch.log_softmax(model(ids)[0].float(), -1)
            T = ids.shape[1]
            # each slot's log-probability renormalised over that slot's characters, as the beam scores it
            lp = sum(float(torch.log_softmax(logp[T - 4 + j, slot_ids[j]], -1)[k]) for j, k in enumerate((r, c, v)))
            if lp > best_lp:
                best, best_lp = (r, c, v + 1), lp
        found = S._beam_moves(model, torch.tensor([tok.encode(prompt, add_special_tokens=False)]), 1,
                              torch.tensor(slot_ids), beam=64)
    assert found == [[best]]
    # beam 2 on a few puzzles: well-formed moves, one per empty cell
    held = S.read_puzzles(out / "task" / "data" / "heldout.jsonl")[:5]
    score = S.solve_with_model(model, tok, held, beam=2)
    assert [len(s.verdicts) for s in score.scores] == [int((p.clues == 0).sum()) for p in held]
    assert "unparsable" not in score.verdict_counts and "out_of_range" not in score.verdict_counts


def test_solve_with_model_refuses_other_tokenizers(tmp_path):
    tok = Tokenizer.train_char(texts=["abc"])
    init_model(tmp_path / "m", tok, Shape(1, 64, 32))
    model = load(tmp_path / "m")
    with pytest.raises(UserError, match="not trained on sudoku"):
        S.solve_with_model(model, tok, S.generate_puzzles(1, 4))
    with pytest.raises(UserError, match="beam"):
        S.solve_with_model(model, tok, S.generate_puzzles(1, 4), beam=0)
    with pytest.raises(UserError, match="width"):
        Shape(1, 100, 32).model_config(10)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "decoderlab", *args], capture_output=True, text=True, timeout=600)


def test_tasks_cli_make_train_eval(tmp_path):
    made = _cli("tasks", "make", "sudoku", "--size", "4", "--puzzles", "60", "--heldout", "10", "--order",
                "random", "--out", str(tmp_path / "data"))
    assert made.returncode == 0, made.stderr
    assert len((tmp_path / "data" / "heldout.jsonl").read_text().splitlines()) == 10
    run = tmp_path / "run"
    trained = _cli("tasks", "train", "sudoku", "--size", "4", "--puzzles", "200", "--heldout", "20", "--layers", "1",
                   "--width", "64", "--steps", "6", "--score", "20", "--shuffle-rounds", "--no-progress", "--out",
                   str(run))
    assert trained.returncode == 0, trained.stderr
    assert "20 held-out puzzles, greedy: cell accuracy" in trained.stdout
    assert task_info(run)["shuffle_rounds"] is True
    again = _cli("tasks", "train", "sudoku", "--size", "4", "--steps", "6", "--out", str(run))
    assert again.returncode == 2 and "already holds a training run" in again.stderr
    assert again.stderr.count("\n") == 1  # one line, no traceback
    scored = _cli("tasks", "eval", str(run), "--beam", "2", "--count", "5", "--json", str(tmp_path / "s.json"))
    assert scored.returncode == 0, scored.stderr
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["beam"] == 2 and saved["puzzles"] == 5 and 0 <= saved["puzzle_accuracy"] <= 1
    for args, message in [(("tasks", "eval", str(tmp_path / "data")), "not a task run"),
                          (("tasks", "train", "sudoku", "--layers", "0", "--out", str(tmp_path / "z")), "1 layer"),
                          (("tasks", "train", "sudoku", "--time", "-3", "--out", str(tmp_path / "z")), "duration"),
                          (("tasks", "train", "chess", "--out", str(tmp_path / "x")), "unknown task"),
                          (("tasks", "train", "sudoku", "--order", "diagonal", "--out", str(tmp_path / "y")),
                           "unknown sudoku order")]:
        bad = _cli(*args)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
    assert not (tmp_path / "z").exists()  # a refused run writes nothing


def test_tasks_cli_reversal(tmp_path):
    made = _cli("tasks", "make", "reversal", "--arm", "reverse", "--facts", "3", "--out", str(tmp_path / "data"))
    assert made.returncode == 0, made.stderr
    records = [json.loads(x) for x in (tmp_path / "data" / "train.jsonl").read_text().splitlines()]
    assert records and all(set(r) == {"text"} for r in records)
    run = tmp_path / "run"
    trained = _cli("tasks", "train", "reversal", "--arm", "bico", "--facts", "3", "--layers", "1", "--width", "64",
                   "--steps", "4", "--no-progress", "--out", str(run))
    assert trained.returncode == 0, trained.stderr
    assert "n2d" in trained.stdout and "reverse" in trained.stdout and "chance" in trained.stdout
    assert task_info(run)["arm"] == "bico" and json.loads((run / "train_config.json").read_text())["objective"] \
        == "bico"
    scored = _cli("tasks", "eval", str(run), "--json", str(tmp_path / "r.json"))
    assert scored.returncode == 0, scored.stderr
    groups = json.loads((tmp_path / "r.json").read_text())["groups"]
    assert len(groups) == 6 and {g["candidates"] for g in groups} == {9}
    bad = _cli("tasks", "train", "reversal", "--arm", "sideways", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "unknown reversal arm" in bad.stderr
