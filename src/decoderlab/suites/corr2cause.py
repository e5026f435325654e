"""Corr2Cause (Jin et al., 2023, "Can Large Language Models Infer Causation from Correlation?"), generated
exactly from its definition: every DAG over N variables up to isomorphism, its conditional independences by
d-separation, the Markov equivalence classes as sets of labelled DAGs with identical independence sets, and
one premise per class with six causal hypotheses per pair of variables, labelled by the class.

How a premise is built (as the paper's code does it): the statistical relations of one DAG, stated over named
variables -- "X correlates with Y." for every pair that is not unconditionally independent, then every
conditional independence (every pair, every conditioning set of the other variables). The class of a premise is
the set of *labelled* DAGs with exactly that independence set; a hypothesis is entailed when every DAG of the
class has the property, contradicted when none has, neutral otherwise. Classes that are relabellings of one
another give one premise (the paper keeps one per class up to isomorphism too).

The six properties of an ordered pair (i, j), with the paper's path semantics (simple paths between i and j):
  parent               i -> j
  non-parent ancestor  a directed path i -> ... -> j of length >= 2 ("i causes something else which causes j")
  child                j -> i
  non-child descendant a directed path j -> ... -> i of length >= 2
  has_collider         a path i -> ... -> k <- ... <- j, k neither i nor j (a common effect k reached from i
                       without passing j and from j without passing i)
  has_confounder       a path i <- ... <- k -> ... -> j likewise (a common cause)
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .writer import TaskSpec, write_suite

MAX_NODES = 6  # N = 7 has 1,138,779 unlabelled DAGs; the paper stops at 6 and so do we
PROPERTIES = ("parent", "non-parent ancestor", "child", "non-child descendant", "has_collider", "has_confounder")
VARIANTS = ("plain", "renamed", "paraphrased")
RELATIONS = ("entailment", "neutral", "contradiction")  # index = the 3-way target (the harness's ANLI order)


# ----------------------------------------------------------------------------------------------------------
# Graphs. A labelled DAG on n nodes is an int: bit i*n + j set for the edge i -> j.


@cache
def _permutations(n: int) -> np.ndarray:
    """All permutations of range(n), [n!, n]; row p maps old label i to new label perms[p, i]."""
    return np.array(list(itertools.permutations(range(n))), dtype=np.int64).reshape(-1, n)


def _upper_pairs(n: int) -> list[tuple[int, int]]:
    return [(i, j) for i in range(n) for j in range(i + 1, n)]


@cache
def _unlabelled_upper(n: int) -> tuple[int, ...]:
    """One upper-triangular DAG per isomorphism class, as a bitmask over `_upper_pairs(n)`: the smallest mask of
    its class. Orderly generation: every DAG is isomorphic to an upper-triangular one (label it in a topological
    order); masks are visited in increasing order and each new one marks every relabelling of itself that is
    upper-triangular again (a relabelling by one of its topological orders), so it is the smallest of its class
    and 2^(n(n-1)/2) masks (32,768 for n = 6) are visited instead of the 3,781,503 labelled DAGs."""
    pairs = _upper_pairs(n)
    index = np.full((n, n), -1, dtype=np.int64)
    for e, (i, j) in enumerate(pairs):
        index[i, j] = e
    perms = _permutations(n)
    seen = np.zeros(1 << len(pairs), dtype=bool)
    reps = []
    for mask in range(1 << len(pairs)):
        if seen[mask]:
            continue
        reps.append(mask)
        edges = [pairs[e] for e in range(len(pairs)) if mask >> e & 1]
        if not edges:
            seen[mask] = True
            continue
        src = perms[:, [i for i, _ in edges]]
        dst = perms[:, [j for _, j in edges]]
        topological = (src < dst).all(axis=1)
        images = (np.int64(1) << index[src[topological], dst[topological]]).sum(axis=1)
        seen[images] = True
    return tuple(reps)


def unlabeled_dags(n: int) -> list[tuple[tuple[int, int], ...]]:
    """Every DAG over n nodes (1..6) up to isomorphism, as edge lists (i, j) meaning i -> j, each labelled in a
    topological order. There are 1, 2, 6, 31, 302, 5984 of them for n = 1..6 (OEIS A003087)."""
    _check_nodes(n, low=1)
    pairs = _upper_pairs(n)
    return [tuple(pairs[e] for e in range(len(pairs)) if mask >> e & 1) for mask in _unlabelled_upper(n)]


def _check_nodes(n: int, low: int = 2) -> None:
    if not isinstance(n, (int, np.integer)) or not low <= n <= MAX_NODES:
        raise UserError(f"number of variables {n!r} is out of range: use {low} to {MAX_NODES}")


@cache
def _triples(n: int) -> tuple[tuple[int, int, tuple[int, ...]], ...]:
    """Every (i, j, Z) with i < j and Z a subset of the other nodes, in the paper's statement order (sorted as
    Python lists: by i, by j, then Z as a sorted list)."""
    out = []
    for i, j in _upper_pairs(n):
        others = [v for v in range(n) if v not in (i, j)]
        for size in range(len(others) + 1):
            out += [(i, j, z) for z in itertools.combinations(others, size)]
    return tuple(sorted(out, key=lambda t: (t[0], t[1], list(t[2]))))


def _graph_arrays(n: int, masks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Children and parents bitmasks, [R, n] each, of upper-triangular masks."""
    pairs = _upper_pairs(n)
    m = np.asarray(masks, dtype=np.int64)
    children = np.zeros((len(m), n), dtype=np.int64)
    parents = np.zeros((len(m), n), dtype=np.int64)
    for e, (i, j) in enumerate(pairs):
        has = (m >> e) & 1
        children[:, i] |= has << j
        parents[:, j] |= has << i
    return children, parents


def _independences(n: int, children: np.ndarray, parents: np.ndarray) -> np.ndarray:
    """[R, T] bool: graph r d-separates triple t of `_triples(n)`. Lauritzen's criterion, vectorised over graphs
    and triples with bitmasks: X and Y are d-separated by Z iff they are disconnected in the moral graph of the
    ancestral set of {X, Y} + Z once Z is removed. The graphs are upper-triangular (topologically labelled)."""
    R = len(children)
    ancestors = np.zeros((R, n), dtype=np.int64)  # each node's ancestors including itself
    for v in range(n):
        ancestors[:, v] = np.int64(1) << v
        for p in range(v):
            ancestors[:, v] |= np.where((parents[:, v] >> p) & 1, ancestors[:, p], 0)
    triples = _triples(n)
    x = np.array([t[0] for t in triples], dtype=np.int64)
    y = np.array([t[1] for t in triples], dtype=np.int64)
    z = np.array([sum(1 << v for v in t[2]) for t in triples], dtype=np.int64)
    start = (np.int64(1) << x) | (np.int64(1) << y) | z
    ancestral = np.zeros((R, len(triples)), dtype=np.int64)
    for v in range(n):
        ancestral |= np.where((start >> v) & 1, ancestors[:, v:v + 1], 0)
    # moral neighbours within the ancestral set (it holds every parent of its members)
    neighbours = []
    for v in range(n):
        kids = children[:, v:v + 1] & ancestral
        nb = parents[:, v:v + 1] | kids
        for c in range(v + 1, n):
            nb = nb | np.where((kids >> c) & 1, parents[:, c:c + 1], 0)
        neighbours.append(nb & ~(np.int64(1) << v))
    open_nodes = ancestral & ~z
    reach = np.broadcast_to(np.int64(1) << x, ancestral.shape).copy()
    for _ in range(n - 1):
        grown = reach
        for v in range(n):
            grown = grown | np.where((reach >> v) & 1, neighbours[v], 0)
        reach = grown & open_nodes
    return (reach >> y) & 1 == 0


def _properties(n: int, children: np.ndarray, parents: np.ndarray) -> np.ndarray:
    """[R, 6, n, n] bool: PROPERTIES[k] holds for the ordered pair (i, j) in graph r (see the module docstring)."""
    R = len(children)

    def reach_avoiding(edges: np.ndarray, order: range, start: int, avoid: int) -> np.ndarray:
        # nodes reached from `start` along `edges` without passing `avoid`; `order` is topological for `edges`
        got = np.full(R, np.int64(1) << start)
        for v in order:
            if v != avoid:
                got = got | np.where((got >> v) & 1, edges[:, v], 0)
        return got

    desc = [[reach_avoiding(children, range(n), i, j) for j in range(n)] for i in range(n)]
    anc = [[reach_avoiding(parents, range(n - 1, -1, -1), i, j) for j in range(n)] for i in range(n)]
    props = np.zeros((R, len(PROPERTIES), n, n), dtype=bool)
    for i in range(n):
        for j in range(n):
            if i == j:
                continue
            pair = (np.int64(1) << i) | (np.int64(1) << j)
            props[:, 0, i, j] = (children[:, i] >> j) & 1
            longer = np.zeros(R, dtype=bool)
            for c in range(n):
                if c not in (i, j):
                    longer |= ((children[:, i] >> c) & 1 & (desc[c][i] >> j) & 1).astype(bool)
            props[:, 1, i, j] = longer
            props[:, 4, i, j] = (desc[i][j] & desc[j][i] & ~pair) != 0
            props[:, 5, i, j] = (anc[i][j] & anc[j][i] & ~pair) != 0
    props[:, 2] = props[:, 0].transpose(0, 2, 1)
    props[:, 3] = props[:, 1].transpose(0, 2, 1)
    return props


@cache
def _triple_sources(n: int) -> np.ndarray:
    """[n!, T]: relabelling an independence set S by permutation p gives S[sources[p]]."""
    triples = _triples(n)
    where = {t: k for k, t in enumerate(triples)}
    perms = _permutations(n)
    sources = np.zeros((len(perms), len(triples)), dtype=np.int64)
    for p, perm in enumerate(perms):
        for k, (i, j, z) in enumerate(triples):
            a, b = sorted((int(perm[i]), int(perm[j])))
            sources[p, where[(a, b, tuple(sorted(int(perm[v]) for v in z)))]] = k
    return sources


@dataclass(frozen=True)
class CausalClass:
    """One Markov equivalence class over named variables 0..n-1: its independence set (the premise) and the
    labelled DAGs that have exactly that set. `fractions[k, i, j]` is the share of those DAGs in which
    PROPERTIES[k] holds for the ordered pair (i, j)."""

    n: int
    independences: tuple[tuple[int, int, tuple[int, ...]], ...]
    dags: tuple[tuple[tuple[int, int], ...], ...]
    fractions: np.ndarray

    @property
    def correlations(self) -> list[tuple[int, int]]:
        """Pairs that are not unconditionally independent."""
        free = {(i, j) for i, j, z in self.independences if not z}
        return [p for p in _upper_pairs(self.n) if p not in free]

    def label(self, kind: str, i: int, j: int) -> str:
        """'entailment', 'contradiction' or 'neutral' for PROPERTIES kind on the ordered pair (i, j)."""
        share = self.fractions[PROPERTIES.index(kind), i, j]
        return "entailment" if share == 1 else "contradiction" if share == 0 else "neutral"


@cache
def equivalence_classes(n: int) -> tuple[CausalClass, ...]:
    """The Markov equivalence classes over n named variables (2..6), one per class up to relabelling, in a fixed
    order. Each class's premise is the independence set of the first unlabelled DAG (in `unlabeled_dags` order)
    that generates it, under that DAG's labels."""
    _check_nodes(n)
    masks = _unlabelled_upper(n)
    children, parents = _graph_arrays(n, masks)
    cis = _independences(n, children, parents)
    props = _properties(n, children, parents)
    perms = _permutations(n)
    sources = _triple_sources(n)
    triples = _triples(n)
    width = (len(triples) + 7) // 8

    anchors: dict[bytes, int] = {}  # packed independence set of a class's premise -> class index
    premises: list[bytes] = []
    members: list[list[tuple[int, np.ndarray]]] = []  # per class: (graph, permutations that map it into it)
    for r in range(len(masks)):
        # the graph's independence set under every relabelling; trailing zero bytes drop out of numpy's
        # fixed-width bytes, the same way on both sides of each comparison
        keys = np.packbits(cis[r][sources], axis=1).view(f"S{width}").ravel()
        known = next((anchors[k] for k in set(keys.tolist()) if k in anchors), None)
        if known is None:  # a new class: this graph's own labels state its premise
            known = len(premises)
            premises.append(np.packbits(cis[r]).tobytes().rstrip(b"\0"))
            anchors[premises[-1]] = known
            members.append([])
        members[known].append((r, np.flatnonzero(keys == premises[known])))

    pairs = _upper_pairs(n)
    out = []
    for group in members:
        seen, shares, edge_lists = set(), [], []
        for r, ps in group:
            edges = [pairs[e] for e in range(len(pairs)) if masks[r] >> e & 1]
            for p in ps:
                perm = perms[p]
                relabelled = tuple(sorted((int(perm[i]), int(perm[j])) for i, j in edges))
                if relabelled in seen:  # a relabelling by an automorphism: the same labelled DAG
                    continue
                seen.add(relabelled)
                inverse = np.argsort(perm)
                shares.append(props[r][:, inverse][:, :, inverse])
                edge_lists.append(relabelled)
        bits = cis[group[0][0]]
        out.append(CausalClass(
            n=n,
            independences=tuple(t for t, b in zip(triples, bits, strict=True) if b),
            dags=tuple(edge_lists),
            fractions=np.mean(shares, axis=0),
        ))
    return tuple(out)


# ----------------------------------------------------------------------------------------------------------
# Text. The plain templates are the paper's (data_verbalize.py); the paraphrased variant draws every sentence
# from hand-written paraphrases that never repeat the paper's wording, so it probes generalisation as the
# paper's paraphrased test set does.

_INTRO = "Suppose there is a closed system of {n} variables, {variables}. All the statistical relations among " \
         "these {n} variables are as follows:"
_INTRO_PARAPHRASES = (
    "Consider a closed system with {n} variables: {variables}. These are all the statistical relations among them:",
    "Imagine {n} variables, {variables}, that form a closed system. Every statistical relation among them is "
    "listed here:",
    "There are {n} variables, {variables}, and nothing outside them matters. Their statistical relations are "
    "exactly these:",
)
_CORRELATES = ("{x} correlates with {y}.",)
_CORRELATES_PARAPHRASES = ("{x} and {y} are correlated.", "There is a correlation between {x} and {y}.",
                           "{x} is statistically dependent on {y}.")
_INDEPENDENT = ("{x} is independent of {y}.",)
_INDEPENDENT_PARAPHRASES = ("{x} and {y} are independent.", "There is no correlation between {x} and {y}.",
                            "{x} and {y} are unconditionally independent.")
_INDEPENDENT_GIVEN = ("{x} and {y} are independent given {z}.",)
_INDEPENDENT_GIVEN_PARAPHRASES = ("Given {z}, {x} and {y} are independent.",
                                  "{x} is independent of {y} when conditioning on {z}.",
                                  "Once we condition on {z}, {x} and {y} become independent.")
_HOWEVER = ("However,",)
_HOWEVER_PARAPHRASES = ("However,", "On the other hand,", "At the same time,")

# Hypothesis sentences by meaning, over (x, y): DIRECT x -> y; INDIRECT a directed path x -> ... -> y of length
# >= 2; COLLIDER / CONFOUNDER of x and y (symmetric). The paper words "non-parent ancestor" and "non-child
# descendant" each way half of the time, and puts the pair of a collider / confounder in either order.
_HYPOTHESES = {
    "direct": ("{x} directly causes {y}.",),
    "indirect": ("{x} causes something else which causes {y}.", "{x} is a cause for {y}, but not a direct one."),
    "collider": ("There exists at least one collider (i.e., common effect) of {x} and {y}.",),
    "confounder": ("There exists at least one confounder (i.e., common cause) of {x} and {y}.",),
}
_HYPOTHESIS_PARAPHRASES = {
    "direct": ("{x} directly affects {y}.", "{x} is a direct cause of {y}.", "{y} is directly caused by {x}."),
    "indirect": ("{x} influences {y} through some mediator(s).", "{x} affects {y} through at least one other "
                 "variable.", "There is a causal chain from {x} through some other variable to {y}."),
    "collider": ("{x} and {y} together cause some other variable(s).", "Some other variable is an effect of both "
                 "{x} and {y}.", "{x} and {y} have a common effect."),
    "confounder": ("Some variable(s) cause(s) both {x} and {y}.", "{x} and {y} have a common cause.",
                   "Some other variable is a cause of both {x} and {y}."),
}
# PROPERTIES[k] of (i, j) as a meaning and whether its arguments are swapped
_MEANING = (("direct", False), ("indirect", False), ("direct", True), ("indirect", True), ("collider", None),
            ("confounder", None))

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _list_text(items: Sequence[str]) -> str:
    """'A', 'A and B', 'A, B and C' (the paper's list style)."""
    return " and ".join([", ".join(items[:-1]), items[-1]] if len(items) > 2 else items)


def _random_names(rng: random.Random, n: int) -> list[str]:
    """n distinct made-up names such as 'Kelo' or 'Vurap', standing in for the paper's letters."""
    names: list[str] = []
    while len(names) < n:
        size = rng.choice((2, 2, 3))
        name = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(size))
        if rng.random() < 0.5:
            name += rng.choice(_CONSONANTS)
        if name.capitalize() not in names:
            names.append(name.capitalize())
    return names


def _fill(template: str, lower_first: bool = False, **names: str) -> str:
    # after a connector ("However, ...") a sentence that opens with a template word, not a name, goes lower case
    if lower_first and not template.startswith("{"):
        template = template[0].lower() + template[1:]
    return template.format(**names)


def _render_class(cls: CausalClass, rng: random.Random, variant: str) -> tuple[list[str], str, list[str]]:
    """The class's variable names, its premise, and its hypotheses in (pair, PROPERTIES) order."""
    n = cls.n
    names = _random_names(rng, n) if variant == "renamed" else [chr(ord("A") + v) for v in range(n)]
    para = variant == "paraphrased"
    pick = (lambda plain, paraphrases: rng.choice(paraphrases)) if para else (lambda plain, _: rng.choice(plain))
    intro = pick((_INTRO,), _INTRO_PARAPHRASES).format(n=n, variables=_list_text(names))
    corr = [_fill(pick(_CORRELATES, _CORRELATES_PARAPHRASES), x=names[i], y=names[j]) for i, j in cls.correlations]
    inds = []
    for i, j, z in cls.independences:
        template = pick(_INDEPENDENT_GIVEN, _INDEPENDENT_GIVEN_PARAPHRASES) if z else \
            pick(_INDEPENDENT, _INDEPENDENT_PARAPHRASES)
        inds.append((template, dict(x=names[i], y=names[j], z=_list_text([names[v] for v in z]))))
    parts = [intro, *corr]
    if inds:
        if corr:
            template, fields = inds[0]
            parts.append(pick(_HOWEVER, _HOWEVER_PARAPHRASES) + " " + _fill(template, lower_first=True, **fields))
            inds = inds[1:]
        parts += [_fill(template, **fields) for template, fields in inds]
    premise = " ".join(parts)
    hypotheses = []
    templates = _HYPOTHESIS_PARAPHRASES if para else _HYPOTHESES
    for i, j in _upper_pairs(n):
        for meaning, swapped in _MEANING:
            x, y = (j, i) if swapped else (i, j)
            if swapped is None and rng.random() < 0.5:  # symmetric: either order
                x, y = j, i
            hypotheses.append(_fill(rng.choice(templates[meaning]), x=names[x], y=names[y]))
    return names, premise, hypotheses


def _parse_nodes(nodes: Iterable[int]) -> list[int]:
    out = sorted(set(int(n) for n in nodes))
    if not out:
        raise UserError("no numbers of variables given: use e.g. nodes 2 to 6")
    for n in out:
        _check_nodes(n)
    return out


def corr2cause_items(nodes: Iterable[int] = range(2, MAX_NODES + 1), seed: int = 0, variant: str = "plain",
                     max_per_n: int | None = None, test_fraction: float = 0.2) -> dict[str, list[dict[str, Any]]]:
    """The Corr2Cause items for every number of variables in `nodes` (2..6), split into {'train', 'test'} by
    equivalence class (a test premise never appears in train), deterministic from `seed`.

    Each record has the paper's fields -- `premise`, `hypothesis`, `label` (1 = valid, i.e. entailed),
    `relation` (entailment / neutral / contradiction), `num_variables`,
    `template` (one of PROPERTIES) -- plus `relation_index` (index in RELATIONS), `share` (the fraction of the
    class's DAGs with the property), `class`, `class_size`, `pair` and `variables`. `variant`: 'plain' (the
    paper's letters and templates), 'renamed' (made-up variable names) or 'paraphrased' (hand-written
    paraphrases of every sentence). `max_per_n` keeps that many items per number of variables, a deterministic
    sample from the seed (n = 6 alone has 2,201 premises and 198,090 items)."""
    if variant not in VARIANTS:
        raise UserError(f"variant {variant!r} is not one of {', '.join(VARIANTS)}")
    if max_per_n is not None and max_per_n < 1:
        raise UserError(f"max_per_n must be at least 1 (got {max_per_n})")
    if not 0 <= test_fraction <= 1:
        raise UserError(f"test_fraction must be between 0 and 1 (got {test_fraction})")
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for n in _parse_nodes(nodes):
        classes = equivalence_classes(n)
        order = list(range(len(classes)))
        random.Random(f"corr2cause-split-{seed}-{n}").shuffle(order)
        n_test = round(test_fraction * len(classes))
        if len(classes) > 1 and 0 < test_fraction < 1:  # both splits get at least one premise
            n_test = min(max(n_test, 1), len(classes) - 1)
        test = set(order[:n_test])
        per_class = len(_upper_pairs(n)) * len(PROPERTIES)
        total = len(classes) * per_class
        chosen = None
        if max_per_n is not None and max_per_n < total:
            chosen = set(random.Random(f"corr2cause-sample-{seed}-{n}").sample(range(total), max_per_n))
        for c, cls in enumerate(classes):
            wanted = [k for k in range(per_class) if chosen is None or c * per_class + k in chosen]
            if not wanted:
                continue
            names, premise, hypotheses = _render_class(cls, random.Random(f"corr2cause-{variant}-{seed}-{n}-{c}"),
                                                       variant)
            pairs = [(i, j, kind) for i, j in _upper_pairs(n) for kind in PROPERTIES]
            for k in wanted:
                i, j, kind = pairs[k]
                relation = cls.label(kind, i, j)
                splits["test" if c in test else "train"].append({
                    "id": f"n{n}-class{c}-{names[i]}{names[j]}-{kind.replace(' ', '_')}",
                    "num_variables": n,
                    "template": kind,
                    "premise": premise,
                    "hypothesis": hypotheses[k],
                    "label": int(relation == "entailment"),
                    "relation": relation,
                    "relation_index": RELATIONS.index(relation),
                    "share": round(float(cls.fractions[PROPERTIES.index(kind), i, j]), 6),
                    "class": c,
                    "class_size": len(cls.dags),
                    "pair": [names[i], names[j]],
                    "variables": names,
                    "variant": variant,
                })
    return splits


_PROMPT = "Premise: {{premise}}\nHypothesis: {{hypothesis}}"  # the paper's `input` field


def corr2cause_task(name: str = "corr2cause", classes: int = 2) -> TaskSpec:
    """The lm-eval task over `corr2cause_items` records: binary (is the hypothesis valid? No / Yes, target
    `label`) or 3-way in the harness's ANLI style (True / Neither / False, target `relation_index`)."""
    if classes == 2:
        return TaskSpec(name=name, doc_to_text=_PROMPT + "\nQuestion: Is the hypothesis valid? Yes or No?\nAnswer:",
                        doc_to_target="label", doc_to_choice=["No", "Yes"])
    if classes == 3:
        return TaskSpec(name=name, doc_to_text=_PROMPT + "\nQuestion: True, False, or Neither?\nAnswer:",
                        doc_to_target="relation_index", doc_to_choice=["True", "Neither", "False"])
    raise UserError(f"classes must be 2 (valid or not) or 3 (entailment / neutral / contradiction), got {classes}")


def write_corr2cause(out_dir: str | Path, splits: dict[str, list[dict[str, Any]]], classes: int = 2,
                     name: str | None = None) -> Path:
    """Writes `corr2cause_items` splits as train.jsonl / test.jsonl plus the task YAML; returns the YAML's path.
    The task is named corr2cause[_<variant>][_3way] unless `name` is given."""
    if name is None:
        variants = {r["variant"] for split in splits.values() for r in split}
        variant = variants.pop() if len(variants) == 1 else "plain"
        name = "corr2cause" + ("" if variant == "plain" else f"_{variant}") + ("_3way" if classes == 3 else "")
    return write_suite(out_dir, corr2cause_task(name, classes), splits)


def label_counts(splits: dict[str, list[dict[str, Any]]]) -> dict[int, dict[str, int]]:
    """Per number of variables: premises, items per split, and items per relation (for the CLI's summary)."""
    out: dict[int, dict[str, int]] = {}
    premises: dict[int, set[int]] = {}
    for split, records in splits.items():
        for r in records:
            row = out.setdefault(r["num_variables"], {"premises": 0, **{s: 0 for s in splits},
                                                       **{rel: 0 for rel in RELATIONS}})
            row[split] += 1
            row[r["relation"]] += 1
            premises.setdefault(r["num_variables"], set()).add(r["class"])
    for n, row in out.items():
        row["premises"] = len(premises[n])
    return dict(sorted(out.items()))
