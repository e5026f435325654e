"""CLadder-style causal questions: the paper's ten graph shapes over binary variables, conditional probability
tables sampled from a seed, and yes/no questions on the three rungs of the ladder of causation, each answered
exactly by enumerating the structural causal model.

Every variable is a structural equation `V = 1 if U_V < P(V=1 | parents) else 0` with its own uniform noise
`U_V`. The noise is enumerated exactly: for each variable the distinct thresholds of its table cut [0, 1] into
intervals on which the equation's response to its parents is fixed, so the product of those intervals is a
finite, exact exogenous distribution (a few hundred atoms at most). Observational probabilities are sums over
the atoms; interventions replace an equation (graph surgery); counterfactuals keep each atom's noise and solve
again under the other treatment (abduction, action, prediction).

Each question states the probabilities an identification formula needs (the paper's background, given info
and question), rounded to whole percents. The label follows from the exactly enumerated quantity; a question is
kept only when that quantity is at least `MARGIN` from its decision threshold and the formula evaluated on the
stated, rounded numbers falls on the same side, so the text always suffices to answer it.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
from .writer import TaskSpec, write_suite

MARGIN = 0.02
"""Kept questions have their exact quantity at least this far from the decision threshold."""

# The paper's graphs: X is the treatment, Y the outcome, V1 a common cause of X, V2 a second cause / mediator,
# V3 a collider / mediator. Parents are listed in a topological order.
GRAPHS: dict[str, dict[str, tuple[str, ...]]] = {
    "chain": {"X": (), "V2": ("X",), "Y": ("V2",)},
    "fork": {"X": (), "V2": (), "Y": ("X", "V2")},
    "collider": {"X": (), "Y": (), "V3": ("X", "Y")},
    "confounding": {"V1": (), "X": ("V1",), "Y": ("V1", "X")},
    "mediation": {"X": (), "V2": ("X",), "Y": ("X", "V2")},
    "IV": {"V1": (), "V2": (), "X": ("V1", "V2"), "Y": ("V1", "X")},
    "frontdoor": {"V1": (), "X": ("V1",), "V3": ("X",), "Y": ("V1", "V3")},
    "arrowhead": {"X": (), "V2": (), "V3": ("X", "V2"), "Y": ("X", "V2", "V3")},
    "diamond": {"X": (), "V2": ("X",), "V3": ("X",), "Y": ("V2", "V3")},
    "diamondcut": {"V1": (), "X": ("V1",), "V3": ("V1",), "Y": ("X", "V3")},
}
UNOBSERVED: dict[str, tuple[str, ...]] = {"IV": ("V1",), "frontdoor": ("V1",)}
# The mediator of the natural direct / indirect effects (arrowhead: V2 is an observed mediator-outcome confounder).
MEDIATOR: dict[str, str] = {"mediation": "V2", "arrowhead": "V3"}
# Graphs where the treatment has no parents: interventional and treated-only quantities are plain conditionals.
_X_ROOT = ("chain", "fork", "mediation", "arrowhead", "diamond")

QUERY_RUNG: dict[str, int] = {"marginal": 1, "correlation": 1, "exp_away": 1, "ate": 2, "backadj": 2,
                              "collider_bias": 2, "ett": 3, "nde": 3, "nie": 3}
QUERY_TYPES = tuple(QUERY_RUNG)


def query_types_for(graph: str) -> tuple[str, ...]:
    """The query types asked about `graph`; the others are not identifiable there or meaningless (the collider's
    effect of X on Y is zero; NDE / NIE need a mediator next to a direct edge; the IV's effect on the treated is
    not identified). `backadj` is asked where a valid and an invalid observed adjustment set both exist."""
    queries = ["marginal", "correlation"]
    if graph == "collider":
        return (*queries, "exp_away", "backadj", "collider_bias")
    queries.append("ate")
    if backdoor_sets(graph)[0] and backdoor_sets(graph)[1]:
        queries.append("backadj")
    if graph != "IV":
        queries.append("ett")
    if graph in MEDIATOR:
        queries += ["nde", "nie"]
    return tuple(queries)


# ---------------------------------------------------------------------------------------------------- graphs


def _descendants(parents: Mapping[str, Sequence[str]], node: str) -> set[str]:
    found, frontier = set(), [node]
    while frontier:
        current = frontier.pop()
        for child, pa in parents.items():
            if current in pa and child not in found:
                found.add(child)
                frontier.append(child)
    return found


def d_separated(parents: Mapping[str, Sequence[str]], a: str, b: str, given: Iterable[str]) -> bool:
    """Whether `a` and `b` are d-separated by `given` in the DAG `parents` (moralised ancestral graph test)."""
    given = set(given)
    keep, frontier = set(), [a, b, *given]
    while frontier:  # ancestors of {a, b} | given
        node = frontier.pop()
        if node not in keep:
            keep.add(node)
            frontier.extend(parents[node])
    edges = {n: set() for n in keep}
    for node in keep:
        pa = list(parents[node])
        for p in pa:
            edges[node].add(p)
            edges[p].add(node)
        for p, q in itertools.combinations(pa, 2):  # marry the parents
            edges[p].add(q)
            edges[q].add(p)
    seen, frontier = {a}, [a]
    while frontier:
        node = frontier.pop()
        for nxt in edges[node] - given:
            if nxt == b:
                return False
            if nxt not in seen:
                seen.add(nxt)
                frontier.append(nxt)
    return True


def is_backdoor_set(graph: str, adjust: Iterable[str], treatment: str = "X", outcome: str = "Y") -> bool:
    """Pearl's back-door criterion: no descendant of the treatment, and every path into the treatment blocked
    (checked as d-separation once the treatment's outgoing edges are cut)."""
    parents = GRAPHS[graph]
    adjust = set(adjust)
    if adjust & _descendants(parents, treatment):
        return False
    cut = {v: tuple(p for p in pa if p != treatment) for v, pa in parents.items()}
    return d_separated(cut, treatment, outcome, adjust)


def backdoor_sets(graph: str) -> tuple[list[tuple[str, ...]], list[tuple[str, ...]]]:
    """(valid, invalid) adjustment sets among the graph's observed covariates, smallest first."""
    covariates = [v for v in GRAPHS[graph] if v not in ("X", "Y") and v not in UNOBSERVED.get(graph, ())]
    valid, invalid = [], []
    for size in range(len(covariates) + 1):
        for subset in itertools.combinations(covariates, size):
            (valid if is_backdoor_set(graph, subset) else invalid).append(subset)
    return valid, invalid


# ---------------------------------------------------------------------------------------------------- the SCM


@dataclass(frozen=True)
class CausalModel:
    """A binary structural causal model: `p1[v]` holds P(v=1 | parents) indexed by the parents' values (in the
    order of `GRAPHS[graph][v]`)."""

    graph: str
    p1: Mapping[str, np.ndarray]

    @property
    def parents(self) -> dict[str, tuple[str, ...]]:
        return GRAPHS[self.graph]

    def solve(self, noise: Mapping[str, np.ndarray], do: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
        """Every variable's value for each noise draw; `do` fixes variables (a constant or one value per draw)."""
        do = do or {}
        n = len(next(iter(noise.values())))
        values: dict[str, np.ndarray] = {}
        for var, pa in self.parents.items():
            if var in do:
                values[var] = np.broadcast_to(np.asarray(do[var], dtype=np.int8), (n,))
            else:
                p = self.p1[var][tuple(values[q] for q in pa)]
                values[var] = (noise[var] < p).astype(np.int8)
        return values

    def exogenous_atoms(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The exact noise distribution as (weights, one representative noise value per variable and atom)."""
        cells = []
        for var in self.parents:
            cuts = np.unique(np.concatenate([[0.0, 1.0], np.ravel(self.p1[var])]))
            cells.append((cuts[1:] - cuts[:-1], (cuts[1:] + cuts[:-1]) / 2))
        grid = np.meshgrid(*[np.arange(len(w)) for w, _ in cells], indexing="ij")
        weights = np.ones(grid[0].size)
        noise = {}
        for var, (w, mid), idx in zip(self.parents, cells, grid, strict=True):
            weights = weights * w[idx.ravel()]
            noise[var] = mid[idx.ravel()]
        return weights, noise

    def to_json(self) -> dict[str, Any]:
        return {"graph": self.graph, "parents": {v: list(pa) for v, pa in self.parents.items()},
                "p1": {v: np.asarray(p).tolist() for v, p in self.p1.items()}}


def sample_model(graph: str, rng: np.random.Generator) -> CausalModel:
    """Tables drawn uniformly from [0.05, 0.95]. The IV's outcome table is additive in its two causes (X and the
    unobserved V1), the assumption under which the Wald ratio identifies the effect of X."""
    p1 = {}
    for var, pa in GRAPHS[graph].items():
        if graph == "IV" and var == "Y":
            while True:
                base, effect, confound = rng.uniform(0.05, 0.95), rng.uniform(-0.6, 0.6), rng.uniform(-0.6, 0.6)
                table = base + effect * np.array([[0, 1], [0, 1]]) + confound * np.array([[0, 0], [1, 1]])
                if table.min() >= 0.05 and table.max() <= 0.95:
                    break
            p1[var] = table  # indexed [V1, X]
        else:
            p1[var] = rng.uniform(0.05, 0.95, size=(2,) * len(pa))
    return CausalModel(graph, p1)


class ExactModel:
    """Exact probabilities and causal quantities of a `CausalModel`, by enumeration of its exogenous atoms."""

    def __init__(self, model: CausalModel):
        self.model = model
        self.weights, self.noise = model.exogenous_atoms()
        self.obs = model.solve(self.noise)
        self._memo: dict[tuple, float] = {}

    def _mean(self, values: np.ndarray, where: np.ndarray | None = None) -> float:
        w = self.weights if where is None else self.weights * where
        return float((w * values).sum() / w.sum())

    def prob(self, event: Mapping[str, int], given: Mapping[str, int] | None = None) -> float:
        """Observational P(event | given)."""
        given = given or {}
        key = (tuple(sorted(event.items())), tuple(sorted(given.items())))
        if key in self._memo:
            return self._memo[key]
        cond = np.ones_like(self.weights)
        for var, val in given.items():
            cond = cond * (self.obs[var] == val)
        hit = np.ones_like(self.weights)
        for var, val in event.items():
            hit = hit * (self.obs[var] == val)
        self._memo[key] = self._mean(hit, cond)
        return self._memo[key]

    def do(self, **fixed: Any) -> dict[str, np.ndarray]:
        return self.model.solve(self.noise, fixed)

    def ate(self) -> float:
        return self._mean(self.do(X=1)["Y"] - self.do(X=0)["Y"].astype(float))

    def ett(self) -> float:
        """E[Y_{X=1} - Y_{X=0} | X=1]: the same atoms (the same units) under both treatments."""
        return self._mean(self.do(X=1)["Y"] - self.do(X=0)["Y"].astype(float), self.obs["X"] == 1)

    def nde(self, mediator: str) -> float:
        """E[Y_{X=1, M=M_{X=0}} - Y_{X=0}]."""
        m0 = self.do(X=0)[mediator]
        return self._mean(self.do(X=1, **{mediator: m0})["Y"] - self.do(X=0)["Y"].astype(float))

    def nie(self, mediator: str) -> float:
        """E[Y_{X=0, M=M_{X=1}} - Y_{X=0, M=M_{X=0}}]."""
        m1, m0 = self.do(X=1)[mediator], self.do(X=0)[mediator]
        return self._mean(self.do(X=0, **{mediator: m1})["Y"] - self.do(X=0, **{mediator: m0})["Y"].astype(float))

    def adjusted_ate(self, adjust: Sequence[str]) -> float:
        """sum_z P(z) [P(Y=1 | X=1, z) - P(Y=1 | X=0, z)]: the effect a back-door adjustment for `adjust` reports."""
        total = 0.0
        for z in itertools.product((0, 1), repeat=len(adjust)):
            zs = dict(zip(adjust, z, strict=True))
            total += self.prob(zs) * (self.prob({"Y": 1}, {"X": 1, **zs}) - self.prob({"Y": 1}, {"X": 0, **zs}))
        return total


# ---------------------------------------------------------------------------------------------------- estimands
# Each estimand is written over P(event, given): run on the exact model it must equal the enumerated quantity
# (the tests check it); run on the stated, rounded numbers it is what a reader of the text computes. The
# probabilities it asks for are exactly the ones the question states.

Prob = Callable[..., float]


def _y_given(P: Prob, **cond: int) -> float:
    return P({"Y": 1}, cond)


def _estimand_marginal(graph: str, P: Prob) -> float:
    px = P({"X": 1})
    return px * _y_given(P, X=1) + (1 - px) * _y_given(P, X=0)


def _estimand_correlation(graph: str, P: Prob) -> float:
    px = P({"X": 1})
    return P({"X": 1, "Y": 1}) / px - P({"X": 0, "Y": 1}) / (1 - px)


def _estimand_exp_away(graph: str, P: Prob) -> float:
    # X and Y are independent causes of V3: P(Y | X, V3=1) by Bayes' rule from P(Y) and P(V3 | X, Y).
    py = P({"Y": 1})

    def y_given(x: int) -> float:
        yes, no = P({"V3": 1}, {"X": x, "Y": 1}) * py, P({"V3": 1}, {"X": x, "Y": 0}) * (1 - py)
        return yes / (yes + no)

    return y_given(1) - y_given(0)


def _estimand_collider_bias(graph: str, P: Prob) -> float:
    # The association among V3=1 that the question shows; the causal effect itself is zero.
    return P({"Y": 1}, {"X": 1, "V3": 1}) - P({"Y": 1}, {"X": 0, "V3": 1})


def _estimand_ate(graph: str, P: Prob) -> float:
    if graph in _X_ROOT:
        return _y_given(P, X=1) - _y_given(P, X=0)
    if graph in ("confounding", "diamondcut"):
        z = "V1" if graph == "confounding" else "V3"
        pz = P({z: 1})
        return sum(w * (_y_given(P, **{z: v, "X": 1}) - _y_given(P, **{z: v, "X": 0}))
                   for v, w in ((1, pz), (0, 1 - pz)))
    if graph == "frontdoor":
        px = P({"X": 1})
        total = 0.0
        for m in (0, 1):
            pm = [P({"V3": 1}, {"X": x}) for x in (0, 1)]
            if m == 0:
                pm = [1 - p for p in pm]
            y_do_m = px * _y_given(P, X=1, V3=m) + (1 - px) * _y_given(P, X=0, V3=m)
            total += (pm[1] - pm[0]) * y_do_m
        return total
    if graph == "IV":  # the Wald ratio
        dy = P({"Y": 1}, {"V2": 1}) - P({"Y": 1}, {"V2": 0})
        dx = P({"X": 1}, {"V2": 1}) - P({"X": 1}, {"V2": 0})
        return dy / dx
    raise ValueError(f"no ATE estimand for {graph}")


def _estimand_ett(graph: str, P: Prob) -> float:
    if graph in _X_ROOT:
        return _y_given(P, X=1) - _y_given(P, X=0)
    if graph == "confounding":
        pv = P({"V1": 1})
        joint = {v: P({"X": 1}, {"V1": v}) * (pv if v else 1 - pv) for v in (0, 1)}
        treated = sum(joint.values())
        return sum(joint[v] / treated * (_y_given(P, V1=v, X=1) - _y_given(P, V1=v, X=0)) for v in (0, 1))
    if graph == "diamondcut":
        pz = P({"V3": 1}, {"X": 1})
        return sum(w * (_y_given(P, X=1, V3=v) - _y_given(P, X=0, V3=v)) for v, w in ((1, pz), (0, 1 - pz)))
    if graph == "frontdoor":
        # E[Y_{x0} | x1] = sum_m P(m | x0) P(y | x1, m): given X, the mediator is independent of the confounder.
        total = 0.0
        for m in (0, 1):
            pm = [P({"V3": 1}, {"X": x}) for x in (0, 1)]
            if m == 0:
                pm = [1 - p for p in pm]
            total += (pm[1] - pm[0]) * _y_given(P, X=1, V3=m)
        return total
    raise ValueError(f"no ETT estimand for {graph}")


def _mediation_terms(graph: str, P: Prob):
    """(covariate weights, P(M=1 | x, c), P(Y=1 | x, m, c)) for the mediation formula."""
    med = MEDIATOR[graph]
    if graph == "arrowhead":
        pc = P({"V2": 1})
        covs = [({"V2": 1}, pc), ({"V2": 0}, 1 - pc)]
    else:
        covs = [({}, 1.0)]

    def pm(x: int, c: dict) -> float:
        return P({med: 1}, {"X": x, **c})

    def py(x: int, m: int, c: dict) -> float:
        return P({"Y": 1}, {"X": x, **c, med: m})

    return covs, pm, py


def _estimand_nde(graph: str, P: Prob) -> float:
    covs, pm, py = _mediation_terms(graph, P)
    total = 0.0
    for c, wc in covs:
        m1 = pm(0, c)
        total += wc * sum(wm * (py(1, m, c) - py(0, m, c)) for m, wm in ((1, m1), (0, 1 - m1)))
    return total


def _estimand_nie(graph: str, P: Prob) -> float:
    covs, pm, py = _mediation_terms(graph, P)
    total = 0.0
    for c, wc in covs:
        shift = pm(1, c) - pm(0, c)  # P(M=1) moves by `shift`, P(M=0) by -shift
        total += wc * shift * (py(0, 1, c) - py(0, 0, c))
    return total


ESTIMANDS: dict[str, Callable[[str, Prob], float]] = {
    "marginal": _estimand_marginal, "correlation": _estimand_correlation, "exp_away": _estimand_exp_away,
    "collider_bias": _estimand_collider_bias, "ate": _estimand_ate, "ett": _estimand_ett,
    "nde": _estimand_nde, "nie": _estimand_nie,
}


def exact_quantity(exact: ExactModel, query: str) -> tuple[float, float]:
    """(the query's exact quantity by enumeration / surgery / counterfactual replay, its decision threshold)."""
    graph = exact.model.graph
    if query == "marginal":
        return exact.prob({"Y": 1}), 0.5
    if query in ("correlation", "exp_away"):
        given = {"V3": 1} if query == "exp_away" else {}
        return exact.prob({"Y": 1}, {"X": 1, **given}) - exact.prob({"Y": 1}, {"X": 0, **given}), 0.0
    if query in ("ate", "collider_bias"):
        return exact.ate(), 0.0
    if query == "ett":
        return exact.ett(), 0.0
    if query == "nde":
        return exact.nde(MEDIATOR[graph]), 0.0
    if query == "nie":
        return exact.nie(MEDIATOR[graph]), 0.0
    raise ValueError(f"no exact quantity for {query}")


class _Recorder:
    """P(event, given) over the exact model that remembers what was asked (the question's given info)."""

    def __init__(self, exact: ExactModel):
        self.exact = exact
        self.asked: dict[tuple, float] = {}

    def __call__(self, event: Mapping[str, int], given: Mapping[str, int] | None = None) -> float:
        key = (tuple(event.items()), tuple((given or {}).items()))
        if key not in self.asked:
            self.asked[key] = self.exact.prob(event, given)
        return self.asked[key]


def _rounded(asked: Mapping[tuple, float]) -> Prob:
    def P(event, given=None):
        return round(asked[(tuple(event.items()), tuple((given or {}).items()))], 2)
    return P


# ---------------------------------------------------------------------------------------------------- stories


@dataclass(frozen=True)
class Variable:
    """How a story names one binary variable: `name` (the variable), `yes` / `no` (third-person predicates for
    1 and 0), `noun` (value 1 as a noun phrase) and, for the treatment, `had_not` (the counterfactual)."""

    name: str
    yes: str
    no: str
    noun: str
    had_not: str = ""


@dataclass(frozen=True)
class Story:
    name: str
    unit: str
    variables: Mapping[str, Variable]
    who: str = "who"  # the relative pronoun for the unit ("a field that ...")


def _v(name, yes, no, noun, had_not=""):
    return Variable(name, yes, no, noun, had_not)


STORIES: dict[str, Story] = {s.name: s for s in [
    Story("tutoring", "student", {
        "X": _v("tutoring", "attends tutoring", "does not attend tutoring", "attending tutoring",
                "had not attended tutoring"),
        "V2": _v("daily practice", "practises daily", "does not practise daily", "practising daily"),
        "Y": _v("exam success", "passes the exam", "does not pass the exam", "passing the exam")}),
    Story("harvest", "field", who="that", variables={
        "X": _v("irrigation", "is irrigated", "is not irrigated", "being irrigated", "had not been irrigated"),
        "V2": _v("rainfall", "gets heavy rain", "does not get heavy rain", "heavy rain"),
        "Y": _v("the harvest", "gives a good harvest", "does not give a good harvest", "a good harvest")}),
    Story("fame", "actor", {
        "X": _v("talent", "is talented", "is not talented", "being talented", "had not been talented"),
        "Y": _v("appearance", "is attractive", "is not attractive", "being attractive"),
        "V3": _v("fame", "is famous", "is not famous", "being famous")}),
    Story("drug", "patient", {
        "V1": _v("age", "is over 60", "is not over 60", "being over 60"),
        "X": _v("the drug", "takes the drug", "does not take the drug", "taking the drug",
                "had not taken the drug"),
        "Y": _v("recovery", "recovers", "does not recover", "recovery")}),
    Story("degree", "worker", {
        "X": _v("education", "has a college degree", "has no college degree", "having a college degree",
                "had had no college degree"),
        "V2": _v("skilled work", "has a skilled job", "has no skilled job", "having a skilled job"),
        "Y": _v("salary", "earns a high salary", "does not earn a high salary", "a high salary")}),
    Story("college", "person", {
        "V1": _v("family background", "has a supportive family", "has no supportive family",
                 "having a supportive family"),
        "V2": _v("distance to college", "lives near a college", "does not live near a college",
                 "living near a college"),
        "X": _v("college education", "goes to college", "does not go to college", "going to college",
                "had not gone to college"),
        "Y": _v("wage", "earns a high wage", "does not earn a high wage", "a high wage")}),
    Story("smoking", "person", {
        "V1": _v("the genotype", "carries the gene", "does not carry the gene", "carrying the gene"),
        "X": _v("smoking", "smokes", "does not smoke", "smoking", "had not smoked"),
        "V3": _v("tar in the lungs", "has tar deposits", "has no tar deposits", "tar deposits"),
        "Y": _v("lung cancer", "has lung cancer", "does not have lung cancer", "lung cancer")}),
    Story("birth_weight", "infant", {
        "X": _v("maternal smoking", "has a mother who smokes", "has a mother who does not smoke",
                "maternal smoking", "had had a mother who does not smoke"),
        "V2": _v("the presence of a birth defect", "has a birth defect", "has no birth defect", "a birth defect"),
        "V3": _v("birth weight", "has a low birth weight", "has a normal birth weight", "a low birth weight"),
        "Y": _v("infant mortality", "dies in infancy", "survives infancy", "death in infancy")}),
    Story("training", "employee", {
        "X": _v("training", "receives training", "receives no training", "receiving training",
                "had received no training"),
        "V2": _v("skill growth", "gains new skills", "gains no new skills", "gaining new skills"),
        "V3": _v("confidence", "gains confidence", "gains no confidence", "gaining confidence"),
        "Y": _v("promotion", "gets promoted", "does not get promoted", "getting promoted")}),
    Story("exercise", "person", {
        "V1": _v("income", "has a high income", "does not have a high income", "a high income"),
        "X": _v("exercise", "exercises regularly", "does not exercise regularly", "exercising regularly",
                "had not exercised regularly"),
        "V3": _v("diet", "eats healthily", "does not eat healthily", "eating healthily"),
        "Y": _v("health", "is in good health", "is not in good health", "good health")}),
]}
GRAPH_STORIES: dict[str, tuple[str, ...]] = {
    "chain": ("tutoring",), "fork": ("harvest",), "collider": ("fame",), "confounding": ("drug",),
    "mediation": ("degree",), "IV": ("college",), "frontdoor": ("smoking",), "arrowhead": ("birth_weight",),
    "diamond": ("training",), "diamondcut": ("exercise",),
}

_CONSONANTS, _VOWELS = "bcdfghjklmnprstvwxz", "aeiouy"


def nonsense_story(graph: str, rng: np.random.Generator) -> Story:
    """The paper's "nonsense" variables: made-up words, so no common sense helps or hurts."""
    names: list[str] = []
    while len(names) < len(GRAPHS[graph]):
        word = (rng.choice(list(_CONSONANTS)) + rng.choice(list(_VOWELS)) + rng.choice(list(_CONSONANTS))
                + rng.choice(list(_CONSONANTS)))
        if word not in names:
            names.append(word)
    variables = {var: _v(w, f"is {w}", f"is not {w}", f"being {w}", f"had not been {w}")
                 for var, w in zip(GRAPHS[graph], names, strict=True)}
    return Story("nonsense", "individual", variables)


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _predicates(story: Story, values: Mapping[str, int]) -> str:
    return " and ".join(story.variables[v].yes if x else story.variables[v].no for v, x in values.items())


def _join(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def background(graph: str, story: Story) -> str:
    lines = ["Imagine a self-contained, hypothetical world with only the following conditions, and without any "
             "unmentioned factors or causal relationships:"]
    for var in GRAPHS[graph]:
        children = [c for c, pa in GRAPHS[graph].items() if var in pa]
        if children:
            lines.append(f"{_cap(story.variables[var].name)} has a direct effect on "
                         f"{_join([story.variables[c].name for c in children])}.")
    for var in UNOBSERVED.get(graph, ()):
        lines.append(f"{_cap(story.variables[var].name)} is unobserved.")
    if graph == "IV":  # the assumption under which the Wald ratio identifies the effect (see sample_model)
        x, v1, y = (story.variables[v].name for v in ("X", "V1", "Y"))
        lines.append(f"{_cap(x)} and {v1} add up in their effect on {y}: the effect of {x} is the same "
                     f"whatever {v1} is.")
    return " ".join(lines)


def state_probability(story: Story, event: Mapping[str, int], given: Mapping[str, int], value: float) -> str:
    """One sentence of given info, e.g. "For a person who smokes, the probability of lung cancer is 45%."."""
    pct = f"{round(value * 100)}%"
    if len(event) > 1 or any(x == 0 for x in event.values()):
        return f"The probability that {_article(story.unit)} {_predicates(story, event)} is {pct}."
    (var,) = event
    noun = story.variables[var].noun
    if not given:
        return f"The overall probability of {noun} is {pct}."
    return f"For {_article(story.unit)} {story.who} {_predicates(story, given)}, the probability of {noun} is {pct}."


def question_text(query: str, graph: str, story: Story, positive: bool, adjust: Sequence[Sequence[str]] = ()) -> str:
    """The yes/no question; `positive` picks its polarity ("increase" or "decrease", "more" or "less", ...)."""
    var = story.variables
    x, y, unit = var["X"], var["Y"], story.unit
    more = "more" if positive else "less"
    up = "increase" if positive else "decrease"
    if query == "marginal":
        return f"Is {y.noun} {more} likely than not overall?"
    if query == "correlation":
        return f"Is the chance of {y.noun} {'larger' if positive else 'smaller'} when observing {x.noun}?"
    if query == "exp_away":
        return (f"If we look only at cases where {_article(unit)} {var['V3'].yes}, is {y.noun} {more} likely when "
                f"the {unit} {x.yes} than when the {unit} {x.no}?")
    if query == "collider_bias":
        if positive:
            return f"If we look only at cases where {_article(unit)} {var['V3'].yes}, does it mean that " \
                   f"{x.noun} affects {y.noun}?"
        return f"Is it true that {x.noun} has no causal effect on {y.noun}, even among cases where " \
               f"{_article(unit)} {var['V3'].yes}?"
    if query == "ate":
        return f"Will {x.noun} {up} the chance of {y.noun}?"
    if query == "ett":
        return f"For {_article(unit)} {story.who} {x.yes}, would {y.noun} have been {'less' if positive else 'more'} " \
               f"likely if the {unit} {x.had_not}?"
    if query == "nde":
        return (f"If we disregard the mediation effect through {var[MEDIATOR[graph]].name}, would {x.noun} still "
                f"{up} the chance of {y.noun}?")
    if query == "nie":
        return f"Does {x.noun} {up} the chance of {y.noun} through {var[MEDIATOR[graph]].name}?"
    if query == "backadj":
        def method(z: Sequence[str]) -> str:
            if not z:
                return f"We look directly at how {x.name} correlates with {y.name} in general."
            return (f"We look at how {x.name} correlates with {y.name} case by case according to "
                    f"{_join([var[v].name for v in z])}.")
        return (f"Method 1: {method(adjust[0])} Method 2: {method(adjust[1])} To understand how {x.name} affects "
                f"{y.name}, is it more correct to use Method 1 than Method 2?")
    raise ValueError(f"unknown query type {query!r}")


# ---------------------------------------------------------------------------------------------------- questions


def _question(exact: ExactModel, query: str, story: Story, rng: np.random.Generator) -> dict[str, Any] | None:
    """One question of type `query` on the model, or None when it would be too close to call."""
    graph = exact.model.graph
    positive = bool(rng.integers(2))
    record: dict[str, Any] = {"positive": positive}
    given_values: dict[tuple, float] = {}
    if query == "backadj":
        valid, invalid = backdoor_sets(graph)
        good, bad = valid[rng.integers(len(valid))], invalid[rng.integers(len(invalid))]
        truth = exact.ate()
        bias_good, bias_bad = exact.adjusted_ate(good) - truth, exact.adjusted_ate(bad) - truth
        if abs(bias_bad) < MARGIN:  # the wrong adjustment must really give a wrong effect in this model
            return None
        methods = [good, bad] if positive else [bad, good]
        label = positive  # yes iff Method 1 is the valid adjustment
        record.update(adjustment=[list(m) for m in methods], valid=[is_backdoor_set(graph, m) for m in methods],
                      quantity=bias_good if positive else bias_bad, threshold=0.0,
                      adjustment_bias=[bias_good, bias_bad] if positive else [bias_bad, bias_good],
                      ate=truth)
        question = question_text(query, graph, story, positive, methods)
    else:
        P = _Recorder(exact)
        estimand_exact = ESTIMANDS[query](graph, P)
        quantity, threshold = exact_quantity(exact, query)
        try:
            estimand_stated = ESTIMANDS[query](graph, _rounded(P.asked))
        except ZeroDivisionError:  # a rounded denominator (the IV's first stage) vanished: not answerable
            return None
        given_values = P.asked
        if query == "collider_bias":
            # X does not cause Y (quantity exactly 0); the question shows their association among V3=1, which
            # must be clearly visible in the stated numbers.
            if abs(estimand_exact) < MARGIN or np.sign(estimand_stated) != np.sign(estimand_exact):
                return None
            label = not positive
            record.update(association=estimand_exact)
        else:
            side = np.sign(quantity - threshold)
            if abs(quantity - threshold) < MARGIN or np.sign(estimand_stated - threshold) != side:
                return None
            label = (side > 0) == positive
        record.update(quantity=quantity, threshold=threshold, estimand=estimand_exact,
                      estimand_from_given=estimand_stated)
        if query in ("nde", "nie"):
            record.update(mediator=MEDIATOR[graph])
        question = question_text(query, graph, story, positive)
    given = [{"event": dict(ev), "given": dict(cond), "value": round(v, 2)} for (ev, cond), v in given_values.items()]
    given_info = " ".join(state_probability(story, g["event"], g["given"], g["value"]) for g in given)
    back = background(graph, story)
    text = back + ("\n" + given_info if given_info else "") + f"\nQuestion: {question}\nAnswer:"
    record.update(background=back, given_info=given_info, given=given, question=question, text=text,
                  label=int(label), answer="yes" if label else "no")
    return record


def generate_cladder(per_graph: int = 50, seed: int = 0, test_fraction: float = 0.2,
                     graphs: Sequence[str] | None = None,
                     nonsense_fraction: float = 0.5) -> dict[str, list[dict[str, Any]]]:
    """CLadder-style questions as {"train": [...], "test": [...]}.

    `per_graph` causal models are sampled per graph shape; each model gets one question per query type that
    applies to its graph (fewer where a question would be too close to call). A model and all its questions go
    to one split (test with probability `test_fraction`). A model's variables come from the graph's story or,
    with probability `nonsense_fraction`, from made-up words. Deterministic from `seed`."""
    if per_graph < 1:
        raise UserError(f"--per-graph must be at least 1, got {per_graph}")
    if not 0.0 <= test_fraction <= 1.0:
        raise UserError(f"test_fraction must be in [0, 1], got {test_fraction}")
    if not 0.0 <= nonsense_fraction <= 1.0:
        raise UserError(f"nonsense_fraction must be in [0, 1], got {nonsense_fraction}")
    graphs = list(GRAPHS) if graphs is None else list(graphs)
    unknown = [g for g in graphs if g not in GRAPHS]
    if unknown:
        raise UserError(f"unknown graph(s) {', '.join(map(repr, unknown))}; choose from {', '.join(GRAPHS)}")
    splits: dict[str, list[dict[str, Any]]] = {"train": [], "test": []}
    for graph in graphs:
        rng = np.random.default_rng([seed, list(GRAPHS).index(graph)])
        for index in range(per_graph):
            model = sample_model(graph, rng)
            if rng.random() < nonsense_fraction:
                story = nonsense_story(graph, rng)
            else:
                story = STORIES[GRAPH_STORIES[graph][rng.integers(len(GRAPH_STORIES[graph]))]]
            split = "test" if rng.random() < test_fraction else "train"
            exact = ExactModel(model)
            for query in query_types_for(graph):
                record = _question(exact, query, story, rng)
                if record is None:
                    continue
                splits[split].append({"id": f"cladder-{graph}-{index}-{query}", "graph": graph,
                                      "rung": QUERY_RUNG[query], "query_type": query, "story": story.name,
                                      **record, "choices": ["no", "yes"], "scm": model.to_json()})
    return splits


CLADDER_SPEC = TaskSpec(name="cladder", doc_to_text="text", doc_to_target="label", doc_to_choice=["no", "yes"])


def write_cladder(out_dir: str | Path, per_graph: int = 50, seed: int = 0, test_fraction: float = 0.2,
                  name: str = "cladder") -> tuple[Path, dict[str, list[dict[str, Any]]]]:
    """Generates the suite and writes train.jsonl, test.jsonl and `{name}.yaml` (multiple choice, ["no",
    "yes"]) into `out_dir`; returns (the YAML's path, the splits)."""
    splits = generate_cladder(per_graph=per_graph, seed=seed, test_fraction=test_fraction)
    spec = TaskSpec(name=name, doc_to_text=CLADDER_SPEC.doc_to_text, doc_to_target=CLADDER_SPEC.doc_to_target,
                    doc_to_choice=CLADDER_SPEC.doc_to_choice)
    return write_suite(out_dir, spec, splits), splits


def cladder_counts(splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """Questions per split, rung, query type and graph, and the share answered "yes" per query type."""
    records = [r for rs in splits.values() for r in rs]
    by_query = Counter(r["query_type"] for r in records)
    yes = Counter(r["query_type"] for r in records if r["label"] == 1)
    return {"splits": {s: len(rs) for s, rs in splits.items()},
            "rungs": dict(sorted(Counter(r["rung"] for r in records).items())),
            "query_types": {q: by_query[q] for q in QUERY_TYPES if by_query[q]},
            "yes_share": {q: yes[q] / by_query[q] for q in QUERY_TYPES if by_query[q]},
            "graphs": {g: n for g, n in Counter(r["graph"] for r in records).items()},
            "yes_total": sum(yes.values()) / max(1, len(records))}
