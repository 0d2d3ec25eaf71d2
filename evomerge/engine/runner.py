"""Starting and resuming runs with a progress bar: what `evomerge run` / `resume` call.

Besides the search itself: the run records what its model references resolved to
(``models.json``: Hub ids with their commit hash; a resumed run reuses them), the progress
bar shows evaluations/s and an ETA, and experiment loggers (TensorBoard by default when
installed; see :mod:`evomerge.tracking`) receive every finished candidate.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import RunConfig, parse_config
from .executor import WorkersLostError
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
    # Build (and so validate) everything before the run directory exists, the workers
    # included (backend construction, devices, cluster connection): a config that cannot
    # start leaves nothing behind that a corrected config would collide with.
    # An existing run is locked (and checked) first, so a second process stops before it
    # builds any worker.
    search = Search(cfg, store=None, pins=read_pins(run_dir))
    store = None
    try:
        search.executor.connect()  # a Ray cluster that cannot be joined fails here, in one line
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
    store.write_json(MODELS_FILE, pins_of(search.resolved))
    feed = RunLogFeed(store.dir, trackers, cfg.name, cfg.model_dump(mode="json"))
    feed.sync(emit=False)  # a resumed run: its old records were logged when they were made
    try:
        best = _search(search, cfg, progress, feed)
        if cfg.selection.enabled and search.told >= cfg.budget and (
                best is not None or search.best_baseline is not None):
            _select(store.dir, progress)
        return best
    except WorkersLostError as err:
        raise WorkersLostError(f"{err}; the run is saved: `evomerge resume {store.dir}` "
                               "continues it") from None
    finally:
        feed.sync()
        feed.close()
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


def _search(search: Search, cfg: RunConfig, progress: bool, feed: Any) -> dict[str, Any] | None:
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
            bar.update(task, completed=s.told, best=progress_text(s), rate=meter.rate_text(),
                       eta=meter.eta_text())

        search.on_progress = update
        return search.run()


def resume_search(run_dir: str | Path, force: bool = False, budget: int | None = None,
                  progress: bool = True, executor: dict[str, Any] | None = None,
                  loggers: list[str] | None = None) -> dict[str, Any] | None:
    store = RunStore.open(run_dir)
    cfg = with_overrides(store.config(), budget=budget, executor=executor)
    return run_search(cfg, store.dir, force=force, progress=progress, loggers=loggers)


def with_overrides(cfg: RunConfig, source: str = "command line", **changes: Any) -> RunConfig:
    """``cfg`` with command-line values (None: keep) validated like the config's own:
    ``--budget 0`` is an error, not a no-op. ``executor`` is a dict of executor fields."""
    data = cfg.model_dump()
    for key, value in changes.items():
        if value is None or value == {}:
            continue
        data[key] = {**data[key], **value} if key == "executor" else value
    return parse_config(data, source)
