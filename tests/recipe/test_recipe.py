"""Recipes (evomerge and mergekit YAML) -> MergePlan, and back to mergekit YAML.

Gradient values are checked against mergekit's rule written out by hand
(``t = i / (n - 1)``, ``scaled = t * (len - 1)``, linear between the two neighbours), the
same rule the merged weights were checked against with mergekit-yaml itself.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
import torch
import yaml
from tiny_models import make_tiny_expert, make_tiny_gpt2, make_tiny_llama, make_tiny_lora

from evomerge.errors import ConfigError, IncompatibleModelsError
from evomerge.recipe import (
    compile_recipe,
    load_recipe,
    plan_to_mergekit,
    recipe_to_mergekit,
    recipe_to_mergekit_yaml,
)
from evomerge.recipe.params import TensorCtx, interpolate, parse_setting

torch.set_num_threads(1)

L = 4  # layers of the test models


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipe_zoo")
    make_tiny_llama(root / "base", seed=0, layers=L)
    make_tiny_expert(root / "base", root / "math", seed=1)
    make_tiny_expert(root / "base", root / "lang", seed=2)
    make_tiny_llama(root / "other", seed=3, layers=L, vocab=48)  # different vocab
    make_tiny_llama(root / "deep", seed=4, layers=6)
    return root


def _r(**kw):
    r = {"merge_method": "ties", "base_model": "base",
         "models": [{"model": "math", "parameters": {"weight": 1.0, "density": 0.5}},
                    {"model": "lang", "parameters": {"weight": 0.5, "density": 0.5}}]}
    r.update(kw)
    return {k: v for k, v in r.items() if v is not None}


def _step(plan, name):
    return plan.step_for(name)


def _layer(i, suffix="mlp.up_proj.weight"):
    return f"model.layers.{i}.{suffix}"


def _mk_gradient(values, i, n):
    """mergekit's evaluate_setting for layer i of n, written out independently."""
    t = i / (n - 1) if n > 1 else 1
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    return (1 - (scaled - i0)) * values[i0] + (scaled - i0) * values[i1]


# -- whole models ----------------------------------------------------------------------
def test_ties_roles_and_every_tensor(zoo):
    plan = compile_recipe(_r(), base_dir=zoo)
    from evomerge.checkpoint import open_checkpoint

    names = open_checkpoint(zoo / "base").names
    assert plan.output_names == names
    s = _step(plan, _layer(2))
    assert s.op == "ties"
    assert [r.model for r in s.inputs] == ["math", "lang"]
    assert s.base.model == "base" and s.base.tensor == _layer(2)
    assert s.params["weight"] == [1.0, 0.5] and s.params["density"] == [0.5, 0.5]
    assert s.params["normalize"] is True  # ties default filled in
    assert plan.base == "base" and plan.config_source == "base" and plan.tokenizer_source == "base"
    assert plan.meta["method"] == "ties"
    assert plan.meta["recipe"]["sources"]["math"] == str(zoo / "math")
    plan.validate()


def test_base_listed_in_models_is_dropped_for_task_vectors(zoo):
    r = _r(models=[{"model": "base"}, {"model": "math", "parameters": {"weight": 2.0}}],
           merge_method="task_arithmetic")
    s = _step(compile_recipe(r, base_dir=zoo), _layer(0))
    assert [x.model for x in s.inputs] == ["math"] and s.base.model == "base"
    assert s.params == {"weight": [2.0], "lambda": 1.0, "normalize": False}


def test_linear_uses_listed_models_only(zoo):
    r = _r(merge_method="linear", models=[{"model": "base", "parameters": {"weight": 0.3}},
                                          {"model": "math", "parameters": {"weight": 0.7}}])
    s = _step(compile_recipe(r, base_dir=zoo), _layer(1))
    assert [x.model for x in s.inputs] == ["base", "math"] and s.base is None
    assert s.params["weight"] == [0.3, 0.7]
    # an unlisted base is not an input; it still gives config and tokenizer
    r2 = _r(merge_method="linear", models=[{"model": "math"}, {"model": "lang"}])
    p2 = compile_recipe(r2, base_dir=zoo)
    assert [x.model for x in p2.steps[0].inputs] == ["math", "lang"]
    assert p2.config_source == "base" and "base" in p2.sources


def test_slerp_puts_base_first(zoo):
    r = _r(merge_method="slerp", models=[{"model": "math"}], parameters={"t": [0.0, 1.0]})
    plan = compile_recipe(r, base_dir=zoo)
    s = _step(plan, _layer(1))
    assert [x.model for x in s.inputs] == ["base", "math"]
    assert s.params["t"] == pytest.approx(1 / 3)


def test_gradients_interpolate_exactly_as_mergekit(zoo):
    grads = {"density": [0.2, 0.9], "weight": [0.0, 1.0, 0.25]}
    r = _r(models=[{"model": "math", "parameters": grads}, {"model": "lang"}])
    plan = compile_recipe(r, base_dir=zoo)
    for i in range(L):
        s = _step(plan, _layer(i))
        assert s.params["density"][0] == pytest.approx(_mk_gradient(grads["density"], i, L), abs=1e-12)
        assert s.params["weight"][0] == pytest.approx(_mk_gradient(grads["weight"], i, L), abs=1e-12)
    # non-layer tensors sit at t = 0 (mergekit 0.1 evaluates pre and post weights at t = 0)
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        assert _step(plan, name).params["density"][0] == pytest.approx(0.2)
    # the rule itself, by hand: [0, 1, 0.25] at layer 1 of 4 -> t=1/3, scaled=2/3
    assert _mk_gradient([0.0, 1.0, 0.25], 1, 4) == pytest.approx(2 / 3)
    assert interpolate([0.0, 1.0, 0.25], 2 / 3) == pytest.approx(1 * (2 / 3) + 0.25 * (1 / 3))
    # strings / bools pick a step instead of interpolating
    assert interpolate([True, False], 0.4) is True and interpolate(["a", "b", "c"], 1.0) == "c"


def test_filters_first_match_default_and_fallthrough(zoo):
    r = _r(models=[
        {"model": "math", "parameters": {"weight": [
            {"filter": "self_attn.q_proj", "value": 0.1},
            {"filter": "self_attn", "value": 0.2},
            {"filter": "mlp", "value": [0.0, 0.3]},
        ]}},
        {"model": "lang", "parameters": {"weight": [{"value": 0.9}]}},
    ], parameters={"weight": 0.7})
    plan = compile_recipe(r, base_dir=zoo)
    assert _step(plan, _layer(0, "self_attn.q_proj.weight")).params["weight"] == [0.1, 0.9]
    assert _step(plan, _layer(0, "self_attn.k_proj.weight")).params["weight"] == [0.2, 0.9]
    assert _step(plan, _layer(3, "mlp.down_proj.weight")).params["weight"][0] == pytest.approx(0.3)
    # no filter matched the norm: falls through to the global value, as in mergekit
    assert _step(plan, _layer(1, "input_layernorm.weight")).params["weight"] == [0.7, 0.9]


def test_attn_mlp_aliases_match_by_kind():
    s = parse_setting([{"filter": "attn", "value": 1.0}, {"filter": "mlp", "value": 2.0},
                       {"value": 3.0}], "p")
    ctx = lambda n: TensorCtx.make(n, 0.0, 0)  # noqa: E731
    assert s.value(ctx("gpt_neox.layers.0.attention.dense.weight")) == 1.0  # kind, no substring
    assert s.value(ctx("model.layers.0.self_attn.o_proj.weight")) == 1.0
    assert s.value(ctx("x.layers.0.feed_forward.w1.weight")) == 2.0
    assert s.value(ctx("model.layers.0.input_layernorm.weight")) == 3.0
    # plain filters stay substrings: "dense" is not a kind
    plain = parse_setting([{"filter": "dense", "value": 5.0}], "p")
    assert plain.value(ctx("a.attention.dense.weight")) == 5.0
    assert plain.value(ctx("a.attention.query.weight")) is None


def test_per_layer_list_is_exact_and_checked(zoo):
    vals = [0.1, 0.7, 0.3, 0.9]
    r = _r(models=[{"model": "math", "parameters": {"weight": {"layers": vals}}}, {"model": "lang"}])
    plan = compile_recipe(r, base_dir=zoo)
    assert [_step(plan, _layer(i)).params["weight"][0] for i in range(L)] == vals
    # same as a gradient of length num_layers
    r2 = _r(models=[{"model": "math", "parameters": {"weight": vals}}, {"model": "lang"}])
    plan2 = compile_recipe(r2, base_dir=zoo)
    for i in range(L):
        assert _step(plan2, _layer(i)).params["weight"][0] == pytest.approx(vals[i], abs=1e-12)
    bad = _r(models=[{"model": "math"}, {"model": "lang", "parameters": {"density": {"layers": [0.5] * 3}}}])
    with pytest.raises(ConfigError, match=r"^models\[1\]\.parameters\.density\.layers: 3 values for 4 layers"):
        compile_recipe(bad, base_dir=zoo)


def test_lines_compiles_to_lines_op(zoo):
    r = _r(merge_method="task_arithmetic", models=[{"model": "math"}, {"model": "lang"}],
           parameters={"lines_alpha": 0.2, "lines_beta": 1.0})
    plan = compile_recipe(r, base_dir=zoo)
    s = _step(plan, _layer(2))
    assert s.op == "lines" and s.base.model == "base"
    assert s.params["alpha"] == 0.2 and s.params["beta"] == 1.0
    assert s.params["layer"] == 2 and s.params["num_layers"] == L
    assert _step(plan, "model.embed_tokens.weight").params["layer"] == 0
    assert _step(plan, "model.norm.weight").params["layer"] == L - 1
    plan.validate()
    with pytest.raises(ConfigError, match=r"^parameters\.lines_beta: missing"):
        compile_recipe(_r(merge_method="task_arithmetic", parameters={"lines_alpha": 0.5},
                          models=[{"model": "math"}]), base_dir=zoo)
    with pytest.raises(ConfigError, match=r"^parameters\.lambda: cannot be combined"):
        compile_recipe(_r(merge_method="task_arithmetic", models=[{"model": "math"}],
                          parameters={"lines_alpha": 0.5, "lines_beta": 1, "lambda": 2}), base_dir=zoo)


def test_sources_keys_and_relative_paths(zoo, tmp_path):
    f = tmp_path / "sub" / "r.yaml"
    f.parent.mkdir()
    rel = "../../" + zoo.name  # relative to the recipe file's directory
    f.write_text(yaml.safe_dump({
        "merge_method": "linear",
        "sources": {"m": f"{rel}/math", "l": f"{rel}/lang"},
        "models": [{"model": "m", "parameters": {"weight": 1}}, {"model": f"{rel}/lang"}],
    }))
    assert (f.parent / rel).resolve() == zoo.resolve()
    plan = compile_recipe(f)
    assert set(plan.sources) == {"m", "l"}  # a path equal to a declared source reuses its key
    assert plan.steps[0].inputs[1].model == "l"
    norm = load_recipe(f)
    assert compile_recipe(norm).hash() == plan.hash()  # normalized form is idempotent


def test_lora_adapter_is_a_model(zoo, tmp_path):
    make_tiny_lora(zoo / "base", tmp_path / "lora", seed=5)
    plan = compile_recipe(_r(models=[{"model": str(tmp_path / "lora"), "parameters": {"density": 0.5}},
                                     {"model": "math"}]), base_dir=zoo)
    assert plan.sources["lora"] == str(tmp_path / "lora")
    assert [x.model for x in _step(plan, _layer(0, "self_attn.q_proj.weight")).inputs] == ["lora", "math"]
    with pytest.raises(ConfigError, match=r"^models\[0\]\.model: mergekit's 'model\+adapter'"):
        compile_recipe(_r(models=[{"model": "base+lora"}]), base_dir=zoo)


def test_hash_ignores_spelling(zoo):
    a = compile_recipe(_r(), base_dir=zoo)
    b = compile_recipe(_r(method="ties", merge_method=None, sources={"b": str(zoo / "base")},
                          base_model="b"), base_dir=zoo)
    c = compile_recipe(_r(parameters={"normalize": True, "int8_mask": True}), base_dir=zoo)
    assert a.hash() == c.hash()  # explicit default and a no-op mergekit knob change nothing
    assert [s.params for s in a.steps] == [s.params for s in b.steps]


# -- slices ----------------------------------------------------------------------------
def test_layer_swap_slices_rename_layers_and_set_count(zoo):
    r = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "lang", "layer_range": [0, 1]}]},
        {"sources": [{"model": "math", "layer_range": [1, 3]}]},
        {"sources": [{"model": "lang", "layer_range": [3, 4]}]},
    ]}
    plan = compile_recipe(r, base_dir=zoo)
    assert plan.config_overrides == {"num_hidden_layers": 4}
    assert _step(plan, _layer(0)).inputs[0].model == "lang"
    s = _step(plan, _layer(2))
    assert s.op == "passthrough" and s.inputs[0].model == "math" and s.inputs[0].tensor == _layer(2)
    # mergekit's rule: embeddings from the first slice, final norm (and head) from the last
    assert _step(plan, "model.embed_tokens.weight").inputs[0].model == "lang"
    assert _step(plan, "model.norm.weight").inputs[0].model == "lang"
    plan.validate()


def test_frankenmerge_renumbers_and_overrides_count(zoo):
    r = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "math", "layer_range": [0, 3]}]},
        {"sources": [{"model": "lang", "layer_range": [1, 4]}]},
    ], "non_layer": {"model": "lang"}}
    plan = compile_recipe(r, base_dir=zoo)
    assert plan.config_overrides["num_hidden_layers"] == 6
    s = _step(plan, _layer(4))  # output layer 4 = lang layer 2
    assert (s.inputs[0].model, s.inputs[0].tensor) == ("lang", _layer(2))
    assert _step(plan, "model.embed_tokens.weight").inputs[0].model == "lang"
    assert len(plan.steps) == 6 * 9 + 2


def test_slice_mix_with_weights_and_non_layer_merge(zoo):
    r = {"merge_method": "linear", "slices": [
        {"sources": [{"model": "math", "layer_range": [0, 2], "parameters": {"weight": 0.25}},
                     {"model": "lang", "layer_range": [2, 4], "parameters": {"weight": 0.75}}]},
        {"sources": [{"model": "math", "layer_range": [2, 4]}]},
    ], "non_layer": {"merge": True}}
    plan = compile_recipe(r, base_dir=zoo)
    s = _step(plan, _layer(1))
    assert [(x.model, x.tensor) for x in s.inputs] == [("math", _layer(1)), ("lang", _layer(3))]
    assert s.params["weight"] == [0.25, 0.75]
    e = _step(plan, "model.embed_tokens.weight")
    assert e.op == "linear" and [x.model for x in e.inputs] == ["math", "lang"]
    assert e.params["weight"] == [0.25, 0.75]  # each model's weight from its first slice


def test_ties_slice_without_base_uses_base_at_same_layers(zoo):
    r = {"merge_method": "ties", "base_model": "base", "slices": [
        {"sources": [{"model": "math", "layer_range": [0, 4]}, {"model": "lang", "layer_range": [0, 4]}],
         "parameters": {"density": 0.5}},
    ]}
    plan = compile_recipe(r, base_dir=zoo)
    s = _step(plan, _layer(3))
    assert s.base.model == "base" and s.base.tensor == _layer(3)
    assert s.params["density"] == [0.5, 0.5]
    out, why = recipe_to_mergekit(r, base_dir=zoo)
    assert why is None and len(out["slices"][0]["sources"]) == 3  # base added for mergekit


def test_passthrough_scale_per_model_slice_and_global(zoo):
    plan = compile_recipe({"merge_method": "passthrough",
                           "models": [{"model": "math", "parameters": {"scale": 0.5}}]}, base_dir=zoo)
    assert {s.params["scale"] for s in plan.steps} == {0.5}
    plan = compile_recipe({"merge_method": "passthrough", "parameters": {"scale": 2.0}, "slices": [
        {"sources": [{"model": "math", "layer_range": [0, 2], "parameters": {"scale": [
            {"filter": "mlp", "value": 0.0}]}}]},
        {"sources": [{"model": "lang", "layer_range": [2, 4]}], "parameters": {"scale": 3.0}},
    ]}, base_dir=zoo)
    assert _step(plan, _layer(0)).params["scale"] == 0.0
    assert _step(plan, _layer(0, "self_attn.q_proj.weight")).params["scale"] == 2.0
    assert _step(plan, _layer(3)).params["scale"] == 3.0


def test_gpt2_slices_set_n_layer(tmp_path):
    make_tiny_gpt2(tmp_path / "g1", seed=0, layers=3)
    make_tiny_gpt2(tmp_path / "g2", seed=1, layers=3)
    plan = compile_recipe({"merge_method": "passthrough", "slices": [
        {"sources": [{"model": "g1", "layer_range": [0, 3]}]},
        {"sources": [{"model": "g2", "layer_range": [2, 3]}]},
    ]}, base_dir=tmp_path)
    assert plan.config_overrides == {"n_layer": 4}
    s = _step(plan, "transformer.h.3.attn.c_attn.weight")
    assert (s.inputs[0].model, s.inputs[0].tensor) == ("g2", "transformer.h.2.attn.c_attn.weight")
    assert _step(plan, "transformer.wte.weight").inputs[0].model == "g1"
    assert _step(plan, "transformer.ln_f.weight").inputs[0].model == "g2"


# -- mergekit round trip ---------------------------------------------------------------
MERGEKIT_YAMLS = {
    "ties": """
merge_method: ties
base_model: {z}/base
models:
  - model: {z}/math
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: {z}/lang
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
parameters:
  normalize: true
  int8_mask: true
dtype: float16
""",
    "slerp": """
slices:
  - sources:
      - model: {z}/math
        layer_range: [0, 4]
      - model: {z}/lang
        layer_range: [0, 4]
merge_method: slerp
base_model: {z}/math
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: bfloat16
""",
    "passthrough": """
slices:
  - sources:
    - model: {z}/math
      layer_range: [0, 3]
  - sources:
    - model: {z}/lang
      layer_range: [2, 4]
merge_method: passthrough
dtype: float32
""",
    "task_arithmetic": """
merge_method: task_arithmetic
base_model: {z}/base
models:
  - model: {z}/math
    parameters: {{weight: 0.7}}
  - model: {z}/lang
    parameters: {{weight: [{{filter: mlp, value: 0.2}}, {{value: 1.0}}]}}
parameters: {{lambda: 1.5}}
""",
}


@pytest.mark.parametrize("name", sorted(MERGEKIT_YAMLS))
def test_mergekit_yaml_round_trip(zoo, tmp_path, name):
    f = tmp_path / f"{name}.yaml"
    f.write_text(MERGEKIT_YAMLS[name].format(z=zoo))
    plan = compile_recipe(f)
    text = recipe_to_mergekit_yaml(plan)
    back = yaml.safe_load(text)
    assert back["merge_method"] == name
    g = tmp_path / f"{name}_back.yaml"
    g.write_text(text)
    plan2 = compile_recipe(g)
    assert plan2.hash() == plan.hash()
    assert plan_to_mergekit(plan) == back


MERGEKIT_BIN = os.environ.get("EVOMERGE_MERGEKIT_BIN") or shutil.which("mergekit-yaml")


@pytest.mark.slow
@pytest.mark.skipif(MERGEKIT_BIN is None, reason="mergekit-yaml not installed (set EVOMERGE_MERGEKIT_BIN)")
@pytest.mark.parametrize("name", sorted(MERGEKIT_YAMLS))
def test_same_weights_as_mergekit(zoo, tmp_path, name):
    """The same YAML through mergekit-yaml and through evomerge gives the same weights.

    In float32: mergekit's ``dtype`` is its compute dtype, evomerge always computes in
    float32 and reads ``dtype`` as the output dtype, so half-precision runs differ by design
    (TIES's top-k also breaks the many fp16 magnitude ties differently).
    """
    import re

    from safetensors.torch import load_file

    from evomerge.materialize import Materializer

    f = tmp_path / f"{name}.yaml"
    f.write_text(re.sub(r"dtype: \w+", "dtype: float32", MERGEKIT_YAMLS[name].format(z=zoo)))
    proc = subprocess.run([MERGEKIT_BIN, str(f), str(tmp_path / "mk")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    Materializer(device="cpu").materialize_to_disk(compile_recipe(f), tmp_path / "ev")
    ours, theirs = load_file(str(tmp_path / "ev" / "model.safetensors")), load_file(str(tmp_path / "mk" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6, msg=k)


def test_mergekit_export_of_evomerge_only_features(zoo):
    r = _r(merge_method="task_arithmetic", models=[{"model": "math"}],
           parameters={"lines_alpha": 0.5, "lines_beta": 1.0})
    out, why = recipe_to_mergekit(r, base_dir=zoo)
    assert out is None and "LiNeS" in why
    swap = {"merge_method": "passthrough", "non_layer": {"model": "math"}, "slices": [
        {"sources": [{"model": "lang", "layer_range": [0, 2]}]},
        {"sources": [{"model": "math", "layer_range": [2, 4]}]}]}
    out, why = recipe_to_mergekit(swap, base_dir=zoo)
    assert out is None and "non_layer" in why
    with pytest.raises(ConfigError, match="^mergekit export: non_layer"):
        recipe_to_mergekit_yaml(swap, base_dir=zoo)
    # the same layer swap whose first and last slices come from the non_layer model is mergekit's rule
    swap["slices"].insert(0, {"sources": [{"model": "math", "layer_range": [0, 0 + 1]}]})
    swap["slices"][1]["sources"][0]["layer_range"] = [1, 2]
    out, why = recipe_to_mergekit(swap, base_dir=zoo)
    assert why is None and "non_layer" not in out
    # per-layer lists become gradients; keys become paths
    r = _r(models=[{"model": "math", "parameters": {"weight": {"layers": [1, 2, 3, 4]}}}, {"model": "lang"}])
    out, _ = recipe_to_mergekit(r, base_dir=zoo)
    assert out["models"][0] == {"model": str(zoo / "math"), "parameters": {"weight": [1, 2, 3, 4]}}


# -- bad recipes -----------------------------------------------------------------------
BAD = [
    (_r(merge_method="tiez"), r"^merge_method: unknown operator 'tiez' \(did you mean 'ties'\?\)"),
    (_r(models=[{"model": "math", "parameters": {"density": 1.5}}]),
     r"^models\[0\]\.parameters\.density: density=1\.5 is out of range \[0\.0, 1\.0\]"),
    (_r(models=[{"model": "math", "parameters": {"density": [0.5, -0.2]}}]),
     r"^models\[0\]\.parameters\.density: density=-0\.2 is out of range"),
    (_r(models=[{"model": "math"}, {"model": "nope"}]), r"^models\[1\]\.model: 'nope' is neither a key of sources \(base, math\) nor a model directory \('.*/nope' not found\)"),
    (_r(base_model=None), r"^base_model: operator 'ties' needs a base model"),
    (_r(models=[{"model": "math", "parameters": {"normalize": False}}]),
     r"^models\[0\]\.parameters\.normalize: 'normalize' is one value for the whole merge"),
    (_r(parameters={"dencity": 0.5}), r"^parameters\.dencity: operator 'ties' has no parameter 'dencity'"),
    (_r(foo=1), r"^recipe: unknown field\(s\) 'foo'"),
    (_r(slices=[]), r"^recipe: give exactly one of 'models'"),
    (_r(tokenizer_source="union"), r"^tokenizer_source: 'union' is not supported"),
    (_r(modules={"a": {}}), r"^modules: per-module merges"),
    (_r(dtype="int4"), r"^dtype: unknown dtype 'int4'"),
    (_r(merge_method="slerp", models=[{"model": "math"}, {"model": "lang"}], parameters={"t": 0.5}),
     r"^models: operator 'slerp' .* takes 2 inputs, got 3"),
    (_r(merge_method="slerp", base_model=None, models=[{"model": "math"}, {"model": "lang"}]),
     r"^models: .*needs 't'"),
    (_r(models=[{"model": "math", "parameters": {"weight": [{"filter": "mlp"}]}}]),
     r"^models\[0\]\.parameters\.weight\[0\]: filter entry has no 'value'"),
    (_r(models=[{"model": "math"}, {"model": "math"}]), r"^models\[1\]\.model: 'math' is already listed"),
    (_r(merge_method="m2n2_crossover"), r"^merge_method: 'm2n2_crossover' cannot be used in a recipe"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "math", "layer_range": [2, 6]}]}]},
     r"^slices\[0\]\.sources\[0\]\.layer_range: \[2, 6\] is out of range for model 'math', which has 4 layers"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "math", "layer_range": [3, 1]}]}]},
     r"^slices\[0\]\.sources\[0\]\.layer_range: \[3, 1\] is not a range"),
    ({"merge_method": "linear", "slices": [{"sources": [{"model": "math", "layer_range": [0, 2]},
                                                      {"model": "lang", "layer_range": [0, 3]}]}]},
     r"^slices\[0\]\.sources: every source of a slice needs the same number of layers, got \[2, 3\]"),
    ({"merge_method": "passthrough", "slices": [{"sources": [{"model": "math", "layer_range": [0, 2]},
                                                           {"model": "lang", "layer_range": [0, 2]}]}]},
     r"^slices\[0\]\.sources: passthrough takes one source per slice, got 2"),
    ({"merge_method": "linear", "models": [{"model": "math"}], "non_layer": {"model": "math"}},
     r"^non_layer: only applies to 'slices'"),
]


@pytest.mark.parametrize("recipe,pattern", BAD, ids=[p[1][:40] for p in BAD])
def test_bad_recipes_name_the_field(zoo, recipe, pattern):
    with pytest.raises(ConfigError, match=pattern) as info:
        compile_recipe(recipe, base_dir=zoo)
    assert "\n" not in str(info.value)


def test_incompatible_sources_and_bad_files(zoo, tmp_path):
    with pytest.raises(IncompatibleModelsError, match=r"^models: vocab size mismatch: model 'other'"):
        compile_recipe(_r(models=[{"model": "math"}, {"model": "other"}]), base_dir=zoo)
    f = tmp_path / "bad.yaml"
    f.write_text("merge_method: ties\nmodels: [\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+, column \d+ invalid YAML"):
        compile_recipe(f)
    with pytest.raises(ConfigError, match=r"^recipe file '.*missing\.yaml' not found"):
        compile_recipe(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match=r"^sources\.x: model directory"):
        compile_recipe(_r(sources={"x": "nowhere"}), base_dir=zoo)


def test_compile_is_fast_on_repeat(zoo):
    """Search spaces compile one recipe per candidate: metadata is cached per checkpoint."""
    r = _r(models=[{"model": "math", "parameters": {"weight": [0.2, 0.8], "density": [
        {"filter": "attn", "value": 0.4}, {"value": {"layers": [0.1, 0.2, 0.3, 0.4]}}]}},
        {"model": "lang"}])
    compile_recipe(r, base_dir=zoo)
    t0 = time.perf_counter()
    for _ in range(20):
        plan = compile_recipe(r, base_dir=zoo)
    per = (time.perf_counter() - t0) / 20
    assert len(plan.steps) == 9 * L + 2
    assert per < 0.05, f"compile took {per * 1000:.1f} ms for {len(plan.steps)} tensors"
