"""Starting and resuming runs with a progress bar: what `evomerge run` / `resume` call."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import RunConfig, parse_config
from .report import format_fitness
from .search import Search, open_or_create
from .store import RunStore


def run_search(cfg: RunConfig, run_dir: str | Path, force: bool = False,
               progress: bool = True) -> dict[str, Any] | None:
    # Build (and so validate) everything before the run directory exists, the workers
    # included (backend construction, devices, cluster connection): a config that cannot
    # start leaves nothing behind that a corrected config would collide with.
    # An existing run is locked (and checked) first, so a second process stops before it
    # builds any worker.
    search = Search(cfg, store=None)
    store = None
    try:
        if RunStore(run_dir).exists():
            store = open_or_create(cfg, run_dir, force=force)
            search.start()
        else:
            search.start()
            store = open_or_create(cfg, run_dir, force=force)
    except BaseException:
        search.executor.close()
        if store is not None:
            store.unlock()
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
    finally:
        store.unlock()


def resume_search(run_dir: str | Path, force: bool = False, budget: int | None = None,
                  progress: bool = True, executor: dict[str, Any] | None = None) -> dict[str, Any] | None:
    store = RunStore.open(run_dir)
    cfg = with_overrides(store.config(), budget=budget, executor=executor)
    return run_search(cfg, store.dir, force=force, progress=progress)


def with_overrides(cfg: RunConfig, source: str = "command line", **changes: Any) -> RunConfig:
    """``cfg`` with command-line values (None: keep) validated like the config's own:
    ``--budget 0`` is an error, not a no-op. ``executor`` is a dict of executor fields."""
    data = cfg.model_dump()
    for key, value in changes.items():
        if value is None or value == {}:
            continue
        data[key] = {**data[key], **value} if key == "executor" else value
    return parse_config(data, source)
