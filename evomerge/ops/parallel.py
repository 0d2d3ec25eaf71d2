"""Chunk-parallel execution of elementwise merge work on CPU, steady on busy cores.

torch's own intra-op parallelism splits every op statically across its thread team and ends
each op with a barrier. A merge streamed in cache-sized chunks runs thousands of such small
parallel regions, and on a CPU shared with other processes one descheduled thread stalls
every barrier for a scheduler time slice: measured here a TIES merge ran 4-5x slower on busy
cores, and 2 threads were no faster than 1.

Here the chunks themselves are the unit of parallel work instead: torch runs single-threaded
inside a merge, and ``threads`` Python threads (torch and numpy release the GIL) pull whole
chunks from a shared queue. There is no barrier per op; a thread that loses its core only
delays its own chunk while the others keep pulling work, so 2 threads are never slower than
1 on a busy machine and close to 2x on a quiet one.

The thread count comes from what the process actually gets (:func:`merge_threads`): the
CPUs in its affinity mask, capped by ``torch.get_num_threads()`` (what the caller allowed,
e.g. 1 in a search worker) and by ``EVOMERGE_MERGE_THREADS`` when set. Each parallel call
also caps it by the CPUs left idle (:func:`idle_cpus`: the runnable count in
``/proc/loadavg``, less this process's running threads, over the last 0.2 s): measured
here on 2 oversubscribed cores (load 4-5), 2 chunk threads ran TIES 2.5x *slower* than 1
(every small op hands the GIL over, and a descheduled holder stalls the other thread),
while on idle cores they keep their speed-up. ``EVOMERGE_MERGE_ADAPT=0`` turns the cap
off. Results never depend on the thread count: every chunk is computed by the same ops on
the same bounds, and anything order-dependent (tie budgets at a top-k threshold, random
draws) is addressed by flat position, not by the order chunks happen to run in.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import torch

T = TypeVar("T")

_POOLS: dict[int, ThreadPoolExecutor] = {}
_LOCK = threading.Lock()
_local = threading.local()
IDLE_WINDOW_S = 0.2  # how long one reading of idle CPUs counts (see idle_cpus)
IDLE_REREAD_S = 0.01  # a call this soon after the last reading reuses it
_READINGS: deque[tuple[float, int]] = deque()


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask; cgroup quotas are not read)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def merge_threads() -> int:
    """Threads a CPU merge uses: min(affinity CPUs, torch threads, $EVOMERGE_MERGE_THREADS)."""
    n = min(available_cpus(), max(1, torch.get_num_threads()))
    env = os.environ.get("EVOMERGE_MERGE_THREADS")
    if env:
        try:
            n = min(n, max(1, int(env)))
        except ValueError:
            pass
    return n


def idle_cpus() -> int | None:
    """CPUs of the affinity mask not taken by other processes' runnable tasks, or None.

    Reads the instantaneous runnable-task count of ``/proc/loadavg`` and subtracts this
    process's own runnable threads (``/proc/self/task/*/stat``: the merge's pool threads
    must not count as neighbours, or a merge would cap itself to one thread); None where it
    cannot be read or ``EVOMERGE_MERGE_ADAPT=0``. One reading is a snapshot: on a quiet
    machine some other task is runnable for a moment in about 1 call of 10 (measured here:
    19-24 of ~240 calls of a TIES merge capped at 1 thread, 2.8-3.0 s against 2.6 s
    uncapped), so the answer is the most idle CPUs seen in the last ``IDLE_WINDOW_S``
    seconds: a neighbour that keeps a core (a busy machine) shows in every reading and
    caps the merge; a blip does not.
    """
    if os.environ.get("EVOMERGE_MERGE_ADAPT", "1") == "0":
        return None
    now = time.monotonic()
    with _LOCK:
        if _READINGS and now - _READINGS[-1][0] < IDLE_REREAD_S:
            return max(i for _, i in _READINGS)  # read moments ago (one read: ~0.3 ms)
    idle = _idle_now()
    if idle is None:
        return None
    with _LOCK:
        while _READINGS and now - _READINGS[0][0] > IDLE_WINDOW_S:
            _READINGS.popleft()
        _READINGS.append((now, idle))
        return max(i for _, i in _READINGS)


def _idle_now() -> int | None:
    """One reading of the idle CPUs (see :func:`idle_cpus`), or None."""
    try:
        with open("/proc/loadavg") as f:
            running = int(f.read().split()[3].split("/")[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(1, available_cpus() - max(0, running - _own_running_threads()))


def _own_running_threads() -> int:
    """This process's threads in state R (at least 1: the caller)."""
    n = 0
    try:
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat") as f:
                    # the state follows the parenthesised command name
                    if f.read().rsplit(")", 1)[1].split()[0] == "R":
                        n += 1
            except (OSError, IndexError):
                continue
    except OSError:
        return 1
    return max(1, n)


def _pool(threads: int) -> ThreadPoolExecutor:
    with _LOCK:
        pool = _POOLS.get(threads)
        if pool is None:
            pool = ThreadPoolExecutor(threads, thread_name_prefix="evomerge-merge",
                                      initializer=_mark_worker)
            _POOLS[threads] = pool
        return pool


def _mark_worker() -> None:
    _local.worker = True


@contextlib.contextmanager
def torch_single_threaded() -> Iterator[None]:
    """torch's intra-op parallelism off for the block (restored after)."""
    prev = torch.get_num_threads()
    if prev == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


@contextlib.contextmanager
def run_inline() -> Iterator[None]:
    """:func:`run_items` and :func:`run_chunks` called in this thread within the block run
    their items in order here, not in the shared pool, and leave torch's thread count
    alone (a background thread then never waits behind the merge's own work items, nor
    changes the count while the merge's own blocks have set and will restore it)."""
    prev = getattr(_local, "inline", False)
    _local.inline = True
    try:
        yield
    finally:
        _local.inline = prev


@contextlib.contextmanager
def threads_for_load(device: torch.device | str | None = None) -> Iterator[None]:
    """torch's thread count capped by :func:`idle_cpus` for the block (CPU only; restored after).

    Covers the work around the chunked passes (loads, dtype conversions, reductions) whose
    intra-op barriers stall on oversubscribed cores; :func:`run_chunks` inside the block
    sees the capped count through :func:`merge_threads`.
    """
    dev = torch.device(device) if device is not None else torch.device("cpu")
    prev = torch.get_num_threads()
    idle = idle_cpus() if dev.type == "cpu" and prev > 1 else None
    if idle is None or idle >= prev:
        yield
        return
    torch.set_num_threads(idle)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


def scratch(count: int, length: int, like: torch.Tensor) -> list[torch.Tensor]:
    """``count`` float tensors of ``length`` elements, reused by this thread.

    On CPU a fresh chunk-sized temporary is a trip through the allocator and, above glibc's
    mmap threshold, fresh pages to fault in (measured here ~30% of a chunk's subtraction);
    buffers kept per thread avoid both. Valid until the same thread asks again. On other
    devices (whose allocators cache) these are plain new tensors.
    """
    if like.device.type != "cpu":
        return [torch.empty(length, dtype=like.dtype, device=like.device) for _ in range(count)]
    bufs = getattr(_local, "scratch", None)
    if bufs is None:
        bufs = _local.scratch = []
    while len(bufs) < count:
        bufs.append(torch.empty(0, dtype=torch.float32))
    out = []
    for i in range(count):
        if bufs[i].numel() < length or bufs[i].dtype != like.dtype:
            bufs[i] = torch.empty(length, dtype=like.dtype)
        out.append(bufs[i][:length])
    return out


def run_chunks(fn: Callable[[int, int], T], bounds: Sequence[tuple[int, int]],
               device: torch.device | str | None = None, threads: int | None = None) -> list[T]:
    """``[fn(s, e) for s, e in bounds]``, run by a pool of threads on CPU.

    ``fn`` must only touch memory of its own chunk (its writes may run in any order). On
    CUDA, with one chunk, with one thread, or when called from inside a pool thread, it
    runs in order in the calling thread. Without ``threads`` it uses :func:`merge_threads`
    capped by :func:`idle_cpus`.
    """
    return run_items(lambda b: fn(b[0], b[1]), bounds, device, threads)


def run_items(fn: Callable[[Any], T], items: Sequence[Any],
              device: torch.device | str | None = None, threads: int | None = None) -> list[T]:
    """``[fn(x) for x in items]`` with the thread rules of :func:`run_chunks` (any
    independent work items: chunks, or the streams and ranks of a selection)."""
    if getattr(_local, "inline", False):
        return [fn(x) for x in items]
    dev = torch.device(device) if device is not None else torch.device("cpu")
    auto = threads is None
    if auto:
        threads = merge_threads() if dev.type == "cpu" else 1
    threads = min(threads, len(items))
    if auto and threads > 1 and dev.type == "cpu" and not getattr(_local, "worker", False):
        idle = idle_cpus()  # an explicit ``threads`` is taken as asked
        if idle is not None:
            threads = min(threads, idle)
    if threads <= 1 or getattr(_local, "worker", False):
        if dev.type == "cpu" and len(items) > 1:
            with torch_single_threaded():  # small regions: a barrier each is pure overhead
                return [fn(x) for x in items]
        return [fn(x) for x in items]
    with torch_single_threaded():
        return list(_pool(threads).map(fn, items))


class ChunkBatch:
    """Chunk work of many tensors, run together in one parallel pass.

    A merge of one small tensor (SmolLM2-135M's are 0.1-0.9M elements) splits into a few
    chunks, and a pass per tensor hands them to the pool and waits for the slowest, several
    hundred times per candidate; operators that support it (``OpContext.batch``) add their
    chunks here instead, and the caller runs all of them at once (:meth:`run`) before it
    reads any result. Each ``fn(s, e)`` must only write memory no other item writes.
    """

    def __init__(self) -> None:
        self.items: list[tuple[Callable[[int, int], Any], int, int]] = []

    def add(self, fn: Callable[[int, int], Any], bounds: Sequence[tuple[int, int]]) -> None:
        """Queue ``fn(s, e)`` for every chunk of ``bounds``."""
        self.items.extend((fn, s, e) for s, e in bounds)

    def __len__(self) -> int:
        return len(self.items)

    def run(self, device: torch.device | str | None = "cpu") -> None:
        """Run and forget every queued chunk (:func:`run_items`'s thread rules)."""
        items, self.items = self.items, []
        if items:
            run_items(lambda it: it[0](it[1], it[2]), items, device)


__all__ = ["ChunkBatch", "available_cpus", "idle_cpus", "merge_threads", "run_chunks", "run_inline", "run_items",
           "scratch", "threads_for_load", "torch_single_threaded"]
