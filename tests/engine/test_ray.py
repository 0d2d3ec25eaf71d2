"""The Ray executor on a real local Ray (no mocks): exactly-once evaluation, worker deaths,
driver death + resume, a raylet killed under the driver + resume, and identical results with
1 and 2 workers for CMA-ES.

Every test here runs with a stale cluster recorded where Ray looks for one (its
``ray_current_cluster`` file naming a dead address) and ``RAY_ADDRESS`` naming another dead
address: the embedded Ray must ignore both (issue 18). The file lives in a test-owned
``RAY_TMPDIR`` (Ray reads it from there), so no one else's ``/tmp/ray`` is touched, and the
environment is restored after each test."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from ray_cluster import free_port, processes
from run_configs import read_log as _log
from run_configs import run_cli as _run_cli
from run_configs import zoo_run_config as _cfg

from evomerge.config import ExecutorConfig, parse_config
from evomerge.engine.ray_executor import RayExecutor
from evomerge.engine.search import Search, open_or_create
from evomerge.engine.store import RunStore

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def stale_ray_records(monkeypatch):
    """A dead cluster recorded in Ray's ray_current_cluster file and RAY_ADDRESS set to
    another dead address, in a test-owned RAY_TMPDIR; both undone afterwards."""
    root = Path(tempfile.mkdtemp(prefix="evr-", dir="/tmp"))  # short: Ray's sockets live here
    (root / "ray").mkdir()
    stale = f"127.0.0.1:{free_port()}"
    (root / "ray" / "ray_current_cluster").write_text(stale)
    monkeypatch.setenv("RAY_TMPDIR", str(root))
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{free_port()}")
    yield root, stale
    shutil.rmtree(root, ignore_errors=True)


@pytest.mark.parametrize("recorded", ["cluster file", "RAY_ADDRESS"])
def test_embedded_ray_is_private_whatever_the_machine_records(recorded, stale_ray_records,
                                                              monkeypatch, capfd):
    import ray

    root, stale = stale_ray_records
    if recorded == "cluster file":
        monkeypatch.delenv("RAY_ADDRESS")
    else:
        (root / "ray" / "ray_current_cluster").unlink()
    dead = os.environ.get("RAY_ADDRESS", stale)
    ex = RayExecutor(ExecutorConfig(name="ray", workers=1))
    ex.connect()
    try:
        assert ray.cluster_resources()["CPU"] == 1  # our private instance, sized by us
        assert ray.get_runtime_context().gcs_address.rsplit(":", 1)[1] != dead.rsplit(":", 1)[1]
    finally:
        ex.close()
    assert not ray.is_initialized()
    err = capfd.readouterr().err
    assert ("is set but not used" in err) == (recorded == "RAY_ADDRESS"), err[-2000:]
    if recorded == "cluster file":  # left as it was
        assert (root / "ray" / "ray_current_cluster").read_text() == stale


def test_address_auto_following_a_dead_ray_address_fails_in_one_line(test_zoo, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(_cfg(test_zoo, executor={"name": "ray", "workers": 1})))
    res = _run_cli(["run", str(path), "--runs-dir", str(tmp_path / "runs"), "--address", "auto",
                    "--no-progress"])
    assert res.returncode == 2, res.stderr[-2000:]
    (line,) = res.stderr.strip().splitlines()
    assert line.startswith("error: no Ray cluster answers at "), line
    assert ":" + os.environ["RAY_ADDRESS"].split(":")[1] + " " in line
    assert not (tmp_path / "runs").exists()


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
    assert "is set but not used" in crashed.stderr  # the dead RAY_ADDRESS, named and ignored
    assert len(_log(tmp_path / "runs/t")) == 5
    res = _run_cli(["resume", str(tmp_path / "runs/t"), "--no-progress"])
    assert res.returncode == 0, res.stderr[-2000:]
    # the same candidates and scores as an uninterrupted local run with the same seed
    ref = parse_config(dict(cfg, executor={"name": "local", "num_threads": 1}))
    _run(ref, tmp_path / "ref")
    assert _by_id(tmp_path / "runs/t") == _by_id(tmp_path / "ref")
    assert RunStore(tmp_path / "runs/t").load_checkpoint()["pending"] == []


def _children(pid, name):
    """PIDs of the direct children of ``pid`` whose executable is called ``name``."""
    return [p for p, ppid, _, _, exe in processes() if ppid == pid and exe == name]


def test_raylet_killed_under_the_driver_stops_in_one_line_and_resumes(test_zoo, tmp_path):
    cfg = _cfg(test_zoo, budget=40, optimizer={"name": "cma", "popsize": 4, "seed": 5},
               executor={"name": "ray", "workers": 2, "num_threads": 1})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    run_dir = tmp_path / "runs/t"
    # its own session: every Ray process this driver starts is in its group, ours to clean up
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "run", str(path), "--runs-dir",
                             str(tmp_path / "runs"), "--no-progress"], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "evals.jsonl").exists() or len(_log(run_dir)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-2000:]
            time.sleep(0.1)
        (raylet,) = _children(proc.pid, "raylet")  # the embedded Ray's node, owned by this run
        os.kill(raylet, signal.SIGKILL)
        killed = time.monotonic()
        _, err = proc.communicate(timeout=120)
        took = time.monotonic() - killed
    finally:
        if proc.poll() is None:
            proc.kill()
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of the run's Ray
        except ProcessLookupError:
            pass
    assert proc.returncode == 2, err[-2000:]
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    assert "the local Ray node died under the driver" in lines[0]
    assert f"evomerge resume {run_dir}" in lines[0]
    assert took < 60, took
    done = len(_log(run_dir))
    assert 2 <= done < 40
    res = _run_cli(["resume", str(run_dir), "--no-progress"])
    assert res.returncode == 0, res.stderr[-2000:]
    ref = parse_config(dict(cfg, executor={"name": "local", "num_threads": 1}))
    _run(ref, tmp_path / "ref")
    assert _by_id(run_dir) == _by_id(tmp_path / "ref")
    assert sorted(r["id"] for r in _log(run_dir)) == list(range(40))
