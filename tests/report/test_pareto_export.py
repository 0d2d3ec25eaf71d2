"""`evomerge export RUN --pareto / --prefer` on a real short NSGA-II run over the test zoo."""

from __future__ import annotations

import json

import pytest
import yaml
from run_configs import run_cli as _run_cli
from run_configs import zoo_run_config as _cfg

from evomerge.engine.objectives import Objectives
from evomerge.engine.store import RunStore
from evomerge.report.front import front_of_records, run_front


def _nsga_run(zoo, root, **over):
    path = root / "run.yaml"
    path.write_text(yaml.safe_dump(_cfg(zoo, optimizer={"name": "nsga2", "popsize": 4, "seed": 1},
                                        **over)))
    res = _run_cli(["run", str(path), "--runs-dir", str(root / "runs"), "--no-progress"])
    assert res.returncode == 0, res.stderr[-2000:]
    return root / "runs" / "t"


@pytest.fixture(scope="module")
def nsga_run(test_zoo, tmp_path_factory):
    """A run whose tasks have a validation carve-out (the default)."""
    return _nsga_run(test_zoo, tmp_path_factory.mktemp("pareto_run"), budget=8)


def _validation_front(run):
    from evomerge.report.pareto_export import validation_front

    return validation_front(run, run_front(run))


def test_pareto_export_writes_every_member_and_front_json(nsga_run, tmp_path):
    res = _run_cli(["export", str(nsga_run), "--pareto", "--out", str(tmp_path / "o")])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "search split" not in res.stdout
    rescored = (nsga_run / "rescore.jsonl").read_text().splitlines()
    search_ids = {int(r["id"]) for r in run_front(nsga_run).members}
    front = _validation_front(nsga_run)  # from the cache the export wrote
    assert (nsga_run / "rescore.jsonl").read_text().splitlines() == rescored
    doc = json.loads((tmp_path / "o/pareto/front.json").read_text())
    assert doc["split"] == "validation" and doc["objectives"] == ["cipher_a", "cipher_b"]
    assert [m["id"] for m in doc["members"]] == [int(r["id"]) for r in front.members]
    assert {m["id"] for m in doc["members"]} <= search_ids
    for m, pts in zip(doc["members"], front.points):
        assert list(m["objectives"].values()) == pytest.approx(pts.tolist())
        assert all(s is not None and s >= 0 for s in m["se"].values())
        d = tmp_path / "o/pareto" / m["dir"]
        assert (d / "config.json").exists() and list(d.glob("*.safetensors"))
        card = (d / "README.md").read_text()
        assert "## Trade-off" in card and "validation" in card and "±" in card
        if len(doc["members"]) > 1:
            assert "Neighbouring front members" in card
    assert not [p for p in (tmp_path / "o").iterdir() if p.name.startswith(".")]  # no partial left
    again = _run_cli(["export", str(nsga_run), "--pareto", "--out", str(tmp_path / "o")])
    assert again.returncode != 0 and "already exists" in again.stderr
    redo = _run_cli(["export", str(nsga_run), "--pareto", "--out", str(tmp_path / "o"), "--overwrite"])
    assert redo.returncode == 0, redo.stderr[-2000:]
    assert (nsga_run / "rescore.jsonl").read_text().splitlines() == rescored  # nothing re-scored


@pytest.fixture(scope="module")
def search_run(test_zoo, tmp_path_factory):
    """A run without a validation split."""
    return _nsga_run(test_zoo, tmp_path_factory.mktemp("search_run"), budget=4,
                     selection={"validation_fraction": 0.0})


def test_without_validation_the_front_is_on_the_search_split(search_run, tmp_path):
    run = search_run
    res = _run_cli(["export", str(run), "--pareto", "--out", str(tmp_path / "o")])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "front is on the search split" in res.stdout
    doc = json.loads((tmp_path / "o/pareto/front.json").read_text())
    assert doc["split"] == "search" and "search split" in doc["note"]
    assert [m["id"] for m in doc["members"]] == [int(r["id"]) for r in run_front(run).members]


def test_prefer_picks_the_best_member_for_each_preference(nsga_run, tmp_path):
    front = _validation_front(nsga_run)
    for pref, col in (("cipher_a=1,cipher_b=0", 0), ("cipher_a=0,cipher_b=1", 1)):
        want = max(range(len(front.members)),
                   key=lambda i: (front.points[i, col], -front.members[i]["id"]))
        want_id = front.members[want]["id"]
        out = tmp_path / f"p{col}"
        res = _run_cli(["export", str(nsga_run), "--prefer", pref, "--out", str(out)])
        assert res.returncode == 0, res.stderr[-2000:]
        assert [p.name for p in out.iterdir()] == [f"preferred-cand{want_id}"]
        card = (out / f"preferred-cand{want_id}/README.md").read_text()
        assert "picked for the stated preference" in card
    res = _run_cli(["export", str(nsga_run), "--pareto", "--prefer", "cipher_b=1",
                    "--out", str(tmp_path / "both")])
    assert res.returncode == 0, res.stderr[-2000:]
    doc = json.loads((tmp_path / "both/pareto/front.json").read_text())
    marked = [m for m in doc["members"] if m["preferred"]]
    assert len(marked) == 1 and marked[0]["objectives"]["cipher_b"] == max(
        m["objectives"]["cipher_b"] for m in doc["members"])


@pytest.mark.parametrize("pref", ["nope=1", "cipher_a=-1", "cipher_a=nan", "cipher_a=x",
                                  "cipher_a=", "=1", "cipher_a=0"])
def test_bad_prefer_is_one_line_exit_2_and_writes_nothing(nsga_run, tmp_path, pref):
    from click.testing import CliRunner

    from evomerge.cli import main

    out = tmp_path / "o"
    res = CliRunner().invoke(main, ["export", str(nsga_run), "--prefer", pref, "--out", str(out)])
    assert res.exit_code == 2, (pref, res.output)
    assert len(res.output.strip().splitlines()) == 1 and "--prefer" in res.output
    assert not out.exists()


def test_a_racing_cut_candidate_is_never_on_the_front_nor_exported(nsga_run):
    recs = RunStore(nsga_run).read_evals()
    obj = Objectives.of_run(RunStore(nsga_run).config(), recs)
    # a cut record whose partial scores dominate everything must still be left out
    cut = dict(recs[0], id=999, plan_hash="cut", racing_cut=True,
               scores={t: 10.0 for t in recs[0]["scores"]})
    front = front_of_records([*recs, cut], obj)
    assert 999 not in [int(r["id"]) for r in front.members] and 999 not in front.all_ids
    assert [r["id"] for r in front.members] == [r["id"] for r in front_of_records(recs, obj).members]


def test_pareto_cut_only_when_dominated_on_every_objective():
    import numpy as np

    from evomerge.fitness.racing import pareto_cut

    sizes, weights = {"a": 400, "b": 400}, {"a": 1.0, "b": 1.0}
    groups = [["a"], ["b"]]
    # 200 of 400 examples seen: bad on a (all 0), perfect on b (all 1)
    obs = {"a": np.zeros(200), "b": np.ones(200)}
    front_good_a = [[0.9, 0.2]]  # better on a only: the candidate may still be non-dominated
    assert not pareto_cut(obs, sizes, weights, groups, front_good_a, 0.05)
    # a scalar rule against the best mean (0.55) would cut it: its scalar bound is lower
    from evomerge.fitness.racing import upper_confidence_bound
    assert upper_confidence_bound({"a": np.zeros(200), "b": np.zeros(200)}, sizes, weights, 0.05)[1] < 0.55
    obs_bad = {"a": np.zeros(200), "b": np.zeros(200)}
    assert pareto_cut(obs_bad, sizes, weights, groups, [[0.9, 0.9]], 0.05)
    assert not pareto_cut(obs_bad, sizes, weights, groups, [], 0.05)


def test_multiobjective_racing_run_never_fronts_a_cut_candidate(test_zoo, tmp_path):
    from evomerge.config import parse_config
    from evomerge.engine.runner import run_search

    cfg = parse_config(_cfg(test_zoo, optimizer={"name": "nsga2", "popsize": 4, "seed": 2}, budget=8,
                            racing={"enabled": True, "first_fraction": 0.25}))
    run_search(cfg, tmp_path / "run", progress=False)
    recs = RunStore(tmp_path / "run").read_evals()
    front = run_front(tmp_path / "run")
    cut_ids = {r["id"] for r in recs if r.get("racing_cut")}
    assert front.members and not cut_ids & {r["id"] for r in front.members}
    assert not cut_ids & set(front.all_ids)


def test_prefer_picks_different_members_of_a_spread_front(search_run, tmp_path):
    """The test zoo's models all score alike, so give a copy of the run a spread front: its
    log's scores rewritten (per-example scores with those means) for three candidates."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(search_run, run, ignore=shutil.ignore_patterns("tensorboard", "*.lock"))
    want = {0: (0.9, 0.1), 1: (0.1, 0.9), 2: (0.5, 0.6)}
    lines = []
    for rec in RunStore(run).read_evals():
        a, b = want.get(rec["id"], (0.0, 0.0))
        rec["scores"] = {"cipher_a": a, "cipher_b": b}
        rec["per_example"] = {"cipher_a": [1.0] * int(a * 10) + [0.0] * (10 - int(a * 10)),
                              "cipher_b": [1.0] * int(b * 10) + [0.0] * (10 - int(b * 10))}
        lines.append(json.dumps(rec))
    (run / "evals.jsonl").write_text("\n".join(lines) + "\n")
    assert sorted(int(r["id"]) for r in run_front(run).members) == [0, 1, 2]
    for pref, cid in (("cipher_a=1", 0), ("cipher_b=1", 1), ("cipher_a=1,cipher_b=1", 2),
                      ("cipher_a=3,cipher_b=1", 0)):
        out = tmp_path / pref.replace(",", "_").replace("=", "")
        res = _run_cli(["export", str(run), "--prefer", pref, "--out", str(out)])
        assert res.returncode == 0, res.stderr[-2000:]
        assert [p.name for p in out.iterdir()] == [f"preferred-cand{cid}"], pref
    card = (out / "preferred-cand0/README.md").read_text()
    assert "0.9 ± 0.1" in card and "| 2 |" in card  # its scores ± SE and its neighbour
