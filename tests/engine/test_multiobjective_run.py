"""NSGA-II and MAP driven by the real search loop on the test zoo; the run's front from its log."""

from __future__ import annotations

import pytest
from run_configs import zoo_run_config as _cfg

from evomerge.config import parse_config
from evomerge.engine.runner import run_search
from evomerge.engine.store import RunStore
from evomerge.report.front import run_front


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


@pytest.mark.slow
@pytest.mark.parametrize("name", ["nsga2", "map"])
def test_sigkill_then_resume_gives_the_same_run(test_zoo, tmp_path, name):
    import yaml
    from run_configs import read_log as _log
    from run_configs import run_cli as _run_cli

    cfg = _cfg(test_zoo, budget=10, optimizer={"name": name, "popsize": 4, "seed": 3})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ref = _run_cli(["run", str(path), "--runs-dir", str(tmp_path / "ref"), "--no-progress"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    want = [(r["id"], r["genome"], r["fitness"]) for r in _log(tmp_path / "ref/t")]
    for point in ("after_log:3", "after_tell:6"):
        runs = tmp_path / point.replace(":", "_")
        crashed = _run_cli(["run", str(path), "--runs-dir", str(runs), "--no-progress"],
                           env={"EVOMERGE_CRASH_AT": point})
        assert crashed.returncode == -9, (point, crashed.stderr[-2000:])
        res = _run_cli(["resume", str(runs / "t"), "--no-progress"])
        assert res.returncode == 0, (point, res.stderr[-2000:])
        assert [(r["id"], r["genome"], r["fitness"]) for r in _log(runs / "t")] == want, point
