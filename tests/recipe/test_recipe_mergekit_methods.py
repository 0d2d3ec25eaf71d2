"""mergekit's newer methods in recipes: model roles, unused parameters, search spaces,
export, and (when mergekit-yaml is installed: EVOMERGE_MERGEKIT_BIN) the same weights as
mergekit-yaml for each method's YAML."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess

import pytest
import torch
import yaml
from tiny_models import make_tiny_expert, make_tiny_llama

from evomerge.config import SpaceConfig
from evomerge.errors import ConfigError
from evomerge.recipe import compile_recipe, recipe_to_mergekit, recipe_to_mergekit_yaml
from evomerge.recipe import params as rp
from evomerge.spaces import make_space

torch.set_num_threads(1)
L = 4


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("mk_methods_zoo")
    make_tiny_llama(root / "base", seed=0, layers=L)
    make_tiny_expert(root / "base", root / "math", seed=1)
    make_tiny_expert(root / "base", root / "lang", seed=2)
    make_tiny_expert(root / "base", root / "code", seed=3)
    return root


LAYER = "model.layers.1.mlp.up_proj.weight"


def _recipe(method, models, base="base", **params):
    r = {"merge_method": method, "models": models, "parameters": params}
    if base:
        r["base_model"] = base
    return r


def test_roles_of_the_new_methods(zoo):
    two = [{"model": "math", "parameters": {"weight": 1.0}}, {"model": "lang", "parameters": {"weight": 0.5}}]
    # nuslerp / multislerp: the base, when given, is the reference; without one there is none
    for m in ("nuslerp", "multislerp"):
        s = compile_recipe(_recipe(m, two), base_dir=zoo).step_for(LAYER)
        assert [r.model for r in s.inputs] == ["math", "lang"] and s.base.model == "base"
        s = compile_recipe(_recipe(m, two, base=None), base_dir=zoo).step_for(LAYER)
        assert s.base is None and s.params["weight"] == [1.0, 0.5]
    # karcher: mergekit adds an unlisted base model as one more (last) input
    s = compile_recipe(_recipe("karcher", ["math", "lang"]), base_dir=zoo).step_for(LAYER)
    assert [r.model for r in s.inputs] == ["math", "lang", "base"] and s.base is None
    s = compile_recipe(_recipe("karcher", ["base", "math"]), base_dir=zoo).step_for(LAYER)
    assert [r.model for r in s.inputs] == ["base", "math"]
    # task-vector methods: base is the reference, everything else an input
    for m, p in (("sce", {"select_topk": 0.5}), ("ram", {}), ("ramplus_tl", {"r": 0.2})):
        s = compile_recipe(_recipe(m, ["math", "lang", "code"], **p), base_dir=zoo).step_for(LAYER)
        assert [r.model for r in s.inputs] == ["math", "lang", "code"] and s.base.model == "base"
    for m, p in (("nearswap", {"t": 0.01}), ("arcee_fusion", {})):
        s = compile_recipe(_recipe(m, ["math"], **p), base_dir=zoo).step_for(LAYER)
        assert [r.model for r in s.inputs] == ["math"] and s.base.model == "base"


def test_role_errors_are_one_line(zoo):
    with pytest.raises(ConfigError, match=r"^models: operator 'nearswap' for tensor .* takes 1 inputs, got 2"):
        compile_recipe(_recipe("nearswap", ["math", "lang"], t=0.1), base_dir=zoo)
    with pytest.raises(ConfigError, match=r"^base_model: operator 'arcee_fusion' needs a base model"):
        compile_recipe(_recipe("arcee_fusion", ["math"], base=None), base_dir=zoo)
    with pytest.raises(ConfigError, match=r"^models\[0\]\.parameters\.weight: missing; operator 'nuslerp'"):
        compile_recipe(_recipe("nuslerp", ["math", "lang"]), base_dir=zoo)


def test_unused_parameters_warn_once_and_change_nothing(zoo, caplog):
    rp._WARNED.clear()
    models = [{"model": "math", "parameters": {"weight": 0.7, "density": 0.5}},
              {"model": "lang", "parameters": {"weight": 0.3, "density": 0.5}}]
    plain = compile_recipe(_recipe("task_arithmetic", [{"model": "math", "parameters": {"weight": 0.7}},
                                                       {"model": "lang", "parameters": {"weight": 0.3}}]),
                           base_dir=zoo)
    with caplog.at_level(logging.WARNING, logger="evomerge.recipe"):
        a = compile_recipe(_recipe("task_arithmetic", models, epsilon=0.1), base_dir=zoo)
        b = compile_recipe(_recipe("task_arithmetic", models, epsilon=0.1), base_dir=zoo)
    assert a.hash() == plain.hash() == b.hash()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines  # density once (not once per model or per compile), epsilon once
    assert ("warning: models[0].parameters.density: merge method 'task_arithmetic' does not "
            "use 'density'; ignored (as mergekit does)") in lines
    assert all("\n" not in x for x in lines)
    # a name no method knows is still a typo, refused in one line
    with pytest.raises(ConfigError, match=r"has no parameter 'dencity'"):
        compile_recipe(_recipe("task_arithmetic", [{"model": "math", "parameters": {"dencity": 0.5}}]),
                       base_dir=zoo)


@pytest.mark.parametrize("method,params", [
    ("nuslerp", {"weight": {"low": 0.0, "high": 1.0}}),
    ("multislerp", {"weight": {"low": 0.1, "high": 1.0}}),
    ("sce", {"select_topk": {"low": 0.1, "high": 1.0}}),
    ("nearswap", {"t": {"low": 0.0, "high": 0.05}}),
    ("ramplus_tl", {"r": {"low": 0.0, "high": 1.0}, "alpha": {"low": 0.0, "high": 0.5}}),
])
def test_new_methods_as_search_space_methods(zoo, method, params):
    experts = ["math"] if method == "nearswap" else ["math", "lang"]
    models = {k: str(zoo / k) for k in ["base"] + experts}
    cfg = SpaceConfig(type="parameter", method=method, layer_groups=2, params=params)
    space = make_space(cfg, models, "base")
    for x in (space.initial(), space.initial() * 0 + 0.9):
        plan = compile_recipe(space.decode(x), base_dir=zoo)
        plan.validate()
        step = plan.step_for(LAYER)
        assert step.op == method
    names = space.names
    assert any(n.startswith("layers0-1.") for n in names) and any(n.startswith("layers2-3.") for n in names)


# -- export to mergekit and the same weights as mergekit-yaml -------------------------------
MERGEKIT_YAMLS = {
    "nuslerp": """
merge_method: nuslerp
base_model: {z}/base
models:
  - model: {z}/math
    parameters: {{weight: [1.0, 0.2]}}
  - model: {z}/lang
    parameters: {{weight: 0.6}}
""",
    "nuslerp_rows": """
merge_method: nuslerp
models:
  - model: {z}/math
    parameters: {{weight: 0.3}}
  - model: {z}/lang
    parameters: {{weight: 0.7}}
parameters: {{nuslerp_flatten: false, nuslerp_row_wise: true}}
""",
    "multislerp": """
merge_method: multislerp
base_model: {z}/base
models:
  - model: {z}/math
    parameters: {{weight: 0.5}}
  - model: {z}/lang
    parameters: {{weight: [0.2, 0.9]}}
  - model: {z}/code
    parameters: {{weight: 0.3}}
""",
    "karcher": """
merge_method: karcher
base_model: {z}/base
models:
  - model: {z}/math
  - model: {z}/lang
parameters: {{max_iter: 20, tol: 1.0e-6}}
""",
    "sce": """
merge_method: sce
base_model: {z}/base
models:
  - model: {z}/math
  - model: {z}/lang
  - model: {z}/code
parameters: {{select_topk: 0.4}}
""",
    "nearswap": """
merge_method: nearswap
base_model: {z}/base
models:
  - model: {z}/math
parameters: {{t: [0.001, 0.03]}}
""",
    "arcee_fusion": """
merge_method: arcee_fusion
base_model: {z}/base
models:
  - model: {z}/math
""",
    "ram": """
merge_method: ram
base_model: {z}/base
models:
  - model: {z}/math
  - model: {z}/lang
parameters: {{epsilon: 0.01}}
""",
    "ramplus_tl": """
merge_method: ramplus_tl
base_model: {z}/base
models:
  - model: {z}/math
  - model: {z}/lang
  - model: {z}/code
parameters: {{epsilon: 0.01, r: 0.5, alpha: 0.4}}
""",
    "task_arithmetic_unused_density": """
merge_method: task_arithmetic
base_model: {z}/base
models:
  - model: {z}/math
    parameters: {{weight: 0.7, density: 0.3}}
  - model: {z}/lang
    parameters: {{weight: 0.5, density: 0.3}}
""",
}


@pytest.mark.parametrize("name", sorted(MERGEKIT_YAMLS))
def test_export_round_trip(zoo, tmp_path, name):
    f = tmp_path / f"{name}.yaml"
    f.write_text(MERGEKIT_YAMLS[name].format(z=zoo))
    plan = compile_recipe(f)
    text = recipe_to_mergekit_yaml(plan)
    g = tmp_path / "back.yaml"
    g.write_text(text)
    assert compile_recipe(g).hash() == plan.hash()
    out, why = recipe_to_mergekit(plan)
    assert why is None and out == yaml.safe_load(text)


MERGEKIT_BIN = os.environ.get("EVOMERGE_MERGEKIT_BIN") or shutil.which("mergekit-yaml")


@pytest.mark.slow
@pytest.mark.skipif(MERGEKIT_BIN is None, reason="mergekit-yaml not installed (set EVOMERGE_MERGEKIT_BIN)")
@pytest.mark.parametrize("name", sorted(MERGEKIT_YAMLS))
def test_same_weights_as_mergekit(zoo, tmp_path, name):
    """The YAML through mergekit-yaml and through evomerge: the same float32 weights."""
    from safetensors.torch import load_file

    from evomerge.materialize import Materializer

    f = tmp_path / f"{name}.yaml"
    f.write_text(MERGEKIT_YAMLS[name].format(z=zoo) + "dtype: float32\n")
    proc = subprocess.run([MERGEKIT_BIN, str(f), str(tmp_path / "mk")], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    Materializer(device="cpu").materialize_to_disk(compile_recipe(f), tmp_path / "ev")
    ours = load_file(str(tmp_path / "ev" / "model.safetensors"))
    theirs = load_file(str(tmp_path / "mk" / "model.safetensors"))
    assert ours.keys() == theirs.keys()
    for k in ours:
        torch.testing.assert_close(ours[k], theirs[k], rtol=0, atol=1e-6, msg=k)
    assert not re.search(r"Traceback", proc.stderr)
