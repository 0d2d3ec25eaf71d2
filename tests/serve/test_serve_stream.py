"""`evomerge serve` on FastAPI/uvicorn: bounded work per request (oversize bodies and prompts
answered quickly, memory bounded), the official `openai` client streaming against the real
server on 127.0.0.1, seeded sampling, chat templates, and a key required beyond loopback."""

from __future__ import annotations

import http.client
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import tiny_models

from evomerge.errors import ConfigError
from evomerge.fitness import make_backend
from evomerge.serve import make_server, start_in_thread

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = ("{% for m in messages %}[{{ m['role'][0] }}]{{ m['content'] }}{% endfor %}"
            "{% if add_generation_prompt %}[a]{% endif %}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tiny_models.make_tiny_llama(tmp_path_factory.mktemp("serve2") / "tiny", seed=3, hidden=32, vocab=40)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATE
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return d


@pytest.fixture(scope="module")
def stack(tiny):
    """The server on 127.0.0.1 and, for reference answers, the HF backend in process."""
    server = make_server(tiny, port=0, model_name="tiny", access_log=False)
    start_in_thread(server)
    backend = make_backend("hf", model_dir=str(tiny), batch_size=8)
    yield server, backend
    backend.close()
    server.stop()


@pytest.fixture
def served(stack):
    return stack[0]


@pytest.fixture
def hf(stack):
    return stack[1]


@pytest.fixture
def client(served):
    openai = pytest.importorskip("openai")
    c = openai.OpenAI(base_url=served.url, api_key="unused", max_retries=0, timeout=60)
    yield c
    c.close()


def _post_raw(url: str, path: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    u = urlsplit(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.putrequest("POST", path)
        for k, v in {"Content-Type": "application/json", "Content-Length": str(len(body)), **(headers or {})}.items():
            conn.putheader(k, v)
        conn.endheaders()
        try:
            for i in range(0, len(body), 1 << 16):
                conn.send(body[i:i + (1 << 16)])
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered 413 and closed before the rest was sent
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- bounded work --------------------------------------------------------------------------


def test_oversize_prompts_are_refused_quickly_with_bounded_memory(served):
    before = _rss_mb()
    t0 = time.perf_counter()
    huge = json.dumps({"prompt": "a" * (20 << 20), "max_tokens": 4}).encode()  # 20 MB body
    status, body = _post_raw(served.url, "/v1/completions", huge)
    assert status == 413 and "limit" in body["error"]["message"]
    big = json.dumps({"prompt": "ab" * (1 << 20), "max_tokens": 4}).encode()  # 2 MB prompt, body fits
    status, body = _post_raw(served.url, "/v1/completions", big)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "characters" in body["error"]["message"]
    chat = json.dumps({"messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode()
    status, body = _post_raw(served.url, "/v1/chat/completions", chat)
    assert status == 400 and "characters" in body["error"]["message"]
    # under the character bound but over the model's 64 positions: refused after tokenizing
    status, body = _post_raw(served.url, "/v1/completions", json.dumps({"prompt": "a" * 200}).encode())
    assert status == 400 and "takes at most 64" in body["error"]["message"]
    many = json.dumps({"prompt": ["a"] * 1000, "max_tokens": 1}).encode()
    status, body = _post_raw(served.url, "/v1/completions", many)
    assert status == 400 and "at most 256" in body["error"]["message"]
    elapsed = time.perf_counter() - t0
    grown = _rss_mb() - before
    assert elapsed < 10, elapsed
    assert grown < 200, grown  # the 20 MB body was never buffered, nothing was tokenized
    status, body = _post_raw(served.url, "/v1/completions", json.dumps({"prompt": "ab", "max_tokens": 2}).encode())
    assert status == 200  # still serving


# -- the official client, streaming --------------------------------------------------------


def test_openai_client_streams_completions_like_the_plain_answer(client, hf):
    want = hf.generate(["hello"], 6)[0]
    plain = client.completions.create(model="tiny", prompt="hello", max_tokens=6)
    assert plain.choices[0].text == want
    parts, finishes = [], []
    for chunk in client.completions.create(model="tiny", prompt="hello", max_tokens=6, stream=True):
        parts.append(chunk.choices[0].text)
        finishes.append(chunk.choices[0].finish_reason)
    assert "".join(parts) == want
    assert finishes[-1] == plain.choices[0].finish_reason and all(f is None for f in finishes[:-1])
    assert len(parts) >= 2  # really streamed, token by token


def test_openai_client_streams_chat_with_the_tokenizer_template(client, hf):
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]
    want = hf.generate(["[s]s[u]hi[a]"], 5)[0]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5)
    assert plain.choices[0].message.content == want
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=5, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_stop_strings_cut_streams_where_plain_answers_are_cut(client, hf):
    prompts = ["abc", "zz top", "12+3=", "hello"]
    for p in prompts:
        want = hf.generate([p], 8, ["q", "7", "ab"])[0]
        got = "".join(c.choices[0].text for c in client.completions.create(
            model="tiny", prompt=p, max_tokens=8, stop=["q", "7", "ab"], stream=True))
        assert got == want, p


def test_seeded_sampling_is_reproducible_and_greedy_stays_the_default(client, hf):
    def sample(seed, **kw):
        return client.completions.create(model="tiny", prompt="abc", max_tokens=12, temperature=1.5,
                                         seed=seed, **kw).choices[0].text

    a, b = sample(7), sample(7)
    assert a == b
    assert len({sample(s) for s in range(6)}) > 1  # different seeds, different answers
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt="abc", max_tokens=12, temperature=1.5, seed=7, stream=True))
    assert streamed == a
    greedy = hf.generate(["abc"], 12)[0]
    assert client.completions.create(model="tiny", prompt="abc", max_tokens=12).choices[0].text == greedy
    assert client.completions.create(model="tiny", prompt="abc", max_tokens=12,
                                     temperature=0).choices[0].text == greedy
    # a tiny nucleus keeps only the most likely token: greedy again, whatever the seed
    assert sample(3, top_p=1e-6) == greedy
    import openai

    with pytest.raises(openai.BadRequestError, match="'temperature' must be a number"):
        client.completions.create(model="tiny", prompt="abc", temperature=9)


# -- keys ---------------------------------------------------------------------------------


def test_a_key_is_required_beyond_loopback(tiny):
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="needs a key"):
        make_server(tiny, host="0.0.0.0", port=0)
    assert time.perf_counter() - t0 < 5  # refused before loading the model
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "evomerge.cli", "serve", str(tiny), "--host", "0.0.0.0",
                          "--port", "0"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: --host 0.0.0.0: serving beyond loopback needs a key")


def test_with_a_key_on_all_interfaces_requests_need_it(tiny, monkeypatch):
    openai = pytest.importorskip("openai")
    monkeypatch.setenv("EVOMERGE_TEST_SERVE_KEY", "k-123")
    server = make_server(tiny, host="0.0.0.0", port=0, api_key_env="EVOMERGE_TEST_SERVE_KEY", access_log=False)
    start_in_thread(server)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        bad = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        good = openai.OpenAI(base_url=url, api_key="k-123", max_retries=0)
        assert [m.id for m in good.models.list()] == ["tiny"]
        bad.close()
        good.close()
    finally:
        server.stop()
