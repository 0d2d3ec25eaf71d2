"""The search loop: the one place that knows spaces, optimizers, executors and the store.

One candidate's way through it::

    optimizer.ask -> Candidate(id, genome)          checkpoint (optimizer state + pending)
    space.decode(genome) -> recipe -> MergePlan     plan.hash() -> cached result?
    executor.submit(id, plan) ... poll -> Outcome   per-example scores per task
    log record appended (fsynced)                   optimizer.tell(Result)
    checkpoint                                      best.json

Exactness on resume: the checkpoint always reflects the optimizer after its last ask or
tell; records in the log whose candidate is still pending in the checkpoint are replayed as
tells in log order; the remaining pending candidates are dispatched again unchanged (same
ids, same genomes). With a deterministic executor order (local, or a generational optimizer)
the resumed run therefore makes the same candidates and ends with the same result.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from ..config import RunConfig
from ..errors import ConfigError, EvomergeError, RunError
from ..optim import FAILED_FITNESS, Candidate, Result, make_optimizer
from ..optim.base import optimizer_class, optimizer_trait
from ..optim.state import from_jsonable, to_jsonable
from ..spaces import make_space
from .evaluator import EvalSpec, Outcome
from .executor import Executor, LocalExecutor
from .faults import maybe_crash
from .models import resolve_models_full
from .objectives import Objectives
from .store import RunStore
from .tasks_info import TaskInfo


def make_executor(cfg: Any) -> Executor:
    """The executor an ExecutorConfig names ("local" or "ray").

    Lives here, not in executor.py, so that executor.py never imports ray_executor.py
    (which subclasses Executor): the arrow runs one way.
    """
    if cfg.name == "local":
        return LocalExecutor(cfg.max_inflight)
    from .ray_executor import RayExecutor

    return RayExecutor(cfg)


class Search:
    """One evolutionary merge run: the space, tasks, objectives and optimizer built from a
    config, driven by :meth:`run` through an executor, with every evaluation stored in the run
    directory so an interrupted run resumes where it stopped.

    Args:
        cfg: the validated run config.
        store: the run directory, or None for a run that writes nothing.
        executor: evaluates candidates (default: built from ``cfg.executor``).
        on_progress: called after each evaluation.
        pins: Hub model ids pinned to commits (from an earlier run of this directory).

    Raises:
        ConfigError: the config cannot run (e.g. racing with an optimizer that needs every
            example's score).
    """

    def __init__(self, cfg: RunConfig, store: RunStore | None, executor: Executor | None = None,
                 on_progress: Callable[[Search], None] | None = None,
                 pins: dict[str, Any] | None = None):
        self.cfg = cfg
        self.store = store
        self.resolved = resolve_models_full(cfg.models, pins)  # Hub ids at a commit
        self.models = {k: r.path for k, r in self.resolved.items()}
        self.space = make_space(cfg.space, self.models, cfg.base_model, seed=cfg.seed, dtype=cfg.dtype)
        self.tasks = TaskInfo.load(cfg.tasks, validation_fraction=cfg.selection.validation_fraction or None)
        self.objectives = Objectives.build(cfg.objectives, self.tasks.names, self.tasks.weights)
        self.optimizer = build_optimizer(cfg, self.space, self.objectives.m)
        if cfg.racing.enabled and optimizer_trait(cfg.optimizer.name, "needs_per_example"):
            raise ConfigError(f"racing.enabled: {cfg.optimizer.name} needs every example's "
                              "score; turn racing off")
        if cfg.racing.enabled:
            from ..fitness.racing import refuse_unbounded

            refuse_unbounded(self.tasks.unbounded)
        # fail fast on a space/recipe that cannot compile at all
        self.space.plan(self.space.initial()).validate()
        self.backend_spec = _backend_spec(cfg, self.space)  # the space may refuse the backend
        self.executor = executor or make_executor(cfg.executor)
        self.on_progress = on_progress
        self.pending: dict[int, Candidate] = {}
        self.told = 0
        self.cache: dict[str, dict[str, Any]] = {}  # plan hash -> record with scores
        self.waiting: dict[str, list[int]] = {}  # plan hash -> candidate ids awaiting it
        self.submitted: dict[int, tuple[str, dict[str, Any]]] = {}  # id -> (hash, recipe)
        self.best: dict[str, Any] | None = None
        self.started = time.time()
        # untuned merges evaluated first (engine/baselines.py); never told to the optimizer
        self.baselines = self.space.baselines(cfg.baselines.kinds) if cfg.baselines.enabled else []
        self.baseline_records: dict[str, dict[str, Any]] = {}
        self.best_baseline: dict[str, Any] | None = None
        self._restored = False
        self._executor_started = False

    # -- state ------------------------------------------------------------------------
    def checkpoint(self) -> None:
        self.store.save_checkpoint({
            "optimizer": to_jsonable(self.optimizer.state_dict()),
            "pending": [
                {"id": c.id, "genome": c.genome.tolist(), "info": to_jsonable(c.info)}
                for c in self.pending.values()
            ],
            "told": self.told,
        })

    def restore(self) -> None:
        """Rebuild state from checkpoint + log (no-op for a fresh run)."""
        ckpt = self.store.load_checkpoint()
        records = self.store.read_evals(repair=True)
        from .baselines import LOG

        for rec in self.store.read_jsonl(LOG, repair=True):
            self.remember_baseline(rec)
        if ckpt is not None:
            self.optimizer.load_state_dict(from_jsonable(ckpt["optimizer"]))
            self.pending = {
                p["id"]: Candidate(p["id"], np.asarray(p["genome"], dtype=float), from_jsonable(p["info"]))
                for p in ckpt["pending"]
            }
            self.told = int(ckpt["told"])
        elif records:
            raise RunError(f"{self.store.dir}: evaluation log without checkpoint; cannot resume")
        for rec in records:
            self._remember(rec)
            if rec["id"] in self.pending:  # finished after the last checkpoint: replay its tell
                cand = self.pending.pop(rec["id"])
                self.optimizer.tell([self._result(cand.id, rec)])
                self.told += 1
        if records:
            self.checkpoint()
        self._restored = True

    def _remember(self, rec: dict[str, Any]) -> None:
        # a racing cut is a partial estimate: never a cache entry, never the best
        if rec.get("failed") or rec.get("racing_cut"):
            return
        if rec.get("plan_hash"):
            self.cache.setdefault(rec["plan_hash"], rec)
        if self.best is None or rec["fitness"] > self.best["fitness"]:
            self.best = rec

    def _racing_front(self) -> dict[str, Any]:
        """Pareto-aware racing (multi-objective): the complete records' non-dominated
        objective vectors and each objective's tasks; a candidate is cut only when one of
        these dominates its optimistic bound on every objective."""
        from ..pareto import nondominated

        pts = np.array([self.objectives.values(r["scores"]) for r in self.cache.values()
                        if r.get("scores")], dtype=float).reshape(-1, self.objectives.m)
        front = pts[nondominated(pts)] if len(pts) else pts
        return {"front": front.tolist(), "groups": [list(g) for g in self.objectives.groups]}

    def remember_baseline(self, rec: dict[str, Any]) -> None:
        self.baseline_records[rec["baseline"]] = rec
        if rec.get("failed"):
            return
        if rec.get("plan_hash"):
            self.cache.setdefault(rec["plan_hash"], rec)
        if self.best_baseline is None or rec["fitness"] > self.best_baseline["fitness"]:
            self.best_baseline = rec

    def _result(self, cid: int, rec: dict[str, Any]) -> Result:
        per_example = None
        if rec.get("per_example"):
            per_example = np.concatenate([np.asarray(rec["per_example"][t], dtype=float)
                                          for t in self.tasks.names])
        objectives = None
        if not rec.get("failed") and not rec.get("racing_cut") and rec.get("scores"):
            objectives = self.objectives.values(rec["scores"])
        return Result(cid, float(rec["fitness"]), per_example, bool(rec.get("failed")),
                      objectives)

    # -- the loop ----------------------------------------------------------------------
    def start(self) -> None:
        """Build the workers (backend construction, cluster connection): a run calls this
        before its directory exists, so a start that fails leaves nothing behind."""
        if self._executor_started:
            return
        from .tasks_info import task_entries

        spec = EvalSpec(
            model_dir=self.models[self.cfg.base_model or next(iter(self.models))],
            tasks=task_entries(self.cfg),
            backend=self.backend_spec,
            num_threads=self.cfg.executor.num_threads,
            racing=self.cfg.racing.model_dump() if self.cfg.racing.enabled else None,
        )
        self.executor.start(spec)
        self._executor_started = True

    def run(self) -> dict[str, Any] | None:
        try:
            if not self._restored:
                self.restore()  # an incompatible optimizer state fails here, before any write
            if self.store.pending_config is not None:  # a --force change: written only now
                self.store.commit_config(self.store.pending_config)
                self.store.pending_config = None
            from .baselines import run_baselines
            from .tasks_info import split_record

            self.store.write_json("splits.json", split_record(self.cfg))
            self.start()
            run_baselines(self)
            for cand in list(self.pending.values()):
                self._dispatch(cand)
            while self.told < self.cfg.budget:
                asked = self._fill()
                if self.told >= self.cfg.budget:
                    break
                if not asked and self.executor.in_flight == 0 and not self.pending:
                    raise RunError("optimizer asked for no candidates and none are in flight")
                for cid, outcome in self.executor.poll(timeout=1.0):
                    self._finish(cid, outcome)
            self.store.write_json("executor_stats.json", self.executor.stats())
        finally:
            self.executor.close()
        return self.best

    def _fill(self) -> int:
        """Ask for as many candidates as the executor has room for; returns how many."""
        room = self.executor.capacity - self.executor.in_flight
        left = self.cfg.budget - self.told - len(self.pending)
        n = min(room, left)
        if n <= 0:
            return 0
        cands = self.optimizer.ask(n)
        if not cands:
            return 0
        for c in cands:
            self.pending[c.id] = c
        self.checkpoint()
        maybe_crash("after_ask")
        for c in cands:
            self._dispatch(c)
        return len(cands)

    def _dispatch(self, cand: Candidate) -> None:
        try:
            recipe = self.space.decode(cand.genome)
            plan = self.space.compile_decoded(recipe)
        except EvomergeError as err:  # a genome that does not compile is a failed candidate
            self.submitted[cand.id] = ("", {})
            self._finish(cand.id, Outcome(None, 0.0, f"compile: {err}"))
            return
        h = plan.hash()
        self.submitted[cand.id] = (h, recipe)
        if h in self.cache:
            self._finish(cand.id, None, cached=self.cache[h])
        elif h in self.waiting:
            self.waiting[h].append(cand.id)
        else:
            self.waiting[h] = []
            context = {"best": self.best["fitness"] if self.best else None}
            if (self.cfg.racing.enabled and self.best is not None and self.objectives.m > 1
                    and getattr(self.optimizer, "multi_objective", False)):
                context.update(self._racing_front())
            self.executor.submit(cand.id, plan, context)

    def _finish(self, cid: int, outcome: Outcome | None, cached: dict[str, Any] | None = None) -> None:
        cand = self.pending[cid]
        h, recipe = self.submitted.pop(cid)
        if cached is not None:
            scores, seconds, error, worker = cached["per_example"], 0.0, None, "cache"
        else:
            assert outcome is not None
            scores, seconds, error, worker = outcome.scores, outcome.seconds, outcome.error, outcome.worker
        failed = error is not None
        cut = outcome is not None and not failed and not outcome.complete
        if failed:
            means, fitness = {}, FAILED_FITNESS
        elif cut:  # racing: told its partial estimate; per-example rows are incomplete
            means = {t: float(np.nanmean(scores[t])) for t in self.tasks.names}
            fitness, scores = float(outcome.partial_fitness), None
        else:
            means = {t: float(np.mean(scores[t])) for t in self.tasks.names}
            fitness = self.tasks.combine(means) - self.space.fitness_penalty(recipe)
        rec = {
            "id": cid,
            "genome": [float(x) for x in cand.genome],
            "info": to_jsonable(cand.info),
            **outcome_fields(recipe, h, fitness, means, None if failed else scores, failed,
                             error, cached is not None, seconds, worker),
        }
        if outcome is not None and outcome.merge_seconds is not None:
            rec.update(merge_seconds=outcome.merge_seconds, eval_seconds=outcome.eval_seconds)
            if outcome.setup_seconds is not None:
                rec.update(setup_seconds=outcome.setup_seconds)
        if outcome is not None and outcome.total is not None:
            rec.update(racing_cut=cut, examples_evaluated=outcome.evaluated, examples_total=outcome.total)
        self.store.append_eval(rec)
        maybe_crash("after_log")
        del self.pending[cid]
        self.optimizer.tell([self._result(cid, rec)])
        self.told += 1
        self._remember(rec)
        if self.best is rec:
            self.store.write_best(rec)
        self.checkpoint()
        maybe_crash("after_tell")
        if self.on_progress is not None:
            self.on_progress(self)
        # candidates that waited for this plan get the same scores without evaluation
        for other in self.waiting.pop(h, []) if h else []:
            if failed or cut:  # same plan, same (failed or partial) outcome; nothing cached
                self._finish(other, outcome)
            else:
                self._finish(other, None, cached=rec)


def _backend_spec(cfg: RunConfig, space: Any) -> dict[str, Any]:
    """The backend config with the options the space needs (DFS: room for its longest path)."""
    b = cfg.backend.model_dump()
    b["options"] = {**space.backend_options(b.get("name", "hf")), **(b.get("options") or {})}
    return b


def outcome_fields(recipe: dict[str, Any], plan_hash: str, fitness: float, means: dict[str, float],
                   per_example: Any, failed: bool, error: str | None, cached: bool, seconds: float,
                   worker: str) -> dict[str, Any]:
    """The fields every evaluation record shares (evals.jsonl and baselines.jsonl)."""
    return {"recipe": recipe, "plan_hash": plan_hash, "fitness": fitness, "scores": means,
            "per_example": per_example, "failed": failed, "error": error, "cached": cached,
            "seconds": seconds, "worker": worker, "time": time.time()}


def build_optimizer(cfg: RunConfig, space: Any, n_objectives: int | None = None):
    o = cfg.optimizer
    kwargs: dict[str, Any] = dict(
        lower=space.lower, upper=space.upper, x0=space.initial(),
        sigma0=o.sigma0 if o.sigma0 is not None else space.sigma0,
        seed=o.seed if o.seed is not None else cfg.seed,
    )
    if o.popsize is not None:
        kwargs["popsize"] = o.popsize
    cls = optimizer_class(o.name)
    if cls is not None and cls.needs_budget:
        kwargs["budget"] = cfg.budget
    if cls is not None and cls.multi_objective:
        kwargs["n_objectives"] = n_objectives or len(cfg.objectives) or len(cfg.tasks)
    if cls is not None and cls.takes_num_workers:
        # NGOpt's choice of algorithm depends on the budget and the parallelism
        cap = cfg.executor.max_inflight or cfg.executor.workers or 1
        if cap > 1:
            kwargs["num_workers"] = cap
    init = space.initial_population()
    if init is not None and cls is not None and cls.takes_initial_population:
        kwargs["initial"] = init
    kwargs.update(space.optimizer_extras(o.name))
    kwargs.update(o.options)
    return make_optimizer(o.name, **kwargs)


def open_or_create(cfg: RunConfig, run_dir: Any, force: bool = False) -> RunStore:
    """A new run directory, or the existing one for the same config (resumed).

    Nothing in an existing run is written here: a config changed with ``force`` is written
    by :meth:`Search.run` once the saved state loaded into it. A run that never evaluated
    anything (its start failed) takes a corrected config as a fresh start."""
    store = RunStore(run_dir)
    if store.exists():
        store.lock()
        try:
            changes = store.config_changes(cfg)
            if changes and not store.read_evals():
                store.restart(cfg)
            elif changes and not force:
                store.check_config(cfg)  # raises, naming the changed fields
            elif changes or store.config() != cfg:
                store.pending_config = cfg
        except BaseException:
            store.unlock()
            raise
        return store
    return RunStore.create(run_dir, cfg)
