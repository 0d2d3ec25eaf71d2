"""benchmarks/pareto.py --quick as a real subprocess: the table lists the three methods with
finite hypervolumes, and --json holds the same figures; a bad --tasks is one error line."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks/pareto.py"


@pytest.mark.slow
def test_quick_pareto_benchmark_prints_three_methods_with_finite_hypervolumes(tmp_path):
    out = tmp_path / "figures.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--json", str(out),
                           "--runs-dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    table = text.split("hypervolume, search split")[1].split("\n\n")[0]
    rows = {m.group(1): m for m in re.finditer(
        r"^\s*(cma|nsga2|map)\s+(\d+)\s+(\S+) ±\s+(\S+)\s+(\S+)\s+(\S+)$", table, re.M)}
    assert set(rows) == {"cma", "nsga2", "map"}, table
    for m in rows.values():
        assert int(m.group(2)) == 8  # the same budget for every method
        assert math.isfinite(float(m.group(3))) and float(m.group(3)) >= 0.0
    assert "HELD-OUT split" in text and "MAP spent" in text and "mean abs error per task" in text
    figs = json.loads(out.read_text())
    assert set(figs["summary"]) == {"cma", "nsga2", "map"}
    assert figs["reference"] == [0.0, 0.0, 0.0]
    for s in figs["summary"].values():
        assert s["evaluations"] == 8 and math.isfinite(s["hv_mean"]) and math.isfinite(s["heldout_hv_mean"])
    assert figs["map_design_evals"] + figs["map_confirm_evals"] == 8


def test_bad_tasks_dir_is_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--tasks", str(tmp_path / "nope")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("error: --tasks") and "Traceback" not in proc.stderr
