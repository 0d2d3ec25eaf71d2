"""A tiny real HTTP server on 127.0.0.1 speaking the few Hub API routes evomerge uses.

Routes (as ``huggingface_hub`` calls them):

- ``POST /api/repos/create``: creates a repo (records ``private``);
- ``POST /api/models/{org}/{name}/preupload/{rev}``: every file is uploaded "regular"
  (inline in the commit), so no LFS/xet storage is needed;
- ``POST /api/models/{org}/{name}/commit/{rev}``: the ndjson commit; files are stored;
- ``POST /api/validate-yaml``: the model card check ``upload_folder`` asks for; answered
  with ``huggingface_hub``'s own strict card parsing (the real Hub validates server-side);
- downloads of the models in ``models`` (``add_model``): ``GET
  /api/models/{org}/{name}/revision/{rev}`` (repo info; repos in ``gated`` answer 403
  ``GatedRepo``, unknown ones 404 ``RepoNotFound``), ``GET .../tree/{rev}`` (the file list),
  ``HEAD``/``GET /{org}/{name}/resolve/{rev}/{path}`` (metadata and bytes; every served
  path is recorded in ``downloaded``).

Write routes require ``Authorization: Bearer <token>``; every request is recorded (method,
path, headers) so tests can check what was sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class FakeHub:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, dict[str, Any]] = {}
        self.gated: set[str] = set()
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.models: dict[str, dict[str, Any]] = {}  # repo -> {sha, files: {path: bytes}}
        self.downloaded: list[str] = []
        self.validated_cards = 0
        self.invalid_cards: list[str] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                hub._handle(self, "GET")

            def do_POST(self):
                hub._handle(self, "POST")

            def do_HEAD(self):
                hub._handle(self, "HEAD")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def add_model(self, repo: str, folder, extra: dict[str, bytes] | None = None) -> str:
        """Serve the files of ``folder`` (plus ``extra``) as ``repo``; returns its commit."""
        from pathlib import Path

        files = {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}
        files.update(extra or {})
        sha = hashlib.sha1(repo.encode() + b"".join(files.values())).hexdigest()
        self.models[repo] = {"sha": sha, "files": files}
        return sha

    def _serve_model(self, h: BaseHTTPRequestHandler, method: str, parts: list[str]) -> bool:
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo = f"{parts[2]}/{parts[3]}"
            if repo in self.gated:
                self._send(h, 403, {"error": f"Access to model {repo} is restricted."},
                           {"X-Error-Code": "GatedRepo", "X-Error-Message": "gated"})
                return True
            m = self.models.get(repo) or self.repos.get(repo)
            if m is None:
                self._send(h, 404, {"error": "Repository not found"},
                           {"X-Error-Code": "RepoNotFound", "X-Error-Message": "not found"})
                return True
            files = m.get("files", {})
            if parts[4] == "revision":
                self._send(h, 200, {"id": repo, "sha": m["sha"],
                                    "siblings": [{"rfilename": f} for f in files]})
            else:
                self._send(h, 200, [{"type": "file", "path": f, "size": len(b),
                                     "oid": hashlib.sha1(b).hexdigest()} for f, b in files.items()])
            return True
        if len(parts) >= 5 and parts[2] == "resolve":
            repo = f"{parts[0]}/{parts[1]}"
            m = self.models.get(repo)
            name = "/".join(parts[4:])
            if m is None or name not in m["files"]:
                self._send(h, 404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound"})
                return True
            data = m["files"][name]
            h.send_response(200)
            h.send_header("Content-Length", str(len(data)))
            h.send_header("X-Repo-Commit", m["sha"])
            h.send_header("ETag", f'"{hashlib.sha1(data).hexdigest()}"')
            h.end_headers()
            if method == "GET":
                self.downloaded.append(name)
                h.wfile.write(data)
            return True
        return False

    # -- routing ------------------------------------------------------------------------
    def _send(self, h: BaseHTTPRequestHandler, status: int, body: Any, headers: dict | None = None):
        data = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(data)

    def _handle(self, h: BaseHTTPRequestHandler, method: str) -> None:
        path = h.path.split("?", 1)[0]
        self.requests.append((method, path, dict(h.headers)))
        n = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(n) if n else b""
        parts = path.strip("/").split("/")
        if method in ("GET", "HEAD") and self._serve_model(h, method, parts):
            return None
        if method != "POST":
            return self._send(h, 404, {"error": f"no route {method} {path}"})
        if h.headers.get("Authorization") != f"Bearer {self.token}":
            return self._send(h, 401, {"error": "Invalid credentials in Authorization header"},
                              {"X-Error-Message": "Invalid credentials in Authorization header"})
        if parts == ["api", "validate-yaml"]:  # the real Hub validates server-side; here:
            from huggingface_hub import ModelCard  # huggingface_hub's own strict parsing

            try:
                ModelCard(json.loads(body)["content"], ignore_metadata_errors=False)
            except Exception as e:
                self.invalid_cards.append(str(e))
                return self._send(h, 400, {"error": str(e)})
            self.validated_cards += 1
            return self._send(h, 200, {"errors": [], "warnings": []})
        if parts == ["api", "repos", "create"]:
            d = json.loads(body)
            repo = f"{d.get('organization') or 'me'}/{d['name']}"
            private = bool(d.get("private")) or d.get("visibility") == "private"
            self.repos.setdefault(repo, {"private": private, "files": {}, "sha": "0" * 40})
            return self._send(h, 200, {"url": f"{self.url}/{repo}", "name": repo, "id": repo})
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "preupload":
            files = json.loads(body)["files"]
            return self._send(h, 200, {"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "commit":
            repo = f"{parts[2]}/{parts[3]}"
            if repo not in self.repos:
                return self._send(h, 404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
            sha = hashlib.sha1(body).hexdigest()
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    v = item["value"]
                    self.repos[repo]["files"][v["path"]] = base64.b64decode(v["content"])
            self.repos[repo]["sha"] = sha
            return self._send(h, 200, {"commitUrl": f"{self.url}/{repo}/commit/{sha}",
                                       "commitOid": sha, "pullRequestUrl": None})
        return self._send(h, 404, {"error": f"no route {method} {path}"})
