"""Every benchmark script still imports and parses its command line.

The benchmarks are not run by the suite (they take minutes), so a moved or renamed name in
the package would otherwise only show when someone next runs them. One subprocess loads each
script as ``__main__`` with ``--help`` and checks it printed its usage and exited 0.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))

_PROBE = r"""
import contextlib, io, runpy, sys
bad = []
for path in sys.argv[1:]:
    sys.argv = [path, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        bad.append(f"{path}: --help did not exit")
    except SystemExit as e:
        if e.code not in (0, None) or "usage" not in out.getvalue():
            bad.append(f"{path}: exit {e.code!r}, usage printed: {'usage' in out.getvalue()}")
    except BaseException as e:  # noqa: BLE001 - report every broken script at once
        bad.append(f"{path}: {type(e).__name__}: {e}")
print("\n".join(bad))
sys.exit(1 if bad else 0)
"""


def test_there_are_benchmarks():
    assert len(SCRIPTS) >= 10


def test_every_benchmark_script_parses_help():
    proc = subprocess.run([sys.executable, "-c", _PROBE, *map(str, SCRIPTS)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]
