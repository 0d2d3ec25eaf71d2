"""Choosing a run's final model on validation data, and the table that reports it.

The search fitness of the best candidate is biased upwards: many candidates were compared on
the same noisy examples and the luckiest won (the winner's curse). So the run's *final*
model is chosen on examples the search never scored:

1. the ``selection.top_k`` distinct plans by search fitness, every baseline
   (engine/baselines.py) and the optimizer's own estimate of the optimum
   (:meth:`Optimizer.estimate`; CMA-ES: its distribution mean, also scored on the search
   split so it can be compared) are re-scored on the **validation** split;
2. the best by validation fitness is the final (ties: higher search fitness, then the
   order above); it is written atomically to ``final.json``;
3. the final and the baselines (only they) are scored on the **held-out** split and on the
   run's ``report_tasks`` (held-out split), for reporting; nothing is chosen on them.

Every re-score is appended to ``rescore.jsonl`` keyed by (plan hash, split) before it is
used, so an interrupted selection resumes without scoring anything twice, and running it
again (``evomerge select RUN``) only scores what is new. Every score carries its standard
error (:mod:`evomerge.fitness.stderr`).

Library calls: :func:`select_final` (do it), :func:`final_rows` (the rows of a finished
selection: label, role, and per split ``{fitness, se, n, tasks}``), :func:`rows_table`
(a rich table of such rows).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import EvomergeError, RunError
from ..fitness.stderr import combined_se, format_score
from .store import RunStore

RESCORE = "rescore.jsonl"
FINAL = "final.json"
SPLIT_ORDER = ("search", "validation", "heldout")


class Rescorer:
    """Scores plans of a run on any split, in this process, with a (plan hash, split) cache
    in the run's ``rescore.jsonl``. The evaluator is built on first use."""

    def __init__(self, store: RunStore, cfg: Any | None = None):
        from .models import resolve_models
        from .tasks_info import TaskInfo

        self.store = store
        self.cfg = cfg or store.config()
        self.models = resolve_models(self.cfg.models)
        frac = self.cfg.selection.validation_fraction or None
        self.info = TaskInfo.load(self.cfg.tasks, validation_fraction=frac)
        self.cache = {(r["plan_hash"], r["split"]): r for r in store.read_jsonl(RESCORE, repair=True)}
        self._ev: Any = None
        self._space: Any = None
        self._loaded: str | None = None

    @property
    def space(self) -> Any:
        if self._space is None:
            from ..spaces import make_space

            c = self.cfg
            self._space = make_space(c.space, self.models, c.base_model, seed=c.seed, dtype=c.dtype)
        return self._space

    def _evaluator(self) -> Any:
        if self._ev is None:
            from .evaluator import EvalSpec, Evaluator
            from .tasks_info import task_entries

            c = self.cfg
            self._ev = Evaluator(EvalSpec(
                model_dir=self.models[c.base_model or next(iter(self.models))],
                tasks=task_entries(c) + task_entries(c, report=True),
                backend=c.backend.model_dump(), num_threads=c.executor.num_threads))
        return self._ev

    def score(self, plan_hash: str, recipe: dict[str, Any], split: str) -> dict[str, Any]:
        """Per-example scores of one plan on ``split`` (search tasks; on ``heldout`` also the
        report tasks): ``{plan_hash, split, per_example, error, seconds}``."""
        key = (plan_hash, split)
        if key in self.cache:
            return self.cache[key]
        ev = self._evaluator()
        search_names = set(self.info.names)
        tasks = [t for t in ev.tasks if t.has_split(split)
                 and (t.name in search_names or split == "heldout")]
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"plan_hash": plan_hash, "split": split, "per_example": None,
                               "error": None}
        try:
            if self._loaded != plan_hash:
                self._loaded = None
                ev.backend.load_plan(self.space.compile(recipe), ev.materializer)
                self._loaded = plan_hash
            raw = ev.backend.evaluate(tasks, split=split) if tasks else {}
            rec["per_example"] = {k: [float(x) for x in v] for k, v in raw.items()}
        except EvomergeError as err:
            rec["error"] = str(err)
        except Exception as err:  # noqa: BLE001 - a model that fails to score is a failed row
            rec["error"] = f"{type(err).__name__}: {err}"
        rec["seconds"] = time.perf_counter() - t0
        rec["time"] = time.time()
        self.store.append_jsonl(RESCORE, rec)
        self.cache[key] = rec
        return rec

    def close(self) -> None:
        if self._ev is not None:
            self._ev.close()
            self._ev = None


def summarize_scores(per_example: dict[str, Any] | None, weights: dict[str, float]) -> dict[str, Any] | None:
    """``{fitness, se, n, tasks: {name: {mean, se, n}}}`` of per-example scores; ``fitness``
    is None when a weighted task is missing (e.g. a task without a held-out split)."""
    if not per_example:
        return None
    if all(t in per_example for t in weights):
        return combined_se({t: per_example[t] for t in weights}, weights)
    part = combined_se({t: v for t, v in per_example.items() if t in weights}, {})
    return {"fitness": None, "se": None, "tasks": part["tasks"], "n": 0}


def _candidates(cfg: Any, store: RunStore, top_k: int) -> list[dict[str, Any]]:
    from .baselines import LOG
    from .export import top_records

    records = [r for r in store.read_evals() if not r.get("racing_cut") and r.get("per_example")]
    out = []
    for rank, r in enumerate(top_records(records, top_k), 1):
        out.append({"label": f"candidate {r['id']} (search #{rank})", "role": "candidate",
                    "id": r["id"], "search_rank": rank, "plan_hash": r["plan_hash"],
                    "recipe": r["recipe"], "search_per_example": r["per_example"]})
    for r in store.read_jsonl(LOG):
        if r.get("failed"):
            continue
        out.append({"label": r["baseline"], "role": "baseline", "id": r["id"], "kind": r["kind"],
                    "plan_hash": r["plan_hash"], "recipe": r["recipe"],
                    "search_per_example": r["per_example"]})
    return out


def optimizer_estimate(cfg: Any, store: RunStore, space: Any) -> dict[str, Any] | None:
    """The optimizer's estimate of the optimum at the run's last checkpoint, as an entry."""
    from ..optim.state import from_jsonable
    from .search import build_optimizer

    ckpt = store.load_checkpoint()
    if ckpt is None:
        return None
    opt = build_optimizer(cfg, space)
    try:
        opt.load_state_dict(from_jsonable(ckpt["optimizer"]))
    except EvomergeError:
        return None
    genome = opt.estimate()
    if genome is None:
        return None
    recipe = space.decode(np.asarray(genome, dtype=float))
    try:
        plan_hash = space.compile_decoded(recipe).hash()
    except EvomergeError:
        return None
    name = cfg.optimizer.name
    return {"label": f"{name} estimate (distribution mean)" if name in ("cma", "sep-cma")
            else f"{name} estimate", "role": "estimate", "id": None, "plan_hash": plan_hash,
            "recipe": recipe, "genome": [float(x) for x in genome], "search_per_example": None}


def select_final(run_dir: str | Path, top_k: int | None = None,
                 on_step: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Re-score the run's top-k, baselines and optimizer estimate on validation, choose the
    final, score it and the baselines on held-out data; writes and returns ``final.json``."""
    store = RunStore.open(run_dir)
    cfg = store.config()
    k = top_k or cfg.selection.top_k
    say = on_step or (lambda _m: None)
    rs = Rescorer(store, cfg)
    weights = rs.info.weights
    try:
        entries = _candidates(cfg, store, k)
        if cfg.selection.optimizer_estimate:
            est = optimizer_estimate(cfg, store, rs.space)
            if est is not None:
                entries.append(est)
        if not entries:
            raise RunError(f"run {store.dir} has no successful evaluation to select from")
        for e in entries:
            if e["search_per_example"] is None:
                say(f"search split: {e['label']}")
                e["search_per_example"] = rs.score(e["plan_hash"], e["recipe"], "search")["per_example"]
            say(f"validation split: {e['label']}")
            v = rs.score(e["plan_hash"], e["recipe"], "validation")
            e["validation_per_example"], e["validation_error"] = v["per_example"], v["error"]
        rows = [_row(e, weights) for e in entries]
        ok = [i for i, r in enumerate(rows) if (r["splits"].get("validation") or {}).get("fitness") is not None]
        if ok:
            def rank(i: int) -> tuple[float, float, int]:
                s = rows[i]["splits"]
                return (-s["validation"]["fitness"], -(s["search"] or {}).get("fitness", -1e18), i)

            chosen, chosen_by = min(ok, key=rank), "validation"
        else:  # no validation split at all: say so, fall back to the search fitness
            chosen = min(range(len(rows)), key=lambda i: (-(rows[i]["splits"]["search"] or {}).get(
                "fitness", -1e18), i))
            chosen_by = "search (no validation split could be scored)"
        rows[chosen]["final"] = True
        if cfg.selection.heldout:
            for i, (e, r) in enumerate(zip(entries, rows)):
                if i != chosen and e["role"] != "baseline":
                    continue
                say(f"held-out split: {e['label']}")
                h = rs.score(e["plan_hash"], e["recipe"], "heldout")
                per = h["per_example"] or {}
                r["splits"]["heldout"] = summarize_scores(
                    {t: v for t, v in per.items() if t in weights}, weights)
                rep = combined_se({t: v for t, v in per.items() if t not in weights}, {})
                r["report"] = rep["tasks"]
                if h["error"]:
                    r["errors"]["heldout"] = h["error"]
    finally:
        rs.close()
    final = {
        "run": cfg.name,
        "chosen_by": chosen_by,
        "final": {k2: rows[chosen][k2] for k2 in ("label", "role", "id", "plan_hash")},
        "recipe": entries[chosen]["recipe"],
        "rows": rows,
        "top_k": k,
        "weights": weights,
        "time": time.time(),
    }
    store.write_json(FINAL, final)
    return final


def _row(e: dict[str, Any], weights: dict[str, float]) -> dict[str, Any]:
    row = {"label": e["label"], "role": e["role"], "id": e.get("id"), "plan_hash": e["plan_hash"],
           "final": False, "splits": {}, "report": {}, "errors": {}}
    if e.get("search_rank"):
        row["search_rank"] = e["search_rank"]
    row["splits"]["search"] = summarize_scores(e["search_per_example"], weights)
    row["splits"]["validation"] = summarize_scores(e.get("validation_per_example"), weights)
    if e.get("validation_error"):
        row["errors"]["validation"] = e["validation_error"]
    return row


def load_final(run_dir: str | Path) -> dict[str, Any] | None:
    """``final.json`` of a run, or None when the run has not been through selection."""
    return RunStore.open(run_dir).read_json(FINAL)


def final_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """The rows of a run's selection (see :func:`select_final`); [] if not selected yet."""
    final = load_final(run_dir)
    return list(final["rows"]) if final else []


def rows_table(rows: list[dict[str, Any]], title: str = "", splits: tuple[str, ...] = SPLIT_ORDER,
               tasks: bool = False) -> Any:
    """A rich table: one row per model, one column per split (score ± standard error)."""
    from rich.table import Table

    t = Table(title=title or "scores (%, ± standard error): search = what the optimizer saw; "
              "validation = chose the final; held-out = reported only")
    t.add_column("model")
    t.add_column("role")
    for s in splits:
        t.add_column(s, justify="right")
    report = sorted({n for r in rows for n in r.get("report", {})})
    task_names = sorted({n for r in rows for s in splits for n in ((r["splits"].get(s) or {})
                                                                  .get("tasks") or {})}) if tasks else []
    for n in task_names:
        t.add_column(f"{n} ({splits[-1]})", justify="right")
    for n in report:
        t.add_column(f"{n} (report, held-out)", justify="right")
    for r in rows:
        cells = []
        for s in splits:
            v = r["splits"].get(s)
            cells.append("-" if not v or v.get("fitness") is None else format_score(v["fitness"], v["se"]))
        last = r["splits"].get(splits[-1]) or {}
        for n in task_names:
            tv = (last.get("tasks") or {}).get(n)
            cells.append("-" if not tv else format_score(tv["mean"], tv["se"]))
        for n in report:
            tv = r.get("report", {}).get(n)
            cells.append("-" if not tv else format_score(tv["mean"], tv["se"]))
        name = r["label"] + ("  [final]" if r.get("final") else "")
        t.add_row(name, r["role"], *cells, style="bold" if r.get("final") else None)
    return t


def summary_lines(final: dict[str, Any]) -> list[str]:
    """Plain-text end-of-run summary: the final (and how it was chosen) against the best
    baseline, every score with its split and standard error."""
    rows = final["rows"]
    fin = next(r for r in rows if r.get("final"))

    def show(r: dict[str, Any]) -> str:
        parts = []
        for s in SPLIT_ORDER:
            v = r["splits"].get(s)
            if v and v.get("fitness") is not None:
                parts.append(f"{s} {format_score(v['fitness'], v['se'])}")
        return ", ".join(parts)

    out = [f"final model ({final['chosen_by']}): {fin['label']}: {show(fin)}"]
    base = [r for r in rows if r["role"] == "baseline"
            and (r["splits"].get("validation") or {}).get("fitness") is not None]
    if base:
        b = max(base, key=lambda r: r["splits"]["validation"]["fitness"])
        out.append(f"best baseline (by validation): {b['label']}: {show(b)}")
    top = next((r for r in rows if r.get("search_rank") == 1), None)
    if top is not None and top is not fin:
        out.append(f"best by search fitness: {top['label']}: {show(top)}")
    return out


def wide_console(min_width: int = 150) -> Any:
    """A rich console at least ``min_width`` wide when output is not a terminal (logs, pipes),
    so score tables are not folded into unreadable columns."""
    from rich.console import Console

    con = Console()
    return con if con.is_terminal else Console(width=max(min_width, con.width))
