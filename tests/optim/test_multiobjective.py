"""NSGA-II and MAP: contracts, exact state round trips, Pareto archive, MAP's quadratic fit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from evomerge.optim import Result, make_optimizer
from evomerge.optim.map_pareto import fit_quadratic, latin_hypercube, predict_quadratic
from evomerge.optim.state import from_jsonable, to_jsonable
from evomerge.pareto import hypervolume, nondominated

DIM = 4
LOWER, UPPER = np.zeros(DIM), np.ones(DIM) * 1.5


def objectives(x: np.ndarray) -> np.ndarray:
    """Two conflicting quadratic objectives (maximized): near (1,0,..) vs near (0,1,..)."""
    a = np.array([1.0, 0.2, 0.5, 0.5])
    b = np.array([0.2, 1.0, 0.5, 0.5])
    return np.array([1 - np.sum((x - a) ** 2), 1 - np.sum((x - b) ** 2)])


def result(c, fail=False) -> Result:
    f = objectives(c.genome)
    return Result(c.id, float(f.mean()), failed=fail, objectives=None if fail else f)


def build(name, seed=0, **kw):
    if name == "map":
        kw.setdefault("budget", 60)
    return make_optimizer(name, lower=LOWER, upper=UPPER, x0=np.full(DIM, 0.5), seed=seed,
                          n_objectives=2, **kw)


def drive(opt, budget, batch=3):
    asked = []
    while len(asked) < budget:
        cands = opt.ask(batch)
        assert cands
        asked += cands
        opt.tell([result(c, fail=c.id % 13 == 7) for c in cands])
    return asked


def roundtrip(state):
    return from_jsonable(json.loads(json.dumps(to_jsonable(state), allow_nan=False)))


def scripted(opt, steps, rng, start=None):
    pending, asked = list(start or []), []
    for _ in range(steps):
        cands = opt.ask(int(rng.integers(1, 4)))
        asked += cands
        pending += cands
        if pending and rng.random() < 0.7:
            k = int(rng.integers(1, len(pending) + 1))
            idx = set(rng.permutation(len(pending))[:k].tolist())
            told = [p for i, p in enumerate(pending) if i in idx]
            pending = [p for i, p in enumerate(pending) if i not in idx]
            opt.tell([result(c, fail=c.id % 11 == 5) for c in told])
    return asked, pending


@pytest.mark.parametrize("name", ["nsga2", "map"])
def test_state_round_trip_continues_identically(name):
    for split in (0, 5, 17):
        ref = build(name, seed=3)
        _, pend = scripted(ref, split, np.random.default_rng(split))
        resumed = build(name, seed=3)
        resumed.load_state_dict(roundtrip(ref.state_dict()))
        assert [(c.id, c.genome.tolist()) for c in resumed.pending()] == \
               [(c.id, c.genome.tolist()) for c in ref.pending()]
        a, _ = scripted(ref, 30, np.random.default_rng(9), start=pend)
        b, _ = scripted(resumed, 30, np.random.default_rng(9),
                        start=[c for c in resumed.pending() if c.id in {p.id for p in pend}])
        assert len(a) > 10 and [c.id for c in a] == [c.id for c in b]
        assert all(np.array_equal(x.genome, y.genome) and x.info == y.info for x, y in zip(a, b))
        assert to_jsonable(ref.state_dict()) == to_jsonable(resumed.state_dict())


@pytest.mark.parametrize("name", ["nsga2", "map"])
def test_tell_order_does_not_change_the_run(name):
    def run(shuffle):
        opt, rng, asked = build(name, seed=5), np.random.default_rng(0), []
        while len(asked) < 40:
            cands = opt.ask(100)
            asked += cands
            order = rng.permutation(len(cands)) if shuffle else range(len(cands))
            for i in order:
                opt.tell([result(cands[i])])
        return [c.genome.tolist() for c in asked]

    assert run(False) == run(True)


def test_nsga2_archive_is_the_front_and_beats_random():
    opt = build("nsga2", seed=1, popsize=8)
    asked = drive(opt, 96)
    assert all(np.all((c.genome >= LOWER) & (c.genome <= UPPER)) for c in asked)
    ids, X, F = opt.archive()
    assert len(ids) == len(X) == len(F) > 2 and nondominated(F).all()
    told = {c.id: objectives(c.genome) for c in asked if c.id % 13 != 7}
    pts = np.array(list(told.values()))
    assert np.allclose(np.sort(F, axis=0), np.sort(pts[nondominated(pts)], axis=0)) or \
        hypervolume(F, [0, 0]) == pytest.approx(hypervolume(pts, [0, 0]))
    assert not {c.id for c in asked if c.id % 13 == 7} & set(ids)  # failed never archived
    rng = np.random.default_rng(1)
    rand = np.array([objectives(x) for x in rng.uniform(LOWER, UPPER, (96, DIM))])
    assert hypervolume(F, [0, 0]) > hypervolume(rand, [0, 0])


def test_quadratic_fit_recovers_a_known_quadratic():
    rng = np.random.default_rng(0)
    d = 3
    A = rng.normal(size=(d, d))
    A = A + A.T
    b, c = rng.normal(size=d), 0.7
    Z = latin_hypercube(rng, 40, d)
    y = c + Z @ b + np.einsum("ni,ij,nj->n", Z, A, Z)
    coef = fit_quadratic(Z, y, ridge=0.0)
    assert coef[0, 0] == pytest.approx(c) and np.allclose(coef[1:d + 1, 0], b)
    test = rng.random((10, d))
    want = c + test @ b + np.einsum("ni,ij,nj->n", test, A, test)
    assert np.allclose(predict_quadratic(coef, test)[:, 0], want, atol=1e-8)
    # Latin hypercube: one point per stratum in every dimension
    assert all(sorted((Z[:, j] * 40).astype(int)) == list(range(40)) for j in range(d))


def test_map_confirms_its_surrogate_front():
    opt = build("map", seed=2, budget=40, initial_points=20, round_size=5)
    asked = drive(opt, 40, batch=7)
    design = [c for c in asked if c.info["phase"] == "design"]
    confirm = [c for c in asked if c.info["phase"] == "confirm"]
    assert len(design) == 20 and len(confirm) == 20 and np.array_equal(design[0].genome, np.full(DIM, 0.5))
    conf = opt.confirmations()
    assert [i for i, _, _ in conf] == [c.id for c in confirm]
    for i, pred, measured in conf:
        if measured is not None:  # the objectives are quadratic: the surrogate is exact
            assert np.allclose(pred, measured, atol=1e-3), (i, pred, measured)
    # confirmed points lie on (or near) the true front: better than the design's front
    F_design = np.array([objectives(c.genome) for c in design])
    F_conf = np.array([objectives(c.genome) for c in confirm])
    assert hypervolume(F_conf, [0, 0]) >= hypervolume(F_design, [0, 0])


def test_options_are_checked():
    from evomerge.errors import ConfigError

    with pytest.raises(ConfigError, match="crossover_prob"):
        build("nsga2", crossover_prob=2)
    with pytest.raises(ConfigError, match="round_size"):
        build("map", round_size=0)
    with pytest.raises(ConfigError, match="unknown option"):
        build("map", bogus=1)
