"""The user's side of a LoRA-pool provider (``evomerge serve-pool``): a small typed client.

A pool provider holds a base model and a pool of LoRA adapters that users never see. A user
sends a *control vector* per adapter (sparsity alpha_i in [0, 1] and signed scale beta_i) and
gets back a loss and/or a score per example of a session's examples; the merged adapter itself
is released only when the operator allows it. This module speaks that HTTP API (see the
contract in ``evomerge/blackbox/pool_server.py``) on top of the API backend's
:class:`~evomerge.netclient.APIClient`, so retries with backoff, ``Retry-After``,
keep-alive connections, the key read from an environment variable *named* in the config and
the scrubbing of that key from every message are the same code the ``api`` backend uses.

Everything a provider sends back is checked before it is used: a wrong number of values,
a non-finite loss, a missing field or a body that is not JSON becomes one
:class:`~evomerge.errors.BackendError` line naming the URL and the field, never a silently
wrong fitness. The merged adapter arrives as a tar.gz that is unpacked defensively: only the
expected PEFT file names, only regular files, no absolute paths, no ``..``, no links, and a
cap on the unpacked size.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ...errors import BackendError
from ...netclient import APIClient, RetryPolicy, read_api_key

#: files of a PEFT adapter folder that an export keeps (anything else in the archive is skipped)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
#: refuse archives that unpack to more than this (a LoRA adapter is megabytes)
MAX_ADAPTER_BYTES = 4 << 30
METRICS = ("loss", "score")


class SessionGone(BackendError):
    """The provider no longer knows a session (expired after its idle TTL, or restarted)."""


@dataclass(frozen=True)
class PoolInfo:
    """What ``GET /v1/pool`` advertises, checked."""

    adapters: list[str]
    alpha_range: tuple[float, float]
    beta_range: tuple[float, float]
    tasks: dict[str, dict[str, int]]
    allow_export: dict[str, bool]
    max_examples: int | None
    raw: dict[str, Any]


@dataclass(frozen=True)
class Session:
    id: str
    num_examples: int
    adapters: list[str]


class PoolClient:
    """``/v1/*`` of one pool provider. ``field`` prefixes config paths in error messages."""

    def __init__(self, base_url: str, api_key_env: str | None = None, timeout: float = 300.0,
                 max_retries: int = 4, backoff: float = 0.5, max_backoff: float = 30.0,
                 field: str = "backend.options"):
        self.client = APIClient(
            base_url,
            api_key=read_api_key(api_key_env, f"{field}.api_key_env"),
            timeout=timeout,
            retry=RetryPolicy(int(max_retries), float(backoff), float(max_backoff)),
            key_hint=api_key_env,
        )

    def __repr__(self) -> str:
        return f"PoolClient({self.client.url('')!r})"

    def url(self, path: str = "") -> str:
        return self.client.url(path)

    def close(self) -> None:
        self.client.close()

    # -- one exchange -------------------------------------------------------------------
    def _call(self, method: str, path: str, body: Any = None, *, want_json: bool = True) -> Any:
        status, reason, _, raw = self.client.request_raw(method, path, body)
        where = f"{method} {self.url(path)}"
        if status == 404 and path.startswith("v1/sessions/"):
            raise SessionGone(f"{where}: {self.client.status_message(status, reason, raw)}")
        if not 200 <= status < 300:
            raise BackendError(f"{where}: {self.client.status_message(status, reason, raw)}")
        if not want_json:
            return raw
        try:
            return json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise BackendError(f"{where}: the pool provider answered HTTP {status} with a body "
                               "that is not JSON") from None

    # -- the API ------------------------------------------------------------------------
    def info(self) -> PoolInfo:
        where = f"GET {self.url('v1/pool')}"
        d = self._call("GET", "v1/pool")
        if not isinstance(d, dict):
            raise BackendError(f"{where}: expected a JSON object")
        ads = d.get("adapters")
        if not isinstance(ads, list) or not ads:
            raise BackendError(f"{where}: 'adapters' must be a non-empty list")
        names = []
        for a in ads:
            name = a.get("name") if isinstance(a, dict) else None
            if not isinstance(name, str) or not name:
                raise BackendError(f"{where}: every entry of 'adapters' needs a 'name'")
            names.append(name)
        if len(set(names)) != len(names):
            raise BackendError(f"{where}: 'adapters' names are not unique")
        control = d.get("control") if isinstance(d.get("control"), dict) else {}
        ranges = {}
        for key, default in (("alpha", (0.0, 1.0)), ("beta", (-1.5, 1.5))):
            r = control.get(key, list(default))
            if (not isinstance(r, list) or len(r) != 2
                    or not all(_is_number(v) and math.isfinite(v) for v in r) or not r[0] < r[1]):
                raise BackendError(f"{where}: 'control.{key}' must be [low, high], got {r!r}")
            ranges[key] = (float(r[0]), float(r[1]))
        tasks: dict[str, dict[str, int]] = {}
        for t in d.get("tasks") or []:
            if isinstance(t, dict) and isinstance(t.get("name"), str):
                splits = t.get("splits") if isinstance(t.get("splits"), dict) else {}
                tasks[t["name"]] = {str(k): int(v) for k, v in splits.items() if _is_int(v)}
        allow = d.get("allow_export") if isinstance(d.get("allow_export"), dict) else {}
        limits = d.get("limits") if isinstance(d.get("limits"), dict) else {}
        max_examples = limits.get("max_examples")
        return PoolInfo(names, ranges["alpha"], ranges["beta"], tasks,
                        {k: bool(v) for k, v in allow.items()},
                        int(max_examples) if _is_int(max_examples) else None, d)

    def open_session(self, *, examples: Sequence[dict[str, str]] | None = None,
                     max_new_tokens: int | None = None, task: str | None = None,
                     split: str = "search") -> Session:
        """A session on uploaded ``examples`` (``[{prompt, answer}]``) or on a hosted ``task``."""
        if (examples is None) == (task is None):
            raise ValueError("open_session takes either examples or task")
        body: dict[str, Any]
        if task is not None:
            body = {"task": task, "split": split}
        else:
            body = {"examples": [{"prompt": e["prompt"], "answer": e["answer"]} for e in examples],
                    "max_new_tokens": max_new_tokens}
        where = f"POST {self.url('v1/sessions')}"
        d = self._call("POST", "v1/sessions", body)
        sid = d.get("session") if isinstance(d, dict) else None
        n = d.get("num_examples") if isinstance(d, dict) else None
        ads = d.get("adapters") if isinstance(d, dict) else None
        if not isinstance(sid, str) or not sid or "/" in sid:
            raise BackendError(f"{where}: the response has no valid 'session' id")
        if not _is_int(n) or n < 1:
            raise BackendError(f"{where}: 'num_examples' must be a positive integer, got {n!r}")
        if not isinstance(ads, list) or not all(isinstance(a, str) for a in ads) or not ads:
            raise BackendError(f"{where}: 'adapters' must be the list of adapter names")
        if examples is not None and n != len(examples):
            raise BackendError(f"{where}: the provider took {n} of the {len(examples)} uploaded "
                               "examples")
        return Session(sid, int(n), list(ads))

    def evaluate(self, session: Session, alpha: Sequence[float], beta: Sequence[float],
                 metrics: Sequence[str] = METRICS, indices: Sequence[int] | None = None
                 ) -> dict[str, Any]:
        """Per-example losses/scores of one control vector (in the session's adapter order).

        Returns ``{"loss", "losses", "score", "scores", "seconds"}`` with the per-example
        lists as float arrays (only the metrics asked for), every value checked finite."""
        n_ad = len(session.adapters)
        if len(alpha) != n_ad or len(beta) != n_ad:
            raise BackendError(f"control vector of {len(alpha)}/{len(beta)} values for a pool "
                               f"of {n_ad} adapters")
        body: dict[str, Any] = {"alpha": [float(a) for a in alpha], "beta": [float(b) for b in beta],
                                "metrics": list(metrics)}
        if indices is not None:
            body["indices"] = [int(i) for i in indices]
        path = f"v1/sessions/{session.id}/evaluate"
        where = f"POST {self.url(path)}"
        d = self._call("POST", path, body)
        if not isinstance(d, dict):
            raise BackendError(f"{where}: expected a JSON object")
        n = session.num_examples if indices is None else len(indices)
        out: dict[str, Any] = {"seconds": d.get("seconds") if _is_number(d.get("seconds")) else None}
        for metric in metrics:
            key = {"loss": "losses", "score": "scores"}[metric]
            vals = d.get(key)
            if not isinstance(vals, list) or len(vals) != n:
                got = len(vals) if isinstance(vals, list) else type(vals).__name__
                raise BackendError(f"{where}: '{key}' must hold {n} values, got {got}")
            odd = next((i for i, v in enumerate(vals) if not _is_number(v)), None)
            if odd is not None:
                shown = "null (not finite)" if vals[odd] is None else f"{vals[odd]!r}, not a number"
                raise BackendError(f"{where}: '{key}'[{odd}] is {shown}")
            arr = np.asarray(vals, dtype=np.float64)
            bad = np.flatnonzero(~np.isfinite(arr))
            if bad.size:
                raise BackendError(f"{where}: '{key}'[{int(bad[0])}] is {arr[bad[0]]} (not finite)")
            out[key] = arr
            out[metric] = float(arr.mean())
        return out

    def close_session(self, session: Session) -> None:
        """Forget a session on the provider (an unknown one is already gone: fine)."""
        try:
            self._call("DELETE", f"v1/sessions/{session.id}", want_json=False)
        except SessionGone:
            pass

    def merged_adapter(self, alpha: Sequence[float], beta: Sequence[float]) -> bytes:
        """The merged adapter as a tar.gz (``POST /v1/merged/adapter``).

        A refusal (403: the operator did not allow adapter export) is one line naming it."""
        path = "v1/merged/adapter"
        body = {"alpha": [float(a) for a in alpha], "beta": [float(b) for b in beta]}
        status, reason, _, raw = self.client.request_raw("POST", path, body)
        if status == 403:
            msg = self.client._server_message(raw).lstrip(": ") or reason
            raise BackendError(
                f"export refused by the pool provider at {self.url('')} (HTTP 403: {msg}); the "
                "operator must start `evomerge serve-pool` with --allow-export adapter to "
                "release merged adapters")
        if not 200 <= status < 300:
            raise BackendError(f"POST {self.url(path)}: {self.client.status_message(status, reason, raw)}")
        return raw


# -- pool order ---------------------------------------------------------------------------


def to_pool_order(names: Sequence[str], pool: Sequence[str], *values: Sequence[float],
                  where: str = "models") -> list[list[float]]:
    """Reorder per-adapter ``values`` given in ``names`` order into the provider's ``pool``
    order; the two must hold the same adapters."""
    missing = [n for n in names if n not in pool]
    if missing:
        raise BackendError(f"{where}: adapter {missing[0]!r} is not in the provider's pool "
                           f"({', '.join(pool)})")
    extra = [p for p in pool if p not in names]
    if extra:
        raise BackendError(f"{where}: the provider's pool also holds {', '.join(extra)}; list "
                           "every pool adapter (as pool:<name>) so the control vector is complete")
    pos = {n: i for i, n in enumerate(names)}
    return [[float(v[pos[p]]) for p in pool] for v in values]


# -- unpacking a merged adapter -------------------------------------------------------------


def unpack_adapter(data: bytes, target: Path, max_bytes: int = MAX_ADAPTER_BYTES) -> list[Path]:
    """Unpack a provider's tar.gz of a PEFT adapter folder into ``target`` (an existing,
    empty folder): only :data:`ADAPTER_FILES`, at the archive's top level or in one folder.

    Refused with one line: links, devices, absolute paths, ``..``, a file name twice, an
    unpacked size over ``max_bytes``, a missing adapter file, a config that is not JSON."""
    try:
        tar = tarfile.open(fileobj=io.BytesIO(data), mode="r:gz")
    except (tarfile.TarError, EOFError, OSError) as err:
        raise BackendError(f"merged adapter: the provider's archive is not a tar.gz ({err})") from None
    written: dict[str, Path] = {}
    total = 0
    with tar:
        try:
            for m in tar:
                p = PurePosixPath(m.name)
                parts = [x for x in p.parts if x not in ("", ".")]
                if p.is_absolute() or ".." in parts:
                    raise BackendError(f"merged adapter: unsafe path {m.name!r} in the archive")
                if m.isdir():
                    continue
                if not m.isfile():
                    raise BackendError(f"merged adapter: {m.name!r} in the archive is not a "
                                       "regular file (links and devices are refused)")
                if len(parts) > 2 or not parts or parts[-1] not in ADAPTER_FILES:
                    continue  # not an adapter file (e.g. the provider's own README): skipped
                name = parts[-1]
                if name in written:
                    raise BackendError(f"merged adapter: {name} appears twice in the archive")
                total += m.size
                if total > max_bytes:
                    raise BackendError(f"merged adapter: the archive unpacks to more than "
                                       f"{max_bytes} bytes")
                src = tar.extractfile(m)
                assert src is not None  # a regular file
                dest = target / name
                with src, open(dest, "wb") as fh:
                    shutil.copyfileobj(src, fh, 1 << 20)
                if dest.stat().st_size != m.size:
                    raise BackendError(f"merged adapter: {name} is truncated in the archive")
                written[name] = dest
        except (tarfile.TarError, EOFError, OSError) as err:
            raise BackendError(f"merged adapter: the provider's archive is corrupt ({err})") from None
    for name in ADAPTER_FILES:
        if name not in written:
            raise BackendError(f"merged adapter: the provider's archive has no {name}")
    try:
        cfg = json.loads(written["adapter_config.json"].read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise BackendError("merged adapter: adapter_config.json is not JSON") from None
    if not isinstance(cfg, dict):
        raise BackendError("merged adapter: adapter_config.json is not a JSON object")
    return [written[n] for n in ADAPTER_FILES]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# -- export ---------------------------------------------------------------------------------
