"""Pydantic models of the run YAML users write (`evomerge run CONFIG.yaml`).

A run config names the source models, the search space, the optimizer, the fitness tasks and
backend, the executor and the budget. Unknown fields are errors (``extra="forbid"``), and every
validation error becomes one :class:`ConfigError` line naming the file and the field path.

Model paths may be local HF directories, ``zoo:<member>`` / ``zoo:<variant>/<member>``
references into the locally built model zoo, or Hub ids ``org/name[@revision]`` (resolved by
:mod:`evomerge.engine.models` through the local HF cache).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError, format_validation_error


def registered_space_types() -> list[str]:
    """The ``space.type`` names in the spaces registry (built-ins and user plug-ins).

    The registry is looked up by module name, the way every registry loads its built-ins:
    the spaces import this module, so it names their registry instead of importing it.
    """
    import importlib

    return importlib.import_module("evomerge.spaces.base").SPACES.names()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamRange(_Strict):
    """Bounds and start value of one searched coefficient (weight, density, ...)."""

    low: float
    high: float
    init: float | None = None

    @field_validator("high")
    @classmethod
    def _ordered(cls, v: float, info: Any) -> float:
        low = info.data.get("low")
        if low is not None and v <= low:
            raise ValueError(f"high ({v}) must be greater than low ({low})")
        return v

    @field_validator("init")
    @classmethod
    def _inside(cls, v: float | None, info: Any) -> float | None:
        low, high = info.data.get("low"), info.data.get("high")
        if v is not None and low is not None and high is not None and not low <= v <= high:
            raise ValueError(f"init ({v}) is outside [low, high] = [{low}, {high}]")
        return v


class SpaceConfig(_Strict):
    """The search space. ``type`` picks a registered space; the other fields configure it.

    parameter:  per-layer-group coefficients per source model for ``method``.
    layer_swap: bottom/top k layers (and embeddings/head) from one expert, the rest from
                another, with k evolved; ``per_layer: true`` generalizes to a source mix per layer.
    lora_pool:  black-box: per-adapter sparsity and signed scale sent to an ``evomerge
                serve-pool`` provider (models are ``pool:<adapter>`` references).
    output_mixture: black-box: weights of a mixture of API-only models' next-token
                distributions (models are ``api:<base_url>`` references).
    dfs:        data-flow: the layer path through several models, with scaled transitions,
                exported as a plain checkpoint (options: see evomerge/spaces/dfs.py).
    """

    type: str = "parameter"
    method: str = "task_arithmetic"

    @field_validator("type")
    @classmethod
    def _registered_type(cls, v: str) -> str:
        known = registered_space_types()
        if v not in known:
            raise ValueError(f"unknown search space {v!r}; known: {', '.join(known)}")
        return v
    # parameter space
    layer_groups: int | Literal["layer"] = 1
    split_attn_mlp: bool = False
    params: dict[str, ParamRange] = Field(
        default_factory=lambda: {"weight": ParamRange(low=0.0, high=1.5, init=1.0)}
    )
    non_layer: Literal["search", "uniform"] = "search"  # uniform: fixed at init
    smoothing: float = Field(0.0, ge=0.0, le=1.0)
    fixed: dict[str, Any] = Field(default_factory=dict)  # operator scalars (lambda, normalize...)
    # layer_swap space
    outer: str | None = None  # expert giving the bottom/top layers (layer swap)
    inner: str | None = None  # expert giving the middle layers
    per_layer: bool = False
    temperature: float = Field(0.0, ge=0.0)  # 0: hard source choice per layer; >0: soft mix
    # options of the black-box spaces (each space checks its own keys)
    options: dict[str, Any] = Field(default_factory=dict)


class OptimizerConfig(_Strict):
    name: str = "cma"
    sigma0: float | None = None
    popsize: int | None = Field(None, ge=2)
    seed: int | None = None
    options: dict[str, Any] = Field(default_factory=dict)


class TaskRef(_Strict):
    path: str
    weight: float = Field(1.0, ge=0.0)


class BackendConfig(_Strict):
    name: str = "hf"
    device: str | None = None
    dtype: str | None = "float32"
    batch_size: int = Field(128, ge=1)
    options: dict[str, Any] = Field(default_factory=dict)


class ExecutorConfig(_Strict):
    name: Literal["local", "ray"] = "local"
    workers: int | None = Field(None, ge=1)
    address: str | None = None
    max_inflight: int | None = Field(None, ge=1)
    max_failures: int = Field(2, ge=0)  # retries of one candidate before it is told as failed
    gpus_per_worker: float | None = Field(None, ge=0.0)
    num_threads: int | None = Field(None, ge=1)  # torch threads per worker


class RacingConfig(_Strict):
    """Cheaper fitness: score a first slice of the examples and finish only candidates whose
    upper confidence bound can still beat the best complete fitness so far."""

    enabled: bool = False
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    first_fraction: float = Field(0.25, gt=0.0, lt=1.0)
    stages: list[float] | None = None
    bound: Literal["hoeffding", "bernstein"] = "hoeffding"


class BaselinesConfig(_Strict):
    """Untuned merges evaluated at the start of every run (engine/baselines.py): the space's
    initial point, each expert alone, uniform task arithmetic, TIES at its default density,
    whichever the space's sources allow. Logged with a label in ``baselines.jsonl``, never
    told to the optimizer, not counted in ``budget``."""

    enabled: bool = True
    kinds: list[Literal["initial", "experts", "task_arithmetic", "ties"]] = Field(
        default_factory=lambda: ["initial", "experts", "task_arithmetic", "ties"])


class SelectionConfig(_Strict):
    """How the run's final model is chosen (engine/selection.py): the ``top_k`` candidates by
    search fitness, the baselines and the optimizer's own estimate of the optimum are
    re-scored on the validation split; the best there is the final. Held-out data and
    report tasks are scored for the final and the baselines only, never to select."""

    enabled: bool = True  # select at the end of a run (`evomerge select RUN` does it later)
    top_k: int = Field(5, ge=1)
    optimizer_estimate: bool = True  # CMA-ES: its distribution mean, as a candidate
    # tasks without validation_data: this fraction of their search examples is carved out
    # (deterministically, by example digest) as the validation split; 0 turns it off
    validation_fraction: float = Field(0.25, ge=0.0, lt=1.0)
    heldout: bool = True  # score the final and the baselines on held-out + report tasks


class ObjectiveConfig(_Strict):
    """One objective of a multi-objective run (maximized): the weighted mean (task weights)
    of the named tasks' mean scores. No ``objectives`` means one objective per task."""

    name: str
    tasks: list[str] = Field(min_length=1)


class RunConfig(_Strict):
    name: str
    models: dict[str, str]
    base_model: str | None = None
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    budget: int = Field(100, ge=1, description="number of candidates evaluated")
    tasks: list[TaskRef]
    report_tasks: list[TaskRef] = Field(default_factory=list)  # held-out reporting only
    backend: BackendConfig = Field(default_factory=BackendConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    racing: RacingConfig = Field(default_factory=RacingConfig)
    baselines: BaselinesConfig = Field(default_factory=BaselinesConfig)
    selection: SelectionConfig = Field(default_factory=SelectionConfig)
    # multi-objective: several objectives besides the weighted sum (default: one per task)
    objectives: list[ObjectiveConfig] = Field(default_factory=list)
    seed: int = 0
    dtype: str | None = None  # output dtype of merged weights (default: the sources')
    # refuse (default) a search task whose search split is data a report task holds out
    allow_tuning_on_report_split: bool = False

    @field_validator("models")
    @classmethod
    def _nonempty(cls, v: dict[str, str]) -> dict[str, str]:
        if len(v) < 2:
            raise ValueError("needs at least two source models")
        return v

    @field_validator("tasks")
    @classmethod
    def _has_tasks(cls, v: list[TaskRef]) -> list[TaskRef]:
        if not v:
            raise ValueError("needs at least one task")
        return v

    def model_post_init(self, _ctx: Any) -> None:
        if self.base_model is not None and self.base_model not in self.models:
            raise ConfigError(
                f"base_model: {self.base_model!r} is not one of models ({', '.join(self.models)})"
            )
        if not self.allow_tuning_on_report_split:
            from .fitness.split_guard import check_report_splits

            check_report_splits(self.tasks, self.report_tasks)

    # -- identity ---------------------------------------------------------------------
    def fingerprint(self) -> str:
        """Hash of everything that changes which candidates are made and how they score.

        Excluded: the run name, the budget (a run may be extended), the executor (where
        candidates are evaluated does not change their scores), the report-split guard's
        override (it changes no score), the baselines (never told to the optimizer) and the
        selection settings except the validation carve-out (which changes the search split).
        """
        return hashlib.sha256(json.dumps(self.fingerprinted(), sort_keys=True).encode()).hexdigest()[:16]

    def fingerprinted(self) -> dict[str, Any]:
        """The fields :meth:`fingerprint` covers, as plain data."""
        d = self.model_dump(mode="json")
        for key in ("name", "budget", "executor", "allow_tuning_on_report_split", "baselines"):
            d.pop(key, None)
        d["selection"] = {"validation_fraction": d["selection"]["validation_fraction"]}
        if not d.get("objectives"):  # runs made before objectives existed keep their hash
            d.pop("objectives", None)
        return d


REMOTE_PREFIXES = ("pool:", "api:")
"""Model references that name weights held elsewhere (a LoRA pool provider, an API-only
endpoint): black-box spaces use them; nothing local is resolved for them."""


def is_remote_ref(ref: str) -> bool:
    return ref.startswith(REMOTE_PREFIXES)


def parse_config(data: Any, source: str = "config") -> RunConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None


def load_config(path: str | Path) -> RunConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    cfg = parse_config(data, str(path))
    return resolve_paths(cfg, path.parent)


def resolve_paths(cfg: RunConfig, base_dir: Path) -> RunConfig:
    """Make model and task paths absolute relative to the config file's folder.

    Task paths are tried relative to the config file, then to the current directory (so
    presets in ``search_spaces/`` can name ``fitness/...`` from the repository root).
    """

    def fix(p: str, model: bool = False) -> str:
        if p.startswith("zoo:") or is_remote_ref(p):
            return p
        q = Path(p).expanduser()
        if q.is_absolute():
            return str(q)
        for root in (base_dir, Path.cwd()):
            if (root / q).exists():
                return str((root / q).resolve())
        from .checkpoint.resolve import parse_hub_id

        if model and parse_hub_id(p) is not None:  # org/name[@revision]: a Hub id, kept
            return p
        return str((base_dir / q).resolve())

    data = cfg.model_dump()
    data["models"] = {k: fix(v, model=True) for k, v in cfg.models.items()}
    for key in ("tasks", "report_tasks"):
        data[key] = [dict(t, path=fix(t["path"])) for t in data[key]]
    return RunConfig.model_validate(data)
