"""The logger interface, the registry, and the feed that tails a run's evaluation log.

Scalars logged per finished candidate (step = position in the log, 1-based):

- ``candidate/fitness`` and ``candidate/<task>`` (search-split means), ``candidate/seconds``
  (evaluation time; 0 for a cached plan), ``candidate/failed`` (1 for a failed candidate);
- ``best/fitness`` and ``best/<task>`` (best complete candidate so far);
- baselines (records carrying a ``baseline`` or ``label`` field, as runs with baselines log
  them): ``baseline/<label>/fitness`` and ``baseline/<label>/<task>``;
- ``run/evaluations_per_second`` over the records so far.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from typing import Any

from ..errors import ConfigError


class RunLogger:
    """One experiment tracker. Subclasses override the three hooks; all take plain data."""

    name = ""
    requires = ""  # the importable package this logger needs

    @classmethod
    def available(cls) -> bool:
        return importlib.util.find_spec(cls.requires) is not None

    def open(self, run_name: str, run_dir: Path, config: dict[str, Any]) -> None:
        """Called once before any scalar; ``config`` is the run config as plain data."""

    def log_scalars(self, step: int, scalars: dict[str, float], wall_time: float | None) -> None:
        """Called per finished candidate (and per baseline, at the step reached so far)."""
        raise TypeError(f"{type(self).__name__} must define log_scalars")

    def close(self) -> None:
        """Flush and release; called once."""


LOGGERS: dict[str, type[RunLogger]] = {}


def register(cls: type[RunLogger]) -> type[RunLogger]:
    LOGGERS[cls.name] = cls
    return cls


def _ensure_builtin() -> None:
    from . import trackers  # noqa: F401  (registers tensorboard, wandb, mlflow)


def default_loggers() -> list[str]:
    """What a run logs to when nothing is asked for: TensorBoard if installed, else nothing."""
    _ensure_builtin()
    return ["tensorboard"] if LOGGERS["tensorboard"].available() else []


def make_loggers(names: list[str] | None) -> list[RunLogger]:
    """Loggers by name (``none`` alone: no logging); None: :func:`default_loggers`."""
    _ensure_builtin()
    if names is None:
        names = default_loggers()
    names = [n for n in names if n != "none"]
    out = []
    for n in dict.fromkeys(names):
        cls = LOGGERS.get(n)
        if cls is None:
            raise ConfigError(f"--log {n}: unknown logger; use one of {', '.join(LOGGERS)} or none")
        if not cls.available():
            raise ConfigError(f"--log {n}: the '{cls.requires}' package is not installed (pip install {cls.requires})")
        out.append(cls())
    return out


_SAFE = re.compile(r"[^A-Za-z0-9_.\-/]+")


def _tag(*parts: str) -> str:
    return "/".join(_SAFE.sub("_", str(p)).strip("_") or "_" for p in parts)


def _new_lines(path: Path, offset: int) -> tuple[list[bytes], int]:
    """The complete, non-empty lines of ``path`` after byte ``offset``, and the new offset
    (a torn last line waits for its end)."""
    if not path.is_file():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    return [ln for ln in data[:end].splitlines() if ln.strip()], offset + end


class RunLogFeed:
    """Tails ``evals.jsonl`` of a run directory and hands new records' scalars to loggers.

    :meth:`sync` reads only the complete lines appended since the last call (a byte offset),
    so calling it after every evaluation costs what the new records cost.
    """

    def __init__(self, run_dir: str | Path, loggers: list[RunLogger], run_name: str,
                 config: dict[str, Any]):
        self.run_dir = Path(run_dir)
        self.loggers = loggers
        self.offset = 0
        self.baseline_offset = 0
        self.step = 0
        self.best: dict[str, Any] | None = None
        self.first_time: float | None = None
        for lg in loggers:
            lg.open(run_name, self.run_dir, config)

    def sync(self, emit: bool = True) -> int:
        """Log every record appended since the last call; returns how many. ``emit=False``
        only catches up (best so far, step count) without logging: a resumed run does not
        log its old records a second time."""
        # the untuned baselines (engine/baselines.py) are evaluated before any candidate
        lines, self.baseline_offset = _new_lines(self.run_dir / "baselines.jsonl",
                                                 self.baseline_offset)
        for line in lines:
            rec = json.loads(line)
            if emit and not rec.get("failed") and rec.get("baseline"):
                scalars = {_tag("baseline", rec["baseline"], "fitness"): float(rec["fitness"])}
                scalars.update({_tag("baseline", rec["baseline"], t): float(v)
                                for t, v in (rec.get("scores") or {}).items()})
                for lg in self.loggers:
                    lg.log_scalars(self.step, scalars, rec.get("time"))
        lines, self.offset = _new_lines(self.run_dir / "evals.jsonl", self.offset)
        for line in lines:
            self._emit(json.loads(line), emit)
        return len(lines)

    def scalars_of(self, rec: dict[str, Any]) -> dict[str, float]:
        out: dict[str, float] = {}
        label = rec.get("baseline") or rec.get("label")
        failed = bool(rec.get("failed"))
        if label and not failed:
            out[_tag("baseline", label, "fitness")] = float(rec["fitness"])
            for task, v in (rec.get("scores") or {}).items():
                out[_tag("baseline", label, task)] = float(v)
        out["candidate/failed"] = float(failed)
        out["candidate/seconds"] = float(rec.get("seconds") or 0.0)
        if not failed:
            out["candidate/fitness"] = float(rec["fitness"])
            for task, v in (rec.get("scores") or {}).items():
                out[_tag("candidate", task)] = float(v)
            complete = not rec.get("racing_cut")
            if complete and (self.best is None or rec["fitness"] > self.best["fitness"]):
                self.best = rec
        if self.best is not None:
            out["best/fitness"] = float(self.best["fitness"])
            for task, v in (self.best.get("scores") or {}).items():
                out[_tag("best", task)] = float(v)
        t = rec.get("time")
        if t is not None:
            self.first_time = t if self.first_time is None else self.first_time
            if t > self.first_time:
                out["run/evaluations_per_second"] = (self.step - 1) / (t - self.first_time)
        return out

    def _emit(self, rec: dict[str, Any], emit: bool = True) -> None:
        self.step += 1
        scalars = self.scalars_of(rec)
        if not emit:
            self.first_time = None  # the rate counts what this session logs
            return
        for lg in self.loggers:
            lg.log_scalars(self.step, scalars, rec.get("time"))

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()
