"""Dominance, fronts, crowding and hypervolume on hand-made points; the front of a run log."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from evomerge.engine.objectives import Objectives
from evomerge.errors import ConfigError
from evomerge.pareto import (
    crowding_distance,
    dominates,
    hypervolume,
    nondominated,
    nondominated_sort,
    spread_select,
)
from evomerge.report.front import front_of_records, parse_preference


def test_dominance_is_strict_and_maximizing():
    assert dominates([1, 1], [0, 1]) and not dominates([0, 1], [1, 1])
    assert not dominates([1, 1], [1, 1])  # equal points do not dominate
    assert not dominates([1, 0], [0, 1]) and not dominates([0, 1], [1, 0])


def test_front_and_ranks_of_hand_made_points():
    pts = np.array([[1, 0], [0, 1], [0.5, 0.5], [0.4, 0.4], [0.2, 0.1], [0.5, 0.5]])
    assert nondominated(pts).tolist() == [True, True, True, False, False, True]
    assert nondominated_sort(pts).tolist() == [0, 0, 0, 1, 2, 0]
    cd = crowding_distance(pts[[0, 1, 2]])
    assert np.isinf(cd[0]) and np.isinf(cd[1]) and np.isfinite(cd[2]) and cd[2] > 0


def test_hypervolume_2d_and_3d_exact():
    assert hypervolume([[1, 1]], [0, 0]) == pytest.approx(1.0)
    # staircase: union of [0,1]x[0,3], [0,2]x[0,2], [0,3]x[0,1] = 3 + 2 + 1 = 6
    assert hypervolume([[1, 3], [2, 2], [3, 1]], [0, 0]) == pytest.approx(6.0)
    # a dominated point and a point below the reference add nothing
    assert hypervolume([[1, 3], [2, 2], [3, 1], [1, 1], [-1, 5]], [0, 0]) == pytest.approx(6.0)
    assert hypervolume([[2, 2, 2]], [1, 1, 1]) == pytest.approx(1.0)
    # two boxes [0,2]x[0,1]x[0,1] and [0,1]x[0,2]x[0,2]: 2 + 4 - overlap 1 = 5
    assert hypervolume([[2, 1, 1], [1, 2, 2]], [0, 0, 0]) == pytest.approx(5.0)


def test_hypervolume_3d_matches_monte_carlo():
    rng = np.random.default_rng(0)
    pts = rng.uniform(0, 1, (12, 3))
    grid = np.array(list(itertools.product(np.linspace(0.0125, 0.9875, 40), repeat=3)))
    covered = np.any(np.all(grid[:, None, :] <= pts[None, :, :], axis=2), axis=1)
    assert hypervolume(pts, [0, 0, 0]) == pytest.approx(covered.mean(), abs=0.02)


def test_spread_select_takes_extremes_first():
    pts = np.array([[1, 0], [0, 1], [0.5, 0.5], [0.6, 0.4], [0.9, 0.1]])
    sel = spread_select(pts, 3).tolist()
    assert sel[:2] == [0, 1] and sel[2] == 2


def _rec(i, a, b, **kw):
    return {"id": i, "plan_hash": f"h{i}", "fitness": (a + b) / 2,
            "scores": {"ta": a, "tb": b}, "failed": False, **kw}


def test_front_of_a_log_skips_failed_cut_and_repeats():
    obj = Objectives.build([], ["ta", "tb"])
    recs = [_rec(0, 0.2, 0.9), _rec(1, 0.9, 0.2), _rec(2, 0.6, 0.6), _rec(3, 0.4, 0.4),
            _rec(4, 0.99, 0.99, racing_cut=True),  # partial estimate: never on the front
            {"id": 5, "plan_hash": "", "fitness": -1e9, "scores": {}, "failed": True},
            dict(_rec(6, 0.6, 0.6), plan_hash="h2", cached=True)]  # repeat of id 2
    f = front_of_records(recs, obj)
    assert [r["id"] for r in f.members] == [1, 2, 0] and f.split == "search"
    assert f.hypervolume() == pytest.approx(0.3 * 0.2 + 0.4 * 0.6 + 0.2 * 0.9)
    assert f.hypervolume() == pytest.approx(hypervolume(f.points, [0, 0]))
    assert f.prefer({"ta": 1.0})[0]["id"] == 1
    assert f.prefer({"tb": 3, "ta": 1})[0]["id"] == 0
    assert f.prefer({"ta": 1, "tb": 1})[0]["id"] == 2
    with pytest.raises(ConfigError, match="not an objective"):
        f.prefer({"tc": 1})


def test_grouped_objectives_and_validation_split():
    obj = Objectives.build([{"name": "both", "tasks": ["ta", "tb"]}, {"name": "a", "tasks": ["ta"]}],
                           ["ta", "tb"], {"ta": 3.0, "tb": 1.0})
    assert obj.values({"ta": 1.0, "tb": 0.0}).tolist() == [0.75, 1.0]
    with pytest.raises(ConfigError, match="not a task"):
        Objectives.build([{"name": "x", "tasks": ["nope"]}], ["ta"])
    recs = [_rec(0, 0.9, 0.9), _rec(1, 0.1, 0.1, validation={"scores": {"ta": 0.3, "tb": 0.3}})]
    f = front_of_records(recs, Objectives.build([], ["ta", "tb"]))
    assert f.split == "validation" and [r["id"] for r in f.members] == [1]
    assert parse_preference("ta=2, tb") == {"ta": 2.0, "tb": 1.0}
    with pytest.raises(ConfigError):
        parse_preference("ta=x")
