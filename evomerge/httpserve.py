"""HTTP serving plumbing shared by ``evomerge serve`` and ``evomerge serve-pool``.

OpenAI-style error bodies (:func:`error_body`), a pure-ASGI guard for the bearer token and
the body limit (:class:`GuardMiddleware`), a listening socket (:func:`bind_socket`), the
uvicorn config both servers use (:func:`uvicorn_config`) and a server on a daemon thread
for tests and benchmarks (:func:`serve_in_thread`). A low floor: FastAPI/uvicorn only.
"""

from __future__ import annotations

import hmac
import json
import socket
import threading
import time
from typing import Any

from fastapi import FastAPI

from .errors import EvomergeError


class ServerStartError(EvomergeError):
    """A server cannot listen on its address or did not start (one line)."""


_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
          422: "invalid_request_error", 429: "rate_limit_error"}


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """An OpenAI-style error JSON body for ``status`` (one-line message, optional field)."""
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": " ".join(str(message).split()), "type": kind, "param": param, "code": None}}


# --------------------------------------------------------------------------------------
# Auth + body limit, before routing
# --------------------------------------------------------------------------------------
class GuardMiddleware:
    """Pure ASGI: 401 for ``/v1`` without the token, 413 for a body over the limit.

    The body is read here (at most ``max_body`` bytes) and replayed to the app, so a client
    that lies in ``Content-Length`` or streams chunks still cannot push more.
    """

    def __init__(self, app: Any, token: str | None, max_body: int):
        self.app = app
        self.want = f"Bearer {token}".encode() if token is not None else None
        self.max_body = int(max_body)

    def _error(self, status: int, message: str) -> dict[str, Any]:
        """The JSON of a refusal (servers with another error format override this)."""
        return error_body(status, message)

    async def _refuse(self, send: Any, status: int, message: str) -> None:
        data = json.dumps(self._error(status, message)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
        if status == 401:
            headers.append((b"www-authenticate", b"Bearer"))
        if status == 413:
            headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self.want is not None and (path == "/v1" or path.startswith("/v1/")):
            got = b""
            for k, v in scope.get("headers", []):
                if k == b"authorization":
                    got = v
                    break
            if not hmac.compare_digest(got, self.want):
                await self._refuse(send, 401, "missing or invalid token (send Authorization: Bearer <token>)")
                return
        length = None
        for k, v in scope.get("headers", []):
            if k == b"content-length":
                try:
                    length = int(v)
                except ValueError:
                    await self._refuse(send, 400, "bad Content-Length header")
                    return
        if length is not None and length > self.max_body:
            await self._refuse(send, 413, f"request body of {length} bytes is over this server's limit of "
                                          f"{self.max_body} bytes")
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                await self._refuse(send, 413, f"request body is over this server's limit of {self.max_body} bytes")
                return
            chunks.append(body)
            more = message.get("more_body", False)
        data = b"".join(chunks)
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


# --------------------------------------------------------------------------------------
# Serving in a background thread (tests, benchmarks)
# --------------------------------------------------------------------------------------
class RunningServer:
    """A uvicorn server on a daemon thread; ``url`` is ``http://HOST:PORT``."""

    def __init__(self, server: Any, thread: threading.Thread, sock: socket.socket, host: str, port: int):
        self._server = server
        self._thread = thread
        self._sock = sock
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def close(self, timeout: float = 10.0) -> None:
        self._server.should_exit = True
        self._thread.join(timeout)
        try:
            self._sock.close()
        except OSError:
            pass

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunningServer({self.url!r})"


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (0: a free port chosen by the OS)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as err:
        sock.close()
        raise ServerStartError(f"cannot listen on {host}:{port}: {err.strerror or err}") from None
    sock.listen(2048)  # connections made before uvicorn starts wait in the backlog
    sock.set_inheritable(True)
    return sock


def uvicorn_config(app: FastAPI, access_log: bool = False, log_level: str = "warning") -> Any:
    import uvicorn

    return uvicorn.Config(app, log_level=log_level, access_log=access_log, lifespan="off",
                          server_header=False, proxy_headers=False)


def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0) -> RunningServer:
    """Start ``app`` with uvicorn on a daemon thread and wait until it accepts connections."""
    import uvicorn

    sock = bind_socket(host, port)
    actual = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn_config(app))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as err:  # noqa: BLE001 - reported to the starting thread
            errors.append(err)

    thread = threading.Thread(target=run, name=f"evomerge-pool-{actual}", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if errors or not thread.is_alive():
            sock.close()
            raise ServerStartError(f"the pool server on {host}:{actual} did not start: {errors[0] if errors else 'exited'}")
        if time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise ServerStartError(f"the pool server on {host}:{actual} did not start within {timeout:g} s")
        time.sleep(0.01)
    return RunningServer(server, thread, sock, host, actual)
