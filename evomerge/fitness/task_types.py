"""The task types every fitness module shares: :class:`TaskSpec`, :class:`Example`, :class:`Task`.

A floor below loading (:mod:`.tasks`), scoring's evaluation and lm-eval tasks (:mod:`.lmeval`):
it imports only the scorer registry (:mod:`.scoring`, to validate ``scoring:``) and errors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import TaskError
from .scoring import SCORERS

SPLITS = ("search", "validation", "heldout")


class TaskSpec(BaseModel):
    """The YAML of one task. Unknown fields are refused (a typo must not be silently ignored)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    description: str = ""
    data: str
    heldout_data: str | None = None
    validation_data: str | None = None
    prompt: str = "{input}"
    target_field: str = "target"
    scoring: str = "exact_match"
    # 'regex' scoring: the answer is group 1 of the first match in the output (the whole
    # match when the pattern has no group), compared with the stripped target.
    regex: str | None = None
    # 'multiple_choice': the record's list of continuation strings and the right index.
    choices_field: str = "choices"
    answer_field: str = "answer"
    # 'multiple_choice': divide each choice's summed log-likelihood by its length in
    # characters before the argmax (lm-eval's acc_norm), so long choices are not penalized.
    length_normalize: bool = False
    # 'loglik' scoring (and loglik_mix): the gold answer's log-probability, teacher-forced.
    # norm: 'token' = mean log-prob per answer token, 'answer' = summed over the answer;
    # transform: 'prob' = exp of it (geometric-mean token probability / answer probability,
    # in [0, 1], racing-safe), 'logprob' = the raw value (<= 0, unbounded: no racing).
    loglik_norm: Literal["token", "answer"] = "token"
    loglik_transform: Literal["prob", "logprob"] = "prob"
    # appended to the gold answer when its log-probability is scored (e.g. the EOS text, so
    # a model that does not stop after the answer is penalized like exact match does)
    loglik_suffix: str = ""
    # generation scorers: score = (1 - mix) * generation score + mix * loglik score
    loglik_mix: float = Field(default=0.0, ge=0.0, le=1.0)
    max_new_tokens: int = Field(default=8, ge=1)
    stop: list[str] = Field(default_factory=list)
    num_examples: int | None = Field(default=None, ge=1)
    few_shot: int = Field(default=0, ge=0)
    few_shot_data: str | None = None
    few_shot_separator: str = "\n"

    @field_validator("scoring")
    @classmethod
    def _known_scoring(cls, value: str) -> str:
        if value not in SCORERS:
            raise ValueError(f"unknown scoring {value!r}; known: {', '.join(sorted(SCORERS))}")
        return value

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @property
    def needs_generation(self) -> bool:
        return SCORERS[self.scoring].needs == "generation"

    @property
    def bounded(self) -> bool:
        """Per-example scores lie in [0, 1] (racing's bound and combined tables assume it)."""
        return not (self.scoring == "loglik" and self.loglik_transform == "logprob")

    @model_validator(mode="after")
    def _check_loglik_mix(self) -> TaskSpec:
        if self.loglik_mix > 0 and not self.needs_generation:
            raise ValueError(f"loglik_mix: only for generation scorers, not {self.scoring!r}")
        if self.loglik_mix > 0 and self.loglik_transform != "prob":
            raise ValueError("loglik_mix: mixing with a generation score needs loglik_transform: prob")
        return self


@dataclass(frozen=True)
class Example:
    """One rendered example: what a backend sends, and what the scorer compares against.

    ``prompt`` already holds the few-shot prefix. ``target`` is the reference answer text
    (for multiple choice: the right choice). ``choices``/``answer`` are set for
    multiple-choice tasks only. ``record`` is the raw JSON object, for reports.
    """

    prompt: str
    target: str
    choices: tuple[str, ...] | None = None
    answer: int | None = None
    record: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


@dataclass
class Task:
    """A parsed task spec with its examples loaded for each split it has."""

    spec: TaskSpec
    path: Path
    splits: dict[str, list[Example]]
    weight: float = 1.0
    #: where the validation split comes from: "file", "carve-out <fraction>" or None
    validation_source: str | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def has_split(self, split: str) -> bool:
        return split in self.splits

    def examples(self, split: str = "search") -> list[Example]:
        if split not in SPLITS:
            raise TaskError(f"unknown split {split!r}; known: {', '.join(SPLITS)}")
        if split not in self.splits:
            field = {"search": "data", "heldout": "heldout_data",
                     "validation": "validation_data"}[split]
            if self.spec.scoring == "lm_eval":
                field = {"search": "split", "heldout": "heldout_split",
                         "validation": "a validation carve-out"}[split]
            raise TaskError(f"task {self.name} has no {split} split ({self.path} sets no {field})")
        return self.splits[split]

    def fingerprint(self) -> str:
        """sha256 over the spec and every rendered example: changes when the task changes."""
        h = hashlib.sha256(self.spec.model_dump_json().encode())
        for split in sorted(self.splits):
            h.update(split.encode())
            for ex in self.splits[split]:
                h.update(json.dumps([ex.prompt, ex.target, ex.choices, ex.answer]).encode())
        return h.hexdigest()


def resolve_path(base: Path, rel: str) -> Path:
    """``rel`` (``~`` expanded) taken relative to ``base`` unless it is absolute."""
    p = Path(rel).expanduser()
    return p if p.is_absolute() else base / p
