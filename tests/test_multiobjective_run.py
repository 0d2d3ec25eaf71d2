"""NSGA-II and MAP driven by the real search loop on the test zoo; the run's front from its log."""

from __future__ import annotations

import pytest

from evomerge.config import parse_config
from evomerge.engine.runner import run_search
from evomerge.engine.store import RunStore
from evomerge.report.front import run_front
from tests.test_search import _cfg


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nsga2", "map"])
def test_multiobjective_optimizer_runs_and_front_comes_from_the_log(test_zoo, tmp_path, name):
    cfg = parse_config(_cfg(test_zoo, optimizer={"name": name, "popsize": 4}, budget=8))
    run_search(cfg, tmp_path / "run", progress=False)
    recs = RunStore(tmp_path / "run").read_evals()
    assert len(recs) == 8
    front = run_front(tmp_path / "run")
    assert front.split == "search" and front.objectives.names == ["cipher_a", "cipher_b"]
    assert front.members and front.hypervolume() >= 0.0
