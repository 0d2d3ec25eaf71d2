"""`evomerge export RUN --pareto / --prefer`: export a run's Pareto front (or one member).

The front is :func:`evomerge.report.front.run_front`'s: complete evaluations only (a
candidate cut by racing or a failed one is never a member). Where every task has a
validation split, the search front's members are re-scored on validation
(:class:`~evomerge.engine.selection.Rescorer`, cached in ``rescore.jsonl``) and the front
among them on validation is exported; otherwise the front is on the search split (said in
the output and in ``front.json``). ``--pareto`` writes ``OUT/pareto/<rank>-cand<id>/`` (one HF checkpoint
each) plus ``OUT/pareto/front.json``, all inside one atomic directory; ``--prefer`` alone
writes ``OUT/preferred-cand<id>/``. Each card carries a "Trade-off" section.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..checkpoint.card import stderr_text
from ..engine.objectives import Objectives
from ..errors import RunError


def objective_se(rec: Mapping[str, Any], objectives: Objectives, split: str) -> list[float | None]:
    """Standard error of each objective for a record on ``split``: the task SEs combined with
    the objective's task weights (``None`` where a task's SE is unknown)."""
    if split == "search":
        per_ex = rec.get("per_example") or {}
        task_se = {t: (stderr_text(xs) if xs else None) for t, xs in per_ex.items()}
    else:
        block = rec.get("validation") or {}
        task_se = {t: (v.get("stderr", v.get("se")) if isinstance(v, Mapping) else None)
                   for t, v in block.items() if t != "scores"}
    out: list[float | None] = []
    for group in objectives.groups:
        w = [objectives.weights.get(t, 1.0) for t in group]
        ses = [task_se.get(t) for t in group]
        if any(s is None for s in ses) or not sum(w):
            out.append(None)
            continue
        out.append(math.sqrt(sum((wi / sum(w)) ** 2 * s ** 2 for wi, s in zip(w, ses))))
    return out


def validation_front(run_dir: str | Path, front: Any) -> Any | None:
    """Re-score the search front's members on the validation split (cached in the run's
    ``rescore.jsonl``: a second export scores nothing) and return the validation front among
    them; ``None`` when a task of the run has no validation split.

    Raises:
        RunError: no member could be scored on validation.
    """
    from ..engine.selection import Rescorer, summarize_scores
    from ..engine.store import RunStore
    from ..fitness import load_task
    from .front import front_of_records

    store = RunStore.open(run_dir)
    cfg = store.config()
    frac = cfg.selection.validation_fraction or None
    if not all(load_task(t.path, validation_fraction=frac).has_split("validation") for t in cfg.tasks):
        return None
    rs = Rescorer(store, cfg)
    scored = []
    try:
        for rec in front.members:
            v = rs.score(rec["plan_hash"], rec["recipe"], "validation")
            summ = summarize_scores(v["per_example"], rs.info.weights) if not v["error"] else None
            if not summ:
                continue
            tasks = {t: {"mean": s["mean"], "se": s["se"]} for t, s in summ["tasks"].items()}
            scored.append(dict(rec, validation={"scores": {t: s["mean"] for t, s in tasks.items()},
                                                **tasks}))
    finally:
        rs.close()
    if not scored:
        raise RunError(f"run {run_dir}: no front member could be scored on validation")
    return front_of_records(scored, front.objectives)


def _front_doc(front: Any, preferred_id: int | None) -> dict[str, Any]:
    members = []
    for rank, (rec, pts) in enumerate(zip(front.members, front.points), 1):
        members.append({"rank": rank, "id": int(rec["id"]), "plan_hash": rec.get("plan_hash"),
                        "dir": f"{rank}-cand{rec['id']}",
                        "objectives": {n: float(v) for n, v in zip(front.objectives.names, pts)},
                        "se": dict(zip(front.objectives.names,
                                       objective_se(rec, front.objectives, front.split))),
                        "preferred": int(rec["id"]) == preferred_id})
    return {"split": front.split, "objectives": front.objectives.names,
            "groups": front.objectives.groups, "members": members,
            "note": ("front chosen on the validation split" if front.split == "validation" else
                     "front chosen on the search split (the run has no validation scores): "
                     "optimistic")}


def _tradeoff(doc: Mapping[str, Any], i: int) -> dict[str, Any]:
    names = doc["objectives"]
    ms = doc["members"]
    m = ms[i]
    nbs = [ms[j] for j in (i - 1, i + 1) if 0 <= j < len(ms)]
    return {"split": doc["split"], "objectives": names, "front_size": len(ms),
            "preferred": m["preferred"],
            "member": {"id": m["id"], "values": [m["objectives"][n] for n in names],
                       "se": [m["se"][n] for n in names]},
            "neighbours": [{"id": nb["id"], "values": [nb["objectives"][n] for n in names]}
                           for nb in nbs]}


def export_pareto(run_dir: str | Path, out_dir: str | Path, *, pareto: bool = True,
                  prefer: Mapping[str, float] | None = None, device: str | None = None,
                  shard_size: str = "2GB", overwrite: bool = False) -> tuple[list[Path], dict[str, Any]]:
    """Export the run's front (``pareto``) and/or its member best for ``prefer``.

    Args:
        run_dir: the run directory.
        out_dir: where ``pareto/`` (or ``preferred-cand<id>/``) is written.
        pareto: export every front member plus ``front.json``.
        prefer: ``{objective or task: weight}``; the front member maximizing the weighted sum.
        device, shard_size, overwrite: as for ``evomerge export``.

    Returns:
        The written directories and the front document.

    Raises:
        ConfigError: a bad preference (checked before anything is written).
        RunError: the run has no complete evaluation.
    """
    from ..checkpoint.writer import atomic_output_dir
    from ..engine.export import export_records
    from .front import run_front

    front = run_front(run_dir)
    if front.split == "search":
        front = validation_front(run_dir, front) or front
    if not front.members:
        raise RunError(f"run {run_dir} has an empty Pareto front")
    preferred_id = int(front.prefer(prefer)[0]["id"]) if prefer else None
    doc = _front_doc(front, preferred_id)
    by_id = {int(r["id"]): r for r in front.members}

    def target_rec(i: int) -> dict[str, Any]:
        m = doc["members"][i]
        rec = dict(by_id[m["id"]])
        rec["tradeoff"] = _tradeoff(doc, i)
        return rec

    out = Path(out_dir)
    if not pareto:
        i = next(k for k, m in enumerate(doc["members"]) if m["preferred"])
        target = out / f"preferred-cand{doc['members'][i]['id']}"
        return export_records(run_dir, [(target, target_rec(i))], device, shard_size, overwrite), doc
    with atomic_output_dir(out / "pareto", overwrite=overwrite) as tmp:
        export_records(run_dir, [(tmp / m["dir"], target_rec(i)) for i, m in enumerate(doc["members"])],
                device, shard_size, overwrite)
        (tmp / "front.json").write_text(json.dumps(doc, indent=2) + "\n")
    return [out / "pareto" / m["dir"] for m in doc["members"]], doc
