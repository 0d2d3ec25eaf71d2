"""``evo_merging``: Evo-Merging's two CMA-ES stages over a LoRA pool's control vector.

"Black-box Model Merging for Language-Model-as-a-Service with Massive Model Repositories":
the user controls, per pool adapter, a sparsity alpha_i and a signed scale beta_i, and
optimizes them in two stages, each a CMA-ES over one block with the other block fixed:

1. ``alpha``: the sparsities, starting from 1 (dense), with beta fixed at 1/N;
2. ``beta``: the scales, starting from 1/N in [-1.5, 1.5], with alpha fixed at the best
   stage-1 vector.

Population 20 (option ``popsize``), the run's budget split 1:2 between the stages (the paper
spends 400 + 800 evaluations; option ``stage_split``). Ablations: ``stages: [beta]`` (no
sparsity stage: alpha stays 1), ``stages: [alpha]`` (no scaling stage: beta stays 1/N),
``sign_flips: false`` (beta confined to [0, high]). ``sigma0`` (unit-box coordinates) and
``step_size_rule`` (CSA unless asked otherwise: pycma >= 4.5 switches to TPA from 300
dimensions on, which stalls on plateau-rich landscapes; kept explicit here for large pools)
go to every stage; ``cma_options`` too.

Which coordinates are alphas and betas, and where 1/N and 0 lie in unit coordinates, come
from the ``lora_pool`` space (``optimizer_extras``): this optimizer is only for that space.
Each stage starts from the best genome found so far (the space's start point for the first
stage), so a stage never forgets what an earlier one found.

Stage boundaries: stage k issues its share of the budget; once all of its candidates are
told, the next stage starts from its best genome (its start genome when every evaluation of
it failed). A stage that ends inside a CMA generation simply never completes it. The last
stage keeps asking past its share if the engine asks for more.

Exact state: the constructor settings plus the ordered log of asks and tells
(:class:`ReplayLog`); ``load_state_dict`` rebuilds the stages from the seed and replays,
checking every regenerated ask against a digest (as ``cma`` does).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from ..errors import ConfigError
from .base import (
    Candidate,
    Result,
    check_options,
    register_optimizer,
)
from .replay import ReplayOptimizer
from .state import (
    Told,
    settings_of,
)
from .subspace import Subspace, check_dims

STATE_VERSION = 1
STAGES = ("alpha", "beta")
DEFAULT_POPSIZE = 20


def check_pool_extras(name: str, alpha_dims: Any, beta_dims: Any, dim: int) -> tuple[list[int], list[int]]:
    """The alpha/beta coordinates the lora_pool space hands over (refused without them)."""
    if alpha_dims is None or beta_dims is None:
        raise ConfigError(f"optimizer.name: {name!r} optimizes a LoRA pool's control vector; use "
                          "it with space.type: lora_pool")
    a = check_dims(alpha_dims, dim, "alpha_dims")
    b = check_dims(beta_dims, dim, "beta_dims")
    if set(a) & set(b):
        raise ConfigError(f"optimizer {name!r}: alpha and beta coordinates overlap")
    return a, b


def unit_value(v: Any, field: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not 0 <= v <= 1:
        raise ConfigError(f"{field}: must be a number in [0, 1] (unit-box coordinates), got {v!r}")
    return float(v)


@register_optimizer("evo_merging")
class EvoMerging(ReplayOptimizer):
    """Evo-Merging's staged CMA-ES over a ``lora_pool`` space's alphas and betas.

    Args:
        lower, upper, x0, sigma0, seed: as for :class:`~evomerge.optim.cmaes.CMAES`.
        budget: the run's number of evaluations, split between the stages.
        alpha_dims, beta_dims, beta_init, beta_zero: from the ``lora_pool`` space.
        **options: ``popsize``, ``stages``, ``stage_split``, ``sign_flips``,
            ``step_size_rule``, ``cma_options`` (see the module docstring).

    Raises:
        ConfigError: missing pool extras, a bad budget or option.
    """

    needs_budget = True
    generational = True
    kind = "evo_merging"
    space_extras = "pool_blocks"
    state_version = STATE_VERSION

    def __init__(self, lower: np.ndarray, upper: np.ndarray, x0: np.ndarray | None = None,
                 sigma0: float = 0.2, seed: int = 0, budget: int | None = None,
                 alpha_dims: Any = None, beta_dims: Any = None, beta_init: Any = None,
                 beta_zero: Any = None, **options: Any):
        super().__init__(lower, upper, x0=x0, sigma0=sigma0, seed=seed, **options)
        self.alpha_dims, self.beta_dims = check_pool_extras(self.kind, alpha_dims, beta_dims, self.dim)
        self.beta_zero = unit_value(beta_zero, "beta_zero")
        self.beta_init = unit_value(beta_init, "beta_init")
        opts = check_options(self.kind, options, {
            "popsize": DEFAULT_POPSIZE, "stages": list(STAGES), "stage_split": None,
            "sign_flips": True, "step_size_rule": "csa", "cma_options": {}})
        stages = opts["stages"]
        if (not isinstance(stages, (list, tuple)) or not stages
                or any(s not in STAGES for s in stages) or len(set(stages)) != len(stages)):
            raise ConfigError(f"optimizer.options.stages: a list of distinct stages out of "
                              f"{', '.join(STAGES)}, got {stages!r}")
        self.stages = list(stages)
        split = opts["stage_split"]
        if split is None:
            split = [{"alpha": 1.0, "beta": 2.0}[s] for s in self.stages]
        if (not isinstance(split, (list, tuple)) or len(split) != len(self.stages)
                or not all(isinstance(w, (int, float)) and not isinstance(w, bool)
                           and math.isfinite(w) and w > 0 for w in split)):
            raise ConfigError(f"optimizer.options.stage_split: one positive weight per stage "
                              f"({len(self.stages)}), got {split!r}")
        self.stage_split = [float(w) for w in split]
        if not isinstance(opts["sign_flips"], bool):
            raise ConfigError("optimizer.options.sign_flips: must be true or false")
        self.sign_flips = opts["sign_flips"]
        if budget is None:
            raise ConfigError("optimizer.options.budget: evo_merging splits the run's budget "
                              "between its stages and needs it")
        if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < len(self.stages):
            raise ConfigError(f"budget: evo_merging needs at least one evaluation per stage "
                              f"({len(self.stages)}), got {budget!r}")
        self.budget = int(budget)
        total = sum(self.stage_split)
        shares = [int(math.floor(self.budget * w / total)) for w in self.stage_split[:-1]]
        shares = [max(1, s) for s in shares]
        shares.append(self.budget - sum(shares))
        if shares[-1] < 1:
            raise ConfigError(f"budget: {self.budget} evaluations cannot be split {self.stage_split} "
                              "over the stages")
        self.shares = shares
        self.inner_options = {"popsize": opts["popsize"], "step_size_rule": opts["step_size_rule"],
                              "cma_options": dict(opts["cma_options"] or {})}
        self.start = (self.lower + self.upper) / 2.0 if self.x0 is None else self.x0.copy()
        # the box of each stage: with sign_flips false, betas live in [0, high]
        self.stage_lower = self.lower.copy()
        if not self.sign_flips:
            self.stage_lower[self.beta_dims] = np.maximum(self.stage_lower[self.beta_dims],
                                                          self.beta_zero)
            self.start[self.beta_dims] = np.maximum(self.start[self.beta_dims], self.beta_zero)
        self._reset()
        # build (and so check) the first stage's options now, not at the first ask
        assert self._stage_opt is not None

    # -- stages --------------------------------------------------------------------------
    def _reset(self) -> None:
        self._reset_log()
        self._stage = 0
        self._anchor = self.start.copy()
        self._issued = 0  # in the current stage
        self._inner_ids: dict[int, int] = {}  # outer id -> inner id (current stage)
        self._outer_ids: dict[int, int] = {}  # inner id -> outer id (current stage)
        self._stage_opt: Subspace | None = self._make_stage(0)
        self.history: list[dict[str, Any]] = []

    def _make_stage(self, k: int) -> Subspace:
        dims = self.alpha_dims if self.stages[k] == "alpha" else self.beta_dims
        return Subspace("cma", dims, self.stage_lower, self.upper, self._anchor, self.sigma0,
                        self.seed + k, fixed=self._anchor, **self.inner_options)

    def _advance(self) -> None:
        """Close the current stage: its best genome anchors the next one."""
        assert self._stage_opt is not None
        best = self._stage_opt.best()
        self.history.append({"stage": self.stages[self._stage], "evaluations": self._issued,
                             "best_fitness": None if best is None else best[1]})
        if best is not None:
            self._anchor = best[0].copy()
        self._stage += 1
        self._issued = 0
        self._inner_ids, self._outer_ids = {}, {}
        self._stage_opt = self._make_stage(self._stage)

    @property
    def stage(self) -> str:
        """The stage now asking ("alpha" or "beta")."""
        return self.stages[self._stage]

    @property
    def anchor(self) -> np.ndarray:
        """The genome the current stage holds its other coordinates at."""
        return self._anchor.copy()

    # -- ask/tell ------------------------------------------------------------------------
    def _ask(self, n: int) -> list[Candidate]:
        out: list[Candidate] = []
        while n > 0:
            last = self._stage == len(self.stages) - 1
            left = n if last else self.shares[self._stage] - self._issued
            if left <= 0:
                if self._inner_ids:  # the stage's last candidates are still out
                    break
                self._advance()
                continue
            assert self._stage_opt is not None
            got = self._stage_opt.ask(min(n, left))
            if not got:  # CMA waits for its generation's tells
                break
            for c in got:
                info = {"stage": self.stages[self._stage], **c.info}
                oc = self._book.issue(c.genome, info)
                self._inner_ids[oc.id] = c.id
                self._outer_ids[c.id] = oc.id
                out.append(oc)
            self._issued += len(got)
            n -= len(got)
        return out

    def _tell(self, told: list[Told]) -> None:
        assert self._stage_opt is not None
        inner = []
        for t in told:
            self._book.settle_one(t.id, t.fitness, t.failed)
            inner.append(Result(self._inner_ids.pop(t.id), t.fitness, None, t.failed))
        self._stage_opt.tell(inner)

    # -- state ---------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return settings_of(self, budget=self.budget, alpha_dims=list(self.alpha_dims),
                           beta_dims=list(self.beta_dims), beta_zero=self.beta_zero,
                           beta_init=self.beta_init, stages=list(self.stages),
                           stage_split=list(self.stage_split), sign_flips=self.sign_flips,
                           **{k: v for k, v in self.inner_options.items()})

    def _library(self) -> str:
        import cma

        return f"cma {cma.__version__}"

    def _extra_state(self) -> dict[str, Any]:
        return {"stage": self._stage}
