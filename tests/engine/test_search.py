"""The search loop end to end on the test zoo: runs, caching, failures, SIGKILL + resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from run_configs import read_log, run_cli, zoo_run_config

from evomerge.config import parse_config
from evomerge.engine.runner import run_search
from evomerge.engine.store import RunStore
from evomerge.fitness.backends import register_backend
from evomerge.fitness.backends.hf import HFBackend

ROOT = Path(__file__).resolve().parents[2]


_cfg = zoo_run_config
_log = read_log


@pytest.mark.slow
def test_run_end_to_end_status_and_export(test_zoo, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.engine.export import export_top
    from evomerge.engine.report import plot_fitness, summarize

    cfg = parse_config(_cfg(test_zoo))
    best = run_search(cfg, tmp_path / "run", progress=False)
    recs = _log(tmp_path / "run")
    assert [r["id"] for r in recs] == list(range(8))
    assert all(set(r["per_example"]) == {"cipher_a", "cipher_b"} for r in recs)
    # 200 search examples, 50 of them carved out as the validation split
    assert all(len(r["per_example"]["cipher_a"]) == 150 for r in recs)
    assert best["fitness"] == max(r["fitness"] for r in recs)
    assert json.loads((tmp_path / "run/best.json").read_text())["id"] == best["id"]
    s = summarize(tmp_path / "run")
    assert s["complete"] and s["evaluations"] == 8 and s["generations"] == 2
    # each evaluated candidate records its merge / evaluation split; status shows the means
    for r in recs:
        if not r["cached"]:
            assert r["merge_seconds"] > 0 and r["eval_seconds"] > 0
            assert abs(r["merge_seconds"] + r["eval_seconds"] - r["seconds"]) < 1e-6
    assert 0 < s["merge_seconds"] and 0 < s["eval_seconds"]
    merges = sorted(r["merge_seconds"] for r in recs if not r["cached"])
    assert merges[0] <= s["merge_seconds_median"] <= merges[-1]
    # one-time merge setup (resident task vectors etc.; none here: the zoo's plans round to
    # bf16, which the resident paths leave to the plain one) is only ever part of a
    # worker's first merge, and status reports the merge without it
    fresh = [r for r in recs if not r["cached"]]
    assert all("setup_seconds" not in r for r in fresh[1:])
    assert s["merge_setup_seconds"] == fresh[0].get("setup_seconds")
    assert s["merge_seconds_without_setup"] == pytest.approx(
        np.mean([r["merge_seconds"] - r.get("setup_seconds", 0.0) for r in fresh]))
    assert plot_fitness(tmp_path / "run").stat().st_size > 1000
    (path,) = export_top(tmp_path / "run", 1, tmp_path / "export")
    assert (path / "evomerge_recipe.yaml").exists() and (path / "README.md").exists()
    model = AutoModelForCausalLM.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    out = model.generate(**tok("abc>", return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert out.shape[1] >= 4
    # the exported recipe rebuilds the same weights through `evomerge merge`
    from evomerge.checkpoint import open_checkpoint
    from evomerge.recipe import compile_recipe

    again = compile_recipe(yaml.safe_load((path / "evomerge_recipe.yaml").read_text()))
    assert again.hash() == best["plan_hash"]
    assert open_checkpoint(path).names


_run_cli = run_cli


@pytest.mark.slow
def test_sigkill_at_several_points_then_resume_gives_the_same_run(test_zoo, tmp_path):
    cfg = _cfg(test_zoo, budget=10, optimizer={"name": "cma", "popsize": 4, "seed": 3})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ref = _run_cli(["run", str(path), "--runs-dir", str(tmp_path / "ref"), "--no-progress"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    want = [(r["id"], r["genome"], r["fitness"]) for r in _log(tmp_path / "ref/t")]
    assert len(want) == 10
    for point in ("after_ask:2", "after_log:3", "after_tell:6"):
        runs = tmp_path / point.replace(":", "_")
        crashed = _run_cli(["run", str(path), "--runs-dir", str(runs), "--no-progress"],
                           env={"EVOMERGE_CRASH_AT": point})
        assert crashed.returncode == -9, (point, crashed.stderr[-2000:])
        done_before = len(_log(runs / "t"))
        assert done_before < 10
        res = _run_cli(["resume", str(runs / "t"), "--no-progress"])
        assert res.returncode == 0, (point, res.stderr[-2000:])
        got = [(r["id"], r["genome"], r["fitness"]) for r in _log(runs / "t")]
        assert got == want, point  # same candidates, none lost, none counted twice


@register_backend("flaky_hf_for_tests")
class _FlakyBackend(HFBackend):
    """HF backend that fails every third evaluation: stands in for a broken merge / OOM."""

    calls = 0

    def evaluate(self, tasks, split="search"):
        type(self).calls += 1
        if type(self).calls % 3 == 0:
            raise RuntimeError("simulated evaluation failure")
        return super().evaluate(tasks, split)


@pytest.mark.slow
def test_failed_evaluations_are_told_as_penalty_and_run_goes_on(test_zoo, tmp_path):
    cfg = parse_config(_cfg(test_zoo, optimizer={"name": "random"}, budget=6,
                            backend={"name": "flaky_hf_for_tests", "batch_size": 256}))
    run_search(cfg, tmp_path / "run", progress=False)
    recs = _log(tmp_path / "run")
    assert len(recs) == 6
    failed = [r for r in recs if r["failed"]]
    assert len(failed) == 2
    assert all("simulated evaluation failure" in r["error"] for r in failed)
    assert all(r["fitness"] == -1e9 for r in failed)


@pytest.mark.slow
def test_same_plan_is_never_evaluated_twice(test_zoo, tmp_path):
    # a 2-layer layer-swap space has only 8 distinct plans: 16 candidates must hit the cache
    cfg = parse_config(_cfg(test_zoo, optimizer={"name": "random", "seed": 1}, budget=16,
                            space={"type": "layer_swap", "outer": "expert_a", "inner": "expert_b"}))
    run_search(cfg, tmp_path / "run", progress=False)
    recs = _log(tmp_path / "run")
    assert len(recs) == 16
    evaluated = [r for r in recs if not r["cached"]]
    assert len({r["plan_hash"] for r in evaluated}) == len(evaluated) <= 8
    by_hash = {r["plan_hash"]: r["fitness"] for r in evaluated}
    # the baselines evaluated first share the plan cache (here: the initial point's plan)
    base = RunStore(tmp_path / "run").read_jsonl("baselines.jsonl")
    by_hash.update({r["plan_hash"]: r["fitness"] for r in base if not r["failed"]})
    assert all(by_hash[r["plan_hash"]] == r["fitness"] for r in recs if r["cached"])


def test_bad_inputs_give_one_line_errors(test_zoo, tmp_path):
    cfg = _cfg(test_zoo)
    cfg["models"]["a"] = str(tmp_path / "missing-model")
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(cfg))
    r = _run_cli(["run", str(p), "--runs-dir", str(tmp_path / "runs"), "--no-progress"])
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: model directory not found")

    cfg = _cfg(test_zoo, tasks=[{"path": str(tmp_path / "nope.yaml")}])
    p.write_text(yaml.safe_dump(cfg))
    r = _run_cli(["run", str(p), "--runs-dir", str(tmp_path / "runs"), "--no-progress"])
    assert r.returncode == 2 and "nope.yaml" in r.stderr.strip().splitlines()[-1]

    cfg = _cfg(test_zoo, optimizer={"name": "cmaa"})
    p.write_text(yaml.safe_dump(cfg))
    r = _run_cli(["run", str(p), "--runs-dir", str(tmp_path / "runs"), "--no-progress"])
    assert r.returncode == 2 and "optimizer.name: unknown optimizer 'cmaa'" in r.stderr

    r = _run_cli(["resume", str(tmp_path / "no-run")])
    assert r.returncode == 2 and "no run found" in r.stderr


def test_changed_config_is_refused_on_rerun(test_zoo, tmp_path):
    from evomerge.errors import RunError

    cfg = parse_config(_cfg(test_zoo, budget=1))
    run_search(cfg, tmp_path / "run", progress=False)
    changed = parse_config(_cfg(test_zoo, budget=1, seed=5))
    with pytest.raises(RunError, match="changed since it started"):
        run_search(changed, tmp_path / "run", progress=False)
    # a larger budget is not a change: the run is extended
    run_search(parse_config(_cfg(test_zoo, budget=2)), tmp_path / "run", progress=False)
    assert len(_log(tmp_path / "run")) == 2


def test_empty_task_split_is_refused(test_zoo, tmp_path):
    from evomerge.errors import TaskError

    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "empty.yaml").write_text(
        "name: empty\ndata: empty.jsonl\nprompt: '{input}'\ntarget_field: target\nscoring: exact_match\n")
    cfg = parse_config(_cfg(test_zoo, tasks=[{"path": str(tmp_path / "empty.yaml")}]))
    with pytest.raises(TaskError, match="no examples"):
        run_search(cfg, tmp_path / "run", progress=False)
    assert np.isfinite(1.0)


@register_backend("synthetic_for_tests")
class _SyntheticBackend(HFBackend):
    """Real resident model and real in-place merges; per-example scores are a deterministic
    function of the merged weights (the test zoo's experts all score 0, which can't show
    racing). Example j scores 1 when its fixed pseudo-random level is below p(weights)."""

    def evaluate(self, tasks, split="search"):
        import zlib

        w = self.model.get_input_embeddings().weight
        p = (float(w.double().norm()) * 997.0) % 1.0
        return {t.name: np.array([float(zlib.crc32(e.prompt.encode()) % 1000 / 1000 < p)
                                  for e in t.examples(split)]) for t in tasks}


@pytest.mark.slow
def test_racing_cuts_hopeless_candidates_and_keeps_the_best(test_zoo, tmp_path):
    common = dict(optimizer={"name": "random", "seed": 4}, budget=14,
                  backend={"name": "synthetic_for_tests", "batch_size": 256})
    run_search(parse_config(_cfg(test_zoo, **common)), tmp_path / "full", progress=False)
    raced = parse_config(_cfg(test_zoo, **common, racing={"enabled": True, "first_fraction": 0.25}))
    best = run_search(raced, tmp_path / "race", progress=False)
    full, race = _log(tmp_path / "full"), _log(tmp_path / "race")
    assert [r["genome"] for r in full] == [r["genome"] for r in race]  # same candidates
    cut = [r for r in race if r.get("racing_cut")]
    assert cut, "no candidate was cut"
    assert all(r["examples_evaluated"] < r["examples_total"] for r in cut)
    assert all(r["per_example"] is None for r in cut)
    assert best["id"] == max(full, key=lambda r: r["fitness"])["id"]
    assert not best.get("racing_cut")
    saved = sum(r.get("examples_total", 0) - r.get("examples_evaluated", 0) for r in race)
    assert saved > 0
