"""Standard errors of the scores evomerge reports.

Every score a table, ``status``, ``--json`` or a summary shows is a mean over examples and
carries the standard error of that mean:

- 0/1 scores (exact match, multiple choice, ...): the binomial standard error
  ``sqrt(p (1 - p) / n)``;
- any other per-example scores (``neg_perplexity``, log-likelihoods, black-box losses): a
  bootstrap standard error (resampling the examples with a fixed seed, so the same scores
  always give the same figure).

A combined fitness is the weighted mean of the task means; tasks are scored on disjoint
examples, so their errors add in quadrature: ``se = sqrt(sum (w_i / W)^2 se_i^2)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0


def is_binary(scores: np.ndarray) -> bool:
    return bool(np.all((scores == 0.0) | (scores == 1.0)))


def mean_se(scores: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """Mean of the per-example ``scores`` and its standard error (NaN scores are ignored:
    racing leaves examples it never scored as NaN)."""
    s = np.asarray(scores, dtype=np.float64).ravel()
    s = s[~np.isnan(s)]
    n = s.size
    if n == 0:
        return float("nan"), float("nan")
    mean = float(s.mean())
    if n == 1:
        return mean, 0.0
    if is_binary(s):
        return mean, math.sqrt(max(mean * (1.0 - mean), 0.0) / n)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    idx = rng.integers(0, n, size=(BOOTSTRAP_SAMPLES, n))
    return mean, float(s[idx].mean(axis=1).std(ddof=1))


def combined_se(per_example: Mapping[str, Any], weights: Mapping[str, float]) -> dict[str, Any]:
    """Per-task ``(mean, se, n)`` and the weighted combined ``fitness`` with its ``se``.

    Only the tasks named in ``weights`` count towards the combined fitness; other tasks in
    ``per_example`` (report-only tasks) are summarized on their own."""
    tasks: dict[str, dict[str, float]] = {}
    for name, scores in per_example.items():
        m, se = mean_se(scores)
        tasks[name] = {"mean": m, "se": se, "n": int(np.asarray(scores).size)}
    total = sum(float(w) for w in weights.values())
    fit, var = 0.0, 0.0
    for name, w in weights.items():
        share = float(w) / total
        fit += share * tasks[name]["mean"]
        var += (share * tasks[name]["se"]) ** 2
    return {"fitness": fit, "se": math.sqrt(var), "tasks": tasks,
            "n": sum(tasks[t]["n"] for t in weights)}


def format_score(value: float, se: float | None = None) -> str:
    """``83.5 ±2.1`` for scores in [0, 1] (percent); other values as they are."""
    v = float(value)
    pct = -1e-9 <= v <= 1 + 1e-9
    text = f"{v * 100:.1f}" if pct else f"{v:+.4f}"
    if se is None or not math.isfinite(se):
        return text
    return text + (f" ±{se * 100:.1f}" if pct else f" ±{se:.4f}")
