"""M2N2: formulas on hand-made score matrices, the replacement rule, the reference crossover,
parent sampling, exact resume, and small end-to-end runs. Expected values are worked out by
hand in the comments, not recomputed with the code under test."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evomerge.errors import ConfigError, RunError
from evomerge.optim import FAILED_FITNESS, Result, make_optimizer
from evomerge.optim.m2n2 import M2N2
from evomerge.optim.m2n2_core import (
    Crossover,
    VectorSlerpCrossover,
    attraction_scores,
    mate_probabilities,
    parent_probabilities,
    replacement_slot,
    resource_fitness,
    sample_parents,
    slerp,
    slerp_weights,
    split_point_crossover,
    split_position,
)
from evomerge.optim.state import from_jsonable, to_jsonable

# three members, three examples
S = np.array([[1.0, 1.0, 0.0],
              [1.0, 0.0, 0.0],
              [0.0, 1.0, 1.0]])


# ----------------------------------------------------------------------------- formulas


def test_resource_fitness_by_hand():
    # z = (2, 2, 1)
    np.testing.assert_allclose(resource_fitness(S), [1 / 2 + 1 / 2, 1 / 2, 1 / 2 + 1])
    # per-example weights c = (1, 2, 3)
    np.testing.assert_allclose(resource_fitness(S, c=np.array([1.0, 2.0, 3.0])),
                               [1 / 2 + 2 / 2, 1 / 2, 2 / 2 + 3 / 1])
    # alpha = 2: z^2 = (4, 4, 1)
    np.testing.assert_allclose(resource_fitness(S, alpha=2.0), [0.5, 0.25, 1.25])
    # alpha = 0: no sharing, plain number of solved examples (the GA)
    np.testing.assert_allclose(resource_fitness(S, alpha=0.0), [2.0, 1.0, 2.0])
    # eps = 1: denominators (3, 3, 2)
    np.testing.assert_allclose(resource_fitness(S, eps=1.0), [2 / 3, 1 / 3, 1 / 3 + 1 / 2])
    # an example nobody solves is harmless (no 0/0); fractional scores share proportionally
    np.testing.assert_allclose(resource_fitness(np.array([[0.0, 1.0], [0.0, 1.0]])), [0.5, 0.5])
    np.testing.assert_allclose(resource_fitness(np.array([[0.25, 1.0], [0.75, 0.0]])),
                               [0.25 + 1.0, 0.75])


def test_attraction_by_hand():
    # parent A = 1 (solves only example 0): gains over A are row0 (0,1,0), row2 (0,1,1)
    np.testing.assert_allclose(attraction_scores(S, 1), [1 / 2, 0.0, 1 / 2 + 1 / 1])
    np.testing.assert_allclose(mate_probabilities(S, 1), [0.25, 0.0, 0.75])
    # parent A = 2: row0 and row1 both gain example 0 only (z = 2)
    np.testing.assert_allclose(attraction_scores(S, 2), [0.5, 0.5, 0.0])
    # weights enter the attraction too: c = (1, 2, 3), A = 1 -> (2/2, 0, 2/2 + 3/1)
    np.testing.assert_allclose(attraction_scores(S, 1, c=np.array([1.0, 2.0, 3.0])),
                               [1.0, 0.0, 4.0])
    # nobody beats A = 0 -> uniform over the others; a lone member mates with itself
    dom = np.array([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(attraction_scores(dom, 0), [0.0, 0.0, 0.0])
    np.testing.assert_allclose(mate_probabilities(dom, 0), [0.0, 0.5, 0.5])
    np.testing.assert_allclose(mate_probabilities(np.array([[1.0, 0.0]]), 0), [1.0])
    # parent A: proportional to shared fitness (1, 1/2, 3/2) / 3
    np.testing.assert_allclose(parent_probabilities(S), [1 / 3, 1 / 6, 1 / 2])


def test_replacement_rule_by_hand():
    archive = np.array([[1.0, 1.0, 0.0, 0.0],
                        [1.0, 0.0, 0.0, 0.0]])
    # child solves two examples nobody solves: z = (2,1,1,1), f = (1.5, 0.5, 2) -> replaces 1
    assert replacement_slot(archive, np.array([0.0, 0.0, 1.0, 1.0])) == 1
    # strictly lowest child is discarded: archive rows (1,1,0,0), (1,0,1,0); child (1,0,0,0)
    # z = (3,1,1,0): f = (4/3, 4/3, 1/3)
    archive2 = np.array([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    assert replacement_slot(archive2, np.array([1.0, 0.0, 0.0, 0.0])) is None
    # a tie with the worst member replaces that member (argmin takes the first, as the reference)
    # z = (3,1,0,0): f = (1/3 + 1, 1/3, 1/3)
    assert replacement_slot(archive, np.array([1.0, 0.0, 0.0, 0.0])) == 1
    # alpha = 0 (GA): by accuracy; child with 3 solved replaces the 1-solved member
    assert replacement_slot(archive, np.array([1.0, 1.0, 1.0, 0.0]), alpha=0.0) == 1


# ----------------------------------------------------------------------------- crossover


def _ref_slerp_per_position(a, b, ts):
    """The reference's slerp_w_splitpoint written out with math (one angle, per-position t)."""
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    dot = sum((x / na) * (y / nb) for x, y in zip(a, b))
    om = math.acos(max(-1.0, min(1.0, dot)))
    so = math.sin(om)
    out = []
    for x, y, t in zip(a, b, ts):
        if so > 1e-6:
            out.append(math.sin((1 - t) * om) / so * x + math.sin(t * om) / so * y)
        else:
            out.append((1 - t) * x + t * y)
    return out


def test_crossover_matches_reference_formula():
    a = [1.0, 2.0, 0.0, 1.0, -0.5]
    b = [0.0, 1.0, 3.0, -1.0, 2.0]
    w_m, split = 0.3, 2
    expected = _ref_slerp_per_position(a, b, [0.3, 0.3, 0.7, 0.7, 0.7])
    np.testing.assert_allclose(split_point_crossover(np.array(a), np.array(b), w_m, split),
                               expected, rtol=1e-12)
    # the pluggable crossover maps w_s = 0.4 of 5 positions to split 2
    cx = VectorSlerpCrossover()
    assert isinstance(cx, Crossover)
    rng = np.random.default_rng(0)
    np.testing.assert_allclose(cx(np.array(a), np.array(b), w_m, 0.4, rng), expected, rtol=1e-12)
    # no split point: one SLERP with weight w_m everywhere
    np.testing.assert_allclose(cx(np.array(a), np.array(b), w_m, None, rng),
                               _ref_slerp_per_position(a, b, [0.3] * 5), rtol=1e-12)
    # split at 0: every position uses 1 - w_m
    np.testing.assert_allclose(split_point_crossover(np.array(a), np.array(b), w_m, 0),
                               _ref_slerp_per_position(a, b, [0.7] * 5), rtol=1e-12)


def test_slerp_endpoints_fallback_and_weights():
    a, b = np.array([3.0, 0.0]), np.array([0.0, 2.0])
    np.testing.assert_allclose(slerp(a, b, 0.0), a, atol=1e-15)
    np.testing.assert_allclose(slerp(a, b, 1.0), b, atol=1e-15)
    # orthogonal unit-angle case by hand: omega = pi/2, t = 1/2 -> sin(pi/4) on each
    np.testing.assert_allclose(slerp(a, b, 0.5), [3 * math.sqrt(0.5), 2 * math.sqrt(0.5)])
    # parallel parents: sin(omega) = 0 -> linear interpolation
    np.testing.assert_allclose(slerp(a, 2 * a, 0.25), 0.75 * a + 0.25 * 2 * a)
    # a zero parent (NaN in the reference) also falls back to linear
    np.testing.assert_allclose(slerp(np.zeros(2), b, 0.5), 0.5 * b)
    wa, wb = slerp_weights(0.0, 0.5)
    assert float(wa) == pytest.approx(math.sqrt(0.5)) and float(wb) == pytest.approx(math.sqrt(0.5))


def test_segment_angle_variant_is_the_issue_formula():
    a = [1.0, 2.0, 0.0, 1.0, -0.5]
    b = [0.0, 1.0, 3.0, -1.0, 2.0]
    head = _ref_slerp_per_position(a[:3], b[:3], [0.8] * 3)
    tail = _ref_slerp_per_position(a[3:], b[3:], [0.2] * 2)
    got = split_point_crossover(np.array(a), np.array(b), 0.8, 3, angle="segment")
    np.testing.assert_allclose(got, head + tail, rtol=1e-12)
    # and it differs from the reference's single angle
    assert not np.allclose(got, split_point_crossover(np.array(a), np.array(b), 0.8, 3))


def test_split_position_is_uniform():
    assert split_position(0.0, 7) == 0 and split_position(0.9999, 7) == 6
    rng = np.random.default_rng(3)
    counts = np.bincount([split_position(u, 4) for u in rng.uniform(size=8000)], minlength=4)
    np.testing.assert_allclose(counts / 8000, 0.25, atol=0.02)


# ----------------------------------------------------------------------------- sampling


def test_parent_sampling_is_proportional():
    rng = np.random.default_rng(12345)
    draws = np.array([sample_parents(S, rng) for _ in range(5000)])
    pa = np.bincount(draws[:, 0], minlength=3) / len(draws)
    np.testing.assert_allclose(pa, [1 / 3, 1 / 6, 1 / 2], atol=0.022)  # ~3 sigma
    # B given A = 1 follows the attraction (1/4, 0, 3/4)
    b1 = draws[draws[:, 0] == 1, 1]
    np.testing.assert_allclose(np.bincount(b1, minlength=3) / len(b1), [0.25, 0.0, 0.75],
                               atol=0.05)
    # without attraction both parents are drawn by fitness, independently (reference ablation)
    draws = np.array([sample_parents(S, rng, use_attraction=False) for _ in range(5000)])
    for col in (0, 1):
        np.testing.assert_allclose(np.bincount(draws[:, col], minlength=3) / len(draws),
                                   [1 / 3, 1 / 6, 1 / 2], atol=0.022)
    # independent draws: both parents equal with probability sum p^2 = 1/9 + 1/36 + 1/4
    assert np.mean(draws[:, 0] == draws[:, 1]) == pytest.approx(7 / 18, abs=0.021)


# ----------------------------------------------------------------------------- optimizer


def _toy_scores(x: np.ndarray, target: np.ndarray) -> np.ndarray:
    """One example per coordinate: score 1 at the target, falling linearly to 0 at distance 1."""
    return np.clip(1.0 - np.abs(x - target), 0.0, 1.0)


def _result(cand, target, failed=False):
    row = _toy_scores(cand.genome, target)
    return Result(id=cand.id, fitness=FAILED_FITNESS if failed else float(row.mean()),
                  per_example=row, failed=failed)


def _opt(**kw) -> M2N2:
    kw.setdefault("lower", -np.ones(4))
    kw.setdefault("upper", np.ones(4))
    return make_optimizer("m2n2", **kw)


def test_registered_and_asks_run_ahead_of_tells():
    opt = _opt(seed=0)
    assert isinstance(opt, M2N2) and opt.generational is False
    assert opt.mutation_sigma == 0.01  # the reference mutates only when starting from scratch
    cands = opt.ask(5)  # archive still empty: 2 random starts + 3 blind children
    assert len(cands) == 5 and len({c.id for c in cands}) == 5
    assert [c.info.get("initial") for c in cands] == [0, 1, None, None, None]
    assert all(c.info["parents"] == [] for c in cands[2:])
    assert all(np.all(np.abs(c.genome) <= 1.0) for c in cands)


def test_initial_members_first_and_replacement_through_optimizer():
    e1, e2 = np.array([1.0, 1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0, 1.0])
    opt = _opt(initial=[e1, e2], archive_size=2, seed=1)
    assert opt.mutation_sigma == 0.0  # no mutation when starting from given members
    first = opt.ask(2)
    np.testing.assert_array_equal(first[0].genome, e1)
    np.testing.assert_array_equal(first[1].genome, e2)
    rows = {first[0].id: [1.0, 1.0, 0.0, 0.0], first[1].id: [1.0, 0.0, 1.0, 0.0]}
    opt.tell([Result(i, float(np.mean(r)), np.array(r)) for i, r in rows.items()])
    assert list(opt.archive()["ids"]) == [first[0].id, first[1].id]
    c1, c2 = opt.ask(2)
    assert set(c1.info["parents"]) <= {first[0].id, first[1].id}
    # strictly lowest child -> discarded (hand values in test_replacement_rule_by_hand)
    opt.tell([Result(c1.id, 0.25, np.array([1.0, 0.0, 0.0, 0.0]))])
    assert list(opt.archive()["ids"]) == [first[0].id, first[1].id]
    assert opt.stats["discarded"] == 1
    # child (0,0,1,1): z = (2,1,2,1) -> f = (1/2 + 1, 1/2 + 1/2, 1/2 + 1): member 1 is the
    # lowest and is replaced
    opt.tell([Result(c2.id, 0.5, np.array([0.0, 0.0, 1.0, 1.0]))])
    assert list(opt.archive()["ids"]) == [first[0].id, c2.id]


def test_failed_results_never_enter_the_archive():
    target = np.full(4, 0.5)
    opt = _opt(seed=2)
    cands = opt.ask(3)
    opt.tell([_result(cands[0], target, failed=True),
              Result(cands[1].id, FAILED_FITNESS, None, failed=True),
              _result(cands[2], target)])
    arch = opt.archive()
    assert list(arch["ids"]) == [cands[2].id]
    assert opt.stats["failed"] == 2 and opt.stats["inserted"] == 1
    best = opt.best()
    assert best is not None and best[1] > FAILED_FITNESS
    # a failed result keeps failing later: many failures, the archive never sees them
    for _ in range(5):
        opt.tell([_result(c, target, failed=True) for c in opt.ask(3)])
    assert list(opt.archive()["ids"]) == [cands[2].id] and opt.stats["failed"] == 17
    # a repeated delivery is refused before anything changes (the engine de-duplicates)
    with pytest.raises(ValueError, match="already told"):
        opt.tell([_result(cands[2], target)])
    assert len(opt.archive()["ids"]) == 1


def test_user_errors_are_typed():
    with pytest.raises(ConfigError, match="unknown option"):
        _opt(popsize=4)
    with pytest.raises(ConfigError, match="archive_size"):
        _opt(archive_size=0)
    with pytest.raises(ConfigError, match=r"initial\[0\]"):
        _opt(initial=[np.full(4, 2.0)])
    opt = _opt(seed=0)
    c = opt.ask(2)
    with pytest.raises(ConfigError, match="per-example"):
        opt.tell([Result(c[0].id, 0.5, None)])
    opt.tell([Result(c[1].id, 0.5, np.ones(4))])
    c = opt.ask(1)
    with pytest.raises(ConfigError, match="per-example scores"):
        opt.tell([Result(c[0].id, 0.5, np.ones(3))])
    with pytest.raises(ConfigError, match="outside"):
        o2 = _opt(seed=0)
        c = o2.ask(1)
        o2.tell([Result(c[0].id, 0.5, np.array([0.0, 2.0, 0.0, 0.0]))])


def _plain(x):
    """True when a state is plain data: dicts, lists, numbers, strings, None, numpy arrays."""
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain(v) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return all(_plain(v) for v in x)
    return x is None or isinstance(x, (int, float, str, bool, np.ndarray, np.integer,
                                       np.floating))


def test_state_round_trip_gives_identical_next_asks():
    target = np.array([0.3, -0.2, 0.8, 0.0])
    opt = _opt(seed=7, archive_size=4)
    for _ in range(6):
        opt.tell([_result(c, target) for c in opt.ask(2)])
    in_flight = opt.ask(3)  # pending children travel with the state
    state = opt.state_dict()
    assert _plain(state)
    # through JSON, as a checkpoint stores it
    restored = from_jsonable(json.loads(json.dumps(to_jsonable(state), allow_nan=False)))
    twin = _opt(seed=7, archive_size=4)
    twin.ask(5)  # whatever a fresh optimizer did before loading does not matter
    twin.load_state_dict(restored)
    assert [c.id for c in twin.pending()] == [c.id for c in opt.pending()]
    for o in (opt, twin):
        o.tell([_result(c, target) for c in in_flight])
    a, b = opt.ask(4), twin.ask(4)
    assert [c.id for c in a] == [c.id for c in b]
    assert [c.info for c in a] == [c.info for c in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.genome, y.genome)
    np.testing.assert_array_equal(opt.archive()["scores"], twin.archive()["scores"])
    # a state saved with other settings is refused
    with pytest.raises(RunError, match="alpha"):
        _opt(seed=7, archive_size=4, alpha=0.5).load_state_dict(restored)


def test_ablation_switches():
    e1, e2 = np.array([1.0, 1.0, 0.0, 0.0]), np.array([0.0, 0.0, 1.0, 1.0])
    # no crossover, no mutation: a child is a copy of one member
    opt = _opt(initial=[e1, e2], use_crossover=False, seed=3)
    opt.tell([_result(c, np.zeros(4)) for c in opt.ask(2)])
    for c in opt.ask(5):
        assert any(np.array_equal(c.genome, e) for e in (e1, e2))
    # no split point: one SLERP; with a single weight the child lies in span(e1, e2) with
    # the same coefficient pattern on both halves' supports
    opt = _opt(initial=[e1, e2], use_split_point=False, seed=4)
    opt.tell([_result(c, np.zeros(4)) for c in opt.ask(2)])
    for c in opt.ask(5):
        assert c.info["w_s"] is None
        assert c.genome[0] == pytest.approx(c.genome[1])
        assert c.genome[2] == pytest.approx(c.genome[3])


def test_merging_two_half_experts_beats_both():
    """The digits-halves experiment in miniature: each expert knows half of the examples;
    split-point crossover finds a child better than both."""
    rng = np.random.default_rng(0)
    d = 12
    target = rng.uniform(-0.8, 0.8, d)
    e1, e2 = target.copy(), target.copy()
    e1[d // 2:] = -target[d // 2:]
    e2[: d // 2] = -target[: d // 2]
    opt = make_optimizer("m2n2", lower=-np.ones(d), upper=np.ones(d), seed=0,
                         initial=[e1, e2], archive_size=10)
    expert_best = max(_toy_scores(e, target).mean() for e in (e1, e2))
    for _ in range(150):
        opt.tell([_result(c, target) for c in opt.ask(2)])
    assert opt.best()[1] > expert_best + 0.1


def test_from_scratch_run_improves():
    d = 8
    target = np.linspace(-0.7, 0.7, d)
    opt = make_optimizer("m2n2", lower=-np.ones(d), upper=np.ones(d), seed=1,
                         x0=np.zeros(d), sigma0=0.3, mutation_sigma=0.05)
    first = opt.ask(2)
    opt.tell([_result(c, target) for c in first])
    start = opt.best()[1]
    for _ in range(300):
        opt.tell([_result(c, target) for c in opt.ask(1)])
    assert opt.best()[1] > start + 0.15


@pytest.mark.slow
def test_digits_benchmark_smoke(capsys):
    """The paper-reproduction script runs end to end on a tiny budget (every method); slow
    only because ``import cma`` imports matplotlib (~3-9 s here)."""
    pytest.importorskip("sklearn")
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "m2n2_digits.py"
    spec = importlib.util.spec_from_file_location("m2n2_digits", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    runs = bench.main(["--budget", "40", "--seeds", "1", "--slerp-grid", "11"])
    assert {(r["setting"], r["method"]) for r in runs} == (
        {("scratch", m) for m in bench.SCRATCH_METHODS}
        | {("pretrained", m) for m in bench.PRETRAINED_METHODS})
    assert all(0.0 <= r["test"] <= 1.0 and r["forward_passes"] <= 40 for r in runs)
    assert "best SLERP of the experts" in capsys.readouterr().out


def test_agrees_with_the_torch_operator_coefficients():
    """The numpy crossover and the torch operator's coefficient helper give the same SLERP."""
    spherical = pytest.importorskip("evomerge.ops.spherical")
    rng = np.random.default_rng(5)
    for _ in range(50):
        n = int(rng.integers(2, 40))
        a, b = rng.standard_normal(n), rng.standard_normal(n)
        if rng.uniform() < 0.2:
            b = 3.0 * a  # colinear: both fall back to linear
        w_m, split = float(rng.uniform()), int(rng.integers(0, n))
        dot, na, nb = float(a @ b), float(np.linalg.norm(a)), float(np.linalg.norm(b))
        before = spherical.slerp_coefficients(dot, na, nb, w_m)
        after = spherical.slerp_coefficients(dot, na, nb, 1.0 - w_m)
        expected = np.concatenate([before[0] * a[:split] + before[1] * b[:split],
                                   after[0] * a[split:] + after[1] * b[split:]])
        np.testing.assert_allclose(split_point_crossover(a, b, w_m, split), expected,
                                   rtol=1e-10, atol=1e-12)
