"""Ray executor: asynchronous, fault-tolerant evaluation on a local embedded Ray or a cluster.

- Joins ``address`` when given (``auto``, ``host:port``, ``ray://host:port``, with Ray's token
  auth); otherwise starts a private local Ray in this process, never a cluster the machine has
  running or recorded (no dashboard, capped object store: NOTES.md). See :mod:`.ray_connect`.
- A local node that dies under the driver (raylet killed) stops the run with one line
  (:class:`.ray_connect.NodeWatch`); the checkpoint keeps it resumable.
- One :class:`EvalWorker` actor per worker. Each builds one :class:`Evaluator`: it loads the
  source models from paths visible on its node and keeps one resident evaluation model; per
  candidate it materializes the plan in place and runs the backend. One GPU per worker when
  the cluster has GPUs (``gpus_per_worker`` may be fractional), CPU workers otherwise; the
  worker count follows the cluster's resources unless set.
- Steady-state dispatch: each worker has at most one candidate; the rest wait in a driver
  queue; ``poll`` returns results as they finish, so a worker never waits for a generation
  barrier of the executor (only a generational optimizer itself can make it wait).
- Faults: a worker whose actor dies (ray.kill, SIGKILL, OOM, node lost) is replaced by a new
  actor and its candidate re-queued; results are keyed by candidate id and a candidate is in
  flight on at most one worker, so a retry never counts twice. After ``max_failures``
  retries a candidate comes back as a failed Outcome and the run goes on.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from ..plan import MergePlan
from .evaluator import EvalSpec, Evaluator, Outcome
from .executor import Executor
from .ray_connect import NodeWatch, join, start_local


class EvalWorker:
    """The actor body (wrapped with ``ray.remote`` at start-up)."""

    def __init__(self, spec: dict[str, Any], name: str):
        self.name = name
        self.evaluator = Evaluator(EvalSpec(**spec), worker=name)

    def evaluate(self, plan: dict[str, Any], context: dict[str, Any] | None = None) -> Outcome:
        return self.evaluator.evaluate(plan, context=context)

    def pid(self) -> int:
        return os.getpid()

    def node(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def ready(self) -> bool:
        return True


@dataclass
class _Slot:
    name: str
    actor: Any
    busy_s: float = 0.0
    evaluations: int = 0
    replaced: int = 0
    pid: int | None = None
    node: Any = None  # ObjectRef, then the Ray node id this slot's actor runs on
    nodes: list[str] = field(default_factory=list)  # every node its actors ran on
    job: tuple[int, dict[str, Any], dict[str, Any] | None] | None = None
    ref: Any = None
    started: float = 0.0


@dataclass
class _Stats:
    failures: int = 0
    replacements: int = 0
    dispatch_s: list[float] = field(default_factory=list)


class RayExecutor(Executor):
    def __init__(self, cfg: Any):
        self.cfg = cfg
        self.slots: list[_Slot] = []
        self.queue: deque[tuple[int, dict[str, Any], dict[str, Any] | None]] = deque()
        self.attempts: dict[int, int] = {}
        self.stats_ = _Stats()
        self._t0 = time.perf_counter()
        self._started_ray = False
        self._remote_cls: Any = None
        self._spec: dict[str, Any] | None = None
        self._serial = 0
        self._watch: NodeWatch | None = None

    # -- lifecycle -----------------------------------------------------------------------
    def connect(self) -> None:
        """Start the private local Ray, or join ``cfg.address`` (see :mod:`.ray_connect`); one
        line naming the fix when a cluster cannot be joined. Idempotent."""
        import ray

        if ray.is_initialized():
            if self._watch is None:
                self._watch = NodeWatch()
            return
        if self.cfg.address:
            join(self.cfg.address)
        else:
            start_local(int(os.environ.get("EVOMERGE_RAY_STORE_BYTES", 256 * 2**20)),
                        self.cfg.workers or None)
            self._started_ray = True
        self._watch = NodeWatch()

    def start(self, spec: EvalSpec) -> None:
        import ray

        self.connect()
        res = ray.cluster_resources()
        gpus = float(res.get("GPU", 0))
        per_gpu = self.cfg.gpus_per_worker if self.cfg.gpus_per_worker is not None else (1.0 if gpus else 0.0)
        n = self.cfg.workers or (int(gpus / per_gpu) if per_gpu else int(res.get("CPU", 1)))
        n = max(1, n)
        threads = self.cfg.num_threads or 1
        spec_d = spec.to_dict()
        spec_d["num_threads"] = spec.num_threads or threads
        self._spec = spec_d
        self._remote_cls = ray.remote(num_cpus=1 if not per_gpu else 0, num_gpus=per_gpu or 0,
                                      max_restarts=0)(EvalWorker)
        self.slots = [self._new_slot(f"ray-{i}") for i in range(n)]
        # wait for every actor's __init__ (model loading) before timing starts
        for s, pid in zip(self.slots, ray.get([s.actor.pid.remote() for s in self.slots])):
            s.pid = pid
        self._t0 = time.perf_counter()

    def _new_slot(self, name: str) -> _Slot:
        self._serial += 1
        actor = self._remote_cls.options(name=None).remote(self._spec, name)
        return _Slot(name=name, actor=actor, node=actor.node.remote())

    def close(self) -> None:
        import ray

        lost = self._watch is not None and self._watch.lost is not None
        for s in ([] if lost else self.slots):
            try:
                ray.kill(s.actor)
            except Exception:  # noqa: BLE001 - already dead
                pass
        self.slots = []
        if self._started_ray and ray.is_initialized():
            ray.shutdown()

    # -- dispatch ------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        return self.cfg.max_inflight or len(self.slots)

    @property
    def in_flight(self) -> int:
        return len(self.queue) + sum(1 for s in self.slots if s.job is not None)

    def submit(self, cid: int, plan: MergePlan | dict[str, Any],
               context: dict[str, Any] | None = None) -> None:
        if isinstance(plan, MergePlan):  # the process boundary: actors get plain data
            plan = plan.to_dict()
        self.queue.append((cid, plan, context))
        self._assign()

    def _assign(self) -> None:
        for s in self.slots:
            if s.job is None and self.queue:
                t = time.perf_counter()
                s.job = self.queue.popleft()
                s.ref = s.actor.evaluate.remote(s.job[1], s.job[2])
                s.started = time.perf_counter()
                self.stats_.dispatch_s.append(s.started - t)

    def poll(self, timeout: float | None = None) -> list[tuple[int, Outcome]]:
        import ray

        self._assign()
        refs = [s.ref for s in self.slots if s.job is not None]
        if not refs:
            return []
        # wait for the first result (up to the timeout), then take every other finished one
        done, rest = ray.wait(refs, num_returns=1, timeout=timeout)
        if self._watch is not None:
            self._watch.check()  # a dead node under the driver: one line, the run stays resumable
        if done and rest:
            more, _ = ray.wait(rest, num_returns=len(rest), timeout=0)
            done += more
        done_set = set(done)
        out: list[tuple[int, Outcome]] = []
        for s in self.slots:
            if s.job is None or s.ref not in done_set:
                continue
            cid = s.job[0]
            try:
                outcome = ray.get(s.ref)
            except (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.ObjectLostError) as err:
                job = s.job
                self._replace(s)
                result = self._retry_or_fail(job, err)
                if result is not None:
                    out.append((cid, result))
                continue
            s.busy_s += outcome.seconds
            s.evaluations += 1
            s.job, s.ref = None, None
            self.attempts.pop(cid, None)
            out.append((cid, outcome))
        self._assign()
        return out

    def _replace(self, slot: _Slot) -> None:
        import ray

        try:
            ray.kill(slot.actor)
        except Exception:  # noqa: BLE001 - it is dead already
            pass
        self.stats_.replacements += 1
        fresh = self._new_slot(slot.name)
        self._node_of(slot, timeout=0)  # known already, or never known: do not wait on the dead
        slot.actor, slot.pid, slot.node = fresh.actor, None, fresh.node
        slot.replaced += 1
        slot.job, slot.ref = None, None

    def _retry_or_fail(self, job: tuple[int, dict[str, Any], dict[str, Any] | None],
                       err: Exception) -> Outcome | None:
        cid = job[0]
        self.stats_.failures += 1
        n = self.attempts.get(cid, 0) + 1
        self.attempts[cid] = n
        if n > self.cfg.max_failures:
            self.attempts.pop(cid, None)
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            return Outcome(None, 0.0, f"worker lost {n} times: {type(err).__name__}: {first}", "ray")
        self.queue.appendleft(job)  # same candidate, same plan, first in line
        return None

    # -- reporting -----------------------------------------------------------------------
    def _node_of(self, slot: _Slot, timeout: float = 10) -> str | None:
        """The node id of the slot's current actor (None when it never came up)."""
        import ray

        if slot.node is not None and not isinstance(slot.node, str):
            try:
                slot.node = ray.get(slot.node, timeout=timeout)
            except Exception:  # noqa: BLE001 - a dead actor has no node to report
                slot.node = None
        if isinstance(slot.node, str) and slot.node not in slot.nodes:
            slot.nodes.append(slot.node)
        return slot.node

    def stats(self) -> dict[str, Any]:
        lost = self._watch is not None and self._watch.lost is not None
        for s in ([] if lost else self.slots):
            self._node_of(s)
        wall = time.perf_counter() - self._t0
        d = self.stats_.dispatch_s
        return {
            "workers": {
                s.name: {"busy_s": s.busy_s, "evaluations": s.evaluations, "replaced": s.replaced,
                         "utilisation": s.busy_s / wall if wall > 0 else 0.0, "nodes": s.nodes}
                for s in self.slots
            },
            "wall_s": wall,
            "failures": self.stats_.failures,
            "replacements": self.stats_.replacements,
            "dispatch_ms_mean": 1000 * sum(d) / len(d) if d else None,
        }
