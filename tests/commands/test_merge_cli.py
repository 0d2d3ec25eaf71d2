"""`evomerge merge RECIPE.yaml --out DIR`, end to end on tiny checkpoints."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from tiny_models import make_tiny_expert, make_tiny_llama

from evomerge.cli import main
from evomerge.recipe import compile_recipe

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge_cli")
    make_tiny_llama(root / "base", seed=0, layers=3)
    make_tiny_expert(root / "base", root / "a", seed=1)
    make_tiny_expert(root / "base", root / "b", seed=2)
    return root


def _write(path, recipe):
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def _weights(d):
    return load_file(str(d / "model.safetensors"))


def _generate(d):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(d)
    tok = AutoTokenizer.from_pretrained(d)
    ids = tok("12+3", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids["input_ids"].shape[1] + 4
    return model


def test_linear_one_zero_equals_first_model(zoo, tmp_path):
    recipe = _write(tmp_path / "lin.yaml", {
        "merge_method": "linear",
        "models": [{"model": str(zoo / "a"), "parameters": {"weight": 1.0}},
                   {"model": str(zoo / "b"), "parameters": {"weight": 0.0}}],
    })
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "merged 29 tensors (linear, 2 sources)" in res.output and "GB/s" in res.output
    merged, first = _weights(out), _weights(zoo / "a")
    assert merged.keys() == first.keys()
    for k in first:
        assert torch.equal(merged[k], first[k]), k
    # the normalized recipe is written next to the weights and rebuilds the same plan
    saved = yaml.safe_load((out / "evomerge_recipe.yaml").read_text())
    assert compile_recipe(saved).hash() == compile_recipe(recipe).hash()
    assert "linear" in (out / "README.md").read_text()
    _generate(out)


def test_ties_sharded_bf16_and_mergekit_out(zoo, tmp_path):
    recipe = _write(tmp_path / "ties.yaml", {
        "merge_method": "ties", "base_model": "base", "dtype": "bfloat16",
        "sources": {"base": str(zoo / "base"), "a": str(zoo / "a"), "b": str(zoo / "b")},
        "models": [{"model": "a", "parameters": {"weight": 1.0, "density": [0.3, 0.8]}},
                   {"model": "b", "parameters": {"weight": [{"filter": "attn", "value": 0.5},
                                                            {"value": 1.0}], "density": 0.5}}],
    })
    out, mk = tmp_path / "ties_out", tmp_path / "mk.yaml"
    res = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(out), "--shard-size", "4KB",
                                    "--mergekit-out", str(mk)])
    assert res.exit_code == 0, res.output
    assert (out / "model.safetensors.index.json").is_file()  # sharded
    model = _generate(out)
    assert next(model.parameters()).dtype == torch.bfloat16
    mk_cfg = yaml.safe_load(mk.read_text())
    assert mk_cfg["base_model"] == str(zoo / "base") and mk_cfg["out_dtype"] == "bfloat16"
    assert compile_recipe(mk).hash() == compile_recipe(recipe).hash()


def test_frankenmerge_loads_with_more_layers(zoo, tmp_path):
    recipe = _write(tmp_path / "frank.yaml", {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(zoo / "a"), "layer_range": [0, 2]}]},
                   {"sources": [{"model": str(zoo / "b"), "layer_range": [1, 3]}]}],
        "non_layer": {"model": str(zoo / "a")},
    })
    out = tmp_path / "frank_out"
    res = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, res.output
    model = _generate(out)
    assert model.config.num_hidden_layers == 4
    merged, b = _weights(out), _weights(zoo / "b")
    assert torch.equal(merged["model.layers.3.mlp.up_proj.weight"], b["model.layers.2.mlp.up_proj.weight"])


def test_print_plan_only(zoo, tmp_path):
    recipe = _write(tmp_path / "p.yaml", {"merge_method": "task_arithmetic", "base_model": str(zoo / "base"),
                                          "models": [{"model": str(zoo / "a")}]})
    res = CliRunner().invoke(main, ["merge", str(recipe), "--print-plan"])
    assert res.exit_code == 0, res.output
    plan = yaml.safe_load(res.output)
    assert plan["steps"][0]["op"] == "task_arithmetic" and plan["base"] == "base"
    # the printed plan is itself mergeable
    saved = tmp_path / "plan.yaml"
    saved.write_text(res.output)
    res = CliRunner().invoke(main, ["merge", str(saved), "--out", str(tmp_path / "from_plan")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "from_plan" / "model.safetensors").is_file()


@pytest.mark.parametrize("args,recipe,message", [
    ([], {"merge_method": "tiez", "models": [{"model": "a"}]}, "error: merge_method: unknown operator 'tiez'"),
    ([], {"merge_method": "ties", "base_model": "base", "models": [{"model": "a", "parameters": {"density": 2}}]},
     "error: models[0].parameters.density: density=2 is out of range"),
    (["--device", "tpu"], {"merge_method": "linear", "models": [{"model": "a"}]}, "error: --device tpu: unknown device"),
    (["--shard-size", "lots"], {"merge_method": "linear", "models": [{"model": "a"}]}, "error: shard_size: cannot parse 'lots'"),
    (["--mergekit-out", "{tmp}/mk.yaml"], {"merge_method": "task_arithmetic", "base_model": "base",
      "models": [{"model": "a"}], "parameters": {"lines_alpha": 0.1, "lines_beta": 1.0}},
     "error: mergekit export: LiNeS"),
])
def test_errors_are_one_line(zoo, tmp_path, args, recipe, message):
    for m in recipe["models"]:
        m["model"] = str(zoo / m["model"])
    if "base_model" in recipe:
        recipe["base_model"] = str(zoo / recipe["base_model"])
    f = _write(tmp_path / "bad.yaml", recipe)
    args = [a.format(tmp=tmp_path) for a in args]
    res = CliRunner().invoke(main, ["merge", str(f), "--out", str(tmp_path / "o"), *args])
    assert res.exit_code == 2
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_subprocess_merge(zoo, tmp_path):
    recipe = _write(tmp_path / "sub.yaml", {
        "merge_method": "dare_ties", "base_model": "base", "seed": 7,
        "models": [{"model": "a", "parameters": {"weight": 1.0, "density": 0.5}},
                   {"model": "b", "parameters": {"weight": 1.0, "density": 0.5}}],
    })
    # relative model paths resolve against the recipe's directory, from any working dir
    for name in ("base", "a", "b"):
        os.symlink(zoo / name, tmp_path / name)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    outs = []
    for i in range(2):
        out = tmp_path / f"sub_out{i}"
        proc = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(recipe), "--out", str(out)],
                              cwd="/", env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        assert "merged 29 tensors (dare_ties, 3 sources)" in proc.stdout
        outs.append(_weights(out))
    for k in outs[0]:  # DARE masks are seeded per (plan seed, tensor): identical reruns
        assert torch.equal(outs[0][k], outs[1][k]), k
    _generate(tmp_path / "sub_out0")
    bad = subprocess.run([sys.executable, "-m", "evomerge.cli", "merge", str(tmp_path / "none.yaml"),
                          "--out", str(tmp_path / "x")], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: recipe file")
    assert len(bad.stderr.strip().splitlines()) == 1
