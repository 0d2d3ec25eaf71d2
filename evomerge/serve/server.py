"""An OpenAI-compatible HTTP server over one HF checkpoint (``evomerge serve``): FastAPI +
uvicorn, as ``evomerge serve-pool``.

Useful on its own (try an exported merge with any OpenAI client, streaming included) and as
the real endpoint the API fitness backend is tested against. The model
(:class:`~evomerge.serve.service.ModelService`) takes one request at a time behind a lock;
endpoints run on FastAPI's threadpool so the event loop keeps answering health checks and
refusals meanwhile (a request with a list of prompts is batched).

Endpoints (under ``/v1``):

- ``GET /models``: the one served model (named after the directory, or ``--model-name``);
- ``POST /completions``: ``prompt`` (a string or a list of strings), ``max_tokens``
  (default 16, 0 allowed), ``stop`` (a string or list), ``echo``, ``logprobs`` (0-5: the
  sampled token's logprob plus that many top alternatives, per token, with ``tokens`` and
  ``text_offset`` as OpenAI's legacy completions return them). ``echo`` with
  ``max_tokens: 0`` and ``logprobs`` gives the log-probability of every prompt token;
- ``POST /chat/completions``: ``messages`` rendered with the tokenizer's chat template
  (with the generation prompt) when it has one, else the message contents joined by
  newlines; the answer is ``choices[0].message.content``;
- ``GET /health`` (no key needed).

``stream: true`` answers with server-sent events (``data: {chunk}`` lines, then ``data:
[DONE]``) in OpenAI's chunk formats. Decoding is greedy unless ``temperature > 0``; then
``top_p`` and ``seed`` apply (same seed, same answer). ``n`` and ``best_of`` must be 1.
``finish_reason`` is "length" when the answer used all ``max_tokens`` tokens, else "stop".

Bounds, checked in this order so no request does unbounded work: the body size (on
``Content-Length`` and on the bytes received, before parsing: 413), the number and
characters of prompts (before tokenizing: 400), then prompt tokens + ``max_tokens`` against
the model's positions (400 ``context_length_exceeded``).

Auth: with ``api_key_env`` every ``/v1`` request must send ``Authorization: Bearer <key>``
(compared in constant time, checked before routing). Binding to an address other than
loopback without a key is refused unless ``no_auth`` says so explicitly. The key is never
logged (the access log holds the request line and status only).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import ConfigError, EvomergeError
from ..httpserve import GuardMiddleware, bind_socket
from ..netclient import Secret, read_api_key
from .service import GREEDY, MAX_TOP_LOGPROBS, ModelService, RequestError, Sampling

log = logging.getLogger("evomerge.serve")

MAX_BODY = 8 * 1024 * 1024
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class _Guard(GuardMiddleware):
    """serve-pool's auth + body-limit middleware, answering in OpenAI's error format."""

    def _error(self, status: int, message: str) -> dict[str, Any]:
        if status == 401:
            return RequestError(401, "missing or invalid API key (send Authorization: Bearer <key>)",
                                code="invalid_api_key").body()
        return RequestError(status, message).body()


def check_auth(host: str, key: Secret | None, no_auth: bool) -> None:
    """A non-loopback address needs a key (or an explicit ``no_auth``)."""
    if key is None and not no_auth and host not in LOOPBACK:
        raise ConfigError(f"--host {host}: serving beyond loopback needs a key (--api-key-env NAME), "
                          "or --no-auth to serve without one on purpose")


# -- request parsing ----------------------------------------------------------------------


def _int(body: dict[str, Any], key: str, default: int | None, low: int, high: int | None = None) -> int | None:
    value = body.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        span = f"{low}..{high}" if high is not None else f">= {low}"
        raise RequestError(400, f"'{key}' must be an integer {span}, got {value!r}", key)
    return value


def _float(body: dict[str, Any], key: str, low: float, high: float, low_open: bool = False) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (low < value if low_open else low <= value) or value > high:
        span = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise RequestError(400, f"'{key}' must be a number in {span}, got {value!r}", key)
    return float(value)


def _sampling(body: dict[str, Any]) -> Sampling:
    temperature = _float(body, "temperature", 0.0, 2.0)
    top_p = _float(body, "top_p", 0.0, 1.0, low_open=True)
    seed = _int(body, "seed", None, -(2**63), 2**63 - 1)
    if not temperature:
        return GREEDY  # greedy is the default, and what temperature 0 means
    return Sampling(temperature, 1.0 if top_p is None else top_p, seed)


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise RequestError(400, "'stop' must be a non-empty string or a list of at most 16 of them", "stop")
    return list(stop)


def _common(body: dict[str, Any], service: Any) -> tuple[bool, Sampling]:
    model = body.get("model")
    if model is not None and model != service.name:
        raise RequestError(404, f"model {model!r} not found; this server serves {service.name!r}", "model",
                           "model_not_found")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false", "stream")
    if _int(body, "n", 1, 1) != 1:
        raise RequestError(400, "'n' must be 1", "n")
    if _int(body, "best_of", 1, 1) != 1:
        raise RequestError(400, "'best_of' must be 1", "best_of")
    sampling = _sampling(body)
    if (stream or not sampling.greedy) and not hasattr(service, "stream"):
        raise RequestError(400, "this server decodes greedily and does not stream", "stream" if stream else "temperature")
    return stream, sampling


def _prompts(body: dict[str, Any]) -> list[str]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(p, (int, list)) for p in prompt):
        raise RequestError(400, "token-id prompts are not supported; send text", "prompt")
    raise RequestError(400, "'prompt' must be a string or a non-empty list of strings", "prompt")


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(400, f"messages[{i}] must be an object with a 'role'", "messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
            if len(parts) != len(content) or not all(isinstance(p, str) for p in parts):
                raise RequestError(400, f"messages[{i}].content: only text parts are supported", "messages")
            content = "".join(parts)
        if not isinstance(content, str):
            raise RequestError(400, f"messages[{i}].content must be a string", "messages")
        out.append({"role": m["role"], "content": content})
    return out


# -- the endpoints ------------------------------------------------------------------------


def _head(kind: str, service: Any) -> dict[str, Any]:
    prefix = "chatcmpl" if kind.startswith("chat") else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
            "model": service.name}


def _completions(service: Any, body: dict[str, Any]) -> dict[str, Any] | Iterator[dict[str, Any]]:
    stream, sampling = _common(body, service)
    prompts = _prompts(body)
    max_tokens = _int(body, "max_tokens", 16, 0)
    echo = body.get("echo", False)
    if not isinstance(echo, bool):
        raise RequestError(400, "'echo' must be true or false", "echo")
    logprobs = body.get("logprobs")
    if logprobs is False:
        logprobs = None
    if logprobs is not None:
        logprobs = _int(body, "logprobs", None, 0, getattr(service, "max_logprobs", MAX_TOP_LOGPROBS))
    stop = _stops(body)
    if not stream:
        extra = {} if sampling.greedy else {"sampling": sampling}
        choices, usage = service.complete(prompts, max_tokens, stop, echo, logprobs, **extra)
        return {**_head("text_completion", service), "choices": choices, "usage": usage}
    if logprobs is not None:
        raise RequestError(400, "logprobs are not streamed; send stream: false", "logprobs")
    service.check_prompts(prompts)
    with service.lock:
        encoded = [service.fit(p, max_tokens) for p in prompts]
    head = _head("text_completion", service)

    def chunks() -> Iterator[dict[str, Any]]:
        for i, (prompt, ids) in enumerate(zip(prompts, encoded)):
            if echo:
                yield {**head, "choices": [{"index": i, "text": prompt, "logprobs": None, "finish_reason": None}]}
            for delta, finish in service.stream(ids, max_tokens, stop, sampling):
                if delta or finish:
                    yield {**head, "choices": [{"index": i, "text": delta, "logprobs": None,
                                                "finish_reason": finish}]}

    return chunks()


def _chat(service: Any, body: dict[str, Any]) -> dict[str, Any] | Iterator[dict[str, Any]]:
    stream, sampling = _common(body, service)
    if body.get("logprobs"):
        raise RequestError(400, "logprobs on chat completions are not supported; use /v1/completions with echo",
                           "logprobs")
    messages = _messages(body)
    max_tokens = _int(body, "max_completion_tokens", None, 1)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, 1)
    stop = _stops(body)
    if not stream:
        extra = {} if sampling.greedy else {"sampling": sampling}
        choice, usage = service.chat(messages, max_tokens, stop, **extra)
        return {**_head("chat.completion", service), "choices": [choice], "usage": usage}
    with service.lock:
        _, ids, max_tokens = service.chat_prompt(messages, max_tokens)
    head = _head("chat.completion.chunk", service)

    def chunks() -> Iterator[dict[str, Any]]:
        yield {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}]}
        for delta, finish in service.stream(ids, max_tokens, stop, sampling):
            if delta:
                yield {**head, "choices": [{"index": 0, "delta": {"content": delta}, "logprobs": None,
                                            "finish_reason": None}]}
            if finish:
                yield {**head, "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": finish}]}

    return chunks()


async def _sse(chunks: Iterator[dict[str, Any]]) -> Any:
    """Server-sent events from a (blocking) chunk iterator, each step on the threadpool; the
    iterator is closed however the stream ends (a client that leaves frees the model)."""
    done = object()
    try:
        while True:
            chunk = await run_in_threadpool(next, chunks, done)
            if chunk is done:
                break
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await run_in_threadpool(chunks.close)


def create_app(service: Any, api_key: Secret | None = None, max_body: int = MAX_BODY) -> FastAPI:
    app = FastAPI(title="evomerge serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service

    def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
        return JSONResponse(RequestError(status, message, param, code).body(), status_code=status)

    @app.exception_handler(RequestError)
    async def _request_error(request: Request, err: RequestError) -> JSONResponse:
        return error(err.status, err.message, err.param, err.code)

    @app.exception_handler(EvomergeError)
    async def _evomerge_error(request: Request, err: EvomergeError) -> JSONResponse:
        return error(400, str(err))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code in (404, 405):
            return error(err.status_code, f"no route {request.method} {request.url.path}")
        return error(err.status_code, str(err.detail))

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(err).__name__, err)
        return error(500, f"internal error: {type(err).__name__}: {err}")

    app.add_middleware(_Guard, token=api_key.reveal() if api_key else None, max_body=int(max_body))

    def card() -> dict[str, Any]:
        return {"id": service.name, "object": "model", "created": service.created, "owned_by": "evomerge"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        if name != service.name:
            raise RequestError(404, f"model {name!r} not found", "model", "model_not_found")
        return card()

    async def handle(request: Request, endpoint: Any) -> Any:
        try:
            body = json.loads((await request.body()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RequestError(400, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise RequestError(400, "request body must be a JSON object")
        out = await run_in_threadpool(endpoint, service, body)
        if isinstance(out, dict):
            return out
        return StreamingResponse(_sse(out), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, _completions)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        return await handle(request, _chat)

    return app


# -- the server ---------------------------------------------------------------------------


class OpenAIServer:
    """A bound socket + uvicorn serving :func:`create_app` over ``service``.

    ``serve_forever()`` blocks (Ctrl-C / SIGTERM end it); :func:`start_in_thread` runs it
    on a daemon thread; ``stop()`` ends serving and releases the model."""

    def __init__(self, address: tuple[str, int], service: Any, api_key: Secret | None = None, *,
                 no_auth: bool = False, max_body: int = MAX_BODY, access_log: bool = True):
        import uvicorn

        host, port = address
        check_auth(host, api_key, no_auth)
        self.service = service
        self.api_key = api_key
        self.host = host
        self.app = create_app(service, api_key, max_body)
        self.socket = bind_socket(host, int(port))
        self.server_address = self.socket.getsockname()
        # log_config=None: uvicorn's loggers go to the root logger the CLI set up (stderr)
        self._uvicorn = uvicorn.Server(uvicorn.Config(
            self.app, log_config=None, access_log=access_log, lifespan="off", server_header=False,
            proxy_headers=False, timeout_keep_alive=30))
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"OpenAIServer({self.url!r}, model={self.service.name!r}, key={'set' if self.api_key else 'none'})"

    @property
    def url(self) -> str:
        """Base URL of the API (``http://host:port/v1``), with the real port when 0 was asked."""
        host, port = self.server_address[:2]
        if ":" in str(host):
            host = f"[{host}]"
        return f"http://{host}:{port}/v1"

    def serve_forever(self, poll_interval: float = 0.1) -> None:
        self._uvicorn.run(sockets=[self.socket])

    def shutdown(self) -> None:
        self._uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(30)

    def server_close(self) -> None:
        try:
            self.socket.close()
        except OSError:
            pass

    def stop(self) -> None:
        """Stop serving (from another thread than ``serve_forever``) and release the model."""
        self.shutdown()
        self.server_close()
        self.service.close()


def make_server(
    model_dir: str | Path,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    api_key_env: str | None = None,
    no_auth: bool = False,
    max_body: int = MAX_BODY,
    access_log: bool = True,
    **service_options: Any,
) -> OpenAIServer:
    """Load the model (``service_options``: :class:`ModelService`'s keyword arguments) and
    bind the socket (``port=0``: an ephemeral port, see ``.url``).

    The key (and whether one is needed) is checked before the model is loaded, so a server
    that would be refused fails fast."""
    key = read_api_key(api_key_env, field="--api-key-env")
    check_auth(host, key, no_auth)
    service = ModelService(model_dir, **service_options)
    try:
        return OpenAIServer((host, int(port)), service, key, no_auth=no_auth, max_body=max_body,
                            access_log=access_log)
    except BaseException:
        service.close()
        raise


def start_in_thread(server: OpenAIServer, timeout: float = 30.0) -> threading.Thread:
    """Serve on a daemon thread, once it accepts connections; stop with ``server.stop()``."""
    thread = threading.Thread(target=server.serve_forever, daemon=True, name="evomerge-serve")
    server._thread = thread
    thread.start()
    deadline = time.monotonic() + timeout
    while not server._uvicorn.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise EvomergeError(f"the server at {server.url} did not start")
        time.sleep(0.01)
    return thread
