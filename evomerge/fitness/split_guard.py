"""Guard against tuning on a benchmark's held-out split.

A run's ``report_tasks`` are held out: they are reported, never searched on. If a search
task's ``search`` split reads the very data a report task names, the reported number is a
tuned one (the classic mistake of searching on a benchmark's test split). The run config
refuses that unless ``allow_tuning_on_report_split: true``.

What "the same data" means, read from the task YAMLs only (cheap: no dataset is loaded,
lm-eval is not imported):

- an evomerge task's search split is its ``data`` file (resolved to an absolute path);
  a report task names its ``data`` and ``heldout_data`` files;
- an lm-eval wrapper (``scoring: lm_eval``) searches ``(lm_eval_task, split)``; a report
  wrapper names ``(lm_eval_task, split)`` and ``(lm_eval_task, heldout_split)``. The
  include path is not compared: the same task name and split is taken as the same
  benchmark split.

A report task lists everything it may be scored on, so listing a search task itself as a
report task is refused too.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError


def split_sources(path: str | Path) -> dict[str, str]:
    """evomerge split -> a description of the data it reads, for one task YAML.

    Returns ``{}`` for a file that cannot be read or parsed: loading the task reports
    that with its own one-line error later.
    """
    p = Path(path).expanduser()
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        return {}
    if not isinstance(raw, dict):
        return {}
    if raw.get("scoring") == "lm_eval":
        task = raw.get("lm_eval_task")
        if not isinstance(task, str):
            return {}
        fields = {"search": raw.get("split"), "heldout": raw.get("heldout_split")}
        return {k: f"lm-eval task {task!r} split {v!r}" for k, v in fields.items() if isinstance(v, str)}
    fields = {"search": raw.get("data"), "heldout": raw.get("heldout_data")}
    out = {}
    for split, rel in fields.items():
        if isinstance(rel, str) and rel:
            f = Path(rel).expanduser()
            f = f if f.is_absolute() else p.parent / f
            out[split] = f"data file {f.resolve()}"
    return out


def check_report_splits(tasks: Sequence[Any], report_tasks: Sequence[Any]) -> None:
    """ConfigError naming both entries when a search task's search split is data that a
    report task names. ``tasks``/``report_tasks``: objects with a ``path`` (TaskRef)."""
    if not report_tasks:
        return
    searched: dict[str, int] = {}
    for i, ref in enumerate(tasks):
        src = split_sources(ref.path).get("search")
        if src is not None:
            searched.setdefault(src, i)
    for j, ref in enumerate(report_tasks):
        for src in split_sources(ref.path).values():
            if src in searched:
                i = searched[src]
                raise ConfigError(
                    f"tasks[{i}] ({tasks[i].path}) searches on {src}, which report_tasks[{j}] "
                    f"({ref.path}) holds out for reporting: the report would be tuned on; use "
                    "another split for the search, or set allow_tuning_on_report_split: true to force"
                )
