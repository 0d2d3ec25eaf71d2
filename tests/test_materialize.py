"""The materializer: a MergePlan run into a resident model (in place) or to disk.

Test-only operators (``_test_scale``, ``_test_noise``) keep these tests independent of the
real operator set; the tests at the end use the real ``linear`` / ``passthrough`` /
``task_arithmetic`` operators when they are registered.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from tiny_models import make_tiny_expert, make_tiny_llama, make_tiny_lora

from evomerge.checkpoint import CheckpointReader, clear_reader_cache, open_checkpoint
from evomerge.errors import CheckpointError, PlanError
from evomerge.materialize import Materializer
from evomerge.ops import registry
from evomerge.output_config import apply_config_overrides
from evomerge.plan import MergePlan, TensorRef, TensorStep

torch.set_num_threads(1)

_HAVE_BUILTIN_OPS = importlib.util.find_spec("evomerge.ops.builtin") is not None


@pytest.fixture(autouse=True)
def _ops_and_cache(monkeypatch):
    if not _HAVE_BUILTIN_OPS:  # the operator package is not there yet: test ops only
        monkeypatch.setattr(registry, "_load_builtin_ops", lambda: None)
    clear_reader_cache()
    yield
    clear_reader_cache()


def _scale(tensors, base, params, ctx):
    """sum_i weight_i * x_i (+ base when given): a linear map easy to check by hand."""
    out = torch.zeros_like(tensors[0])
    for w, t in zip(params["weight"], tensors):
        out.add_(t, alpha=w)
    if base is not None:
        out.add_(base)
    return out


def _noise(tensors, base, params, ctx):
    """x_0 + sigma * N(0, 1) drawn from the step's seeded generator."""
    noise = torch.randn(tensors[0].shape, generator=ctx.generator, device=ctx.device)
    return tensors[0] + params["sigma"] * noise


if "_test_scale" not in registry._OPS:
    registry.register_op("_test_scale", per_input=("weight",), defaults={"weight": 1.0})(_scale)
    registry.register_op("_test_noise", defaults={"sigma": 0.1}, max_inputs=1, random=True)(_noise)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("mat")
    base = make_tiny_llama(root / "a", seed=0)
    return {
        "a": base,
        "b": make_tiny_expert(base, root / "b", seed=1, scale=0.05),
        "c": make_tiny_expert(base, root / "c", seed=2, scale=0.05),
        "wide": make_tiny_llama(root / "wide", seed=0, hidden=32),
        "untied": make_tiny_llama(root / "untied", seed=3, tie=False),
        "bf16": make_tiny_llama(root / "bf16", seed=4, dtype=torch.bfloat16),
    }


def linear_plan(zoo, weights=(0.5, 0.5), keys=("a", "b"), **kw) -> MergePlan:
    names = CheckpointReader(zoo[keys[0]]).names
    steps = [
        TensorStep(n, "_test_scale", [TensorRef(k, n) for k in keys], params={"weight": list(weights)})
        for n in names
    ]
    return MergePlan(sources={k: str(zoo[k]) for k in keys}, steps=steps, base=keys[0], **kw)


def expected_linear(zoo, name, weights=(0.5, 0.5), keys=("a", "b")):
    return sum(w * CheckpointReader(zoo[k]).get(name) for w, k in zip(weights, keys))


def load_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def generate(model):
    ids = torch.tensor([[1, 5, 6, 7]])
    return model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)


# -- iter_tensors -------------------------------------------------------------------------
def test_iter_tensors_runs_each_step_in_order(zoo):
    plan = linear_plan(zoo, weights=(0.25, 0.75))
    m = Materializer(device="cpu")
    out = list(m.iter_tensors(plan))
    assert [n for n, _ in out] == plan.output_names
    for name, t in out:
        assert t.dtype == torch.float32 and t.device.type == "cpu"
        assert torch.allclose(t, expected_linear(zoo, name, (0.25, 0.75)), atol=1e-7)


def test_default_device():
    assert Materializer().device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def test_streams_one_step_at_a_time(zoo):
    plan = linear_plan(zoo)
    m = Materializer(device="cpu")
    it = m.iter_tensors(plan)
    name, t = next(it)
    one_step = 2 * t.numel() * 4  # two float32 inputs
    assert m.bytes_read == one_step  # nothing else read yet
    rest = list(it)
    assert len(rest) == len(plan.steps) - 1
    assert m.bytes_read == sum(2 * t.numel() * 4 for _, t in [(name, t), *rest])


def test_output_dtype_follows_plan_then_config_source(zoo):
    plan = linear_plan(zoo, dtype="bfloat16")
    assert {t.dtype for _, t in Materializer("cpu").iter_tensors(plan)} == {torch.bfloat16}
    names = CheckpointReader(zoo["bf16"]).names
    plan16 = MergePlan(
        sources={"x": str(zoo["bf16"])},
        steps=[TensorStep(n, "_test_scale", [TensorRef("x", n)], params={"weight": [2.0]}) for n in names],
    )
    got = dict(Materializer("cpu").iter_tensors(plan16))
    r = CheckpointReader(zoo["bf16"])
    for n in names:
        assert got[n].dtype == torch.bfloat16
        assert torch.equal(got[n], (2.0 * r.get(n).float()).to(torch.bfloat16))


def test_random_ops_are_seeded_per_plan_seed_and_tensor(zoo):
    names = CheckpointReader(zoo["a"]).names

    def plan(seed):
        return MergePlan(
            sources={"a": str(zoo["a"])},
            steps=[TensorStep(n, "_test_noise", [TensorRef("a", n)]) for n in names],
            seed=seed,
        )

    r1 = dict(Materializer("cpu").iter_tensors(plan(7)))
    r2 = dict(Materializer("cpu").iter_tensors(plan(7)))
    r3 = dict(Materializer("cpu").iter_tensors(plan(8)))
    assert all(torch.equal(r1[n], r2[n]) for n in names)
    assert not any(torch.equal(r1[n], r3[n]) for n in names)
    # one plan in another order gives the same tensors (seed per tensor, not per position)
    p = plan(7)
    p.steps.reverse()
    r4 = dict(Materializer("cpu").iter_tensors(p))
    assert all(torch.equal(r1[n], r4[n]) for n in names)
    n1, n2 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    a = CheckpointReader(zoo["a"])
    assert not torch.allclose(r1[n1] - a.get(n1), r1[n2] - a.get(n2))


def test_cache_sources_reads_once(zoo):
    plan = linear_plan(zoo)
    streaming = Materializer("cpu")
    cached = Materializer("cpu", cache_sources=True)
    first = dict(cached.iter_tensors(plan))
    read_once = cached.bytes_read
    assert read_once > 0
    second = dict(cached.iter_tensors(linear_plan(zoo, weights=(1.0, 0.0))))
    assert cached.bytes_read == read_once  # all from the cache
    assert torch.equal(second["model.norm.weight"], CheckpointReader(zoo["a"]).get("model.norm.weight"))
    ref = dict(streaming.iter_tensors(plan))
    assert all(torch.equal(first[n], ref[n]) for n in ref)
    list(streaming.iter_tensors(plan))
    assert streaming.bytes_read == 2 * read_once


def test_lora_source_is_read_densely(tmp_path, zoo):
    adapter = make_tiny_lora(zoo["a"], tmp_path / "lora")
    names = CheckpointReader(zoo["a"]).names
    plan = MergePlan(
        sources={"base": str(zoo["a"]), "lora": str(adapter)},
        steps=[TensorStep(n, "_test_scale", [TensorRef("base", n), TensorRef("lora", n)], params={"weight": [0.5, 0.5]}) for n in names],
    )
    got = dict(Materializer("cpu").iter_tensors(plan))
    dense = open_checkpoint(adapter)
    base = CheckpointReader(zoo["a"])
    q = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(got[q], 0.5 * base.get(q) + 0.5 * dense.get(q), atol=1e-6)
    assert not torch.allclose(got[q], base.get(q))


# -- plan and source checks ---------------------------------------------------------------
def test_bad_plans_fail_before_any_math(tmp_path, zoo):
    m = Materializer("cpu")
    plan = linear_plan(zoo)
    plan.steps[3].op = "no_such_op"
    with pytest.raises(PlanError, match="unknown merge operator 'no_such_op'"):
        list(m.iter_tensors(plan))

    plan = linear_plan(zoo)
    plan.steps[0].inputs[1] = TensorRef("zzz", plan.steps[0].output)
    with pytest.raises(PlanError, match="unknown source model 'zzz'"):
        list(m.iter_tensors(plan))

    plan = linear_plan(zoo)
    plan.steps[2].params["weight"] = [1.0, 2.0, 3.0]
    with pytest.raises(PlanError, match="'weight' has 3 values for 2 input models"):
        list(m.iter_tensors(plan))

    plan = linear_plan(zoo)
    plan.steps[-1].inputs[1] = TensorRef("b", "model.layers.0.mlp.gate_proj.bias")
    with pytest.raises(PlanError, match="reads 'model.layers.0.mlp.gate_proj.bias', which model 'b' .* does not have"):
        list(m.iter_tensors(plan))
    assert m.bytes_read == 0


def test_layer_index_out_of_range_is_named(zoo):
    plan = linear_plan(zoo)
    step = plan.steps[5]
    suffix = CheckpointReader(zoo["a"]).layout.suffix_of(step.output)
    step.inputs[0] = TensorRef("a", f"model.layers.5.{suffix}")
    with pytest.raises(PlanError, match=r"layer index 5 is out of range for model 'a' .* which has 2 layers \(0\.\.1\)"):
        list(Materializer("cpu").iter_tensors(plan))


def test_input_shape_mismatch_names_tensors_and_models(zoo):
    plan = linear_plan(zoo, keys=("a", "wide"))
    with pytest.raises(PlanError, match=r"input 'model.*' of model 'wide' has shape \[.*32.*\] but .* of model 'a' has"):
        list(Materializer("cpu").iter_tensors(plan))


def test_missing_source_directory(tmp_path, zoo):
    plan = linear_plan(zoo)
    plan.sources["b"] = str(tmp_path / "gone")
    with pytest.raises(CheckpointError, match="source model 'b': checkpoint directory .*gone does not exist"):
        list(Materializer("cpu").iter_tensors(plan))


# -- in place -----------------------------------------------------------------------------
def test_materialize_into_writes_in_place(zoo):
    model = load_model(zoo["a"])
    target = model.state_dict()
    ptrs = {n: t.data_ptr() for n, t in target.items()}
    m = Materializer("cpu")
    for weights in [(0.5, 0.5), (1.5, -0.5)]:
        plan = linear_plan(zoo, weights=weights)
        stats = m.materialize_into(plan, target)
        assert stats["tensors"] == len(plan.steps) and stats["seconds"] > 0
        assert stats["bytes"] == sum(t.numel() * 4 for n, t in target.items() if n != "lm_head.weight")
        ref = dict(m.iter_tensors(plan))
        after = model.state_dict()
        for n, t in after.items():
            assert t.data_ptr() == ptrs[n], n  # no reallocation
        for n, t in ref.items():
            assert torch.equal(after[n], t), n
        assert torch.equal(after["lm_head.weight"], ref["model.embed_tokens.weight"])  # tied
        assert torch.equal(model.lm_head.weight, ref["model.embed_tokens.weight"])
    assert generate(model).shape == (1, 8)


def test_materialize_into_casts_to_target_dtype(zoo):
    model = load_model(zoo["a"]).to(torch.bfloat16)
    plan = linear_plan(zoo, dtype="bfloat16")
    Materializer("cpu").materialize_into(plan, model.state_dict())
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(model.state_dict()[name], expected_linear(zoo, name).to(torch.bfloat16))


def test_materialize_into_rejects_mismatched_targets(zoo):
    m = Materializer("cpu")
    plan = linear_plan(zoo)
    wide = load_model(zoo["wide"]).state_dict()
    with pytest.raises(PlanError, match=r"tensor 'model.embed_tokens.weight': the plan produces shape \[40, 16\] but the target model's tensor has \[40, 32\]"):
        m.materialize_into(plan, wide)
    target = load_model(zoo["a"]).state_dict()
    del target["model.norm.weight"]
    with pytest.raises(PlanError, match="plan produces tensor 'model.norm.weight' which the target model lacks"):
        m.materialize_into(plan, target)
    # an untied target has an lm_head the plan (from tied sources) does not produce
    untied = load_model(zoo["untied"]).state_dict()
    before = untied["lm_head.weight"].clone()
    with pytest.raises(PlanError, match="target tensor 'lm_head.weight' is not produced by the plan"):
        m.materialize_into(plan, untied)
    m.materialize_into(plan, untied, keep=["lm_head.weight"])
    assert torch.equal(untied["lm_head.weight"], before)


def test_tied_pair_both_produced(zoo):
    model = load_model(zoo["a"])
    target = model.state_dict()
    plan = linear_plan(zoo)
    emb = "model.embed_tokens.weight"
    plan.steps.append(TensorStep("lm_head.weight", "_test_scale", [TensorRef("a", emb), TensorRef("b", emb)], params={"weight": [0.5, 0.5]}))
    Materializer("cpu").materialize_into(plan, target)  # same values: fine, written once
    plan.steps[-1].params["weight"] = [0.4, 0.6]
    with pytest.raises(PlanError, match="'lm_head.weight' is tied to another tensor .* different values"):
        Materializer("cpu").materialize_into(plan, target)


# -- to disk ------------------------------------------------------------------------------
def test_materialize_to_disk_loads_and_generates(tmp_path, zoo):
    from transformers import AutoTokenizer

    plan = linear_plan(zoo, keys=("a", "b", "c"), weights=(0.2, 0.3, 0.5), tokenizer_source="c")
    plan.meta = {"method": "linear", "scores": {"math": 0.5}}
    out = Materializer("cpu").materialize_to_disk(plan, tmp_path / "merged", shard_size="4KB")
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert (out / "generation_config.json").is_file()
    card = (out / "README.md").read_text()
    assert "`linear`" in card and "| math | search | 0.5 |" in card and plan.hash() in card
    recipe = (out / "evomerge_recipe.yaml").read_text()
    assert MergePlan.from_dict(__import__("yaml").safe_load(recipe)["merge_plan"]).hash() == plan.hash()
    model = load_model(out)
    sd = model.state_dict()
    for name in plan.output_names:
        assert torch.allclose(sd[name], expected_linear(zoo, name, (0.2, 0.3, 0.5), ("a", "b", "c")), atol=1e-6)
    assert generate(model).shape == (1, 8)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.decode(tok("abc")["input_ids"], skip_special_tokens=True) == "abc"


def test_frankenmerge_changes_layer_count(tmp_path, zoo):
    a = CheckpointReader(zoo["a"])
    lay = a.layout
    picks = [("a", 0), ("b", 1), ("a", 1)]  # output layer i <- (model, layer j)
    steps = []
    for name in a.names:
        j = lay.layer_of(name)
        if j is None:
            steps.append(TensorStep(name, "_test_scale", [TensorRef("a", name)]))
            continue
        if j != 0:
            continue
        suffix = lay.suffix_of(name)
        for i, (model, src_layer) in enumerate(picks):
            steps.append(TensorStep(lay.layer_tensor(i, suffix), "_test_scale", [TensorRef(model, lay.layer_tensor(src_layer, suffix))]))
    plan = MergePlan(sources={"a": str(zoo["a"]), "b": str(zoo["b"])}, steps=steps, base="a")
    m = Materializer("cpu")
    with pytest.raises(PlanError, match="plan produces 3 layers but the output config says num_hidden_layers=2"):
        m.materialize_to_disk(plan, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
    plan.config_overrides = {"num_hidden_layers": 3}
    out = m.materialize_to_disk(plan, tmp_path / "frank")
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    model = load_model(out)
    b = CheckpointReader(zoo["b"])
    sd = model.state_dict()
    assert torch.equal(sd["model.layers.1.mlp.up_proj.weight"], b.get("model.layers.1.mlp.up_proj.weight"))
    assert torch.equal(sd["model.layers.2.mlp.up_proj.weight"], a.get("model.layers.1.mlp.up_proj.weight"))
    assert generate(model).shape == (1, 8)
    # a gap in the produced layers is caught too
    plan.steps = [s for s in plan.steps if not s.output.startswith("model.layers.1.")]
    with pytest.raises(PlanError, match=r"no tensor of layer\(s\) \[1\]"):
        m.materialize_to_disk(plan, tmp_path / "gap")


def test_incomplete_plan_is_refused_before_writing(tmp_path, zoo):
    plan = linear_plan(zoo)
    plan.steps = [s for s in plan.steps if s.output not in ("model.norm.weight", "model.layers.1.mlp.up_proj.weight")]
    with pytest.raises(PlanError, match="does not produce tensor\\(s\\) 'model.norm.weight', 'model.layers.1.mlp.up_proj.weight' that the architecture of config source 'a' needs"):
        Materializer("cpu").materialize_to_disk(plan, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_apply_config_overrides():
    cfg = {"num_hidden_layers": 2, "layer_types": ["full", "full"], "rope": {"theta": 1.0, "type": "x"}}
    out = apply_config_overrides(cfg, {"num_hidden_layers": 3, "rope": {"theta": 2.0}})
    assert out == {"num_hidden_layers": 3, "layer_types": ["full"] * 3, "rope": {"theta": 2.0, "type": "x"}}
    assert cfg["rope"]["theta"] == 1.0  # input untouched
    with pytest.raises(PlanError, match="layer_types"):
        apply_config_overrides({"num_hidden_layers": 2, "layer_types": ["a", "b"]}, {"num_hidden_layers": 3})


def test_explicit_tokenizer_source_without_tokenizer(tmp_path, zoo):
    bare = make_tiny_llama(tmp_path / "bare", seed=0, tokenizer=False)
    plan = linear_plan({**zoo, "bare": bare}, keys=("a", "bare"), tokenizer_source="bare")
    with pytest.raises(CheckpointError, match="tokenizer_source 'bare' .* has no tokenizer files"):
        Materializer("cpu").materialize_to_disk(plan, tmp_path / "o")


# -- with the real operators --------------------------------------------------------------
def _real_ops() -> set[str]:
    if not _HAVE_BUILTIN_OPS:
        return set()
    return set(registry.list_ops())


needs_ops = pytest.mark.skipif(
    not {"linear", "passthrough", "task_arithmetic"} <= _real_ops(),
    reason="operators linear/passthrough/task_arithmetic not registered yet",
)


@needs_ops
def test_real_linear_and_task_arithmetic(tmp_path, zoo):
    a, b, c = (CheckpointReader(zoo[k]) for k in "abc")
    names = a.names
    sources = {k: str(zoo[k]) for k in "abc"}
    lin = MergePlan(
        sources=sources,
        steps=[TensorStep(n, "linear", [TensorRef("b", n), TensorRef("c", n)], params={"weight": [1.0, 3.0]}) for n in names],
    )
    ta = MergePlan(
        sources=sources,
        base="a",
        steps=[
            TensorStep(n, "task_arithmetic", [TensorRef("b", n), TensorRef("c", n)], base=TensorRef("a", n), params={"weight": [0.5, 1.0]})
            for n in names
        ],
    )
    m = Materializer("cpu")
    got_lin = dict(m.iter_tensors(lin))
    got_ta = dict(m.iter_tensors(ta))
    for n in names:
        # linear normalizes by the weight sum by default (mergekit)
        assert torch.allclose(got_lin[n], (b.get(n) + 3 * c.get(n)) / 4, atol=1e-6), n
        want = a.get(n) + 0.5 * (b.get(n) - a.get(n)) + 1.0 * (c.get(n) - a.get(n))
        assert torch.allclose(got_ta[n], want, atol=1e-6), n
    out = m.materialize_to_disk(ta, tmp_path / "ta")
    assert generate(load_model(out)).shape == (1, 8)


@needs_ops
def test_real_passthrough_layer_stack(tmp_path, zoo):
    a = CheckpointReader(zoo["a"])
    lay = a.layout
    steps = [TensorStep(n, "passthrough", [TensorRef("a", n)]) for n in a.names if lay.layer_of(n) is None]
    for n in a.names:
        if lay.layer_of(n) == 0:
            s = lay.suffix_of(n)
            for i, (mdl, j) in enumerate([("b", 1), ("c", 0), ("a", 1), ("b", 0)]):
                steps.append(TensorStep(lay.layer_tensor(i, s), "passthrough", [TensorRef(mdl, lay.layer_tensor(j, s))]))
    plan = MergePlan(sources={k: str(zoo[k]) for k in "abc"}, steps=steps, config_source="a", config_overrides={"num_hidden_layers": 4})
    out = Materializer("cpu").materialize_to_disk(plan, tmp_path / "stack")
    model = load_model(out)
    sd = model.state_dict()
    c = CheckpointReader(zoo["c"])
    assert torch.equal(sd["model.layers.1.self_attn.o_proj.weight"], c.get("model.layers.0.self_attn.o_proj.weight"))
    assert generate(model).shape == (1, 8)


@needs_ops
def test_real_ops_do_not_modify_their_inputs(zoo):
    """Float32 CPU inputs are views of the memory-mapped files: operators must not write them."""
    a = CheckpointReader(zoo["a"])
    names = a.names
    snapshot = {k: {n: CheckpointReader(zoo[k]).get(n).clone() for n in names} for k in "abc"}
    candidates = {
        "linear": {"weight": [0.3, 0.7]},
        "task_arithmetic": {"weight": [0.3, 0.7]},
        "ties": {"weight": [0.3, 0.7], "density": [0.5, 0.5]},
        "dare_ties": {"weight": [0.3, 0.7], "density": [0.5, 0.5]},
        "dare_linear": {"weight": [0.3, 0.7], "density": [0.5, 0.5]},
        "breadcrumbs": {"weight": [0.3, 0.7], "density": [0.8, 0.8], "gamma": [0.05, 0.05]},
        "breadcrumbs_ties": {"weight": [0.3, 0.7], "density": [0.8, 0.8], "gamma": [0.05, 0.05]},
        "della": {"weight": [0.3, 0.7], "density": [0.5, 0.5]},
        "della_linear": {"weight": [0.3, 0.7], "density": [0.5, 0.5]},
        "slerp": {"t": 0.3},
        "model_stock": {},
    }
    for op, params in candidates.items():
        if op not in _real_ops():
            continue
        needs_base = registry.get_op(op).needs_base
        plan = MergePlan(
            sources={k: str(zoo[k]) for k in "abc"},
            base="a" if needs_base else None,
            steps=[
                TensorStep(n, op, [TensorRef("b", n), TensorRef("c", n)], base=TensorRef("a", n) if needs_base else None, params=params)
                for n in names
            ],
            seed=3,
        )
        for m in (Materializer("cpu"), Materializer("cpu", cache_sources=True)):
            first = {n: t.clone() for n, t in m.iter_tensors(plan)}
            second = dict(m.iter_tensors(plan))
            for n in names:
                assert torch.equal(first[n], second[n]), (op, n)
        for k in "abc":
            r = open_checkpoint(zoo[k])  # the cached reader whose mapping the runs used
            for n in names:
                assert torch.equal(r.get(n), snapshot[k][n]), (op, k, n)
