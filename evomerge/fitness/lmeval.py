"""lm-eval-harness tasks as evomerge fitness tasks, scored on the resident merged model.

A fitness task YAML may hand a task to lm-eval instead of describing it itself::

    name: zoo_cipher_mc              # evomerge's name for it (default: lm_eval_task)
    scoring: lm_eval
    lm_eval_task: zoo_cipher_mc      # an lm-eval task name
    include_path: tasks              # folder(s) of local lm-eval task YAMLs (relative to this file)
    split: validation                # the lm-eval split searched on (never implicit)
    heldout_split: test              # the split reports use (a report-only task: this alone)
    metric: acc                      # optional: per-document metric (default: the task's first)
    num_examples: 100                # optional: the first N documents of each split

Why a task YAML and not a new kind of run-config entry: a run config lists ``tasks: [{path,
weight}]`` and everything downstream (the driver's task table, the workers' evaluator,
racing's example slices, M2N2's per-example rows, the held-out table) works on
:class:`~evomerge.fitness.tasks.Task` objects. Loading an lm-eval task *into* such a Task —
one :class:`~evomerge.fitness.tasks.Example` per lm-eval document, ``record["doc_id"]`` its
index — keeps all of that unchanged: the only two hooks are in ``load_task`` (route
``scoring: lm_eval`` here) and ``evaluate_task`` (ask lm-eval for the scores).

Scoring. Every evaluation runs ``lm_eval.evaluator.evaluate`` with ``log_samples=True`` on
exactly the documents of the (possibly racing-sliced) example list and returns lm-eval's
own per-document metric, one float in [0, 1] per example in example order. Which model
lm-eval talks to (``model:``):

- ``hflm`` — lm-eval's ``HFLM`` built around the HF backend's resident ``nn.Module`` and
  tokenizer (``pretrained=<the module>``): the materializer's in-place writes are what is
  scored, nothing goes to disk, and the numbers are lm-eval's own (what ``lm_eval --model
  hf`` gives on the exported checkpoint);
- ``backend`` — :class:`BackendLM`, an lm-eval ``LM`` over the backend's two primitives
  (``generate`` / ``loglikelihood``), so lm-eval tasks also run on vLLM or API backends;
- ``auto`` (default) — ``hflm`` when the backend holds a transformers model, else ``backend``.

Determinism: the few-shot sampler is re-seeded (``fewshot_seed``) before every evaluation,
so a candidate's prompts never depend on how many were scored before it; sampling
generation settings (``do_sample``, ``temperature`` > 0) and ``repeats`` > 1 are refused.

No hub access, ever: ``HF_HUB_OFFLINE=1`` and ``HF_DATASETS_OFFLINE=1`` are set for the
process before lm-eval or datasets is imported (and forced in their constants if they were
imported earlier), so a task whose data is not local fails with one line instead of
downloading. Local data: ``dataset_path: json`` with ``dataset_kwargs: {data_files: ...}``;
relative ``data_files`` are taken from the lm-eval YAML's folder (lm-eval itself would take
them from the working directory, which differs between the driver and the workers).

Tested with lm-eval 0.4.13 (``pip install 'evomerge[lmeval]'``); it uses ``TaskManager``
(``task_index``, ``load``), ``evaluate(..., samples=...)`` and ``HFLM``.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from ..errors import TaskError, format_validation_error
from .lmeval_models import make_backend_lm, pick_lm, resident_hflm  # noqa: F401  (re-exported)
from .scoring import TASK_EVALUATORS, Generate, Loglikelihood
from .task_types import Example, Task, resolve_path

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
INSTALL_HINT = "pip install 'evomerge[lmeval]'"
OUTPUT_TYPES = ("generate_until", "multiple_choice", "loglikelihood", "loglikelihood_rolling")


class LMEvalTaskSpec(BaseModel):
    """The YAML of an lm-eval task wrapper. Splits are never picked by default: which
    benchmark split is tuned on must be written down. ``split`` is evomerge's ``search``
    split, ``heldout_split`` its ``heldout`` split; a report-only task may set only the
    latter."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, min_length=1)
    description: str = ""
    scoring: Literal["lm_eval"]
    lm_eval_task: str = Field(min_length=1)
    include_path: str | list[str] | None = None
    include_defaults: bool | None = None  # None: lm-eval's built-in tasks only if not found locally
    split: str | None = Field(default=None, min_length=1)
    heldout_split: str | None = Field(default=None, min_length=1)
    metric: str | None = None
    filter: str | None = None
    num_examples: int | None = Field(default=None, ge=1)
    num_fewshot: int | None = Field(default=None, ge=0)
    fewshot_seed: int = 1234
    model: Literal["auto", "hflm", "backend"] = "auto"
    # filled when the lm-eval task is built (not part of the YAML)
    _output_type: str = PrivateAttr(default="")

    @property
    def bounded(self) -> bool:
        """lm-eval metrics are checked to be one number in [0, 1] per document (racing-safe)."""
        return True

    @field_validator("include_path")
    @classmethod
    def _non_empty_paths(cls, v: str | list[str] | None) -> str | list[str] | None:
        if isinstance(v, list) and (not v or any(not p for p in v)):
            raise ValueError("must be a folder or a non-empty list of folders")
        return v

    def model_post_init(self, _ctx: Any) -> None:
        if self.split is None and self.heldout_split is None:
            raise ValueError("split: required (the lm-eval split searched on), or heldout_split for a report-only task")
        if self.name is None:
            self.name = self.lm_eval_task

    @property
    def output_type(self) -> str:
        return self._output_type

    @property
    def needs_generation(self) -> bool:
        return self._output_type == "generate_until"

    def split_names(self) -> dict[str, str]:
        """evomerge split -> lm-eval split."""
        out = {}
        if self.split is not None:
            out["search"] = self.split
        if self.heldout_split is not None:
            out["heldout"] = self.heldout_split
        return out


# -- lm-eval import, offline --------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def require_lm_eval() -> Any:
    """Import lm-eval with every hub access switched off; TaskError when it is missing."""
    os.environ.update(OFFLINE_ENV)
    try:
        import datasets
        import huggingface_hub.constants as hub_constants
        import lm_eval
        import lm_eval.evaluator  # noqa: F401
        import lm_eval.tasks  # noqa: F401
    except ImportError as err:
        raise TaskError(f"lm-eval tasks need the lm-eval package ({INSTALL_HINT}): {err}") from None
    # already-imported modules read the variables at import time: force their constants too
    hub_constants.HF_HUB_OFFLINE = True
    datasets.config.HF_DATASETS_OFFLINE = True
    if hasattr(datasets.config, "HF_HUB_OFFLINE"):
        datasets.config.HF_HUB_OFFLINE = True
    return lm_eval


@functools.lru_cache(maxsize=1024)
def _compiled_template(env: Any, template: str) -> Any:
    return env.from_string(template)


@contextlib.contextmanager
def _lm_eval_session() -> Iterator[None]:
    """Around every lm-eval call: no progress bars, and Jinja templates compiled once.

    - datasets' and lm-eval's request-building progress bars are off: a search scores
      hundreds of candidates and each would print several bars;
    - lm-eval renders ``doc_to_text``/``doc_to_choice``/``doc_to_target`` templates with
      ``env.from_string(template)`` for every document on every call, and compiling them
      was ~75% of an evaluation of the zoo tasks here. While inside, ``apply_template``
      renders with the same environment from a cache of compiled templates (same output:
      a compiled template holds no state between renders).

    Both are put back on exit, so lm-eval used elsewhere in the process is unchanged.
    """
    import datasets
    import lm_eval.api.task as lm_task
    import lm_eval.utils as lm_utils
    from tqdm import tqdm

    env = lm_utils.env

    def apply_template(template: str, doc: dict) -> str:
        return _compiled_template(env, template).render(**doc)

    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    old_tqdm, old_apply = lm_task.tqdm, lm_utils.apply_template
    lm_task.tqdm = functools.partial(tqdm, disable=True)
    lm_utils.apply_template = apply_template
    try:
        yield
    finally:
        lm_task.tqdm, lm_utils.apply_template = old_tqdm, old_apply
        if bars:
            datasets.enable_progress_bars()


# -- loading ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _task_manager(include: tuple[str, ...], defaults: bool) -> Any:
    """One TaskManager per (include paths, defaults) per process: indexing lm-eval's ~15k
    built-in task YAMLs takes ~30 s here, a local folder milliseconds."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include) or None, include_defaults=defaults)


def _find_entry(spec: LMEvalTaskSpec, include: tuple[str, ...], where: str) -> tuple[Any, Any]:
    """(TaskManager, index entry) of the task: the local folders first, then lm-eval's own
    tasks unless ``include_defaults`` is false."""
    tries = []
    if include and spec.include_defaults is not True:
        tries.append(False)
    if spec.include_defaults is not False:
        tries.append(True)
    for defaults in tries:
        tm = _task_manager(include, defaults)
        entry = tm.task_index.get(spec.lm_eval_task)
        if entry is not None:
            return tm, entry
    looked = ", ".join(include) if include else "no include_path"
    if spec.include_defaults is not False:
        looked += " and lm-eval's built-in tasks"
    raise TaskError(f"{where}: lm_eval_task: unknown lm-eval task {spec.lm_eval_task!r} (looked in {looked})")


def _resolve_data_files(cfg: dict[str, Any], base: Path) -> None:
    """Relative local ``data_files`` (and a relative local ``dataset_path`` folder) are taken
    from the lm-eval YAML's folder when they exist there."""

    def fix(value: Any) -> Any:
        if isinstance(value, str):
            p = Path(value).expanduser()
            if not p.is_absolute() and (base / p).exists():
                return str((base / p).resolve())
            return value
        if isinstance(value, list):
            return [fix(v) for v in value]
        if isinstance(value, dict):
            return {k: fix(v) for k, v in value.items()}
        return value

    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict):
        for key in ("data_files", "data_dir"):
            if key in kwargs:
                kwargs[key] = fix(kwargs[key])
    path = cfg.get("dataset_path")
    if isinstance(path, str) and not Path(path).is_absolute() and (base / path).is_dir():
        cfg["dataset_path"] = str((base / path).resolve())


@dataclass
class _Loaded:
    """The lm-eval task objects of one wrapper, per evomerge split, and what to read."""

    tasks: dict[str, Any]  # evomerge split -> lm-eval ConfigurableTask evaluating that split
    metric: str
    filter: str
    output_type: str


_LOADED: dict[tuple[str, str], _Loaded] = {}


def _loaded_key(spec: LMEvalTaskSpec, path: Path) -> tuple[str, str]:
    """What decides the built lm-eval tasks (not ``model``/``fewshot_seed``: used per call)."""
    return str(Path(path).resolve()), spec.model_dump_json(exclude={"model", "fewshot_seed", "description"})


def _build_task(tm: Any, entry: Any, spec: LMEvalTaskSpec, lm_split: str, where: str) -> Any:
    """The lm-eval task with ``lm_split`` as its evaluation split (its ``test_split``)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    name = spec.lm_eval_task
    kind = getattr(getattr(entry, "kind", None), "name", "")
    if kind in ("GROUP", "TAG"):
        raise TaskError(
            f"{where}: lm_eval_task: {name!r} is an lm-eval {kind.lower()}; name one task "
            "(one wrapper YAML per task)"
        )
    if entry.yaml_path is None:
        raise TaskError(f"{where}: lm_eval_task: {name!r} has no YAML config (python-only task)")
    cfg = load_yaml(entry.yaml_path, resolve_func=True)
    cfg.pop("group", None)
    cfg.pop("tag", None)
    cfg["task"] = name
    _resolve_data_files(cfg, Path(entry.yaml_path).parent)
    cfg["test_split"] = lm_split
    if spec.num_fewshot is not None:
        cfg["num_fewshot"] = spec.num_fewshot
    try:
        built = tm.load([cfg])["tasks"]
    except Exception as err:  # noqa: BLE001 - datasets/lm-eval raise many kinds
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TaskError(
            f"{where}: cannot build lm-eval task {name!r} (split {lm_split!r}): {type(err).__name__}: {first}"
        ) from None
    task = built.get(name) or next(iter(built.values()))
    try:
        docs = task.eval_docs
    except (KeyError, ValueError) as err:
        raise TaskError(f"{where}: lm-eval task {name!r} has no split {lm_split!r}: {err}") from None
    if len(docs) == 0:
        raise TaskError(f"{where}: lm-eval task {name!r} has no documents in split {lm_split!r}")
    return task


def _check_task(task: Any, spec: LMEvalTaskSpec, where: str) -> tuple[str, str, str]:
    """(output type, metric, filter) after checking the task gives a deterministic score in
    [0, 1] per document that higher is better on."""
    name = spec.lm_eval_task
    out_type = task.OUTPUT_TYPE
    if out_type not in OUTPUT_TYPES:
        raise TaskError(f"{where}: lm-eval task {name!r} has unsupported output_type {out_type!r}")
    gen = dict(task.config.generation_kwargs or {}) if out_type == "generate_until" else {}
    if gen.get("do_sample") or float(gen.get("temperature", 0.0) or 0.0) > 0.0:
        raise TaskError(
            f"{where}: lm-eval task {name!r} samples (generation_kwargs do_sample/temperature): "
            "a search needs deterministic (greedy) fitness"
        )
    if int(task.config.repeats or 1) != 1:
        raise TaskError(f"{where}: lm-eval task {name!r} sets repeats: {task.config.repeats}; use 1")
    metrics = list(task.aggregation())
    metric = spec.metric or (metrics[0] if metrics else "")
    if metric not in metrics:
        raise TaskError(
            f"{where}: metric: {metric!r} is not a metric of lm-eval task {name!r} "
            f"({', '.join(metrics) or 'none'})"
        )
    if task.higher_is_better().get(metric) is False:
        raise TaskError(
            f"{where}: metric: {metric!r} of lm-eval task {name!r} is lower-is-better; fitness "
            "needs a per-document score in [0, 1] that higher is better on"
        )
    filters = [f["name"] for f in (task.config.filter_list or [])] or ["none"]
    filt = spec.filter or filters[0]
    if filt not in filters:
        raise TaskError(
            f"{where}: filter: {filt!r} is not a filter of lm-eval task {name!r} ({', '.join(filters)})"
        )
    return out_type, metric, filt


def _example(task: Any, doc_id: int, doc: Mapping[str, Any]) -> Example:
    """A document as an Example: lm-eval's prompt and target text (for reports and task
    fingerprints; scoring goes through lm-eval), ``record["doc_id"]`` its index."""
    text = task.doc_to_text(doc)
    target = task.doc_to_target(doc)
    choices = answer = None
    if task.OUTPUT_TYPE == "multiple_choice":
        options = [str(c) for c in task.doc_to_choice(doc)]
        if isinstance(text, int) and 0 <= text < len(options):  # e.g. winogrande: text is an index
            text = options[text]
        choices = tuple(options)
        if isinstance(target, int) and 0 <= target < len(options):
            answer = target
            target = options[target]
        elif isinstance(target, str) and target in options:
            answer = options.index(target)
    if isinstance(target, list):
        target = target[0] if target else ""
    return Example(str(text), str(target), choices, answer, {"doc_id": doc_id})


def load_lmeval_task(raw: dict[str, Any], path: Path, weight: float = 1.0) -> Task:
    """Build the Task of an lm-eval wrapper YAML: one Example per document of ``split``
    (evomerge's ``search``) and of ``heldout_split`` (``heldout``)."""
    try:
        spec = LMEvalTaskSpec.model_validate(raw)
    except ValidationError as err:
        raise TaskError(format_validation_error(err, path)) from None
    require_lm_eval()
    include = _include_paths(spec, path)
    where = str(path)
    splits: dict[str, list[Example]] = {}
    tasks: dict[str, Any] = {}
    checked: tuple[str, str, str] | None = None
    with _lm_eval_session():
        tm, entry = _find_entry(spec, include, where)
        for ev_split, lm_split in spec.split_names().items():
            task = _build_task(tm, entry, spec, lm_split, where)
            checked = checked or _check_task(task, spec, where)
            docs = task.eval_docs
            n = len(docs) if spec.num_examples is None else min(len(docs), spec.num_examples)
            splits[ev_split] = [_example(task, i, docs[i]) for i in range(n)]
            tasks[ev_split] = task
    assert checked is not None
    out_type, metric, filt = checked
    spec._output_type = out_type
    _LOADED[_loaded_key(spec, path)] = _Loaded(tasks, metric, filt, out_type)
    return Task(spec=spec, path=path, splits=splits, weight=float(weight))


def _include_paths(spec: LMEvalTaskSpec, path: Path) -> tuple[str, ...]:
    if spec.include_path is None:
        return ()
    items = [spec.include_path] if isinstance(spec.include_path, str) else spec.include_path
    out = []
    for item in items:
        p = resolve_path(path.parent, item)
        if not p.exists():
            raise TaskError(f"{path}: include_path: folder not found: {p}")
        out.append(str(p.resolve()))
    return tuple(out)


def _loaded(task: Task) -> _Loaded:
    key = _loaded_key(task.spec, task.path)
    if key not in _LOADED:  # a Task object made in another process (unpickled): build here
        load_lmeval_task(task.spec.model_dump(), Path(task.path), task.weight)
    return _LOADED[key]


# -- scoring ------------------------------------------------------------------------------


class _DocIds(list):
    """Sorted document ids for ``evaluate(samples=...)`` with O(1) membership tests (lm-eval
    tests ``i in samples`` for every document of the split)."""

    def __init__(self, ids: Sequence[int]):
        super().__init__(ids)
        self._set = frozenset(ids)

    def __contains__(self, item: object) -> bool:
        return item in self._set


def evaluate_lmeval_task(
    task: Task, split: str, generate: Generate, loglikelihood: Loglikelihood
) -> np.ndarray:
    """Per-example scores of ``task`` (an lm-eval wrapper) on ``split``, in example order,
    from lm-eval's per-document metric on the backend's current weights."""
    from lm_eval.evaluator import evaluate

    spec: LMEvalTaskSpec = task.spec  # type: ignore[assignment]
    loaded = _loaded(task)
    if split == "validation" and task.has_split(split) and split not in loaded.tasks:
        split_docs = "search"  # a validation carve-out: documents of the searched lm-eval split
    else:
        split_docs = split
    if split_docs not in loaded.tasks:
        raise TaskError(f"task {task.name} has no {split} split ({task.path} sets no heldout_split)")
    lm_task = loaded.tasks[split_docs]
    examples = task.examples(split)
    ids = [int(ex.record["doc_id"]) for ex in examples]
    if not ids:
        return np.zeros(0, dtype=np.float64)
    wanted = sorted(set(ids))
    everything = wanted == list(range(len(lm_task.eval_docs)))
    lm, is_hflm = pick_lm(spec.model, generate, loglikelihood, str(task.path))
    if not is_hflm and loaded.output_type == "loglikelihood" and loaded.metric == "acc":
        raise TaskError(
            f"{task.path}: metric acc of an lm-eval loglikelihood task needs greedy flags, "
            "which only model: hflm (the hf backend) gives"
        )
    name = lm_task.config.task
    lm_task.set_fewshot_seed(spec.fewshot_seed)
    with _lm_eval_session():
        res = evaluate(
            lm=lm,
            task_dict={"tasks": {name: lm_task}, "groups": {}, "group_map": {}},
            samples=None if everything else {name: _DocIds(wanted)},
            log_samples=True,
            bootstrap_iters=0,
        )
    by_id: dict[int, float] = {}
    for sample in (res or {}).get("samples", {}).get(name, []):
        if sample.get("filter") != loaded.filter:
            continue
        value = sample.get(loaded.metric)
        if isinstance(value, (bool, np.bool_)):
            value = float(value)
        if not isinstance(value, (int, float, np.floating, np.integer)) or not 0.0 <= float(value) <= 1.0:
            raise TaskError(
                f"{task.path}: metric {loaded.metric!r} of lm-eval task {name!r} gave {value!r} "
                "for one document; fitness needs one number in [0, 1] per document"
            )
        by_id[int(sample["doc_id"])] = float(value)
    missing = [i for i in wanted if i not in by_id]
    if missing:
        raise TaskError(
            f"{task.path}: lm-eval returned no {loaded.metric!r} for {len(missing)} document(s) "
            f"of task {name!r} (first: {missing[0]})"
        )
    return np.array([by_id[i] for i in ids], dtype=np.float64)


TASK_EVALUATORS["lm_eval"] = evaluate_lmeval_task  # scoring.evaluate_task dispatches lm_eval tasks here
