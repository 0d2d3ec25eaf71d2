"""The zoo's LoRA pool: PEFT adapters over the zoo base, manifest, cache, CLI listing."""

from __future__ import annotations

import json
import time

import pytest
import torch

from evomerge.zoo import pool_tasks as pt
from evomerge.zoo import tasks as zt
from evomerge.zoo.build import ZooError, zoo_spec
from evomerge.zoo.pool import (
    POOL_MANIFEST,
    PoolManifest,
    build_zoo_pool,
    load_pool_dir,
    load_zoo_pool,
    merge_deltas,
    pool_spec,
    read_factors,
)

torch.set_num_threads(1)


def test_pool_has_distinct_tasks_roles_and_descriptions(test_zoo_pool):
    m = test_zoo_pool
    assert len(m.adapters) >= 8
    skills = [a["skill"] for a in m.config["adapters"]]
    assert len(set(skills)) == len(skills)
    descs = [m.descriptions[n] for n in m.adapters]
    assert all(d and "\n" not in d for d in descs)
    assert len(set(descs)) == len(descs)
    roles = set(m.config["roles"].values())
    assert roles == {"relevant", "harmful", "irrelevant"}
    assert m.root.name.startswith("pool-test-") and m.root.name.endswith(m.config_hash[:12])
    assert set(m.target_tasks) == {"combined", "cross"}
    for t, path in m.target_tasks.items():
        assert path.read_bytes() == zt.task_files()[f"{t}.yaml"].encode()


def test_every_adapter_loads_in_peft_with_one_rank_and_module_set(test_zoo_pool):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    m = test_zoo_pool
    shapes = None
    for name, path in m.adapters.items():
        cfg = json.loads((path / "adapter_config.json").read_text())
        sig = (cfg["r"], tuple(sorted(cfg["target_modules"])))
        shapes = shapes or sig
        assert sig == shapes, f"{name} differs in rank or modules"
        base = LlamaForCausalLM.from_pretrained(str(m.base), dtype="float32")
        ids = torch.tensor([[1, 22, 30, 47]])  # <s> a i >
        with torch.no_grad():
            ref = base(input_ids=ids).logits
            peft_model = PeftModel.from_pretrained(base, str(path))
            out = peft_model(input_ids=ids).logits
        assert out.shape == ref.shape
        # our own dense delta (factor merge with beta 1 on this adapter) matches peft
        factors = read_factors(path)
        deltas = merge_deltas([factors], [1.0], [1.0])
        merged = LlamaForCausalLM.from_pretrained(str(m.base), dtype="float32")
        sd = merged.state_dict()
        merged.load_state_dict({k: v + deltas[k] if k in deltas else v for k, v in sd.items()})
        with torch.no_grad():
            torch.testing.assert_close(merged(input_ids=ids).logits, out, atol=1e-5, rtol=1e-4)
    assert m.base.joinpath("config.json").is_file()


def test_merge_rule_sparsifies_a_only_and_sums_factors():
    a = torch.tensor([[1.0, -4.0], [0.5, 2.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    one = ({"m": (a, b)}, 2.0)
    d = merge_deltas([one], [0.5], [1.0])["m.weight"]
    # top 50% of |A| keeps -4 and 2; B scaled by 2
    assert torch.equal(d, 2.0 * b @ torch.tensor([[0.0, -4.0], [0.0, 2.0]]))
    assert torch.equal(merge_deltas([one], [0.0], [1.0])["m.weight"], torch.zeros(2, 2))
    two = merge_deltas([one, one], [1.0, 1.0], [0.5, -1.0])["m.weight"]
    assert torch.allclose(two, (-0.5 * 2.0 * b) @ (-0.5 * a))


def test_manifest_round_trip_and_cache_hit(test_zoo_pool):
    m = test_zoo_pool
    again = PoolManifest.from_dict(json.loads(json.dumps(m.to_dict())), m.root)
    assert again.to_dict() == m.to_dict()
    assert list(again.adapters) == list(m.adapters)
    root = m.root.parent
    t0 = time.perf_counter()
    cached = build_zoo_pool("test", root=root)
    assert cached.cache_hit and time.perf_counter() - t0 < 2.0
    assert cached.root == m.root and cached.to_dict() == m.to_dict()
    assert load_zoo_pool("test", root=root).config_hash == m.config_hash
    assert not list(root.glob(".pool-*partial*"))


def test_metrics_recorded_for_every_adapter(test_zoo_pool):
    m = test_zoo_pool
    for name in m.adapters:
        got = m.metrics["adapters"][name]
        assert {"own", "combined", "cross", "role"} <= set(got)
        assert 0.0 <= got["own"] <= 100.0
    assert {"base", "uniform", "relevant_1", "relevant_tuned"} <= set(m.metrics["reference"])


def test_pool_hash_tracks_the_zoo_and_not_the_workers():
    spec = pool_spec("test")
    assert spec.zoo_hash == zoo_spec("test").config_hash()
    assert pool_spec("full").config_hash() != spec.config_hash()
    import dataclasses

    assert dataclasses.replace(spec, workers=4).config_hash() == spec.config_hash()


def test_missing_pool_and_bad_folder_are_one_line_errors(tmp_path):
    with pytest.raises(ZooError, match="--pool zoo"):
        load_zoo_pool("test", root=tmp_path)
    with pytest.raises(ZooError, match=POOL_MANIFEST):
        load_pool_dir(tmp_path)
    (tmp_path / POOL_MANIFEST).write_text("{not json")
    with pytest.raises(ZooError, match="unreadable pool manifest"):
        load_pool_dir(tmp_path)


def test_pool_skills_use_the_zoo_vocabulary_and_train_split_only():
    import random

    vocab = set(zt.SYMBOLS)
    for name in pt.POOL_SKILLS:
        rng = random.Random(0)
        for ex in pt.sample_skill(name, rng, 20, "train"):
            assert set(ex.prompt + ex.target) <= vocab
            assert zt.split_of(ex.prompt[:-1]) == "train"
    # harmful tables differ from the true one on every letter
    wrong = pt.POOL_SKILLS["wrongcipher_a2"]
    for ch in pt.HALVES["a2"]:
        assert wrong.answer_fn(ch) != zt.encipher(ch)


def test_cli_builds_the_test_pool_and_prints_a_listing(test_zoo_pool):
    from click.testing import CliRunner

    from evomerge.cli import main

    root = test_zoo_pool.root.parent
    res = CliRunner().invoke(main, ["zoo", "build", "--variant", "test", "--pool", "zoo", "--out", str(root), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "cached" in res.output and str(test_zoo_pool.root) in res.output
    for name in test_zoo_pool.adapters:
        assert name in res.output
    shown = CliRunner().invoke(main, ["zoo", "show", "--variant", "test", "--pool", "zoo", "--out", str(root)])
    assert shown.exit_code == 0, shown.output
    assert "reference uniform" in shown.output


def test_forced_rebuild_gives_identical_adapter_bytes(test_zoo_pool):
    m = test_zoo_pool
    before = {n: (p / "adapter_model.safetensors").read_bytes() for n, p in m.adapters.items()}
    rebuilt = build_zoo_pool("test", root=m.root.parent, force=True)
    assert not rebuilt.cache_hit and rebuilt.root == m.root
    after = {n: (p / "adapter_model.safetensors").read_bytes() for n, p in rebuilt.adapters.items()}
    assert after == before


def test_one_merge_rule_for_both_pools():
    """The toy pool's dense deltas and the SmolLM2 pool's factors come from one rule."""
    from evomerge.ops.factor import merge_lora_factors
    from evomerge.zoo.smollm2_pool import merge_factors

    g = torch.Generator().manual_seed(0)
    pools = [{"m": (torch.randn(4, 16, generator=g), torch.randn(8, 4, generator=g))} for _ in range(3)]
    alpha, beta, scales = [0.3, 1.0, 0.0], [0.5, -1.0, 2.0], [2.0, 0.5, 1.0]
    a, b = merge_lora_factors(pools, alpha, beta, scales)["m"]
    a0, a1 = pools[0]["m"][0], pools[1]["m"][0]
    keep = torch.zeros(64, dtype=torch.bool)
    keep[a0.abs().flatten().topk(20).indices] = True  # ceil(0.3 * 64) = 20 entries of A_0
    assert torch.allclose(a, 0.5 * torch.where(keep.view_as(a0), a0, 0.0) - a1)  # alpha 0: A_2 adds nothing
    assert torch.allclose(b, 1.0 * pools[0]["m"][1] - 0.5 * pools[1]["m"][1] + 2.0 * pools[2]["m"][1])
    d = merge_deltas(list(zip(pools, scales)), alpha, beta)["m.weight"]
    assert torch.equal(d, b @ a)
    sa, sb = merge_factors(pools, alpha, beta)["m"]
    assert torch.equal(sa, a) and torch.allclose(sb, 0.5 * pools[0]["m"][1] - pools[1]["m"][1] + 2.0 * pools[2]["m"][1])
