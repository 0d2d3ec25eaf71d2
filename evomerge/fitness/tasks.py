"""Fitness task definitions: one YAML file per task, its examples in JSONL beside it.

A task file names its data, how a record becomes a prompt, and how an answer is scored::

    name: cipher_a
    data: cipher_a.search.jsonl          # relative to the YAML; one JSON object per line
    heldout_data: cipher_a.heldout.jsonl # optional: for reports only, never searched on
    prompt: "{input}"                    # str.format template over the record's fields
    target_field: target
    scoring: exact_match                 # see evomerge.fitness.scoring.SCORERS
    max_new_tokens: 8

Everything is checked when the task is loaded, so a bad record fails before any model is
built, with one line naming the file (and line) and the field. Examples are rendered once
into :class:`Example` (final prompt text, with any few-shot prefix), so every backend
(hf, vllm, api) sees exactly the same prompts and scoring inputs.

Splits: ``search`` (the ``data`` file: what the optimizer sees), ``validation`` (the
``validation_data`` file, or when a task has none and the run asks for one, a deterministic
carve-out of the search data: :func:`carve_validation`; used to choose the run's final
model, never searched on) and ``heldout`` (the ``heldout_data`` file: reported, never
searched on nor selected on). ``num_examples`` keeps the first N records of each split, so a
run's examples are deterministic.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from ..errors import TaskError, format_validation_error
from .scoring import parse_last_number
from .task_types import SPLITS, Example, Task, TaskSpec, resolve_path  # noqa: F401  (re-exported)


def _check_template(template: str, where: str) -> None:
    """Refuse a malformed template (unbalanced braces) before reading any record."""
    try:
        list(string.Formatter().parse(template))
    except ValueError as err:
        raise TaskError(f"{where}: bad prompt template {template!r}: {err}") from None


def _read_jsonl(path: Path, task_name: str, what: str) -> list[tuple[int, dict[str, Any]]]:
    if not path.is_file():
        raise TaskError(f"task {task_name}: {what} file not found: {path}")
    records: list[tuple[int, dict[str, Any]]] = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise TaskError(f"{path}:{lineno}: bad JSON line: {err.msg}") from None
            if not isinstance(obj, dict):
                raise TaskError(
                    f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}"
                )
            records.append((lineno, obj))
    return records


def _render(spec: TaskSpec, record: dict[str, Any], where: str) -> Example:
    """Turn one record into an Example, checking every field the spec reads from it."""
    try:
        prompt = spec.prompt.format(**record)
    except KeyError as err:
        raise TaskError(
            f"{where}: prompt template field {err.args[0]!r} missing from record"
        ) from None
    except (IndexError, ValueError, AttributeError) as err:
        raise TaskError(f"{where}: cannot format prompt template {spec.prompt!r}: {err}") from None

    if spec.scoring == "multiple_choice":
        choices = record.get(spec.choices_field)
        if (
            not isinstance(choices, list)
            or not choices
            or not all(isinstance(c, str) and c for c in choices)
        ):
            raise TaskError(
                f"{where}: field {spec.choices_field!r} must be a non-empty list of non-empty strings"
            )
        answer = record.get(spec.answer_field)
        if (
            isinstance(answer, bool)
            or not isinstance(answer, int)
            or not 0 <= answer < len(choices)
        ):
            raise TaskError(
                f"{where}: field {spec.answer_field!r} must be an index into {spec.choices_field!r} "
                f"(0..{len(choices) - 1}), got {answer!r}"
            )
        return Example(prompt, choices[answer], tuple(choices), answer, record)

    if spec.target_field not in record:
        raise TaskError(f"{where}: target field {spec.target_field!r} missing from record")
    target = record[spec.target_field]
    if isinstance(target, (dict, list)) or target is None:
        raise TaskError(f"{where}: target field {spec.target_field!r} must be a string or number")
    target = str(target)
    if spec.scoring == "neg_perplexity" and not target:
        raise TaskError(
            f"{where}: target field {spec.target_field!r} is empty (scoring: neg_perplexity)"
        )
    if spec.scoring == "last_number" and parse_last_number(target) is None:
        raise TaskError(f"{where}: target {target!r} holds no number (scoring: last_number)")
    return Example(prompt, target, None, None, record)


def _load_split(spec: TaskSpec, path: Path, split: str, prefix: str) -> list[Example]:
    field = {"search": "data", "heldout": "heldout_data", "validation": "validation_data"}[split]
    data = resolve_path(path.parent, getattr(spec, field))
    records = _read_jsonl(data, spec.name, field)
    if spec.num_examples is not None:
        records = records[: spec.num_examples]
    if not records:
        raise TaskError(f"task {spec.name} has no examples in split {split} ({data})")
    out = []
    for lineno, record in records:
        ex = _render(spec, record, f"{data}:{lineno}")
        if prefix:
            ex = Example(prefix + ex.prompt, ex.target, ex.choices, ex.answer, ex.record)
        out.append(ex)
    return out


def _few_shot_prefix(spec: TaskSpec, path: Path) -> str:
    """The first ``few_shot`` examples of ``few_shot_data``, each as prompt + target."""
    if spec.few_shot == 0:
        return ""
    if spec.few_shot_data is None:
        raise TaskError(f"{path}: few_shot: {spec.few_shot} needs few_shot_data (a JSONL file)")
    fs_path = resolve_path(path.parent, spec.few_shot_data)
    records = _read_jsonl(fs_path, spec.name, "few_shot_data")
    if len(records) < spec.few_shot:
        raise TaskError(
            f"{path}: few_shot: {spec.few_shot} but {fs_path} has only {len(records)} examples"
        )
    shots = [_render(spec, rec, f"{fs_path}:{ln}") for ln, rec in records[: spec.few_shot]]
    sep = spec.few_shot_separator
    return "".join(ex.prompt + ex.target + sep for ex in shots)


def example_key(ex: Example) -> str:
    """A stable digest of one example (its prompt and reference), independent of file order."""
    return hashlib.sha256(json.dumps([ex.prompt, ex.target, ex.choices, ex.answer]).encode()).hexdigest()


def carve_validation(examples: list[Example], fraction: float) -> tuple[list[Example], list[Example]]:
    """Split ``examples`` into (search, validation), deterministically and disjointly.

    The validation part is the ``round(fraction * n)`` examples (at least 1, at most n - 1)
    with the smallest :func:`example_key`; both parts keep the original order. The choice
    depends only on the examples themselves, so reordering the file or changing the seed
    never moves an example between the parts."""
    n = len(examples)
    if n < 2:
        raise TaskError(f"a validation carve-out needs at least 2 search examples, got {n}")
    k = min(max(int(round(fraction * n)), 1), n - 1)
    order = sorted(range(n), key=lambda i: (example_key(examples[i]), i))
    chosen = set(order[:k])
    return ([ex for i, ex in enumerate(examples) if i not in chosen],
            [ex for i, ex in enumerate(examples) if i in chosen])


def with_validation(task: Task, fraction: float | None) -> Task:
    """``task`` with a validation split: its own, else (``fraction`` given) carved out of
    its search split, which then loses those examples."""
    if "validation" in task.splits:
        task.validation_source = task.validation_source or "file"
        return task
    if not fraction or "search" not in task.splits:
        return task
    search, validation = carve_validation(task.splits["search"], fraction)
    task.splits = {**task.splits, "search": search, "validation": validation}
    task.validation_source = f"carve-out {fraction:g}"
    return task


def load_task(path: str | Path, weight: float = 1.0,
              validation_fraction: float | None = None) -> Task:
    """Parse a task YAML and load (and check) every example of its splits.

    ``validation_fraction``: when the task has no ``validation_data``, carve that fraction
    of its search examples out as the validation split (:func:`carve_validation`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TaskError(f"task file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", None)
        where = f"{path}:{line + 1}" if line is not None else str(path)
        raise TaskError(f"{where}: invalid YAML") from None
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: expected a mapping of task fields")
    if raw.get("scoring") == "lm_eval":  # an lm-eval-harness task (optional extra)
        from .lmeval import load_lmeval_task

        return with_validation(load_lmeval_task(raw, path, weight=weight), validation_fraction)
    try:
        spec = TaskSpec.model_validate(raw)
    except ValidationError as err:
        raise TaskError(format_validation_error(err, path)) from None
    if spec.scoring == "regex":
        if not spec.regex:
            raise TaskError(f"{path}: regex: required when scoring is 'regex'")
        try:
            re.compile(spec.regex)
        except re.error as err:
            raise TaskError(f"{path}: regex: invalid pattern {spec.regex!r}: {err}") from None
    _check_template(spec.prompt, f"{path}: prompt")

    prefix = _few_shot_prefix(spec, path)
    splits = {"search": _load_split(spec, path, "search", prefix)}
    if spec.heldout_data is not None:
        splits["heldout"] = _load_split(spec, path, "heldout", prefix)
    if spec.validation_data is not None:
        splits["validation"] = _load_split(spec, path, "validation", prefix)
    task = Task(spec=spec, path=path, splits=splits, weight=float(weight))
    return with_validation(task, validation_fraction)


def load_tasks(entries: Iterable[Any], base_dir: str | Path | None = None) -> list[Task]:
    """Load a run's tasks. Each entry is a path, a ``{path, weight[, validation_fraction]}``
    mapping, or an object with ``path``/``weight`` attributes (a config model). Relative
    paths are taken from ``base_dir`` (the run config's folder) when given. Names must be
    unique."""
    base = Path(base_dir) if base_dir is not None else None
    tasks: list[Task] = []
    seen: dict[str, Path] = {}
    for i, entry in enumerate(entries):
        fraction = None
        if isinstance(entry, (str, Path)):
            rel, weight = entry, 1.0
        elif isinstance(entry, Mapping):
            if "path" not in entry:
                raise TaskError(f"tasks[{i}].path: field required")
            rel, weight = entry["path"], entry.get("weight", 1.0)
            fraction = entry.get("validation_fraction")
        else:
            rel, weight = entry.path, getattr(entry, "weight", 1.0)
        try:
            weight = float(weight)
        except (TypeError, ValueError):
            raise TaskError(f"tasks[{i}].weight: expected a number, got {weight!r}") from None
        if not weight >= 0.0:
            raise TaskError(f"tasks[{i}].weight: must be >= 0, got {weight}")
        p = Path(rel).expanduser()
        if base is not None and not p.is_absolute():
            p = base / p
        task = load_task(p, weight=weight, validation_fraction=fraction)
        if task.name in seen:
            raise TaskError(
                f"tasks[{i}]: task name {task.name!r} used twice ({seen[task.name]} and {p})"
            )
        seen[task.name] = p
        tasks.append(task)
    if not tasks:
        raise TaskError("no fitness tasks given")
    return tasks
