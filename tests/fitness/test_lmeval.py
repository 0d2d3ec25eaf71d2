"""lm-eval-harness tasks as fitness: scored on the resident model, in place, no disk, no hub.

Tests that need lm-eval skip cleanly without it (``pip install 'evomerge[lmeval]'``); the
guard against tuning on a report split reads task YAMLs only and always runs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from evomerge.config import parse_config
from evomerge.errors import ConfigError, TaskError
from evomerge.fitness import load_task

ROOT = Path(__file__).resolve().parents[2]
LMEVAL = ROOT / "fitness" / "lmeval"
MC = LMEVAL / "cipher_mc.yaml"
GEN = LMEVAL / "cipher.yaml"


@pytest.fixture(scope="module")
def lm_eval():
    return pytest.importorskip("lm_eval")


def _write(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in data))
    else:
        path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def _native_mc(tmp_path: Path, split: str = "validation") -> Path:
    """evomerge's own multiple-choice task on the very JSONL the lm-eval task reads."""
    return _write(tmp_path / f"native_mc_{split}.yaml", {
        "name": f"native_mc_{split}",
        "data": str(LMEVAL / "data" / f"cipher_mc.{split}.jsonl"),
        "prompt": "{input}>",
        "scoring": "multiple_choice",
    })


@pytest.fixture(scope="module")
def zoo_backend(test_zoo):
    from evomerge.fitness.backends.hf import HFBackend

    return HFBackend(str(test_zoo.experts[0].path), batch_size=64)


@pytest.fixture(scope="module")
def mc_task(lm_eval):
    return load_task(MC)


# -- loading ----------------------------------------------------------------------------


def test_lmeval_task_loads_one_example_per_document(lm_eval):
    mc, gen = load_task(MC), load_task(GEN)
    assert (mc.name, mc.spec.output_type, mc.spec.needs_generation) == ("lmeval_cipher_mc", "multiple_choice", False)
    assert (gen.name, gen.spec.output_type, gen.spec.needs_generation) == ("lmeval_cipher", "generate_until", True)
    records = [json.loads(x) for x in (LMEVAL / "data/cipher_mc.validation.jsonl").read_text().splitlines()]
    ex = mc.examples("search")
    assert len(ex) == len(records) == 240 and len(mc.examples("heldout")) == 240
    assert ex[7].prompt == records[7]["input"] + ">"
    assert ex[7].choices == tuple(records[7]["choices"]) and ex[7].answer == records[7]["answer"]
    assert [e.record["doc_id"] for e in ex[:3]] == [0, 1, 2]
    # the generation task reads the zoo's own files: same prompts and targets as combined.yaml
    native = load_task(ROOT / "fitness/zoo/combined.yaml")
    for split in ("search", "heldout"):
        assert [(e.prompt, e.target) for e in gen.examples(split)] == [
            (e.prompt, e.target) for e in native.examples(split)
        ]
    assert mc.fingerprint() == load_task(MC).fingerprint() != gen.fingerprint()


def test_num_examples_and_missing_split(lm_eval, tmp_path):
    raw = yaml.safe_load(MC.read_text())
    raw.update(include_path=str(LMEVAL / "tasks"), num_examples=5)
    raw.pop("heldout_split")
    t = load_task(_write(tmp_path / "five.yaml", raw))
    assert len(t.examples("search")) == 5
    with pytest.raises(TaskError, match="has no heldout split .* sets no heldout_split"):
        t.examples("heldout")


def test_bad_wrappers_fail_with_one_line(lm_eval, tmp_path):
    base = {"scoring": "lm_eval", "lm_eval_task": "zoo_cipher_mc",
            "include_path": str(LMEVAL / "tasks"), "split": "validation"}
    cases = [
        ({"lm_eval_task": "no_such_task", "include_defaults": False}, "unknown lm-eval task 'no_such_task'"),
        ({"split": None}, "split: required"),
        ({"split": "train"}, "no split 'train'|split 'train'"),
        ({"metric": "f1"}, "metric: 'f1' is not a metric of lm-eval task 'zoo_cipher_mc' \\(acc, acc_norm\\)"),
        ({"filter": "strict"}, "filter: 'strict' is not a filter"),
        ({"include_path": "nowhere"}, "include_path: folder not found"),
        ({"num_exampels": 3}, "num_exampels: unknown field"),
    ]
    for i, (over, pattern) in enumerate(cases):
        raw = {**base, **over}
        raw = {k: v for k, v in raw.items() if v is not None}
        path = _write(tmp_path / f"bad{i}.yaml", raw)
        with pytest.raises(TaskError, match=pattern) as err:
            load_task(path)
        assert "\n" not in str(err.value)


def test_sampling_tasks_are_refused_and_hub_data_is_never_downloaded(lm_eval, tmp_path):
    lm_cfg = yaml.safe_load((LMEVAL / "tasks/zoo_cipher.yaml").read_text())
    lm_cfg["task"] = "sampled_cipher"
    lm_cfg["dataset_kwargs"]["data_files"] = {
        k: str((LMEVAL / "tasks" / v).resolve()) for k, v in lm_cfg["dataset_kwargs"]["data_files"].items()
    }
    lm_cfg["generation_kwargs"].update(do_sample=True, temperature=0.7)
    _write(tmp_path / "tasks" / "sampled.yaml", lm_cfg)
    hub = {"task": "hub_task", "dataset_path": "evomerge-nonexistent-org/never-downloaded",
           "output_type": "generate_until", "test_split": "test", "doc_to_text": "{{q}}",
           "doc_to_target": "{{a}}", "metric_list": [{"metric": "exact_match"}]}
    _write(tmp_path / "tasks" / "hub.yaml", hub)
    for name, pattern in (("sampled_cipher", "samples .* deterministic"),
                          ("hub_task", "cannot build lm-eval task .hub_task.*OfflineModeIsEnabled")):
        wrapper = _write(tmp_path / f"{name}.yaml", {
            "scoring": "lm_eval", "lm_eval_task": name, "include_path": "tasks", "split": "test"})
        with pytest.raises(TaskError, match=pattern):
            load_task(wrapper)
    import os

    assert os.environ["HF_HUB_OFFLINE"] == "1" and os.environ["HF_DATASETS_OFFLINE"] == "1"


def test_missing_lm_eval_gives_install_hint(tmp_path, monkeypatch):
    from evomerge.fitness import lmeval

    lmeval.require_lm_eval.cache_clear()
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    try:
        with pytest.raises(TaskError, match=r"pip install 'evomerge\[lmeval\]'"):
            load_task(MC)
    finally:
        lmeval.require_lm_eval.cache_clear()


# -- scoring on the resident model -------------------------------------------------------


@pytest.mark.parametrize("model", ["hflm", "backend"])
def test_multiple_choice_agrees_with_native_backend(lm_eval, zoo_backend, mc_task, tmp_path, model):
    """lm-eval's acc per document == evomerge's multiple_choice per example, same weights,
    through lm-eval's own HFLM on the resident module and through the backend's primitives."""
    native = load_task(_native_mc(tmp_path))
    want = zoo_backend.evaluate([native])[native.name]
    mc_task.spec.model = model
    try:
        got = zoo_backend.evaluate([mc_task])[mc_task.name]
    finally:
        mc_task.spec.model = "auto"
    assert got.shape == (240,) and got.dtype == np.float64
    assert 0.0 < got.mean() < 1.0  # both outcomes occur: the comparison is not vacuous
    np.testing.assert_array_equal(got, want)
    held = zoo_backend.evaluate([mc_task], split="heldout")[mc_task.name]
    native_held = load_task(_native_mc(tmp_path, "test"))
    np.testing.assert_array_equal(held, zoo_backend.evaluate([native_held])[native_held.name])


def test_racing_slices_score_the_same_documents_in_their_order(lm_eval, zoo_backend, mc_task):
    from evomerge.fitness.racing import _sliced

    full = zoo_backend.evaluate([mc_task])[mc_task.name]
    idx = np.array([200, 3, 57, 3 + 1, 119, 0])  # unsorted on purpose
    part = zoo_backend.evaluate([_sliced(mc_task, "search", idx)])[mc_task.name]
    np.testing.assert_array_equal(part, full[idx])


def test_generation_agrees_with_native_greedy_loop(lm_eval, tmp_path):
    """lm-eval generate_until (HFLM's model.generate on the resident module, and the
    backend route) gives the same greedy text as evomerge's loop: scored against targets
    that are the loop's own outputs on even documents and impossible on odd ones."""
    from tiny_models import make_tiny_llama
    from transformers import AutoModelForCausalLM

    from evomerge.fitness.backends.hf import HFBackend

    # a random char-level Llama that writes text instead of stopping at once
    path = make_tiny_llama(tmp_path / "model", seed=3, hidden=32, vocab=48)
    model = AutoModelForCausalLM.from_pretrained(path)
    import torch

    with torch.no_grad():
        model.model.embed_tokens.weight[:4] = 0.0  # specials never win the argmax
        model.model.embed_tokens.weight.mul_(20.0)
    model.save_pretrained(path)
    backend = HFBackend(str(path), batch_size=32)

    records = [json.loads(x) for x in (ROOT / "fitness/zoo/combined.search.jsonl").read_text().splitlines()][:60]
    outs = backend.generate([r["input"] + ">" for r in records], 5)
    assert len(set(outs)) > 3 and all(outs)
    rows = [{"input": r["input"], "target": o if i % 2 == 0 else "~impossible~"}
            for i, (r, o) in enumerate(zip(records, outs))]
    _write(tmp_path / "data" / "gen.jsonl", rows)
    _write(tmp_path / "tasks" / "tiny_gen.yaml", {
        "task": "tiny_gen", "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"validation": "../data/gen.jsonl"}},  # relative: resolved
        "validation_split": "validation", "output_type": "generate_until",
        "doc_to_text": "{{input}}>", "doc_to_target": "{{target}}",
        "generation_kwargs": {"until": ["</s>"], "max_gen_toks": 5, "do_sample": False},
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
    })
    native = load_task(_write(tmp_path / "native.yaml", {
        "name": "native_gen", "data": "data/gen.jsonl", "prompt": "{input}>", "max_new_tokens": 5}))
    expected = np.array([1.0 if i % 2 == 0 else 0.0 for i in range(60)])
    np.testing.assert_array_equal(backend.evaluate([native])["native_gen"], expected)
    for model_route in ("hflm", "backend"):
        wrapper = load_task(_write(tmp_path / f"lm_{model_route}.yaml", {
            "name": "lm_gen", "scoring": "lm_eval", "lm_eval_task": "tiny_gen",
            "include_path": "tasks", "split": "validation", "model": model_route}))
        np.testing.assert_array_equal(backend.evaluate([wrapper])["lm_gen"], expected)


def test_in_place_write_changes_the_lmeval_score_without_disk(lm_eval, test_zoo, mc_task, tmp_path, monkeypatch):
    """Materializing another plan into the resident module changes lm-eval's scores to
    exactly the new weights' native scores; nothing is saved or loaded meanwhile."""
    import safetensors.torch
    import torch
    import transformers

    from evomerge.fitness import lmeval
    from evomerge.fitness.backends.hf import HFBackend
    from evomerge.materialize import Materializer
    from evomerge.recipe import compile_recipe

    backend = HFBackend(str(test_zoo.experts[0].path), batch_size=64)
    native = load_task(_native_mc(tmp_path))
    before = backend.evaluate([mc_task])[mc_task.name]
    model_id = id(backend.model)
    files = {p: p.stat().st_mtime_ns for p in Path(test_zoo.root).rglob("*") if p.is_file()}

    def refuse(*_a, **_k):
        raise AssertionError("disk round trip during an in-place evaluation")

    for obj, attr in ((torch, "save"), (torch, "load"), (safetensors.torch, "save_file"),
                      (safetensors.torch, "load_file"),
                      (transformers.PreTrainedModel, "save_pretrained"),
                      (transformers.PreTrainedModel, "from_pretrained")):
        monkeypatch.setattr(obj, attr, refuse)

    other = test_zoo.experts[1]
    plan = compile_recipe({"sources": {other.name: str(other.path)}, "merge_method": "linear",
                           "models": [{"model": other.name, "parameters": {"weight": 1.0}}]})
    backend.load_plan(plan, Materializer(device=None))
    assert id(backend.model) == model_id
    lm = lmeval.resident_hflm(backend.model, backend.tokenizer)
    assert lm.model is backend.model
    after = backend.evaluate([mc_task])[mc_task.name]
    assert not np.array_equal(after, before)
    np.testing.assert_array_equal(after, backend.evaluate([native])[native.name])
    assert files == {p: p.stat().st_mtime_ns for p in Path(test_zoo.root).rglob("*") if p.is_file()}


def test_lmeval_task_through_the_api_backend_on_a_real_server(lm_eval, test_zoo, tmp_path):
    """Backends without a resident module (here the API backend against `evomerge serve`
    on 127.0.0.1) answer lm-eval's requests through their primitives: same per-document
    scores as lm-eval's HFLM on the same weights in process. ``model: hflm`` is refused."""
    from evomerge.fitness import make_backend
    from evomerge.serve import make_server, start_in_thread

    raw = {**yaml.safe_load(MC.read_text()), "include_path": str(LMEVAL / "tasks"), "num_examples": 40}
    task = load_task(_write(tmp_path / "mc40.yaml", raw))
    model_dir = test_zoo.experts[0].path
    hf = make_backend("hf", model_dir=str(model_dir), batch_size=64)
    server = make_server(model_dir, port=0)
    start_in_thread(server)
    try:
        api = make_backend("api", base_url=server.url, prompts_per_request=16, concurrency=2)
        want = hf.evaluate([task])[task.name]
        got = api.evaluate([task])[task.name]
        assert got.shape == (40,) and 0.0 < want.mean() < 1.0
        np.testing.assert_array_equal(got, want)
        task.spec.model = "hflm"
        with pytest.raises(TaskError, match="model: hflm needs the hf backend"):
            api.evaluate([task])
        api.close()
    finally:
        server.stop()
        hf.close()


# -- the guard against tuning on a report split -----------------------------------------


def _guard_cfg(test_zoo_paths, tasks, report, **over):
    return {
        "name": "g",
        "models": test_zoo_paths,
        "tasks": [{"path": str(p)} for p in tasks],
        "report_tasks": [{"path": str(p)} for p in report],
        **over,
    }


def test_report_split_guard_refuses_and_force_allows(tmp_path):
    models = {"a": str(tmp_path / "a"), "b": str(tmp_path / "b")}  # not opened by the guard
    zoo = ROOT / "fitness" / "zoo"
    # lm-eval: a report task holding out the very split the search uses
    report = _write(tmp_path / "report.yaml", {
        "scoring": "lm_eval", "lm_eval_task": "zoo_cipher", "include_path": str(LMEVAL / "tasks"),
        "heldout_split": "validation"})
    with pytest.raises(ConfigError) as err:
        parse_config(_guard_cfg(models, [zoo / "cipher_a.yaml", GEN], [report]))
    msg = str(err.value)
    assert "tasks[1]" in msg and "report_tasks[0]" in msg and "'zoo_cipher' split 'validation'" in msg
    assert str(GEN) in msg and str(report) in msg and "allow_tuning_on_report_split" in msg
    forced = parse_config(_guard_cfg(models, [GEN], [report], allow_tuning_on_report_split=True))
    assert forced.allow_tuning_on_report_split
    # the fingerprint does not depend on the override (it changes no score)
    test_split = _write(tmp_path / "report_test.yaml", {
        "scoring": "lm_eval", "lm_eval_task": "zoo_cipher", "heldout_split": "test"})
    ok = parse_config(_guard_cfg(models, [GEN], [test_split]))
    assert ok.fingerprint() == parse_config(_guard_cfg(models, [GEN], [test_split],
                                                       allow_tuning_on_report_split=True)).fingerprint()
    # evomerge tasks: the same data file searched and reported (here: the same YAML)
    with pytest.raises(ConfigError, match=r"tasks\[0\] .* data file .*cipher_a.search.jsonl.* report_tasks\[0\]"):
        parse_config(_guard_cfg(models, [zoo / "cipher_a.yaml"], [zoo / "cipher_a.yaml"]))
    # a different YAML over the search file of cipher_a is caught too (files, not names)
    alias = _write(tmp_path / "alias.yaml", {"name": "alias", "data": str(zoo / "cipher_a.search.jsonl")})
    with pytest.raises(ConfigError, match="report_tasks\\[1\\]"):
        parse_config(_guard_cfg(models, [zoo / "cipher_a.yaml"], [zoo / "cross.yaml", alias]))
    # held-out data of a search task as a report, another task as report: fine
    held = _write(tmp_path / "held.yaml", {"name": "held", "data": str(zoo / "cipher_a.heldout.jsonl")})
    parse_config(_guard_cfg(models, [zoo / "cipher_a.yaml"], [held, zoo / "cross.yaml"]))
    # the lm-eval wrapper and evomerge's combined.yaml read the same files, but names differ:
    # the guard compares lm-eval (task, split) pairs and evomerge data files separately
    parse_config(_guard_cfg(models, [zoo / "combined.yaml"], [test_split]))


def test_demo_presets_pass_the_guard():
    from evomerge.config import load_config

    for preset in sorted((ROOT / "search_spaces").glob("*.yaml")):
        load_config(preset)


# -- a search on an lm-eval task --------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("racing", [False, True])
def test_search_runs_on_an_lmeval_task(lm_eval, test_zoo, tmp_path, racing):
    from evomerge.engine.runner import run_search
    from evomerge.engine.store import RunStore

    task = _write(tmp_path / "mc60.yaml", {
        "name": "mc60", "scoring": "lm_eval", "lm_eval_task": "zoo_cipher_mc",
        "include_path": str(LMEVAL / "tasks"), "split": "validation", "heldout_split": "test",
        "num_examples": 60})
    cfg = parse_config({
        "name": "lmeval",
        "models": {"base": str(test_zoo.base.path), **{m.name: str(m.path) for m in test_zoo.experts}},
        "base_model": "base",
        "space": {"type": "parameter", "method": "task_arithmetic", "layer_groups": 1},
        "optimizer": {"name": "cma", "popsize": 3, "seed": 1},
        "budget": 6,
        "tasks": [{"path": str(task)}, {"path": str(ROOT / "fitness/zoo/cipher_a.yaml"), "weight": 0.5}],
        "report_tasks": [{"path": str(ROOT / "fitness/zoo/cross.yaml")}],
        "backend": {"batch_size": 64},
        "executor": {"name": "local", "num_threads": 1},
        "racing": {"enabled": racing, "first_fraction": 0.25},
    })
    best = run_search(cfg, tmp_path / "run", progress=False)
    recs = RunStore(tmp_path / "run").read_evals()
    assert len(recs) == 6 and not any(r["failed"] for r in recs)
    full = [r for r in recs if not r.get("racing_cut")]
    assert best is not None and best["fitness"] == max(r["fitness"] for r in full)
    # 60 documents, 15 of them carved out as the run's validation split
    assert full and all(len(r["per_example"]["mc60"]) == 45 for r in full)
    final = RunStore(tmp_path / "run").read_json("final.json")
    assert final["chosen_by"] == "validation"
    fin = next(r for r in final["rows"] if r["final"])
    assert fin["splits"]["validation"]["tasks"]["mc60"]["n"] == 15
    for r in full:
        s = r["scores"]
        assert s["mc60"] == pytest.approx(np.mean(r["per_example"]["mc60"]))
        assert r["fitness"] == pytest.approx((s["mc60"] + 0.5 * s["cipher_a"]) / 1.5)
