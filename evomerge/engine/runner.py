"""Starting and resuming runs with a progress bar: what `evomerge run` / `resume` call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import RunConfig
from .executor import WorkersLostError
from .report import format_fitness
from .search import Search, open_or_create
from .store import RunStore


def run_search(cfg: RunConfig, run_dir: str | Path, force: bool = False,
               progress: bool = True) -> dict[str, Any] | None:
    # Build (and so validate) everything before the run directory exists: a config that
    # cannot start leaves nothing behind that a corrected config would collide with.
    search = Search(cfg, store=None)
    search.executor.connect()  # a Ray cluster that cannot be joined fails here, in one line
    try:
        store = open_or_create(cfg, run_dir, force=force)
    except BaseException:
        search.executor.close()
        raise
    search.store = store
    try:
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
                best = f"best {format_fitness(s.best['fitness'])}" if s.best else ""
                bar.update(task, completed=s.told, best=best)

            search.on_progress = update
            return search.run()
    except WorkersLostError as err:
        raise WorkersLostError(f"{err}; the run is saved: `evomerge resume {store.dir}` "
                               "continues it") from None
    finally:
        store.unlock()


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
