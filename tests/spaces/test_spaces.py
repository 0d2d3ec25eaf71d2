"""Search spaces decode genomes to the right recipes and plans (on the test zoo)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evomerge.config import SpaceConfig
from evomerge.errors import ConfigError, PlanError
from evomerge.materialize import Materializer
from evomerge.spaces import make_space


def _models(zoo):
    return {"base": str(zoo.base.path), **{m.name: str(m.path) for m in zoo.experts}}


def _step(plan, name):
    return plan.step_for(name)


def test_parameter_space_layout_and_decoding(test_zoo):
    cfg = SpaceConfig(type="parameter", method="ties", layer_groups="layer",
                      params={"weight": {"low": 0.0, "high": 2.0, "init": 1.0},
                              "density": {"low": 0.0, "high": 1.0, "init": 0.5}})
    space = make_space(cfg, _models(test_zoo), "base")
    L, E = space.num_layers, 3
    assert L == 2
    assert space.dim == (L + 1) * 2 * E  # (layers + non-layer group) x params x experts
    assert np.allclose(space.initial(), [0.5] * space.dim)
    g = np.zeros(space.dim)
    names = space.names
    g[names.index("layers1-1.weight.expert_b")] = 0.75  # -> 1.5
    g[names.index("non_layer.density.expert_c")] = 0.2
    plan = space.plan(g)
    step = _step(plan, "model.layers.1.mlp.up_proj.weight")
    assert step.op == "ties" and step.base.model == "base"
    assert [r.model for r in step.inputs] == ["expert_a", "expert_b", "expert_c"]
    assert step.params["weight"] == [0.0, 1.5, 0.0]
    step0 = _step(plan, "model.layers.0.mlp.up_proj.weight")
    assert step0.params["weight"] == [0.0, 0.0, 0.0]
    emb = _step(plan, "model.embed_tokens.weight")
    assert emb.params["density"] == [0.0, 0.0, 0.2]
    assert plan.hash() == space.plan(g).hash()  # deterministic


def test_parameter_space_attn_mlp_split_and_smoothing(test_zoo):
    cfg = SpaceConfig(type="parameter", method="task_arithmetic", layer_groups=1,
                      split_attn_mlp=True, non_layer="uniform",
                      params={"weight": {"low": 0.0, "high": 1.0, "init": 0.5}})
    space = make_space(cfg, _models(test_zoo), "base")
    assert space.dim == 1 * 2 * 3  # one group, attn/mlp, three experts
    g = np.array([1.0, 0.0, 0.0, 0.0, 1.0, 0.0])  # attn: a=1 ; mlp: b=1
    plan = space.plan(g)
    assert _step(plan, "model.layers.0.self_attn.q_proj.weight").params["weight"] == [1.0, 0.0, 0.0]
    assert _step(plan, "model.layers.0.mlp.down_proj.weight").params["weight"] == [0.0, 1.0, 0.0]
    assert _step(plan, "model.embed_tokens.weight").params["weight"] == [0.5, 0.5, 0.5]


def test_parameter_space_errors(test_zoo):
    with pytest.raises(ConfigError, match="space.params.density: operator 'task_arithmetic' has no parameter"):
        make_space(SpaceConfig(method="task_arithmetic",
                               params={"density": {"low": 0, "high": 1}}), _models(test_zoo), "base")
    with pytest.raises(ConfigError, match="needs base_model"):
        make_space(SpaceConfig(method="ties"), _models(test_zoo), None)
    with pytest.raises(PlanError, match="unknown merge operator 'tiez'"):
        make_space(SpaceConfig(method="tiez"), _models(test_zoo), "base")
    with pytest.raises(ConfigError, match="layer_groups: 3 groups for a model with 2 layers"):
        make_space(SpaceConfig(layer_groups=3), _models(test_zoo), "base")


def test_layer_swap_space(test_zoo):
    cfg = SpaceConfig(type="layer_swap", outer="expert_a", inner="expert_b")
    space = make_space(cfg, _models(test_zoo), "base")
    assert space.names == ["k_bottom", "k_top", "non_layer"]
    plan = space.plan(np.array([1.0, 0.0, 0.0]))  # bottom layer from a, top from b, embeddings b
    s0 = _step(plan, "model.layers.0.self_attn.q_proj.weight")
    s1 = _step(plan, "model.layers.1.self_attn.q_proj.weight")
    assert (s0.inputs[0].model, s0.inputs[0].tensor) == ("expert_a", "model.layers.0.self_attn.q_proj.weight")
    assert s1.inputs[0].model == "expert_b"
    assert _step(plan, "model.embed_tokens.weight").inputs[0].model == "expert_b"
    w = dict(Materializer(device="cpu").iter_tensors(plan))
    from evomerge.checkpoint import open_checkpoint

    a = open_checkpoint(str(test_zoo.experts[0].path))
    assert torch.equal(w["model.layers.0.mlp.up_proj.weight"], a.get("model.layers.0.mlp.up_proj.weight"))


def test_per_layer_source_mix(test_zoo):
    cfg = SpaceConfig(type="layer_swap", per_layer=True, temperature=0.5)
    space = make_space(cfg, _models(test_zoo), "base")
    assert space.dim == 2 * 3 + 3
    g = np.array([1, 0, 0, 0, 0, 1, 0, 1, 0], dtype=float)
    recipe = space.decode(g)
    assert recipe["merge_method"] == "linear" and recipe["non_layer"] == {"model": "expert_b"}
    plan = space.compile(recipe)
    step = _step(plan, "model.layers.1.mlp.up_proj.weight")
    assert [r.model for r in step.inputs] == ["expert_a", "expert_b", "expert_c"]
    w = np.array(step.params["weight"])
    assert w.argmax() == 2 and abs(w.sum() - 1) < 1e-3
    hard = make_space(SpaceConfig(type="layer_swap", per_layer=True), _models(test_zoo), "base")
    assert hard.decode(g)["merge_method"] == "passthrough"


def _flat(weights, names):
    return torch.cat([weights[n].double().reshape(-1) for n in names]).numpy()


def test_m2n2_members_compile_to_exact_weights(test_zoo):
    from evomerge.checkpoint import open_checkpoint
    from evomerge.optim.m2n2_core import split_point_crossover

    models = _models(test_zoo)
    space = make_space(SpaceConfig(type="m2n2"), models, "base")
    names = space.tensors
    readers = {k: open_checkpoint(p) for k, p in models.items()}
    src = {k: _flat({n: r.get(n) for n in names}, names) for k, r in readers.items()}
    mat = Materializer(device="cpu")
    # a source's one-hot member materializes to that source exactly
    w = dict(mat.iter_tensors(space.plan(space.member("expert_b"))))
    assert np.array_equal(_flat(w, names), src["expert_b"])
    # the Gram matrix is the sources' inner products
    g = space.gram
    assert np.isclose(g.sum(axis=0)[1, 2], src["expert_a"] @ src["expert_b"])
    # crossover on coefficient tables == split-point SLERP on the actual weight vectors
    cx = space.optimizer_extras("m2n2")["crossover"]
    rng = np.random.default_rng(0)
    pa = 0.6 * space.member("expert_a") + 0.4 * space.member("base")
    pb = space.member("expert_c")
    w_s = float(cx.bounds[3] / cx.bounds[-1])  # a tensor boundary
    child = cx(pa, pb, 0.3, w_s, rng)
    va = _flat(dict(mat.iter_tensors(space.plan(pa))), names)
    vb = src["expert_c"]
    expect = split_point_crossover(va, vb, 0.3, int(cx.bounds[3]))
    got = _flat(dict(mat.iter_tensors(space.plan(child))), names)
    assert np.allclose(got, expect, atol=1e-5)
    # without split point: one SLERP of the whole vectors
    child1 = cx(pa, pb, 0.3, None, rng)
    from evomerge.optim.m2n2_core import slerp

    got1 = _flat(dict(mat.iter_tensors(space.plan(child1))), names)
    assert np.allclose(got1, slerp(va, vb, 0.3), atol=1e-5)
