"""Pareto math on plain numpy arrays: dominance, fronts, crowding, hypervolume.

Every objective is *maximized*. Points are rows of an ``(n, m)`` float array. Nothing here
knows about runs, models or optimizers: the NSGA-II and MAP optimizers (``optim/``) and the
run report (``report/``) share these functions.

- :func:`dominates`: ``a`` dominates ``b`` when it is at least as good in every objective and
  strictly better in one.
- :func:`nondominated`: mask of the points no other point dominates (duplicates all kept).
- :func:`nondominated_sort`: NSGA-II's front index per point (0 = non-dominated).
- :func:`crowding_distance`: NSGA-II's spread measure within one front.
- :func:`hypervolume`: the volume dominated by the points and bounded below by a fixed
  reference point (points not strictly above it contribute nothing). Exact in any dimension
  by slicing (the last objective is swept, each slab is a (m-1)-dimensional hypervolume);
  2-D is a sort and a sum; fine for the front sizes a merge run produces (hundreds).
"""

from __future__ import annotations

import numpy as np


def _as_points(points) -> np.ndarray:
    p = np.asarray(points, dtype=float)
    if p.ndim == 1:
        p = p.reshape(-1, 1) if p.size else p.reshape(0, 1)
    if p.ndim != 2:
        raise ValueError(f"points must be a 2-D array (n, m), got shape {p.shape}")
    return p


def dominates(a, b) -> bool:
    """True when ``a`` is >= ``b`` in every objective and > in at least one (maximization)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return bool(np.all(a >= b) and np.any(a > b))


def nondominated(points) -> np.ndarray:
    """Boolean mask of the points that no other point dominates.

    Points are visited by decreasing coordinate sum (a point can only be dominated by one
    with a larger sum, or an equal sum and no difference), each checked against the front
    found so far: O(n f) for a front of f points."""
    p = _as_points(points)
    n = p.shape[0]
    mask = np.zeros(n, dtype=bool)
    if n == 0:
        return mask
    order = np.lexsort(tuple(-p[:, k] for k in range(p.shape[1] - 1, -1, -1)) + (-p.sum(axis=1),))
    front = np.empty((0, p.shape[1]))
    for i in order:
        if front.shape[0]:
            ge = np.all(front >= p[i], axis=1)
            if np.any(ge & np.any(front > p[i], axis=1)):
                continue
        mask[i] = True
        front = np.vstack([front, p[i]])
    return mask


def nondominated_sort(points) -> np.ndarray:
    """Front index of every point: 0 for the non-dominated, 1 for those dominated only by
    front 0, and so on (Deb et al.'s fast non-dominated sort, O(m n^2))."""
    p = _as_points(points)
    n = p.shape[0]
    ge = np.all(p[:, None, :] >= p[None, :, :], axis=2)
    gt = np.any(p[:, None, :] > p[None, :, :], axis=2)
    dom = ge & gt  # dom[i, j]: i dominates j
    count = dom.sum(axis=0)  # how many dominate j
    rank = np.full(n, -1, dtype=int)
    current = np.flatnonzero(count == 0)
    r = 0
    while current.size:
        rank[current] = r
        count = count - dom[current].sum(axis=0)
        count[rank >= 0] = -1
        current = np.flatnonzero(count == 0)
        r += 1
    return rank


def crowding_distance(points) -> np.ndarray:
    """NSGA-II crowding distance of each point within its set (boundary points: inf)."""
    p = _as_points(points)
    n, m = p.shape
    d = np.zeros(n)
    if n <= 2:
        return np.full(n, np.inf)
    for k in range(m):
        order = np.argsort(p[:, k], kind="stable")
        lo, hi = p[order[0], k], p[order[-1], k]
        d[order[0]] = d[order[-1]] = np.inf
        if hi > lo:
            d[order[1:-1]] += (p[order[2:], k] - p[order[:-2], k]) / (hi - lo)
    return d


def hypervolume(points, reference) -> float:
    """Exact hypervolume dominated by ``points`` above ``reference`` (maximization)."""
    p = _as_points(points)
    ref = np.asarray(reference, dtype=float).reshape(-1)
    if p.shape[0] == 0:
        return 0.0
    if p.shape[1] != ref.size:
        raise ValueError(f"reference point has {ref.size} objectives, points have {p.shape[1]}")
    p = p[np.all(p > ref, axis=1)]
    if p.shape[0] == 0:
        return 0.0
    p = p[nondominated(p)]
    return float(_hv(p - ref))


def _hv(p: np.ndarray) -> float:
    """Hypervolume of positive points against the origin."""
    n, m = p.shape
    if m == 1:
        return float(p[:, 0].max())
    if m == 2:
        order = np.argsort(-p[:, 0], kind="stable")
        x, y = p[order, 0], p[order, 1]
        best_y = np.maximum.accumulate(y)
        widths = x - np.append(x[1:], 0.0)
        return float(np.sum(widths * best_y))
    # slice along the last objective: between consecutive levels, the (m-1)-D volume of the
    # points at least that high in the last objective
    levels = np.unique(p[:, -1])[::-1]
    total = 0.0
    for i, top in enumerate(levels):
        below = levels[i + 1] if i + 1 < levels.size else 0.0
        active = p[p[:, -1] >= top, :-1]
        active = active[nondominated(active)]
        total += _hv(active) * (top - below)
    return float(total)


def spread_select(points, k: int) -> np.ndarray:
    """Indices of ``k`` points spread over a set: the extremes of each objective first, then
    greedy farthest-point picks (objectives scaled to [0, 1]). Deterministic."""
    p = _as_points(points)
    n = p.shape[0]
    if k >= n:
        return np.arange(n)
    lo, hi = p.min(axis=0), p.max(axis=0)
    q = (p - lo) / np.where(hi > lo, hi - lo, 1.0)
    chosen: list[int] = []
    for j in range(p.shape[1]):
        i = int(np.argmax(q[:, j]))
        if i not in chosen and len(chosen) < k:
            chosen.append(i)
    if not chosen:
        chosen.append(0)
    dist = np.min(np.linalg.norm(q[:, None, :] - q[chosen][None, :, :], axis=2), axis=1)
    while len(chosen) < k:
        i = int(np.argmax(dist))
        chosen.append(i)
        dist = np.minimum(dist, np.linalg.norm(q - q[i], axis=1))
    return np.array(chosen, dtype=int)
