"""Runs and the CLI under bad input and faults (issue 12): a failed start leaves nothing that
blocks the corrected retry, CLI values are validated like config values, `resume --force`
checks before it writes, one-line errors for odd outputs and corrupt run files, sources are
never overwritten, run names stay inside --runs-dir, the demo runs twice, and a deleted lock
file does not let a second process drive a run (two real processes)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from evomerge.cli import main
from evomerge.config import parse_config
from evomerge.engine.runner import resume_search, run_search
from evomerge.engine.store import RunStore
from evomerge.errors import CheckpointError, ConfigError, RunError

ROOT = Path(__file__).resolve().parents[2]
TASK = str(ROOT / "fitness/zoo/cipher_a.yaml")


def _cfg(zoo, **over):
    d = {
        "name": "t",
        "models": {"base": str(zoo.base.path), "expert_a": str(zoo.experts[0].path),
                   "expert_b": str(zoo.experts[1].path)},
        "base_model": "base",
        "space": {"type": "parameter", "method": "task_arithmetic", "layer_groups": 2,
                  "params": {"weight": {"low": 0.0, "high": 1.5, "init": 1.0}}},
        "optimizer": {"name": "cma", "popsize": 4, "seed": 1},
        "budget": 4,
        "tasks": [{"path": TASK}],
        "backend": {"batch_size": 256},
        "executor": {"name": "local", "num_threads": 1},
    }
    d.update(over)
    return d


def _cli(*args):
    res = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    return res.exit_code, res.output


def _one_line_error(code, out, fragment):
    assert code == 2, out
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), out
    assert fragment in lines[0], out


@pytest.mark.parametrize("backend, fragment", [
    ({"name": "nope"}, "backend.name: unknown fitness backend 'nope'"),
    ({"device": "cuda:7"}, "backend.device cuda:7: "),
    ({"device": "bogus"}, "backend.device bogus: unknown device"),
])
def test_failed_start_leaves_no_run_dir_and_the_corrected_config_runs(test_zoo, tmp_path, backend,
                                                                      fragment):
    import torch

    if backend.get("device") == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(_cfg(test_zoo, backend={"batch_size": 256, **backend})))
    _one_line_error(*_cli("run", bad, "--runs-dir", tmp_path / "runs", "--no-progress"), fragment)
    assert not (tmp_path / "runs" / "t").exists()
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(_cfg(test_zoo, budget=1)))
    code, out = _cli("run", good, "--runs-dir", tmp_path / "runs", "--no-progress")
    assert code == 0 and "run directory:" in out, out


def test_a_run_that_never_evaluated_takes_a_corrected_config(test_zoo, tmp_path):
    # a directory left by a start that failed after it was made (e.g. by an older evomerge,
    # or a crash before the first evaluation): a different config starts it afresh
    RunStore.create(tmp_path / "run", parse_config(_cfg(test_zoo, seed=9))).unlock()
    best = run_search(parse_config(_cfg(test_zoo, budget=2)), tmp_path / "run", progress=False)
    assert best is not None and len(RunStore(tmp_path / "run").read_evals()) == 2
    assert RunStore(tmp_path / "run").config().seed == 0
    # once it evaluated something, a changed config is refused as before
    with pytest.raises(RunError, match=r"changed since it started \(seed\)"):
        run_search(parse_config(_cfg(test_zoo, budget=2, seed=3)), tmp_path / "run", progress=False)


def test_cli_numbers_are_validated_like_config_values(test_zoo, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(test_zoo, budget=2)))
    runs = tmp_path / "runs"
    for value in ("0", "-3"):
        _one_line_error(*_cli("run", cfg, "--runs-dir", runs, "--budget", value, "--no-progress"),
                        "'--budget'")
    assert not runs.exists()
    assert _cli("run", cfg, "--runs-dir", runs, "--no-progress")[0] == 0
    for value in ("0", "-2"):
        _one_line_error(*_cli("export", runs / "t", "--top", value, "--out", tmp_path / "ex"), "'--top'")
        _one_line_error(*_cli("resume", runs / "t", "--budget", value), "'--budget'")
    assert not (tmp_path / "ex").exists()
    assert RunStore(runs / "t").config().budget == 2
    code, out = _cli("status", runs / "t", "--json", "--no-plot")
    assert code == 0 and json.loads(out)["budget"] == 2


def test_run_name_cannot_escape_the_runs_dir(test_zoo, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(test_zoo, budget=1)))
    (tmp_path / "runs").mkdir()
    for name in ("../escaped", "a/b", ".."):
        _one_line_error(*_cli("run", cfg, "--runs-dir", tmp_path / "runs", "--name", name), "run name")
    cfg.write_text(yaml.safe_dump(_cfg(test_zoo, budget=1, name="../from-yaml")))
    _one_line_error(*_cli("run", cfg, "--runs-dir", tmp_path / "runs"), "run name '../from-yaml'")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "runs"]
    assert not any((tmp_path / "runs").iterdir())


def test_resume_force_checks_compatibility_before_writing(test_zoo, tmp_path):
    run = tmp_path / "run"
    run_search(parse_config(_cfg(test_zoo, budget=4)), run, progress=False)
    edited = _cfg(test_zoo, budget=4)
    edited["space"]["params"]["weight"]["init"] = 0.5
    (run / "config.yaml").write_text(yaml.safe_dump(edited))
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    with pytest.raises(RunError, match=r"changed since it started \(space\.params\.weight\.init\)"):
        resume_search(run, progress=False)
    with pytest.raises(RunError, match="different 'x0'"):
        resume_search(run, force=True, budget=6, progress=False)
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert after == before  # nothing written: the run is not stuck
    (run / "config.yaml").write_text(yaml.safe_dump(_cfg(test_zoo, budget=4)))
    resume_search(run, budget=6, progress=False)
    assert len(RunStore(run).read_evals()) == 6


def test_one_line_errors_for_odd_outputs_and_corrupt_run_files(test_zoo, tmp_path):
    run = tmp_path / "run"
    run_search(parse_config(_cfg(test_zoo, budget=1)), run, progress=False)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(test_zoo.experts[0].path), "parameters": {"weight": 0.5}},
        {"model": str(test_zoo.experts[1].path), "parameters": {"weight": 0.5}}]}))
    _one_line_error(*_cli("export", run, "--out", blocker / "x"), "a-file is a file, not a folder")
    _one_line_error(*_cli("merge", recipe, "--out", blocker / "x"), "a-file is a file, not a folder")
    if not os.access("/sys", os.W_OK) or os.geteuid() == 0:  # a read-only filesystem
        try:
            (Path("/sys") / ".evomerge-probe").mkdir()
        except OSError:
            _one_line_error(*_cli("merge", recipe, "--out", "/sys/merged"), "/sys")
    _one_line_error(*_cli("export", run, "--out", tmp_path / "ex", "--device", "cuda:9"),
                    "--device cuda:9: ")
    ckpt = (run / "checkpoint.json").read_bytes()
    (run / "checkpoint.json").write_text("{}")
    _one_line_error(*_cli("resume", run, "--no-progress"), "is not an evomerge checkpoint")
    (run / "checkpoint.json").write_bytes(ckpt)
    (run / "config.yaml").write_text("name: [unclosed\n")
    for args in (("resume", run, "--no-progress"), ("export", run, "--out", tmp_path / "ex"), ("status", run)):
        _one_line_error(*_cli(*args), "config.yaml: not a readable YAML config")


def test_merge_overwrite_never_replaces_a_source(test_zoo, tmp_path):
    import shutil

    src = tmp_path / "expert"
    shutil.copytree(test_zoo.experts[0].path, src)
    before = sorted((p.name, p.stat().st_size) for p in src.iterdir())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [
        {"model": str(src), "parameters": {"weight": 0.5}},
        {"model": str(test_zoo.experts[1].path), "parameters": {"weight": 0.5}}]}))
    for out in (src, tmp_path):  # the source itself, or a folder holding it
        _one_line_error(*_cli("merge", recipe, "--out", out, "--overwrite"), "would replace source")
    assert sorted((p.name, p.stat().st_size) for p in src.iterdir()) == before


def test_space_init_outside_its_bounds_is_refused():
    d = {"name": "t", "models": {"a": "/m/a", "b": "/m/b"}, "tasks": [{"path": "x.yaml"}],
         "space": {"params": {"weight": {"low": 0.0, "high": 1.5, "init": 2.0}}}}
    with pytest.raises(ConfigError, match=r"space\.params\.weight\.init: .*outside \[low, high\]"):
        parse_config(d)
    with pytest.raises(ConfigError):
        parse_config(dict(d, space={"params": {"weight": {"low": 0.0, "high": 1.5, "init": -0.1}}}))
    assert parse_config(dict(d, space={"params": {"weight": {"low": 0.0, "high": 1.5, "init": 1.5}}}))


def test_demo_runs_twice_in_the_same_folder(test_zoo, tmp_path):
    from evomerge.engine.demo import run_demo

    preset = tmp_path / "demo.yaml"
    preset.write_text(yaml.safe_dump(_cfg(test_zoo, name="zoo-demo", budget=2)))
    results = [run_demo(runs_dir=tmp_path / "runs", budget=2, progress=False, preset=preset,
                        build_zoo=lambda *a, **k: test_zoo) for _ in range(2)]
    assert results[0]["export"] == results[1]["export"]
    assert Path(results[1]["export"], "evomerge_recipe.yaml").is_file()
    assert not [p for p in Path(results[1]["export"]).parent.iterdir() if p.name.startswith(".")]
    with pytest.raises(CheckpointError, match="already exists"):  # only the demo refreshes it
        from evomerge.engine.export import export_final

        export_final(tmp_path / "runs/zoo-demo", tmp_path / "runs/zoo-demo/export")


@pytest.mark.slow
def test_deleting_lock_files_does_not_let_a_second_process_drive_the_run(test_zoo, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump(_cfg(test_zoo, budget=2000, optimizer={"name": "random", "seed": 2})))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "evomerge.cli"]
    run = tmp_path / "runs" / "t"
    first = subprocess.Popen([*cmd, "run", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--no-progress"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (run / "evals.jsonl").exists() or len(RunStore(run).read_evals()) < 2:
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.05)
        for p in run.iterdir():  # whatever lock file there might be: delete it
            if p.name.startswith(".") and p.is_file():
                p.unlink()
        for args in (["resume", str(run), "--no-progress"],
                     ["run", str(cfg), "--runs-dir", str(tmp_path / "runs"), "--no-progress"]):
            second = subprocess.run([*cmd, *args], env=env, capture_output=True, text=True, timeout=120)
            assert second.returncode == 2, second.stderr[-2000:]
            assert second.stderr.strip().splitlines()[-1].startswith("error: run ")
            assert "in use by another evomerge process" in second.stderr
        assert first.poll() is None, "the test needs the first run still going"
    finally:
        if first.poll() is None:
            first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
    done = len(RunStore(run).read_evals())
    res = subprocess.run([*cmd, "resume", str(run), "--no-progress", "--budget", str(done + 3)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    ids = [r["id"] for r in RunStore(run).read_evals()]
    assert ids == list(range(done + 3))  # every candidate once, in order: never a second writer
