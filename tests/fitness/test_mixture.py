"""Output-level merging of API-only models: the mixture decoder, the output_mixture space,
the mixture backend, ensemble export and `evomerge serve --ensemble`, against real
`evomerge serve` endpoints on 127.0.0.1 over the test zoo's experts."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import numpy as np
import pytest
import yaml

from evomerge.config import SpaceConfig, parse_config
from evomerge.errors import BackendError, ConfigError, PlanError
from evomerge.fitness import load_task, make_backend
from evomerge.fitness.backends.mixture_decoder import (
    EOS,
    Endpoint,
    EndpointPool,
    MixtureDecoder,
    combine_distributions,
)
from evomerge.serve import make_server, start_in_thread
from evomerge.serve.ensemble import load_ensemble, make_ensemble_server, parse_ensemble
from evomerge.spaces import make_space

KEY_ENV = "EVOMERGE_MIXTURE_TEST_KEY"
KEY = "sk-mixture-test-0123456789-do-not-leak"


def call(url: str, body: dict, key: str | None = KEY) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def key_env():
    old = os.environ.get(KEY_ENV)
    os.environ[KEY_ENV] = KEY
    yield KEY_ENV
    if old is None:
        os.environ.pop(KEY_ENV, None)
    else:
        os.environ[KEY_ENV] = old


@pytest.fixture(scope="module")
def servers(test_zoo, key_env):
    """The three test-zoo experts behind keyed endpoints that list whole distributions."""
    out = []
    for name, path in test_zoo.expert_paths.items():
        s = make_server(path, port=0, model_name=name, api_key_env=key_env, batch_size=32,
                        max_logprobs=64, logprobs_eos=True)
        start_in_thread(s)
        out.append(s)
    yield out
    for s in out:
        s.stop()


@pytest.fixture(scope="module")
def pool(servers):
    p = EndpointPool([Endpoint(s.service.name, s.url) for s in servers],
                     {s.service.name: s.api_key for s in servers}, prompts_per_request=16)
    yield p
    p.close()


@pytest.fixture(scope="module")
def prompts(test_zoo):
    combined = load_task(test_zoo.task_yaml("combined")).examples("search")[:12]
    cross = load_task(test_zoo.task_yaml("cross")).examples("search")[:6]
    return [e.prompt for e in combined + cross]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- combining distributions ----------------------------------------------------------------


def test_combine_linear_log_linear_and_floors():
    a = {"x": math.log(0.6), "y": math.log(0.3)}  # 0.1 unlisted -> floor min(0.3, 0.1) = 0.1
    b = {"y": math.log(0.5), "z": math.log(0.45)}  # floor min(0.45, 0.05) = 0.05
    tok, s = combine_distributions([a, b], [0.5, 0.5], "linear")
    assert tok == "y" and s == pytest.approx(0.5 * 0.3 + 0.5 * 0.5)
    tok, s = combine_distributions([a, b], [0.9, 0.1], "linear")
    assert tok == "x" and s == pytest.approx(0.9 * 0.6 + 0.1 * 0.05)
    tok, s = combine_distributions([a, b], [0.5, 0.5], "log_linear")
    assert tok == "y" and s == pytest.approx(0.5 * math.log(0.3) + 0.5 * math.log(0.5))
    # a one-endpoint mixture is that endpoint's argmax
    assert combine_distributions([b], [1.0], "log_linear")[0] == "y"
    with pytest.raises(BackendError, match="combine"):
        combine_distributions([a], [1.0], "geometric")


def test_eos_spellings_and_learned_eos(pool):
    name = pool.endpoints[0].name
    dist = pool.next_token_dist(name, {"text": "", "finish_reason": "stop", "logprobs": {
        "tokens": ["</s>"], "token_logprobs": [-0.1], "top_logprobs": [{"</s>": -0.1, "7": -2.5}]}})
    assert dist == {EOS: -0.1, "7": -2.5}
    # an endpoint that ends with no logprobs entry: its greedy choice is EOS
    assert pool.next_token_dist(name, {"text": "", "finish_reason": "stop", "logprobs": {"tokens": []}}) == {EOS: 0.0}
    with pytest.raises(BackendError, match="no logprobs"):
        pool.next_token_dist(name, {"text": "3", "finish_reason": "length", "logprobs": None})


# -- the decoder against real endpoints -------------------------------------------------------


@pytest.mark.parametrize("combine", ["linear", "log_linear"])
def test_one_hot_mixture_reproduces_the_endpoints_greedy_answers(servers, pool, prompts, key_env, combine):
    api = make_backend("api", base_url=servers[0].url, api_key_env=key_env, prompts_per_request=32)
    try:
        direct = api.generate(prompts, 8)
    finally:
        api.close()
    before = pool.stats["endpoints"][servers[1].service.name]["requests"]
    dec = MixtureDecoder(pool, [1.0, 0.0, 0.0], combine, top_logprobs=5)
    assert dec.generate(prompts, 8) == direct
    assert pool.stats["endpoints"][servers[1].service.name]["requests"] == before  # weight 0: never asked


def _direct_mixture(dirs, weights, combine, prompts, max_new, eos_id):
    """Greedy decoding from the mixture of the full next-token distributions, in process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(dirs[0]))
    models = [AutoModelForCausalLM.from_pretrained(str(d)).eval() for d in dirs]
    outs = []
    for prompt in prompts:
        text = ""
        for _ in range(max_new):
            ids = torch.tensor([tok(prompt + text)["input_ids"]])
            with torch.inference_mode():
                logps = [m(input_ids=ids, use_cache=False).logits[0, -1].float().log_softmax(-1).double().numpy()
                         for m in models]
            if combine == "linear":
                score = sum(w * np.exp(lp) for w, lp in zip(weights, logps))
            else:
                score = sum(w * lp for w, lp in zip(weights, logps))
            nxt = int(np.argmax(score))
            if nxt == eos_id:
                break
            text += tok.decode([nxt])
        outs.append(text)
    return outs


@pytest.mark.parametrize("combine", ["linear", "log_linear"])
def test_two_endpoint_mixture_matches_the_full_distributions(test_zoo, servers, pool, prompts, combine):
    # experts b and c of the test zoo (barely trained) answer these prompts with a few tokens
    prompts = ["abcd:", "ab", "a", "fadcab>", "bafce>", "kqa:"] + prompts[:4]
    dirs = list(test_zoo.expert_paths.values())[1:3]
    tok_vocab = len(servers[0].service.tokenizer)
    assert tok_vocab <= 64  # the whole vocabulary fits in top_logprobs
    weights = [0.35, 0.65]
    dec = MixtureDecoder(pool, [0.0] + weights, combine, top_logprobs=tok_vocab)
    got = dec.generate(prompts, 8)
    want = _direct_mixture(dirs, weights, combine, prompts, 8, servers[0].service.tokenizer.eos_token_id)
    assert got == want
    assert any(g != "" for g in got)


def test_mixture_loglikelihood_matches_the_full_distributions(test_zoo, servers, pool):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dirs = list(test_zoo.expert_paths.values())[:2]
    tok = AutoTokenizer.from_pretrained(str(dirs[0]))
    models = [AutoModelForCausalLM.from_pretrained(str(d)).eval() for d in dirs]
    pairs = [("abc>", "012"), ("ijk>", "7"), ("qrs>", "55")]
    w = [0.25, 0.75]
    lin = MixtureDecoder(pool, w + [0.0], "linear").loglikelihood(pairs)
    loglin = MixtureDecoder(pool, w + [0.0], "log_linear", top_logprobs=len(tok)).loglikelihood(pairs)
    for (ctx, cont), a, b in zip(pairs, lin, loglin):
        ids = tok(ctx + cont)["input_ids"]
        n = len(cont)
        with torch.inference_mode():
            lps = [m(input_ids=torch.tensor([ids]), use_cache=False).logits[0].float().log_softmax(-1).double()
                   for m in models]
        want_lin = want_log = 0.0
        for pos in range(len(ids) - n, len(ids)):
            rows = [lp[pos - 1] for lp in lps]
            want_lin += math.log(sum(wi * math.exp(float(r[ids[pos]])) for wi, r in zip(w, rows)))
            mixed = sum(wi * r for wi, r in zip(w, rows))
            want_log += float(mixed[ids[pos]] - torch.logsumexp(mixed, 0))
        assert a.num_tokens == n and a.logprob == pytest.approx(want_lin, abs=1e-4)
        assert b.logprob == pytest.approx(want_log, abs=1e-4)


def test_stop_strings_cut_the_answer(pool, prompts):
    dec = MixtureDecoder(pool, [1, 0, 0], "linear")
    full = dec.generate(prompts, 8)
    stopped = dec.generate(prompts, 8, stop=[full[0][1:3]] if len(full[0]) >= 3 else ["\x01"])
    if len(full[0]) >= 3:
        assert stopped[0] == full[0][: full[0].index(full[0][1:3])]
    assert all(f.startswith(s) for f, s in zip(full, stopped))


def test_upstream_down_is_one_clear_line():
    port = _free_port()
    p = EndpointPool([Endpoint("gone", f"http://127.0.0.1:{port}/v1", model="m")], max_retries=0, timeout=5)
    try:
        with pytest.raises(BackendError) as err:
            MixtureDecoder(p, [1.0]).generate(["abc>"], 4)
    finally:
        p.close()
    msg = str(err.value)
    assert "\n" not in msg and "endpoint gone" in msg and f"127.0.0.1:{port}" in msg and "connection" in msg


# -- the space -------------------------------------------------------------------------------


def test_space_decodes_weights_and_compiles_a_control_plan():
    models = {"m1": "api:http://127.0.0.1:1/v1", "m2": "api:http://127.0.0.1:2/v1"}
    space = make_space(SpaceConfig(type="output_mixture", options={"combine": "log_linear", "top_logprobs": 7}),
                       models, None)
    assert space.remote and space.dim == 2
    recipe = space.decode(np.array([0.2, 0.6]))
    assert recipe["weights"] == {"m1": 0.25, "m2": 0.75} and recipe["combine"] == "log_linear"
    assert space.decode(np.zeros(2))["weights"] == {"m1": 0.5, "m2": 0.5}
    plan = space.compile(recipe)
    plan.validate()
    (step,) = plan.steps
    assert step.op == "output_mixture" and step.params["top_logprobs"] == 7
    assert plan.hash() != space.plan(np.array([0.6, 0.2])).hash()
    from evomerge.ops import get_op

    with pytest.raises(PlanError, match="decoding"):
        get_op("output_mixture").fn([], None, {}, None)
    bad = space.compile(dict(recipe, weights={"m1": 0.5, "m2": 0.7}))
    with pytest.raises(PlanError, match="sum to 1"):
        bad.validate()
    with pytest.raises(ConfigError, match="models.m1: output_mixture needs api:"):
        make_space(SpaceConfig(type="output_mixture"), {"m1": "/tmp/x", "m2": models["m2"]}, None)
    with pytest.raises(ConfigError, match="space.options.combine"):
        make_space(SpaceConfig(type="output_mixture", options={"combine": "max"}), models, None)
    with pytest.raises(ConfigError, match="space.options.temperature"):
        make_space(SpaceConfig(type="output_mixture", options={"temperature": 1}), models, None)


def test_ensemble_file_refuses_keys_and_bad_fields():
    good = {"endpoints": [{"name": "a", "base_url": "http://127.0.0.1:1/v1"}], "weights": [1.0]}
    assert parse_ensemble(good, "e.yaml").combine == "linear"
    for bad, match in [
        ({**good, "api_key": "sk-1"}, "api_key: unknown field .*api_key_env"),
        ({**good, "endpoints": [{"base_url": "http://x/v1", "key": "sk"}]}, r"endpoints\[0\].key: unknown field"),
        ({**good, "weights": [1.0, 2.0]}, "weights: required, one number per endpoint"),
        ({**good, "weights": [-1.0]}, "weights: must be finite"),
        ({**good, "combine": "max"}, "combine: must be one of"),
        ({"endpoints": [{"base_url": "ftp://x"}], "weights": [1]}, r"endpoints\[0\].base_url"),
    ]:
        with pytest.raises(ConfigError, match=match):
            parse_ensemble(bad, "e.yaml")


# -- a run, its export, the ensemble server ----------------------------------------------------------


@pytest.mark.slow
def test_search_export_and_serve_the_ensemble(test_zoo, servers, key_env, tmp_path):
    from evomerge.engine.export import export_top
    from evomerge.engine.runner import run_search
    from evomerge.engine.store import RunStore

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    for name in ("combined", "cross"):
        spec = yaml.safe_load(test_zoo.task_yaml(name).read_text())
        spec["data"] = str(test_zoo.tasks_dir / spec["data"])
        spec["heldout_data"] = str(test_zoo.tasks_dir / spec["heldout_data"])
        spec["num_examples"] = 10
        (tasks / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    cfg = parse_config({
        "name": "mixture-test",
        "models": {s.service.name: f"api:{s.url}" for s in servers},
        "space": {"type": "output_mixture", "options": {"combine": "linear"}},
        "optimizer": {"name": "cma", "popsize": 3},
        "tasks": [{"path": str(tasks / "combined.yaml")}, {"path": str(tasks / "cross.yaml")}],
        "backend": {"name": "mixture", "options": {"api_key_env": key_env, "top_logprobs": 5}},
        "budget": 4,
    }, "test")
    run_dir = tmp_path / "run"
    best = run_search(cfg, run_dir, progress=False)
    records = RunStore.open(run_dir).read_evals()
    assert best is not None and len(records) == 4 and not any(r["failed"] for r in records), records
    weights = best["recipe"]["weights"]
    assert sum(weights.values()) == pytest.approx(1.0)

    (target,) = export_top(run_dir, 1, tmp_path / "export")
    ens_file = target / "ensemble.yaml"
    data = yaml.safe_load(ens_file.read_text())
    assert [e["base_url"] for e in data["endpoints"]] == [s.url for s in servers]
    assert [e["model"] for e in data["endpoints"]] == [s.service.name for s in servers]
    assert all(e["api_key_env"] == key_env for e in data["endpoints"])
    assert data["weights"] == [weights[s.service.name] for s in servers] and data["combine"] == "linear"
    assert (target / "README.md").is_file()
    for root in (run_dir, tmp_path / "export"):
        for f in root.rglob("*"):
            if f.is_file():
                assert KEY not in f.read_text(errors="replace"), f

    # the backend's answers for the best mixture
    backend = make_backend("mixture", api_key_env=key_env)
    try:
        from evomerge.spaces import make_space as mk

        space = mk(cfg.space, dict(cfg.models), None)
        backend.load_plan(space.compile(best["recipe"]), None)
        task = load_task(tasks / "combined.yaml")
        prompts = [e.prompt for e in task.examples("search")]
        want = backend.decoder.generate(prompts, 8)
    finally:
        backend.close()

    server = make_ensemble_server(ens_file, port=0, api_key_env=key_env, model_name="ens")
    start_in_thread(server)
    try:
        status, body = call(f"{server.url}/completions", {"model": "ens", "prompt": prompts, "max_tokens": 8})
        assert status == 200, body
        assert [c["text"] for c in body["choices"]] == want
        status, body = call(f"{server.url}/chat/completions",
                            {"messages": [{"role": "user", "content": prompts[0]}], "max_tokens": 8})
        assert status == 200 and body["choices"][0]["message"]["content"] == want[0]
        status, body = call(f"{server.url}/completions", {"prompt": "abc>", "logprobs": 2})
        assert status == 400 and "logprobs" in body["error"]["message"]
        status, body = call(f"{server.url}/completions", {"prompt": "abc>"}, key=None)
        assert status == 401
    finally:
        server.stop()

    # through the CLI: `evomerge serve --ensemble`
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "serve", "--ensemble", str(ens_file),
                             "--port", "0", "--quiet"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert " at " in line, (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split(" at ", 1)[1].split()[0]
        status, body = call(f"{url}/completions", {"prompt": prompts[:4], "max_tokens": 8}, key=None)
        assert status == 200 and [c["text"] for c in body["choices"]] == want[:4]
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_ensemble_server_answers_502_when_upstream_is_down(tmp_path):
    port = _free_port()
    ens = tmp_path / "ensemble.yaml"
    ens.write_text(yaml.safe_dump({"endpoints": [{"name": "gone", "base_url": f"http://127.0.0.1:{port}/v1",
                                                  "model": "m"}], "weights": [1.0]}))
    server = make_ensemble_server(load_ensemble(ens), port=0, max_retries=0, timeout=5)
    start_in_thread(server)
    try:
        status, body = call(f"{server.url}/completions", {"prompt": "abc>", "max_tokens": 3}, key=None)
    finally:
        server.stop()
    assert status == 502
    msg = body["error"]["message"]
    assert "\n" not in msg and "upstream" in msg and "endpoint gone" in msg


def test_ensemble_server_needs_the_endpoint_keys(tmp_path):
    ens = tmp_path / "ensemble.yaml"
    ens.write_text(yaml.safe_dump({"endpoints": [{"base_url": "http://127.0.0.1:9/v1",
                                                  "api_key_env": "EVOMERGE_NO_SUCH_KEY_VAR"}], "weights": [1]}))
    with pytest.raises(BackendError, match="EVOMERGE_NO_SUCH_KEY_VAR is not set"):
        make_ensemble_server(ens, port=0)


def test_mixture_backend_refuses_other_plans_and_unknown_options():
    with pytest.raises(BackendError, match="backend.options.temperature"):
        make_backend("mixture", temperature=0.5)
    backend = make_backend("mixture")
    from evomerge.plan import MergePlan, TensorRef, TensorStep

    plan = MergePlan({"a": "/x"}, [TensorStep("w", "passthrough", [TensorRef("a", "w")])])
    with pytest.raises(BackendError, match="output_mixture control plans only"):
        backend.load_plan(plan, None)
    with pytest.raises(BackendError, match="load_plan first"):
        backend.evaluate([])
