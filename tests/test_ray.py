"""The Ray executor on a real local Ray (no mocks): exactly-once evaluation, worker deaths,
driver death + resume, and identical results with 1 and 2 workers for CMA-ES."""

from __future__ import annotations

import os
import signal

import pytest
import yaml
from test_search import _cfg, _log, _run_cli

from evomerge.config import parse_config
from evomerge.engine.ray_executor import RayExecutor
from evomerge.engine.search import Search, open_or_create
from evomerge.engine.store import RunStore

pytestmark = pytest.mark.slow


def _ray_cfg(zoo, workers=2, **over):
    over.setdefault("executor", {"name": "ray", "workers": workers, "num_threads": 1})
    over.setdefault("budget", 8)
    return parse_config(_cfg(zoo, **over))


def _run(cfg, run_dir, on_progress=None):
    search = Search(cfg, store=None)
    search.store = open_or_create(cfg, run_dir)
    search.on_progress = on_progress
    try:
        search.run()
    finally:
        search.store.unlock()
    return search


def _by_id(run_dir):
    return {r["id"]: (r["genome"], r["fitness"]) for r in _log(run_dir)}


def test_two_workers_every_candidate_once_and_same_as_one_worker(test_zoo, tmp_path):
    s2 = _run(_ray_cfg(test_zoo, workers=2), tmp_path / "w2")
    recs = _log(tmp_path / "w2")
    assert sorted(r["id"] for r in recs) == list(range(8))
    assert not any(r["failed"] for r in recs)
    stats = s2.executor.stats() if s2.executor.slots else None
    assert stats is None or len(stats["workers"]) == 2
    workers = {r["worker"] for r in recs}
    assert workers <= {"ray-0", "ray-1", "cache"} and len(workers - {"cache"}) == 2
    _run(_ray_cfg(test_zoo, workers=1), tmp_path / "w1")
    assert _by_id(tmp_path / "w1") == _by_id(tmp_path / "w2")


def test_killed_workers_are_replaced_and_nothing_is_lost(test_zoo, tmp_path):
    import ray

    killed = []

    def kill_some(search):
        ex: RayExecutor = search.executor
        if search.told == 2 and not killed:  # ray.kill a busy worker
            busy = [s for s in ex.slots if s.job is not None] or ex.slots
            ray.kill(busy[0].actor)
            killed.append("ray.kill")
        elif search.told == 4 and len(killed) == 1:  # SIGKILL a worker process
            live = [s for s in ex.slots if s.pid is not None]
            if live:
                os.kill(live[0].pid, signal.SIGKILL)
                killed.append("sigkill")

    search = _run(_ray_cfg(test_zoo, budget=10, optimizer={"name": "random", "seed": 2}),
                  tmp_path / "run", kill_some)
    recs = _log(tmp_path / "run")
    assert sorted(r["id"] for r in recs) == list(range(10))
    assert not any(r["failed"] for r in recs)
    stats = json_stats(tmp_path / "run")
    assert len(killed) == 2
    assert stats["replacements"] >= 2, stats
    assert search.told == 10


def json_stats(run_dir):
    import json

    return json.loads((run_dir / "executor_stats.json").read_text())


def test_driver_killed_then_resumed_with_ray(test_zoo, tmp_path):
    cfg = _cfg(test_zoo, budget=10, optimizer={"name": "cma", "popsize": 4, "seed": 3},
               executor={"name": "ray", "workers": 2, "num_threads": 1})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    crashed = _run_cli(["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--no-progress"],
                       env={"EVOMERGE_CRASH_AT": "after_log:5"})
    assert crashed.returncode == -9, crashed.stderr[-2000:]
    assert len(_log(tmp_path / "runs/t")) == 5
    res = _run_cli(["resume", str(tmp_path / "runs/t"), "--no-progress"])
    assert res.returncode == 0, res.stderr[-2000:]
    # the same candidates and scores as an uninterrupted local run with the same seed
    ref = parse_config(dict(cfg, executor={"name": "local", "num_threads": 1}))
    _run(ref, tmp_path / "ref")
    assert _by_id(tmp_path / "runs/t") == _by_id(tmp_path / "ref")
    assert RunStore(tmp_path / "runs/t").load_checkpoint()["pending"] == []
