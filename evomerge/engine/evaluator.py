"""Worker-side evaluation: one resident model, a materializer, a backend, the tasks.

An :class:`Evaluator` is built once per worker (in-process for the local executor, inside a
Ray actor for the Ray executor) from a plain-data :class:`EvalSpec`. Per candidate it writes
the MergePlan's weights into the resident model in place and scores every task per example.
Any exception while doing so becomes a failed outcome (the optimizer is told a penalty),
never a crash of the run.
"""

from __future__ import annotations

import gc
import time
import traceback
from dataclasses import asdict, dataclass, field
from typing import Any

from ..plan import MergePlan


@dataclass
class EvalSpec:
    """Everything a worker needs, as plain data (it travels to Ray actors)."""

    model_dir: str  # config + tokenizer of the resident model (the base, or the first source)
    tasks: list[dict[str, Any]]  # [{path, weight}]
    backend: dict[str, Any] = field(default_factory=dict)  # BackendConfig dump
    split: str = "search"
    num_threads: int | None = None
    cache_sources: bool = True
    racing: dict[str, Any] | None = None  # RacingConfig dump when racing is enabled

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Outcome:
    scores: dict[str, list[float]] | None
    seconds: float
    error: str | None = None
    worker: str = "local"
    # racing: a candidate cut early has complete=False, NaN for examples never scored, and
    # its partial estimate in partial_fitness
    complete: bool = True
    partial_fitness: float | None = None
    evaluated: int | None = None
    total: int | None = None
    # the split of ``seconds``: writing the candidate's weights vs scoring it
    merge_seconds: float | None = None
    eval_seconds: float | None = None
    # of merge_seconds, the worker's one-time work that no later candidate repeats (resident
    # task vectors, sorted magnitudes, kernel compiles); None: none this time
    setup_seconds: float | None = None

    @property
    def failed(self) -> bool:
        return self.error is not None


class Evaluator:
    def __init__(self, spec: EvalSpec, worker: str = "local"):
        import torch

        from ..fitness import load_tasks
        from ..fitness.backends import make_backend
        from ..materialize import Materializer

        if spec.num_threads:
            torch.set_num_threads(spec.num_threads)
        self.spec = spec
        self.worker = worker
        b = dict(spec.backend)
        name = b.pop("name", "hf")
        options = b.pop("options", {}) or {}
        self.backend = make_backend(name, model_dir=spec.model_dir, **b, **options)
        # cache_sources: per-worker reuse of everything genome-independent (source tensors,
        # magnitude statistics, resident task vectors, tensors a candidate leaves unchanged)
        self.materializer = Materializer(device=self.backend.device, cache_sources=spec.cache_sources,
                                         precompute=spec.cache_sources, resident=spec.cache_sources)
        self.tasks = load_tasks(spec.tasks)

    def evaluate(self, plan: MergePlan | dict[str, Any], split: str | None = None,
                 context: dict[str, Any] | None = None) -> Outcome:
        """Score one plan. ``context["best"]`` (the best complete fitness so far) turns on
        racing when the spec enables it."""
        t0 = time.perf_counter()
        setup0 = self._setup_clock()
        try:
            if isinstance(plan, dict):
                plan = MergePlan.from_dict(plan)
            self.backend.load_plan(plan, self.materializer)
            t1 = time.perf_counter()
            setup = self._setup_clock() - setup0
            best = (context or {}).get("best")
            if self.spec.racing and best is not None:
                out = self._race(best, split or self.spec.split, t0,
                                 (context or {}).get("front"), (context or {}).get("groups"))
            else:
                raw = self.backend.evaluate(self.tasks, split=split or self.spec.split)
                scores = {k: [float(x) for x in v] for k, v in raw.items()}
                out = Outcome(scores, time.perf_counter() - t0, None, self.worker)
            out.merge_seconds, out.eval_seconds = t1 - t0, out.seconds - (t1 - t0)
            if setup > 0:
                out.setup_seconds = min(setup, out.merge_seconds)
                self._freeze_long_lived()
            return out
        except Exception as err:  # noqa: BLE001 - any failure is a failed candidate
            msg = f"{type(err).__name__}: {err}"
            tb = traceback.format_exc(limit=3)
            return Outcome(None, time.perf_counter() - t0, f"{msg} | {tb.splitlines()[-1]}", self.worker)

    def _setup_clock(self) -> float:
        """Seconds of one-time merge setup this worker's resident writer spent so far."""
        resident = getattr(self.materializer, "resident", None)
        return float(resident.setup_seconds) if resident is not None else 0.0

    def _race(self, best: float, split: str, t0: float, front: Any = None, groups: Any = None) -> Outcome:
        from ..fitness.racing import evaluate_racing

        r = dict(self.spec.racing or {})
        r.pop("enabled", None)
        res = evaluate_racing(self.backend, self.tasks, best, split=split, front=front,
                              groups=groups, **r)
        scores = {k: [float(x) for x in v] for k, v in res.scores.items()}
        return Outcome(scores, time.perf_counter() - t0, None, self.worker, complete=res.complete,
                       partial_fitness=res.fitness, evaluated=res.evaluated, total=res.total)

    def _freeze_long_lived(self) -> None:
        """After the worker's one-time setup, move every live object (the model, torch's
        and the compiler's modules, the per-worker caches: ~400k objects on the SmolLM2
        demo) out of the cyclic collector's reach: its full collections walked them all,
        0.24-0.30 s every ~14 candidates (one merge in 14 took twice as long, ~7% of the
        merge time on average); after the freeze they take ~1 ms. Garbage is collected
        first, so none is frozen; frozen objects are still freed by reference counting,
        and :meth:`close` gives the rest back to the collector."""
        gc.collect()
        gc.freeze()
        self._frozen = True

    def close(self) -> None:
        if getattr(self, "_frozen", False):
            gc.unfreeze()
            self._frozen = False
        self.backend.close()
