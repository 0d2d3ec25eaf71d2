"""HTTP client shared by the API backend, black-box pool clients and the server.

Stdlib ``http.client`` only (one keep-alive connection per thread): :class:`APIClient` speaks
JSON to one OpenAI-compatible base URL with bounded retries (:class:`RetryPolicy`, 408/409/
429/5xx and connection errors, ``Retry-After`` honoured); the API key lives in a
:class:`Secret` that never shows itself in an error, a log line or a ``repr``.
:func:`run_jobs` runs request jobs on a thread pool, first error wins; :func:`token_ends`
turns echoed token offsets into token end characters.

A low-floor module: it imports only :mod:`evomerge.errors`.
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
from typing import Any
from urllib.parse import urlsplit

from .errors import BackendError

log = logging.getLogger("evomerge.api")

RETRY_STATUS = frozenset({408, 409, 429}) | frozenset(range(500, 600))


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
                f"backend.options.base_url: expected http(s)://host[:port]/path, got {redact_url(base_url)!r}"
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


def redact_url(url: Any) -> str:
    """``url`` without user info or query string (safe to show in an error or a log)."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return "<unparsable URL>"
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}" if parts.scheme else str(url).split("?")[0]
