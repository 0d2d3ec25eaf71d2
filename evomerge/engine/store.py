"""The run directory: everything a run must not lose, written so a crash loses nothing.

``runs/<name>/``::

    config.yaml        the resolved config (paths absolute)
    meta.json          fingerprint of the config at creation, versions, creation time
    evals.jsonl        append-only evaluation log: one JSON record per finished candidate
    checkpoint.json    optimizer state + pending candidates (atomically replaced)
    best.json          best-so-far record (atomically replaced)
    baselines.jsonl    append-only log of the untuned baselines (engine/baselines.py)
    splits.json        split sizes and the validation carve-out of every search task
    rescore.jsonl      append-only validation / held-out scores of chosen plans
                       (engine/selection.py), keyed by plan hash and split
    final.json         the validation-selected final model and its table (atomic)
    (the directory itself is flock-ed by the process running the search: a lock on the
    directory cannot be deleted out from under it, as a separate lock file could)

Writes of whole files go to a temporary file in the same folder, are fsynced and renamed
over the old one, so a reader sees the old or the new file, never half of one. The log is
appended line by line and fsynced; a line cut short by a crash is detected and dropped on
the next open (its candidate is still pending in the checkpoint and is evaluated again).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from ..config import RunConfig, parse_config
from ..errors import RunError

FORMAT = 1


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunStore:
    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir)
        self._lock_fd: int | None = None
        self.pending_config: RunConfig | None = None  # to write once the run resumed cleanly

    # -- creation / opening ----------------------------------------------------------
    @classmethod
    def create(cls, run_dir: str | Path, cfg: RunConfig) -> RunStore:
        store = cls(run_dir)
        if store.exists():
            raise RunError(f"run directory {store.dir} already holds a run")
        try:
            store.dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise RunError(f"cannot create run directory {store.dir}: {err.strerror or err}") from None
        store.lock()
        store._write_fresh(cfg)
        return store

    def _write_fresh(self, cfg: RunConfig) -> None:
        meta = {
            "format": FORMAT,
            "fingerprint": cfg.fingerprint(),
            "created": time.time(),
            "evomerge_version": _version(),
            "config": cfg.fingerprinted(),  # what the fingerprint covers, to name changes later
        }
        atomic_write_text(self.dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        atomic_write_text(self.dir / "meta.json", json.dumps(meta, indent=1))

    @classmethod
    def open(cls, run_dir: str | Path) -> RunStore:
        store = cls(run_dir)
        if not store.exists():
            raise RunError(f"no run found at {store.dir} (expected config.yaml and meta.json)")
        return store

    def exists(self) -> bool:
        return (self.dir / "meta.json").is_file() and (self.dir / "config.yaml").is_file()

    def lock(self) -> None:
        """Hold an exclusive lock so two processes never drive the same run.

        The lock is on the run directory itself (not on a file inside it that a user could
        delete while the run goes on, letting a second process lock a new file)."""
        if self._lock_fd is not None:
            return
        try:
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:
            raise RunError(f"cannot open run directory {self.dir}: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunError(f"run {self.dir} is in use by another evomerge process") from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- config ------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        path = self.dir / "meta.json"
        try:
            meta = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RunError(f"{path}: unreadable run metadata ({_reason(err)})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("fingerprint"), str):
            raise RunError(f"{path}: not evomerge run metadata (no 'fingerprint')")
        return meta

    def config(self) -> RunConfig:
        path = self.dir / "config.yaml"
        try:
            data = yaml.safe_load(path.read_text())
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
            raise RunError(f"{path}: not a readable YAML config ({_reason(err)})") from None
        return parse_config(data, str(path))

    def config_changes(self, cfg: RunConfig) -> list[str]:
        """Fields (dotted paths) whose change alters results since the run began; [] if none.

        Writes nothing."""
        meta = self.meta()
        if meta["fingerprint"] == cfg.fingerprint():
            return []
        old = meta.get("config")
        if old is None:  # a run made before meta.json recorded its config
            old = self.config().fingerprinted()
        return _diff(old, cfg.fingerprinted()) or ["(fields not recorded by this older run)"]

    def check_config(self, cfg: RunConfig, force: bool = False) -> None:
        """Refuse a config whose results-relevant fields changed since the run began;
        with ``force``, record the change and continue (see :meth:`commit_config`)."""
        changes = self.config_changes(cfg)
        if changes and not force:
            raise RunError(
                f"config of run {self.dir} changed since it started ({', '.join(changes)}); "
                "use --force to continue with the new config, or start a new run"
            )
        self.commit_config(cfg)

    def commit_config(self, cfg: RunConfig) -> None:
        """Write ``cfg`` as the run's config (recording a forced change in meta.json)."""
        meta = self.meta()
        if meta["fingerprint"] != cfg.fingerprint():
            meta.setdefault("forced_changes", []).append(
                {"time": time.time(), "from": meta["fingerprint"], "fields": self.config_changes(cfg)})
            meta["fingerprint"] = cfg.fingerprint()
            meta["config"] = cfg.fingerprinted()
            atomic_write_text(self.dir / "meta.json", json.dumps(meta, indent=1))
        atomic_write_text(self.dir / "config.yaml", yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))

    def restart(self, cfg: RunConfig) -> None:
        """Start a run that never evaluated anything afresh with ``cfg`` (a corrected config
        after a start that failed): its optimizer state is dropped, nothing else is lost."""
        if self.read_evals():
            raise RunError(f"run {self.dir} has evaluations; it cannot be restarted")
        (self.dir / "checkpoint.json").unlink(missing_ok=True)
        (self.dir / "best.json").unlink(missing_ok=True)
        self._write_fresh(cfg)

    # -- evaluation log ----------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.dir / "evals.jsonl"

    def append_eval(self, record: dict[str, Any]) -> None:
        self.append_jsonl(self.log_path.name, record)

    def read_evals(self, repair: bool = False) -> list[dict[str, Any]]:
        """All complete records. A torn last line (crash mid-append) is dropped (and cut off
        the file when ``repair``)."""
        return self.read_jsonl(self.log_path.name, repair=repair)

    def append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        """Append one record to the log ``name`` (fsynced)."""
        line = json.dumps(record, separators=(",", ":")) + "\n"
        with open(self.dir / name, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def read_jsonl(self, name: str, repair: bool = False) -> list[dict[str, Any]]:
        """All complete records of the log ``name`` (a torn last line is dropped)."""
        path = self.dir / name
        if not path.exists():
            return []
        data = path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data) and repair:
            with open(path, "r+b") as f:
                f.truncate(end)
                os.fsync(f.fileno())
        records = []
        for i, line in enumerate(data[:end].splitlines()):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise RunError(f"{path}:{i + 1}: corrupt evaluation record") from None
        return records

    def read_json(self, name: str) -> Any:
        """A whole JSON file of the run, or None when it does not exist."""
        path = self.dir / name
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            raise RunError(f"{path} is corrupt") from None

    # -- checkpoints -------------------------------------------------------------------
    def save_checkpoint(self, state: dict[str, Any]) -> None:
        state = dict(state, format=FORMAT, saved=time.time())
        atomic_write_text(self.dir / "checkpoint.json", json.dumps(state, separators=(",", ":")))

    def load_checkpoint(self) -> dict[str, Any] | None:
        path = self.dir / "checkpoint.json"
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise RunError(f"{path} is corrupt") from None
        if not (isinstance(state, dict) and isinstance(state.get("optimizer"), dict)
                and isinstance(state.get("pending"), list) and isinstance(state.get("told"), int)):
            raise RunError(f"{path} is not an evomerge checkpoint (needs 'optimizer', 'pending' and "
                           "'told'); restore it from a backup or start a new run")
        return state

    def write_best(self, record: dict[str, Any]) -> None:
        atomic_write_text(self.dir / "best.json", json.dumps(record, indent=1))

    def write_json(self, name: str, data: Any) -> None:
        atomic_write_text(self.dir / name, json.dumps(data, indent=1))


def _reason(err: BaseException) -> str:
    text = getattr(err, "strerror", None) or str(err)
    return (text.splitlines() or [type(err).__name__])[0]


def check_run_name(name: str) -> str:
    """A run name is one folder name: never a path that leaves the runs directory."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or name != name.strip()):
        raise RunError(f"run name {name!r}: must be a single folder name (no '/', no '..')")
    return name


def _diff(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for k in sorted(set(a) | set(b)):
        if k in ("name", "budget", "executor") and not prefix:
            continue
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}")
    return out


def _version() -> str:
    from .. import __version__

    return __version__
