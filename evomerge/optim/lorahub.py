"""``lorahub``: the LoraHub baseline over a LoRA pool: nevergrad NGOpt over the adapters'
weights with no sparsification.

LoraHub ("Efficient Cross-Task Generalization via Dynamic LoRA Composition") merges
A = sum_i w_i A_i and B = sum_i w_i B_i with w in [-1.5, 1.5], found by gradient-free
search (nevergrad NGOpt, budget 40 in the paper's code) on cross-entropy + 0.05 mean|w|
over a few examples. On a ``lora_pool`` space that is: every alpha fixed at 1 (dense), the
betas searched by ``ng:NGOpt`` through :class:`~evomerge.optim.subspace.Subspace`; the loss
and its L1 term come from the ``pool`` backend (``objective: loss``, ``l1: 0.05``). The
budget is the run's ``budget`` (set it to 40 for the paper's setting).

Start point: LoraHub's code starts NGOpt at w = 0 (``init: zero``, the default); ``init:
uniform`` starts at 1/N. nevergrad's default step for that parametrization is 1.0 in weight
units, i.e. ``sigma0: 0.3333`` in unit coordinates of [-1.5, 1.5] (the run's ``optimizer.
sigma0``; the lora_pool space's default is 1/6).

One deviation, forced by the ask/tell engine: with a single worker (LoraHub's setting)
nevergrad 1.0's NGOpt picks Cobyla, a sequential method that can block when a second
candidate is asked before the first is told; ``num_workers`` therefore defaults to 2, where
NGOpt picks its MetaModel (CMA with a quadratic surrogate). ``method`` picks another
nevergrad optimizer. State is exact across resume (nevergrad's replay with digest check).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import check_options, register_optimizer
from .evo_merging import check_pool_extras, unit_value
from .state import settings_of
from .subspace import Subspace, SubspaceDelegate

_INITS = ("zero", "uniform")


@register_optimizer("lorahub")
class LoraHub(SubspaceDelegate):
    """See the module docstring."""

    needs_budget = True
    generational = False
    kind = "lorahub"
    space_extras = "pool_blocks"

    def __init__(self, lower: np.ndarray, upper: np.ndarray, x0: np.ndarray | None = None,
                 sigma0: float = 0.2, seed: int = 0, budget: int | None = None,
                 alpha_dims: Any = None, beta_dims: Any = None, beta_init: Any = None,
                 beta_zero: Any = None, **options: Any):
        super().__init__(lower, upper, x0=x0, sigma0=sigma0, seed=seed, **options)
        if "popsize" in options:
            raise ConfigError("optimizer.popsize: not used by lorahub (nevergrad NGOpt picks "
                              "its own population)")
        self.alpha_dims, self.beta_dims = check_pool_extras(self.kind, alpha_dims, beta_dims, self.dim)
        self.beta_zero = unit_value(beta_zero, "beta_zero")
        self.beta_init = unit_value(beta_init, "beta_init")
        opts = check_options(self.kind, options, {"method": "NGOpt", "init": "zero",
                                                  "num_workers": 2})
        if opts["init"] not in _INITS:
            raise ConfigError(f"optimizer.options.init: {opts['init']!r} is not one of "
                              f"{', '.join(_INITS)}")
        self.method = str(opts["method"])
        self.init = opts["init"]
        self.num_workers = opts["num_workers"]
        if budget is None:
            raise ConfigError("optimizer.options.budget: lorahub needs the run's budget (NGOpt "
                              "plans with it)")
        self.budget = int(budget)
        start = (self.lower + self.upper) / 2.0 if self.x0 is None else self.x0.copy()
        start[self.alpha_dims] = self.upper[self.alpha_dims]  # dense: alpha = 1
        start[self.beta_dims] = self.beta_zero if self.init == "zero" else self.beta_init
        self.start = start
        self.sub = Subspace(f"ng:{self.method}", self.beta_dims, self.lower, self.upper, start,
                            self.sigma0, self.seed, fixed=start, budget=self.budget,
                            num_workers=self.num_workers)

    @property
    def selected(self) -> str:
        """What nevergrad runs (what NGOpt chose for this pool and budget)."""
        return str(self.sub.opt.selected)

    def _settings(self) -> dict[str, Any]:
        return settings_of(self, budget=self.budget, alpha_dims=list(self.alpha_dims),
                           beta_dims=list(self.beta_dims), beta_zero=self.beta_zero,
                           beta_init=self.beta_init, method=self.method, init=self.init,
                           num_workers=self.num_workers)

