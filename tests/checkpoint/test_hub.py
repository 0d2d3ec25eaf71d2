"""Hub ids and zoo: references everywhere a model is named, offline against a local HF cache
in the Hub's own layout; exports with mergekit_config.yml and Hub-ready model cards.

Nothing here touches the network: ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE`` point
``huggingface_hub`` at a cache built from tiny checkpoints (tests/hub_cache.py).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from click.testing import CliRunner
from hub_cache import add_to_hub_cache
from safetensors.torch import load_file
from tiny_models import make_tiny_expert, make_tiny_llama

from evomerge.checkpoint.resolve import (
    hub_ref_of_path,
    parse_hub_id,
    portable_ref,
    resolve_model_dir,
    resolve_ref,
)
from evomerge.cli import main
from evomerge.errors import CheckpointError, ConfigError
from evomerge.recipe import compile_recipe
from evomerge.zoo.refs import register_zoo_refs

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub_models")
    make_tiny_llama(root / "base", seed=0, layers=2)
    make_tiny_expert(root / "base", root / "a", seed=1)
    make_tiny_expert(root / "base", root / "b", seed=2)
    cache = root / "hub-cache"
    commits = {}
    for name in ("base", "a", "b"):
        _, commits[name] = add_to_hub_cache(cache, f"acme/tiny-{name}", root / name)
    # a second revision of acme/tiny-a on a branch, and an untokenized upload
    _, commits["a-v2"] = add_to_hub_cache(cache, "acme/tiny-a", root / "b", branch="v2")
    tok_files = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "chat_template.jinja")
    _, commits["notok"] = add_to_hub_cache(cache, "acme/tiny-notok", root / "b", skip=tok_files)
    return {"root": root, "cache": cache, "commits": commits}


@pytest.fixture
def offline(models, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(models["cache"]))
    monkeypatch.delenv("HF_HOME", raising=False)
    return models


def test_parse_hub_id():
    assert parse_hub_id("mistralai/Mistral-7B-v0.1") == ("mistralai/Mistral-7B-v0.1", None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_id("org/name@" + "a" * 40) == ("org/name", "a" * 40)
    for not_hub in ("./org/name", "/abs/path", "~/x/y", "name", "a/b/c", "org--x/y", "zoo:base"):
        assert parse_hub_id(not_hub) is None, not_hub


def test_resolve_offline_from_the_hf_cache(offline):
    c = offline["commits"]
    r = resolve_ref("acme/tiny-a")
    assert r.repo_id == "acme/tiny-a" and r.revision == c["a"] and r.pinned == f"acme/tiny-a@{c['a']}"
    assert r.path.endswith(f"models--acme--tiny-a/snapshots/{c['a']}")
    assert load_file(os.path.join(r.path, "model.safetensors"))  # symlinked blobs read fine
    assert resolve_ref(f"acme/tiny-a@{c['a']}").path == r.path  # a commit
    assert resolve_ref("acme/tiny-a@v2").revision == c["a-v2"]  # a branch (refs/v2)
    assert resolve_ref("acme/tiny-a", pinned=c["a-v2"]).revision == c["a-v2"]  # a resumed run's pin
    assert hub_ref_of_path(r.path) == r.pinned and portable_ref(r.path) == r.pinned
    assert portable_ref("/some/local/dir") == "/some/local/dir"
    # HF_HOME is honoured when HF_HUB_CACHE is not set
    os.environ.pop("HF_HUB_CACHE")
    home = offline["root"] / "hf-home"
    home.mkdir(exist_ok=True)
    if not (home / "hub").exists():
        os.symlink(offline["cache"], home / "hub")
    os.environ["HF_HOME"] = str(home)
    assert resolve_model_dir("acme/tiny-b").endswith(c["b"])


def test_local_directory_wins_over_a_hub_id(offline, tmp_path):
    make_tiny_llama(tmp_path / "acme" / "tiny-a", seed=5)
    r = resolve_ref("acme/tiny-a", tmp_path)
    assert r.repo_id is None and r.path == str(tmp_path / "acme" / "tiny-a")


@pytest.mark.parametrize("ref, message", [
    ("acme/nope", r"^Hub model acme/nope is not in the local HF cache \(.*hub-cache\) and HF_HUB_OFFLINE is set: download it once online"),
    ("acme/tiny-a@v9", r"^Hub model acme/tiny-a@v9 is not in the local HF cache"),
    ("./acme/nope", r"^model directory not found: .*acme/nope$"),
    ("zoo:test/nope", r"^zoo:test/nope: "),
])
def test_unresolvable_refs_are_one_line(offline, ref, message):
    register_zoo_refs()  # what the CLI and the engine do before resolving anything
    with pytest.raises(CheckpointError, match=message) as e:
        resolve_ref(ref)
    assert "\n" not in str(e.value)


def test_hub_snapshot_without_safetensors_is_refused(offline, tmp_path):
    only_cfg = tmp_path / "cfg_only"
    only_cfg.mkdir()
    (only_cfg / "config.json").write_text("{}")
    add_to_hub_cache(offline["cache"], "acme/pickled", only_cfg)
    with pytest.raises(CheckpointError, match="has no safetensors weights; evomerge loads safetensors only"):
        resolve_ref("acme/pickled")


def _recipe(tmp_path, recipe):
    p = tmp_path / "recipe.yaml"
    p.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return p


def test_merge_recipe_with_hub_ids_writes_pinned_recipe_mergekit_config_and_card(offline, tmp_path):
    from huggingface_hub import ModelCard, metadata_load
    from huggingface_hub.utils import validate_repo_id

    c = offline["commits"]
    recipe = _recipe(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": "acme/tiny-base",
        "models": [{"model": "acme/tiny-a", "parameters": {"weight": 0.7}},
                   {"model": f"acme/tiny-b@{c['b']}", "parameters": {"weight": 0.4}}],
        "dtype": "float32",
    })
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    # same weights as the same merge of the local directories
    local = compile_recipe({
        "merge_method": "task_arithmetic", "base_model": str(offline["root"] / "base"),
        "models": [{"model": str(offline["root"] / "a"), "parameters": {"weight": 0.7}},
                   {"model": str(offline["root"] / "b"), "parameters": {"weight": 0.4}}],
        "dtype": "float32",
    })
    from evomerge.materialize import Materializer

    Materializer("cpu").materialize_to_disk(local, tmp_path / "local")
    a, b = load_file(str(out / "model.safetensors")), load_file(str(tmp_path / "local/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the recipe records each Hub source at its commit, and rebuilds the same plan
    saved = yaml.safe_load((out / "evomerge_recipe.yaml").read_text())
    assert saved["sources"] == {"tiny-base": f"acme/tiny-base@{c['base']}",
                                "tiny-a": f"acme/tiny-a@{c['a']}", "tiny-b": f"acme/tiny-b@{c['b']}"}
    assert compile_recipe(saved).hash() == compile_recipe(recipe).hash()
    # mergekit config beside it, with the same pinned Hub ids
    mk = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert mk["merge_method"] == "task_arithmetic" and mk["base_model"] == f"acme/tiny-base@{c['base']}"
    assert [m["model"] for m in mk["models"]] == [f"acme/tiny-a@{c['a']}", f"acme/tiny-b@{c['b']}"]
    # the card: huggingface_hub parses it strictly; base_model holds Hub ids only
    meta = metadata_load(out / "README.md")
    assert meta["base_model"] == ["acme/tiny-base", "acme/tiny-a", "acme/tiny-b"]
    for repo in meta["base_model"]:
        validate_repo_id(repo)
    assert meta["tags"] == ["merge", "evomerge", "mergekit"] and meta["library_name"] == "transformers"
    assert meta["base_model_relation"] == "merge"
    card = ModelCard.load(out / "README.md", ignore_metadata_errors=False)
    assert card.data.base_model == meta["base_model"]
    assert str(offline["cache"]) not in yaml.safe_dump(meta)


def test_card_model_index_round_trips_through_huggingface_hub(tmp_path):
    from huggingface_hub import ModelCard, metadata_load
    from huggingface_hub.repocard_data import model_index_to_eval_results

    from evomerge.checkpoint.card import build_model_card

    text = build_model_card(
        {"name": "my-merge", "sources": {"a": "/local/a", "b": "/x/models--org--m/snapshots/" + "c" * 40},
         "evaluations": [("cipher_a", "search", 0.91, 0.02), ("cipher_a", "validation", 0.85, 0.025),
                         {"task": "cipher_b", "split": "heldout", "value": 0.8, "stderr": 0.03}]},
        {"merge_method": "ties"}, {"architectures": ["LlamaForCausalLM"]})
    (tmp_path / "README.md").write_text(text)
    meta = metadata_load(tmp_path / "README.md")
    assert meta["base_model"] == ["org/m"]  # the local source has no Hub id: left out
    name, results = model_index_to_eval_results(meta["model-index"])
    assert name == "my-merge"
    got = {(r.dataset_name, r.dataset_split, r.metric_value) for r in results}
    assert got == {("cipher_a", "validation", 0.85), ("cipher_b", "heldout", 0.8)}  # no search split
    assert all("standard error" in r.metric_name for r in results)
    assert "| cipher_a | search | 0.91 | 0.02 |" in text and "| cipher_b | heldout | 0.8 | 0.03 |" in text
    assert ModelCard(text, ignore_metadata_errors=False).data.eval_results


def test_zoo_refs_in_recipes(test_zoo, tmp_path, monkeypatch):
    register_zoo_refs()
    home = tmp_path / "home"
    home.mkdir()
    os.symlink(test_zoo.root.parent, home / "zoo")
    monkeypatch.setenv("EVOMERGE_HOME", str(home))
    expert = test_zoo.experts[0].name
    recipe = _recipe(tmp_path, {
        "merge_method": "task_arithmetic", "base_model": "zoo:test/base",
        "models": [{"model": f"zoo:test/{expert}", "parameters": {"weight": 1.0}}],
    })
    plan = compile_recipe(recipe)
    got = {k: os.path.realpath(v) for k, v in plan.sources.items()}
    assert got == {"base": os.path.realpath(test_zoo.base.path),
                   expert: os.path.realpath(test_zoo.experts[0].path)}
    with pytest.raises(ConfigError, match=r"^base_model: zoo:test/nobody: .*no member named 'nobody'"):
        compile_recipe({"merge_method": "linear", "base_model": "zoo:test/nobody",
                        "models": [{"model": "zoo:test/base"}]})


def test_zoo_refs_are_wired_by_the_layers_above_checkpoint(test_zoo, tmp_path):
    """checkpoint never imports the zoo: until the CLI or the engine registers the zoo's
    resolver, a zoo: reference is one clear line; importing the zoo registers nothing."""
    import subprocess
    import sys

    home = tmp_path / "home"
    home.mkdir()
    os.symlink(test_zoo.root.parent, home / "zoo")
    code = ("import sys\n"
            "from evomerge.checkpoint.resolve import resolve_ref\n"
            "import evomerge.zoo.refs as z\n"
            "try:\n"
            "    resolve_ref('zoo:test/base')\n"
            "except Exception as e:\n"
            "    print('unwired:', e)\n"
            "from evomerge.engine.models import resolve_models\n"
            "print('engine:', resolve_models({'b': 'zoo:test/base'})['b'])\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "EVOMERGE_HOME": str(home), "PYTHONPATH": root, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=tmp_path, check=True).stdout.splitlines()
    assert out[0] == ("unwired: zoo:test/base: zoo: references need the model zoo's resolver: "
                      "call evomerge.zoo.refs.register_zoo_refs() first (the CLI and the engine do)")
    assert os.path.realpath(out[1].removeprefix("engine: ")) == os.path.realpath(test_zoo.base.path)


def test_source_without_tokenizer_warns_and_takes_another(offline, tmp_path):
    c = offline["commits"]
    recipe = _recipe(tmp_path, {
        "merge_method": "linear",
        "models": [{"model": "acme/tiny-notok", "parameters": {"weight": 0.5}},
                   {"model": "acme/tiny-a", "parameters": {"weight": 0.5}}],
    })
    out = tmp_path / "out"
    with pytest.warns(UserWarning) as rec:
        res = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    msgs = " | ".join(str(w.message) for w in rec)
    assert "'tiny-notok' have no tokenizer files: merged assuming their token ids match 'tiny-a'" in msgs
    assert "model 'tiny-notok' has no tokenizer files: the merged model takes the tokenizer of 'tiny-a' (set tokenizer_source to choose)" in msgs
    assert (out / "tokenizer.json").read_bytes() == (offline["root"] / "a" / "tokenizer.json").read_bytes()
    assert c["notok"]
    # naming the untokenized source as tokenizer_source is refused in one line
    bad = _recipe(tmp_path, {"merge_method": "linear", "tokenizer_source": "acme/tiny-notok",
                             "models": ["acme/tiny-notok", "acme/tiny-a"]})
    res = CliRunner().invoke(main, ["merge", str(bad), "--out", str(tmp_path / "o2")])
    assert res.exit_code != 0 and "tokenizer_source 'tiny-notok'" in res.output
    assert "has no tokenizer files" in res.output and not (tmp_path / "o2").exists()


def test_run_with_hub_ids_records_commits(offline, tmp_path):
    from evomerge.config import load_config
    from evomerge.engine.models import read_pins, resolve_models_full

    c = offline["commits"]
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump({
        "name": "hub", "models": {"base": "acme/tiny-base", "a": "acme/tiny-a"}, "base_model": "base",
        "tasks": [{"path": "fitness/zoo/cipher_a.yaml"}],
    }))
    cfg = load_config(cfg_path)
    assert cfg.models == {"base": "acme/tiny-base", "a": "acme/tiny-a"}  # kept, not made a path
    resolved = resolve_models_full(cfg.models)
    assert resolved["a"].revision == c["a"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "models.json").write_text(json.dumps({k: r.to_dict() for k, r in resolved.items()}))
    # main moves on to another commit; the run keeps the one it started with
    add_to_hub_cache(offline["cache"], "acme/tiny-a", offline["root"] / "b", branch="main")
    assert resolve_ref("acme/tiny-a").revision == c["a-v2"]
    again = resolve_models_full(cfg.models, read_pins(run))
    assert again["a"].revision == c["a"] and again["a"].path == resolved["a"].path
    add_to_hub_cache(offline["cache"], "acme/tiny-a", offline["root"] / "a", branch="main")


def _with_template(src, dst, template):
    import shutil

    shutil.copytree(src, dst)
    for f in ("chat_template.jinja", "chat_template.json"):
        (dst / f).unlink(missing_ok=True)
    cfg = json.loads((dst / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    if template is not None:
        cfg["chat_template"] = template
    (dst / "tokenizer_config.json").write_text(json.dumps(cfg))
    return dst


T1 = "{% for m in messages %}A:{{ m['content'] }}{% endfor %}"
T2 = "{% for m in messages %}B:{{ m['content'] }}{% endfor %}"


@pytest.mark.parametrize("spec, expected", [
    ("auto", T1),  # two of the three sources share T1
    ("c", T2),  # a named source (by key)
    ("chatml", "chatml"),
    ("{{ 'X' }}{% for m in messages %}{{ m['content'] }}{% endfor %}", None),
])
def test_chat_template(models, tmp_path, spec, expected):
    from transformers import AutoTokenizer

    from evomerge.checkpoint.chat_template import CHATML

    root = models["root"]
    srcs = {"a": _with_template(root / "a", tmp_path / "a", T1),
            "b": _with_template(root / "b", tmp_path / "b", T1),
            "c": _with_template(root / "b", tmp_path / "c", T2)}
    recipe = _recipe(tmp_path, {
        "merge_method": "linear", "sources": {k: str(v) for k, v in srcs.items()},
        "models": [{"model": "c", "parameters": {"weight": 0.3}},
                   {"model": "a", "parameters": {"weight": 0.3}},
                   {"model": "b", "parameters": {"weight": 0.4}}],
        "tokenizer_source": "c", "chat_template": spec,
    })
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, res.output
    want = {"chatml": CHATML}.get(expected, expected) or spec
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == want
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    msgs = [{"role": "user", "content": "hi"}]
    if want != CHATML:
        assert tok.apply_chat_template(msgs, tokenize=False).endswith("hi")
    # the mergekit config carries it the way mergekit reads it
    mk = yaml.safe_load((out / "mergekit_config.yml").read_text())
    assert mk["chat_template"] == (spec if spec in ("auto", "chatml") else want)


def test_chat_template_and_union_errors(models, tmp_path):
    root = models["root"]
    with pytest.raises(ConfigError, match=r"^chat_template: 'nope' is neither a key of sources"):
        compile_recipe({"merge_method": "linear", "sources": {"a": str(root / "a")},
                        "models": ["a"], "chat_template": "nope"})
    with pytest.raises(ConfigError, match=r"^tokenizer_source: 'union' is not supported: a union vocabulary needs new embedding"):
        compile_recipe({"merge_method": "linear", "models": [str(root / "a")], "tokenizer_source": "union"})
    bare = _with_template(root / "a", tmp_path / "bare", None)
    recipe = _recipe(tmp_path, {"merge_method": "linear", "models": [str(bare), str(root / "b")],
                                "chat_template": {"source": str(bare)}})
    res = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(tmp_path / "o")])
    assert res.exit_code != 0 and "chat_template: model 'bare'" in res.output and "has no chat template" in res.output


def test_lora_adapter_from_the_hub_with_a_hub_base(offline, tmp_path):
    """PEFT writes the base as a Hub id: adapter and base both resolve through the cache."""
    from tiny_models import make_tiny_lora

    from evomerge.checkpoint import open_checkpoint

    c = offline["commits"]
    adapter = make_tiny_lora(offline["root"] / "base", tmp_path / "ad")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "acme/tiny-base"
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    add_to_hub_cache(offline["cache"], "acme/tiny-lora", adapter)
    reader = open_checkpoint(resolve_model_dir("acme/tiny-lora"))
    assert reader.is_lora and reader.base.path.name == c["base"]
    dense = open_checkpoint(offline["root"] / "base")
    name = next(n for n in dense.names if "q_proj" in n)
    assert not torch.equal(reader.get(name), dense.get(name))  # the adapter's delta is applied
