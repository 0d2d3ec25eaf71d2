"""Starting and resuming runs with a progress bar: what `evomerge run` / `resume` call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import RunConfig
from .report import format_fitness
from .search import Search, open_or_create
from .store import RunStore


def run_search(cfg: RunConfig, run_dir: str | Path, force: bool = False,
               progress: bool = True) -> dict[str, Any] | None:
    # Build (and so validate) everything before the run directory exists: a config that
    # cannot start leaves nothing behind that a corrected config would collide with.
    search = Search(cfg, store=None)
    store = open_or_create(cfg, run_dir, force=force)
    search.store = store
    try:
        best = _search(search, cfg, progress)
        if cfg.selection.enabled and search.told >= cfg.budget and (
                best is not None or search.best_baseline is not None):
            _select(store.dir, progress)
        return best
    finally:
        store.unlock()


def _select(run_dir: Path, progress: bool) -> None:
    """Choose the final model on validation data (engine/selection.py)."""
    from .selection import select_final

    if not progress:
        select_final(run_dir)
        return
    from rich.console import Console

    con = Console(stderr=True)
    with con.status("selecting the final model") as st:
        select_final(run_dir, on_step=lambda m: st.update(f"selecting the final model: {m}"))


def print_final(run_dir: str | Path, console: Any = None) -> bool:
    """Print a run's baseline/final table and summary; False when it has no final yet."""
    from .selection import load_final, rows_table, summary_lines, wide_console

    final = load_final(run_dir)
    if final is None:
        return False
    con = console or wide_console()
    con.print(rows_table(final["rows"], tasks=False))
    for line in summary_lines(final):
        con.print(line, highlight=False)
    con.print(f"run directory: {run_dir}", highlight=False)
    return True


def progress_text(s: Search) -> str:
    """Best candidate against the best baseline, both on the search split with their SE."""
    from ..fitness.stderr import combined_se, format_score

    def fmt(rec: dict[str, Any]) -> str:
        if rec.get("per_example"):
            c = combined_se(rec["per_example"], s.tasks.weights)
            return format_score(rec["fitness"], c["se"])
        return format_fitness(rec["fitness"])

    parts = []
    if s.best:
        parts.append(f"best {fmt(s.best)}")
    if s.best_baseline:
        parts.append(f"vs baseline {fmt(s.best_baseline)} ({s.best_baseline['baseline']})")
    return " ".join(parts) + (" (search split)" if parts else "")


def _search(search: Search, cfg: RunConfig, progress: bool) -> dict[str, Any] | None:
    if not progress:
        return search.run()
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
    )

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), TextColumn("{task.fields[best]}")) as bar:
        task = bar.add_task(cfg.name, total=cfg.budget, best="")

        def update(s: Search) -> None:
            bar.update(task, completed=s.told, best=progress_text(s))

        search.on_progress = update
        return search.run()


def resume_search(run_dir: str | Path, force: bool = False, budget: int | None = None,
                  progress: bool = True, executor: dict[str, Any] | None = None) -> dict[str, Any] | None:
    store = RunStore.open(run_dir)
    cfg = store.config()
    changes: dict[str, Any] = {}
    if budget is not None:
        changes["budget"] = budget
    if executor:
        changes["executor"] = cfg.executor.model_copy(update=executor)
    if changes:
        cfg = cfg.model_copy(update=changes)
    return run_search(cfg, store.dir, force=force, progress=progress)
