"""Data-flow space (DFS): paths through several models' layers, exported as plain checkpoints."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.config import SpaceConfig, parse_config
from evomerge.errors import ConfigError, EvomergeError, IncompatibleModelsError, PlanError
from evomerge.materialize import Materializer
from evomerge.recipe import compile_recipe
from evomerge.spaces import make_space
from evomerge.spaces.dfs import dfs_recipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import (  # noqa: E402
    make_tiny_expert,
    make_tiny_gpt2,
    make_tiny_llama,
    scale_layer_inputs,
)

ROOT = Path(__file__).resolve().parents[2]
PROJ = ("self_attn.o_proj.", "mlp.down_proj.")
# a path 5 layers long through three 2-layer sources, one layer used twice, scaled transitions
PATH = [("a", 0), ("b", 1), ("c", 0), ("a", 1), ("b", 1)]
SCALES = [1.0, 1.7, 0.6, 1.3, 0.8]


def _sources(root: Path, eps: float | None = None) -> dict[str, str]:
    base = make_tiny_llama(root / "a", seed=0, hidden=16, layers=2)
    if eps is not None:
        cfg = json.loads((base / "config.json").read_text())
        cfg["rms_norm_eps"] = eps
        (base / "config.json").write_text(json.dumps(cfg))
    make_tiny_expert(base, root / "b", seed=1, scale=0.05)
    make_tiny_expert(base, root / "c", seed=2, scale=0.05)
    return {k: str(root / k) for k in "abc"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return _sources(tmp_path_factory.mktemp("dfs_src"))


@pytest.fixture(scope="module")
def exact_sources(tmp_path_factory):
    """Norm epsilon ~0: the folding is then exact up to float rounding."""
    return _sources(tmp_path_factory.mktemp("dfs_exact"), eps=1e-30)


def _space(models, **options):
    return make_space(SpaceConfig(type="dfs", options=options), models, None)


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path)).eval()


def test_genome_layout_path_cap_and_never_empty(sources):
    sp = _space(sources, repeats=2, max_path_length=4)
    assert sp.dim == 2 * 3 * 2 + 9 and len(sp.slots) == 12
    assert sp.names[0] == "on.r0.a.0" and sp.names[-1] == "scale.c->c"
    path, scales = sp.path(sp.initial())
    assert path == [("a", 0), ("a", 1)] and scales == [1.0, 1.0]
    g = np.zeros(sp.dim)
    g[12:] = 0.5  # scale 1
    g[7] = 0.3  # every indicator off: the largest gene's slot is kept
    assert sp.path(g)[0] == [sp.slots[7]]
    g[:12] = np.linspace(0.51, 0.99, 12)  # all on: the 4 largest genes, in slot order
    assert sp.path(g)[0] == sp.slots[8:]
    g[12:] = 1.0  # every transition scaled by 2: cumulative factors 1, 2, 4, 8
    recipe = sp.decode(g)
    plan = compile_recipe(recipe)
    assert plan.config_overrides["num_hidden_layers"] == 4
    assert plan.step_for("model.layers.3.self_attn.o_proj.weight").params["scale"] == 0.125
    assert plan.step_for("model.layers.3.mlp.down_proj.weight").params["scale"] == 0.125
    assert plan.step_for("model.layers.3.mlp.up_proj.weight").params["scale"] == 1.0
    assert plan.step_for("model.layers.0.self_attn.o_proj.weight").params["scale"] == 1.0
    assert len(sp.initial_population()) == 3
    sp = _space(sources, max_path_length=4, length_penalty=0.5)
    assert sp.fitness_penalty(sp.decode(sp.initial())) == pytest.approx(0.5)  # 2 of L=2 layers
    assert sp.backend_options("hf") == {"max_layers": 4}
    assert sp.optimizer_extras("subspace") == {"dims": list(range(12, 21))}  # the scales


def _direct_logits(models, ids):
    """Sakana's DFS as written: unscaled layer copies, the residual stream scaled by hooks."""
    model = _load(Materializer("cpu").materialize_to_disk(
        compile_recipe(dfs_recipe(models, PATH, [1.0] * len(PATH), "a", PROJ)),
        Path(models["a"]).parent / "direct", overwrite=True))
    scale_layer_inputs(model, SCALES)
    with torch.no_grad():
        return model(input_ids=ids).logits


def _folded_logits(models, ids):
    out = Path(models["a"]).parent / "folded"
    plan = compile_recipe(dfs_recipe(models, PATH, SCALES, "a", PROJ))
    model = _load(Materializer("cpu").materialize_to_disk(plan, out, overwrite=True))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_scaling_folds_into_output_projections(exact_sources, sources):
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 6, 30]])
    direct = _direct_logits(exact_sources, ids)
    folded = _folded_logits(exact_sources, ids)
    unscaled = _load(Path(exact_sources["a"]).parent / "direct")(input_ids=ids).logits
    assert (direct - unscaled).abs().max() > 1e-2  # the scales matter...
    torch.testing.assert_close(folded, direct, rtol=1e-4, atol=1e-5)  # ...and fold exactly
    # with the norm's epsilon (1e-6 here) and these tiny random embeddings the fold is
    # approximate: the error stays small next to the effect of the scales themselves
    err = (_folded_logits(sources, ids) - _direct_logits(sources, ids)).abs().max()
    assert err < 0.05 * (direct - unscaled).abs().max()


def test_export_matches_resident_evaluation_on_a_long_path(sources, tmp_path):
    """Exported checkpoint (plain AutoModelForCausalLM) == in-process DFS evaluation:
    logits and greedy outputs, for a path longer than any source (2 layers each)."""
    from evomerge.fitness.backends import make_backend

    sp = _space(sources, repeats=2, max_path_length=6)
    be = make_backend("hf", model_dir=sources["a"], max_layers=sp.max_path)
    mat = Materializer("cpu", cache_sources=True)
    plan = compile_recipe(dfs_recipe(sources, PATH, SCALES, "a", sp.projections))
    short = sp.plan(sp.initial())  # 2 layers
    prompts = ["abc", "hello wor", "7+8=", "x"]
    exported = _load(mat.materialize_to_disk(plan, tmp_path / "exp"))
    assert exported.config.num_hidden_layers == 5 and len(exported.model.layers) == 5
    ids = torch.tensor([[1, 5, 9, 13, 17, 21, 6, 30]])
    want = exported(input_ids=ids).logits
    for p in (plan, short, plan):  # switching the resident stack back and forth
        be.load_plan(p, mat)
        got = be.model(input_ids=ids).logits
        if p is plan:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
            outs = be.generate(prompts, 12)  # the backend's KV-cache loop, batched, left padded
    assert be.layer_slots.active == 5 and be.model.config.num_hidden_layers == 5
    layer_names = {n for n in be.target_tensors() if n.startswith("model.layers.")}
    assert layer_names == {n for n in plan.output_names if n.startswith("model.layers.")}
    tok = be.tokenizer
    for prompt, out in zip(prompts, outs):
        x = tok(prompt, return_tensors="pt")["input_ids"]
        cached = exported.generate(x, max_new_tokens=12, do_sample=False, eos_token_id=2,
                                   pad_token_id=0)[0, x.shape[1]:].tolist()
        # no cache at all: a fresh full forward per token, so the KV cache cannot hide errors
        seq = x
        for _ in range(12):
            nxt = exported(input_ids=seq, use_cache=False).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
        full = seq[0, x.shape[1]:].tolist()
        cut = full.index(2) if 2 in full else len(full)
        assert cached[:cut] == full[:cut]
        assert out == tok.decode(full[:cut], skip_special_tokens=True)
    # switched-off slots (o_proj/down_proj scaled by 0) are an exact identity
    padded = compile_recipe(dfs_recipe(sources, PATH, SCALES, "a", sp.projections, pad_to=6))
    be.load_plan(padded, mat)
    assert be.layer_slots.active == 6
    assert torch.equal(be.model(input_ids=ids).logits, got)
    with pytest.raises(EvomergeError, match="resident model holds 6"):
        be.layer_slots.activate(7)
    be.close()


def test_bad_configs_are_one_line_errors(sources, tmp_path):
    wide = make_tiny_llama(tmp_path / "wide", seed=3, hidden=32, layers=2)
    gpt = make_tiny_gpt2(tmp_path / "gpt", seed=0)
    gpt2b = make_tiny_gpt2(tmp_path / "gpt2b", seed=1)
    cases = [
        ({**sources, "w": str(wide)}, {}, IncompatibleModelsError, "shape|hidden|width"),
        ({"a": sources["a"], "g": str(gpt)}, {}, IncompatibleModelsError, "architecture"),
        ({"g": str(gpt), "h": str(gpt2b)}, {}, ConfigError, "gpt2"),
        (sources, {"repeats": 0}, ConfigError, "repeats"),
        (sources, {"max_path_length": 0}, ConfigError, "empty path"),
        (sources, {"scale_range": [2.0, 3.0]}, ConfigError, "scale_range"),
        (sources, {"sources": ["a", "zz"]}, ConfigError, "zz"),
        (sources, {"bogus": 1}, ConfigError, "bogus"),
    ]
    for models, opts, err, pattern in cases:
        with pytest.raises(err, match=pattern) as info:
            _space(models, **opts)
        assert "\n" not in str(info.value)
    with pytest.raises(PlanError, match="empty"):
        dfs_recipe(sources, [], [], "a", PROJ)
    with pytest.raises(ConfigError, match="hf backend"):
        _space(sources).backend_options("vllm")


def _run_cfg(zoo, optimizer, budget=6, **options):
    return parse_config({
        "name": "dfs",
        "models": {m.name: str(m.path) for m in zoo.experts},
        "space": {"type": "dfs", "options": {"repeats": 2, "max_path_length": 4, **options}},
        "optimizer": optimizer,
        "budget": budget,
        "tasks": [{"path": str(ROOT / "fitness/zoo/cipher_a.yaml")},
                  {"path": str(ROOT / "fitness/zoo/cipher_b.yaml")}],
        "backend": {"batch_size": 256},
        "executor": {"name": "local", "num_threads": 1},
    })


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", [
    {"name": "cma", "popsize": 4},
    {"name": "ng:DiscreteOnePlusOne"},
    {"name": "m2n2", "options": {"archive_size": 4}},
])
def test_search_and_export(test_zoo, tmp_path, optimizer):
    from evomerge.engine.export import export_top
    from evomerge.engine.runner import run_search
    from evomerge.engine.store import RunStore

    cfg = _run_cfg(test_zoo, optimizer, length_penalty=1.0)
    best = run_search(cfg, tmp_path / "run", progress=False)
    recs = RunStore(tmp_path / "run").read_evals()
    assert len(recs) == 6 and not any(r["failed"] for r in recs), [r["error"] for r in recs]
    for r in recs:  # the path-length penalty is in the fitness: 1.0 per L=2 layers
        n = len(r["recipe"]["slices"])
        raw = float(np.mean([r["scores"][t] for t in r["scores"]]))
        assert r["fitness"] == pytest.approx(raw - n / 2)
    (path,) = export_top(tmp_path / "run", 1, tmp_path / "out")
    model = _load(path)
    assert model.config.num_hidden_layers == len(best["recipe"]["slices"])


@pytest.mark.slow
def test_ps_then_dfs_chain(test_zoo, tmp_path):
    """A PS run's exported best is just another source of a DFS run, whose start point (the
    PS model's own path, embeddings and head) is the PS model exactly."""
    from evomerge.engine.export import export_top
    from evomerge.engine.runner import run_search
    from evomerge.engine.store import RunStore

    experts = {m.name: str(m.path) for m in test_zoo.experts}
    tasks = [{"path": str(ROOT / "fitness/zoo/cipher_a.yaml")},
             {"path": str(ROOT / "fitness/zoo/cipher_b.yaml")}]
    common = {"tasks": tasks, "backend": {"batch_size": 256},
              "executor": {"name": "local", "num_threads": 1}}
    ps_cfg = parse_config({
        "name": "ps", "models": {"base": str(test_zoo.base.path), **experts},
        "base_model": "base", "space": {"type": "parameter", "method": "task_arithmetic"},
        "optimizer": {"name": "cma", "popsize": 4}, "budget": 4, **common})
    run_search(ps_cfg, tmp_path / "ps", progress=False)
    (ps_dir,) = export_top(tmp_path / "ps", 1, tmp_path / "ps-export")
    cfg = parse_config({
        "name": "ps-dfs", "models": {"ps": str(ps_dir), **experts},
        "space": {"type": "dfs", "options": {"repeats": 1, "max_path_length": 3,
                                             "init_model": "ps", "non_layer": "ps"}},
        "optimizer": {"name": "cma", "popsize": 4}, "budget": 4, **common})
    run_search(cfg, tmp_path / "ps-dfs", progress=False)
    recs = RunStore(tmp_path / "ps-dfs").read_evals()
    assert len(recs) == 4 and not any(r["failed"] for r in recs)
    assert {s["sources"][0]["model"] for r in recs for s in r["recipe"]["slices"]} - {"ps"}
    # the DFS start point is the PS model itself, weight for weight
    space = make_space(cfg.space, dict(cfg.models), None)
    start = dict(Materializer("cpu").iter_tensors(space.plan(space.initial())))
    ps = _load(ps_dir).state_dict()
    assert set(start) <= set(ps)
    assert all(torch.equal(start[n], ps[n]) for n in start)


def test_cli_refuses_bad_dfs_runs_in_one_line_and_leaves_nothing(sources, tmp_path):
    import yaml
    from click.testing import CliRunner

    from evomerge.cli import main

    (tmp_path / "t.jsonl").write_text('{"input": "abc", "target": "1"}\n' * 4)
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(
        {"name": "t", "data": "t.jsonl", "prompt": "{input}>", "scoring": "exact_match"}))
    base = {"name": "bad", "models": sources, "tasks": [{"path": str(tmp_path / "t.yaml")}],
            "space": {"type": "dfs"}}
    cases = [({"space": {"type": "dfs", "options": {"repeats": 0}}}, "repeats"),
             ({"backend": {"name": "vllm"}}, "hf backend")]
    for over, pattern in cases:
        (tmp_path / "run.yaml").write_text(yaml.safe_dump({**base, **over}))
        res = CliRunner().invoke(main, ["run", str(tmp_path / "run.yaml"), "--runs-dir",
                                        str(tmp_path / "runs"), "--no-progress"])
        assert res.exit_code != 0
        lines = [ln for ln in res.output.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and pattern in lines[0], lines
        assert not (tmp_path / "runs" / "bad").exists()
