"""The LoRA pool behind an HTTP API (``evomerge serve-pool``): FastAPI + uvicorn.

Users send control vectors, never see weights. Endpoints (all ``/v1/*`` need
``Authorization: Bearer <token>``, compared with :func:`hmac.compare_digest`):

- ``GET /health`` (no auth) -> ``{"status": "ok"}``
- ``GET /v1/pool``: base, adapters (pool order), hosted tasks, control ranges, export
  policy, limits;
- ``POST /v1/sessions``: ``{"task", "split"}`` (a hosted task) or ``{"examples":
  [{"prompt", "answer"}], "max_new_tokens"}`` -> 201 ``{"session", "num_examples",
  "adapters"}``;
- ``POST /v1/sessions/{sid}/evaluate``: ``{"alpha", "beta", "metrics", "indices"}`` ->
  ``{"loss", "losses", "score", "scores", "seconds"}``;
- ``DELETE /v1/sessions/{sid}`` -> 204; idle sessions expire after ``session_ttl``;
- ``POST /v1/merged/adapter`` / ``POST /v1/merged/model``: a tar.gz of the merged PEFT
  adapter / full checkpoint, 403 unless the operator allowed that export.

Every error is one JSON line ``{"error": {"message", "type", "param", "code"}}`` with a 4xx
status (5xx only for server faults): FastAPI's own validation errors, unknown routes and
methods are converted too. Auth and the body limit are checked in a small ASGI middleware
*before* routing and before the body is parsed, so an unauthenticated client learns
nothing about routes and an oversized body is never buffered past the limit (checked on
``Content-Length`` and on the bytes actually received). The model sits behind the pool's
lock; endpoints that do model work are plain ``def`` (FastAPI runs them in its threadpool)
so the event loop keeps answering health checks and refusals meanwhile. The token is never
logged: uvicorn's access log holds the request line and status only, no headers.
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import shutil
import tarfile
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import EvomergeError
from ..fitness.tasks import SPLITS, Task, load_task
from ..httpserve import (  # noqa: F401  (re-exported)
    GuardMiddleware,
    RunningServer,
    bind_socket,
    error_body,
    serve_in_thread,
    uvicorn_config,
)
from .pool import ExampleSet, LoraPool, PoolError, temp_export_dir

log = logging.getLogger("evomerge.pool_server")

EXPORT_KINDS = ("adapter", "model")
MAX_NEW_TOKENS = 1024


class ApiError(Exception):
    """A refused request: status + one-line message (+ the offending field)."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = " ".join(str(message).split())
        self.param = param


def _error_response(status: int, message: str, param: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status)


# --------------------------------------------------------------------------------------
# Request bodies (unknown fields refused; JSON numbers for vectors, no strings or bools)
# --------------------------------------------------------------------------------------
class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class UploadedExample(_Strict):
    prompt: str = Field(min_length=1)
    answer: str


class SessionRequest(_Strict):
    task: str | None = None
    split: Literal["search", "heldout"] = "search"
    examples: list[UploadedExample] | None = None
    max_new_tokens: int | None = Field(default=None, ge=1, le=MAX_NEW_TOKENS)


class EvaluateRequest(_Strict):
    alpha: list[float]
    beta: list[float]
    metrics: list[Literal["loss", "score"]] = Field(default_factory=lambda: ["loss", "score"], min_length=1)
    indices: list[int] | None = None


class ControlRequest(_Strict):
    alpha: list[float]
    beta: list[float]


# --------------------------------------------------------------------------------------
# Sessions
# --------------------------------------------------------------------------------------
@dataclass
class Session:
    id: str
    examples: ExampleSet
    created: float
    last_used: float
    evaluations: int = 0


@dataclass
class SessionStore:
    """Open sessions with an idle timeout; thread-safe (endpoints run on a threadpool)."""

    max_sessions: int
    ttl: float
    sessions: dict[str, Session] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def _expire(self, now: float) -> None:
        for sid in [s.id for s in self.sessions.values() if now - s.last_used > self.ttl]:
            del self.sessions[sid]

    def open(self, examples: ExampleSet) -> Session:
        now = time.monotonic()
        with self.lock:
            self._expire(now)
            if len(self.sessions) >= self.max_sessions:
                raise ApiError(429, f"too many open sessions ({self.max_sessions}); delete one "
                                    f"(DELETE /v1/sessions/ID) or wait for an idle one to expire")
            s = Session(secrets.token_urlsafe(16), examples, now, now)
            self.sessions[s.id] = s
            return s

    def get(self, sid: str) -> Session:
        now = time.monotonic()
        with self.lock:
            self._expire(now)
            s = self.sessions.get(sid)
            if s is None:
                raise ApiError(404, f"unknown session {sid!r} (never opened, deleted, or expired after "
                                    f"{self.ttl:g} s idle)", "session")
            s.last_used = now
            return s

    def delete(self, sid: str) -> None:
        with self.lock:
            self._expire(time.monotonic())
            if self.sessions.pop(sid, None) is None:
                raise ApiError(404, f"unknown session {sid!r}", "session")


# --------------------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------------------
def _validation_message(err: RequestValidationError) -> tuple[int, str, str | None]:
    errors = err.errors()
    first = errors[0] if errors else {"type": "", "loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = loc[0] if loc else None
    where = ".".join(loc) if loc else "request body"
    kind = first.get("type", "")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    if kind == "json_invalid":
        return 400, "request body is not valid JSON", None
    if kind == "extra_forbidden":
        return 422, f"unknown field {where!r}{more}", param
    if kind == "missing":
        if not loc:
            return 422, "request body is missing (send a JSON object)", None
        return 422, f"field {where!r} is required{more}", param
    if kind == "model_attributes_type" or (not loc and kind.endswith("_type")):
        return 422, "request body must be a JSON object", None
    return 422, f"{where}: {first.get('msg', 'invalid value')}{more}", param


def load_hosted_tasks(tasks: Mapping[str, str | os.PathLike]) -> dict[str, Task]:
    """Load every hosted task YAML now, so a bad one stops the server at start."""
    out: dict[str, Task] = {}
    for name, path in tasks.items():
        try:
            task = load_task(path)
            ExampleSet.from_task(task, "search")
        except EvomergeError as err:
            raise PoolError(f"hosted task {name!r}: {err}") from None
        out[name] = task
    return out


def create_app(
    pool: LoraPool,
    token: str | None,
    tasks: Mapping[str, str | os.PathLike] | None = None,
    allow_export: set[str] | frozenset[str] = frozenset(),
    max_sessions: int = 8,
    max_examples: int = 2000,
    max_body_bytes: int = 8 << 20,
    session_ttl: float = 3600,
) -> FastAPI:
    """The FastAPI app over ``pool``. ``token=None`` disables auth (say so explicitly)."""
    bad = set(allow_export) - set(EXPORT_KINDS)
    if bad:
        raise PoolError(f"allow_export: unknown export kind(s) {sorted(bad)}; use {list(EXPORT_KINDS)}")
    if token is not None and not token:
        raise PoolError("the pool token is empty")
    hosted = load_hosted_tasks(tasks or {})
    _ = pool.backend  # load the resident model now, not on the first client's request
    store = SessionStore(int(max_sessions), float(session_ttl))
    allowed = frozenset(allow_export)

    app = FastAPI(title="evomerge LoRA pool", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool = pool
    app.state.sessions = store

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError) -> JSONResponse:
        return _error_response(err.status, err.message, err.param)

    @app.exception_handler(PoolError)
    async def _pool_error(request: Request, err: PoolError) -> JSONResponse:
        m = re.match(r"(alpha|beta|indices|metrics)\b", str(err))
        return _error_response(400, str(err), m.group(1) if m else None)

    @app.exception_handler(EvomergeError)
    async def _evomerge_error(request: Request, err: EvomergeError) -> JSONResponse:
        return _error_response(400, str(err))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError) -> JSONResponse:
        status, message, param = _validation_message(err)
        return _error_response(status, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        if err.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif err.status_code == 405:
            message = f"method {request.method} is not allowed on {request.url.path}"
        else:
            message = str(err.detail)
        return _error_response(err.status_code, message)

    @app.exception_handler(Exception)
    async def _internal(request: Request, err: Exception) -> JSONResponse:
        log.error("%s %s failed: %s: %s", request.method, request.url.path, type(err).__name__, err)
        return _error_response(500, f"internal error: {type(err).__name__}")

    app.add_middleware(GuardMiddleware, token=token, max_body=int(max_body_bytes))

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/pool")
    async def pool_info() -> dict[str, Any]:
        info = pool.info()
        info["tasks"] = [
            {"name": name, "splits": {s: len(t.splits.get(s, [])) for s in SPLITS}}
            for name, t in hosted.items()
        ]
        info["allow_export"] = {k: k in allowed for k in EXPORT_KINDS}
        info["limits"] = {"max_sessions": store.max_sessions, "max_examples": int(max_examples),
                          "max_body_bytes": int(max_body_bytes), "session_ttl": store.ttl}
        return info

    @app.post("/v1/sessions", status_code=201)
    def open_session(body: SessionRequest) -> dict[str, Any]:
        if (body.task is None) == (body.examples is None):
            raise ApiError(400, "give either 'task' (a hosted task) or 'examples' (a list of "
                                "{prompt, answer}), not both and not neither")
        if body.task is not None:
            if body.max_new_tokens is not None:
                raise ApiError(400, "'max_new_tokens' applies to uploaded examples only (a hosted task "
                                    "sets its own)", "max_new_tokens")
            task = hosted.get(body.task)
            if task is None:
                known = ", ".join(hosted) or "none"
                raise ApiError(404, f"unknown task {body.task!r}; hosted tasks: {known}", "task")
            if not task.has_split(body.split):
                raise ApiError(400, f"task {body.task!r} has no {body.split!r} split", "split")
            examples = ExampleSet.from_task(task, body.split)
        else:
            if not body.examples:
                raise ApiError(400, "'examples' is empty", "examples")
            if len(body.examples) > max_examples:
                raise ApiError(413, f"{len(body.examples)} examples; this server takes at most "
                                    f"{max_examples} per session", "examples")
            pairs = [(ex.prompt, ex.answer) for ex in body.examples]
            max_new = body.max_new_tokens
            if max_new is None:  # long enough for the longest answer (+ room for a stop)
                tok = pool.backend.tokenizer
                longest = max(len(tok(a, add_special_tokens=False)["input_ids"]) for _, a in pairs)
                max_new = max(1, min(MAX_NEW_TOKENS, longest + 1))
            examples = ExampleSet.from_pairs(pairs, max_new)
        session = store.open(examples)
        return {"session": session.id, "num_examples": len(examples.examples), "adapters": list(pool.names)}

    @app.post("/v1/sessions/{sid}/evaluate")
    def evaluate(sid: str, body: EvaluateRequest) -> dict[str, Any]:
        session = store.get(sid)
        alpha, beta = pool.check_control(body.alpha, body.beta)
        n = len(session.examples.examples)
        if body.indices is not None:
            if not body.indices:
                raise ApiError(400, "'indices' is empty (send null to evaluate every example)", "indices")
            bad = [i for i in body.indices if not 0 <= i < n]
            if bad:
                raise ApiError(400, f"indices: {bad[0]} is out of range for a session of {n} examples "
                                    f"(0..{n - 1})", "indices")
        result = pool.evaluate(session.examples, alpha, beta, metrics=list(dict.fromkeys(body.metrics)),
                               indices=body.indices)
        session.evaluations += 1
        for key in ("loss", "score"):
            v = result.get(key)
            if v is not None and not math.isfinite(v):
                result[key] = None  # JSON has no NaN: a non-finite loss reads as null
        if result.get("losses") is not None:
            result["losses"] = [x if math.isfinite(x) else None for x in result["losses"]]
        return result

    @app.delete("/v1/sessions/{sid}", status_code=204)
    async def delete_session(sid: str) -> Response:
        store.delete(sid)
        return Response(status_code=204)

    def _export(kind: str, body: ControlRequest) -> FileResponse:
        if kind not in allowed:
            raise ApiError(403, f"this provider does not allow exporting the merged {kind} (the operator "
                                f"starts serve-pool with --allow-export {kind} to permit it)")
        alpha, beta = pool.check_control(body.alpha, body.beta)
        work = temp_export_dir(f"evomerge-export-{kind}-")
        try:
            folder = work / f"merged_{kind}"
            if kind == "adapter":
                pool.save_merged_adapter(alpha, beta, folder)
            else:
                with pool.lock:
                    pool.save_merged_model(alpha, beta, folder)
            archive = work / f"merged_{kind}.tar.gz"
            with tarfile.open(archive, "w:gz") as tar:
                for f in sorted(folder.iterdir()):
                    tar.add(f, arcname=f.name)  # files at the archive root: extract into a folder
            shutil.rmtree(folder, ignore_errors=True)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        return FileResponse(archive, media_type="application/gzip", filename=archive.name,
                            background=BackgroundTask(shutil.rmtree, work, True))

    @app.post("/v1/merged/adapter")
    def export_adapter(body: ControlRequest) -> FileResponse:
        return _export("adapter", body)

    @app.post("/v1/merged/model")
    def export_model(body: ControlRequest) -> FileResponse:
        return _export("model", body)

    return app


__all__ = ["ApiError", "RunningServer", "create_app", "load_hosted_tasks", "serve_in_thread"]
