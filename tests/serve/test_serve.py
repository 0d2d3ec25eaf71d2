"""`evomerge serve`: a real OpenAI-compatible server on 127.0.0.1 over tiny checkpoints,
scored through the API backend and compared with the HF backend on the same weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tiny_models

from evomerge.errors import BackendError
from evomerge.fitness import load_task, make_backend
from evomerge.serve import ModelService, make_server, start_in_thread

REPO = Path(__file__).resolve().parents[2]


def call(url: str, body: dict | bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=60) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_models.make_tiny_llama(tmp_path_factory.mktemp("serve") / "tiny", seed=3, hidden=32, vocab=40)


@pytest.fixture(scope="module")
def served(tiny):
    server = make_server(tiny, port=0, model_name="tiny")
    start_in_thread(server)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hf(tiny):
    backend = make_backend("hf", model_dir=str(tiny), batch_size=8)
    yield backend
    backend.close()


@pytest.fixture
def api(served):
    made = []

    def make(**opts):
        b = make_backend("api", base_url=served.url, **opts)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def _write_task(tmp_path: Path, name: str, scoring: str, records: list[dict], **extra):
    (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = [f"name: {name}", f"data: {name}.jsonl", f"scoring: {scoring}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    (tmp_path / f"{name}.yaml").write_text("\n".join(lines) + "\n")
    return load_task(tmp_path / f"{name}.yaml")


# -- the endpoints -----------------------------------------------------------------------


def test_models_and_health(served):
    status, body = call(f"{served.url}/models")
    assert status == 200 and [m["id"] for m in body["data"]] == ["tiny"]
    status, body = call(served.url.replace("/v1", "/health"))
    assert status == 200 and body == {"status": "ok"}
    assert call(f"{served.url}/models/tiny")[1]["id"] == "tiny"


def test_echo_logprobs_give_every_prompt_token(served, hf):
    status, body = call(f"{served.url}/completions",
                        {"model": "tiny", "prompt": "abc", "max_tokens": 0, "echo": True, "logprobs": 2})
    assert status == 200
    (choice,) = body["choices"]
    lp = choice["logprobs"]
    assert choice["text"] == "abc" and choice["finish_reason"] == "length"
    assert lp["tokens"] == ["<s>", "a", "b", "c"] and lp["text_offset"] == [0, 0, 1, 2]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    for value, top in zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
        assert value <= 0 and len(top) == 2 and value <= max(top.values()) + 1e-6
    (ll,) = hf.loglikelihood([("a", "bc")])
    assert sum(lp["token_logprobs"][2:]) == pytest.approx(ll.logprob, abs=1e-4)
    assert body["usage"]["prompt_tokens"] == 4 and body["usage"]["completion_tokens"] == 0


def test_completion_logprobs_cover_the_generated_tokens_only(served, hf):
    status, body = call(f"{served.url}/completions", {"prompt": "hello", "max_tokens": 3, "logprobs": 0})
    assert status == 200
    (choice,) = body["choices"]
    assert choice["text"] == hf.generate(["hello"], 3)[0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]
    assert all(o >= len("hello") for o in lp["text_offset"]) and all(v <= 0 for v in lp["token_logprobs"])
    assert choice["finish_reason"] == ("length" if len(choice["text"]) == 3 else "stop")


def test_list_prompts_and_stop_strings(served, hf):
    prompts = ["abc", "zz top", "12+3="]
    status, body = call(f"{served.url}/completions", {"prompt": prompts, "max_tokens": 6, "stop": ["q", "7"]})
    assert status == 200
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert [c["text"] for c in body["choices"]] == hf.generate(prompts, 6, ["q", "7"])


@pytest.mark.parametrize("body, status, fragment", [
    (b"{not json", 400, "not valid JSON"),
    ({"model": "other", "prompt": "a"}, 404, "model 'other' not found"),
    ({"prompt": "a", "stream": "yes"}, 400, "'stream' must be true or false"),
    ({"prompt": "a", "n": 2}, 400, "'n' must be 1"),
    ({"prompt": "a", "max_tokens": -1}, 400, "'max_tokens' must be an integer"),
    ({"prompt": "a", "stop": [""]}, 400, "'stop' must be"),
    ({"prompt": [1, 2, 3]}, 400, "token-id prompts"),
    ({"prompt": "a" * 80, "max_tokens": 0, "echo": True, "logprobs": 0}, 400, "takes at most 64"),
    ({"prompt": "a", "max_tokens": 64}, 400, "leaves no room"),
])
def test_bad_requests_get_openai_style_errors(served, body, status, fragment):
    got, payload = call(f"{served.url}/completions", body)
    assert got == status and fragment in payload["error"]["message"]
    assert call(f"{served.url}/nowhere", {})[0] == 404
    assert call(f"{served.url}/completions", {"prompt": "a", "max_tokens": 1})[0] == 200  # still serving


def test_concurrent_requests_match_sequential_answers(served, hf):
    prompts = [f"{c}{i}" for i, c in enumerate("abcdefgh")]
    want = hf.generate(prompts, 5)
    got: dict[int, str] = {}

    def one(i):
        got[i] = call(f"{served.url}/completions", {"prompt": prompts[i], "max_tokens": 5})[1]["choices"][0]["text"]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [got[i] for i in range(len(prompts))] == want


# -- API backend through the server == HF backend ----------------------------------------


def test_api_backend_scores_like_the_hf_backend(served, hf, api, tmp_path):
    gen_records = [{"input": p, "target": t} for p, t in
                   [("abc", "ddd"), ("hello", "x"), ("zz", "zzzz"), ("q1", "w"), ("77", "7777")]]
    gen = _write_task(tmp_path, "gen", "exact_match", gen_records, max_new_tokens=4, stop=["y"])
    mc_records = [{"input": f"{p} ", "choices": cs, "answer": a} for p, cs, a in
                  [("abc", ["d", "xyz", "ab"], 0), ("hello", ["world", "w"], 1), ("12", ["3", "34", "345"], 2),
                   ("q", ["r", "s", "t", "u"], 3)]]
    mc = _write_task(tmp_path, "mc", "multiple_choice", mc_records)
    ppl = _write_task(tmp_path, "ppl", "neg_perplexity", [{"input": "ab", "target": "cd"}, {"input": "x", "target": "yz"}])
    tasks = [gen, mc, ppl]
    backend = api(model="tiny", prompts_per_request=3, concurrency=2)
    want, got = hf.evaluate(tasks), backend.evaluate(tasks)
    assert got["gen"].tolist() == want["gen"].tolist()
    assert got["mc"].tolist() == want["mc"].tolist()
    np.testing.assert_allclose(got["ppl"], want["ppl"], rtol=1e-4)
    prompts = [r["input"] for r in gen_records]
    assert backend.generate(prompts, 4, ["y"]) == hf.generate(prompts, 4, ["y"])
    pairs = [(r["input"], c) for r in mc_records for c in r["choices"]]
    for a, b in zip(backend.loglikelihood(pairs), hf.loglikelihood(pairs)):
        assert a.num_tokens == b.num_tokens and a.logprob == pytest.approx(b.logprob, abs=1e-4)
    assert backend.stats["retries"] == 0
    chat = api(endpoint="chat")  # the model is discovered from /v1/models
    assert chat.model == "tiny"
    assert chat.generate(prompts, 4) == hf.generate(prompts, 4)  # no chat template: the plain prompt


@pytest.mark.slow
def test_api_backend_agrees_with_hf_on_the_test_zoo(test_zoo, tmp_path):
    """The zoo's base model and cipher task through `serve` vs in process: identical greedy
    answers on every example, and the same multiple-choice picks from log-likelihoods."""
    records = [json.loads(line) for line in (test_zoo.tasks_dir / "combined.search.jsonl").read_text().splitlines()][:60]
    gen = _write_task(tmp_path, "combined", "exact_match", records, prompt="{input}>", max_new_tokens=8)
    rng = np.random.default_rng(0)
    mc_records = []
    for r in records[:30]:
        wrong = ["".join(rng.permutation(list(r["target"]))), r["target"][::-1] + "0"]
        mc_records.append({"input": r["input"] + ">", "choices": [r["target"], *wrong], "answer": 0})
    mc = _write_task(tmp_path, "combined_mc", "multiple_choice", mc_records)
    base = test_zoo.base.path
    hf = make_backend("hf", model_dir=str(base), batch_size=64)
    server = make_server(base, port=0)
    start_in_thread(server)
    try:
        api = make_backend("api", base_url=server.url, prompts_per_request=16, concurrency=2)
        prompts = [ex.prompt for ex in gen.examples()]
        assert api.generate(prompts, 8) == hf.generate(prompts, 8)
        want, got = hf.evaluate([gen, mc]), api.evaluate([gen, mc])
        assert got["combined"].tolist() == want["combined"].tolist()
        assert got["combined_mc"].tolist() == want["combined_mc"].tolist()
        api.close()
    finally:
        server.stop()
        hf.close()


def test_chat_template_is_applied_when_the_tokenizer_has_one(tiny, tmp_path, hf):
    import shutil

    d = tmp_path / "templated"
    shutil.copytree(tiny, d)
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = "{% for m in messages %}[{{ m['role'][0] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[a]{% endif %}"
    cfg_path.write_text(json.dumps(cfg))
    service = ModelService(d)
    try:
        messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
        assert service.render_chat(messages) == "[s]s[u]hi[a]"
        choice, usage = service.chat(messages, 4, [])
        assert choice["message"]["content"] == hf.generate(["[s]s[u]hi[a]"], 4)[0]
        assert usage["prompt_tokens"] == len("[s]s[u]hi[a]") + 1  # + BOS
    finally:
        service.close()


# -- the command, with a key -------------------------------------------------------------


def _start_cli(args: list[str], env: dict) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "evomerge.cli", "serve", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    line = proc.stdout.readline()
    if not line:
        proc.wait(30)
        raise AssertionError(f"serve did not start: {proc.stderr.read()}")
    return proc, line.split(" at ", 1)[1].split()[0]


@pytest.mark.slow
def test_cli_serve_requires_the_key_when_asked(tiny, hf):
    key = "serve-key-SHOULD-NOT-APPEAR-42"
    env = {**os.environ, "EVOMERGE_SERVE_KEY": key, "OMP_NUM_THREADS": "1"}
    proc, url = _start_cli([str(tiny), "--port", "0", "--api-key-env", "EVOMERGE_SERVE_KEY",
                            "--model-name", "tiny", "--threads", "1"], env)
    try:
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        body = {"prompt": "abc", "max_tokens": 3}
        status, err = call(f"{url}/completions", body)
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        assert call(f"{url}/completions", body, {"Authorization": "Bearer wrong"})[0] == 401
        assert call(f"{url}/models")[0] == 401
        assert call(url.replace("/v1", "/health"))[0] == 200  # liveness needs no key
        status, ok = call(f"{url}/completions", body, {"Authorization": f"Bearer {key}"})
        assert status == 200 and ok["choices"][0]["text"] == hf.generate(["abc"], 3)[0]

        os.environ["EVOMERGE_SERVE_KEY"] = key
        try:
            backend = make_backend("api", base_url=url, model="tiny", api_key_env="EVOMERGE_SERVE_KEY")
            assert backend.generate(["hello"], 4) == hf.generate(["hello"], 4)
            backend.close()
            keyless = make_backend("api", base_url=url, model="tiny")
            with pytest.raises(BackendError, match="HTTP 401.*set backend.options.api_key_env"):
                keyless.generate(["hello"], 4)
            keyless.close()
        finally:
            del os.environ["EVOMERGE_SERVE_KEY"]
    finally:
        proc.terminate()
        out, errs = proc.communicate(timeout=30)
    assert "POST /v1/completions" in errs  # the access log is on...
    assert key not in errs and key not in out  # ...and never shows the key


def test_cli_serve_refuses_a_missing_key_variable(tiny):
    env = {k: v for k, v in os.environ.items() if k != "EVOMERGE_NO_SUCH_KEY"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "serve", str(tiny), "--port", "0",
                          "--api-key-env", "EVOMERGE_NO_SUCH_KEY"], capture_output=True, text=True, env=env,
                         cwd=REPO, timeout=120)
    assert res.returncode == 2
    assert "error: --api-key-env: environment variable EVOMERGE_NO_SUCH_KEY is not set" in res.stderr
    assert time.perf_counter() - t0 < 120


def test_engine_evaluator_scores_the_served_checkpoint_and_refuses_merges(served, tiny, hf, tmp_path):
    """The api backend as a run config names it: the identity plan of the served checkpoint
    is scored (same as HF), any real merge is a failed candidate with a one-line reason."""
    from evomerge.checkpoint.opener import open_checkpoint
    from evomerge.engine.evaluator import EvalSpec, Evaluator
    from evomerge.plan import MergePlan, TensorRef, TensorStep

    task = _write_task(tmp_path, "gen", "exact_match",
                       [{"input": "abc", "target": "x"}, {"input": "hello", "target": "y"}], max_new_tokens=3)
    spec = EvalSpec(
        model_dir=str(tiny),
        tasks=[{"path": str(task.path), "weight": 1.0}],
        backend={"name": "api", "device": None, "dtype": "float32", "batch_size": 128,
                 "options": {"base_url": served.url, "model": "tiny", "served_model_dir": str(tiny)}},
    )
    evaluator = Evaluator(spec)
    try:
        names = open_checkpoint(tiny).names
        identity = MergePlan(sources={"m": str(tiny)}, steps=[TensorStep(n, "passthrough", [TensorRef("m", n)]) for n in names])
        out = evaluator.evaluate(identity.to_dict())
        assert out.error is None and out.scores == {"gen": hf.evaluate([task])["gen"].tolist()}
        merged = MergePlan(sources={"m": str(tiny), "n": str(tiny)}, steps=[
            TensorStep(n, "linear", [TensorRef("m", n), TensorRef("n", n)], params={"weight": [0.5, 0.5]}) for n in names])
        out = evaluator.evaluate(merged.to_dict())
        assert out.failed and "BackendError: the api backend cannot change the weights served at" in out.error
    finally:
        evaluator.close()
