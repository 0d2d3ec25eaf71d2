"""The Pareto front of a run, computed from its directory (config + evaluation log).

Which records can be on the front: successful, complete evaluations (never a failed
candidate, never one cut by racing: its scores are a partial estimate), one per distinct
plan (a cached repeat is the same model). Objectives are the config's ``objectives`` or one
per task (:class:`~evomerge.engine.objectives.Objectives`), recomputed from each record's
per-task scores, so runs made before objectives existed have fronts too.

Split: where records carry validation scores (a validation re-scoring step writes
``validation: {"scores": {...}}`` into a record), the front is taken over the re-scored
records on their validation scores and says ``split: validation``; otherwise it is the
search split. Held-out scores are never used to select.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.objectives import Objectives
from ..engine.store import RunStore
from ..errors import ConfigError, RunError
from ..pareto import hypervolume, nondominated


def validation_scores(rec: Mapping[str, Any]) -> Mapping[str, float] | None:
    """The record's validation-split per-task scores, if a validation step wrote them."""
    val = rec.get("validation")
    if isinstance(val, Mapping) and isinstance(val.get("scores"), Mapping):
        return val["scores"]
    return None


def eligible(records: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Records that may be front members: complete successes, first of each plan."""
    seen: set[str] = set()
    out = []
    for r in records:
        if r.get("failed") or r.get("racing_cut") or not r.get("scores"):
            continue
        h = r.get("plan_hash") or f"id{r['id']}"
        if h in seen:
            continue
        seen.add(h)
        out.append(r)
    return out


@dataclass
class Front:
    objectives: Objectives
    split: str  # "search" or "validation"
    members: list[dict[str, Any]]  # front records, sorted by the first objective (desc)
    points: np.ndarray  # (len(members), m): their objective values on ``split``
    all_points: np.ndarray  # every eligible record's objective values
    all_ids: list[int] = field(default_factory=list)

    def hypervolume(self, reference: Sequence[float] | None = None) -> float:
        ref = np.zeros(self.objectives.m) if reference is None else np.asarray(reference, float)
        return hypervolume(self.points, ref)

    def prefer(self, weights: Mapping[str, float]) -> tuple[dict[str, Any], np.ndarray]:
        """The member with the highest preference-weighted objective sum (ties: lower id)."""
        w = preference_vector(weights, self.objectives)
        vals = self.points @ w
        order = sorted(range(len(self.members)), key=lambda i: (-vals[i], self.members[i]["id"]))
        return self.members[order[0]], self.points[order[0]]


def preference_vector(weights: Mapping[str, float], objectives: Objectives) -> np.ndarray:
    """``{objective or task: weight}`` as a vector over the objectives (a task name counts for
    the objectives that average it); weights must be >= 0 and not all 0."""
    w = np.zeros(objectives.m)
    for key, value in weights.items():
        if value < 0:
            raise ConfigError(f"--prefer {key}={value}: weights must be >= 0")
        hit = [k for k, (n, g) in enumerate(zip(objectives.names, objectives.groups))
               if key == n or key in g]
        if not hit:
            raise ConfigError(f"--prefer {key}: not an objective or task of the run "
                              f"(objectives: {', '.join(objectives.names)})")
        for k in hit:
            w[k] += float(value)
    if not np.any(w > 0):
        raise ConfigError("--prefer: the weights sum to zero")
    return w / w.sum()


def parse_preference(text: str) -> dict[str, float]:
    """``task=w,task2=w2`` (a bare name means weight 1)."""
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            w = float(value) if value else 1.0
        except ValueError:
            raise ConfigError(f"--prefer {part!r}: expected NAME=WEIGHT") from None
        if not name.strip() or _ == "=" and not value:
            raise ConfigError(f"--prefer {part!r}: expected NAME=WEIGHT")
        if not np.isfinite(w) or w < 0:
            raise ConfigError(f"--prefer {part!r}: weights must be finite and >= 0")
        out[name.strip()] = w
    if not out:
        raise ConfigError("--prefer: give at least one NAME=WEIGHT")
    return out


def front_of_records(records: Sequence[Mapping[str, Any]], objectives: Objectives) -> Front:
    ok = eligible(records)
    validated = [r for r in ok if validation_scores(r) is not None]
    split = "validation" if validated else "search"
    pool = validated if validated else ok
    pts = np.array([objectives.values(validation_scores(r) if validated else r["scores"])
                    for r in pool]).reshape(-1, objectives.m)
    mask = nondominated(pts) if len(pool) else np.zeros(0, dtype=bool)
    idx = sorted(np.flatnonzero(mask).tolist(), key=lambda i: (-pts[i, 0], pool[i]["id"]))
    return Front(objectives, split, [dict(pool[i]) for i in idx], pts[idx].reshape(-1, objectives.m),
                 pts, [int(r["id"]) for r in pool])


def run_front(run_dir: str | Path) -> Front:
    """The Pareto front of the run at ``run_dir``."""
    store = RunStore.open(run_dir)
    records = store.read_evals()
    if not eligible(records):
        raise RunError(f"run {store.dir} has no complete successful evaluation")
    return front_of_records(records, Objectives.of_run(store.config(), records))
