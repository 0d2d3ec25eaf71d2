"""Run progress (evaluations/s, ETA) and experiment logging (TensorBoard event files read
back; the callback interface with a recording logger)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from evomerge.engine.progress import RateMeter, format_duration
from evomerge.errors import ConfigError
from evomerge.tracking import RunLogFeed, RunLogger, make_loggers

ROOT = Path(__file__).resolve().parents[2]


def test_rate_meter_counts_this_session_only():
    now = [100.0]
    m = RateMeter(budget=20, clock=lambda: now[0])
    assert m.rate() is None and m.eta_text() == "ETA -" and m.rate_text() == "- eval/s"
    now[0] = 104.0
    m.update(11)  # a resumed run: 10 restored, 1 finished in this session
    assert m.rate() == pytest.approx(1 / 4)
    now[0] = 110.0
    m.update(13)
    assert m.rate() == pytest.approx(3 / 10)
    assert m.eta() == pytest.approx(7 / 0.3)
    assert m.rate_text() == "0.30 eval/s" and m.eta_text() == "ETA 0:23"
    now[0] = 1000.0
    assert m.rate_text() == "0.20 eval/min"
    assert format_duration(3725) == "1:02:05"


class Recorder(RunLogger):
    name = "recorder"

    def __init__(self):
        self.opened, self.rows, self.closed = None, [], False

    def open(self, run_name, run_dir, config):
        self.opened = (run_name, config)

    def log_scalars(self, step, scalars, wall_time):
        self.rows.append((step, dict(scalars), wall_time))

    def close(self):
        self.closed = True


def _rec(i, fitness, scores, t, **extra):
    return {"id": i, "fitness": fitness, "scores": scores, "failed": False, "seconds": 0.5 + i,
            "time": t, **extra}


def test_feed_tails_the_log_and_logs_candidates_best_and_baselines(tmp_path):
    log = tmp_path / "evals.jsonl"
    rows = [
        _rec(0, 0.5, {"a": 0.4, "b": 0.6}, 10.0, baseline="uniform task arithmetic"),
        _rec(1, 0.7, {"a": 0.8, "b": 0.6}, 12.0),
        {"id": 2, "fitness": -1e9, "scores": {}, "failed": True, "seconds": 0.1, "time": 13.0},
        _rec(3, 0.9, {"a": 0.9, "b": 0.9}, 14.0, racing_cut=True),  # partial: never best
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in rows[:2]))
    rec = Recorder()
    feed = RunLogFeed(tmp_path, [rec], "run", {"budget": 4})
    assert rec.opened == ("run", {"budget": 4})
    assert feed.sync() == 2 and feed.sync() == 0
    with open(log, "a") as f:
        f.write(json.dumps(rows[2]) + "\n" + json.dumps(rows[3]) + "\n" + '{"id": 4, "fitn')  # torn
    assert feed.sync() == 2
    steps = {s: sc for s, sc, _ in rec.rows}
    assert list(steps) == [1, 2, 3, 4]
    assert steps[1]["baseline/uniform_task_arithmetic/fitness"] == 0.5
    assert steps[1]["baseline/uniform_task_arithmetic/a"] == 0.4
    assert steps[2]["candidate/a"] == 0.8 and steps[2]["best/fitness"] == 0.7
    assert steps[2]["candidate/seconds"] == 1.5 and steps[2]["run/evaluations_per_second"] == 0.5
    assert steps[3]["candidate/failed"] == 1.0 and "candidate/fitness" not in steps[3]
    assert steps[4]["candidate/fitness"] == 0.9 and steps[4]["best/fitness"] == 0.7
    # the run's own baselines log (baselines.jsonl): logged once, never a candidate or best
    (tmp_path / "baselines.jsonl").write_text(json.dumps(
        _rec(0, 0.6, {"a": 0.5}, 15.0, baseline="TIES (density 0.5, w=1)")) + "\n")
    assert feed.sync() == 0 and feed.sync() == 0
    last_step, last, _ = rec.rows[-1]
    assert last_step == 4 and last == {"baseline/TIES_density_0.5_w_1/fitness": 0.6,
                                        "baseline/TIES_density_0.5_w_1/a": 0.5}, last
    assert len(rec.rows) == 5 and feed.best["id"] == 1
    feed.close()
    assert rec.closed
    (tmp_path / "baselines.jsonl").unlink()
    # a resumed run catches up without logging the old records again
    again = Recorder()
    feed = RunLogFeed(tmp_path, [again], "run", {})
    assert feed.sync(emit=False) == 4 and again.rows == [] and feed.best["id"] == 1
    with open(log, "w") as f:  # the torn line was cut by the run's repair; one more record
        f.write("".join(json.dumps(r) + "\n" for r in rows) + json.dumps(_rec(4, 0.95, {"a": 1.0}, 20.0)) + "\n")
    feed.offset = sum(len(json.dumps(r)) + 1 for r in rows)
    assert feed.sync() == 1 and again.rows[0][0] == 5 and again.rows[0][1]["best/fitness"] == 0.95


def test_make_loggers_names():
    assert make_loggers(["none"]) == []
    with pytest.raises(ConfigError, match="--log nope: unknown logger; use one of tensorboard, wandb, mlflow"):
        make_loggers(["nope"])


def test_missing_tracker_package_is_one_line():
    from evomerge.tracking import LOGGERS

    for name in ("wandb", "mlflow"):
        if not LOGGERS[name].available():
            with pytest.raises(ConfigError, match=f"--log {name}: the '{name}' package is not installed"):
                make_loggers([name])


@pytest.mark.slow
def test_run_with_hub_ids_logs_to_tensorboard_and_exports_for_the_hub(test_zoo, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from hub_cache import add_to_hub_cache
    from huggingface_hub import metadata_load
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from evomerge.config import load_config
    from evomerge.engine.export import export_top
    from evomerge.engine.runner import resume_search, run_search

    cache = tmp_path / "hub"
    commits = {}
    for m in [test_zoo.base, *test_zoo.experts[:2]]:
        _, commits[m.name] = add_to_hub_cache(cache, f"zoo-org/{m.name.replace('_', '-')}", m.path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    e1, e2 = (m.name for m in test_zoo.experts[:2])
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "name": "hubrun",
        "models": {"base": "zoo-org/base", e1: f"zoo-org/{e1.replace('_', '-')}",
                   e2: f"zoo-org/{e2.replace('_', '-')}@{commits[e2]}"},
        "base_model": "base",
        "space": {"type": "parameter", "method": "task_arithmetic", "layer_groups": 1},
        "optimizer": {"name": "random", "seed": 0},
        "budget": 3,
        "tasks": [{"path": str(ROOT / "fitness/zoo/cipher_a.yaml")}],
        "backend": {"batch_size": 256},
        "executor": {"name": "local", "num_threads": 1},
    }))
    cfg = load_config(cfg_path)
    run = tmp_path / "runs" / "hubrun"
    best = run_search(cfg, run, progress=True)
    assert best is not None
    pins = json.loads((run / "models.json").read_text())
    assert pins["base"]["revision"] == commits["base"] and pins["base"]["repo_id"] == "zoo-org/base"
    assert pins[e2]["pinned"] == f"zoo-org/{e2.replace('_', '-')}@{commits[e2]}"
    # TensorBoard event files, read back with TensorBoard's own reader
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"candidate/fitness", "candidate/cipher_a", "best/fitness", "best/cipher_a",
            "candidate/seconds"} <= tags
    fit = [e.value for e in acc.Scalars("candidate/fitness")]
    logged = [json.loads(line)["fitness"] for line in (run / "evals.jsonl").read_text().splitlines()]
    assert fit == pytest.approx(logged) and [e.step for e in acc.Scalars("best/fitness")] == [1, 2, 3]
    # resuming with a bigger budget appends (no duplicate steps)
    resume_search(run, budget=4, progress=False)
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("candidate/fitness")] == [1, 2, 3, 4]  # none twice
    # export: pinned recipe, mergekit config, card with Hub ids and the search split's SE
    (path,) = export_top(run, 1, tmp_path / "export")
    mk = yaml.safe_load((path / "mergekit_config.yml").read_text())
    assert mk["base_model"] == f"zoo-org/base@{commits['base']}"
    meta = metadata_load(path / "README.md")
    assert meta["base_model"][0] == "zoo-org/base" and "mergekit" in meta["tags"]
    card = (path / "README.md").read_text()
    assert "| cipher_a | search |" in card and "n/a" not in card.split("| cipher_a | search |")[1].split("\n")[0]
