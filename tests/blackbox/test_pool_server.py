"""The provider side of black-box merging: LoraPool, its HTTP server and `evomerge serve-pool`.

Everything runs against a real uvicorn server on 127.0.0.1 over the test zoo's base and
its 3 LoRA experts; numbers are checked against direct computations (torch on the raw
factors, the HF backend on LoraReader's dense expert, PEFT on the exported adapter).
"""

from __future__ import annotations

import http.client
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import torch

from evomerge.blackbox.pool import ExampleSet, LoraPool, PoolError, answer_losses
from evomerge.blackbox.pool_server import create_app, serve_in_thread
from evomerge.checkpoint.lora import LoraReader
from evomerge.checkpoint.writer import write_checkpoint
from evomerge.fitness.backends.hf import HFBackend
from evomerge.fitness.scoring import evaluate_task
from evomerge.fitness.tasks import load_task

TOKEN = "pool-test-token-3f9a"
NAMES = ["lora_a", "lora_b", "lora_c"]


# -- fixtures ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo(test_zoo):
    return test_zoo


@pytest.fixture(scope="module")
def pool(zoo):
    p = LoraPool.from_dirs(zoo.base.path, {n: zoo.lora_paths[n] for n in NAMES}, device="cpu",
                           descriptions={"lora_a": "cipher slice a"})
    yield p
    p.close()


@pytest.fixture(scope="module")
def server(pool, zoo):
    """Allows both exports; small limits."""
    app = create_app(pool, TOKEN, tasks={"combined": zoo.task_yaml("combined")},
                     allow_export={"adapter", "model"}, max_sessions=4, max_examples=50,
                     max_body_bytes=16 << 10)
    srv = serve_in_thread(app)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def locked(pool, zoo):
    """No exports, one session at most."""
    app = create_app(pool, TOKEN, tasks={"combined": zoo.task_yaml("combined")}, max_sessions=1)
    srv = serve_in_thread(app)
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def combined(zoo):
    return load_task(zoo.task_yaml("combined"))


def call(srv, method, path, body=None, token=TOKEN, raw=None, headers=None):
    """One HTTP request: (status, headers, body bytes)."""
    u = urlsplit(srv.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=120)
    h = dict(headers or {})
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    if data is not None:
        h.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, path, body=data, headers=h)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def jcall(srv, method, path, body=None, **kw):
    status, _, data = call(srv, method, path, body, **kw)
    return status, (json.loads(data) if data else None)


def assert_error(status, body, want_status):
    assert status == want_status, body
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and "\n" not in err["message"], err
    return err["message"]


def open_task_session(srv, task="combined", split="search"):
    status, body = jcall(srv, "POST", "/v1/sessions", {"task": task, "split": split})
    assert status == 201, body
    return body


# -- auth and routes --------------------------------------------------------------------
def test_health_needs_no_auth(server):
    assert jcall(server, "GET", "/health", token=None) == (200, {"status": "ok"})


V1_ROUTES = [
    ("GET", "/v1/pool"),
    ("POST", "/v1/sessions"),
    ("POST", "/v1/sessions/abc/evaluate"),
    ("DELETE", "/v1/sessions/abc"),
    ("POST", "/v1/merged/adapter"),
    ("POST", "/v1/merged/model"),
    ("GET", "/v1/no-such-route"),
]


@pytest.mark.parametrize("method,path", V1_ROUTES)
def test_every_v1_route_refuses_missing_or_wrong_token(server, method, path):
    body = {"alpha": [1, 1, 1], "beta": [1, 0, 0]} if method == "POST" else None
    for kw in ({"token": None}, {"token": "wrong"}, {"token": TOKEN + "x"},
               {"token": None, "headers": {"Authorization": f"Basic {TOKEN}"}}):
        status, resp = jcall(server, method, path, body, **kw)
        msg = assert_error(status, resp, 401)
        assert "token" in msg and TOKEN not in msg


def test_unknown_route_and_method_are_one_line_errors(server):
    assert "no route" in assert_error(*jcall(server, "GET", "/v1/nothing"), 404)
    assert "no route" in assert_error(*jcall(server, "GET", "/nothing", token=None), 404)
    assert "not allowed" in assert_error(*jcall(server, "GET", "/v1/sessions"), 405)


def test_pool_info(server, zoo):
    status, info = jcall(server, "GET", "/v1/pool")
    assert status == 200
    assert [a["name"] for a in info["adapters"]] == NAMES
    assert all(a["rank"] == 4 for a in info["adapters"])
    assert info["adapters"][0]["description"] == "cipher slice a"
    assert info["base"]["model_type"] == "llama" and info["base"]["num_parameters"] > 0
    n_search = len(load_task(zoo.task_yaml("combined")).examples("search"))
    assert info["tasks"][0]["name"] == "combined"
    assert info["tasks"][0]["splits"]["search"] == n_search
    assert info["control"] == {"alpha": [0.0, 1.0], "beta": [-1.5, 1.5]}
    assert info["allow_export"] == {"adapter": True, "model": True}
    assert info["limits"]["max_sessions"] == 4 and info["limits"]["max_examples"] == 50
    assert info["limits"]["max_body_bytes"] == 16 << 10


# -- malformed requests -----------------------------------------------------------------
GOOD = {"alpha": [1.0, 0.5, 0.0], "beta": [1.0, -0.5, 0.25]}


def _raw(text):
    return {"raw": text.encode()}


BAD_EVALUATE = [
    ("wrong length", {"body": {"alpha": [1, 1], "beta": [1, 0, 0]}}, 400, "2 values but the pool has 3"),
    ("NaN", _raw('{"alpha": [1, NaN, 1], "beta": [1, 0, 0]}'), 400, "finite"),
    ("Infinity", _raw('{"alpha": [1, 1, 1], "beta": [1, -Infinity, 0]}'), 400, "finite"),
    ("alpha above 1", {"body": {"alpha": [1.5, 1, 1], "beta": [1, 0, 0]}}, 400, "out of range"),
    ("alpha below 0", {"body": {"alpha": [1, -0.1, 1], "beta": [1, 0, 0]}}, 400, "out of range"),
    ("beta out of range", {"body": {"alpha": [1, 1, 1], "beta": [2.0, 0, 0]}}, 400, "out of range"),
    ("string value", {"body": {"alpha": ["1", 1, 1], "beta": [1, 0, 0]}}, 422, "alpha.0"),
    ("bool value", {"body": {"alpha": [True, 1, 1], "beta": [1, 0, 0]}}, 422, "alpha.0"),
    ("not a list", {"body": {"alpha": 1, "beta": [1, 0, 0]}}, 422, "alpha"),
    ("missing beta", {"body": {"alpha": [1, 1, 1]}}, 422, "'beta' is required"),
    ("unknown field", {"body": {**GOOD, "gamma": 1}}, 422, "unknown field 'gamma'"),
    ("unknown metric", {"body": {**GOOD, "metrics": ["bleu"]}}, 422, "metrics"),
    ("index out of range", {"body": {**GOOD, "indices": [0, 10**6]}}, 400, "out of range"),
    ("empty indices", {"body": {**GOOD, "indices": []}}, 400, "empty"),
    ("not JSON", _raw("{alpha: 1"), 400, "not valid JSON"),
    ("JSON array", _raw("[1, 2]"), 422, "JSON object"),
]


@pytest.mark.parametrize("case,kw,status,text", BAD_EVALUATE, ids=[c[0] for c in BAD_EVALUATE])
def test_malformed_evaluate_is_refused(server, case, kw, status, text):
    sid = open_task_session(server)["session"]
    try:
        msg = assert_error(*jcall(server, "POST", f"/v1/sessions/{sid}/evaluate", **kw), status)
        assert text in msg, msg
    finally:
        call(server, "DELETE", f"/v1/sessions/{sid}")


BAD_SESSIONS = [
    ("unknown task", {"task": "nope"}, 404, "unknown task 'nope'"),
    ("unknown split", {"task": "combined", "split": "train"}, 422, "split"),
    ("both task and examples", {"task": "combined", "examples": [{"prompt": "a>", "answer": "1"}]}, 400, "either"),
    ("neither", {}, 400, "either"),
    ("empty examples", {"examples": []}, 400, "empty"),
    ("example without answer", {"examples": [{"prompt": "a>"}]}, 422, "examples.0.answer"),
    ("empty prompt", {"examples": [{"prompt": "", "answer": "1"}]}, 422, "examples.0.prompt"),
    ("too many examples", {"examples": [{"prompt": "a>", "answer": "1"}] * 51}, 413, "at most 50"),
    ("bad max_new_tokens", {"examples": [{"prompt": "a>", "answer": "1"}], "max_new_tokens": 0}, 422,
     "max_new_tokens"),
    ("unknown field", {"task": "combined", "tenant": "x"}, 422, "unknown field 'tenant'"),
]


@pytest.mark.parametrize("case,body,status,text", BAD_SESSIONS, ids=[c[0] for c in BAD_SESSIONS])
def test_malformed_session_is_refused(server, case, body, status, text):
    msg = assert_error(*jcall(server, "POST", "/v1/sessions", body), status)
    assert text in msg, msg


def test_unknown_session_is_404(server):
    msg = assert_error(*jcall(server, "POST", "/v1/sessions/nope/evaluate", GOOD), 404)
    assert "unknown session 'nope'" in msg
    assert_error(*jcall(server, "DELETE", "/v1/sessions/nope"), 404)


def test_body_over_the_limit_is_413(server):
    big = {"examples": [{"prompt": "x" * 1000, "answer": "1"}] * 20}  # ~20 KB > 16 KiB
    msg = assert_error(*jcall(server, "POST", "/v1/sessions", big), 413)
    assert "limit" in msg
    # a body that lies about its size (chunked, no Content-Length) is cut at the limit too
    u = urlsplit(server.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.putrequest("POST", "/v1/sessions")
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        payload = json.dumps(big).encode()
        try:
            for i in range(0, len(payload), 4096):
                part = payload[i:i + 4096]
                conn.send(f"{len(part):x}\r\n".encode() + part + b"\r\n")
            conn.send(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer 413 and close before the rest is sent
        resp = conn.getresponse()
        assert_error(resp.status, json.loads(resp.read()), 413)
    finally:
        conn.close()


def test_too_many_sessions_is_429(locked):
    first = open_task_session(locked)["session"]
    try:
        msg = assert_error(*jcall(locked, "POST", "/v1/sessions", {"task": "combined"}), 429)
        assert "too many open sessions" in msg
    finally:
        assert call(locked, "DELETE", f"/v1/sessions/{first}")[0] == 204
    second = open_task_session(locked)["session"]  # the slot is free again
    assert call(locked, "DELETE", f"/v1/sessions/{second}")[0] == 204


def test_sessions_expire(pool, zoo):
    app = create_app(pool, TOKEN, tasks={"combined": zoo.task_yaml("combined")}, session_ttl=0.2)
    with serve_in_thread(app) as srv:
        sid = open_task_session(srv)["session"]
        time.sleep(0.4)
        assert "expired" in assert_error(*jcall(srv, "POST", f"/v1/sessions/{sid}/evaluate", GOOD), 404)


# -- the merge rule ---------------------------------------------------------------------
def _direct_factors(zoo, alpha, beta):
    """The contract's formula computed straight from the adapters' raw factors with torch."""
    readers = [LoraReader(zoo.lora_paths[n], base=zoo.base.path) for n in NAMES]
    out = {}
    for weight in readers[0].lora_modules:
        A = B = None
        for r, a, b in zip(readers, alpha, beta):
            f = r.lora_factors(weight)
            k = math.ceil(round(a * f.A.numel(), 9))
            flat = f.A.float().flatten()
            keep = torch.zeros_like(flat)
            if k > 0:
                keep[torch.topk(flat.abs(), k).indices] = 1.0
            a_part = b * (flat * keep).reshape(f.A.shape)
            b_part = b * f.scale * f.B.float()
            A = a_part if A is None else A + a_part
            B = b_part if B is None else B + b_part
        out[weight[: -len(".weight")]] = (A, B)
    return out


@pytest.mark.parametrize("alpha,beta", [([1.0, 1.0, 1.0], [1.0, 0.0, 0.0]),
                                        ([0.3, 0.7, 0.05], [0.8, -1.2, 1.5]),
                                        ([0.0, 1.0, 0.5], [-1.5, 0.4, 0.0])])
def test_merged_factors_follow_the_formula(pool, zoo, alpha, beta):
    plan = pool.plan(alpha, beta)
    plan.validate()
    ops = {s.op for s in plan.steps}
    assert ops == {"topk_sum", "linear"} and len(plan.steps) == 2 * len(pool.modules)
    got = pool.merged_factors(alpha, beta)
    want = _direct_factors(zoo, alpha, beta)
    assert set(got) == set(want)
    for module, (A, B) in want.items():
        torch.testing.assert_close(got[module][0], A, atol=1e-6, rtol=0)
        torch.testing.assert_close(got[module][1], B, atol=1e-6, rtol=0)
    a0 = got[next(iter(got))][0]
    assert a0.shape[0] == 4


def test_topk_sum_keeps_exactly_ceil_alpha_numel():
    from evomerge.ops.factor import topk_count, topk_magnitude

    assert topk_count(10, 0.3) == 3 and topk_count(10, 0.31) == 4 and topk_count(10, 0.0) == 0
    assert topk_count(7, 1e-9) == 1 and topk_count(7, 1.0) == 7
    x = torch.tensor([[0.5, -3.0, 0.1], [2.0, 2.0, -0.2]])
    kept = topk_magnitude(x, 0.5)  # 3 of 6: -3 and both 2.0 (a tie kept in flat order)
    assert torch.equal(kept, torch.tensor([[0.0, -3.0, 0.0], [2.0, 2.0, 0.0]]))
    assert torch.count_nonzero(topk_magnitude(x, 0.34)) == 3 and torch.equal(topk_magnitude(x, 0.0), torch.zeros_like(x))


def test_control_vector_checks(pool):
    with pytest.raises(PoolError, match="2 values but the pool has 3"):
        pool.check_control([1, 1], [1, 1, 1])
    with pytest.raises(PoolError, match=r"beta\[1\] is nan"):
        pool.check_control([1, 1, 1], [1, float("nan"), 1])
    with pytest.raises(PoolError, match="out of range"):
        pool.check_control([1, 1, 1.01], [1, 1, 1])


# -- sessions end to end ----------------------------------------------------------------
@pytest.fixture(scope="module")
def dense_expert_a(zoo, tmp_path_factory):
    """Expert lora_a as a dense model through LoraReader, scored by the HF backend."""
    reader = LoraReader(zoo.lora_paths["lora_a"], base=zoo.base.path)
    out = write_checkpoint(tmp_path_factory.mktemp("dense") / "expert_a", reader.iter_tensors(),
                           reader.config, tokenizer_dir=reader.tokenizer_dir)
    backend = HFBackend(str(out), device="cpu")
    yield backend
    backend.close()


@pytest.fixture(scope="module")
def base_backend(zoo):
    backend = HFBackend(str(zoo.base.path), device="cpu")
    yield backend
    backend.close()


def test_session_end_to_end_matches_direct_computation(server, combined, dense_expert_a, base_backend):
    sess = open_task_session(server)
    examples = combined.examples("search")
    assert sess["num_examples"] == len(examples) and sess["adapters"] == NAMES
    sid = sess["session"]
    try:
        status, res = jcall(server, "POST", f"/v1/sessions/{sid}/evaluate",
                            {"alpha": [1, 1, 1], "beta": [1, 0, 0]})
        assert status == 200, res
        assert set(res) == {"loss", "losses", "score", "scores", "seconds"}
        pairs = [(ex.prompt, ex.target) for ex in examples]
        want = answer_losses(dense_expert_a, pairs)
        np.testing.assert_allclose(res["losses"], want, atol=1e-5, rtol=0)
        assert res["loss"] == pytest.approx(float(np.mean(res["losses"])), abs=1e-12)
        want_scores = evaluate_task(combined, "search", dense_expert_a.generate, dense_expert_a.loglikelihood)
        assert res["scores"] == [float(s) for s in want_scores]
        assert res["score"] == pytest.approx(float(np.mean(want_scores)))
        assert res["seconds"] > 0

        # a subset (racing): the same numbers for those examples, in the given order
        idx = [5, 0, 17]
        status, sub = jcall(server, "POST", f"/v1/sessions/{sid}/evaluate",
                            {"alpha": [1, 1, 1], "beta": [1, 0, 0], "indices": idx, "metrics": ["loss"]})
        assert status == 200 and sub["scores"] is None and sub["score"] is None
        np.testing.assert_allclose(sub["losses"], [res["losses"][i] for i in idx], atol=1e-9)

        # alpha = 0 everywhere keeps no entry of A: the base model, whatever beta says
        status, zero = jcall(server, "POST", f"/v1/sessions/{sid}/evaluate",
                             {"alpha": [0, 0, 0], "beta": [1.5, -1.5, 0.7]})
        assert status == 200
        np.testing.assert_allclose(zero["losses"], answer_losses(base_backend, pairs), atol=1e-6, rtol=0)
    finally:
        assert call(server, "DELETE", f"/v1/sessions/{sid}")[0] == 204
    assert_error(*jcall(server, "POST", f"/v1/sessions/{sid}/evaluate", GOOD), 404)


def test_uploaded_examples_session(server, zoo, dense_expert_a):
    task = load_task(zoo.task_yaml("cipher_a"))
    exs = task.examples("search")[:12]
    upload = [{"prompt": ex.prompt, "answer": ex.target} for ex in exs]
    status, sess = jcall(server, "POST", "/v1/sessions", {"examples": upload})
    assert status == 201 and sess["num_examples"] == 12
    sid = sess["session"]
    try:
        status, res = jcall(server, "POST", f"/v1/sessions/{sid}/evaluate", {"alpha": [1, 1, 1], "beta": [1, 0, 0]})
        assert status == 200, res
        pairs = [(ex.prompt, ex.target) for ex in exs]
        np.testing.assert_allclose(res["losses"], answer_losses(dense_expert_a, pairs), atol=1e-5, rtol=0)
        longest = max(len(dense_expert_a.tokenizer(ex.target, add_special_tokens=False)["input_ids"]) for ex in exs)
        outs = dense_expert_a.generate([ex.prompt for ex in exs], longest + 1)
        assert res["scores"] == [float(o.strip() == ex.target.strip()) for o, ex in zip(outs, exs)]
    finally:
        call(server, "DELETE", f"/v1/sessions/{sid}")


def test_pool_evaluate_programmatic(pool, combined):
    ex = ExampleSet.from_task(combined)
    full = pool.evaluate(ex, [1, 1, 1], [0.3, 0.3, 0.3], metrics=["loss"])
    part = pool.evaluate(ex, [1, 1, 1], [0.3, 0.3, 0.3], metrics=["loss"], indices=[2, 3])
    assert part["losses"] == pytest.approx(full["losses"][2:4], abs=1e-9)
    pairs = [(e.prompt, e.target) for e in combined.examples("search")[:3]]
    res = pool.evaluate(pairs, [1, 1, 1], [0.3, 0.3, 0.3], metrics=["score"], max_new_tokens=8)
    assert res["losses"] is None and len(res["scores"]) == 3


# -- exports ----------------------------------------------------------------------------
def test_exports_refused_unless_allowed(locked):
    for kind in ("adapter", "model"):
        status, headers, data = call(locked, "POST", f"/v1/merged/{kind}", GOOD)
        msg = assert_error(status, json.loads(data), 403)
        assert f"--allow-export {kind}" in msg
        assert "gzip" not in headers.get("content-type", "")


def _untar(data: bytes, dest: Path) -> Path:
    dest.mkdir(parents=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        tar.extractall(dest, filter="data")
    return dest


def test_adapter_export_loads_with_peft_and_gives_the_same_loss(server, zoo, combined, tmp_path):
    from peft import PeftModel

    control = {"alpha": [0.8, 0.6, 1.0], "beta": [1.2, -0.4, 0.5]}
    status, headers, data = call(server, "POST", "/v1/merged/adapter", control)
    assert status == 200 and headers["content-type"] == "application/gzip"
    folder = _untar(data, tmp_path / "adapter")
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in folder.iterdir()}
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] == 4 and str(zoo.root) not in json.dumps(cfg)

    sid = open_task_session(server)["session"]
    try:
        status, res = jcall(server, "POST", f"/v1/sessions/{sid}/evaluate", {**control, "metrics": ["loss"]})
    finally:
        call(server, "DELETE", f"/v1/sessions/{sid}")
    backend = HFBackend(str(zoo.base.path), device="cpu")
    try:
        backend.model = PeftModel.from_pretrained(backend.model, str(folder)).eval()
        pairs = [(ex.prompt, ex.target) for ex in combined.examples("search")]
        np.testing.assert_allclose(res["losses"], answer_losses(backend, pairs), atol=1e-5, rtol=0)
    finally:
        backend.close()

    # the full merged model: an HF checkpoint giving the same losses
    status, headers, data = call(server, "POST", "/v1/merged/model", control)
    assert status == 200
    mfolder = _untar(data, tmp_path / "model")
    assert (mfolder / "config.json").is_file() and (mfolder / "model.safetensors").is_file()
    merged = HFBackend(str(mfolder), device="cpu")
    try:
        np.testing.assert_allclose(res["losses"], answer_losses(merged, pairs), atol=1e-5, rtol=0)
    finally:
        merged.close()


# -- pool start-up checks ---------------------------------------------------------------
def test_pool_refuses_mismatched_adapters(zoo, tmp_path):
    from evomerge.checkpoint.lora import save_lora_adapter

    reader = LoraReader(zoo.lora_paths["lora_a"], base=zoo.base.path)
    mods = reader.lora_modules
    factors = {m: (reader.lora_factors(m).A, reader.lora_factors(m).B) for m in mods}
    fewer = save_lora_adapter(tmp_path / "fewer", dict(list(factors.items())[1:]), r=4, alpha=8,
                              target_modules=None, base_model_path=None)
    with pytest.raises(PoolError, match=r"adapter 'fewer'.*does not adapt .*unlike adapter 'lora_a'"):
        LoraPool.from_dirs(zoo.base.path, {"lora_a": zoo.lora_paths["lora_a"], "fewer": fewer})
    rank2 = save_lora_adapter(tmp_path / "rank2", {m: (a[:2], b[:, :2]) for m, (a, b) in factors.items()},
                              r=2, alpha=4, target_modules=None, base_model_path=None)
    with pytest.raises(PoolError, match=r"adapter 'rank2'.*rank 2 but adapter 'lora_a' has rank 4"):
        LoraPool.from_dirs(zoo.base.path, {"lora_a": zoo.lora_paths["lora_a"], "rank2": rank2})
    with pytest.raises(PoolError, match="not a PEFT adapter folder"):
        LoraPool.from_dirs(zoo.base.path, {"x": zoo.base.path})


def test_pool_dir_manifest(request):
    """`--pool-dir` reads H-ZOO's PoolManifest (skipped until the zoo pool exists)."""
    pytest.importorskip("evomerge.zoo.pool")
    try:
        manifest = request.getfixturevalue("test_zoo_pool")
    except pytest.FixtureLookupError:
        pytest.skip("no test_zoo_pool fixture yet")
    from evomerge.commands.serve_pool import load_pool_dir

    got = load_pool_dir(manifest.root)
    assert list(got.adapters) == list(manifest.adapters)
    pool = LoraPool.from_dirs(got.base, got.adapters, device="cpu", descriptions=got.descriptions)
    assert pool.names == list(manifest.adapters)


# -- the CLI ----------------------------------------------------------------------------
def _cli_args(zoo):
    return ["serve-pool", "--base", str(zoo.base.path),
            *[a for n in NAMES for a in ("--adapter", f"{n}={zoo.lora_paths[n]}")],
            "--task", f"combined={zoo.task_yaml('combined')}", "--port", "0", "--threads", "1"]


def test_cli_refuses_to_start_without_a_token(zoo, monkeypatch):
    from click.testing import CliRunner

    from evomerge.cli import main

    monkeypatch.delenv("EVOMERGE_POOL_TOKEN", raising=False)
    res = CliRunner().invoke(main, _cli_args(zoo))
    assert res.exit_code != 0
    assert "EVOMERGE_POOL_TOKEN is not set" in res.output


@pytest.mark.slow
def test_cli_serves_the_pool(zoo):
    env = {**os.environ, "EVOMERGE_POOL_TOKEN": TOKEN, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", *_cli_args(zoo)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert "serving LoRA pool at http://127.0.0.1:" in line, (line, proc.stderr.read() if proc.poll() else "")
        url = line.split(" at ", 1)[1].split()[0]
        listed = [proc.stdout.readline() for _ in range(1 + len(NAMES))]
        assert all(n in "".join(listed) for n in NAMES)

        class _Srv:
            pass

        srv = _Srv()
        srv.url = url
        assert jcall(srv, "GET", "/health", token=None)[0] == 200
        assert_error(*jcall(srv, "GET", "/v1/pool", token=None), 401)
        status, info = jcall(srv, "GET", "/v1/pool")
        assert status == 200 and [a["name"] for a in info["adapters"]] == NAMES
        assert info["allow_export"] == {"adapter": False, "model": False}
    finally:
        proc.terminate()
        out, err = proc.communicate(timeout=30)
    assert TOKEN not in out and TOKEN not in err  # the access log has no headers
    assert "GET /v1/pool" in out + err  # ... but it is there
