"""decoderlab.tasks.sudoku: generator uniqueness and determinism, the logical solver's fills and strategy labels,
the three orders as text, and the move scoring."""

import itertools
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from decoderlab.errors import UserError
from decoderlab.tasks import sudoku as S


def grid(text: str) -> np.ndarray:
    rows = [r.strip() for r in text.strip().splitlines()]
    return np.array([[0 if ch == "." else int(ch) for ch in r] for r in rows], dtype=np.int8)


def is_valid_solution(g: np.ndarray) -> bool:
    n = g.shape[0]
    br, bc = S.box_shape(n)
    want = set(range(1, n + 1))
    boxes = [g[r:r + br, c:c + bc].reshape(-1) for r in range(0, n, br) for c in range(0, n, bc)]
    return all(set(line.tolist()) == want for line in [*g, *g.T, *boxes])


def apply(clues: np.ndarray, fills) -> np.ndarray:
    g = clues.copy()
    for f in fills:
        g[f.row, f.col] = f.value
    return g


@pytest.mark.parametrize("size,count", [(4, 40), (6, 40), (9, 3)])
def test_generated_puzzles_have_exactly_one_solution(size, count):
    for p in S.generate_puzzles(count, size, seed=3):
        assert p.clues.shape == (size, size)
        assert is_valid_solution(p.solution)
        given = p.clues > 0
        assert (p.clues[given] == p.solution[given]).all()
        assert given.sum() < size * size
        assert S.count_solutions(p.clues, limit=2) == 1


def test_generated_puzzles_are_minimal():
    # one pass of removals: a clue kept was not removable then, and so not now (fewer clues, still ambiguous)
    for p in S.generate_puzzles(8, 6, seed=11):
        for r, c in zip(*np.nonzero(p.clues), strict=True):
            fewer = p.clues.copy()
            fewer[r, c] = 0
            assert S.count_solutions(fewer, limit=2) == 2


def test_generation_is_seeded_and_batch_independent():
    a = S.generate_puzzles(20, 6, seed=5)
    b = S.generate_puzzles(20, 6, seed=5)
    c = S.generate_puzzles(20, 6, seed=6)
    prefix = S.generate_puzzles(7, 6, seed=5, batch=3)
    assert all((x.clues == y.clues).all() for x, y in zip(a[:7], prefix, strict=True))
    assert all((x.clues == y.clues).all() and (x.solution == y.solution).all() for x, y in zip(a, b, strict=True))
    assert any((x.solution != y.solution).any() for x, y in zip(a, c, strict=True))


def test_count_solutions_known_counts():
    assert S.count_solutions(np.zeros((4, 4), np.int8), limit=10_000) == 288  # all 4x4 sudokus
    clash = np.zeros((4, 4), np.int8)
    clash[0, 0] = clash[0, 3] = 1
    assert S.count_solutions(clash) == 0
    full = S.generate_puzzles(1, 9, seed=0)[0].solution
    assert S.count_solutions(full) == 1


@pytest.mark.parametrize("size", [4, 6, 9])
def test_logical_generation_and_solver_fills_are_correct(size):
    for p in S.generate_puzzles(15 if size < 9 else 3, size, seed=2, logical=True):
        result = S.solve_logically(p.clues)
        assert result.solved
        assert len(result.fills) == (p.clues == 0).sum()
        g = p.clues.copy()
        for f in result.fills:  # each fill lands on an empty cell with the solution's value
            assert g[f.row, f.col] == 0
            assert f.value == p.solution[f.row, f.col]
            assert f.strategy in S.STRATEGIES
            g[f.row, f.col] = f.value
        assert (g == p.solution).all()


def test_solver_reports_puzzles_it_cannot_finish():
    empty = np.zeros((4, 4), np.int8)  # 288 solutions: no deduction is possible
    result = S.solve_logically(empty)
    assert not result.solved and result.fills == []
    # a unique 9x9 puzzle that needs more than these strategies (the "AI Escargot"-style hard one)
    hard = grid("""
        1....7.9.
        .3..2...8
        ..96..5..
        ..53..9..
        .1..8...2
        6....4...
        3......1.
        .4......7
        ..7...3..""")
    assert S.count_solutions(hard) == 1
    result = S.solve_logically(hard)
    assert not result.solved
    solution = hard.copy()
    assert all(f.value for f in result.fills)
    for f in result.fills:  # what it did fill is still right
        solution[f.row, f.col] = f.value
    assert S.count_solutions(solution) == 1


def candidates(g: np.ndarray, r: int, c: int) -> set[int]:
    """The values the grid alone allows at (r, c), straight from the rules."""
    n = g.shape[0]
    br, bc = S.box_shape(n)
    r0, c0 = r - r % br, c - c % bc
    seen = set(g[r].tolist()) | set(g[:, c].tolist()) | set(g[r0:r0 + br, c0:c0 + bc].reshape(-1).tolist())
    return set(range(1, n + 1)) - seen


def first_fill(g, strategies=S.STRATEGIES):
    fills = S.solve_logically(g, strategies=strategies).fills
    return fills[0] if fills else None


def check_forced(g, fill):
    """The labelled fill agrees with the grid's unique solution."""
    assert S.count_solutions(g) == 1
    placed = g.copy()
    placed[fill.row, fill.col] = fill.value
    assert S.count_solutions(placed) == 1


def test_label_naked_single_when_it_is_the_only_move():
    g = grid("""
        .5...3.6.
        24...6.8.
        .6..71...
        482...5.6
        ....8....
        .7.6.....
        .2..6...1
        ...9...52
        .94.3.67.""")
    fill = first_fill(g)
    assert (fill.row, fill.col, fill.value, fill.strategy) == (1, 3, 5, "naked_single")
    # the cell's peers hold every other digit
    peers = set(g[1].tolist()) | set(g[:, 3].tolist()) | set(g[0:3, 3:6].reshape(-1).tolist())
    assert set(range(1, 10)) - peers == {5}
    # and no other strategy finds anything
    assert first_fill(g, [s for s in S.STRATEGIES if s != "naked_single"]) is None
    check_forced(g, fill)


def test_label_hidden_single_in_a_box():
    g = grid("""
        54....
        ..1...
        ....12
        .....3
        ..56..
        ....2.""")
    fill = first_fill(g)
    assert (fill.row, fill.col, fill.value, fill.strategy) == (3, 4, 6, "hidden_single_box")
    # in the box of rows 2-3, columns 3-5, a 6 fits only at (3, 4): column 3 already has one at (4, 3)
    assert g[4, 3] == 6
    assert first_fill(g, ["naked_single", "hidden_single_row", "hidden_single_col"]) is None
    check_forced(g, fill)


def test_label_locked_candidates_enable_a_fill():
    g = grid("""
        ....5.
        52...6
        2....5
        ..5.4.
        461523
        352..4""")
    assert first_fill(g, S.SINGLE_STRATEGIES) is None  # singles alone are stuck
    # by hand: (0, 5) may hold 1 or 2; box 0's 1 must sit in row 0 ((0, 2) and (1, 2) see the 1 at (4, 2)),
    # so 1 leaves the rest of row 0 and (0, 5) is a 2
    assert candidates(g, 0, 5) == {1, 2}
    assert 1 not in candidates(g, 0, 2) | candidates(g, 1, 2) and g[1, 0] and g[1, 1]
    assert 1 in candidates(g, 0, 0) and 1 in candidates(g, 0, 1)
    result = S.solve_logically(g)
    fill = result.fills[0]
    assert (fill.row, fill.col, fill.value, fill.strategy) == (0, 5, 2, "locked_pointing")
    first = result.eliminations[0]
    assert first.strategy == "locked_pointing" and first.pattern == ((0, 0), (0, 1)) and (0, 5, 1) in first.removed
    check_forced(g, fill)
    claiming = grid("""
        731492685
        .287.5.1.
        ..58.1.27
        5..3..7..
        .7.5...38
        3.21.75..
        .5621..79
        ..795..6.
        ..367485.""")
    assert first_fill(claiming, S.SINGLE_STRATEGIES + ("locked_pointing",)) is None
    fill = first_fill(claiming)
    assert (fill.row, fill.col, fill.value, fill.strategy) == (5, 7, 9, "locked_claiming")
    check_forced(claiming, fill)


def test_label_naked_and_hidden_pairs_enable_a_fill():
    g = grid("""
        ..4.9....
        .2.6..7..
        8.9.4..25
        ...1..98.
        9...6...3
        7.3..9...
        4..9.....
        396874152
        ..7.5....""")
    no_pairs = S.SINGLE_STRATEGIES + ("locked_pointing", "locked_claiming")
    assert first_fill(g, no_pairs) is None
    # by hand: (1, 0) and (1, 2) both allow only {1, 5}, so 1 leaves (1, 4); column 4 allowed 1 only at (1, 4)
    # and (6, 4), so (6, 4) is a 1
    assert candidates(g, 1, 0) == candidates(g, 1, 2) == {1, 5}
    assert [r for r in range(9) if not g[r, 4] and 1 in candidates(g, r, 4)] == [1, 6]
    result = S.solve_logically(g)
    fill = result.fills[0]
    assert (fill.row, fill.col, fill.value, fill.strategy) == (6, 4, 1, "naked_pair")
    first = result.eliminations[0]
    assert first.strategy == "naked_pair" and first.pattern == ((1, 0), (1, 2)) and first.after_fills == 0
    assert (1, 4, 1) in first.removed
    check_forced(g, fill)

    h = grid("""
        84..562..
        .7.421.8.
        .2.8.3..4
        462...531
        795132846
        138564729
        2.43.....
        6.72493.8
        3.96.54.2""")
    assert first_fill(h, no_pairs + ("naked_pair",)) is None
    # by hand: in row 6 the digits 6 and 9 fit only at (6, 6) and (6, 7), so those two cells hold nothing else;
    # 1 leaves (6, 6), and column 6 allowed 1 only at (2, 6) and (6, 6)
    row6 = {c: candidates(h, 6, c) for c in range(9) if not h[6, c]}
    assert [c for c, m in row6.items() if 6 in m] == [c for c, m in row6.items() if 9 in m] == [6, 7]
    assert [r for r in range(9) if not h[r, 6] and 1 in candidates(h, r, 6)] == [2, 6]
    result = S.solve_logically(h)
    fill = result.fills[0]
    assert (fill.row, fill.col, fill.value, fill.strategy) == (2, 6, 1, "hidden_pair")
    assert result.eliminations[0].pattern == ((6, 6), (6, 7)) and (6, 6, 1) in result.eliminations[0].removed
    check_forced(h, fill)


def test_unknown_strategy_size_and_order_are_user_errors():
    with pytest.raises(UserError, match="unknown sudoku strategies"):
        S.solve_logically(np.zeros((4, 4), np.int8), strategies=["x_wing"])
    with pytest.raises(UserError, match="size 5"):
        S.generate_puzzles(1, 5)
    p = S.generate_puzzles(1, 4, seed=0)[0]
    with pytest.raises(UserError, match="unknown sudoku order"):
        S.fill_order(p, "spiral")


def _is_single(g: np.ndarray, r: int, c: int, v: int) -> bool:
    """(r, c) = v is forced by the grid alone: v is the cell's only candidate, or v's only place in a unit."""
    n = g.shape[0]
    br, bc = S.box_shape(n)

    def allowed(rr, cc, vv):
        r0, c0 = rr - rr % br, cc - cc % bc
        return not g[rr, cc] and vv not in g[rr] and vv not in g[:, cc] and vv not in g[r0:r0 + br, c0:c0 + bc]

    if not allowed(r, c, v):
        return False
    if [w for w in range(1, n + 1) if allowed(r, c, w)] == [v]:
        return True
    r0, c0 = r - r % br, c - c % bc
    units = [[(r, k) for k in range(n)], [(k, c) for k in range(n)],
             [(r0 + i, c0 + j) for i in range(br) for j in range(bc)]]
    return any([cell for cell in unit if allowed(*cell, v)] == [(r, c)] for unit in units)


def test_solver_order_every_fill_is_forced_when_made_also_shuffled_within_rounds():
    puzzles = S.generate_puzzles(60, 6, seed=4, logical=True)
    checked = 0
    for p in puzzles:
        plain = S.solve_logically(p.clues).fills
        if any(f.strategy not in S.SINGLE_STRATEGIES for f in plain):
            continue  # eliminations: forced by candidates, not by the grid alone
        checked += 1
        for seed in (0, 1, None):
            fills = S.fill_order(p, "solver", seed or 0, shuffle_rounds=seed is not None)
            assert sorted((f.row, f.col) for f in fills) == sorted((f.row, f.col) for f in plain)
            rounds = [f.round_index for f in fills]
            assert rounds == sorted(rounds) == [f.round_index for f in plain]  # rounds stay in order
            g = p.clues.copy()
            for f in fills:
                assert _is_single(g, f.row, f.col, f.value), (f, g)
                g[f.row, f.col] = f.value
    assert checked >= 40
    some = next(p for p in puzzles if len({f.round_index for f in S.solve_logically(p.clues).fills}) < 20)
    assert S.fill_order(some, "solver", 0, shuffle_rounds=True) != S.fill_order(some, "solver", 1,
                                                                                  shuffle_rounds=True)
    assert S.fill_order(some, "solver", 0) == S.solve_logically(some.clues).fills


def test_three_orders_hold_the_same_moves():
    for k, p in enumerate(S.generate_puzzles(10, 6, seed=4, logical=True)):
        orders = {o: S.fill_order(p, o, seed=k) for o in S.ORDERS}
        moves = {o: [(f.row, f.col, f.value) for f in fills] for o, fills in orders.items()}
        assert sorted(moves["solver"]) == moves["row-major"] == sorted(moves["random"])
        assert len(moves["row-major"]) == (p.clues == 0).sum()
        assert (apply(p.clues, orders["solver"]) == p.solution).all()
    p = S.generate_puzzles(1, 9, seed=4)[0]
    assert S.fill_order(p, "random", seed=1) == S.fill_order(p, "random", seed=1)
    assert S.fill_order(p, "random", seed=1) != S.fill_order(p, "random", seed=2)


def test_line_format_round_trips():
    p = S.generate_puzzles(1, 4, seed=9)[0]
    fills = S.fill_order(p, "row-major")
    line = S.format_line(p.clues, fills)
    prompt = S.prompt_text(p.clues)
    assert line.startswith(prompt) and prompt.endswith(">")
    assert set(line) <= set(S.alphabet(4)) == set("1234abcdABCD>\n")
    assert line.endswith("\n") and line.count("\n") == 1
    first = next((r, c) for r in range(4) for c in range(4) if p.clues[r, c])
    assert line[:3] == "abcd"[first[0]] + "ABCD"[first[1]] + str(p.clues[first])
    assert S.move_text(1, 3, 5) == "bD5" and len(line) == 3 * 16 + 2 == S.text_length(4)
    clues, moves = S.parse_line(line)
    assert (clues == p.clues).all()
    assert moves == [(f.row, f.col, f.value) for f in fills]
    clues6, _ = S.parse_line("aA1>", size=6)
    assert clues6.shape == (6, 6)
    for bad in ("aA1aB>", "aA1>zZ9", "111>"):
        with pytest.raises(UserError, match="sudoku"):
            S.parse_line(bad)


@pytest.mark.parametrize("order", S.ORDERS)
def test_write_dataset_splits_and_reads_back(tmp_path, order):
    puzzles = S.generate_puzzles(12, 6, seed=1, logical=True)
    paths = S.write_dataset(tmp_path / order, puzzles, order, seed=0, heldout=4)
    train = [json.loads(x) for x in paths["train"].read_text().splitlines()]
    held = [json.loads(x) for x in paths["heldout"].read_text().splitlines()]
    assert len(train) == 8 and len(held) == 4
    assert all(set(d) == {"prompt", "completion"} for d in train + held)
    assert all(d["prompt"].endswith(">") and d["completion"].endswith("\n") for d in train + held)
    back = S.read_puzzles(paths["heldout"])
    for a, b in zip(back, puzzles[:4], strict=True):
        assert (a.clues == b.clues).all() and (a.solution == b.solution).all()
    first = S.format_line(puzzles[0].clues, S.fill_order(puzzles[0], order, seed=0))
    assert held[0]["prompt"] + held[0]["completion"] == first
    # a training puzzle equal to a held-out one is left out of train
    paths = S.write_dataset(tmp_path / "dup", [*puzzles[:4], puzzles[1], *puzzles[4:]], order, heldout=4)
    assert len(paths["train"].read_text().splitlines()) == 8
    bad = tmp_path / "bad.jsonl"
    # the older {"text": line} records read too
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": held[1]["prompt"] + held[1]["completion"]}) + "\n")
    assert (S.read_puzzles(tmp_path / "text.jsonl")[0].solution == puzzles[1].solution).all()
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(UserError, match="bad.jsonl:1"):
        S.read_puzzles(bad)


PUZZLE = S.Puzzle(
    clues=grid("""
        1..4
        .4..
        ..2.
        2..3"""),
    solution=grid("""
        1234
        3412
        4321
        2143"""))


def test_score_moves_hand_made():
    assert S.count_solutions(PUZZLE.clues) == 1
    empties = [(r, c, int(PUZZLE.solution[r, c])) for r in range(4) for c in range(4) if not PUZZLE.clues[r, c]]
    perfect = S.score_moves(PUZZLE, empties)
    assert perfect.solved and perfect.cells_correct == perfect.cells_total == 10
    assert set(perfect.verdicts) == {"correct"}
    assert S.score_moves(PUZZLE, [S.move_text(r, c, v) for r, c, v in empties]).solved  # text moves too

    s = S.score_moves(PUZZLE, [(0, 1, 4)] + empties[1:])  # 4 is already in row 0
    assert s.verdicts[0] == "contradiction" and not s.solved and s.cells_correct == 9

    s = S.score_moves(PUZZLE, [(0, 0, 1)] + empties)  # (0, 0) is a clue
    assert s.verdicts[0] == "refill" and s.solved  # the wrong move does not undo the right ones

    s = S.score_moves(PUZZLE, [(0, 4, 1), (0, 1, 5), (-1, 0, 1), "9x1", "aB"] + empties[:3])
    assert s.verdicts[:5] == ["out_of_range", "out_of_range", "out_of_range", "unparsable", "unparsable"]
    assert s.cells_correct == 3 and not s.solved

    # (0, 1) = 3 is legal on the grid but wrong; it stays, so the true 3 at (0, 2) now contradicts
    s = S.score_moves(PUZZLE, [(0, 1, 3), (0, 2, 3), (0, 1, 2)])
    assert s.verdicts == ["wrong_value", "contradiction", "refill"]
    assert s.cells_correct == 0

    total = S.summarize([perfect, s])
    assert total.puzzle_accuracy == 0.5
    assert total.cell_accuracy == pytest.approx(10 / 20)
    assert total.verdict_counts["correct"] == 10


def test_evaluate_greedy_with_callbacks():
    puzzles = S.generate_puzzles(5, 6, seed=8, logical=True)
    solutions = {S.prompt_text(p.clues): p for p in puzzles}
    seen = []

    def oracle(text: str) -> str:  # knows the solution; fills the first empty cell not yet written
        seen.append(text)
        prompt, _, moves = text.partition(">")
        p = solutions[prompt + ">"]
        done = {S.parse_line(">" + moves)[1][k][:2] for k in range(len(moves) // 3)}
        r, c = next((r, c) for r in range(6) for c in range(6) if not p.clues[r, c] and (r, c) not in done)
        return S.move_text(r, c, p.solution[r, c])

    score = S.evaluate_greedy(puzzles, oracle)
    assert score.puzzle_accuracy == 1.0 and score.cell_accuracy == 1.0
    first = [t for t in seen if t.startswith(seen[0])]  # puzzle 0's texts: each move is appended
    assert len(first) == (puzzles[0].clues == 0).sum()
    assert all(b.startswith(a) and len(b) == len(a) + 3 for a, b in itertools.pairwise(first))

    score = S.evaluate_greedy(puzzles, lambda text: " aA1")  # always the same move
    assert score.puzzle_accuracy == 0.0
    assert score.cell_accuracy < 0.2

    def batch_oracle(texts: list[str]) -> list[str]:
        return [oracle(t) for t in texts]

    assert S.evaluate_greedy(puzzles, propose_batch=batch_oracle).puzzle_accuracy == 1.0
    with pytest.raises(UserError, match="exactly one"):
        S.evaluate_greedy(puzzles)
    with pytest.raises(UserError, match="returned 0 moves"):
        S.evaluate_greedy(puzzles, propose_batch=lambda texts: [])


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), size=st.sampled_from([4, 6]))
def test_any_seed_gives_unique_logically_solved_puzzles(seed, size):
    p = S.generate_puzzles(1, size, seed=seed, logical=True)[0]
    assert S.count_solutions(p.clues) == 1
    result = S.solve_logically(p.clues)
    assert result.solved and (result.grid == p.solution).all()
    assert S.score_moves(p, [(f.row, f.col, f.value) for f in result.fills]).solved
