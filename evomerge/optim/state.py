"""Plain-data state for optimizers: RNG state, JSON conversion, candidate bookkeeping, replay.

Every optimizer's ``state_dict()`` is plain data (dicts with string keys, lists, numbers,
strings, booleans, ``None`` and numpy arrays) so a checkpoint never needs pickle. This module
holds the pieces the optimizers share:

- :func:`rng_state` / :func:`set_rng_state`: a numpy ``Generator``'s exact state as plain
  data (the 128-bit integers are kept as decimal strings so any JSON reader keeps them exact).
- :func:`to_jsonable` / :func:`from_jsonable`: a lossless round trip of such state through
  JSON (``json.dumps(..., allow_nan=False)`` accepts the output). Arrays keep dtype and shape;
  float64 values survive exactly (Python writes the shortest repr that reads back to the same
  double); NaN and infinities are tagged instead of written as non-standard JSON.
- :class:`CandidateBook`: ids, pending candidates and the best told result, which every
  optimizer needs and which must survive a checkpoint.
- :class:`ReplayLog`: the ordered asks and tells an optimizer received, so that a library
  object that cannot be serialized without pickle (cma's ``CMAEvolutionStrategy``, any
  nevergrad optimizer) is rebuilt by replaying them from the same seed. Each ask is checked
  against a digest of the genomes it produced the first time, so nondeterminism (or a changed
  library version) is reported instead of silently giving a different run.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from .base import Candidate, Optimizer, Result, effective_fitness, is_failed

# --------------------------------------------------------------------------- RNG state


def rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """The exact state of ``rng`` as plain data (big integers as decimal strings)."""
    return _ints_to_str(rng.bit_generator.state)


def set_rng_state(rng: np.random.Generator, state: dict[str, Any]) -> None:
    """Restore a state produced by :func:`rng_state` (same bit generator kind)."""
    state = _str_to_ints(state)
    kind = type(rng.bit_generator).__name__
    if state.get("bit_generator") != kind:
        raise ValueError(f"RNG state is for {state.get('bit_generator')!r}, generator is {kind!r}")
    rng.bit_generator.state = state


def _ints_to_str(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _ints_to_str(v) for k, v in obj.items()}
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return str(int(obj))
    if isinstance(obj, np.ndarray):  # e.g. MT19937 key
        return {"__uint_array__": [str(int(v)) for v in obj], "dtype": str(obj.dtype)}
    return obj


def _str_to_ints(obj: Any) -> Any:
    if isinstance(obj, dict):
        if "__uint_array__" in obj:
            return np.array([int(v) for v in obj["__uint_array__"]], dtype=obj["dtype"])
        return {k: _str_to_ints(v) for k, v in obj.items()}
    if isinstance(obj, str) and obj.lstrip("-").isdigit():
        return int(obj)
    return obj


# --------------------------------------------------------------------------- JSON


_ND = "__ndarray__"
_FLOAT = "__float__"


def to_jsonable(obj: Any) -> Any:
    """Convert plain state (with numpy arrays/scalars) to values ``json.dumps`` writes exactly.

    Arrays become ``{"__ndarray__": nested lists, "dtype": ..., "shape": [...]}``; numpy
    scalars become Python numbers; tuples become lists; non-finite floats become
    ``{"__float__": "nan" | "inf" | "-inf"}``. Dict keys must be strings.
    """
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"state dict keys must be strings, got {k!r}")
            out[k] = to_jsonable(v)
        return out
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind not in "biuf":
            raise TypeError(f"cannot store arrays of dtype {obj.dtype} in state")
        data = obj.tolist()
        if obj.dtype.kind == "f" and not np.all(np.isfinite(obj)):
            data = _tag_nonfinite(data)
        return {_ND: data, "dtype": obj.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        return f if math.isfinite(f) else {_FLOAT: repr(f)}
    if obj is None or isinstance(obj, str):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in optimizer state (plain data only)")


def from_jsonable(obj: Any) -> Any:
    """Inverse of :func:`to_jsonable`: arrays come back with their dtype and shape."""
    if isinstance(obj, dict):
        if _ND in obj:
            data = _untag_nonfinite(obj[_ND])
            return np.array(data, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"])
        if _FLOAT in obj and len(obj) == 1:
            return float(obj[_FLOAT])
        return {k: from_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_jsonable(v) for v in obj]
    return obj


def _tag_nonfinite(data: Any) -> Any:
    if isinstance(data, list):
        return [_tag_nonfinite(v) for v in data]
    return data if math.isfinite(data) else repr(float(data))


def _untag_nonfinite(data: Any) -> Any:
    if isinstance(data, list):
        return [_untag_nonfinite(v) for v in data]
    return float(data) if isinstance(data, str) else data


def as_array(value: Any, dtype: Any = float) -> np.ndarray:
    """A state field back as an array, whether it arrives as an array or as a list."""
    return np.asarray(value, dtype=dtype)


# --------------------------------------------------------------------------- bookkeeping


@dataclass
class Told:
    """One settled result as the optimizer sees it (penalty already applied)."""

    id: int
    fitness: float
    failed: bool


class CandidateBook:
    """Ids, pending candidates and the best told result of one optimizer.

    Ids are issued in increasing order starting at 0. A candidate stays *pending* from its ask
    until its tell; pending genomes are part of the state, so after a checkpoint the engine can
    re-dispatch them under the same ids and the optimizer accepts their later tells.
    ``best`` is the best non-failed told result (``None`` until one exists).
    """

    def __init__(self) -> None:
        self.next_id = 0
        self.pending: dict[int, Candidate] = {}
        self.n_told = 0
        self.n_failed = 0
        self.best_genome: np.ndarray | None = None
        self.best_fitness: float | None = None
        self.best_id: int | None = None

    def issue(self, genome: np.ndarray, info: dict[str, Any] | None = None) -> Candidate:
        cand = Candidate(self.next_id, np.array(genome, dtype=float), dict(info or {}))
        self.pending[cand.id] = cand
        self.next_id += 1
        return cand

    def check(self, results: list[Result]) -> None:
        """Refuse (before changing anything) ids that are unknown, already told or repeated."""
        seen: set[int] = set()
        for r in results:
            rid = int(r.id)
            if rid in seen:
                raise ValueError(f"candidate {rid} is told twice in one tell()")
            seen.add(rid)
            if rid not in self.pending:
                what = "was already told" if 0 <= rid < self.next_id else "was never asked"
                raise ValueError(f"candidate {rid} {what}; tell() takes pending candidates only")

    def settle(self, results: list[Result]) -> list[Told]:
        """Remove told candidates from pending, apply the failure penalty, update the best."""
        self.check(results)
        return [self.settle_one(int(r.id), effective_fitness(r), is_failed(r)) for r in results]

    def settle_one(self, cid: int, fitness: float, failed: bool) -> Told:
        cand = self.pending.pop(cid)
        self.n_told += 1
        if failed:
            self.n_failed += 1
        elif self.best_fitness is None or fitness > self.best_fitness:
            self.best_genome, self.best_fitness, self.best_id = cand.genome.copy(), fitness, cid
        return Told(cid, fitness, failed)

    def best(self) -> tuple[np.ndarray, float] | None:
        if self.best_genome is None or self.best_fitness is None:
            return None
        return self.best_genome.copy(), float(self.best_fitness)

    def state_dict(self) -> dict[str, Any]:
        ids = sorted(self.pending)
        return {
            "next_id": self.next_id,
            "pending_ids": ids,
            "pending_genomes": np.array([self.pending[i].genome for i in ids], dtype=float),
            "pending_info": [dict(self.pending[i].info) for i in ids],
            "n_told": self.n_told,
            "n_failed": self.n_failed,
            "best_id": self.best_id,
            "best_genome": None if self.best_genome is None else self.best_genome.copy(),
            "best_fitness": self.best_fitness,
        }

    def load_state_dict(self, state: dict[str, Any], dim: int) -> None:
        self.next_id = int(state["next_id"])
        genomes = as_array(state["pending_genomes"]).reshape(-1, dim)
        self.pending = {
            int(i): Candidate(int(i), genomes[k].copy(), dict(info))
            for k, (i, info) in enumerate(zip(state["pending_ids"], state["pending_info"]))
        }
        self.n_told = int(state["n_told"])
        self.n_failed = int(state["n_failed"])
        self.best_id = None if state["best_id"] is None else int(state["best_id"])
        self.best_genome = None if state["best_genome"] is None else as_array(state["best_genome"])
        self.best_fitness = None if state["best_fitness"] is None else float(state["best_fitness"])


class BookedOptimizer(Optimizer):
    """An optimizer whose candidates live in a :class:`CandidateBook` at ``self._book``
    (set by the subclass): :meth:`pending` and :meth:`best` come from the book."""

    _book: CandidateBook

    def best(self) -> tuple[np.ndarray, float] | None:
        """The best result ever told (genome, fitness), or None before any success."""
        return self._book.best()

    def pending(self) -> list[Candidate]:
        """Candidates asked and not yet told, in id order."""
        return [self._book.pending[i] for i in sorted(self._book.pending)]


# --------------------------------------------------------------------------- replay


class ReplayDivergence(Exception):
    """Replaying the log produced different genomes than the original run."""


class ReplayLog:
    """The ordered asks and tells an optimizer received, as compact arrays.

    ``events``: +k for an ask that issued k candidates (ids are consecutive, so they need no
    storage), -k for a tell of k results. The told ids, penalized fitness values and failure
    flags follow in tell order. ``ask_digests`` holds, per ask event, the first 8 bytes of a
    running SHA-256 over every genome issued so far: replay compares it after each ask and
    stops at the first divergence.
    """

    def __init__(self) -> None:
        self.events: list[int] = []
        self.told_ids: list[int] = []
        self.told_fitness: list[float] = []
        self.told_failed: list[bool] = []
        self.ask_digests: list[int] = []
        self._hash = hashlib.sha256()

    # -- recording -------------------------------------------------------------------------
    def _digest(self, cands: list[Candidate]) -> int:
        for c in cands:
            self._hash.update(np.int64(c.id).tobytes())
            self._hash.update(np.ascontiguousarray(c.genome, dtype="<f8").tobytes())
        return int.from_bytes(self._hash.copy().digest()[:8], "little")

    def record_ask(self, cands: list[Candidate]) -> None:
        if cands:
            self.events.append(len(cands))
            self.ask_digests.append(self._digest(cands))

    def record_tell(self, told: list[Told]) -> None:
        if told:
            self.events.append(-len(told))
            for t in told:
                self.told_ids.append(t.id)
                self.told_fitness.append(t.fitness)
                self.told_failed.append(t.failed)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "events": np.array(self.events, dtype=np.int64),
            "told_ids": np.array(self.told_ids, dtype=np.int64),
            "told_fitness": np.array(self.told_fitness, dtype=np.float64),
            "told_failed": np.array(self.told_failed, dtype=bool).astype(np.int8),
            "ask_digests": np.array(self.ask_digests, dtype=np.uint64),
        }

    def replay(self, state: dict[str, Any], ask: Any, tell: Any) -> None:
        """Re-issue the logged asks and tells through ``ask(k) -> list[Candidate]`` and
        ``tell(list[Told])``, recording them again; raise :class:`ReplayDivergence` at the
        first ask whose genomes differ from the original ones."""
        events = as_array(state["events"], np.int64)
        ids = as_array(state["told_ids"], np.int64)
        fitness = as_array(state["told_fitness"], np.float64)
        failed = as_array(state["told_failed"], np.int8).astype(bool)
        digests = as_array(state["ask_digests"], np.uint64)
        t = a = 0
        for e in events.tolist():
            if e > 0:
                cands = ask(e)
                if len(cands) != e:
                    raise ReplayDivergence(f"ask event {a} gave {len(cands)} candidates, not {e}")
                self.record_ask(cands)
                if self.ask_digests[-1] != int(digests[a]):
                    raise ReplayDivergence(
                        f"ask event {a} (candidates {cands[0].id}..{cands[-1].id}) regenerated "
                        "different genomes")
                a += 1
            else:
                told = [Told(int(ids[k]), float(fitness[k]), bool(failed[k]))
                        for k in range(t, t - e)]
                t -= e
                tell(told)
                self.record_tell(told)
        if t != len(ids) or a != len(digests):
            raise ReplayDivergence("replay log is inconsistent (event counts do not match)")


# --------------------------------------------------------------------------- settings


def settings_of(opt: Any, **extra: Any) -> dict[str, Any]:
    """What an optimizer was built with; saved in its state and checked on load."""
    return {
        "dim": opt.dim,
        "lower": opt.lower.copy(),
        "upper": opt.upper.copy(),
        "x0": None if opt.x0 is None else opt.x0.copy(),
        "sigma0": opt.sigma0,
        "seed": opt.seed,
        **extra,
    }


def check_header(state: dict[str, Any], kind: str, version: int, settings: dict[str, Any]) -> None:
    """Refuse state saved by another optimizer, format version or constructor settings."""
    from ..errors import RunError

    if state.get("kind") != kind:
        raise RunError(f"optimizer state is for {state.get('kind')!r}, not {kind!r}")
    if state.get("version") != version:
        raise RunError(f"optimizer state of {kind!r} has format version {state.get('version')!r}; "
                       f"this evomerge reads version {version}")
    saved = state.get("settings", {})
    for key in sorted(set(saved) | set(settings)):
        a, b = to_jsonable(saved.get(key)), to_jsonable(settings.get(key))
        if a != b:
            raise RunError(f"optimizer state of {kind!r} was saved with a different {key!r} "
                           "than this optimizer was built with")


def check_replayed_book(kind: str, book: CandidateBook, saved: dict[str, Any], dim: int) -> None:
    """After a replay, the rebuilt ids and pending genomes must equal the saved ones."""
    from ..errors import RunError

    mine = book.state_dict()
    same = (mine["next_id"] == int(saved["next_id"])
            and list(mine["pending_ids"]) == [int(i) for i in saved["pending_ids"]]
            and np.array_equal(mine["pending_genomes"].reshape(-1, dim),
                               np.asarray(saved["pending_genomes"], dtype=float).reshape(-1, dim)))
    if not same:
        raise RunError(f"optimizer {kind!r}: resuming failed, replay rebuilt different pending "
                       "candidates than the checkpoint holds")
