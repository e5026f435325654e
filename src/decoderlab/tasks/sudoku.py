"""Sudoku as a next-token task: unique-solution puzzles, a human-style logical solver that records why each
cell is filled, the three fill orders as training text, and cell / whole-puzzle accuracy of a model's moves.

Sizes: 4x4 (2x2 boxes), 6x6 (2x3 boxes: 2 rows by 3 columns) and 9x9 (3x3 boxes). Grids are numpy int8 arrays
[n, n] with 0 for an empty cell; rows, columns and values are 0-based in code and 1-based in text.

Text format (one puzzle per line, every character its own token for a char-level tokenizer):

    <clues>><fills>\n

Every cell is three tokens, as in the paper: its row as a lower-case letter (a = row 1), its column as an
upper-case letter (A = column 1) and its value as a digit, e.g. `bD5` = row 2, column 4, value 5. `<clues>` is
the given cells in row-major order, then `>`, then the fills in the chosen order, then a newline (the puzzle's
end). No separators are needed: a move always starts with a row letter. Rows, columns and values get tokens of
their own (the paper's digits for all three made a 4-layer model here learn several times slower: the model
must first work out which digit is which). The alphabet is the digits 1..n, the first n letters in both cases,
`>` and newline. Example (6x6, solver order):

    bA6bB2bE1dB1dD2eB4eE6fC5fD3fF1>eD5fA2fB6dA1...\n

The prompt for evaluation is `prompt_text(clues)` (everything up to and including `>`); a model then writes
the moves one `rcv` at a time. Orders (`fill_order`): "solver" (the order `solve_logically` fills cells in,
as in "Causal Language Modeling Can Elicit Search and Reasoning Capabilities on Logic Puzzles"),
"row-major", and "random" (a seeded shuffle). `write_dataset` writes `train.jsonl` and `heldout.jsonl`
(`{"prompt": clues and ">", "completion": the fills and the newline}` per puzzle: the loss on the moves only).

Generation (`generate_puzzles`): a seeded random backtracking fill gives a solution; clues are then removed
one at a time in a random order, keeping a removal only while the puzzle still has exactly one solution.
Uniqueness is decided for the whole batch at once by a numpy propagation of naked and hidden singles (sound:
if singles fill the grid the solution is forced) and a numpy test for an empty swappable rectangle (a second
solution, so not unique); only the puzzles neither settles go to the bitmask counting solver that stops at two
solutions (`count_solutions`), started from the grid the singles reached. With `logical=True` a unique puzzle
must also be finished by `solve_logically` (from that same grid: singles are its own first steps), so that
every kept puzzle is one the logical solver finishes, as the paper's data.

Scoring (`score_moves`, `evaluate_greedy`): a move is correct when its cell is in range and empty, its value
does not contradict the grid so far, and it equals the solution's value. A legal but wrong value stays in
the grid (later moves are judged against it); a contradicting, refilling or out-of-range move is not placed.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from decoderlab.atomic import atomic_write_text
from decoderlab.errors import UserError

BOX_SHAPES: dict[int, tuple[int, int]] = {4: (2, 2), 6: (2, 3), 9: (3, 3)}
"""Grid size -> (box rows, box columns)."""

ORDERS = ("solver", "row-major", "random")

SINGLE_STRATEGIES = ("naked_single", "hidden_single_row", "hidden_single_col", "hidden_single_box")
ELIMINATION_STRATEGIES = ("locked_pointing", "locked_claiming", "naked_pair", "hidden_pair")
STRATEGIES = SINGLE_STRATEGIES + ELIMINATION_STRATEGIES
"""Every strategy `solve_logically` knows, simplest first (it always uses the simplest that makes progress)."""


def box_shape(size: int) -> tuple[int, int]:
    """(box rows, box columns) of a size-`size` grid."""
    if size not in BOX_SHAPES:
        raise UserError(f"sudoku size {size} is not supported; use one of {sorted(BOX_SHAPES)}")
    return BOX_SHAPES[size]


class _Geometry:
    """Cell indices of every unit (rows, then columns, then boxes) and each cell's three units and peers."""

    def __init__(self, size: int) -> None:
        br, bc = box_shape(size)
        n = size
        self.n = n
        self.cells = n * n
        rows = [[r * n + c for c in range(n)] for r in range(n)]
        cols = [[r * n + c for r in range(n)] for c in range(n)]
        boxes = []
        for b0 in range(0, n, br):
            for c0 in range(0, n, bc):
                boxes.append([(b0 + r) * n + c0 + c for r in range(br) for c in range(bc)])
        self.units = rows + cols + boxes
        self.unit_kind = ["row"] * n + ["col"] * n + ["box"] * n
        self.box_of = [0] * self.cells
        for b, cells in enumerate(boxes):
            for i in cells:
                self.box_of[i] = b
        # cell -> (row unit, col unit, box unit), indices into self.units
        self.cell_units = [(i // n, n + i % n, 2 * n + self.box_of[i]) for i in range(self.cells)]
        self.peers = [sorted({j for u in self.cell_units[i] for j in self.units[u]} - {i}) for i in range(self.cells)]
        # numpy versions for the batched propagation
        self.units_np = np.array(self.units, dtype=np.intp)  # [3n, n]
        self.cell_units_np = np.array(self.cell_units, dtype=np.intp)  # [N, 3]
        pos = np.zeros((self.cells, 3), dtype=np.intp)
        for t in range(3):
            for i in range(self.cells):
                pos[i, t] = self.units[self.cell_units[i][t]].index(i)
        self.pos_in_unit_np = pos
        # rectangles whose four cells lie in at most two boxes: if a solution reads a b / b a on one, swapping
        # gives a second solution, so a puzzle with all four cells empty is not unique
        rects = []
        for r1 in range(n):
            for r2 in range(r1 + 1, n):
                for c1 in range(n):
                    for c2 in range(c1 + 1, n):
                        quad = [r1 * n + c1, r1 * n + c2, r2 * n + c1, r2 * n + c2]
                        if len({self.box_of[i] for i in quad}) <= 2:
                            rects.append(quad)
        self.rectangles_np = np.array(rects, dtype=np.intp)  # [R, 4]: (r1c1, r1c2, r2c1, r2c2)


_GEOMETRIES: dict[int, _Geometry] = {}


def _geometry(size: int) -> _Geometry:
    if size not in _GEOMETRIES:
        _GEOMETRIES[size] = _Geometry(size)
    return _GEOMETRIES[size]


def _as_grid(grid: np.ndarray | Sequence[Sequence[int]], what: str = "grid") -> np.ndarray:
    g = np.asarray(grid)
    if g.ndim != 2 or g.shape[0] != g.shape[1]:
        raise UserError(f"{what} must be a square 2-D grid, got shape {g.shape}")
    box_shape(g.shape[0])
    if g.min() < 0 or g.max() > g.shape[0]:
        raise UserError(f"{what} values must be 0 (empty) to {g.shape[0]}, got {int(g.min())}..{int(g.max())}")
    return g.astype(np.int8)


_POPCOUNT = [bin(m).count("1") for m in range(1 << 9)]
_BITS = [[1 << v for v in range(9) if m >> v & 1] for m in range(1 << 9)]


def _popcount(x: int) -> int:
    return _POPCOUNT[x]


# ---------------------------------------------------------------------------------------------------------
# Counting solver (bitmasks, most-constrained cell first)


def count_solutions(grid: np.ndarray | Sequence[Sequence[int]], limit: int = 2) -> int:
    """How many solutions `grid` has, counting no further than `limit` (2 answers "is it unique?").

    A grid whose givens already clash has 0.
    """
    g = _as_grid(grid)
    return _count_flat(g.reshape(-1).tolist(), _geometry(g.shape[0]), limit)


def _count_flat(cells: list[int], geo: _Geometry, limit: int) -> int:
    full = (1 << geo.n) - 1
    unit_used = [0] * len(geo.units)
    for i, v in enumerate(cells):
        if v:
            bit = 1 << (v - 1)
            for u in geo.cell_units[i]:
                if unit_used[u] & bit:
                    return 0
                unit_used[u] |= bit
    empty = [i for i, v in enumerate(cells) if not v]
    cu = geo.cell_units
    pop = _POPCOUNT
    found = 0

    def search(empty: list[int]) -> bool:  # True: stop, the limit is reached
        nonlocal found
        if not empty:
            found += 1
            return found >= limit
        best, best_mask, best_count = -1, 0, 99
        for k, i in enumerate(empty):
            a, b, c = cu[i]
            mask = full & ~(unit_used[a] | unit_used[b] | unit_used[c])
            cnt = pop[mask]
            if cnt < best_count:
                best, best_mask, best_count = k, mask, cnt
                if cnt <= 1:
                    break
        if best_count == 0:
            return False
        i = empty[best]
        rest = empty[:best] + empty[best + 1:]
        a, b, c = cu[i]
        mask = best_mask
        while mask:
            bit = mask & -mask
            mask ^= bit
            unit_used[a] |= bit
            unit_used[b] |= bit
            unit_used[c] |= bit
            stop = search(rest)
            unit_used[a] ^= bit
            unit_used[b] ^= bit
            unit_used[c] ^= bit
            if stop:
                return True
        return False

    search(empty)
    return found


def random_solution(size: int, rng: random.Random) -> np.ndarray:
    """A random complete grid: backtracking fill in row-major order, candidates tried in a random order."""
    geo = _geometry(size)
    n, full = geo.n, (1 << geo.n) - 1
    unit_used = [0] * len(geo.units)
    values = [0] * geo.cells
    cu = geo.cell_units

    def fill(i: int) -> bool:
        if i == geo.cells:
            return True
        a, b, c = cu[i]
        mask = full & ~(unit_used[a] | unit_used[b] | unit_used[c])
        options = [v for v in range(n) if mask >> v & 1]
        rng.shuffle(options)
        for v in options:
            bit = 1 << v
            unit_used[a] |= bit
            unit_used[b] |= bit
            unit_used[c] |= bit
            values[i] = v + 1
            if fill(i + 1):
                return True
            unit_used[a] ^= bit
            unit_used[b] ^= bit
            unit_used[c] ^= bit
        values[i] = 0
        return False

    fill(0)
    return np.array(values, dtype=np.int8).reshape(n, n)


# ---------------------------------------------------------------------------------------------------------
# Human-style logical solver


@dataclass(frozen=True)
class Fill:
    """One filled cell (0-based row and column, value 1..n) and the strategy that made it possible.

    `strategy` is the single that placed it ("naked_single", "hidden_single_row/col/box") when the grid alone
    shows it; when it needed candidate eliminations first, it is the elimination strategy that removed the
    last of those candidates ("locked_pointing", "locked_claiming", "naked_pair", "hidden_pair").
    """

    row: int
    col: int
    value: int
    strategy: str = ""
    round_index: int = -1  # `solve_logically`'s round that found it (-1: not from the solver)


@dataclass(frozen=True)
class Elimination:
    """One candidate elimination: the strategy, the cells of its pattern (the pair, or the cells a locked digit
    is confined to), the candidates it removed as (row, col, value), and how many fills came before it."""

    strategy: str
    pattern: tuple[tuple[int, int], ...]
    removed: tuple[tuple[int, int, int], ...]
    after_fills: int


@dataclass
class LogicalSolve:
    """What `solve_logically` did: the fills in order, whether they completed the grid, the grid reached, and
    the candidate eliminations it made on the way."""

    fills: list[Fill]
    solved: bool
    grid: np.ndarray
    eliminations: list[Elimination] = field(default_factory=list)


def solve_logically(grid: np.ndarray | Sequence[Sequence[int]],
                    strategies: Iterable[str] = STRATEGIES) -> LogicalSolve:
    """Fill `grid` by logic alone, one deduction at a time, as a person would, recording every fill.

    Each round uses the simplest strategy that makes progress: naked singles, then hidden singles (rows,
    columns, boxes), first on the candidates the grid alone allows, then on candidates narrowed by earlier
    eliminations; if there are none, one elimination (locked candidates pointing, then claiming, naked pair,
    hidden pair) and the next round. Stops when the grid is full or nothing applies (`solved` False).
    `strategies` restricts the strategies used (e.g. singles only).
    """
    g = _as_grid(grid)
    allowed = set(strategies)
    unknown = allowed - set(STRATEGIES)
    if unknown:
        raise UserError(f"unknown sudoku strategies {sorted(unknown)}; known: {list(STRATEGIES)}")
    geo = _geometry(g.shape[0])
    n, full = geo.n, (1 << geo.n) - 1
    values = g.reshape(-1).tolist()
    units, cu = geo.units, geo.cell_units
    # (cell, bit) -> (order, strategy) of the elimination that removed that candidate
    eliminated: dict[tuple[int, int], tuple[int, str]] = {}
    elim_mask = [0] * geo.cells
    fills: list[Fill] = []
    log: list[Elimination] = []
    eliminations = 0

    def grid_candidates() -> list[int]:
        used = [0] * len(units)
        for u, cells in enumerate(units):
            m = 0
            for i in cells:
                if values[i]:
                    m |= 1 << (values[i] - 1)
            used[u] = m
        return [0 if values[i] else full & ~(used[cu[i][0]] | used[cu[i][1]] | used[cu[i][2]])
                for i in range(geo.cells)]

    def cause(pairs: Iterable[tuple[int, int]], pure: list[int], fallback: str) -> str:
        # only eliminations of candidates the grid itself still allows were needed for this single
        last = max((eliminated[(i, b)] for i, b in pairs if pure[i] & b and (i, b) in eliminated), default=None)
        return last[1] if last else fallback

    def find_singles(cand: list[int]) -> list[tuple[int, int, str, int]]:
        """(cell, bit, single kind, unit or -1 for a naked single) for every single in `cand`."""
        out = []
        if "naked_single" in allowed:
            for i in range(geo.cells):
                m = cand[i]
                if m and m & (m - 1) == 0:
                    out.append((i, m, "naked_single", -1))
        for u, cells in enumerate(units):
            kind = "hidden_single_" + geo.unit_kind[u]
            if kind not in allowed:
                continue
            once = twice = 0
            for i in cells:
                twice |= once & cand[i]
                once |= cand[i]
            lone = once & ~twice  # digits with exactly one place left in this unit
            if lone:
                for i in cells:
                    if cand[i] & lone:
                        bit = cand[i] & lone
                        if bit & (bit - 1) == 0:  # two lone digits in one cell: no solution; leave it
                            out.append((i, bit, kind, u))
        return out

    rounds = 0

    def place(singles: list[tuple[int, int, str, int]], pure: list[int] | None) -> bool:
        """Fill every single found; `pure`: the grid's own candidates, when the singles came from narrowed ones."""
        placed = False
        for i, bit, kind, u in singles:
            if values[i]:
                continue
            v = bit.bit_length()
            # an earlier fill this round may have taken this value from the cell's units (only possible if the
            # grid has no solution); never place a clash
            if any(values[j] == v for j in geo.peers[i]):
                continue
            values[i] = v
            if pure is not None:  # the candidates whose removal made this a single
                why = [(i, b) for b in _BITS[full ^ bit]] if u < 0 else [(j, bit) for j in units[u] if j != i]
            fills.append(Fill(i // n, i % n, v, cause(why, pure, kind) if pure is not None else kind, rounds))
            placed = True
        return placed

    def eliminate(cand: list[int], strategy: str, pattern: Iterable[int], removals: list[tuple[int, int]]) -> bool:
        nonlocal eliminations
        removed = []
        for i, bits in removals:
            bits &= cand[i]
            for v in range(n):
                b = 1 << v
                if bits & b:
                    eliminations += 1
                    eliminated[(i, b)] = (eliminations, strategy)
                    elim_mask[i] |= b
                    removed.append((i // n, i % n, v + 1))
        if removed:
            log.append(Elimination(strategy, tuple((i // n, i % n) for i in pattern), tuple(removed), len(fills)))
        return bool(removed)

    def try_eliminations(cand: list[int]) -> bool:
        if "locked_pointing" in allowed:  # a digit confined to one line within a box leaves the rest of the line
            for b in range(2 * n, 3 * n):
                for v in range(n):
                    bit = 1 << v
                    where = [i for i in units[b] if cand[i] & bit]
                    if len(where) < 2:
                        continue
                    for t in (0, 1):
                        line = {cu[i][t] for i in where}
                        if len(line) == 1:
                            rest = [(j, bit) for j in units[line.pop()] if geo.box_of[j] != b - 2 * n]
                            if eliminate(cand, "locked_pointing", where, rest):
                                return True
        if "locked_claiming" in allowed:  # a digit confined to one box within a line leaves the rest of the box
            for u in range(2 * n):
                t = 0 if u < n else 1
                for v in range(n):
                    bit = 1 << v
                    where = [i for i in units[u] if cand[i] & bit]
                    if len(where) < 2:
                        continue
                    boxes = {cu[i][2] for i in where}
                    if len(boxes) == 1:
                        rest = [(j, bit) for j in units[boxes.pop()] if cu[j][t] != u]
                        if eliminate(cand, "locked_claiming", where, rest):
                            return True
        if "naked_pair" in allowed:  # two cells of a unit with the same two candidates own those two digits
            for cells in units:
                pairs = [i for i in cells if _popcount(cand[i]) == 2]
                for a in range(len(pairs)):
                    for b in range(a + 1, len(pairs)):
                        m = cand[pairs[a]]
                        if cand[pairs[b]] == m:
                            rest = [(j, m) for j in cells if j not in (pairs[a], pairs[b])]
                            if eliminate(cand, "naked_pair", (pairs[a], pairs[b]), rest):
                                return True
        if "hidden_pair" in allowed:  # two digits found in the same two cells only: those cells hold nothing else
            for cells in units:
                spots = {}
                for v in range(n):
                    where = tuple(i for i in cells if cand[i] >> v & 1)
                    if len(where) == 2:
                        spots.setdefault(where, []).append(v)
                for where, digits in spots.items():
                    if len(digits) == 2:
                        keep = (1 << digits[0]) | (1 << digits[1])
                        if eliminate(cand, "hidden_pair", where, [(i, full & ~keep) for i in where]):
                            return True
        return False

    while True:
        rounds += 1
        pure = grid_candidates()
        if not any(pure) and all(values):
            break
        if place(find_singles(pure), None):
            continue
        cand = [p & ~elim_mask[i] for i, p in enumerate(pure)]
        if any(not c and not values[i] for i, c in enumerate(cand)):
            break  # a cell without candidates: the grid has no solution
        if place(find_singles(cand), pure):
            continue
        if not try_eliminations(cand):
            break
    out = np.array(values, dtype=np.int8).reshape(n, n)
    return LogicalSolve(fills=fills, solved=bool(all(values)), grid=out, eliminations=log)


# ---------------------------------------------------------------------------------------------------------
# Batched uniqueness by singles propagation (numpy)


def _singles_close(values: np.ndarray, solutions: np.ndarray, geo: _Geometry) -> np.ndarray:
    """The grids naked + hidden singles reach from `values` (complete where they solve the puzzle).
    values/solutions: [B, N] int8 (0 empty).

    A cell forced by a single must hold the solution's value (the puzzle has that solution), so determined
    cells are simply copied from `solutions`.
    """
    values = values.copy()
    active = np.arange(values.shape[0])
    full = (1 << geo.n) - 1
    units, cell_units, pos = geo.units_np, geo.cell_units_np, geo.pos_in_unit_np
    popcount = np.array(_POPCOUNT[: full + 1], dtype=np.int8)
    while active.size:
        v = values[active].astype(np.int16)
        bits = np.where(v > 0, np.left_shift(1, v - 1), 0).astype(np.int16)  # [b, N]
        used = np.bitwise_or.reduce(bits[:, units], axis=2)  # [b, U]
        blocked = used[:, cell_units[:, 0]] | used[:, cell_units[:, 1]] | used[:, cell_units[:, 2]]
        cand = np.where(v == 0, full & ~blocked, 0)  # [b, N]
        det = popcount[cand] == 1  # naked singles
        per_unit = cand[:, units]  # [b, U, n]
        once = np.zeros(per_unit.shape[:2], dtype=np.int16)
        twice = np.zeros_like(once)
        for k in range(geo.n):  # digits seen once / more than once in each unit
            m = per_unit[:, :, k]
            twice |= once & m
            once |= m
        lone = once & ~twice  # [b, U]: digits with one place left in the unit
        hidden = (per_unit & lone[:, :, None]) != 0  # [b, U, n cells]
        for t in range(3):
            det |= hidden[:, cell_units[:, t], pos[:, t]]
        progress = det.any(axis=1)
        v = np.where(det, solutions[active], v).astype(np.int8)
        values[active] = v
        active = active[progress & (v == 0).any(axis=1)]
    return values


@dataclass(frozen=True)
class Puzzle:
    """A puzzle (`clues`, 0 = empty) and its unique `solution`, both int8 [n, n]."""

    clues: np.ndarray
    solution: np.ndarray

    @property
    def size(self) -> int:
        return int(self.clues.shape[0])


def generate_puzzles(count: int, size: int = 6, seed: int = 0, logical: bool = False,
                     batch: int = 4096) -> list[Puzzle]:
    """`count` random puzzles with exactly one solution each, deterministic for a given `seed` (puzzle i does
    not depend on `count` or `batch`: a larger set extends a smaller one).

    Clues are removed in a random order while the solution stays unique, one pass over the cells (so no
    single clue can be removed from the result without losing uniqueness, for the order tried). With
    `logical=True` a removal is kept only while `solve_logically` still finishes the puzzle (as the paper's
    data), so every puzzle is solvable by the strategies in `STRATEGIES`.
    """
    if count < 0:
        raise UserError(f"count must be >= 0, got {count}")
    geo = _geometry(size)
    out: list[Puzzle] = []
    while len(out) < count:
        b = min(batch, count - len(out))
        # one generator per puzzle: puzzle i is the same whatever `count` and `batch` are
        rngs = [random.Random(f"sudoku:{size}:{seed}:{len(out) + j}") for j in range(b)]
        solutions = np.stack([random_solution(size, rng).reshape(-1) for rng in rngs])
        orders = np.stack([rng.sample(range(geo.cells), geo.cells) for rng in rngs])
        values = solutions.copy()
        rows = np.arange(b)
        quads = solutions[:, geo.rectangles_np]  # [b, R, 4]
        swappable = (quads[..., 0] == quads[..., 3]) & (quads[..., 1] == quads[..., 2])
        for k in range(geo.cells):
            cells = orders[:, k]
            trial = values.copy()
            trial[rows, cells] = 0
            reached = _singles_close(trial, solutions, geo)
            ok = (reached != 0).all(axis=1)
            open_rect = ((reached[:, geo.rectangles_np] == 0).all(axis=2) & swappable).any(axis=1)
            for j in np.flatnonzero(~ok & ~open_rect):  # singles stall: ask the exact check, from where they got
                ok[j] = _count_flat(reached[j].tolist(), geo, limit=2) == 1
                if ok[j] and logical:  # only a unique puzzle can be solved by logic: count first, it is cheaper
                    ok[j] = solve_logically(reached[j].reshape(size, size)).solved
            values[ok, cells[ok]] = 0
        out.extend(Puzzle(values[j].reshape(size, size), solutions[j].reshape(size, size)) for j in range(b))
    return out


# ---------------------------------------------------------------------------------------------------------
# Orders and text


def fill_order(puzzle: Puzzle, order: str, seed: int = 0, shuffle_rounds: bool = False) -> list[Fill]:
    """The empty cells of `puzzle` as fills in the given order ("solver", "row-major" or "random").

    "solver" needs a puzzle `solve_logically` finishes (UserError otherwise); it is the solver's own order.
    With `shuffle_rounds=True` the fills one solver round found (every single on the grid as it stood at the
    round's start; each stays forced whatever else is filled first) come in a seeded random order instead of
    the solver's scan order (row-major within a round). The other orders label every fill with an empty
    strategy. "random" is a shuffle seeded by `seed`.
    """
    if order not in ORDERS:
        raise UserError(f"unknown sudoku order {order!r}; use one of {list(ORDERS)}")
    n = puzzle.size
    if order == "solver":
        result = solve_logically(puzzle.clues)
        if not result.solved:
            raise UserError("this puzzle is not solvable by the logical solver; generate with logical=True "
                            "to use the solver order")
        if not shuffle_rounds:
            return result.fills
        rng = random.Random(seed)
        by_round: dict[int, list[Fill]] = {}
        for f in result.fills:
            by_round.setdefault(f.round_index, []).append(f)
        shuffled = []
        for same_round in by_round.values():
            rng.shuffle(same_round)
            shuffled += same_round
        return shuffled
    fills = [Fill(r, c, int(puzzle.solution[r, c])) for r in range(n) for c in range(n) if not puzzle.clues[r, c]]
    if order == "random":
        random.Random(seed).shuffle(fills)
    return fills


ROW_LETTERS = "abcdefghi"
COLUMN_LETTERS = "ABCDEFGHI"


def move_text(row: int, col: int, value: int) -> str:
    """One move as text: row letter, column letter, value digit (0-based row and column in): (1, 3, 5) -> "bD5"."""
    return f"{ROW_LETTERS[row]}{COLUMN_LETTERS[col]}{value}"


def prompt_text(clues: np.ndarray) -> str:
    """The clues as text, ending with `>`: what a model is given before it writes its moves."""
    g = _as_grid(clues, "clues")
    n = g.shape[0]
    return "".join(move_text(r, c, int(g[r, c])) for r in range(n) for c in range(n) if g[r, c]) + ">"


def format_line(clues: np.ndarray, fills: Sequence[Fill], end: str = "\n") -> str:
    """One training text: the prompt, each fill as `rcv`, then `end` (a newline: the puzzle's last token)."""
    return prompt_text(clues) + "".join(move_text(f.row, f.col, f.value) for f in fills) + end


def parse_line(line: str, size: int | None = None) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """The clues grid and the moves (0-based row, col; value) of a text in the format `format_line` writes.

    `size`: the grid size; by default the smallest supported size that holds every row, column and value.
    """
    if ">" not in line:
        raise UserError(f"sudoku line has no '>' between clues and moves: {line[:60]!r}")
    head, tail = (part.strip() for part in line.split(">", 1))
    if len(head) % 3 or len(tail) % 3:
        raise UserError(f"sudoku line does not split into 3-character moves 'rcv' (e.g. bD5): {line[:60]!r}")
    clues = [_parse_move(head[i:i + 3]) for i in range(0, len(head), 3)]
    moves = [_parse_move(tail[i:i + 3]) for i in range(0, len(tail), 3)]
    largest = max((max(r + 1, c + 1, v) for r, c, v in clues + moves), default=0)
    n = size or next((s for s in sorted(BOX_SHAPES) if s >= largest), largest)
    grid = np.zeros((n, n), dtype=np.int8)
    for r, c, v in clues:
        grid[r, c] = v
    return _as_grid(grid, "clues"), moves


def _parse_move(token: str) -> tuple[int, int, int]:
    if len(token) != 3 or token[0] not in ROW_LETTERS or token[1] not in COLUMN_LETTERS or not token[2].isdigit():
        raise UserError(f"sudoku move {token!r} is not row letter, column letter, value digit (e.g. bD5)")
    return ROW_LETTERS.index(token[0]), COLUMN_LETTERS.index(token[1]), int(token[2])


def record(puzzle: Puzzle, order: str, seed: int = 0, shuffle_rounds: bool = False) -> dict[str, str]:
    """One training record: `{"prompt": the clues and ">", "completion": the fills and the newline}` — the shape
    `decoderlab finetune` reads, so the loss falls on the moves only (as in the paper), never on the clues."""
    prompt = prompt_text(puzzle.clues)
    fills = fill_order(puzzle, order, seed, shuffle_rounds=shuffle_rounds)
    return {"prompt": prompt, "completion": format_line(puzzle.clues, fills)[len(prompt):]}


def write_dataset(out_dir: str | os.PathLike, puzzles: Sequence[Puzzle], order: str, seed: int = 0,
                  heldout: int = 1000, shuffle_rounds: bool = False) -> dict[str, Path]:
    """Write `train.jsonl` (all but the first `heldout` puzzles) and `heldout.jsonl` (the first `heldout`),
    one `record` per puzzle in the given order. Random orders use `seed + puzzle index` each.

    A training puzzle with the same clues as a held-out one is left out, so held-out scores are on puzzles the
    model never saw (this matters for 4x4, which has few distinct puzzles; among 10 000 6x6 puzzles there were
    no repeats). Returns {"train": path, "heldout": path}.
    """
    if not 0 <= heldout <= len(puzzles):
        raise UserError(f"heldout must be between 0 and the number of puzzles ({len(puzzles)}), got {heldout}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"heldout": out / "heldout.jsonl", "train": out / "train.jsonl"}
    held = {p.clues.tobytes() for p in puzzles[:heldout]}
    parts = {"heldout": list(enumerate(puzzles[:heldout])),
             "train": [(k, p) for k, p in enumerate(puzzles) if k >= heldout and p.clues.tobytes() not in held]}
    for split, path in paths.items():
        lines = [json.dumps(record(p, order, seed + k, shuffle_rounds)) for k, p in parts[split]]
        atomic_write_text(path, "".join(line + "\n" for line in lines))
    return paths


def read_puzzles(path: str | os.PathLike) -> list[Puzzle]:
    """The puzzles of a JSONL file `write_dataset` wrote (`{"prompt", "completion"}` or `{"text"}` records; clues
    from each line, solutions re-derived from the moves)."""
    puzzles = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                text = item["text"] if "text" in item else item["prompt"] + item["completion"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path}:{line_no}: not a JSON object with \"prompt\" and \"completion\" (or "
                                "\"text\") fields") from None
            clues, moves = parse_line(text)
            solution = clues.copy()
            for r, c, v in moves:
                solution[r, c] = v
            if not solution.all():
                raise UserError(f"{path}:{line_no}: the moves do not fill the grid")
            puzzles.append(Puzzle(clues, solution))
    return puzzles


# ---------------------------------------------------------------------------------------------------------
# Scoring


@dataclass
class MoveScore:
    """How one puzzle's moves were judged: per move one of "correct", "wrong_value", "contradiction",
    "refill", "out_of_range" or "unparsable"; the empty cells filled correctly, of how many; solved or not."""

    verdicts: list[str]
    cells_correct: int
    cells_total: int

    @property
    def solved(self) -> bool:
        return self.cells_correct == self.cells_total


def score_moves(puzzle: Puzzle, moves: Iterable[tuple[int, int, int] | str]) -> MoveScore:
    """Judge a model's moves on `puzzle`. Moves are (0-based row, 0-based col, value) or `rcv` text."""
    n = puzzle.size
    grid = puzzle.clues.astype(np.int8).copy()
    correct = np.zeros_like(grid, dtype=bool)
    verdicts = []
    for move in moves:
        verdict = _judge(grid, puzzle.solution, move, n)
        if verdict in ("correct", "wrong_value"):
            r, c, v = _as_move(move)
            grid[r, c] = v
            correct[r, c] = verdict == "correct"
        verdicts.append(verdict)
    total = int((puzzle.clues == 0).sum())
    return MoveScore(verdicts, int(correct.sum()), total)


def _as_move(move: tuple[int, int, int] | str) -> tuple[int, int, int]:
    if isinstance(move, str):
        return _parse_move(move.strip())
    r, c, v = move
    return int(r), int(c), int(v)


def _judge(grid: np.ndarray, solution: np.ndarray, move: tuple[int, int, int] | str, n: int) -> str:
    if isinstance(move, str):
        try:
            _parse_move(move.strip())
        except UserError:
            return "unparsable"
    r, c, v = _as_move(move)
    if not (0 <= r < n and 0 <= c < n and 1 <= v <= n):
        return "out_of_range"
    if grid[r, c]:
        return "refill"
    br, bc = box_shape(n)
    r0, c0 = r - r % br, c - c % bc
    if (grid[r] == v).any() or (grid[:, c] == v).any() or (grid[r0:r0 + br, c0:c0 + bc] == v).any():
        return "contradiction"
    return "correct" if solution[r, c] == v else "wrong_value"


@dataclass
class SudokuScore:
    """Cell accuracy (correct fills / empty cells) and puzzle accuracy (all cells correct) over puzzles."""

    cell_accuracy: float
    puzzle_accuracy: float
    puzzles: int
    verdict_counts: dict[str, int] = field(default_factory=dict)
    scores: list[MoveScore] = field(default_factory=list)


def summarize(scores: Sequence[MoveScore]) -> SudokuScore:
    """Pool per-puzzle scores into cell and whole-puzzle accuracy."""
    cells = sum(s.cells_total for s in scores)
    counts: dict[str, int] = {}
    for s in scores:
        for v in s.verdicts:
            counts[v] = counts.get(v, 0) + 1
    return SudokuScore(cell_accuracy=sum(s.cells_correct for s in scores) / cells if cells else 0.0,
                       puzzle_accuracy=sum(s.solved for s in scores) / len(scores) if scores else 0.0,
                       puzzles=len(scores), verdict_counts=counts, scores=list(scores))


def evaluate_greedy(puzzles: Sequence[Puzzle], propose: Callable[[str], str] | None = None, *,
                    propose_batch: Callable[[list[str]], list[str]] | None = None) -> SudokuScore:
    """Let a model solve each puzzle move by move, greedily, and score it.

    `propose(text)` gets the text so far (the prompt, then the moves already made) and returns the next move as
    `rcv` text (e.g. the first three characters a greedy `decoderlab.generate`
    writes after `text`). It is asked once per empty cell; every move, right or wrong, is appended to the text.
    `propose_batch(texts)` instead answers for all puzzles still being solved at once (one batched decode
    step per move); give exactly one of the two.
    """
    if (propose is None) == (propose_batch is None):
        raise UserError("give evaluate_greedy exactly one of propose (one text) or propose_batch (a list)")
    texts = [prompt_text(p.clues) for p in puzzles]
    moves: list[list[str]] = [[] for _ in puzzles]
    left = [int((p.clues == 0).sum()) for p in puzzles]
    while True:
        going = [k for k, m in enumerate(left) if m > 0]
        if not going:
            break
        if propose_batch is not None:
            answers = list(propose_batch([texts[k] for k in going]))
            if len(answers) != len(going):
                raise UserError(f"propose_batch returned {len(answers)} moves for {len(going)} texts")
        else:
            answers = [propose(texts[k]) for k in going]
        for k, answer in zip(going, answers, strict=True):
            move = answer.strip()
            moves[k].append(move)
            texts[k] += move
            left[k] -= 1
    return summarize([score_moves(p, m) for p, m in zip(puzzles, moves, strict=True)])


# ---------------------------------------------------------------------------------------------------------
# Solving with a model


def solve_with_model(model: Any, tokenizer: Any, puzzles: Sequence[Puzzle], beam: int = 1,
                     batch_size: int = 64) -> SudokuScore:
    """Let a trained model solve each puzzle from its clues, and score its moves (`score_moves`).

    The model writes one move at a time, choosing the cell and the value: at each of a move's three tokens its
    choice is among the tokens of that slot (a row letter, a column letter, a digit 1..n), so every move parses;
    a move that refills a cell or contradicts the grid still counts as wrong. `beam=1` is greedy decoding;
    `beam=k` keeps the k most likely move sequences (summed log-probabilities, each slot's renormalised over its
    tokens) and plays the best one. Puzzles with the same number of clues share a batch (their prompts have one
    length, so no padding); decoding uses the KV cache, whose rows follow the beams.
    """
    import torch

    if beam < 1:
        raise UserError(f"beam must be at least 1, got {beam}")
    if not puzzles:
        return summarize([])
    n = puzzles[0].size
    if any(p.size != n for p in puzzles):
        raise UserError("solve_with_model needs puzzles of one size")
    slots = [ROW_LETTERS[:n], COLUMN_LETTERS[:n], "".join(str(d) for d in range(1, n + 1))]
    ids = [[tokenizer.token_to_id(ch) for ch in chars] for chars in slots]
    if any(i is None for chars in ids for i in chars):
        raise UserError(f"the tokenizer has no single token for every character of {''.join(slots)!r}: this model "
                        "was not trained on sudoku text (decoderlab tasks train sudoku)")
    slot_ids = torch.tensor(ids, device=model.device)  # [3, n]
    prompts = [tokenizer.encode(prompt_text(p.clues), add_special_tokens=False) for p in puzzles]
    groups: dict[int, list[int]] = {}
    for k, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(k)
    moves: list[list[tuple[int, int, int]]] = [[] for _ in puzzles]
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for index in groups.values():
                for first in range(0, len(index), batch_size):
                    chunk = index[first:first + batch_size]
                    empties = int((puzzles[chunk[0]].clues == 0).sum())
                    prompt = torch.tensor([prompts[k] for k in chunk], device=model.device)
                    for k, m in zip(chunk, _beam_moves(model, prompt, empties, slot_ids, beam), strict=True):
                        moves[k] = m
    finally:
        model.train(was_training)
    return summarize([score_moves(p, m) for p, m in zip(puzzles, moves, strict=True)])


def _beam_moves(model: Any, prompt: Any, count: int, slot_ids: Any, beam: int) -> list[list[tuple[int, int, int]]]:
    """`count` moves for each prompt row [P, T] by beam search of width `beam`, the token of each slot of a move
    chosen among `slot_ids[slot]` (see `solve_with_model`); returns the best beam's moves per row as (0-based
    row, 0-based col, value)."""
    import torch

    P, T = prompt.shape
    n = slot_ids.shape[1]
    rows = P * beam
    cache = model.new_cache(rows, T + 3 * count)
    logits = model(prompt.repeat_interleave(beam, dim=0), cache=cache, logits_to_keep=1)[:, -1]
    score = torch.zeros(P, beam, device=prompt.device)
    score[:, 1:] = -torch.inf  # every beam starts as the same text: expand from the first only
    chosen = torch.zeros(rows, 3 * count, dtype=torch.long, device=prompt.device)
    base = (torch.arange(P, device=prompt.device) * beam)[:, None]
    for t in range(3 * count):
        allowed = slot_ids[t % 3]
        # the slot's distribution: renormalised over the tokens allowed there
        logp = torch.log_softmax(logits.float()[:, allowed], dim=-1)  # [rows, n]
        total = (score.reshape(rows, 1) + logp).reshape(P, beam * n)
        score, best = total.topk(beam, dim=1)
        pick = (best % n).reshape(-1)
        if beam > 1:
            source = (base + best // n).reshape(-1)
            cache.keys.copy_(cache.keys[:, source])
            cache.values.copy_(cache.values[:, source])
            chosen = chosen[source]
        chosen[:, t] = pick
        if t + 1 < 3 * count:
            logits = model(allowed[pick][:, None], cache=cache, logits_to_keep=1)[:, -1]
    best = chosen.reshape(P, beam, count, 3)[:, 0].tolist()  # topk sorts: beam 0 is the most likely
    return [[(r, c, v + 1) for r, c, v in row] for row in best]


# ---------------------------------------------------------------------------------------------------------
# Training a model on it (`decoderlab tasks train sudoku`)


def cached_puzzles(count: int, size: int = 6, seed: int = 0) -> list[Puzzle]:
    """`generate_puzzles(count, size, seed, logical=True)`, kept in `$DECODERLAB_CACHE/sudoku` (default
    ~/.cache/decoderlab) so that runs comparing orders share one set (100 000 6x6 puzzles take about a minute)."""
    import hashlib

    root = Path(os.environ.get("DECODERLAB_CACHE", Path.home() / ".cache" / "decoderlab")) / "sudoku"
    key = hashlib.sha1(json.dumps(["logical", size, seed, count]).encode()).hexdigest()[:16]
    path = root / f"{size}x{size}-{count}-{key}.npz"
    if path.is_file():
        try:
            with np.load(path) as saved:
                return [Puzzle(c, s) for c, s in zip(saved["clues"], saved["solutions"], strict=True)]
        except (OSError, ValueError, KeyError):
            pass  # a damaged cache file is made again
    puzzles = generate_puzzles(count, size, seed, logical=True)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp.npz")
    np.savez(tmp, clues=np.stack([p.clues for p in puzzles]), solutions=np.stack([p.solution for p in puzzles]))
    os.replace(tmp, path)
    return puzzles


def alphabet(size: int) -> str:
    """Every character of the text format for this size: the digits 1..n, the row letters, the column letters,
    '>' and newline."""
    box_shape(size)
    return "".join(str(d) for d in range(1, size + 1)) + ROW_LETTERS[:size] + COLUMN_LETTERS[:size] + ">\n"


def text_length(size: int) -> int:
    """The longest puzzle text in tokens of a char tokenizer: every cell as 3 tokens, then '>' and '\\n'."""
    return 3 * size * size + 2


def training_data(puzzles: Sequence[Puzzle], order: str, seed: int = 0, heldout: int = 1000, val: int = 200,
                  shuffle_rounds: bool = False) -> Callable[[Path], dict[str, Path]]:
    """A data writer for `decoderlab.tasks.training.train_on_task`: `write_dataset` into the folder, plus
    `val.jsonl` (the first `val` held-out puzzles: the training run's held-out loss)."""

    def write(folder: Path) -> dict[str, Path]:
        paths = write_dataset(folder, puzzles, order, seed=seed, heldout=heldout, shuffle_rounds=shuffle_rounds)
        lines = paths["heldout"].read_text().splitlines(keepends=True)[:val]
        paths["val"] = folder / "val.jsonl"
        atomic_write_text(paths["val"], "".join(lines))
        return paths

    return write


def train_model(out: str | os.PathLike, size: int = 6, order: str = "solver", puzzles: int = 100_000,
                heldout: int = 1000, seed: int = 0, layers: int = 4, width: int = 128, resume: bool = False,
                overwrite: bool = False, progress: bool = True, shuffle_rounds: bool = False, **overrides: Any):
    """Train a fresh model in `out` to solve size-`size` puzzles written in `order`, the loss on the moves only.

    The puzzles (`cached_puzzles(puzzles, size, seed)`, the first `heldout` kept out) are the same for every
    order, so runs that differ only in `order` compare the orders (`shuffle_rounds`: see `fill_order`).
    `overrides` are training settings
    (`time="10m"`, `steps=`, `lr=`, `batch_size=`, ...; see `decoderlab.tasks.training`). Returns the
    `FinetuneResult`; `evaluate_model(out)` scores the model on the held-out puzzles.
    """
    from decoderlab.tokenizer import Tokenizer

    from .training import Shape, train_on_task

    if order not in ORDERS:
        raise UserError(f"unknown sudoku order {order!r}; use one of {list(ORDERS)}")
    if not 1 <= heldout < puzzles:
        raise UserError(f"--heldout must be at least 1 and below --puzzles ({puzzles}), got {heldout}")
    info = {"task": "sudoku", "size": size, "order": order, "puzzles": puzzles, "heldout": heldout,
            "shuffle_rounds": shuffle_rounds}
    tokenizer = Tokenizer.train_char(texts=[alphabet(size)])
    shape = Shape(layers, width, text_length(size))
    write = None
    if not resume:
        def write(folder: Path) -> dict[str, Path]:  # the puzzles are made only once the settings are checked
            return training_data(cached_puzzles(puzzles, size, seed), order, seed=seed, heldout=heldout,
                                 shuffle_rounds=shuffle_rounds)(folder)
    return train_on_task(out, info, write, tokenizer, shape, resume=resume, overwrite=overwrite,
                         progress=progress, seed=seed, **overrides)


def evaluate_model(run: str | os.PathLike, count: int | None = None, beam: int = 1,
                   batch_size: int = 64) -> SudokuScore:
    """Score a `train_model` run on its first `count` held-out puzzles (default: all of them)."""
    from decoderlab.checkpoint import load
    from decoderlab.tokenizer import Tokenizer

    from .training import TASK_FOLDER, task_info

    info = task_info(run)
    if info.get("task") != "sudoku":
        raise UserError(f"{run} was trained on the {info.get('task')!r} task, not sudoku")
    held = read_puzzles(Path(run) / TASK_FOLDER / "data" / "heldout.jsonl")
    if count is not None:
        if count < 1:
            raise UserError(f"count must be at least 1, got {count}")
        held = held[:count]
    model = load(run)
    return solve_with_model(model, Tokenizer.from_folder(run), held, beam=beam, batch_size=batch_size)
