"""Train zoo experts in parallel worker processes.

Each worker is a fresh interpreter started with ``python -m evomerge.zoo.worker``: unlike
``multiprocessing`` (spawn re-imports the caller's ``__main__``, fork inherits torch's
thread pools), this works from any caller: a script without a ``__main__`` guard, pytest,
a notebook. A worker reads the zoo spec from JSON, trains one expert from the saved base
with the spec's thread count, prints ``step N`` lines for the progress bar and writes its
metrics to a JSON file. The bytes it writes are those of an in-process build.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPORT_EVERY = 10


def run_workers(
    module: str,
    spec,
    steps: dict[str, int],
    base_dir: str,
    dirs: dict[str, str],
    scratch: Path,
    workers: int,
    advance: Callable[[str, int], None],
    what: str = "zoo worker for",
) -> dict[str, Any]:
    """Train each model named in ``steps`` (name -> its step count) in up to ``workers``
    fresh interpreters at once, ``python -m <module> SPEC NAME BASE OUT RESULT``.

    ``spec`` has ``to_dict()`` and ``threads``. ``advance(name, steps)`` is called from this
    thread as workers report steps. Any failure (or an exception raised by ``advance``)
    kills the running workers first. Returns name -> (metrics, train info).
    """
    from .cache import ZooError

    scratch.mkdir(parents=True, exist_ok=True)
    spec_file = scratch / "spec.json"
    spec_file.write_text(json.dumps(spec.to_dict()), encoding="utf-8")
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = str(spec.threads)
    env["MKL_NUM_THREADS"] = str(spec.threads)
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join([package_root, *filter(None, [env.get("PYTHONPATH")])])

    todo = list(steps)
    running: dict[str, tuple[subprocess.Popen, Path, Path]] = {}
    events: queue.Queue = queue.Queue()
    reported = {name: 0 for name in steps}
    results: dict[str, Any] = {}

    def reader(name: str, stream) -> None:
        for line in stream:
            if line.startswith("step "):
                events.put((name, int(line.split()[1])))
        stream.close()

    def start(name: str) -> None:
        result = scratch / f"{name}.json"
        log = scratch / f"{name}.log"
        cmd = [sys.executable, "-m", module, str(spec_file), name, base_dir, dirs[name], str(result)]
        with open(log, "wb") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
        threading.Thread(target=reader, args=(name, proc.stdout), daemon=True).start()
        running[name] = (proc, result, log)

    def catch_up(name: str, step: int) -> None:
        if step > reported[name]:
            advance(name, step - reported[name])
            reported[name] = step

    try:
        while todo or running:
            while todo and len(running) < workers:
                start(todo.pop(0))
            time.sleep(0.1)
            while True:
                try:
                    catch_up(*events.get_nowait())
                except queue.Empty:
                    break
            for name, (proc, result, log) in list(running.items()):
                code = proc.poll()
                if code is None:
                    continue
                del running[name]
                if code != 0 or not result.is_file():
                    tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] or ["no output"]
                    raise ZooError(f"{what} {name} failed (exit {code}): {tail[0]}")
                data = json.loads(result.read_text(encoding="utf-8"))
                results[name] = (data["metrics"], data["train"])
                catch_up(name, steps[name])
    finally:
        for proc, _, _ in running.values():  # only on failure: stop the others now
            proc.kill()
        for proc, _, _ in running.values():
            proc.wait()
    return results


def step_reporter() -> Callable[[str, int], None]:
    """A worker's ``report(name, n)`` callback: counts steps, prints ``step N`` lines."""
    done = [0]

    def report(_: str, n: int) -> None:
        done[0] += n
        if done[0] % REPORT_EVERY == 0:
            print(f"step {done[0]}", flush=True)

    return report


def write_result(result_file: str, metrics: Any, train: Any) -> None:
    """A worker's result JSON, written atomically (the parent reads it after exit)."""
    tmp = Path(result_file + ".tmp")
    tmp.write_text(json.dumps({"metrics": metrics, "train": train}), encoding="utf-8")
    os.replace(tmp, result_file)


def worker_main(argv: list[str], load_spec: Callable[[dict[str, Any]], Any],
                train_one: Callable[..., tuple[Any, Any]]) -> int:
    """The body of a worker process started by :func:`run_workers`.

    Args:
        argv: ``SPEC NAME BASE OUT RESULT`` (the spec's JSON file, the model to train, the
            saved base, its output directory, the result JSON to write).
        load_spec: the spec's ``from_dict`` (it has ``threads``).
        train_one: ``train_one(spec, name, base_dir, out_dir, report=...)`` ->
            (metrics, train info).
    """
    spec_file, name, base_dir, out_dir, result_file = argv
    import torch

    from .train_members import quiet_transformers

    spec = load_spec(json.loads(Path(spec_file).read_text(encoding="utf-8")))
    torch.set_num_threads(spec.threads)
    quiet_transformers()
    metrics, train = train_one(spec, name, base_dir, out_dir, report=step_reporter())
    write_result(result_file, metrics, train)
    return 0


def main(argv: list[str]) -> int:
    """Worker entry (``python -m evomerge.zoo.worker``): train one zoo expert."""
    from .spec import ZooSpec
    from .train_members import train_one_expert

    return worker_main(argv, ZooSpec.from_dict, train_one_expert)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
