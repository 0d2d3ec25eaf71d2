"""Racing: the confidence bound, cuts, savings, and equal-budget outcomes on synthetic scores."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from evomerge.errors import ConfigError
from evomerge.fitness import Example, combined_fitness
from evomerge.fitness.backends.base import Backend
from evomerge.fitness.racing import (
    RaceLedger,
    bernstein_serfling_ucb,
    evaluate_racing,
    example_order,
    hoeffding_serfling_eps,
    upper_confidence_bound,
)
from evomerge.fitness.tasks import Task, TaskSpec


def make_task(name: str, n: int, weight: float = 1.0) -> Task:
    spec = TaskSpec(name=name, data=f"{name}.jsonl")
    examples = [Example(f"{name}-{i}", "t") for i in range(n)]
    return Task(spec=spec, path=Path(f"{name}.yaml"), splits={"search": examples}, weight=weight)


class ScoreTable(Backend):
    """A backend whose per-example scores are a fixed table (task -> array by example
    index): a synthetic candidate. Counts every example it is asked to score."""

    def __init__(self, table: dict[str, np.ndarray]):
        super().__init__("")
        self.table = table
        self.calls = 0
        self.examples_scored = 0

    def target_tensors(self):
        return {}

    def evaluate(self, tasks, split="search"):
        self.calls += 1
        out = {}
        for t in tasks:
            idx = [int(ex.prompt.rsplit("-", 1)[1]) for ex in t.examples(split)]
            self.examples_scored += len(idx)
            out[t.name] = self.table[t.name][idx]
        return out


def bernoulli_table(tasks, p, rng) -> dict[str, np.ndarray]:
    return {t.name: (rng.random(len(t.examples())) < p).astype(float) for t in tasks}


def full_fitness(table, tasks) -> float:
    return combined_fitness(table, {t.name: t.weight for t in tasks})


# -- the bound --------------------------------------------------------------------------


def test_eps_matches_formula_and_shrinks_with_more_examples():
    eps = hoeffding_serfling_eps([1.0], [50], [200], 0.05)
    want = math.sqrt(math.log(1 / 0.05) * (1 - 49 / 200) / 50 / 2)
    assert eps == pytest.approx(want)
    assert hoeffding_serfling_eps([1.0], [100], [200], 0.05) < eps
    assert hoeffding_serfling_eps([1.0], [50], [200], 0.01) > eps
    assert hoeffding_serfling_eps([0.5, 0.5], [0, 10], [10, 10], 0.05) == math.inf


def test_upper_bound_is_never_above_the_certain_bound():
    # 10 of 100 seen, all zero: at best the other 90 are all 1 -> 0.9
    est, ucb = upper_confidence_bound({"a": np.zeros(10)}, {"a": 100}, {"a": 1.0}, 1e-9)
    assert est == 0.0 and ucb == pytest.approx(0.9)
    est, ucb = upper_confidence_bound({"a": np.ones(100)}, {"a": 100}, {"a": 1.0}, 0.05)
    assert est == 1.0 and ucb == pytest.approx(1.0)


def test_bound_holds_at_the_stated_confidence_over_random_orders():
    """For fixed populations, over many random slices, the full mean exceeds the bound in
    at most a delta fraction of draws (Serfling: usually far fewer)."""
    rng = np.random.default_rng(0)
    delta, n, m = 0.1, 200, 40
    for p in (0.1, 0.5, 0.9):
        pop = (rng.random(n) < p).astype(float)
        mu = pop.mean()
        misses = 0
        for _ in range(2000):
            sample = pop[rng.permutation(n)[:m]]
            _, ucb = upper_confidence_bound({"a": sample}, {"a": n}, {"a": 1.0}, delta)
            misses += mu > ucb
        assert misses / 2000 <= delta


@pytest.mark.parametrize("kind", ["bernoulli", "narrow"])
def test_bernstein_bound_holds_at_the_stated_confidence(kind):
    rng = np.random.default_rng(1)
    delta, n = 0.1, 300
    for m in (30, 200):  # both branches of the finite-population factor
        pop = (rng.random(n) < 0.3).astype(float) if kind == "bernoulli" else rng.uniform(0.02, 0.06, n)
        mu = pop.mean()
        misses = sum(mu > bernstein_serfling_ucb(pop[rng.permutation(n)[:m]], n, delta) for _ in range(1000))
        assert misses / 1000 <= delta
    assert bernstein_serfling_ucb(np.array([0.5]), 10, 0.1) == 1.0  # one value: no variance estimate


def test_bernstein_cuts_low_variance_scores_that_hoeffding_cannot():
    """Likelihood-like scores (all near 0.03), a candidate 0.03 below the best, a 1000-example
    first slice: the variance-adaptive bound cuts, the range-only bound cannot. (On small
    slices Bernstein's constant term dominates and Hoeffding is the tighter one.)"""
    tasks = [make_task("a", 4000)]
    rng = np.random.default_rng(2)
    table = {"a": rng.uniform(0.02, 0.04, 4000)}
    best = table["a"].mean() + 0.03
    hoeff = evaluate_racing(ScoreTable(table), tasks, best, bound="hoeffding")
    bern = evaluate_racing(ScoreTable(table), tasks, best, bound="bernstein")
    assert hoeff.complete and bern.cut and bern.evaluated == 1000 and bern.upper_bound < best
    x = table["a"][:100]
    _, h = upper_confidence_bound({"a": x}, {"a": 400}, {"a": 1.0}, 0.05, "hoeffding")
    _, b = upper_confidence_bound({"a": x}, {"a": 400}, {"a": 1.0}, 0.05, "bernstein")
    assert h < b  # 100 examples: Hoeffding is tighter


def test_example_order_is_a_fixed_permutation_per_task():
    a1, a2, b = example_order("a", 50), example_order("a", 50), example_order("b", 50)
    assert sorted(a1.tolist()) == list(range(50))
    assert a1.tolist() == a2.tolist() and a1.tolist() != b.tolist()
    assert example_order("a", 50, seed=1).tolist() != a1.tolist()


# -- racing single candidates -----------------------------------------------------------


def test_clearly_worse_candidate_is_cut_after_the_first_slice_and_savings_counted():
    tasks = [make_task("a", 200), make_task("b", 200)]
    table = bernoulli_table(tasks, 0.15, np.random.default_rng(1))
    backend = ScoreTable(table)
    r = evaluate_racing(backend, tasks, best_so_far=0.8, confidence=0.95, first_fraction=0.25)
    assert r.cut and not r.complete
    assert r.evaluated == 100 and r.total == 400 and r.saved == 300
    assert backend.examples_scored == 100 and backend.calls == 1
    assert r.fitness < r.upper_bound < 0.8
    # the partial mean is the weighted mean over the evaluated examples; the rest are NaN
    seen = {t: s[~np.isnan(s)] for t, s in r.scores.items()}
    assert r.fitness == pytest.approx(np.mean([seen["a"].mean(), seen["b"].mean()]))
    assert sum(np.isnan(s).sum() for s in r.scores.values()) == 300
    assert r.to_dict()["racing_cut"] is True


def test_better_candidate_is_finished_with_exact_full_scores_in_original_order():
    tasks = [make_task("a", 120), make_task("b", 80, weight=3.0)]
    table = bernoulli_table(tasks, 0.9, np.random.default_rng(2))
    backend = ScoreTable(table)
    r = evaluate_racing(backend, tasks, best_so_far=0.6, first_fraction=0.25)
    assert r.complete and not r.cut and r.saved == 0
    assert backend.examples_scored == 200 and backend.calls == 2
    for t in tasks:
        assert r.scores[t.name].tolist() == table[t.name].tolist()
    assert r.fitness == pytest.approx(full_fitness(table, tasks))


def test_no_best_yet_means_one_full_evaluation():
    tasks = [make_task("a", 30)]
    table = bernoulli_table(tasks, 0.5, np.random.default_rng(3))
    backend = ScoreTable(table)
    r = evaluate_racing(backend, tasks, best_so_far=None)
    assert r.complete and backend.calls == 1 and r.fitness == pytest.approx(table["a"].mean())


@pytest.mark.parametrize("bound", ["hoeffding", "bernstein"])
def test_candidates_at_or_above_the_best_are_never_cut(bound):
    """Populations whose full fitness is >= the best: cut in at most delta of cases, and
    never when clearly above."""
    tasks = [make_task("a", 150), make_task("b", 150)]
    rng = np.random.default_rng(4)
    cut_close = cut_clear = 0
    for i in range(200):
        table = bernoulli_table(tasks, 0.6, rng)
        f = full_fitness(table, tasks)
        r = evaluate_racing(ScoreTable(table), tasks, best_so_far=f, confidence=0.9, seed=i, bound=bound)
        cut_close += r.cut  # best equal to its own full fitness: the hardest case
        r2 = evaluate_racing(ScoreTable(table), tasks, best_so_far=f - 0.1, confidence=0.9, seed=i, bound=bound)
        cut_clear += r2.cut
        if r.complete:
            assert r.fitness == pytest.approx(f)
    assert cut_close / 200 <= 0.1
    assert cut_clear == 0


def test_multi_stage_race_cuts_later_candidates_that_look_close():
    """A candidate near the best survives a 10% slice but a later check cuts it, where a
    single-slice race would have paid for every example."""
    tasks = [make_task("a", 400)]
    table = bernoulli_table(tasks, 0.5, np.random.default_rng(1))
    staged = ScoreTable(table)
    r = evaluate_racing(staged, tasks, best_so_far=0.6, stages=[0.1, 0.3, 0.6])
    assert r.cut and r.stages_run >= 2
    assert r.evaluated in (120, 240) and staged.examples_scored == r.evaluated
    single = evaluate_racing(ScoreTable(table), tasks, best_so_far=0.6, first_fraction=0.1)
    assert single.complete and single.evaluated == 400


def test_bad_arguments_are_config_errors():
    tasks = [make_task("a", 10)]
    backend = ScoreTable({"a": np.zeros(10)})
    with pytest.raises(ConfigError, match="confidence"):
        evaluate_racing(backend, tasks, 0.5, confidence=1.0)
    with pytest.raises(ConfigError, match="first_fraction"):
        evaluate_racing(backend, tasks, 0.5, first_fraction=1.5)
    with pytest.raises(ConfigError, match="stages"):
        evaluate_racing(backend, tasks, 0.5, stages=[0.5, 0.2])
    with pytest.raises(ConfigError, match="racing.bound"):
        evaluate_racing(backend, tasks, 0.5, bound="chernoff")


# -- racing a search --------------------------------------------------------------------


def _population(n_candidates=40, seed=7):
    """A deterministic search: candidates with true skill levels, most well below the best."""
    rng = np.random.default_rng(seed)
    tasks = [make_task("a", 200), make_task("b", 200, weight=2.0)]
    levels = np.clip(rng.normal(0.45, 0.15, size=n_candidates), 0.02, 0.98)
    tables = [bernoulli_table(tasks, p, rng) for p in levels]
    return tasks, tables


def _race(tasks, tables, example_budget=None, confidence=0.95):
    ledger = RaceLedger(keep_history=True)
    best, best_i = None, None
    for i, table in enumerate(tables):
        if example_budget is not None and ledger.evaluated + sum(len(t.examples()) for t in tasks) > example_budget:
            break
        r = evaluate_racing(ScoreTable(table), tasks, best, confidence=confidence, first_fraction=0.2)
        ledger.record(r)
        if r.complete and (best is None or r.fitness > best):  # only full scores count
            best, best_i = r.fitness, i
    return best, best_i, ledger


def test_same_candidates_same_best_with_fewer_example_evaluations():
    tasks, tables = _population()
    fulls = [full_fitness(t, tasks) for t in tables]
    best, best_i, ledger = _race(tasks, tables)
    assert best_i == int(np.argmax(fulls)) and best == pytest.approx(max(fulls))
    assert ledger.cut > 0 and ledger.saved > 0
    assert ledger.full_cost == 400 * len(tables)
    assert ledger.evaluated + ledger.saved == ledger.full_cost
    assert 0.3 < ledger.fraction_saved < 1.0
    assert sum(h["saved"] for h in ledger.history) == ledger.saved
    # state round-trips
    other = RaceLedger()
    other.load_state_dict(ledger.state_dict())
    assert other.summary() == ledger.summary()


def test_equal_example_budget_finds_the_same_or_a_better_best():
    tasks, tables = _population(n_candidates=40, seed=11)
    fulls = [full_fitness(t, tasks) for t in tables]
    budget = 10 * 400  # what full evaluation of 10 candidates costs
    full_best = max(fulls[:10])
    best, _, ledger = _race(tasks, tables, example_budget=budget)
    assert ledger.candidates > 10  # racing saw more candidates for the same budget
    assert ledger.evaluated <= budget
    assert best >= full_best
