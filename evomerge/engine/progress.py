"""Evaluations per second and the time left, for the run progress bar.

The rate counts only the evaluations finished in this session (a resumed run does not
count the ones it restored) over the time since the session started, so the ETA of a
resumed run is not inflated by work done before.
"""

from __future__ import annotations

import time
from collections.abc import Callable


def format_duration(seconds: float) -> str:
    s = int(round(max(seconds, 0.0)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class RateMeter:
    def __init__(self, budget: int, clock: Callable[[], float] = time.monotonic):
        self.budget = budget
        self.clock = clock
        self.start = clock()
        self.told0: int | None = None  # evaluations done when this session started
        self.told = 0

    def update(self, told: int) -> None:
        if self.told0 is None:  # the first call follows exactly one finished evaluation
            self.told0 = max(told - 1, 0)
        self.told = told

    def rate(self) -> float | None:
        """Evaluations per second in this session (None before the first one)."""
        if self.told0 is None:
            return None
        elapsed = self.clock() - self.start
        done = self.told - self.told0
        return done / elapsed if elapsed > 0 and done > 0 else None

    def eta(self) -> float | None:
        """Seconds until the budget is spent at the current rate."""
        r = self.rate()
        if r is None:
            return None
        return max(self.budget - self.told, 0) / r

    def rate_text(self) -> str:
        r = self.rate()
        if r is None:
            return "- eval/s"
        return f"{r:.2f} eval/s" if r >= 0.1 else f"{60 * r:.2f} eval/min"

    def eta_text(self) -> str:
        e = self.eta()
        return "ETA -" if e is None else f"ETA {format_duration(e)}"
