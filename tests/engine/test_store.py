"""Run directory: atomic writes, append-only log, torn lines, locking, config changes."""

from __future__ import annotations

import pytest

from evomerge.config import parse_config
from evomerge.engine.store import RunStore, atomic_write_text
from evomerge.errors import RunError

CFG = {
    "name": "t",
    "models": {"base": "/m/base", "a": "/m/a"},
    "base_model": "base",
    "tasks": [{"path": "x.yaml"}],
}


def test_create_log_and_checkpoint_roundtrip(tmp_path):
    cfg = parse_config(CFG)
    store = RunStore.create(tmp_path / "run", cfg)
    assert store.config() == cfg
    store.append_eval({"id": 0, "fitness": 0.5})
    store.append_eval({"id": 1, "fitness": 0.7})
    assert [r["id"] for r in store.read_evals()] == [0, 1]
    store.save_checkpoint({"optimizer": {}, "told": 2, "pending": []})
    assert store.load_checkpoint()["told"] == 2
    with pytest.raises(RunError, match="already holds a run"):
        RunStore.create(tmp_path / "run", cfg)
    store.unlock()


def test_torn_last_line_is_dropped_and_repaired(tmp_path):
    store = RunStore.create(tmp_path / "run", parse_config(CFG))
    store.append_eval({"id": 0, "fitness": 0.5})
    with open(store.log_path, "a") as f:
        f.write('{"id": 1, "fitn')  # a crash in the middle of an append
    assert [r["id"] for r in store.read_evals()] == [0]
    store.read_evals(repair=True)
    store.append_eval({"id": 1, "fitness": 0.6})
    assert [r["id"] for r in store.read_evals()] == [0, 1]
    store.unlock()


def test_corrupt_middle_line_is_an_error(tmp_path):
    store = RunStore.create(tmp_path / "run", parse_config(CFG))
    with open(store.log_path, "w") as f:
        f.write('{"id": 0}\nnot json\n{"id": 2}\n')
    with pytest.raises(RunError, match="evals.jsonl:2: corrupt"):
        store.read_evals()
    store.unlock()


def test_lock_refuses_second_driver(tmp_path):
    store = RunStore.create(tmp_path / "run", parse_config(CFG))
    other = RunStore.open(tmp_path / "run")
    with pytest.raises(RunError, match="in use by another evomerge process"):
        other.lock()
    store.unlock()
    other.lock()
    other.unlock()


def test_changed_config_refused_unless_forced(tmp_path):
    store = RunStore.create(tmp_path / "run", parse_config(CFG))
    store.check_config(parse_config(dict(CFG, budget=500)))  # budget may change freely
    changed = parse_config(dict(CFG, seed=3))
    with pytest.raises(RunError, match=r"changed since it started \(seed\)"):
        store.check_config(changed)
    store.check_config(changed, force=True)
    assert store.meta()["fingerprint"] == changed.fingerprint()
    store.check_config(changed)
    store.unlock()


def test_open_missing_run(tmp_path):
    with pytest.raises(RunError, match="no run found"):
        RunStore.open(tmp_path / "nope")


def test_atomic_write_leaves_no_temp_files(tmp_path):
    p = tmp_path / "f.json"
    atomic_write_text(p, "a")
    atomic_write_text(p, "b")
    assert p.read_text() == "b"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["f.json"]
