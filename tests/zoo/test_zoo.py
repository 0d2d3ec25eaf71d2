"""The model zoo: tokenizer, task files, build/cache/load, determinism, PEFT adapters."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import pytest
import torch

from evomerge.errors import ConfigError
from evomerge.zoo import tasks as zt
from evomerge.zoo.build import ZooError, build_zoo, build_zoo_spec, load_zoo, load_zoo_dir, zoo_spec
from evomerge.zoo.tokenizer import make_tokenizer

REPO = Path(__file__).resolve().parents[2]

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def test_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    calls = []
    manifest = build_zoo("test", root=root, progress=lambda stage, done, total: calls.append((stage, done, total)))
    return root, manifest, calls


# --- tokenizer and tasks ----------------------------------------------------------------


def test_tokenizer_roundtrip_through_autotokenizer(tmp_path):
    from transformers import AutoTokenizer

    make_tokenizer(zt.SYMBOLS).save_pretrained(str(tmp_path))
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    ids = tok("abq>")["input_ids"]
    assert ids[0] == tok.bos_token_id == 1
    assert len(ids) == 5  # BOS + one token per character
    assert tok.decode(ids, skip_special_tokens=True) == "abq>"
    assert tok.decode(ids[1:] + [tok.eos_token_id], skip_special_tokens=True) == "abq>"
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2)
    assert tok.unk_token_id not in ids


def test_cipher_tables_map_each_slice_injectively_onto_digits():
    for name, letters in zt.SLICES.items():
        table = zt.CIPHER_TABLES[name]
        assert set(table) == set(letters)
        assert len(set(table.values())) == len(letters)
        assert set(table.values()) <= set(zt.DIGITS)
    assert sorted(zt.CIPHER_TABLES["digits"].values()) == list(zt.DIGITS)
    ex = zt.make_example("cipher_a", "abc")
    assert ex.prompt == "abc>" and ex.target == "".join(zt.CIPHER_TABLES["a"][c] for c in "abc")


def test_committed_task_files_regenerate_bit_for_bit():
    committed = REPO / "fitness" / "zoo"
    expected = zt.task_files()
    on_disk = {p.name: p.read_bytes() for p in committed.iterdir() if p.is_file()}
    assert set(expected) <= set(on_disk), "run: python -m evomerge.zoo.tasks --write fitness/zoo"
    for name, text in expected.items():
        assert on_disk[name] == text.encode("utf-8"), f"{name} differs from its generator"


def test_task_splits_do_not_overlap_and_are_correct():
    files = zt.task_files()
    inputs = {"search": set(), "heldout": set()}
    for spec in zt.TASKS:
        for split in ("search", "heldout"):
            recs = [json.loads(line) for line in files[f"{spec.name}.{split}.jsonl"].splitlines()]
            assert len(recs) == (spec.n_search if split == "search" else spec.n_heldout)
            texts = [r["input"] for r in recs]
            assert len(set(texts)) == len(texts), f"duplicates in {spec.name}.{split}"
            assert not inputs[split] & set(texts), f"{spec.name}.{split} repeats another task's item"
            inputs[split] |= set(texts)
            for r in recs:
                assert zt.split_of(r["input"]) == split
                assert r["target"] == zt.encipher(r["input"])
                assert zt.MIN_LEN <= len(r["input"]) <= zt.MAX_LEN
                if spec.name == "cross":
                    assert len({zt._slice_of(c) for c in r["input"]}) >= 2
    assert not inputs["search"] & inputs["heldout"]
    combined = [json.loads(line)["skill"] for line in files["combined.search.jsonl"].splitlines()]
    assert {combined.count(f"cipher_{s}") for s in zt.SLICES} == {len(combined) // 3}


def test_training_batches_never_hold_fitness_strings():
    import random

    rng = random.Random(0)
    for _ in range(5):
        for ex in zt.sample_batch(zt.expert_mix("b", 0.3), rng, 64):
            assert zt.split_of(ex.prompt[:-1]) == "train"


def test_task_yaml_has_the_fitness_fields():
    import yaml

    d = yaml.safe_load(zt.task_files()["cipher_a.yaml"])
    assert d["name"] == "cipher_a"
    assert d["data"] == "cipher_a.search.jsonl" and d["heldout_data"] == "cipher_a.heldout.jsonl"
    assert d["prompt"].format(input="abc") == "abc>"
    assert d["scoring"] == "exact_match" and d["target_field"] == "target"
    assert d["max_new_tokens"] >= zt.MAX_LEN + 1


def test_unknown_variant_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown variant 'huge'"):
        zoo_spec("huge")


def test_zoo_spec_round_trips_through_its_dict():
    from evomerge.zoo.build import ZooSpec

    for variant in ("full", "test"):
        spec = dataclasses.replace(zoo_spec(variant), workers=1)
        again = ZooSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
        assert again == spec and again.config_hash() == spec.config_hash()


def test_config_hash_changes_with_the_recipe():
    full, test = zoo_spec("full"), zoo_spec("test")
    assert full.config_hash() != test.config_hash()
    assert full.folder_name.startswith("full-") and len(full.folder_name) == len("full-") + 12
    assert zoo_spec("full").config_hash() == full.config_hash()


# --- building ---------------------------------------------------------------------------


@pytest.mark.slow
def test_test_zoo_builds_with_every_member(test_zoo):
    root, m, calls = test_zoo
    assert not m.cache_hit
    assert m.root == (root / zoo_spec("test").folder_name).absolute()
    assert [e.name for e in m.experts] == ["expert_a", "expert_b", "expert_c"]
    assert [e.name for e in m.lora] == ["lora_a", "lora_b", "lora_c"]
    for member in [m.base, *m.experts]:
        for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (member.path / f).is_file(), f"{member.name}: {f} missing"
        assert set(member.metrics) >= {"cipher_a", "cipher_b", "cipher_c", "combined", "cross"}
    for member in m.lora:
        assert (member.path / "adapter_config.json").is_file()
        assert (member.path / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in m.tasks_dir.iterdir()) == sorted(zt.task_files())
    assert m.task_yaml("combined").is_file()
    # progress went from 0 to every training step of the build
    total = zoo_spec("test").total_steps()
    assert calls[-1][1:] == (total, total)
    assert [c[1] for c in calls] == sorted(c[1] for c in calls)
    saved = json.loads((m.root / "zoo.json").read_text())
    assert saved["config_hash"] == zoo_spec("test").config_hash()
    assert saved["experts"][0]["path"] == "experts/expert_a"


@pytest.mark.slow
def test_zoo_models_load_with_transformers_and_generate(test_zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, m, _ = test_zoo
    model = AutoModelForCausalLM.from_pretrained(str(m.experts[0].path))
    tok = AutoTokenizer.from_pretrained(str(m.experts[0].path))
    assert model.config.model_type == "llama" and model.config.tie_word_embeddings
    batch = tok(["abc>", "ijklm>"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4) or out.shape[1] <= batch["input_ids"].shape[1] + 4
    texts = tok.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


@pytest.mark.slow
def test_lora_adapters_load_with_peft(test_zoo):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    _, m, _ = test_zoo
    lora = m.lora[1]
    cfg = json.loads((lora.path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == zoo_spec("test").lora.rank
    factors = load_file(str(lora.path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in factors
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight" in factors

    base = AutoModelForCausalLM.from_pretrained(str(m.base.path))
    ids = torch.tensor([[1, 14, 15, 39]])
    with torch.no_grad():
        plain = base(input_ids=ids).logits
    model = peft.PeftModel.from_pretrained(base, str(lora.path))
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
    assert not torch.allclose(plain, adapted), "the adapter changed nothing"
    # PEFT's merged weight is base + (alpha / r) * B @ A, as the zoo trained it
    merged = model.merge_and_unload()
    a = factors["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"]
    b = factors["base_model.model.model.layers.0.mlp.up_proj.lora_B.weight"]
    base_w = load_file(str(m.base.path / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    scale = cfg["lora_alpha"] / cfg["r"]
    torch.testing.assert_close(merged.model.layers[0].mlp.up_proj.weight, base_w + scale * b @ a)


@pytest.mark.slow
def test_cached_build_returns_without_training(test_zoo):
    root, first, _ = test_zoo
    calls = []
    t0 = time.perf_counter()
    again = build_zoo("test", root=root, progress=lambda *a: calls.append(a))
    assert time.perf_counter() - t0 < 2.0
    assert again.cache_hit and not calls
    assert again.root == first.root and again.expert_paths == first.expert_paths
    loaded = load_zoo("test", root=root)
    assert loaded.base.path == first.base.path
    assert loaded.experts[2].metrics == first.experts[2].metrics


@pytest.mark.slow
def test_two_builds_give_byte_identical_checkpoints(test_zoo, tmp_path):
    """A second build, with experts trained in two worker processes this time, writes the
    same bytes: neither the run nor the parallelism changes a weight."""
    _, first, _ = test_zoo
    spec = dataclasses.replace(zoo_spec("test"), workers=2)
    assert spec.config_hash() == zoo_spec("test").config_hash()
    calls = []
    second = build_zoo_spec(spec, root=tmp_path, progress=lambda *a: calls.append(a))
    assert calls[-1][1:] == (spec.total_steps(), spec.total_steps())
    files = sorted(p.relative_to(first.root) for p in first.root.rglob("*.safetensors"))
    assert len(files) == 7
    for rel in files:
        assert (first.root / rel).read_bytes() == (second.root / rel).read_bytes(), f"{rel} differs"
    assert second.experts[1].metrics == first.experts[1].metrics
    assert not (second.root / ".workers").exists()


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_build_is_never_taken_as_complete(tmp_path, workers):
    class Stop(Exception):
        pass

    def interrupt(stage, done, total):
        if stage.startswith("expert"):
            raise Stop

    spec = dataclasses.replace(zoo_spec("test"), workers=workers)
    with pytest.raises(Stop):
        build_zoo_spec(spec, root=tmp_path, progress=interrupt)
    assert not (tmp_path / zoo_spec("test").folder_name).exists()
    assert not list(tmp_path.glob(".*partial*")), "the partial build was not cleaned up"
    with pytest.raises(ZooError, match="no complete 'test' zoo"):
        load_zoo("test", root=tmp_path)

    # a folder left without its manifest (e.g. killed before the rename) is rebuilt
    stale = tmp_path / zoo_spec("test").folder_name
    (stale / "base").mkdir(parents=True)
    (stale / "base" / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ZooError, match="zoo.json is missing"):
        load_zoo_dir(stale)
    m = build_zoo("test", root=tmp_path)
    assert not m.cache_hit and (m.root / "zoo.json").is_file()
    assert (m.base.path / "model.safetensors").stat().st_size > 1000


@pytest.mark.slow
def test_cli_zoo_build_uses_the_cache(test_zoo):
    from click.testing import CliRunner

    from evomerge.cli import main

    root, m, _ = test_zoo
    result = CliRunner().invoke(main, ["zoo", "build", "--variant", "test", "--out", str(root), "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "cached" in result.output and m.root.name in result.output.replace("\n", "")
    bad = CliRunner().invoke(main, ["zoo", "show", "--variant", "test", "--out", str(root / "nowhere")])
    assert bad.exit_code != 0 and "no complete 'test' zoo" in bad.output
