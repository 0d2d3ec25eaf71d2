"""The OpenAI-compatible API backend against a real, misbehaving HTTP server on 127.0.0.1.

The server below answers like an OpenAI endpoint (completions with echo/logprobs, chat,
models) but follows a script per request: slow answers, 5xx, 429 with Retry-After, 4xx,
garbage, empty choices, missing logprobs. Every request is recorded (path, headers, body),
so the tests check what was sent, how often, and that the key never leaks.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from evomerge.errors import BackendError
from evomerge.fitness import Example, load_task, make_backend
from evomerge.netclient import RetryPolicy, parse_retry_after
from evomerge.plan import MergePlan, TensorRef, TensorStep

KEY_ENV = "EVOMERGE_TEST_API_KEY"
KEY = "sk-test-DO-NOT-LEAK-1234567890"
TOKEN_LP = -0.5  # the fake model gives every token this logprob


# -- a scripted OpenAI-style server ------------------------------------------------------


def _ok_completion(body: dict) -> dict:
    prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
    choices = []
    for i, p in enumerate(prompts):
        if body.get("echo"):
            extra = "!" if body.get("max_tokens", 16) > 0 else ""  # a generated token
            text = p + extra
            offsets = list(range(len(text)))
            lps = [None] + [TOKEN_LP] * (len(text) - 1)
            lp = {"tokens": list(text), "token_logprobs": lps, "text_offset": offsets, "top_logprobs": None}
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": "length"})
        else:
            choices.append({"index": i, "text": p[::-1] + " tail", "logprobs": None, "finish_reason": "stop"})
    return {"object": "text_completion", "model": body.get("model"), "choices": choices}


def _ok_chat(body: dict) -> dict:
    content = body["messages"][-1]["content"][::-1]
    return {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}


class ScriptedServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _ScriptedHandler)
        self.script: deque = deque()
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.models = ["fake-model"]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def posts(self) -> list[dict]:
        return [r for r in self.requests if r["method"] == "POST"]


class _ScriptedHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ScriptedServer

    def log_message(self, *args):
        pass

    def _reply(self, status: int, payload, headers: dict | None = None) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # noqa: N802
        with self.server.lock:
            self.server.requests.append({"method": "GET", "path": self.path, "headers": dict(self.headers), "body": None})
        self._reply(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.server.models]})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append({"method": "POST", "path": self.path, "headers": dict(self.headers), "body": body})
            action = self.server.script.popleft() if self.server.script else "ok"
            self.server.in_flight += 1
            self.server.max_in_flight = max(self.server.max_in_flight, self.server.in_flight)
        try:
            self._act(action, body)
        finally:
            with self.server.lock:
                self.server.in_flight -= 1

    def _act(self, action, body) -> None:
        kind, arg = (action if isinstance(action, tuple) else (action, None))
        if kind == "sleep":  # answer correctly, but late
            time.sleep(arg)
            kind = "ok"
        if kind == "ok":
            ok = _ok_chat(body) if self.path.endswith("chat/completions") else _ok_completion(body)
            self._reply(200, ok)
        elif kind == "status":
            self._reply(arg, {"error": {"message": f"scripted failure {arg}", "type": "server_error"}})
        elif kind == "429":
            self._reply(429, {"error": {"message": "slow down"}}, {"Retry-After": str(arg)})
        elif kind == "echo_auth":  # a careless server that echoes the Authorization header
            self._reply(400, {"error": {"message": f"bad request from {self.headers.get('Authorization')}"}})
        elif kind == "garbage":
            self._reply(200, b"<html>upstream exploded</html>")
        elif kind == "empty_choices":
            self._reply(200, {"object": "text_completion", "choices": []})
        elif kind == "no_logprobs":
            ok = _ok_completion(body)
            for c in ok["choices"]:
                c["logprobs"] = None
            self._reply(200, ok)
        elif kind == "drop":  # close the connection without an answer
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            raise AssertionError(kind)


@pytest.fixture
def server():
    srv = ScriptedServer()
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=5)


@pytest.fixture
def backends():
    made = []

    def make(srv, **opts):
        opts.setdefault("model", "fake-model")
        opts.setdefault("backoff", 0.01)
        opts.setdefault("max_backoff", 0.05)
        opts.setdefault("timeout", 5.0)
        b = make_backend("api", model_dir=None, base_url=srv.url, **opts)
        made.append(b)
        return b

    yield make
    for b in made:
        b.close()


def _task(tmp_path: Path, name: str, scoring: str, records: list[dict], **extra) -> object:
    data = tmp_path / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = [f"name: {name}", f"data: {data.name}", f"scoring: {scoring}"]
    lines += [f"{k}: {json.dumps(v)}" for k, v in extra.items()]
    path = tmp_path / f"{name}.yaml"
    path.write_text("\n".join(lines) + "\n")
    return load_task(path)


# -- the happy paths ---------------------------------------------------------------------


def test_generation_task_scored_from_completions(server, backends, tmp_path):
    task = _task(tmp_path, "rev", "exact_match",
                 [{"input": "abc", "target": "cba"}, {"input": "xy", "target": "nope"}], stop=[" "])
    b = backends(server)
    scores = b.evaluate([task])
    assert scores["rev"].tolist() == [1.0, 0.0]  # " tail" cut at the stop string
    body = server.posts()[0]["body"]
    assert body["temperature"] == 0 and body["max_tokens"] == 8 and body["stop"] == [" "]
    assert body["model"] == "fake-model" and server.posts()[0]["path"] == "/v1/completions"


def test_prompts_are_batched_per_request_and_order_is_kept(server, backends):
    b = backends(server, prompts_per_request=4, concurrency=2)
    prompts = [f"p{i:02d}" for i in range(10)]
    out = b.generate(prompts, 4)
    assert out == [p[::-1] + " tail" for p in prompts]
    sizes = sorted(len(r["body"]["prompt"]) if isinstance(r["body"]["prompt"], list) else 1 for r in server.posts())
    assert sizes == [2, 4, 4]


def test_concurrency_limit_is_respected(server, backends):
    server.script.extend([("sleep", 0.15)] * 12)
    b = backends(server, concurrency=3)
    out = b.generate([f"q{i}" for i in range(12)], 2)
    assert len(out) == 12 and len(server.posts()) == 12
    assert 2 <= server.max_in_flight <= 3


def test_stop_strings_beyond_max_stop_are_applied_locally(server, backends):
    b = backends(server, max_stop=1)
    (out,) = b.generate(["dcba"], 8, stop=["zz", "c"])
    assert out == "ab"  # "abcd tail" cut at "c", which was not sent
    assert server.posts()[0]["body"]["stop"] == ["zz"]


def test_multiple_choice_and_perplexity_from_echoed_logprobs(server, backends, tmp_path):
    mc = _task(tmp_path, "mc", "multiple_choice",
               [{"input": "Q: pick ", "choices": ["a", "bbb"], "answer": 0},
                {"input": "Q: pick ", "choices": ["bbbb", "cc"], "answer": 0}],
               prompt="{input}")
    ppl = _task(tmp_path, "ppl", "neg_perplexity", [{"input": "ctx", "target": "xyz"}])
    b = backends(server, prompts_per_request=3)
    scores = b.evaluate([mc, ppl])
    # every token costs TOKEN_LP, so the shorter choice (plus the moved space) wins
    assert scores["mc"].tolist() == [1.0, 0.0]
    assert scores["ppl"][0] == pytest.approx(np.exp(TOKEN_LP))
    (ll,) = b.loglikelihood([("Q: pick ", "a")])
    assert (ll.logprob, ll.num_tokens) == (pytest.approx(2 * TOKEN_LP), 2)  # " a"
    # no BOS: the first character of an empty context's continuation has no logprob
    with pytest.raises(BackendError, match="no logprob for a continuation token at offset 0"):
        b.loglikelihood([("", "xy")])
    body = server.posts()[0]["body"]
    assert body["echo"] is True and body["logprobs"] == 1 and body["max_tokens"] == 0


def test_echo_with_one_generated_token_ignores_it(server, backends):
    b = backends(server, echo_max_tokens=1)
    (ll,) = b.loglikelihood([("abc", "de")])
    assert (ll.logprob, ll.num_tokens) == (pytest.approx(2 * TOKEN_LP), 2)
    assert server.posts()[0]["body"]["max_tokens"] == 1


def test_chat_endpoint_generation(server, backends, tmp_path):
    task = _task(tmp_path, "rev", "exact_match", [{"input": "abc", "target": "cba"}])
    b = backends(server, endpoint="chat", system_prompt="be brief")
    assert b.evaluate([task])["rev"].tolist() == [1.0]
    req = server.posts()[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["body"]["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "abc"}]


def test_chat_endpoint_refuses_loglikelihood_tasks_before_any_request(server, backends, tmp_path):
    mc = _task(tmp_path, "mc", "multiple_choice", [{"input": "q", "choices": ["a", "b"], "answer": 0}])
    b = backends(server, endpoint="chat")
    with pytest.raises(BackendError, match=r"task mc \(scoring: multiple_choice\).*chat endpoints.*completions"):
        b.evaluate([mc])
    assert server.posts() == []


def test_model_is_discovered_when_the_server_lists_one(server, backends):
    b = backends(server, model=None)
    assert b.model == "fake-model"
    server.models = ["a", "b"]
    with pytest.raises(BackendError, match=r"backend.options.model: required: .* lists 2 models \(a, b\)"):
        backends(server, model=None)


# -- retries and errors ------------------------------------------------------------------


def test_500s_then_success_are_retried_and_counted(server, backends):
    server.script.extend([("status", 500), ("status", 503)])
    b = backends(server)
    assert b.generate(["abc"], 4) == ["cba tail"]
    assert len(server.posts()) == 3
    assert b.stats["retries"] == 2 and b.stats["status"] == {500: 1, 503: 1, 200: 1}


def test_permanent_500_gives_up_after_max_retries(server, backends):
    server.script.extend([("status", 500)] * 10)
    b = backends(server, max_retries=2)
    with pytest.raises(BackendError) as err:
        b.generate(["abc"], 4)
    msg = str(err.value)
    assert "gave up after 3 attempt(s): HTTP 500" in msg and "scripted failure 500" in msg
    assert "/v1/completions" in msg and "\n" not in msg
    assert len(server.posts()) == 3 and b.stats["failures"] == 1


def test_429_honours_retry_after(server, backends):
    server.script.append(("429", 1))
    b = backends(server, max_backoff=5.0)
    t0 = time.perf_counter()
    assert b.generate(["ab"], 2) == ["ba tail"]
    assert time.perf_counter() - t0 >= 0.9
    assert b.stats["retries"] == 1


def test_retry_after_is_capped_by_max_backoff(server, backends):
    server.script.append(("429", 3600))
    b = backends(server, max_backoff=0.1)
    t0 = time.perf_counter()
    assert b.generate(["ab"], 2) == ["ba tail"]
    assert time.perf_counter() - t0 < 2.0


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_client_errors_fail_at_once_with_one_line(server, backends, status):
    server.script.append(("status", status))
    b = backends(server)
    with pytest.raises(BackendError, match=rf"HTTP {status} .*scripted failure {status}") as err:
        b.generate(["abc"], 4)
    assert len(server.posts()) == 1 and b.stats["retries"] == 0
    assert "\n" not in str(err.value)
    if status in (401, 403):
        assert "api_key_env" in str(err.value)


def test_garbage_json_is_a_clear_error(server, backends):
    server.script.append("garbage")
    b = backends(server)
    with pytest.raises(BackendError, match=r"malformed JSON in the response \(HTTP 200\): '<html>upstream exploded</html>'"):
        b.generate(["abc"], 4)
    assert len(server.posts()) == 1


def test_empty_choices_is_a_clear_error(server, backends, tmp_path):
    task = _task(tmp_path, "gen", "exact_match", [{"input": "abc", "target": "cba"}])
    server.script.append("empty_choices")
    b = backends(server)
    with pytest.raises(BackendError, match=r"task gen: .*/v1/completions: response has no choices"):
        b.evaluate([task])


def test_missing_logprobs_is_a_clear_error_naming_the_task(server, backends, tmp_path):
    mc = _task(tmp_path, "mc", "multiple_choice", [{"input": "q", "choices": ["a", "b"], "answer": 0}])
    server.script.append("no_logprobs")
    b = backends(server)
    with pytest.raises(BackendError, match=r"task mc: .*no logprobs.*multiple_choice"):
        b.evaluate([mc])


def test_slow_responses_time_out_and_give_up(server, backends):
    server.script.extend([("sleep", 1.5)] * 3)
    b = backends(server, timeout=0.2, max_retries=1)
    t0 = time.perf_counter()
    with pytest.raises(BackendError, match=r"gave up after 2 attempt\(s\): timed out after 0.2 s"):
        b.generate(["abc"], 4)
    assert time.perf_counter() - t0 < 1.4  # two 0.2 s timeouts and a short backoff
    assert b.stats["retries"] == 1


def test_slow_response_then_a_fast_one_succeeds(server, backends):
    server.script.append(("sleep", 1.0))
    b = backends(server, timeout=0.3, max_retries=2)
    assert b.generate(["abc"], 4) == ["cba tail"]
    assert b.stats["retries"] == 1


def test_dropped_connections_and_refused_ports_are_retried(server, backends):
    server.script.append("drop")
    b = backends(server)
    assert b.generate(["abc"], 4) == ["cba tail"]
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dead = make_backend("api", base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=2,
                        backoff=0.01, max_backoff=0.02)
    with pytest.raises(BackendError, match=r"gave up after 3 attempt\(s\): connection error: ConnectionRefusedError"):
        dead.generate(["abc"], 4)
    dead.close()


# -- the key -----------------------------------------------------------------------------


def test_api_key_is_sent_as_bearer_and_never_leaks(server, backends, monkeypatch, caplog):
    monkeypatch.setenv(KEY_ENV, KEY)
    caplog.set_level(logging.DEBUG)
    server.script.extend([("status", 500), "echo_auth", ("status", 401), ("status", 500), ("status", 500)])
    b = backends(server, api_key_env=KEY_ENV, max_retries=1)
    seen: list[str] = [repr(b), str(b.options), repr(b.client)]
    for _ in range(3):
        with pytest.raises(BackendError) as err:
            b.generate(["abc"], 4)
        seen.append(str(err.value))
        seen.append(repr(err.value))
    assert all(r["headers"].get("Authorization") == f"Bearer {KEY}" for r in server.posts())
    assert "bad request from Bearer <secret>" in seen[3]  # the echoed header was scrubbed
    assert f"${KEY_ENV}" in seen[5]  # the 401 names the variable to check
    seen += [rec.getMessage() for rec in caplog.records]
    assert any("retry 1/1" in s for s in seen)  # the retry was logged...
    assert not any(KEY in s for s in seen)  # ...and nothing shows the key


def test_missing_key_variable_is_named(server, monkeypatch):
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(BackendError, match=rf"backend.options.api_key_env: environment variable {KEY_ENV} is not set"):
        make_backend("api", base_url=server.url, model="m", api_key_env=KEY_ENV)


def test_configuration_errors(server):
    with pytest.raises(BackendError, match="backend.options.base_url: required"):
        make_backend("api", model="m")
    with pytest.raises(BackendError, match="backend.options.bogus: unknown option"):
        make_backend("api", base_url=server.url, model="m", bogus=1)
    with pytest.raises(BackendError, match="backend.options.endpoint"):
        make_backend("api", base_url=server.url, model="m", endpoint="embeddings")
    with pytest.raises(BackendError, match="credentials in the URL are refused") as err:
        make_backend("api", base_url=f"http://user:{KEY}@127.0.0.1:1/v1", model="m")
    assert KEY not in str(err.value)
    with pytest.raises(BackendError, match="backend.options.concurrency"):
        make_backend("api", base_url=server.url, model="m", concurrency=0)


def test_retry_policy_backoff_and_retry_after_parsing():
    import random

    p = RetryPolicy(max_retries=5, backoff=0.5, max_backoff=3.0)
    rng = random.Random(0)
    for attempt, cap in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 3.0), (6, 3.0)]:
        d = p.delay(attempt, None, rng)
        assert cap / 2 <= d <= cap
    assert p.delay(0, 10.0, rng) == 3.0 and p.delay(0, 0.25, rng) == 0.25
    assert parse_retry_after("2") == 2.0 and parse_retry_after(None) is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    assert parse_retry_after("soon") is None


# -- weights -----------------------------------------------------------------------------


@pytest.mark.slow
def test_load_plan_accepts_only_the_identity_of_the_served_checkpoint(server, tmp_path):
    import tiny_models

    from evomerge.checkpoint.opener import open_checkpoint
    from evomerge.materialize import Materializer

    served = tiny_models.make_tiny_llama(tmp_path / "served", hidden=16)
    other = tiny_models.make_tiny_llama(tmp_path / "other", seed=1, hidden=16)
    names = open_checkpoint(served).names

    def plan(op="passthrough", src=served, params=None, two=False):
        sources = {"s": str(src), "o": str(other)}
        steps = [TensorStep(n, op, [TensorRef("s", n)] + ([TensorRef("o", n)] if two else []), params=dict(params or {}))
                 for n in names]
        return MergePlan(sources=sources, steps=steps)

    mat = Materializer(device="cpu")
    b = make_backend("api", base_url=server.url, model="m", served_model_dir=str(served))
    b.load_plan(plan(), mat)
    b.load_plan(plan("linear", params={"weight": [0.3]}), mat)  # normalized: the identity
    b.load_plan(MergePlan(sources={"s": str(served)}, steps=[]), mat)
    for bad, why in [
        (plan(src=other), "comes from"),
        (plan(params={"scale": 0.5}), "scaled by 0.5"),
        (plan("linear", two=True, params={"weight": [1.0, 1.0]}), "combines 2 inputs"),
        (plan("linear", params={"weight": [2.0], "normalize": False}), "weighted 2.0"),
    ]:
        with pytest.raises(BackendError, match=rf"cannot change the weights served at .*is not the served checkpoint: .*{why}"):
            b.load_plan(bad, mat)
    b.close()
    fixed = make_backend("api", base_url=server.url, model="m")
    with pytest.raises(BackendError, match="needs merged weights; the api backend scores fixed endpoints"):
        fixed.load_plan(plan(), mat)
    fixed.close()
    assert server.posts() == []


def test_example_prompts_are_sent_verbatim(server, backends):
    b = backends(server)
    weird = Example("line1\nline2 \u00e9\u4e2d", "x").prompt
    (out,) = b.generate([weird], 3)
    assert server.posts()[0]["body"]["prompt"] == weird and out == weird[::-1] + " tail"
