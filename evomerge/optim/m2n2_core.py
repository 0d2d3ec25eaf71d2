"""The formulas of M2N2 (Model Merging of Natural Niches), as pure numpy functions.

M2N2 (Abrantes, Lange, Tang, "Competition and Attraction Improve Model Fusion", GECCO 2025)
keeps an archive of P members with a per-example score matrix ``S`` (P x N, entries
``s(x_j | theta_k)`` in [0, 1]) and does three things with it:

- **Resource competition** (fitness sharing). Every example is a resource of capacity 1 shared
  among the members that solve it: ``z_j = sum_k S[k, j]`` and
  ``f_i = sum_j c_j * S[i, j] / (z_j ** alpha + eps)``. A member that alone solves rare
  examples is worth more than one more copy of what everybody solves, so the archive keeps
  diverse niches. ``alpha = 0`` turns this into plain (weighted) accuracy: a GA.
- **Replacement.** A new child is scored against the archive plus itself; it replaces the
  member with the lowest shared fitness, unless it is itself the lowest.
- **Attraction** (mate choice). Parent A is drawn with probability proportional to ``f``;
  parent B with probability proportional to
  ``g(A, B) = sum_j c_j * max(S[B, j] - S[A, j], 0) / (z_j ** alpha + eps)``: B is attractive
  when it solves what A fails, weighted by how scarce those examples are.
- **Crossover.** A split-point SLERP:
  ``h = concat(SLERP(A[<w_s], B[<w_s]; w_m), SLERP(A[>=w_s], B[>=w_s]; 1 - w_m))``.

Where this follows the reference code (github.com/SakanaAI/natural_niches) rather than the
issue's wording, the docstrings say so:

- The denominator is ``z_j ** alpha`` with columns where ``z_j == 0`` set to 1 (the reference's
  ``jnp.where(z, z, 1)``), plus ``eps`` (default 0, so the default equals the reference).
- Attraction divides by ``z_j ** alpha`` (the reference's ``fitness_matrix``), not ``z_j``;
  both agree for the default ``alpha = 1``.
- When no member beats A on any example, every attraction score is 0 and the reference
  normalises 0/0 (NaN probabilities). Here B then falls back to uniform over the other
  members (over A itself when A is alone).
- Without attraction, the reference draws *both* parents proportional to ``f``, independently
  and with replacement (``jax.random.choice(..., shape=(2,), p=probs)``), not B uniform.
  :func:`sample_parents` does the same.
- SLERP uses **one angle over the whole vector** (``omega`` from the full parents) and the
  split point only switches the interpolation weight from ``w_m`` to ``1 - w_m``
  (``slerp_w_splitpoint`` in the reference). Two independent SLERPs with their own angles
  (the issue's literal formula) are available as ``angle="segment"``.
- SLERP falls back to linear interpolation when ``sin(omega) <= 1e-6``; a zero-norm parent
  (NaN in the reference) also falls back to linear.

Genomes here are just vectors the crossover understands: the default
:class:`VectorSlerpCrossover` works on flat weight vectors; a representation of LLM members
(coefficient tables over source models) plugs in its own :class:`Crossover`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

#: the reference's threshold on sin(omega) below which SLERP becomes linear interpolation
SLERP_EPS = 1e-6


# --------------------------------------------------------------------------- competition


def _weights(c: np.ndarray | None, n: int) -> np.ndarray:
    if c is None:
        return np.ones(n)
    c = np.asarray(c, dtype=float)
    assert c.shape == (n,), f"per-example weights have shape {c.shape}, expected ({n},)"
    return c


def shared_denominator(scores: np.ndarray, alpha: float = 1.0, eps: float = 0.0) -> np.ndarray:
    """Per-example denominator ``z_j ** alpha + eps`` with ``z_j = sum_k S[k, j]``.

    Columns nobody solves (``z_j == 0``) get ``1 + eps``: their numerators are 0 anyway, and this
    is exactly the reference's guard against 0/0.
    """
    scores = np.asarray(scores, dtype=float)
    z = scores.sum(axis=0)
    zz = np.where(z > 0, z, 1.0) ** float(alpha)
    return zz + float(eps)


def _example_values(scores: np.ndarray, alpha: float, c: np.ndarray | None,
                    eps: float) -> np.ndarray:
    """What one unit of score on each example is worth: ``c_j / (z_j ** alpha + eps)``."""
    return _weights(c, scores.shape[1]) / shared_denominator(scores, alpha, eps)


def resource_fitness(scores: np.ndarray, alpha: float = 1.0, c: np.ndarray | None = None,
                     eps: float = 0.0) -> np.ndarray:
    """Shared fitness of every row: ``f_i = sum_j c_j S[i, j] / (z_j ** alpha + eps)``."""
    scores = np.asarray(scores, dtype=float)
    return scores @ _example_values(scores, alpha, c, eps)


def attraction_scores(scores: np.ndarray, a: int, alpha: float = 1.0,
                      c: np.ndarray | None = None, eps: float = 0.0) -> np.ndarray:
    """Attraction of every member B to parent ``a``:
    ``g(a, B) = sum_j c_j max(S[B, j] - S[a, j], 0) / (z_j ** alpha + eps)``.

    ``g(a, a) == 0``: a member is never attracted to itself.
    """
    scores = np.asarray(scores, dtype=float)
    return _attraction(scores, a, _example_values(scores, alpha, c, eps))


def _attraction(scores: np.ndarray, a: int, values: np.ndarray) -> np.ndarray:
    gain = scores - scores[a][None, :]
    np.maximum(gain, 0.0, out=gain)  # in place: a second temporary costs more than the math
    return gain @ values


def _proportional(weights: np.ndarray) -> np.ndarray | None:
    """Probabilities proportional to ``weights``, or None when they sum to 0 (or are broken)."""
    w = np.maximum(np.asarray(weights, dtype=float), 0.0)
    total = w.sum()
    if not np.isfinite(total) or total <= 0.0:
        return None
    return w / total


def _uniform_mates(n: int, a: int) -> np.ndarray:
    """Fallback when nobody attracts ``a``: uniform over the others (``a`` itself if alone)."""
    if n == 1:
        return np.ones(1)
    p = np.full(n, 1.0 / (n - 1))
    p[a] = 0.0
    return p


def parent_probabilities(scores: np.ndarray, alpha: float = 1.0, c: np.ndarray | None = None,
                         eps: float = 0.0) -> np.ndarray:
    """Probabilities of drawing each member as parent A (proportional to ``f``; uniform if all 0)."""
    p = _proportional(resource_fitness(scores, alpha, c, eps))
    n = np.asarray(scores).shape[0]
    return np.full(n, 1.0 / n) if p is None else p


def mate_probabilities(scores: np.ndarray, a: int, alpha: float = 1.0,
                       c: np.ndarray | None = None, eps: float = 0.0) -> np.ndarray:
    """Probabilities of drawing each member as parent B given parent ``a`` (attraction).

    All-zero attraction falls back to uniform over the members other than ``a`` (to ``a``
    itself when it is alone); see the module docstring.
    """
    p = _proportional(attraction_scores(scores, a, alpha, c, eps))
    return _uniform_mates(np.asarray(scores).shape[0], a) if p is None else p


def draw_index(rng: np.random.Generator, p: np.ndarray) -> int:
    """One index drawn with probabilities ``p`` (inverse CDF of one uniform draw; much cheaper
    than ``Generator.choice`` with ``p`` in a loop that runs once per child)."""
    cdf = np.cumsum(p)
    i = int(np.searchsorted(cdf, rng.uniform() * cdf[-1], side="right"))
    i = min(i, p.shape[0] - 1)
    while p[i] <= 0.0:  # guard against landing on a zero-probability index at the edges
        i -= 1
    return i


def sample_parents(scores: np.ndarray, rng: np.random.Generator, alpha: float = 1.0,
                   c: np.ndarray | None = None, eps: float = 0.0,
                   use_attraction: bool = True) -> tuple[int, int]:
    """Draw the indices (A, B) of two parents from the archive's score matrix.

    With attraction: A ~ f, then B ~ g(A, .). Without (the reference's ablation): A and B
    both ~ f, independently, with replacement.
    """
    scores = np.asarray(scores, dtype=float)
    n = scores.shape[0]
    values = _example_values(scores, alpha, c, eps)
    p = _proportional(scores @ values)
    if p is None:
        p = np.full(n, 1.0 / n)
    a = draw_index(rng, p)
    if not use_attraction:
        return a, draw_index(rng, p)
    q = _proportional(_attraction(scores, a, values))
    return a, draw_index(rng, _uniform_mates(n, a) if q is None else q)


def replacement_slot(scores: np.ndarray, child: np.ndarray, alpha: float = 1.0,
                     c: np.ndarray | None = None, eps: float = 0.0) -> int | None:
    """Where a child enters a *full* archive: the index of the member it replaces, or None.

    Shared fitness is computed over archive + child. The lowest one (the first in archive
    order on ties, as ``argmin`` in the reference) is replaced; if that lowest is the child
    itself (strictly below every member), the child is discarded.
    """
    scores = np.asarray(scores, dtype=float)
    child = np.asarray(child, dtype=float)
    z = scores.sum(axis=0) + child  # z over archive + child, without stacking a copy
    den = np.where(z > 0, z, 1.0) ** float(alpha) + float(eps)
    values = _weights(c, scores.shape[1]) / den
    members = scores @ values
    worst = int(np.argmin(members))
    # argmin over (members, child) takes the first minimum: the child only when strictly lowest
    return None if float(child @ values) < float(members[worst]) else worst


# --------------------------------------------------------------------------- crossover


def slerp_weights(cos_omega: float, t: np.ndarray | float,
                  eps: float = SLERP_EPS) -> tuple[np.ndarray, np.ndarray]:
    """The scalar coefficients (on A, on B) of SLERP for an angle with cosine ``cos_omega``.

    ``SLERP(A, B; t) = wa * A + wb * B`` with ``wa = sin((1-t) w)/sin w``, ``wb = sin(t w)/sin w``
    and ``w = arccos(cos_omega)``; linear ``(1-t, t)`` when ``sin w <= eps``. The coefficients
    need only the parents' inner product and norms, which is what lets an LLM representation
    compute them from a Gram matrix of the source models.
    """
    t = np.asarray(t, dtype=float)
    omega = float(np.arccos(np.clip(cos_omega, -1.0, 1.0)))
    so = np.sin(omega)
    if so > eps:
        return np.sin((1.0 - t) * omega) / so, np.sin(t * omega) / so
    return 1.0 - t, t


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two vectors (the reference's ``dot(a/|a|, b/|b|)``, up to
    rounding); 1.0 when either is zero (SLERP then falls back to linear)."""
    na, nb = float(np.sqrt(np.dot(a, a))), float(np.sqrt(np.dot(b, b)))
    if na == 0.0 or nb == 0.0:
        return 1.0
    return float(np.dot(a, b)) / (na * nb)


def slerp(a: np.ndarray, b: np.ndarray, t: np.ndarray | float,
          eps: float = SLERP_EPS) -> np.ndarray:
    """Spherical interpolation from ``a`` (t=0) to ``b`` (t=1), one angle for the whole vector.

    ``t`` may be a scalar or an array of per-position weights (the reference's split point
    is a per-position ``t``); the angle is always that of the full vectors.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    wa, wb = slerp_weights(cosine(a, b), t, eps)
    return wa * a + wb * b


def split_position(w_s: float, n: int) -> int:
    """Map a split fraction ``w_s`` in [0, 1) to a position in [0, n - 1].

    With ``w_s ~ U(0, 1)`` the position is uniform over ``0..n-1``, like the reference's
    ``randint(0, n)``.
    """
    return int(min(max(int(np.floor(float(w_s) * n)), 0), n - 1))


def split_point_crossover(a: np.ndarray, b: np.ndarray, w_m: float, split: int,
                          eps: float = SLERP_EPS, angle: str = "global") -> np.ndarray:
    """Split-point SLERP of two flat vectors.

    ``angle="global"`` (the reference): one angle from the full parents, weight ``w_m`` on
    positions ``< split`` and ``1 - w_m`` on the rest. ``angle="segment"`` (the issue's literal
    formula): ``concat(SLERP(a[:split], b[:split]; w_m), SLERP(a[split:], b[split:]; 1 - w_m))``,
    each segment with its own angle.
    """
    a = np.asarray(a, dtype=float)
    b = np.asarray(b, dtype=float)
    if angle == "global":
        # t takes two values only, so the SLERP coefficients are two pairs of scalars: the same
        # numbers as the reference's per-position formula, without per-position sines
        cos_omega = cosine(a, b)
        head_a, head_b = slerp_weights(cos_omega, float(w_m), eps)
        tail_a, tail_b = slerp_weights(cos_omega, 1.0 - float(w_m), eps)
        out = np.empty_like(a)
        out[:split] = head_a * a[:split] + head_b * b[:split]
        out[split:] = tail_a * a[split:] + tail_b * b[split:]
        return out
    if angle == "segment":
        head = slerp(a[:split], b[:split], w_m, eps)
        tail = slerp(a[split:], b[split:], 1.0 - float(w_m), eps)
        return np.concatenate([head, tail])
    raise ValueError(f"angle must be 'global' or 'segment', got {angle!r}")


@runtime_checkable
class Crossover(Protocol):
    """Merges two archive members into a child.

    ``w_m`` is the mixing weight in [0, 1]; ``w_s`` the split point as a fraction in [0, 1) of
    the representation's flattening order, or None for a single SLERP without split point.
    ``rng`` is there for crossovers that need more randomness (the vector one does not).
    """

    def __call__(self, parent_a: np.ndarray, parent_b: np.ndarray, w_m: float,
                 w_s: float | None, rng: np.random.Generator) -> np.ndarray: ...


class VectorSlerpCrossover:
    """The reference crossover on flat vectors (genomes *are* the weights)."""

    def __init__(self, eps: float = SLERP_EPS, angle: str = "global"):
        if angle not in ("global", "segment"):
            raise ValueError(f"angle must be 'global' or 'segment', got {angle!r}")
        self.eps = float(eps)
        self.angle = angle

    def __call__(self, parent_a: np.ndarray, parent_b: np.ndarray, w_m: float,
                 w_s: float | None, rng: np.random.Generator) -> np.ndarray:
        if w_s is None:
            return slerp(parent_a, parent_b, float(w_m), self.eps)
        n = int(np.asarray(parent_a).shape[0])
        return split_point_crossover(parent_a, parent_b, w_m, split_position(w_s, n),
                                     self.eps, self.angle)
