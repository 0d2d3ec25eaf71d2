"""Starting and resuming runs with a progress bar: what `evomerge run` / `resume` call.

Besides the search itself: the run records what its model references resolved to
(``models.json``: Hub ids with their commit hash; a resumed run reuses them), the progress
bar shows evaluations/s and an ETA, and experiment loggers (TensorBoard by default when
installed; see :mod:`evomerge.tracking`) receive every finished candidate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import RunConfig
from .models import MODELS_FILE, pins_of, read_pins
from .progress import RateMeter
from .report import format_fitness
from .search import Search, open_or_create
from .store import RunStore


def run_search(cfg: RunConfig, run_dir: str | Path, force: bool = False,
               progress: bool = True, loggers: list[str] | None = None) -> dict[str, Any] | None:
    """Run (or continue) the search of ``cfg`` in ``run_dir``. ``loggers``: tracker names
    (``tensorboard``, ``wandb``, ``mlflow``; ``["none"]`` for none); None: the default."""
    from ..tracking import RunLogFeed, make_loggers

    trackers = make_loggers(loggers)  # fail on an unknown or missing tracker before any work
    # Build (and so validate) everything before the run directory exists: a config that
    # cannot start leaves nothing behind that a corrected config would collide with.
    search = Search(cfg, store=None, pins=read_pins(run_dir))
    store = open_or_create(cfg, run_dir, force=force)
    search.store = store
    store.write_json(MODELS_FILE, pins_of(search.resolved))
    feed = RunLogFeed(store.dir, trackers, cfg.name, cfg.model_dump(mode="json"))
    feed.sync(emit=False)  # a resumed run: its old records were logged when they were made
    try:
        if not progress:
            search.on_progress = lambda s: feed.sync()
            return search.run()
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        meter = RateMeter(cfg.budget)
        with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                      TimeElapsedColumn(), TextColumn("{task.fields[rate]}"),
                      TextColumn("{task.fields[eta]}"), TextColumn("{task.fields[best]}")) as bar:
            task = bar.add_task(cfg.name, total=cfg.budget, best="", rate="", eta="ETA -")

            def update(s: Search) -> None:
                feed.sync()
                meter.update(s.told)
                best = f"best {format_fitness(s.best['fitness'])}" if s.best else ""
                bar.update(task, completed=s.told, best=best, rate=meter.rate_text(),
                           eta=meter.eta_text())

            search.on_progress = update
            return search.run()
    finally:
        feed.sync()
        feed.close()
        store.unlock()


def resume_search(run_dir: str | Path, force: bool = False, budget: int | None = None,
                  progress: bool = True, executor: dict[str, Any] | None = None,
                  loggers: list[str] | None = None) -> dict[str, Any] | None:
    store = RunStore.open(run_dir)
    cfg = store.config()
    changes: dict[str, Any] = {}
    if budget is not None:
        changes["budget"] = budget
    if executor:
        changes["executor"] = cfg.executor.model_copy(update=executor)
    if changes:
        cfg = cfg.model_copy(update=changes)
    return run_search(cfg, store.dir, force=force, progress=progress, loggers=loggers)
