"""Crash injection for the resume tests: ``EVOMERGE_CRASH_AT=<point>:<n>`` makes the process
SIGKILL itself the n-th time it passes ``<point>`` (after_ask, after_log, after_tell).

This is how the tests prove that a kill -9 at any of those points loses nothing. It costs
one dictionary lookup when the variable is unset.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def maybe_crash(point: str) -> None:
    spec = os.environ.get("EVOMERGE_CRASH_AT")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name != point:
        return
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] >= int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
