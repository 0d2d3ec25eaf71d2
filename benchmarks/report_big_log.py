"""Time and size of `evomerge report` on synthetic big logs (500 / 5,000 / 20,000 evaluations).

    python benchmarks/report_big_log.py [N ...]

Writes run directories under a temporary folder (format of engine/store.py; see
tests/report_runs.py), renders each report and prints evaluations, seconds and bytes.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from report_runs import make_run  # noqa: E402

from evomerge.report.html import write_report  # noqa: E402


def main(sizes: list[int]) -> None:
    with open("/proc/loadavg") as f:
        print(f"load: {f.read().strip()}")
    with tempfile.TemporaryDirectory() as tmp:
        for n in sizes:
            run = make_run(Path(tmp) / f"n{n}", "parameter", n=n, tasks=2, popsize=20, failed_every=50,
                           cut_every=7, per_example=50)
            t = time.perf_counter()
            out = write_report(run)
            dt = time.perf_counter() - t
            print(f"evaluations={n:6d}  seconds={dt:6.2f}  bytes={out.stat().st_size:9d}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Time `evomerge report` on synthetic big logs.")
    ap.add_argument("sizes", nargs="*", type=int, default=[500, 5000, 20000],
                    help="evaluations per synthetic run (default: 500 5000 20000)")
    main(ap.parse_args().sizes)
