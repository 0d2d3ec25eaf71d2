"""Joining a real Ray cluster started the usual way (`ray start --head`, then `ray start
--address` for a second node), with Ray's token authentication: a driver without the token
fails fast in one line and leaves no run directory; with the cluster's token file (or the token
in RAY_AUTH_TOKEN) the search runs on both nodes, every candidate evaluated once. The cluster
is the test's own (own temp dir, HOME, free ports) and only its processes are stopped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from ray_cluster import LocalCluster
from run_configs import read_log as _log
from run_configs import zoo_run_config as _cfg

pytestmark = pytest.mark.slow


def _driver_env(home, **extra):
    env = {"HOME": str(home), "RAY_ADDRESS": "", "RAY_AUTH_MODE": "", "RAY_AUTH_TOKEN": "",
           "RAY_AUTH_TOKEN_PATH": ""}
    env.update(extra)
    return env


def _run(args, env):
    """The CLI in a fresh process; Ray variables given as "" are removed (unset)."""
    full = dict(os.environ, OMP_NUM_THREADS="1", **env)
    for k in [k for k, v in env.items() if v == ""]:
        full.pop(k, None)
    t = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", *args], capture_output=True,
                         text=True, timeout=600, env=full)
    return res, time.monotonic() - t


def test_join_token_cluster_of_two_nodes(test_zoo, tmp_path):
    cfg = _cfg(test_zoo, budget=6, optimizer={"name": "random", "seed": 4},
               executor={"name": "ray", "workers": 2, "num_threads": 1})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    stranger = tmp_path / "stranger-home"  # a user without the cluster's token
    stranger.mkdir()
    runs = tmp_path / "runs"
    with LocalCluster(token=True, cpus=1) as cluster:
        cluster.start_head()
        cluster.add_node({"second": 1})
        cluster.wait_nodes(2)
        args = ["run", str(path), "--runs-dir", str(runs), "--address", cluster.address,
                "--no-progress"]

        # no token: one line naming the fix, quickly, and no run directory
        res, took = _run(args, _driver_env(stranger))
        assert res.returncode == 2, res.stderr[-2000:]
        (line,) = res.stderr.strip().splitlines()
        assert line.startswith("error: the Ray cluster at ") and "RAY_AUTH_TOKEN" in line, line
        assert "ray get-auth-token" in line
        assert took < 45, took  # imports on a busy machine; Ray's own path waited ~20-30 s more
        assert not runs.exists()

        # a wrong token: named as rejected
        res, _ = _run(args, _driver_env(stranger, RAY_AUTH_TOKEN="0" * 32))
        assert res.returncode == 2 and "rejected the token from RAY_AUTH_TOKEN" in res.stderr
        assert not runs.exists()

        # on the head node, as its user: the cluster's token file (~/.ray/auth_token), with
        # RAY_AUTH_MODE unset, as after a plain `ray start --head`
        res, _ = _run(args, _driver_env(cluster.home))
        assert res.returncode == 0, res.stderr[-3000:] + cluster.logs()
        recs = _log(runs / "t")
        assert sorted(r["id"] for r in recs) == list(range(6))
        assert not any(r["failed"] for r in recs)
        stats = json.loads((runs / "t/executor_stats.json").read_text())
        workers = stats["workers"]
        # each candidate and each distinct baseline once, no retries
        baselines = [json.loads(x) for x in (runs / "t/baselines.jsonl").read_text().splitlines()]
        plans = {b["plan_hash"] for b in baselines} | {r["plan_hash"] for r in recs}
        assert sum(w["evaluations"] for w in workers.values()) == len(plans)  # each plan once
        assert stats["failures"] == 0 and stats["replacements"] == 0
        nodes = {n for w in workers.values() for n in w["nodes"]}
        assert len(nodes) == 2, workers  # one worker per node: both raylets did work
        assert all(w["evaluations"] > 0 for w in workers.values()), workers

        # elsewhere, with the token in the environment: resume to a larger budget
        res, _ = _run(["resume", str(runs / "t"), "--budget", "8", "--address", cluster.address,
                       "--no-progress"], _driver_env(stranger, RAY_AUTH_TOKEN=cluster.token))
        assert res.returncode == 0, res.stderr[-3000:]
        assert sorted(r["id"] for r in _log(runs / "t")) == list(range(8))
    assert cluster.alive_group_members() == []
