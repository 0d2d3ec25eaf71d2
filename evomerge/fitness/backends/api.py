"""OpenAI-compatible API backend: scores tasks on a fixed model behind an HTTP endpoint.

The model behind ``base_url`` is fixed: its weights cannot be swapped, so this backend is
for scoring endpoints as they are (a provider's model, ``evomerge serve`` of an exported
merge, the black-box merging that sends merge parameters rather than weights). A MergePlan
is accepted only when it is the identity of the checkpoint the endpoint is declared to
serve (``served_model_dir``); any other plan is refused with a :class:`BackendError`.

Requests (stdlib ``http.client``, one keep-alive connection per thread, no extra deps):

- generation: ``/completions`` with ``prompt`` (a list of up to ``prompts_per_request``
  prompts), or ``/chat/completions`` with one user message per request; ``temperature: 0``,
  ``max_tokens`` = the task's ``max_new_tokens``, the task's stop strings (at most
  ``max_stop`` are sent, OpenAI's limit is 4; every stop string is also applied here);
- log-likelihood (multiple_choice, neg_perplexity): ``/completions`` with
  ``prompt = context + continuation``, ``max_tokens: 0``, ``echo: true``, ``logprobs: 1``, as
  lm-eval's OpenAI completions backend does. The continuation's tokens are found from the
  echoed ``text_offset`` (no local tokenizer needed): every token that starts inside the
  prompt and covers a character after ``context.rstrip(" ")`` (trailing context spaces move
  to the continuation, as lm-eval and the HF backend split them). Chat endpoints give no
  prompt logprobs, so those tasks are refused before any request is sent.

Robustness: at most ``concurrency`` requests in flight (a thread pool); ``timeout`` seconds
per socket read; 408/409/429/5xx and connection errors/timeouts are retried up to
``max_retries`` times with exponential backoff and jitter (``Retry-After`` honoured, capped
at ``max_backoff``); other 4xx, malformed JSON, empty ``choices`` and missing logprobs fail
at once with one line. The API key is read from the environment variable *named* by
``api_key_env``; it is sent as ``Authorization: Bearer`` and never appears in an error, a
log line or a ``repr`` (it is held in a :class:`Secret` and scrubbed from server messages).
"""

from __future__ import annotations

import email.utils
import http.client
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from ...errors import BackendError
from ..scoring import Loglik, evaluate_task, truncate_at_stop
from .base import Backend, register_backend

log = logging.getLogger("evomerge.api")

RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))
_ENDPOINTS = ("completions", "chat")


class Secret:
    """A string that never shows itself: ``repr``/``str`` give ``<secret>``."""

    __slots__ = ("_value",)

    def __init__(self, value: str):
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<secret>"

    __str__ = __repr__

    def __reduce__(self):  # never pickled along with an object (Ray ships backends' specs)
        raise TypeError("a Secret cannot be pickled")


def read_api_key(env_name: str | None, field: str = "backend.options.api_key_env") -> Secret | None:
    """The key from the environment variable named ``env_name`` (None when no name given)."""
    if env_name is None:
        return None
    if not isinstance(env_name, str) or not env_name.strip():
        raise BackendError(f"{field}: must name an environment variable, got {env_name!r}")
    value = os.environ.get(env_name)
    if not value:
        raise BackendError(f"{field}: environment variable {env_name} is not set or empty")
    return Secret(value.strip())


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded exponential backoff with jitter.

    Attempt ``k`` (0-based) waits ``min(max_backoff, backoff * 2**k)`` scaled by a random
    factor in [0.5, 1] ("equal jitter": concurrent clients spread out, but never retry at
    once). A server's ``Retry-After`` replaces the computed delay, capped at ``max_backoff``.
    """

    max_retries: int = 4
    backoff: float = 0.5
    max_backoff: float = 30.0

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_backoff))
        cap = min(self.max_backoff, self.backoff * (2.0**attempt))
        return cap * (0.5 + 0.5 * rng.random())


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date), else None."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - time.time())


class _Retryable(Exception):
    """One failed attempt that may succeed when tried again."""

    def __init__(self, what: str, retry_after: float | None = None):
        super().__init__(what)
        self.what = what
        self.retry_after = retry_after


class APIClient:
    """JSON over HTTP(S) to one OpenAI-compatible base URL, with retries.

    Thread-safe: each thread keeps its own keep-alive connection. ``stats`` counts requests,
    retries, failures and responses by status (for tests, benchmarks and run reports).
    """

    def __init__(
        self,
        base_url: str,
        api_key: Secret | None = None,
        timeout: float = 60.0,
        retry: RetryPolicy | None = None,
        headers: Mapping[str, str] | None = None,
        key_hint: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        seed: int | None = None,
    ):
        parts = urlsplit(str(base_url).strip())
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise BackendError(
                f"backend.options.base_url: expected http(s)://host[:port]/path, got {_redact_url(base_url)!r}"
            )
        if parts.username or parts.password:
            raise BackendError(
                "backend.options.base_url: credentials in the URL are refused; put the key in "
                "an environment variable and name it in backend.options.api_key_env"
            )
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.prefix = parts.path.rstrip("/")
        self.query = parts.query
        self.timeout = float(timeout)
        if not self.timeout > 0:
            raise BackendError(f"backend.options.timeout: must be > 0 seconds, got {timeout}")
        self.retry = retry or RetryPolicy()
        self._key = api_key
        self._key_hint = key_hint
        self._headers = {str(k): str(v) for k, v in (headers or {}).items()}
        self._sleep = sleep
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()
        self._local = threading.local()
        self._conns: list[http.client.HTTPConnection] = []
        self._conns_lock = threading.Lock()
        self._stats_lock = threading.Lock()
        self.stats: dict[str, Any] = {"requests": 0, "retries": 0, "failures": 0, "status": {}}

    def __repr__(self) -> str:  # no key, no headers
        return f"APIClient({self.url('')!r})"

    def url(self, path: str) -> str:
        """The URL of ``path`` for messages (no query string, no credentials)."""
        default = 443 if self.scheme == "https" else 80
        port = "" if self.port == default else f":{self.port}"
        tail = f"/{path.lstrip('/')}" if path else ""
        return f"{self.scheme}://{self.host}{port}{self.prefix}{tail}"

    # -- connections ------------------------------------------------------------------
    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn, True
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        conn = cls(self.host, self.port, timeout=self.timeout)
        self._local.conn = conn
        with self._conns_lock:
            self._conns.append(conn)
        return conn, False

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()
            with self._conns_lock:
                if conn in self._conns:
                    self._conns.remove(conn)

    def close(self) -> None:
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            conn.close()

    # -- one exchange -----------------------------------------------------------------
    def _count(self, key: str, status: int | None = None) -> None:
        with self._stats_lock:
            if status is not None:
                self.stats["status"][status] = self.stats["status"].get(status, 0) + 1
            else:
                self.stats[key] += 1

    def _exchange(self, method: str, target: str, payload: bytes | None) -> tuple[int, str, dict[str, str], bytes]:
        headers = {"Accept": "application/json", "User-Agent": "evomerge", **self._headers}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        if self._key is not None:
            headers["Authorization"] = f"Bearer {self._key.reveal()}"
        for fresh_try in (False, True):
            conn, reused = self._connection()
            try:
                conn.request(method, target, body=payload, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self._drop_connection()
                if reused and not fresh_try:  # a keep-alive connection the server closed: reopen
                    continue
                raise
            except BaseException:
                self._drop_connection()
                raise
            if resp.will_close:
                self._drop_connection()
            return resp.status, resp.reason, {k.lower(): v for k, v in resp.getheaders()}, body
        raise AssertionError("unreachable")

    def request(self, method: str, path: str, body: Any = None) -> Any:
        """Send one JSON request, retrying what may succeed later; returns the parsed JSON."""
        where = f"{method} {self.url(path)}"
        status, reason, _, raw = self.request_raw(method, path, body)
        if not 200 <= status < 300:
            self._count("failures")
            raise BackendError(f"{where}: {self.status_message(status, reason, raw)}")
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            self._count("failures")
            raise BackendError(
                f"{where}: malformed JSON in the response (HTTP {status}): {self._clean(_snippet(raw))!r}"
            ) from None

    def status_message(self, status: int, reason: str, raw: bytes) -> str:
        """``HTTP <status> <reason>: <server message>`` (one line, no key) plus an auth hint."""
        hint = ""
        if status in (401, 403):
            hint = (
                f" (check the key in ${self._key_hint})"
                if self._key_hint
                else " (the endpoint wants a key: set backend.options.api_key_env)"
            )
        return f"HTTP {status} {reason}{self._server_message(raw)}{hint}"

    def request_raw(self, method: str, path: str, body: Any = None) -> tuple[int, str, dict[str, str], bytes]:
        """Send one request (JSON body), retrying what may succeed later (408/409/429/5xx,
        connection errors, timeouts); returns the final ``(status, reason, headers, body)``
        whatever its status, for callers that read non-JSON bodies or handle 4xx themselves."""
        target = f"{self.prefix}/{path.lstrip('/')}" + (f"?{self.query}" if self.query else "")
        payload = None if body is None else json.dumps(body).encode("utf-8")
        where = f"{method} {self.url(path)}"
        attempt = 0
        while True:
            self._count("requests")
            try:
                try:
                    status, reason, headers, raw = self._exchange(method, target, payload)
                except TimeoutError:
                    raise _Retryable(f"timed out after {self.timeout:g} s without a response") from None
                except (OSError, http.client.HTTPException) as err:
                    raise _Retryable(f"connection error: {self._clean(_one_line(err))}") from None
                self._count("status", status)
                if status in RETRY_STATUS:
                    raise _Retryable(
                        f"HTTP {status} {reason}{self._server_message(raw)}",
                        parse_retry_after(headers.get("retry-after")),
                    )
            except _Retryable as err:
                if attempt >= self.retry.max_retries:
                    self._count("failures")
                    raise BackendError(
                        f"{where}: gave up after {attempt + 1} attempt(s): {err.what}"
                    ) from None
                with self._rng_lock:
                    pause = self.retry.delay(attempt, err.retry_after, self._rng)
                log.warning(
                    "%s: %s; retry %d/%d in %.2f s", where, err.what, attempt + 1,
                    self.retry.max_retries, pause,
                )
                self._count("retries")
                attempt += 1
                self._sleep(pause)
                continue
            return status, reason, headers, raw

    def _server_message(self, raw: bytes) -> str:
        """``: <message>`` from an OpenAI-style error body (or the text), one line, no key."""
        text = ""
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            text = _snippet(raw)
        else:
            if isinstance(obj, dict):
                err = obj.get("error", obj)
                if isinstance(err, dict):
                    text = str(err.get("message") or err.get("detail") or "")
                elif isinstance(err, str):
                    text = err
                if not text and isinstance(obj.get("detail"), str):
                    text = obj["detail"]
        text = self._clean(" ".join(text.split()))[:300]
        return f": {text}" if text else ""

    def _clean(self, text: str) -> str:
        if self._key is not None and self._key.reveal():
            text = text.replace(self._key.reveal(), "<secret>")
        return text


def token_ends(offsets: Sequence[int], text_len: int) -> list[int]:
    """End character of each token given the tokens' start offsets: the next larger offset
    (tokens sharing an offset share a character), ``text_len`` for the last."""
    ends = [text_len] * len(offsets)
    for i in range(len(offsets) - 2, -1, -1):
        ends[i] = offsets[i + 1] if offsets[i + 1] > offsets[i] else ends[i + 1]
    return ends


def run_jobs(pool: ThreadPoolExecutor, jobs: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run ``jobs`` on ``pool``; results in order. The first error cancels what has not
    started, waits for what has, and is raised."""
    futures: list[Future] = [pool.submit(job) for job in jobs]
    done, pending = wait(futures, return_when=FIRST_EXCEPTION)
    failed = next((f for f in futures if f in done and f.exception() is not None), None)
    if failed is not None:
        for f in pending:
            f.cancel()
        wait(pending)
        raise failed.exception()  # type: ignore[misc]
    return [f.result() for f in futures]


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def _snippet(raw: bytes, n: int = 120) -> str:
    return " ".join(raw[:n].decode("utf-8", "replace").split())


def _redact_url(url: Any) -> str:
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return "<unparsable URL>"
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else str(url).split("?")[0]


# -- identity plans -----------------------------------------------------------------------


def identity_problem(plan: Any, served_dir: str | os.PathLike) -> str | None:
    """Why ``plan`` would produce weights other than ``served_dir``'s (None when it would not).

    A plan is the identity of a checkpoint when every step copies one tensor of that
    checkpoint unchanged under its own name (``passthrough`` with scale 1, or ``linear``
    of a single input that is normalized or weighted 1), with no config overrides and no
    dtype other than the checkpoint's.
    """
    from ...checkpoint.opener import open_checkpoint
    from ...ops import get_op

    plan.validate()  # an invalid plan is a PlanError, not an identity question
    served = Path(served_dir).expanduser().resolve()
    if plan.config_overrides:
        return f"it changes the config ({', '.join(sorted(plan.config_overrides))})"
    reader = None
    for step in plan.steps:
        spec = get_op(step.op)
        params = spec.resolve_params(step)
        if len(step.inputs) != 1 or step.base is not None:
            return f"tensor {step.output!r} combines {len(step.inputs)} inputs with {step.op!r}"
        if step.op == "passthrough":
            if float(params["scale"]) != 1.0:
                return f"tensor {step.output!r} is scaled by {params['scale']}"
        elif step.op == "linear":
            w = float(params["weight"][0])
            if not params["normalize"] and w != 1.0:
                return f"tensor {step.output!r} is weighted {w} without normalize"
        else:
            return f"tensor {step.output!r} goes through operator {step.op!r}"
        ref = step.inputs[0]
        if ref.tensor != step.output:
            return f"tensor {step.output!r} is read from {ref.tensor!r}"
        src = Path(plan.sources[ref.model]).expanduser().resolve()
        if src != served:
            return f"tensor {step.output!r} comes from {src}, not {served}"
        if reader is None:
            reader = open_checkpoint(served)
        if not reader.has(step.output):
            return f"tensor {step.output!r} is not in {served}"
        if plan.dtype:
            from ...checkpoint.writer import parse_dtype

            if parse_dtype(plan.dtype) != reader.dtype(step.output):
                return f"it casts to {plan.dtype} but {step.output!r} is {reader.dtype(step.output)}"
    return None


# -- the backend --------------------------------------------------------------------------


@register_backend("api")
class APIBackend(Backend):
    """Scores tasks through an OpenAI-compatible endpoint (see the module docstring).

    Options (``backend.options`` in a run config): ``base_url`` (required, e.g.
    ``http://127.0.0.1:8000/v1``), ``model`` (default: the only model ``/models`` lists),
    ``endpoint`` ("completions" or "chat"), ``api_key_env``, ``concurrency`` (4),
    ``timeout`` (60 s per read), ``max_retries`` (4), ``backoff`` (0.5 s), ``max_backoff``
    (30 s), ``prompts_per_request`` (1; completions only, servers that accept a list of
    prompts go faster with more), ``max_stop`` (4), ``system_prompt`` (chat),
    ``max_tokens_field`` ("max_tokens"; newer OpenAI chat models want
    "max_completion_tokens"), ``echo_max_tokens`` (0; servers that refuse 0 take 1, the
    generated token is ignored), ``seed`` (sent when given), ``headers`` (extra, not
    secret), ``served_model_dir`` (the checkpoint the endpoint serves, to accept identity
    plans). ``device``/``dtype``/``batch_size`` of the run config do not apply and are ignored.
    """

    def __init__(
        self,
        model_dir: str | None = None,
        device: str | None = None,
        dtype: Any = None,
        batch_size: int | None = None,
        *,
        base_url: str | None = None,
        model: str | None = None,
        endpoint: str = "completions",
        api_key_env: str | None = None,
        concurrency: int = 4,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        prompts_per_request: int = 1,
        max_stop: int = 4,
        system_prompt: str | None = None,
        max_tokens_field: str = "max_tokens",
        echo_max_tokens: int = 0,
        seed: int | None = None,
        headers: Mapping[str, str] | None = None,
        served_model_dir: str | None = None,
        **unknown: Any,
    ):
        if unknown:
            known = sorted(
                "base_url model endpoint api_key_env concurrency timeout max_retries backoff "
                "max_backoff prompts_per_request max_stop system_prompt max_tokens_field "
                "echo_max_tokens seed headers served_model_dir".split()
            )
            raise BackendError(
                f"backend.options.{sorted(unknown)[0]}: unknown option of the api backend; "
                f"known: {', '.join(known)}"
            )
        super().__init__(str(model_dir) if model_dir is not None else "", device)
        if not base_url:
            raise BackendError("backend.options.base_url: required by the api backend (e.g. http://127.0.0.1:8000/v1)")
        if endpoint not in _ENDPOINTS:
            raise BackendError(f"backend.options.endpoint: {endpoint!r} is not one of {', '.join(_ENDPOINTS)}")
        for name, value, low in (
            ("concurrency", concurrency, 1),
            ("prompts_per_request", prompts_per_request, 1),
            ("max_retries", max_retries, 0),
            ("max_stop", max_stop, 0),
            ("echo_max_tokens", echo_max_tokens, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BackendError(f"backend.options.{name}: must be an integer >= {low}, got {value!r}")
        if echo_max_tokens > 1:
            raise BackendError(f"backend.options.echo_max_tokens: must be 0 or 1, got {echo_max_tokens}")
        for name, value in (("timeout", timeout), ("backoff", backoff), ("max_backoff", max_backoff)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise BackendError(f"backend.options.{name}: must be a number of seconds >= 0, got {value!r}")
        self.endpoint = endpoint
        self.concurrency = concurrency
        self.prompts_per_request = prompts_per_request if endpoint == "completions" else 1
        self.max_stop = max_stop
        self.system_prompt = system_prompt
        self.max_tokens_field = max_tokens_field
        self.echo_max_tokens = echo_max_tokens
        self.seed = seed
        self.served_model_dir = served_model_dir
        self.options = {  # what repr/reports may show: the key's variable name, never the key
            "base_url": _redact_url(base_url),
            "endpoint": endpoint,
            "api_key_env": api_key_env,
        }
        self.client = APIClient(
            base_url,
            api_key=read_api_key(api_key_env),
            timeout=timeout,
            retry=RetryPolicy(int(max_retries), float(backoff), float(max_backoff)),
            headers=headers,
            key_hint=api_key_env,
            seed=seed,
        )
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._task: str | None = None
        self.model = model if model is not None else self._only_model()

    def __repr__(self) -> str:
        return f"APIBackend(base_url={self.client.url('')!r}, model={self.model!r}, endpoint={self.endpoint!r})"

    def _only_model(self) -> str:
        listing = self.client.request("GET", "models")
        data = listing.get("data") if isinstance(listing, dict) else None
        ids = [m.get("id") for m in data or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]
        if len(ids) != 1:
            raise BackendError(
                f"backend.options.model: required: {self.client.url('models')} lists "
                f"{len(ids)} models{' (' + ', '.join(ids[:5]) + ')' if ids else ''}"
            )
        return ids[0]

    @property
    def stats(self) -> dict[str, Any]:
        return self.client.stats

    # -- weights ----------------------------------------------------------------------
    def target_tensors(self) -> Mapping[str, Any]:
        return {}

    def load_plan(self, plan: Any, materializer: Any) -> None:
        """Accept only a plan that changes nothing about the served model (see module doc)."""
        if plan is None or not plan.steps:
            return
        where = f"the api backend cannot change the weights served at {self.client.url('')} (model {self.model!r})"
        if not self.served_model_dir:
            raise BackendError(
                f"{where}: plan {plan.hash()} needs merged weights; the api backend scores fixed "
                "endpoints (set backend.options.served_model_dir to score the served checkpoint itself)"
            )
        problem = identity_problem(plan, self.served_model_dir)
        if problem is not None:
            raise BackendError(f"{where}: plan {plan.hash()} is not the served checkpoint: {problem}")

    # -- concurrency ------------------------------------------------------------------
    def _run_all(self, jobs: Sequence[Callable[[], Any]]) -> list[Any]:
        """Run ``jobs`` with at most ``concurrency`` in flight; results in order. The first
        error cancels what has not started and is raised."""
        if self.concurrency == 1 or len(jobs) <= 1:
            return [job() for job in jobs]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="evomerge-api")
            pool = self._pool
        return run_jobs(pool, jobs)

    # -- generation -------------------------------------------------------------------
    def _where(self) -> str:
        return f"task {self._task}: " if self._task else ""

    def _choices(self, resp: Any, expected: int, path: str) -> list[dict[str, Any]]:
        url = self.client.url(path)
        if not isinstance(resp, dict):
            raise BackendError(f"{self._where()}{url}: response is not a JSON object")
        choices = resp.get("choices")
        if not isinstance(choices, list) or not choices:
            raise BackendError(f"{self._where()}{url}: response has no choices")
        if not all(isinstance(c, dict) for c in choices):
            raise BackendError(f"{self._where()}{url}: malformed choices (not JSON objects)")
        if len(choices) != expected:
            raise BackendError(
                f"{self._where()}{url}: {len(choices)} choices for {expected} prompt(s) "
                "(does the server accept a list of prompts? set prompts_per_request: 1)"
            )
        if all(isinstance(c.get("index"), int) for c in choices):
            choices = sorted(choices, key=lambda c: c["index"])
        return choices

    def _sampling(self, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, self.max_tokens_field: int(max_tokens), "temperature": 0}
        if self.seed is not None:
            body["seed"] = int(self.seed)
        return body

    def _complete(self, prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]:
        body = self._sampling(max_new_tokens)
        body["prompt"] = prompts[0] if len(prompts) == 1 else prompts
        if stop:
            body["stop"] = stop
        resp = self.client.request("POST", "completions", body)
        texts = []
        for c in self._choices(resp, len(prompts), "completions"):
            text = c.get("text")
            if not isinstance(text, str):
                raise BackendError(f"{self._where()}{self.client.url('completions')}: a choice has no 'text'")
            texts.append(text)
        return texts

    def _chat(self, prompt: str, max_new_tokens: int, stop: list[str]) -> list[str]:
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": prompt})
        body = self._sampling(max_new_tokens)
        body["messages"] = messages
        if stop:
            body["stop"] = stop
        resp = self.client.request("POST", "chat/completions", body)
        (choice,) = self._choices(resp, 1, "chat/completions")
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if content is None and isinstance(message, dict) and not message.get("refusal"):
            content = ""  # some servers send null content for an empty answer
        if not isinstance(content, str):
            raise BackendError(
                f"{self._where()}{self.client.url('chat/completions')}: a choice has no message content"
            )
        return [content]

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        """Greedy completions of ``prompts`` (temperature 0), cut at every stop string."""
        prompts = list(prompts)
        if not prompts:
            return []
        sent = list(stop)[: self.max_stop]
        if self.endpoint == "chat":
            jobs = [lambda p=p: self._chat(p, max_new_tokens, sent) for p in prompts]
        else:
            n = self.prompts_per_request
            jobs = [
                lambda chunk=prompts[i : i + n]: self._complete(chunk, max_new_tokens, sent)
                for i in range(0, len(prompts), n)
            ]
        texts = [t for chunk in self._run_all(jobs) for t in chunk]
        return [truncate_at_stop(t, stop) for t in texts]

    # -- log-likelihood ---------------------------------------------------------------
    def _echo(self, pairs: list[tuple[str, str]]) -> list[Loglik]:
        prompts = [ctx + cont for ctx, cont in pairs]
        body = self._sampling(self.echo_max_tokens)
        body.update(prompt=prompts[0] if len(prompts) == 1 else prompts, echo=True, logprobs=1)
        resp = self.client.request("POST", "completions", body)
        choices = self._choices(resp, len(prompts), "completions")
        return [self._continuation_loglik(c, ctx, cont) for c, (ctx, cont) in zip(choices, pairs)]

    def _continuation_loglik(self, choice: dict[str, Any], context: str, continuation: str) -> Loglik:
        url = self.client.url("completions")
        lp = choice.get("logprobs")
        token_lps = lp.get("token_logprobs") if isinstance(lp, dict) else None
        if not isinstance(token_lps, list) or not token_lps:
            raise BackendError(
                f"{self._where()}{url}: the response has no logprobs, which log-likelihood "
                "scoring (multiple_choice, neg_perplexity) needs (echo + logprobs unsupported?)"
            )
        offsets = lp.get("text_offset")
        if not isinstance(offsets, list) or len(offsets) != len(token_lps):
            tokens = lp.get("tokens")
            if isinstance(tokens, list) and len(tokens) == len(token_lps) and all(isinstance(t, str) for t in tokens):
                offsets, pos = [], 0
                for t in tokens:
                    offsets.append(pos)
                    pos += len(t)
            else:
                raise BackendError(f"{self._where()}{url}: logprobs without text_offset or tokens")
        if not all(isinstance(o, int) for o in offsets) or any(
            b < a for a, b in zip(offsets, offsets[1:])
        ):
            raise BackendError(f"{self._where()}{url}: malformed logprobs.text_offset (not non-decreasing integers)")
        prompt_len = len(context) + len(continuation)
        boundary = len(context.rstrip(" "))
        ends = token_ends(offsets, prompt_len)
        total, count = 0.0, 0
        for i, (start, end, value) in enumerate(zip(offsets, ends, token_lps)):
            if start >= prompt_len:
                break  # echo_max_tokens: 1 adds a generated token after the prompt
            if min(end, prompt_len) <= boundary:
                continue  # a context token
            if value is None and i == 0 and len(offsets) > 1 and offsets[1] == start:
                continue  # a zero-width BOS before an empty context: it has no logprob
            if value is None:
                raise BackendError(
                    f"{self._where()}{url}: no logprob for a continuation token at offset {start} "
                    "(an empty context with no BOS cannot be scored)"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BackendError(f"{self._where()}{url}: malformed token_logprobs value {value!r}")
            total += float(value)
            count += 1
        if count == 0:
            raise BackendError(
                f"{self._where()}{url}: no continuation tokens in the echoed logprobs for {continuation!r}"
            )
        return Loglik(total, count)

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[Loglik]:
        """Summed log p(continuation | context) per request, from echoed prompt logprobs."""
        requests = list(requests)
        if not requests:
            return []
        if self.endpoint == "chat":
            raise BackendError(self._chat_refusal(self._task))
        n = self.prompts_per_request
        jobs = [lambda chunk=requests[i : i + n]: self._echo(chunk) for i in range(0, len(requests), n)]
        return [ll for chunk in self._run_all(jobs) for ll in chunk]

    def _chat_refusal(self, task: str | None, scoring: str | None = None) -> str:
        what = f"task {task} (scoring: {scoring})" if task and scoring else (f"task {task}" if task else "log-likelihood scoring")
        return (
            f"{what} needs prompt log-likelihoods, which chat endpoints cannot give; use "
            "backend.options.endpoint: completions (echo + logprobs)"
        )

    # -- the Backend contract ---------------------------------------------------------
    def evaluate(self, tasks, split: str = "search") -> dict[str, np.ndarray]:
        if self.endpoint == "chat":
            for t in tasks:
                if not t.spec.needs_generation:
                    raise BackendError(self._chat_refusal(t.name, t.spec.scoring))
        out: dict[str, np.ndarray] = {}
        try:
            for t in tasks:
                self._task = t.name
                out[t.name] = evaluate_task(t, split, self.generate, self.loglikelihood)
        finally:
            self._task = None
        return out

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()
