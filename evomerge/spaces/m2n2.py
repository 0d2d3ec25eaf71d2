"""M2N2 on LLM weights: archive members as coefficient tables over the source models.

Storing 20 archive members as full models would cost 20 models of RAM (or disk and I/O per
crossover). Instead every member is a *linear combination of the sources with one coefficient
per (tensor, source)*: the genome is a table ``T x M`` (T tensors in the checkpoint's
flattening order, M sources), a few hundred floats. This is closed under M2N2's crossover:

- SLERP of two members needs only their inner product and norms. For members ``A = sum_i
  a_t,i theta_i`` (per tensor t) these are ``<A, B> = sum_t a_t^T G_t b_t`` with ``G_t`` the
  sources' per-tensor Gram matrix (computed once, one pass over the weights). The SLERP
  coefficients are then two scalars per segment, and the child's table is
  ``wa * a_t + wb * b_t``: again a coefficient table.
- The split point ``w_s`` is a fraction of the parameter count in flattening order; here it is
  rounded to the nearest tensor boundary (tensor granularity, a documented deviation from the
  reference's element granularity; large models have hundreds of tensors).

A member compiles to a MergePlan with one ``linear`` step per tensor (normalize off) whose
weights are that tensor's row of the table, so it materializes like every other candidate.
The initial archive holds the sources themselves (one-hot tables).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..checkpoint import open_checkpoint
from ..optim.base import optimizer_trait
from ..optim.m2n2_core import SLERP_EPS, slerp_weights
from .base import SearchSpace, register_space

COEF_BOUND = 8.0  # SLERP extrapolates a little beyond the parents; keep the box generous


@register_space("m2n2")
class M2N2Space(SearchSpace):
    sigma0 = 0.1

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # members combine all sources, the base included when the config has one
        self.keys = list(self.models)
        ref = open_checkpoint(self.models[self.keys[0]])
        self.tensors = list(ref.names)
        self.sizes = np.array([int(np.prod(ref.shape(n))) for n in self.tensors], dtype=np.int64)
        self.T, self.M = len(self.tensors), len(self.keys)
        self._gram: np.ndarray | None = None

    @property
    def names(self) -> list[str]:
        return [f"{t}.{k}" for t in self.tensors for k in self.keys]

    @property
    def lower(self) -> np.ndarray:
        return np.full(self.dim, -COEF_BOUND)

    @property
    def upper(self) -> np.ndarray:
        return np.full(self.dim, COEF_BOUND)

    def initial(self) -> np.ndarray:
        return np.full(self.dim, 1.0 / self.M)

    def member(self, key: str) -> np.ndarray:
        table = np.zeros((self.T, self.M))
        table[:, self.keys.index(key)] = 1.0
        return table.ravel()

    def initial_population(self) -> list[np.ndarray]:
        return [self.member(k) for k in self.keys]

    def optimizer_extras(self, optimizer: str) -> dict[str, Any]:
        if optimizer_trait(optimizer, "space_extras") != "crossover":
            return {}
        return {"crossover": GramSlerpCrossover(self.gram, self.sizes)}

    @property
    def gram(self) -> np.ndarray:
        """Per-tensor Gram matrices of the sources, ``T x M x M`` (float64), computed once."""
        if self._gram is None:
            self._gram = source_gram(self.models, self.keys, self.tensors)
        return self._gram

    def decode(self, genome: np.ndarray) -> dict[str, Any]:
        table = np.asarray(genome, dtype=float).reshape(self.T, self.M)
        recipe = self._recipe_header("linear")
        recipe.pop("base_model", None)  # every source, the base included, is a weighted input
        recipe.pop("tokenizer_source", None)  # the first source's (all share one tokenizer)
        recipe["parameters"] = {"normalize": False}
        recipe["models"] = [
            {"model": k, "parameters": {"weight": [
                {"filter": t, "value": round(float(table[i, j]), 6)} for i, t in enumerate(self.tensors)
            ]}}
            for j, k in enumerate(self.keys)
        ]
        return recipe


def source_gram(models: dict[str, str], keys: list[str], tensors: list[str]) -> np.ndarray:
    """``G[t, i, j] = <theta_i[t], theta_j[t]>`` over every tensor (one pass over the weights)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    readers = [open_checkpoint(models[k]) for k in keys]
    out = np.zeros((len(tensors), len(keys), len(keys)))
    for t, name in enumerate(tensors):
        x = torch.stack([r.get(name).to(device=device, dtype=torch.float64).reshape(-1) for r in readers])
        out[t] = (x @ x.T).cpu().numpy()
    return out


class GramSlerpCrossover:
    """M2N2's split-point SLERP on coefficient tables, exact through the Gram matrix.

    One angle for the whole parents (the reference), weight ``w_m`` on tensors before the
    split and ``1 - w_m`` after it; ``w_s=None`` is one SLERP without split point.
    """

    def __init__(self, gram: np.ndarray, sizes: np.ndarray, eps: float = SLERP_EPS):
        self.gram = np.asarray(gram, dtype=float)
        self.T, self.M = self.gram.shape[0], self.gram.shape[1]
        self.bounds = np.concatenate([[0], np.cumsum(np.asarray(sizes, dtype=np.int64))])
        self.eps = eps

    def inner(self, a: np.ndarray, b: np.ndarray) -> float:
        return float(np.einsum("ti,tij,tj->", a, self.gram, b))

    def split_tensor(self, w_s: float) -> int:
        """Index of the first tensor after the split (nearest tensor boundary)."""
        pos = float(w_s) * self.bounds[-1]
        return int(np.argmin(np.abs(self.bounds - pos)))

    def __call__(self, parent_a: np.ndarray, parent_b: np.ndarray, w_m: float,
                 w_s: float | None, rng: np.random.Generator) -> np.ndarray:
        a = np.asarray(parent_a, dtype=float).reshape(self.T, self.M)
        b = np.asarray(parent_b, dtype=float).reshape(self.T, self.M)
        na, nb = np.sqrt(max(self.inner(a, a), 0.0)), np.sqrt(max(self.inner(b, b), 0.0))
        cos = 1.0 if na == 0 or nb == 0 else self.inner(a, b) / (na * nb)
        s = self.T if w_s is None else self.split_tensor(w_s)
        ha, hb = slerp_weights(cos, float(w_m), self.eps)
        ta, tb = slerp_weights(cos, 1.0 - float(w_m), self.eps)
        child = np.empty_like(a)
        child[:s] = ha * a[:s] + hb * b[:s]
        child[s:] = ta * a[s:] + tb * b[s:]
        return child.ravel()
