"""Scoring: per-example scores (in [0, 1] except raw ``loglik``) from model outputs, shared by every backend.

Two kinds of scorer, registered by the name a task YAML writes in ``scoring:``:

- generation scorers read greedy outputs (text, already cut at EOS / stop strings):
  ``exact_match`` (stripped strings equal), ``contains`` (stripped target is a substring),
  ``regex`` (group 1 of the first match, or the whole match, equals the stripped target),
  ``last_number`` (the last number in the output equals the target's number);
- log-likelihood scorers read, for each (context, continuation) request, the summed
  log-probability of the continuation's tokens and their count (:class:`Loglik`):
  ``multiple_choice`` (1 when the right choice has the highest log-likelihood; with
  ``length_normalize: true`` each sum is divided by the choice's length in characters
  first, like lm-eval's ``acc_norm``; characters, not tokens, so every backend agrees;
  ties go to the first choice) and ``neg_perplexity`` (``exp(-mean NLL per target
  token)``, the inverse perplexity of the target: 1 for a certain model, near 0 for a
  bad one, so it stays in [0, 1] and averages like the others) and ``loglik`` (the gold
  answer's log-probability, teacher-forced in one batched forward pass: mean per token or
  summed per answer, as a probability in [0, 1] or the raw log-probability; racing refuses
  the raw form, whose scores are unbounded). A generation task can mix it in with
  ``loglik_mix: w``: score = (1 - w) * generation score + w * loglik score; a less noisy
  fitness than exact match alone, at the cost of one forward pass.

A backend only has to provide ``generate(prompts, max_new_tokens, stop) -> list[str]`` and
``loglikelihood([(context, continuation)]) -> list[Loglik]``; :func:`evaluate_tasks` builds
the requests and scores the answers, so hf, vllm and api backends score the same way.

Fitness: :func:`combined_fitness` is the weighted mean of the task means, in [0, 1].
Tables multiply by 100 for display; nothing inside the search does.
:func:`flatten_scores` concatenates the per-example scores in a fixed task order: the
candidate x example row that per-example algorithms (M2N2) need.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:
    from .task_types import Example, Task, TaskSpec


@dataclass(frozen=True)
class Loglik:
    """Log-likelihood of one continuation given its context."""

    logprob: float  # sum of log p(token) over the continuation's tokens (natural log)
    num_tokens: int


@dataclass(frozen=True)
class Scorer:
    name: str
    needs: Literal["generation", "loglikelihood"]
    fn: Callable[..., np.ndarray]
    # TaskSpec field -> keyword argument of fn
    options: Mapping[str, str]


SCORERS: dict[str, Scorer] = {}


def register_scorer(
    name: str,
    needs: Literal["generation", "loglikelihood"],
    options: Mapping[str, str] | None = None,
):
    """Register ``fn(data, examples, **options) -> float array``. ``data`` is a list of output
    strings (generation) or, per example, a list of :class:`Loglik` (log-likelihood)."""

    def deco(fn):
        if name in SCORERS:
            raise ValueError(f"scorer {name!r} registered twice")
        SCORERS[name] = Scorer(name, needs, fn, dict(options or {}))
        return fn

    return deco


_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_last_number(text: str) -> float | None:
    """The last number written in ``text`` (thousands commas allowed), or None."""
    for match in reversed(_NUMBER.findall(text)):
        s = match.replace(",", "").rstrip(".")
        try:
            return float(s)
        except ValueError:
            continue
    return None


def truncate_at_stop(text: str, stop: Sequence[str]) -> str:
    """Cut ``text`` at the earliest occurrence of any stop string (the stop is dropped)."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1 and i < cut:
            cut = i
    return text[:cut]


@register_scorer("exact_match", "generation")
def exact_match(outputs: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
    return np.array([float(o.strip() == ex.target.strip()) for o, ex in zip(outputs, examples)])


@register_scorer("contains", "generation")
def contains(outputs: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
    return np.array([float(ex.target.strip() in o) for o, ex in zip(outputs, examples)])


@register_scorer("regex", "generation", {"regex": "pattern"})
def regex(outputs: Sequence[str], examples: Sequence[Example], pattern: str) -> np.ndarray:
    rx = re.compile(pattern)
    scores = []
    for o, ex in zip(outputs, examples):
        m = rx.search(o)
        if m is None:
            scores.append(0.0)
            continue
        got = m.group(1) if rx.groups >= 1 and m.group(1) is not None else m.group(0)
        scores.append(float(got.strip() == ex.target.strip()))
    return np.array(scores)


@register_scorer("last_number", "generation")
def last_number(outputs: Sequence[str], examples: Sequence[Example]) -> np.ndarray:
    scores = []
    for o, ex in zip(outputs, examples):
        got, want = parse_last_number(o), parse_last_number(ex.target)
        ok = (
            got is not None
            and want is not None
            and math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-9)
        )
        scores.append(float(ok))
    return np.array(scores)


@register_scorer("multiple_choice", "loglikelihood", {"length_normalize": "length_normalize"})
def multiple_choice(
    logliks: Sequence[Sequence[Loglik]], examples: Sequence[Example], length_normalize: bool = False
) -> np.ndarray:
    scores = []
    for per_choice, ex in zip(logliks, examples):
        assert ex.choices is not None and len(per_choice) == len(ex.choices)
        values = [
            ll.logprob / max(len(choice), 1) if length_normalize else ll.logprob
            for ll, choice in zip(per_choice, ex.choices)
        ]
        scores.append(float(int(np.argmax(values)) == ex.answer))
    return np.array(scores)


@register_scorer("neg_perplexity", "loglikelihood")
def neg_perplexity(logliks: Sequence[Sequence[Loglik]], examples: Sequence[Example]) -> np.ndarray:
    scores = []
    for (ll,), _ex in zip(logliks, examples):
        scores.append(math.exp(ll.logprob / max(ll.num_tokens, 1)))
    return np.clip(np.array(scores, dtype=np.float64), 0.0, 1.0)


@register_scorer("loglik", "loglikelihood", {"loglik_norm": "norm", "loglik_transform": "transform"})
def loglik(
    logliks: Sequence[Sequence[Loglik]], examples: Sequence[Example], norm: str = "token",
    transform: str = "prob",
) -> np.ndarray:
    """The gold answer's log-probability: mean per token (``norm="token"``) or summed over
    the answer (``"answer"``); ``transform="prob"`` returns ``exp`` of it (the geometric-mean
    token probability, or the answer's probability: in [0, 1]), ``"logprob"`` the raw value."""
    values = []
    for (ll,), _ex in zip(logliks, examples):
        values.append(ll.logprob / max(ll.num_tokens, 1) if norm == "token" else ll.logprob)
    out = np.array(values, dtype=np.float64)
    if transform == "prob":
        return np.clip(np.exp(out), 0.0, 1.0)
    return out


def loglik_requests(spec: TaskSpec, examples: Sequence[Example]) -> list[list[tuple[str, str]]]:
    """Per example, the (context, continuation) pairs a log-likelihood scorer needs."""
    if spec.scoring == "multiple_choice":
        return [[(ex.prompt, c) for c in ex.choices] for ex in examples]
    suffix = spec.loglik_suffix if (spec.scoring == "loglik" or spec.loglik_mix > 0) else ""
    return [[(ex.prompt, ex.target + suffix)] for ex in examples]


def score(spec: TaskSpec, examples: Sequence[Example], data: Sequence[Any]) -> np.ndarray:
    """Score a task's examples with the scorer its spec names (options taken from the spec)."""
    scorer = SCORERS[spec.scoring]
    kwargs = {kw: getattr(spec, field) for field, kw in scorer.options.items()}
    out = np.asarray(scorer.fn(data, examples, **kwargs), dtype=np.float64)
    assert out.shape == (len(examples),), (spec.name, out.shape)
    return out


Generate = Callable[[list[str], int, Sequence[str]], list[str]]
Loglikelihood = Callable[[list[tuple[str, str]]], list[Loglik]]

TASK_EVALUATORS: dict[str, Callable[..., np.ndarray]] = {}
"""Whole-task evaluators by ``scoring`` name, for task kinds that score themselves: called as
``fn(task, split, generate, loglikelihood)``. The module defining such a task's spec registers
it (:mod:`.lmeval` registers ``lm_eval``), so scoring never imports the modules above it."""


def evaluate_task(
    task: Task, split: str, generate: Generate, loglikelihood: Loglikelihood
) -> np.ndarray:
    """Run one task through a backend's two primitives and score it per example."""
    spec, examples = task.spec, task.examples(split)
    if spec.scoring in TASK_EVALUATORS:  # e.g. lm_eval: lm-eval-harness scores it, same primitives
        return TASK_EVALUATORS[spec.scoring](task, split, generate, loglikelihood)
    if spec.needs_generation:
        mix = float(spec.loglik_mix)
        gen = np.zeros(len(examples))
        if mix < 1.0:
            outputs = generate([ex.prompt for ex in examples], spec.max_new_tokens, list(spec.stop))
            outputs = [truncate_at_stop(o, spec.stop) for o in outputs]
            gen = score(spec, examples, outputs)
        if mix == 0.0:
            return gen
        results = loglikelihood([pair for (pair,) in loglik_requests(spec, examples)])
        ll = loglik([[r] for r in results], examples, spec.loglik_norm, spec.loglik_transform)
        return (1.0 - mix) * gen + mix * ll
    grouped = loglik_requests(spec, examples)
    flat = [pair for group in grouped for pair in group]
    results = loglikelihood(flat)
    assert len(results) == len(flat)
    per_example, i = [], 0
    for group in grouped:
        per_example.append(results[i : i + len(group)])
        i += len(group)
    return score(spec, examples, per_example)


def evaluate_tasks(
    tasks: Sequence[Task], split: str, generate: Generate, loglikelihood: Loglikelihood
) -> dict[str, np.ndarray]:
    return {t.name: evaluate_task(t, split, generate, loglikelihood) for t in tasks}


def combined_fitness(scores: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> float:
    """Weighted mean of the per-task mean scores, in [0, 1].

    Only tasks named in ``weights`` count (a run may also score report-only tasks).
    """
    total = sum(float(w) for w in weights.values())
    if not total > 0:
        raise ValueError("task weights must sum to a positive number")
    acc = 0.0
    for name, w in weights.items():
        if name not in scores:
            raise KeyError(f"no scores for task {name!r}")
        s = np.asarray(scores[name], dtype=np.float64)
        acc += float(w) * (float(s.mean()) if s.size else 0.0)
    return acc / total


def task_weights(tasks: Sequence[Task]) -> dict[str, float]:
    return {t.name: t.weight for t in tasks}


def flatten_scores(scores: Mapping[str, np.ndarray], task_order: Sequence[str]) -> np.ndarray:
    """Per-example scores of every task, concatenated in ``task_order`` (one candidate's row)."""
    return np.concatenate(
        [np.asarray(scores[name], dtype=np.float64).ravel() for name in task_order]
    )
