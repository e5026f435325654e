"""Corr2Cause suite: labels against an independent brute force (every labelled DAG by adjacency matrices,
d-separation by explicit path enumeration, classes by identical independence sets, hypotheses parsed back from
the text), the DAG and class counts against OEIS, determinism, the files and the CLI."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
from collections import defaultdict
from functools import cache

import pytest

from decoderlab.errors import UserError
from decoderlab.suites import corr2cause_items, equivalence_classes, unlabeled_dags, write_corr2cause
from decoderlab.suites.corr2cause import label_counts

# ---------------------------------------------------------------------------------------------------------
# The brute force: nothing from the module under test.


def _acyclic(n: int, edges: set[tuple[int, int]]) -> bool:
    indegree = [sum(1 for _, j in edges if j == v) for v in range(n)]
    ready = [v for v in range(n) if indegree[v] == 0]
    done = 0
    while ready:
        v = ready.pop()
        done += 1
        for a, b in edges:
            if a == v:
                indegree[b] -= 1
                if indegree[b] == 0:
                    ready.append(b)
    return done == n


@cache
def _brute_dags(n: int) -> list[frozenset[tuple[int, int]]]:
    """Every labelled DAG: every off-diagonal adjacency matrix, kept when acyclic."""
    cells = [(i, j) for i in range(n) for j in range(n) if i != j]
    out = []
    for bits in range(1 << len(cells)):
        edges = {cells[k] for k in range(len(cells)) if bits >> k & 1}
        if _acyclic(n, edges):
            out.append(frozenset(edges))
    return out


def _simple_paths(n, edges, x, y):
    """Every simple path from x to y in the skeleton, as a node list."""
    adjacent = defaultdict(set)
    for a, b in edges:
        adjacent[a].add(b)
        adjacent[b].add(a)
    out, stack = [], [[x]]
    while stack:
        path = stack.pop()
        if path[-1] == y:
            out.append(path)
            continue
        stack += [path + [w] for w in adjacent[path[-1]] if w not in path]
    return out


def _descendants(edges, v):
    out, todo = set(), [v]
    while todo:
        u = todo.pop()
        for a, b in edges:
            if a == u and b not in out:
                out.add(b)
                todo.append(b)
    return out


def _d_separated(n, edges, x, y, z) -> bool:
    """Every path between x and y blocked by z: a non-collider in z, or a collider with neither itself nor a
    descendant in z."""
    for path in _simple_paths(n, edges, x, y):
        blocked = False
        for k in range(1, len(path) - 1):
            a, m, b = path[k - 1], path[k], path[k + 1]
            if (a, m) in edges and (b, m) in edges:  # collider
                if m not in z and not (_descendants(edges, m) & set(z)):
                    blocked = True
            elif m in z:
                blocked = True
        if not blocked:
            return False
    return True


def _independences(n, edges) -> frozenset:
    out = set()
    for x, y in itertools.combinations(range(n), 2):
        others = [v for v in range(n) if v not in (x, y)]
        for size in range(len(others) + 1):
            for z in itertools.combinations(others, size):
                if _d_separated(n, edges, x, y, z):
                    out.add((x, y, frozenset(z)))
    return frozenset(out)


@cache
def _brute_classes(n: int) -> dict[frozenset, list[frozenset]]:
    classes = defaultdict(list)
    for dag in _brute_dags(n):
        classes[_independences(n, dag)].append(dag)
    return dict(classes)


def _directed_path(n, edges, x, y, min_length):
    return any(all((p[k], p[k + 1]) in edges for k in range(len(p) - 1)) and len(p) - 1 >= min_length
               for p in _simple_paths(n, edges, x, y))


def _v_shaped(n, edges, x, y, into: bool) -> bool:
    """A path x -> ... -> k <- ... <- y (into) or x <- ... <- k -> ... -> y, k in between."""
    for p in _simple_paths(n, edges, x, y):
        for t in range(1, len(p) - 1):
            head = all(((p[s], p[s + 1]) if into else (p[s + 1], p[s])) in edges for s in range(t))
            tail = all(((p[s + 1], p[s]) if into else (p[s], p[s + 1])) in edges for s in range(t, len(p) - 1))
            if head and tail:
                return True
    return False


_HYPOTHESIS = [
    (re.compile(r"^(\w+) directly causes (\w+)\.$"), lambda n, e, x, y: (x, y) in e),
    (re.compile(r"^(\w+) causes something else which causes (\w+)\.$"),
     lambda n, e, x, y: _directed_path(n, e, x, y, 2)),
    (re.compile(r"^(\w+) is a cause for (\w+), but not a direct one\.$"),
     lambda n, e, x, y: _directed_path(n, e, x, y, 2)),
    (re.compile(r"^There exists at least one collider \(i\.e\., common effect\) of (\w+) and (\w+)\.$"),
     lambda n, e, x, y: _v_shaped(n, e, x, y, into=True)),
    (re.compile(r"^There exists at least one confounder \(i\.e\., common cause\) of (\w+) and (\w+)\.$"),
     lambda n, e, x, y: _v_shaped(n, e, x, y, into=False)),
]


def _parse_premise(premise: str):
    head = re.match(r"Suppose there is a closed system of (\d) variables, (.+?)\. All the statistical relations "
                    r"among these \1 variables are as follows: (.*)$", premise)
    assert head, premise
    names = re.split(r", | and ", head.group(2))
    index = {name: k for k, name in enumerate(names)}
    body = head.group(3).replace("However, ", "")
    correlated, independences = set(), set()
    for sentence in re.findall(r"[^.]+\.", body):
        sentence = sentence.strip()
        if m := re.fullmatch(r"(\w+) correlates with (\w+)\.", sentence):
            correlated.add(frozenset((index[m[1]], index[m[2]])))
        elif m := re.fullmatch(r"(\w+) is independent of (\w+)\.", sentence):
            independences.add((index[m[1]], index[m[2]], frozenset()))
        elif m := re.fullmatch(r"(\w+) and (\w+) are independent given (.+)\.", sentence):
            z = frozenset(index[v] for v in re.split(r", | and ", m[3]))
            independences.add((index[m[1]], index[m[2]], z))
        else:
            raise AssertionError(f"unparsed sentence {sentence!r}")
    return int(head.group(1)), names, index, correlated, frozenset(independences)


def _check_against_brute_force(records, n):
    classes = _brute_classes(n)
    seen = defaultdict(set)
    for r in records:
        size, names, index, correlated, independences = _parse_premise(r["premise"])
        assert size == n == r["num_variables"] == len(names)
        # the correlations are exactly the pairs that are not unconditionally independent
        free = {frozenset((x, y)) for x, y, z in independences if not z}
        assert correlated | free == {frozenset(p) for p in itertools.combinations(range(n), 2)}
        assert not correlated & free
        dags = classes[independences]  # a KeyError: the premise is no DAG's independence set
        parsed = [(m, holds) for pattern, holds in _HYPOTHESIS if (m := pattern.match(r["hypothesis"]))]
        assert len(parsed) == 1, f"unparsed hypothesis {r['hypothesis']!r}"
        m, holds = parsed[0]
        x, y = index[m[1]], index[m[2]]
        truth = [holds(n, dag, x, y) for dag in dags]
        expected = "entailment" if all(truth) else "contradiction" if not any(truth) else "neutral"
        assert r["relation"] == expected, (r["premise"], r["hypothesis"], r["relation"], expected)
        assert r["label"] == int(expected == "entailment")
        assert r["class_size"] == len(dags)
        assert r["share"] == pytest.approx(sum(truth) / len(dags), abs=1e-6)
        seen[independences].add((r["template"], frozenset((x, y))))
    return seen


def _relabel(independences, perm):
    return frozenset((min(perm[x], perm[y]), max(perm[x], perm[y]), frozenset(perm[v] for v in z))
                     for x, y, z in independences)


@pytest.mark.parametrize("variant", ["plain", "renamed"])
def test_every_three_variable_item_matches_the_brute_force(variant):
    splits = corr2cause_items(nodes=[3], seed=0, variant=variant)
    records = splits["train"] + splits["test"]
    seen = _check_against_brute_force(records, 3)
    # one premise per class up to relabelling, and every class is there
    orbits = {frozenset(_relabel(s, p) for p in itertools.permutations(range(3))) for s in _brute_classes(3)}
    assert len(seen) == len(orbits) == 5
    assert {frozenset(_relabel(s, p) for p in itertools.permutations(range(3))) for s in seen} == orbits
    for hypotheses in seen.values():  # six kinds for each of the three pairs
        assert len(hypotheses) == 18
    assert len(_brute_dags(3)) == 25 and len(_brute_classes(3)) == 11


def test_four_variable_items_match_the_brute_force():
    splits = corr2cause_items(nodes=[4], seed=3)
    records = splits["train"] + splits["test"]
    assert len(records) == 20 * 6 * 6
    seen = _check_against_brute_force(records[::3], 4)  # every third item: all classes, a third of hypotheses
    assert len(seen) == 20 and len(_brute_dags(4)) == 543 and len(_brute_classes(4)) == 185
    labels = {r["relation"] for r in records}
    assert labels == {"entailment", "neutral", "contradiction"}


def test_unlabelled_dag_counts_are_oeis_a003087():
    assert [len(unlabeled_dags(n)) for n in range(1, 7)] == [1, 2, 6, 31, 302, 5984]
    for n in (3, 4):  # each is a DAG, and no two are relabellings of one another
        dags = [frozenset(d) for d in unlabeled_dags(n)]
        assert all(_acyclic(n, set(d)) for d in dags)
        forms = [min(tuple(sorted((p[i], p[j]) for i, j in d)) for p in itertools.permutations(range(n)))
                 for d in dags]
        assert len(set(forms)) == len(forms)


def test_classes_cover_every_labelled_dag_and_every_labelled_class():
    # relabelling the premises gives every labelled Markov equivalence class once (OEIS A007984: 2, 11, 185,
    # 8782) and the class members every labelled DAG once (A003024: 3, 25, 543, 29281)
    for n, classes_total, dags_total in [(2, 2, 3), (3, 11, 25), (4, 185, 543), (5, 8782, 29281)]:
        n_classes = n_dags = 0
        for cls in equivalence_classes(n):
            premise = frozenset((x, y, frozenset(z)) for x, y, z in cls.independences)
            orbit = {_relabel(premise, p) for p in itertools.permutations(range(n))}
            n_classes += len(orbit)
            n_dags += len(orbit) * len(cls.dags)
            assert len(set(cls.dags)) == len(cls.dags)
        assert (n_classes, n_dags) == (classes_total, dags_total)
    # and the members of a three-variable class are exactly the brute force's DAGs with that set
    brute = _brute_classes(3)
    for cls in equivalence_classes(3):
        premise = frozenset((x, y, frozenset(z)) for x, y, z in cls.independences)
        assert set(map(frozenset, cls.dags)) == set(brute[premise])


def test_deterministic_from_the_seed_and_split_by_class():
    a = corr2cause_items(nodes=[3, 4], seed=7, variant="renamed")
    b = corr2cause_items(nodes=[3, 4], seed=7, variant="renamed")
    c = corr2cause_items(nodes=[3, 4], seed=8, variant="renamed")
    assert a == b and a != c
    for splits in (a, c):
        for n in (3, 4):
            train = {r["premise"] for r in splits["train"] if r["num_variables"] == n}
            test = {r["premise"] for r in splits["test"] if r["num_variables"] == n}
            assert train and test and not train & test
    sample = corr2cause_items(nodes=[4], seed=7, max_per_n=50)
    assert sum(len(v) for v in sample.values()) == 50
    assert sample == corr2cause_items(nodes=[4], seed=7, max_per_n=50)
    full = {r["id"]: r for v in corr2cause_items(nodes=[4], seed=7).values() for r in v}
    assert all(full[r["id"]] == r for v in sample.values() for r in v)


def test_variants_keep_the_labels_and_change_the_words():
    plain = corr2cause_items(nodes=[4], seed=1)
    para = corr2cause_items(nodes=[4], seed=1, variant="paraphrased")
    renamed = corr2cause_items(nodes=[4], seed=1, variant="renamed")

    def key(r):
        return r["class"], r["template"], r["relation"], r["share"]

    for other in (para, renamed):
        for split in ("train", "test"):
            assert sorted(map(key, other[split])) == sorted(map(key, plain[split]))
    for r in para["train"] + para["test"]:
        assert "correlates with" not in r["premise"] and "Suppose there is a closed system" not in r["premise"]
        assert not any(p.match(r["hypothesis"]) for p, _ in _HYPOTHESIS)
    for r in renamed["train"]:
        assert not set(r["variables"]) & set("ABCD") and all(v in r["premise"] for v in r["variables"])


def test_written_files_load_in_lm_eval(tmp_path):
    splits = corr2cause_items(nodes=[2, 3], seed=0)
    path = write_corr2cause(tmp_path, splits, classes=3)
    assert path.name == "corr2cause_3way.yaml"
    lines = (tmp_path / "test.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == splits["test"]
    tasks = pytest.importorskip("lm_eval.tasks")
    task = tasks.TaskManager(include_path=str(tmp_path)).load(["corr2cause_3way"])["tasks"]["corr2cause_3way"]
    docs = list(task.test_docs())
    assert len(docs) == len(splits["test"])
    doc = docs[0]
    assert task.doc_to_text(doc).startswith("Premise: Suppose there is a closed system of")
    assert task.doc_to_text(doc).endswith("\nQuestion: True, False, or Neither?\nAnswer:")
    assert task.doc_to_choice(doc)[task.doc_to_target(doc)] == {"entailment": "True", "neutral": "Neither",
                                                                "contradiction": "False"}[doc["relation"]]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "decoderlab", "suite", "corr2cause", *args], capture_output=True,
                          text=True, timeout=300)


def test_cli_writes_the_suite_and_prints_counts(tmp_path):
    out = _run("--out", str(tmp_path), "--nodes", "2-4", "--seed", "1", "--variant", "paraphrased")
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines() if line.strip()}
    assert {"2", "3", "4", "all"} <= set(rows)
    rows = {int(k) if k.isdigit() else k: v for k, v in rows.items()}
    assert rows["all"][1:4] == ["27", str(sum(int(rows[n][2]) for n in (2, 3, 4))),
                                str(sum(int(rows[n][3]) for n in (2, 3, 4)))]
    assert rows[4][1] == "20" and int(rows[4][2]) + int(rows[4][3]) == 720
    records = [json.loads(line) for split in ("train", "test")
               for line in (tmp_path / f"{split}.jsonl").read_text().splitlines()]
    assert len(records) == 12 + 90 + 720
    counts = label_counts({"all": records})
    assert f"{counts[4]['entailment'] / 720:.1%}" == rows[4][4]
    assert (tmp_path / "corr2cause_paraphrased.yaml").exists()


@pytest.mark.parametrize("args, fragment", [
    (["--nodes", "2-9"], "out of range"),
    (["--nodes", "two"], "is not a range"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, fragment):
    out = _run("--out", str(tmp_path), *args)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and fragment in out.stderr and "Traceback" not in out.stderr


def test_api_bad_input():
    from decoderlab.suites import corr2cause_task

    with pytest.raises(UserError, match="is not one of plain, renamed, paraphrased"):
        corr2cause_items(nodes=[3], variant="fancy")
    with pytest.raises(UserError, match="at least 1"):
        corr2cause_items(nodes=[3], max_per_n=0)
    with pytest.raises(UserError, match="classes must be 2"):
        corr2cause_task(classes=5)
    with pytest.raises(UserError, match="out of range"):
        equivalence_classes(7)
    with pytest.raises(UserError, match="out of range"):
        unlabeled_dags(0)
    with pytest.raises(UserError, match="test_fraction"):
        corr2cause_items(nodes=[3], test_fraction=1.5)
