"""``pool`` backend: fitness of a LoRA-pool control vector, measured by the pool provider.

The weights stay with the provider (``evomerge serve-pool``). :meth:`PoolBackend.load_plan`
reads the control vector (alpha, beta) from a ``lora_pool`` control plan (op ``evo_lora``);
:meth:`PoolBackend.evaluate` opens, once per (task, split) and lazily, a session on the
provider by uploading that task's examples of that split (rendered prompt + reference answer,
exactly what the local backends score) — or, with ``remote_tasks: {local: hosted}``, a session
on a task the provider hosts — and asks for per-example losses or scores of the current
vector. Per-example fitness, maximized by the search (Evo-Merging / LoraHub's objective)::

    objective: loss    -losses[i] - l1 * mean_i |beta_i|   (losses: mean token cross-entropy of
                                                            the answer + EOS, teacher forced)
    objective: score   scores[i]  - l1 * mean_i |beta_i|   (exact match / the task's scorer)

Racing: a racing slice of a task (a subset of its examples) is sent as the ``indices`` of
those examples in the session, so only they are evaluated. The racing bounds assume scores
in [0, 1]: use racing with ``objective: score`` only.

Options (``backend.options``): ``base_url`` (required, e.g. ``http://127.0.0.1:8321``),
``api_key_env`` (the NAME of the variable holding the provider's token; never the token),
``objective`` (loss | score, default loss), ``l1`` (0.05), ``remote_tasks``, ``timeout``
(seconds per request, 300), ``max_retries`` (4), ``backoff`` (0.5), ``max_backoff`` (30).
Sessions that expired on the provider (idle TTL, restart) are opened again once.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BackendError, ConfigError
from .base import Backend, register_backend
from .pool_client import PoolClient, PoolInfo, SessionGone, to_pool_order, unpack_adapter

_OBJECTIVES = ("loss", "score")
_PREFIX = "pool:"


@dataclass(frozen=True)
class PoolOptions:
    base_url: str
    api_key_env: str | None = None
    objective: str = "loss"
    l1: float = 0.05
    remote_tasks: dict[str, str] = field(default_factory=dict)
    timeout: float = 300.0
    max_retries: int = 4
    backoff: float = 0.5
    max_backoff: float = 30.0

    @classmethod
    def parse(cls, options: Mapping[str, Any]) -> PoolOptions:
        """Check ``backend.options`` of a pool run (one ConfigError line per problem)."""
        known = cls.__dataclass_fields__
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ConfigError(f"backend.options.{unknown[0]}: unknown option of the pool backend "
                              f"(known: {', '.join(sorted(known))})")
        o = dict(options)
        url = o.get("base_url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError("backend.options.base_url: required by the pool backend, the "
                              f"provider's http(s) URL (e.g. http://127.0.0.1:8321), got {url!r}")
        key_env = o.get("api_key_env")
        if key_env is not None and (not isinstance(key_env, str) or not key_env.strip()
                                    or not key_env.replace("_", "").isalnum()):
            raise ConfigError("backend.options.api_key_env: the NAME of an environment variable "
                              "holding the token (not the token itself)")
        objective = o.get("objective", "loss")
        if objective not in _OBJECTIVES:
            raise ConfigError(f"backend.options.objective: {objective!r} is not one of "
                              f"{', '.join(_OBJECTIVES)}")
        nums: dict[str, float] = {}
        for name, low in (("l1", 0.0), ("timeout", None), ("backoff", 0.0), ("max_backoff", 0.0)):
            v = o.get(name, known[name].default)
            if (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)
                    or (v < low if low is not None else v <= 0)):
                bound = f">= {low}" if low is not None else "> 0"
                raise ConfigError(f"backend.options.{name}: must be a number {bound}, got {v!r}")
            nums[name] = float(v)
        retries = o.get("max_retries", 4)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError(f"backend.options.max_retries: must be an integer >= 0, got {retries!r}")
        remote = o.get("remote_tasks") or {}
        if not isinstance(remote, Mapping) or not all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in remote.items()):
            raise ConfigError("backend.options.remote_tasks: a mapping {local task name: task "
                              "name hosted by the provider}")
        return cls(url, key_env, objective, nums["l1"], dict(remote), nums["timeout"], retries,
                   nums["backoff"], nums["max_backoff"])

    def client(self) -> Any:
        return PoolClient(self.base_url, self.api_key_env, timeout=self.timeout,
                          max_retries=self.max_retries, backoff=self.backoff,
                          max_backoff=self.max_backoff)


def control_from_plan(plan: Any) -> tuple[list[str], np.ndarray, np.ndarray]:
    """(adapter names, alpha, beta) carried by a ``lora_pool`` control plan."""
    steps = [s for s in getattr(plan, "steps", [])]
    if len(steps) != 1 or steps[0].op != "evo_lora":
        ops = ", ".join(sorted({s.op for s in steps})) or "none"
        raise BackendError("the pool backend evaluates control plans of the lora_pool space "
                           f"(one evo_lora step); this plan has ops: {ops}")
    plan.validate()  # lengths, alpha in [0, 1], finite values
    step = steps[0]
    names = []
    for ref in step.inputs:
        src = plan.sources[ref.model]
        if not src.startswith(_PREFIX):
            raise BackendError(f"plan source {ref.model!r} is {src!r}, not a pool:<adapter> reference")
        names.append(src[len(_PREFIX):])
    alpha = np.asarray(step.params["density"], dtype=np.float64)
    beta = np.asarray(step.params["weight"], dtype=np.float64)
    return names, alpha, beta


@register_backend("pool")
class PoolBackend(Backend):
    """See the module docstring. ``model_dir`` is the first ``pool:`` reference (unused)."""

    def __init__(self, model_dir: str | None = None, device: str | None = None,
                 dtype: str | None = None, batch_size: int | None = None, **options: Any):
        super().__init__(str(model_dir or ""), device)
        self.opts = PoolOptions.parse(options)
        self.options = {"base_url": self.opts.base_url, "api_key_env": self.opts.api_key_env,
                        "objective": self.opts.objective}
        self.client = self.opts.client()
        self._info: Any = None
        self._sessions: dict[tuple[str, str], Any] = {}
        self._full: dict[tuple[str, str], tuple[list[Any], dict[tuple, list[int]]]] = {}
        self._control: tuple[list[str], np.ndarray, np.ndarray] | None = None
        self.stats: dict[str, float] = {"evaluations": 0, "sessions": 0, "reopened": 0,
                                        "provider_seconds": 0.0}

    def __repr__(self) -> str:
        return f"PoolBackend(base_url={self.client.url('')!r}, objective={self.opts.objective!r})"

    # -- weights ----------------------------------------------------------------------
    def target_tensors(self) -> Mapping[str, Any]:
        return {}

    def load_plan(self, plan: Any, materializer: Any) -> None:
        self._control = control_from_plan(plan)

    # -- sessions ---------------------------------------------------------------------
    def info(self) -> Any:
        if self._info is None:
            self._info = self.client.info()
        return self._info

    def _full_examples(self, task: Any, split: str) -> tuple[list[Any], dict[tuple, list[int]]]:
        """The task's complete example list of ``split`` (a racing slice holds a subset) and
        an index of its examples by content."""
        key = (task.name, split)
        if key not in self._full:
            from ..tasks import load_task

            full = load_task(task.path, weight=task.weight).examples(split)
            where: dict[tuple, list[int]] = {}
            for i, ex in enumerate(full):
                where.setdefault((ex.prompt, ex.target), []).append(i)
            self._full[key] = (full, where)
        return self._full[key]

    def _open(self, task: Any, split: str) -> Any:
        full, _ = self._full_examples(task, split)
        hosted = self.opts.remote_tasks.get(task.name)
        if hosted is not None:
            s = self.client.open_session(task=hosted, split=split)
            if s.num_examples != len(full):
                raise BackendError(
                    f"backend.options.remote_tasks.{task.name}: the provider's task {hosted!r} has "
                    f"{s.num_examples} {split} examples, the local task {len(full)}; they must "
                    "be the same examples in the same order")
        else:
            limit = self.info().max_examples
            if limit is not None and len(full) > limit:
                raise BackendError(
                    f"task {task.name}: {len(full)} {split} examples, the provider at "
                    f"{self.client.url('')} takes at most {limit} per session (set num_examples "
                    "in the task YAML)")
            s = self.client.open_session(
                examples=[{"prompt": ex.prompt, "answer": ex.target} for ex in full],
                max_new_tokens=int(task.spec.max_new_tokens))
        self.stats["sessions"] += 1
        return s

    def _session(self, task: Any, split: str) -> Any:
        key = (task.name, split)
        if key not in self._sessions:
            self._sessions[key] = self._open(task, split)
        return self._sessions[key]

    def _indices(self, task: Any, split: str) -> list[int] | None:
        """None for the whole split, else the positions of ``task``'s examples in it."""
        full, where = self._full_examples(task, split)
        given = task.examples(split)
        if len(given) == len(full) and all(a is b or a == b for a, b in zip(given, full)):
            return None
        used: dict[tuple, int] = {}
        out = []
        for ex in given:
            k = (ex.prompt, ex.target)
            pos = where.get(k, [])
            j = used.get(k, 0)
            if j >= len(pos):
                raise BackendError(f"task {task.name}: an example to evaluate is not in the "
                                   f"task's {split} split ({task.path})")
            used[k] = j + 1
            out.append(pos[j])
        return out

    # -- the Backend contract ---------------------------------------------------------
    def evaluate(self, tasks: list[Any], split: str = "search") -> dict[str, np.ndarray]:
        if self._control is None:
            raise BackendError("the pool backend was asked to evaluate before a control plan "
                               "was loaded")
        names, alpha, beta = self._control
        penalty = self.opts.l1 * float(np.mean(np.abs(beta)))
        metric = self.opts.objective
        out: dict[str, np.ndarray] = {}
        for task in tasks:
            indices = self._indices(task, split)
            for attempt in (0, 1):
                session = self._session(task, split)
                a, b = to_pool_order(names, session.adapters, alpha, beta)
                try:
                    res = self.client.evaluate(session, a, b, metrics=[metric], indices=indices)
                    break
                except SessionGone:
                    self._sessions.pop((task.name, split), None)
                    if attempt:
                        raise
                    self.stats["reopened"] += 1
            self.stats["evaluations"] += 1
            if res.get("seconds") is not None:
                self.stats["provider_seconds"] += float(res["seconds"])
            if metric == "loss":
                out[task.name] = -res["losses"] - penalty
            else:
                out[task.name] = res["scores"] - penalty
        return out

    def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        try:
            for s in sessions:
                try:
                    self.client.close_session(s)
                except BackendError:
                    pass  # the provider forgets idle sessions by itself
        finally:
            self.client.close()


def export_merged_adapter(adapters: Sequence[str], alpha: Sequence[float], beta: Sequence[float],
                          recipe: dict[str, Any], target: Path, card: dict[str, Any],
                          cfg: Any) -> Path:
    """Download the merged adapter of one control vector (``adapters`` order) from the
    provider named in ``cfg.backend`` and publish it atomically as folder ``target``:
    the PEFT files, ``evomerge_recipe.yaml`` (the control vector) and a ``README.md`` card.

    Nothing is written when the provider refuses (403) or sends a bad archive."""
    import yaml

    from ...checkpoint.writer import CARD_FILE, RECIPE_FILE, atomic_output_dir

    if cfg.backend.name != "pool":
        raise ConfigError(f"backend.name: a lora_pool run is exported through its pool provider "
                          f"(backend pool), not {cfg.backend.name!r}")
    opts = PoolOptions.parse(cfg.backend.options)
    client = opts.client()
    try:
        info = client.info()
        a, b = to_pool_order(adapters, info.adapters, alpha, beta)
        data = client.merged_adapter(a, b)
    finally:
        client.close()
    with atomic_output_dir(target) as tmp:
        unpack_adapter(data, tmp)
        (tmp / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
        (tmp / CARD_FILE).write_text(_adapter_card(target.name, client.url(""), info, recipe, card),
                                     encoding="utf-8")
    return target


def _adapter_card(name: str, url: str, info: PoolInfo, recipe: dict[str, Any],
                  card: dict[str, Any]) -> str:
    import yaml

    base = info.raw.get("base") if isinstance(info.raw.get("base"), dict) else {}
    lines = ["---", "library_name: peft", "tags: [merge, evomerge, lora, evo-merging]", "---", "",
             f"# {name}", "",
             "A LoRA adapter merged by a pool provider (`evomerge serve-pool`) from the control "
             "vector found by an evomerge black-box search: merged A = sum_i beta_i "
             "TopK_alpha_i(A_i), merged B = sum_i beta_i B_i. Load it with "
             "`peft.PeftModel.from_pretrained(<the provider's base model>, <this folder>)`.", "",
             "## Provider", "", f"- url: `{url}`"]
    if base:
        lines.append(f"- base model: {base.get('model_type', '?')}, "
                     f"{base.get('num_parameters', '?')} parameters")
    lines += ["", "## Search", ""]
    lines += [f"- {k}: {json.dumps(v, default=str)}" for k, v in card.items()]
    lines += ["", "## Control vector", "", "Also saved as `evomerge_recipe.yaml`.", "", "```yaml",
              yaml.safe_dump(recipe, sort_keys=False).rstrip(), "```", ""]
    return "\n".join(lines)
