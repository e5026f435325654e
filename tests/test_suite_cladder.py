"""The CLadder-style suite: every answer checked against a Monte Carlo simulation of its structural causal model
(written here independently of the generator's exact enumeration), the identification formulas against the
enumeration, determinism, coverage, the files written and the command line."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from decoderlab.errors import UserError
from decoderlab.suites.cladder import (
    ESTIMANDS,
    GRAPHS,
    MEDIATOR,
    QUERY_TYPES,
    ExactModel,
    backdoor_sets,
    d_separated,
    exact_quantity,
    generate_cladder,
    query_types_for,
    sample_model,
    write_cladder,
)

BATCHES, PER_BATCH = 50, 10_000  # 500k draws per question; the s.e. comes from the spread of the 50 batch values
Z = 5.0  # checks at 5 standard errors: a chance failure has probability ~1e-5 per check (t with 49 d.o.f.)


# --------------------------------------------------------------------------- an independent simulator


def _solve(scm: dict, noise: dict, do: dict | None = None) -> dict:
    """Sample the structural equations V = [U_V < P(V=1 | parents)] on noise of shape (BATCHES, PER_BATCH)."""
    do = do or {}
    values = {}
    for var, parents in scm["parents"].items():
        if var in do:
            values[var] = np.broadcast_to(np.asarray(do[var]), noise[var].shape).astype(np.int64)
        else:
            table = np.asarray(scm["p1"][var])
            values[var] = (noise[var] < table[tuple(values[p] for p in parents)]).astype(np.int64)
    return values


def _mean(x, where=None):
    """Per-batch mean of x (over the rows where `where` holds)."""
    where = np.ones_like(x) if where is None else where.astype(np.int64)
    return (x * where).sum(axis=1) / where.sum(axis=1)


def _adjusted(obs: dict, adjust: list[str]):
    total = 0.0
    for z in itertools.product((0, 1), repeat=len(adjust)):
        stratum = np.ones_like(obs["Y"])
        for var, val in zip(adjust, z, strict=True):
            stratum = stratum * (obs[var] == val)
        total = total + stratum.mean(axis=1) * (_mean(obs["Y"], stratum * (obs["X"] == 1))
                                                - _mean(obs["Y"], stratum * (obs["X"] == 0)))
    return total


def simulate(record: dict, seed: int = 0) -> dict:
    """Per-batch simulated values of the question's quantity (and of each stated probability)."""
    scm = record["scm"]
    rng = np.random.default_rng(seed)
    noise = {v: rng.random((BATCHES, PER_BATCH)) for v in scm["parents"]}  # abduction: one noise draw per unit
    obs = _solve(scm, noise)
    y1, y0 = _solve(scm, noise, {"X": 1})["Y"], _solve(scm, noise, {"X": 0})["Y"]  # the same units, both arms
    query = record["query_type"]
    out = {}
    if query == "marginal":
        out["quantity"] = _mean(obs["Y"])
    elif query in ("correlation", "exp_away"):
        sel = obs["V3"] == 1 if query == "exp_away" else np.ones_like(obs["Y"], dtype=bool)
        out["quantity"] = _mean(obs["Y"], sel & (obs["X"] == 1)) - _mean(obs["Y"], sel & (obs["X"] == 0))
    elif query in ("ate", "collider_bias"):
        out["quantity"] = _mean(y1 - y0)
        if query == "collider_bias":
            sel = obs["V3"] == 1
            out["association"] = _mean(obs["Y"], sel & (obs["X"] == 1)) - _mean(obs["Y"], sel & (obs["X"] == 0))
    elif query == "ett":
        out["quantity"] = _mean(y1 - y0, obs["X"] == 1)
    elif query in ("nde", "nie"):
        med = record["mediator"]
        m1, m0 = _solve(scm, noise, {"X": 1})[med], _solve(scm, noise, {"X": 0})[med]
        if query == "nde":  # Y_{1, M_0} - Y_0
            out["quantity"] = _mean(_solve(scm, noise, {"X": 1, med: m0})["Y"] - y0)
        else:  # Y_{0, M_1} - Y_{0, M_0}
            out["quantity"] = _mean(_solve(scm, noise, {"X": 0, med: m1})["Y"]
                                    - _solve(scm, noise, {"X": 0, med: m0})["Y"])
    elif query == "backadj":
        ate = _mean(y1 - y0)
        out["bias"] = [_adjusted(obs, method) - ate for method in record["adjustment"]]
    for i, g in enumerate(record["given"]):
        hit, cond = np.ones_like(obs["Y"]), np.ones_like(obs["Y"])
        for var, val in g["event"].items():
            hit = hit * (obs[var] == val)
        for var, val in g["given"].items():
            cond = cond * (obs[var] == val)
        out[f"given{i}"] = _mean(hit, cond)
    return out


def _estimate(batch_values) -> tuple[float, float]:
    values = np.asarray(batch_values, dtype=float)
    return float(values.mean()), float(values.std(ddof=1) / np.sqrt(len(values)))


def check_question(record: dict, seed: int = 0) -> tuple[bool, list[str]]:
    """(whether the simulation was decisive for the label, the disagreements found)."""
    sim = simulate(record, seed)
    problems, decisive = [], False
    query = record["query_type"]
    for i, g in enumerate(record["given"]):  # every stated number is the model's probability, to the percent
        mean, se = _estimate(sim[f"given{i}"])
        if abs(mean - g["value"]) > Z * se + 0.005 + 1e-9:
            problems.append(f"stated {g} but simulated {mean:.4f} +- {se:.4f}")
    if query == "backadj":
        for bias, exact_bias in zip(sim["bias"], record["adjustment_bias"], strict=True):
            mean, se = _estimate(bias)
            if abs(mean - exact_bias) > Z * se:
                problems.append(f"adjustment bias {exact_bias:.4f} but simulated {mean:.4f} +- {se:.4f}")
        (m1, se1), (m2, se2) = _estimate(sim["bias"][0]), _estimate(sim["bias"][1])
        decisive = max(abs(b) for b in record["adjustment_bias"]) > Z * max(se1, se2)
        if decisive:
            simulated_label = abs(m1) < abs(m2)  # Method 1 is correct iff its adjustment recovers the effect
            if int(simulated_label) != record["label"]:
                problems.append(f"label {record['label']} but simulated biases {m1:.4f}, {m2:.4f}")
        return decisive, problems
    mean, se = _estimate(sim["quantity"])
    if abs(mean - record["quantity"]) > Z * se:
        problems.append(f"exact {record['quantity']:.4f} but simulated {mean:.4f} +- {se:.4f}")
    if query == "collider_bias":
        assoc, assoc_se = _estimate(sim["association"])
        if abs(assoc - record["association"]) > Z * assoc_se:
            problems.append(f"association {record['association']:.4f} but simulated {assoc:.4f}")
        decisive = True
        affects = abs(mean) > Z * se
        simulated_label = affects if record["positive"] else not affects
    else:
        decisive = abs(record["quantity"] - record["threshold"]) > Z * se
        simulated_label = (mean > record["threshold"]) == record["positive"]
    if decisive and int(simulated_label) != record["label"]:
        problems.append(f"label {record['label']} but simulated {mean:.4f} against {record['threshold']}")
    return decisive, problems


@pytest.fixture(scope="module")
def suite():
    return generate_cladder(per_graph=12, seed=3)


def _sample(suite, per_query: int):
    records = suite["train"] + suite["test"]
    picked = []
    for query in QUERY_TYPES:
        of_type = [r for r in records if r["query_type"] == query]
        # spread over graphs: round-robin by graph
        by_graph = {}
        for r in of_type:
            by_graph.setdefault(r["graph"], []).append(r)
        order = [r for group in itertools.zip_longest(*by_graph.values()) for r in group if r is not None]
        picked += order[:per_query]
    return picked


def test_answers_match_simulation_for_every_query_type(suite):
    checked = {q: 0 for q in QUERY_TYPES}
    problems = []
    for i, record in enumerate(_sample(suite, per_query=6)):
        decisive, found = check_question(record, seed=i)
        problems += [f"{record['id']}: {p}" for p in found]
        checked[record["query_type"]] += decisive
    assert not problems, problems
    assert all(n >= 4 for n in checked.values()), checked  # enough questions of every type were decisive


def test_simulation_check_catches_a_wrong_answer(suite):
    caught = 0
    for i, record in enumerate(_sample(suite, per_query=1)):
        wrong = dict(record, label=1 - record["label"])
        decisive, found = check_question(wrong, seed=100 + i)
        caught += decisive and bool(found)
        if record["query_type"] not in ("backadj",):
            off = dict(record, quantity=record["quantity"] + 0.05)
            assert check_question(off, seed=200 + i)[1], record["id"]
        if record["given"]:
            bad = [dict(g, value=round(g["value"] + 0.03, 2)) for g in record["given"]]
            assert check_question(dict(record, given=bad), seed=300 + i)[1], record["id"]
    assert caught == len(QUERY_TYPES)


def test_identification_formulas_equal_the_enumerated_quantities():
    rng = np.random.default_rng(11)
    for graph in GRAPHS:
        for _ in range(5):
            exact = ExactModel(sample_model(graph, rng))
            assert abs(sum(exact.weights) - 1) < 1e-12
            for query in query_types_for(graph):
                if query in ("backadj",):
                    continue
                quantity, _ = exact_quantity(exact, query)
                if query == "collider_bias":
                    assert abs(quantity) < 1e-12  # X does not cause Y in the collider
                    continue
                assert ESTIMANDS[query](graph, exact.prob) == pytest.approx(quantity, abs=1e-9), (graph, query)
            valid, invalid = backdoor_sets(graph)
            for adjust in valid:
                assert exact.adjusted_ate(adjust) == pytest.approx(exact.ate(), abs=1e-9), (graph, adjust)


def _d_separated_by_paths(parents, a, b, given):
    """d-separation by enumerating every path of the skeleton (the textbook definition)."""
    nodes = list(parents)
    adj = {n: set(parents[n]) | {c for c in nodes if n in parents[c]} for n in nodes}

    def descendants(n):
        out, todo = set(), [n]
        while todo:
            cur = todo.pop()
            for c in nodes:
                if cur in parents[c] and c not in out:
                    out.add(c)
                    todo.append(c)
        return out

    def paths(path):
        if path[-1] == b:
            yield path
            return
        for nxt in adj[path[-1]]:
            if nxt not in path:
                yield from paths(path + [nxt])

    for path in paths([a]):
        blocked = False
        for prev, mid, nxt in zip(path, path[1:], path[2:], strict=False):
            collider = prev in parents[mid] and nxt in parents[mid]
            if collider and not ({mid} | descendants(mid)) & set(given):
                blocked = True
            if not collider and mid in given:
                blocked = True
        if not blocked:
            return False
    return True


def test_d_separation_and_backdoor_sets():
    for parents in GRAPHS.values():
        others = list(parents)
        for a, b in itertools.combinations(others, 2):
            rest = [v for v in others if v not in (a, b)]
            for size in range(len(rest) + 1):
                for given in itertools.combinations(rest, size):
                    assert d_separated(parents, a, b, given) == _d_separated_by_paths(parents, a, b, given)
    assert backdoor_sets("confounding") == ([("V1",)], [()])
    assert backdoor_sets("diamondcut") == ([("V1",), ("V3",), ("V1", "V3")], [()])
    assert backdoor_sets("IV")[0] == [] and backdoor_sets("frontdoor")[0] == []
    assert backdoor_sets("collider") == ([()], [("V3",)])


def test_every_graph_and_query_type_appears_and_labels_are_balanced(suite):
    records = suite["train"] + suite["test"]
    assert {r["graph"] for r in records} == set(GRAPHS)
    assert {r["query_type"] for r in records} == set(QUERY_TYPES)
    assert {r["rung"] for r in records} == {1, 2, 3}
    assert 0.4 < np.mean([r["label"] for r in records]) < 0.6
    assert suite["train"] and suite["test"]
    models = {}
    for split, rs in suite.items():
        for r in rs:
            models.setdefault(r["id"].rsplit("-", 1)[0], set()).add(split)
    assert all(len(s) == 1 for s in models.values())  # a model's questions never straddle the split
    for r in records:
        assert r["answer"] == ["no", "yes"][r["label"]] and r["text"].endswith("\nAnswer:")
        for g in r["given"]:  # the numbers the answer needs are in the text
            assert f"is {round(g['value'] * 100)}%." in r["given_info"]
        if r["query_type"] not in ("backadj", "collider_bias"):
            assert abs(r["quantity"] - r["threshold"]) >= 0.02
            assert (r["estimand_from_given"] > r["threshold"]) == (r["quantity"] > r["threshold"])
    assert {r["mediator"] for r in records if r["query_type"] in ("nde", "nie")} == set(MEDIATOR.values())


def test_deterministic_from_the_seed():
    a, b = generate_cladder(per_graph=4, seed=5), generate_cladder(per_graph=4, seed=5)
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    c = generate_cladder(per_graph=4, seed=6)
    assert json.dumps(a, sort_keys=True) != json.dumps(c, sort_keys=True)


def test_bad_arguments_are_user_errors():
    with pytest.raises(UserError, match="per-graph"):
        generate_cladder(per_graph=0)
    with pytest.raises(UserError, match="unknown graph"):
        generate_cladder(per_graph=1, graphs=["square"])
    with pytest.raises(UserError, match="test_fraction"):
        generate_cladder(per_graph=1, test_fraction=1.5)


def test_writes_jsonl_and_an_lm_eval_yaml(tmp_path):
    yaml_path, splits = write_cladder(tmp_path / "suite", per_graph=3, seed=1)
    text = yaml_path.read_text()
    assert yaml_path.name == "cladder.yaml" and "output_type: multiple_choice" in text
    assert 'doc_to_choice: ["no", "yes"]' in text and 'doc_to_target: "label"' in text
    for split, records in splits.items():
        path = tmp_path / "suite" / f"{split}.jsonl"
        assert str(path) in text
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert lines == json.loads(json.dumps(records))


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "decoderlab", *args], capture_output=True, text=True, timeout=300)


def test_cli_writes_the_suite_and_prints_counts(tmp_path):
    out = _run("suite", "cladder", "--out", str(tmp_path / "s"), "--per-graph", "3", "--seed", "2")
    assert out.returncode == 0, out.stderr
    expected = generate_cladder(per_graph=3, seed=2)
    total = sum(len(v) for v in expected.values())
    assert f"{total} questions" in out.stdout and "backadj" in out.stdout and "yes share" in out.stdout
    written = [json.loads(line) for line in (tmp_path / "s" / "test.jsonl").read_text().splitlines()]
    assert written == json.loads(json.dumps(expected["test"]))
    bad = _run("suite", "cladder", "--out", str(tmp_path / "t"), "--per-graph", "0")
    assert bad.returncode == 2 and "--per-graph must be at least 1" in bad.stderr
    assert bad.stderr.strip().count("\n") == 0 and "Traceback" not in bad.stderr


def test_cli_bad_options_are_user_errors(tmp_path):
    from decoderlab.cli import suite_cladder_cmd

    with pytest.raises(UserError, match="--test-fraction must be in"):
        suite_cladder_cmd(out=str(tmp_path / "a"), per_graph=1, seed=0, test_fraction=2.0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="cannot create --out"):
        suite_cladder_cmd(out=str(tmp_path / "file" / "sub"), per_graph=1, seed=0, test_fraction=0.2)


def test_the_harness_reads_the_written_task(tmp_path):
    """lm-eval itself loads the YAML and builds the multiple-choice requests from the JSONL."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager, get_task_dict

    yaml_path, splits = write_cladder(tmp_path / "suite", per_graph=2, seed=0)
    task = get_task_dict(["cladder"], TaskManager(include_path=str(yaml_path.parent)))["cladder"]
    docs = list(task.test_docs())
    assert len(docs) == len(splits["test"])
    doc, record = docs[0], splits["test"][0]
    assert task.doc_to_text(doc) == record["text"] and task.doc_to_choice(doc) == ["no", "yes"]
    requests = task.construct_requests(doc, task.doc_to_text(doc))
    assert [r.arguments for r in requests] == [(record["text"], " no"), (record["text"], " yes")]
    assert task.doc_to_target(doc) == record["label"]
