"""Baselines, the validation split and the final selection, standard errors (issue 11)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from run_configs import zoo_run_config

from evomerge.config import parse_config
from evomerge.engine.runner import run_search
from evomerge.engine.store import RunStore
from evomerge.fitness.backends import register_backend
from evomerge.fitness.backends.hf import HFBackend

ROOT = Path(__file__).resolve().parents[2]


def _cfg(zoo, **over):
    over.setdefault("report_tasks", [{"path": str(ROOT / "fitness/zoo/cross.yaml")}])
    return zoo_run_config(zoo, **over)


def _cli(args, env=None):
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], env=e,
                          capture_output=True, text=True, timeout=600)


@register_backend("split_synthetic_for_tests")
class _SplitSynthetic(HFBackend):
    """Real resident model and real in-place merges; scores are a deterministic function of
    the merged weights that *disagrees between splits*: on the search split example j scores
    1 when its pseudo-random level is below p, on validation when it is below 1 - p, on
    held-out when below (p + 0.5) mod 1. So the search-best plan is a validation-worst one."""

    def evaluate(self, tasks, split="search"):
        w = self.model.get_input_embeddings().weight
        p = (float(w.double().norm()) * 997.0) % 1.0
        p = {"search": p, "validation": 1.0 - p, "heldout": (p + 0.5) % 1.0}[split]
        return {t.name: np.array([float(zlib.crc32(e.prompt.encode()) % 1000 / 1000 < p)
                                  for e in t.examples(split)]) for t in tasks}


# -- standard errors -----------------------------------------------------------------------
def test_standard_errors_binomial_bootstrap_and_combined():
    from evomerge.fitness.stderr import combined_se, format_score, mean_se

    m, se = mean_se([1, 0, 1, 1])
    assert m == 0.75 and se == pytest.approx(math.sqrt(0.75 * 0.25 / 4))
    assert mean_se([1, 1, 1]) == (1.0, 0.0)
    x = np.random.default_rng(1).uniform(size=400)
    m, se = mean_se(x)
    assert m == pytest.approx(x.mean())
    assert se == pytest.approx(x.std(ddof=1) / math.sqrt(400), rel=0.15)  # bootstrap
    assert mean_se(x) == (m, se)  # deterministic
    assert mean_se([1.0, float("nan"), 0.0])[0] == 0.5  # racing NaNs are ignored
    c = combined_se({"a": [1, 0] * 50, "b": [1] * 75 + [0] * 25, "r": [0, 1]}, {"a": 1.0, "b": 3.0})
    sa, sb = math.sqrt(0.25 / 100), math.sqrt(0.75 * 0.25 / 100)
    assert c["fitness"] == pytest.approx(0.25 * 0.5 + 0.75 * 0.75)
    assert c["se"] == pytest.approx(math.sqrt((0.25 * sa) ** 2 + (0.75 * sb) ** 2))
    assert c["n"] == 200 and c["tasks"]["r"]["n"] == 2  # report-only task summarized alone
    assert format_score(0.835, 0.021) == "83.5 ±2.1"
    assert format_score(-1.25, 0.5) == "-1.2500 ±0.5000"


# -- the validation split --------------------------------------------------------------------
def test_validation_carve_out_is_deterministic_disjoint_and_order_free(tmp_path):
    from evomerge.fitness.tasks import example_key, load_task

    path = ROOT / "fitness/zoo/cipher_a.yaml"
    full = load_task(path)
    assert "validation" not in full.splits
    a, b = load_task(path, validation_fraction=0.25), load_task(path, validation_fraction=0.25)
    va, sa = a.examples("validation"), a.examples("search")
    assert [e.prompt for e in va] == [e.prompt for e in b.examples("validation")]
    assert len(va) == 50 and len(sa) == 150 and a.validation_source == "carve-out 0.25"
    keys_v, keys_s = {example_key(e) for e in va}, {example_key(e) for e in sa}
    assert not keys_v & keys_s
    assert keys_v | keys_s == {example_key(e) for e in full.examples("search")}
    # the search split keeps its order; the held-out split is untouched
    assert [e.prompt for e in sa] == [e.prompt for e in full.examples("search")
                                      if example_key(e) in keys_s]
    assert a.examples("heldout") == full.examples("heldout")
    # reordering the file does not move any example between search and validation
    lines = (path.parent / "cipher_a.search.jsonl").read_text().splitlines()
    (tmp_path / "s.jsonl").write_text("\n".join(reversed(lines)) + "\n")
    spec = yaml.safe_load(path.read_text())
    spec.update(data=str(tmp_path / "s.jsonl"), heldout_data=None)
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(spec))
    rev = load_task(tmp_path / "t.yaml", validation_fraction=0.25)
    assert {example_key(e) for e in rev.examples("validation")} == keys_v
    # a validation file is used as it is, and the search split keeps all its examples
    (tmp_path / "v.jsonl").write_text("\n".join(lines[:7]) + "\n")
    spec.update(data=str(path.parent / "cipher_a.search.jsonl"), validation_data=str(tmp_path / "v.jsonl"))
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(spec))
    own = load_task(tmp_path / "f.yaml", validation_fraction=0.25)
    assert len(own.examples("validation")) == 7 and len(own.examples("search")) == 200
    assert own.validation_source == "file"


@pytest.mark.slow
def test_run_records_its_carve_out(test_zoo, tmp_path):
    run_search(parse_config(_cfg(test_zoo, budget=4)), tmp_path / "run", progress=False)
    splits = json.loads((tmp_path / "run/splits.json").read_text())
    a = splits["tasks"]["cipher_a"]
    assert a["sizes"] == {"search": 150, "validation": 50, "heldout": 200}
    assert a["validation_source"] == "carve-out 0.25" and len(a["validation_keys"]) == 50
    recs = RunStore(tmp_path / "run").read_evals()
    assert all(len(r["per_example"]["cipher_a"]) == 150 for r in recs)


# -- baselines -------------------------------------------------------------------------------
@pytest.mark.slow
def test_baselines_logged_first_never_told_and_resumed_exactly(test_zoo, tmp_path):
    cfg = _cfg(test_zoo, budget=6, optimizer={"name": "cma", "popsize": 3, "seed": 2})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    ref = _cli(["run", str(path), "--runs-dir", str(tmp_path / "ref"), "--no-progress"])
    assert ref.returncode == 0, ref.stderr[-2000:]
    base = RunStore(tmp_path / "ref/t").read_jsonl("baselines.jsonl")
    labels = [r["baseline"] for r in base]
    assert set(labels) == {"initial point", "expert expert_a", "expert expert_b", "expert expert_c",
                           "task arithmetic (uniform, w=1)", "TIES (density 0.5, w=1)"}
    assert all(r["id"] < 0 and r["per_example"] and not r["failed"] for r in base)
    # the initial point of this space is uniform task arithmetic: one plan, evaluated once
    by = {r["baseline"]: r for r in base}
    assert by["initial point"]["plan_hash"] == by["task arithmetic (uniform, w=1)"]["plan_hash"]
    assert sum(not r["cached"] for r in base) == 5
    # evaluated baselines log their merge / evaluation split as candidates do (a worker's
    # one-time merge setup is often paid on them, before the first candidate)
    for r in base:
        if not r["cached"]:
            assert r["merge_seconds"] > 0 and r["eval_seconds"] > 0
            assert r.get("setup_seconds", 0.0) <= r["merge_seconds"]
    # never told: the candidates are those of the same run without baselines
    cfg_nb = dict(cfg, baselines={"enabled": False}, selection={"enabled": False})
    path.write_text(yaml.safe_dump(cfg_nb))
    nb = _cli(["run", str(path), "--runs-dir", str(tmp_path / "nb"), "--no-progress"])
    assert nb.returncode == 0, nb.stderr[-2000:]
    assert not (tmp_path / "nb/t/baselines.jsonl").exists()
    want = [(r["id"], r["genome"], r["fitness"]) for r in RunStore(tmp_path / "ref/t").read_evals()]
    assert [(r["id"], r["genome"], r["fitness"])
            for r in RunStore(tmp_path / "nb/t").read_evals()] == want
    # SIGKILL in the middle of the baselines, then resume: the same logs
    path.write_text(yaml.safe_dump(cfg))
    crashed = _cli(["run", str(path), "--runs-dir", str(tmp_path / "c"), "--no-progress"],
                   env={"EVOMERGE_CRASH_AT": "after_baseline:3"})
    assert crashed.returncode == -9
    assert len(RunStore(tmp_path / "c/t").read_jsonl("baselines.jsonl")) == 3
    res = _cli(["resume", str(tmp_path / "c/t"), "--no-progress"])
    assert res.returncode == 0, res.stderr[-2000:]
    got = RunStore(tmp_path / "c/t").read_jsonl("baselines.jsonl")
    key = ("id", "baseline", "kind", "plan_hash", "fitness", "per_example", "cached", "genome")
    assert [[r[k] for k in key] for r in got] == [[r[k] for k in key] for r in base]
    assert [(r["id"], r["genome"], r["fitness"]) for r in RunStore(tmp_path / "c/t").read_evals()] == want
    # the run ends with the baseline/final table
    assert "final model (validation)" in res.stdout and "best baseline" in res.stdout


def test_space_names_its_untuned_recipes(test_zoo):
    from evomerge.config import SpaceConfig
    from evomerge.spaces import make_space

    models = {"base": str(test_zoo.base.path), **{m.name: str(m.path) for m in test_zoo.experts}}
    space = make_space(SpaceConfig(method="ties", params={"weight": {"low": 0, "high": 2, "init": 1},
                                                          "density": {"low": 0.1, "high": 1, "init": 0.7}}),
                       models, "base")
    bl = space.baselines()
    assert [b.kind for b in bl] == ["initial", "experts", "experts", "experts", "task_arithmetic", "ties"]
    assert bl[0].genome is not None and np.allclose(bl[0].genome, space.initial())
    for b in bl:
        space.compile(b.recipe).validate()
    assert [b.kind for b in space.baselines(["ties"])] == ["ties"]
    no_base = make_space(SpaceConfig(method="linear"), models, None)
    assert {b.kind for b in no_base.baselines()} == {"initial", "experts"}


# -- selection ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_final_is_chosen_on_validation_only(test_zoo, tmp_path):
    from evomerge.engine.selection import final_rows, select_final

    cfg = parse_config(_cfg(test_zoo, budget=12, optimizer={"name": "random", "seed": 5},
                            backend={"name": "split_synthetic_for_tests", "batch_size": 256}))
    run_search(cfg, tmp_path / "run", progress=False)
    rows = final_rows(tmp_path / "run")
    final = json.loads((tmp_path / "run/final.json").read_text())
    assert final["chosen_by"] == "validation"
    (fin,) = [r for r in rows if r["final"]]
    val = {r["label"]: r["splits"]["validation"]["fitness"] for r in rows}
    assert val[fin["label"]] == max(val.values())
    top = next(r for r in rows if r.get("search_rank") == 1)
    assert top["splits"]["search"]["fitness"] == max(
        r["fitness"] for r in RunStore(tmp_path / "run").read_evals())
    assert fin is not top  # search-best is not validation-best in this landscape
    # held-out is scored for the final and the baselines only, never for the others
    for r in rows:
        has = r["splits"].get("heldout") is not None
        assert has == (r["final"] or r["role"] == "baseline"), r["label"]
    assert "cross" in fin["report"]  # report tasks are scored (held-out split)
    assert all(r["splits"]["validation"]["se"] > 0 or r["splits"]["validation"]["fitness"] in (0, 1)
               for r in rows)
    # selecting again scores nothing new and gives the same final
    n = len(RunStore(tmp_path / "run").read_jsonl("rescore.jsonl"))
    again = select_final(tmp_path / "run")
    assert again["final"] == final["final"]
    assert len(RunStore(tmp_path / "run").read_jsonl("rescore.jsonl")) == n
    # the CMA-free run has no optimizer estimate; top-k is the configured 5
    assert sum(r["role"] == "candidate" for r in rows) == 5
    assert not any(r["role"] == "estimate" for r in rows)


def test_cma_estimate_is_its_mean_and_default_popsize_follows_the_dimension():
    from evomerge.optim import make_optimizer
    from evomerge.optim.base import Optimizer

    opt = make_optimizer("cma", lower=np.zeros(15), upper=np.ones(15), x0=np.full(15, 0.5), sigma0=0.2)
    assert opt.popsize == 4 + int(3 * math.log(15))  # pycma's rule: 12
    assert np.allclose(opt.estimate(), 0.5)
    cands = opt.ask(opt.popsize)
    from evomerge.optim import Result

    opt.tell([Result(c.id, -float(np.sum((c.genome - 0.2) ** 2))) for c in cands])
    assert np.allclose(opt.estimate(), opt.mean) and not np.allclose(opt.estimate(), 0.5)
    assert make_optimizer("random", lower=np.zeros(3), upper=np.ones(3)).estimate() is None
    assert Optimizer.estimate is not type(opt).estimate


# -- eval TARGET --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def finished_run(test_zoo, tmp_path_factory):
    d = tmp_path_factory.mktemp("evalrun")
    run_search(parse_config(_cfg(test_zoo, budget=4)), d / "run", progress=False)
    return d / "run"


@pytest.mark.slow
def test_eval_every_target_kind(test_zoo, finished_run, tmp_path):
    from evomerge.engine.evaltarget import eval_target

    task = str(ROOT / "fitness/zoo/cipher_a.yaml")
    expert = str(test_zoo.experts[0].path)
    (row,) = eval_target(expert, split="heldout", tasks=[task])
    assert row["splits"]["heldout"]["n"] == 200 and row["splits"]["heldout"]["se"] is not None
    # an evomerge recipe and a mergekit recipe
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(test_zoo.base.path),
        "models": [{"model": str(m.path), "parameters": {"weight": 0.5}} for m in test_zoo.experts]}))
    (row,) = eval_target(str(tmp_path / "r.yaml"), split="validation", tasks=[task])
    assert row["role"] == "recipe" and row["splits"]["validation"]["n"] == 50
    # an evomerge recipe (short source keys), as a run writes it
    final = json.loads((finished_run / "final.json").read_text())
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(final["recipe"]))
    (row,) = eval_target(str(tmp_path / "e.yaml"), split="heldout", tasks=[task])
    assert row["splits"]["heldout"]["n"] == 200
    # runs: final, top-K, baselines (scored through the run's cache)
    rows = eval_target(str(finished_run), split="validation")
    assert len(rows) == 1 and rows[0]["label"].endswith("[final]")
    assert len(eval_target(f"{finished_run}:top-2", split="search")) == 2
    base = eval_target(f"{finished_run}:baselines", split="heldout")
    assert len(base) == 6 and all("cross" in r["report"] for r in base)
    # a run's recipes on other tasks
    (row,) = eval_target(f"{finished_run}:top-1", split="search", tasks=[str(ROOT / "fitness/zoo/cross.yaml")])
    assert set(row["splits"]["search"]["tasks"]) == {"cross"}


@pytest.mark.slow
def test_eval_cli_table_json_and_one_line_errors(test_zoo, finished_run, tmp_path):
    r = _cli(["eval", f"{finished_run}:top-2", "--split", "validation", "--json"])
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(r.stdout)
    assert len(rows) == 2 and all("se" in row["splits"]["validation"] for row in rows)
    r = _cli(["eval", str(finished_run), "--split", "heldout"])
    assert r.returncode == 0 and "±" in r.stdout
    (tmp_path / "notrecipe.yaml").write_text("name: x\n")
    (tmp_path / "empty").mkdir()
    task = str(ROOT / "fitness/zoo/cipher_a.yaml")
    bad = [
        [str(tmp_path / "missing")],
        [str(tmp_path / "empty"), "--tasks", task],
        [str(test_zoo.base.path)],  # no --tasks
        [str(tmp_path / "notrecipe.yaml"), "--tasks", task],
        [f"{finished_run}:top-two"],
        [f"{tmp_path}/nope:top-2"],
        [str(test_zoo.base.path), "--tasks", str(tmp_path / "nope.yaml")],
    ]
    for args in bad:
        r = _cli(["eval", *args])
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), (args, r.stderr)


@pytest.mark.slow
def test_export_defaults_to_the_final_and_status_shows_baseline(finished_run, tmp_path):
    r = _cli(["export", str(finished_run), "--out", str(tmp_path / "out")])
    assert r.returncode == 0, r.stderr[-2000:]
    card = (tmp_path / "out/final/README.md").read_text()
    assert "validation" in card
    r = _cli(["status", str(finished_run), "--json", "--no-plot"])
    s = json.loads(r.stdout)
    assert s["best_baseline"]["se"] is not None and s["best"]["split"] == "search"
    assert s["final"]["chosen_by"] == "validation" and "heldout" in s["final"]["splits"]
