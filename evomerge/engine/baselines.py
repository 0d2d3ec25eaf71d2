"""Baselines: the untuned merges of a run, evaluated first, as ordinary candidates.

At the start of every run (``baselines.enabled``, on by default) the search space names its
untuned recipes (:meth:`SearchSpace.baselines`: the initial point, each expert alone,
uniform task arithmetic, TIES at its default density). Each is compiled and evaluated on the
search split through the run's executor, exactly like a candidate, and appended to
``baselines.jsonl`` with its label. They:

- share the plan-hash cache with the candidates (a candidate whose plan equals a baseline's
  is served from it, and two baselines with one plan are evaluated once);
- are never told to the optimizer and do not count in ``budget`` (the optimizer's sequence
  of candidates is the same with or without them);
- are resumable: after a crash only the labels missing from ``baselines.jsonl`` are
  evaluated, in the same order, so the log ends the same;
- are never raced (scored on every example), so their scores are comparable.

Record fields are those of ``evals.jsonl`` plus ``baseline`` (the label) and ``kind``;
``id`` is negative (-1, -2, ...) so it never collides with a candidate id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import EvomergeError
from ..optim import FAILED_FITNESS
from .faults import maybe_crash
from .search import outcome_fields

if TYPE_CHECKING:
    from .evaluator import Outcome
    from .search import Search

LOG = "baselines.jsonl"


def best_baseline(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    ok = [r for r in records if not r.get("failed")]
    return max(ok, key=lambda r: (r["fitness"], r["id"])) if ok else None


def run_baselines(search: Search) -> None:
    """Evaluate the baselines the run's log does not hold yet (the executor is started)."""
    done = set(search.baseline_records)
    todo = [(i, b) for i, b in enumerate(search.baselines) if b.label not in done]
    if not todo:
        return
    # compile first; group labels by plan so each distinct plan is evaluated once
    groups: dict[str, list[tuple[int, Any, dict[str, Any]]]] = {}
    order: list[str] = []
    for i, b in todo:
        try:
            h = search.space.compile(b.recipe).hash()
        except EvomergeError as err:
            _write(search, i, b, "", None, f"compile: {err}")
            continue
        if h not in groups:
            order.append(h)
        groups.setdefault(h, []).append((i, b, b.recipe))
    queue = list(order)
    inflight: dict[int, str] = {}
    while queue or inflight:
        while queue and search.executor.in_flight < search.executor.capacity:
            h = queue.pop(0)
            if h in search.cache:
                for i, b, _ in groups[h]:
                    _write(search, i, b, h, None, None, cached=search.cache[h])
                continue
            i, b, recipe = groups[h][0]
            cid = -(i + 1)
            inflight[cid] = h
            search.executor.submit(cid, search.space.compile(recipe), {"best": None})
        for cid, outcome in search.executor.poll(timeout=1.0):
            h = inflight.pop(cid)
            first = True
            for i, b, _ in groups[h]:
                if first or outcome.failed:
                    rec = _write(search, i, b, h, outcome, outcome.error)
                    first = False
                else:
                    _write(search, i, b, h, None, None, cached=rec)


def _write(search: Search, i: int, b: Any, h: str, outcome: Outcome | None, error: str | None,
           cached: dict[str, Any] | None = None) -> dict[str, Any]:
    names = search.tasks.names
    if cached is not None:
        scores, seconds, worker = cached["per_example"], 0.0, "cache"
    elif outcome is not None:
        scores, seconds, worker = outcome.scores, outcome.seconds, outcome.worker
    else:
        scores, seconds, worker = None, 0.0, "compile"
    failed = error is not None or scores is None
    if failed:
        means, fitness, scores = {}, FAILED_FITNESS, None
    else:
        means = {t: float(np.mean(scores[t])) for t in names}
        fitness = search.tasks.combine(means)
    rec = {
        "id": -(i + 1),
        "baseline": b.label,
        "kind": b.kind,
        "genome": None if b.genome is None else [float(x) for x in b.genome],
        **outcome_fields(b.recipe, h, fitness, means, scores, failed, error, cached is not None,
                         seconds, worker),
    }
    if outcome is not None and outcome.merge_seconds is not None:
        # as candidates log them: a worker's one-time merge setup often lands here
        rec.update(merge_seconds=outcome.merge_seconds, eval_seconds=outcome.eval_seconds)
        if outcome.setup_seconds is not None:
            rec.update(setup_seconds=outcome.setup_seconds)
    search.store.append_jsonl(LOG, rec)
    maybe_crash("after_baseline")
    search.remember_baseline(rec)
    if search.on_progress is not None:
        search.on_progress(search)
    return rec
