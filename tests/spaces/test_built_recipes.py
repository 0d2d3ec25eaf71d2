"""A space's decoded recipe compiles without re-normalizing, to exactly the old plan.

Plan hashes are the fitness-cache keys of existing runs and ``plan.meta["recipe"]`` is what
their logs and exported ``recipe.yaml`` hold: for every built-in space type and several
genomes, the fast path (``space.plan``) must give the plan, hash and meta (key order
included) that normalizing the recipe as user YAML gives.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from evomerge.config import SpaceConfig
from evomerge.errors import ConfigError
from evomerge.recipe import built_form, compile_normalized, normalize_built, normalize_recipe
from evomerge.spaces import SearchSpace, make_space


def _models(zoo):
    return {"base": str(zoo.base.path), **{m.name: str(m.path) for m in zoo.experts}}


def _genomes(space, n=4):
    rng = np.random.default_rng(len(space.names))
    return [space.initial(), np.zeros(space.dim), np.ones(space.dim),
            *(rng.random(space.dim) for _ in range(n))]


def _old_plan(space, recipe):
    """The path before the fast one: every recipe normalized as user YAML."""
    if type(space).compile is not SearchSpace.compile:
        return space.compile(recipe)  # a space with its own compiler never normalized
    return compile_normalized(normalize_recipe(recipe))


def _assert_same(new, old):
    assert new.hash() == old.hash()
    assert new.to_json() == old.to_json()  # steps, sources, meta values
    # key order too: meta["recipe"] is dumped as it is (recipe.yaml, the run log)
    assert json.dumps(new.meta["recipe"]) == json.dumps(old.meta["recipe"])


LOCAL_SPACES = [
    ("parameter", dict(type="parameter", method="ties", layer_groups="layer",
                       params={"weight": {"low": 0.0, "high": 2.0, "init": 1.0},
                               "density": {"low": 0.0, "high": 1.0, "init": 0.5}}), "base"),
    ("parameter-split", dict(type="parameter", method="task_arithmetic", layer_groups=1,
                             split_attn_mlp=True, smoothing=0.3,
                             params={"weight": {"low": 0.0, "high": 2.0, "init": 1.0}},
                             fixed={"normalize": False}), "base"),
    ("parameter-slerp", dict(type="parameter", method="slerp",
                             params={"t": {"low": 0.0, "high": 1.0}}), "base"),
    ("layer_swap", dict(type="layer_swap", outer="expert_a", inner="expert_b"), "base"),
    ("layer_swap-mix", dict(type="layer_swap", per_layer=True, temperature=0.5), "base"),
    ("m2n2", dict(type="m2n2"), "base"),
    ("dfs", dict(type="dfs", options={"repeats": 2}), None),
]


@pytest.mark.parametrize("label,cfg,base", LOCAL_SPACES, ids=[s[0] for s in LOCAL_SPACES])
def test_fast_path_gives_the_normalized_plan(test_zoo, label, cfg, base):
    models = _models(test_zoo)
    if cfg["type"] == "parameter" and cfg["method"] == "slerp":
        models = {"base": models["base"], "expert_a": models["expert_a"]}
    if base is None:  # a key 'base' without base_model reads as tokenizer_source: base
        models.pop("base")
    space = make_space(SpaceConfig(**cfg), models, base, seed=3, dtype="bfloat16")
    for g in _genomes(space):
        recipe = space.decode(g)
        assert built_form(recipe) is not None, "a built-in space's recipe took the slow path"
        _assert_same(space.plan(g), _old_plan(space, recipe))
        _assert_same(space.compile_decoded(recipe), space.compile(recipe))
    for b in space.baselines():  # the code builds these too
        assert built_form(b.recipe) == normalize_recipe(b.recipe)


def test_a_recipe_normalizing_refuses_is_refused_the_same_way(test_zoo):
    # DFS without base_model over a model keyed 'base': its tokenizer_source 'base' is the
    # word 'base' to the normalizer (refused); the fast path hands it over and says the same
    space = make_space(SpaceConfig(type="dfs"), _models(test_zoo), None)
    recipe = space.decode(space.initial())
    assert built_form(recipe) is None
    with pytest.raises(ConfigError) as old:
        normalize_recipe(recipe)
    with pytest.raises(ConfigError) as new:
        space.plan(space.initial())
    assert str(new.value) == str(old.value) == "tokenizer_source: 'base' needs a base_model"


def test_remote_spaces_keep_their_own_compiler():
    pool = make_space(SpaceConfig(type="lora_pool"), {f"m{i}": f"pool:ad{i}" for i in range(3)}, None)
    mix = make_space(SpaceConfig(type="output_mixture", options={"top_logprobs": 3}),
                     {"m1": "api:http://127.0.0.1:1/v1", "m2": "api:http://127.0.0.1:2/v1"}, None)
    for space in (pool, mix):
        for g in _genomes(space, n=2):
            recipe = space.decode(g)
            _assert_same(space.plan(g), space.compile(recipe))


def test_user_shaped_recipes_fall_back_to_normalizing(test_zoo, tmp_path, monkeypatch):
    base, a = str(test_zoo.base.path), str(test_zoo.experts[0].path)
    user = {"method": "ties", "base_model": base, "random_seed": 2, "out_dtype": "bf16",
            "models": [a, {"model": base}], "parameters": {"density": 0.5},
            "tokenizer_source": "base"}
    assert built_form(user) is None
    assert normalize_built(user) == normalize_recipe(user)
    # relative source paths, aliases of dtype, tokenizer 'base': still the fast path, same form
    monkeypatch.chdir(os.path.dirname(base))
    rel = {"merge_method": "ties", "sources": {"b": os.path.basename(base), "x": a + "/."},
           "base_model": "b", "models": [{"model": "x", "parameters": {"weight": [0.2, 1]}}],
           "dtype": "BF16", "tokenizer_source": "base", "seed": None}
    fast = built_form(rel)
    assert fast is not None and json.dumps(fast) == json.dumps(normalize_recipe(rel))
    # what normalizing refuses is still refused, with its one line
    for bad, msg in [({**rel, "merge_method": "tiez"}, "did you mean 'ties'"),
                     ({**rel, "sources": {"b": str(tmp_path / "gone")}}, "not found"),
                     ({**rel, "models": [{"model": "nope"}]}, "models\\[0\\].model")]:
        assert built_form(bad) is None
        with pytest.raises(ConfigError, match=msg):
            normalize_built(bad)
