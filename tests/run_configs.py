"""The run config the search tests build on the test zoo (shared by test modules)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TASKS = [
    {"path": str(ROOT / "fitness/zoo/cipher_a.yaml"), "weight": 1.0},
    {"path": str(ROOT / "fitness/zoo/cipher_b.yaml"), "weight": 1.0},
]


def zoo_run_config(zoo: Any, **over: Any) -> dict[str, Any]:
    """Task arithmetic over the test zoo's experts, 2 layer groups, CMA-ES (popsize 4),
    8 evaluations of cipher_a + cipher_b, local executor; ``over`` replaces top-level keys."""
    d = {
        "name": "t",
        "models": {"base": str(zoo.base.path), **{m.name: str(m.path) for m in zoo.experts}},
        "base_model": "base",
        "space": {"type": "parameter", "method": "task_arithmetic", "layer_groups": 2,
                  "params": {"weight": {"low": 0.0, "high": 1.5, "init": 1.0}}},
        "optimizer": {"name": "cma", "popsize": 4},
        "budget": 8,
        "tasks": TASKS,
        "backend": {"batch_size": 256, "options": {}},
        "executor": {"name": "local", "num_threads": 1},
    }
    d.update(over)
    return d


def read_log(run_dir: Any) -> list[dict[str, Any]]:
    """The evaluation records of a run directory, in order."""
    from evomerge.engine.store import RunStore

    return RunStore(run_dir).read_evals()


def run_cli(args: list[str], env: dict[str, str] | None = None, cwd: Any = None) -> subprocess.CompletedProcess:
    """``python -m evomerge.cli ARGS`` in a fresh process (one torch thread), output captured."""
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], env=e, cwd=cwd,
                          capture_output=True, text=True, timeout=600)
