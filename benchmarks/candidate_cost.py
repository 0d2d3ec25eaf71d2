"""Per-candidate merge vs evaluation seconds of finished (or running) search runs.

Reads each run directory's ``evals.jsonl`` (``merge_seconds``, ``eval_seconds`` and
``setup_seconds`` that the evaluator logs per candidate) and prints, per run: candidates
timed, mean and median merge and evaluation seconds, merge as a share of candidate time
against the issue-14 target (<= 10%), and the same without the workers' one-time setup
(the part of a first merge that fills the per-worker caches), with that setup's total, and
the setup the workers paid while merging the untuned baselines (logged in
``baselines.jsonl`` since this round; older runs show none) counted in as well. Prints the machine's load average alongside (figures are from the run's own time,
so say which load it ran under).

    .venv/bin/python benchmarks/candidate_cost.py runs/zoo-demo runs/<real-demo-run>
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def split(run: Path) -> dict | None:
    """Merge/eval seconds of the candidates logged in ``run/evals.jsonl``, or None if none."""
    merge, ev, setup = [], [], []
    for line in (run / "evals.jsonl").read_text().splitlines():
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if r.get("merge_seconds") is not None and r.get("eval_seconds") is not None:
            merge.append(float(r["merge_seconds"]))
            ev.append(float(r["eval_seconds"]))
            setup.append(float(r.get("setup_seconds") or 0.0))
    if not merge:
        return None
    # the workers' one-time setup paid while they merged the untuned baselines (evaluated
    # before the first candidate, by the same workers): part of the run's merge cost too
    base_setup = 0.0
    if (run / "baselines.jsonl").is_file():
        for line in (run / "baselines.jsonl").read_text().splitlines():
            try:
                base_setup += float(json.loads(line).get("setup_seconds") or 0.0)
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
                continue
    m, e = statistics.mean(merge), statistics.mean(ev)
    steady = statistics.mean(x - y for x, y in zip(merge, setup))
    return {"run": str(run), "candidates": len(merge), "merge_mean": m, "eval_mean": e,
            "merge_median": statistics.median(merge), "eval_median": statistics.median(ev),
            "merge_share": m / max(m + e, 1e-9), "setup_total": sum(setup),
            "merge_without_setup": steady, "share_without_setup": steady / max(steady + e, 1e-9),
            "baseline_setup": base_setup,
            "share_all_setup": (sum(merge) + base_setup) / max(sum(merge) + sum(ev) + base_setup, 1e-9)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories (each with evals.jsonl)")
    args = ap.parse_args(argv)
    print("load average now:", Path("/proc/loadavg").read_text().split()[:3])
    rc = 0
    for d in map(Path, args.runs):
        if not (d / "evals.jsonl").is_file():
            print(f"{d}: no evals.jsonl (not a run directory)", file=sys.stderr)
            rc = 2
            continue
        s = split(d)
        if s is None:
            print(f"{d}: no candidate has merge/eval seconds logged")
            continue
        ok = "OK" if s["merge_share"] <= 0.10 else "OVER"
        print(f"{d}: {s['candidates']} candidates; merge {s['merge_mean']:.2f} s "
              f"(median {s['merge_median']:.2f}), eval {s['eval_mean']:.2f} s "
              f"(median {s['eval_median']:.2f}); merge {100 * s['merge_share']:.1f}% of "
              f"candidate time (target <= 10%): {ok}")
        if s["setup_total"] > 0:
            ok = "OK" if s["share_without_setup"] <= 0.10 else "OVER"
            print(f"    of which one-time setup (task vectors, sorted magnitudes, compiles): "
                  f"{s['setup_total']:.1f} s; merge without it {s['merge_without_setup']:.3f} s "
                  f"= {100 * s['share_without_setup']:.1f}% of candidate time: {ok}")
        if s["baseline_setup"] > 0:
            ok = "OK" if s["share_all_setup"] <= 0.10 else "OVER"
            print(f"    one-time setup paid while merging the baselines (before the first "
                  f"candidate): {s['baseline_setup']:.1f} s; merge with every setup "
                  f"{100 * s['share_all_setup']:.1f}% of candidate time: {ok}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
