"""OpenAI-compatible API backend: scores tasks on a fixed model behind an HTTP endpoint.

The model behind ``base_url`` is fixed: its weights cannot be swapped, so this backend is
for scoring endpoints as they are (a provider's model, ``evomerge serve`` of an exported
merge, the black-box merging that sends merge parameters rather than weights). A MergePlan
is accepted only when it is the identity of the checkpoint the endpoint is declared to
serve (``served_model_dir``); any other plan is refused with a :class:`BackendError`.

Requests (stdlib ``http.client``, one keep-alive connection per thread, no extra deps):

- generation: ``/completions`` with ``prompt`` (a list of up to ``prompts_per_request``
  prompts), or ``/chat/completions`` with one user message per request; ``temperature: 0``,
  ``max_tokens`` = the task's ``max_new_tokens``, the task's stop strings (at most
  ``max_stop`` are sent, OpenAI's limit is 4; every stop string is also applied here);
- log-likelihood (multiple_choice, neg_perplexity): ``/completions`` with
  ``prompt = context + continuation``, ``max_tokens: 0``, ``echo: true``, ``logprobs: 1``, as
  lm-eval's OpenAI completions backend does. The continuation's tokens are found from the
  echoed ``text_offset`` (no local tokenizer needed): every token that starts inside the
  prompt and covers a character after ``context.rstrip(" ")`` (trailing context spaces move
  to the continuation, as lm-eval and the HF backend split them). Chat endpoints give no
  prompt logprobs, so those tasks are refused before any request is sent.

Robustness: at most ``concurrency`` requests in flight (a thread pool); ``timeout`` seconds
per socket read; 408/409/429/5xx and connection errors/timeouts are retried up to
``max_retries`` times with exponential backoff and jitter (``Retry-After`` honoured, capped
at ``max_backoff``); other 4xx, malformed JSON, empty ``choices`` and missing logprobs fail
at once with one line. The API key is read from the environment variable *named* by
``api_key_env``; it is sent as ``Authorization: Bearer`` and never appears in an error, a
log line or a ``repr`` (it is held in a :class:`Secret` and scrubbed from server messages).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BackendError
from ...netclient import (  # noqa: F401  (re-exported: the client's names stay importable here)
    RETRY_STATUS,
    APIClient,
    RetryPolicy,
    Secret,
    parse_retry_after,
    read_api_key,
    redact_url,
    run_jobs,
    token_ends,
)
from ..scoring import Loglik, evaluate_task, truncate_at_stop
from .base import Backend, register_backend

_ENDPOINTS = ("completions", "chat")


# -- identity plans -----------------------------------------------------------------------


def identity_problem(plan: Any, served_dir: str | os.PathLike) -> str | None:
    """Why ``plan`` would produce weights other than ``served_dir``'s (None when it would not).

    A plan is the identity of a checkpoint when every step copies one tensor of that
    checkpoint unchanged under its own name (``passthrough`` with scale 1, or ``linear``
    of a single input that is normalized or weighted 1), with no config overrides and no
    dtype other than the checkpoint's.
    """
    from ...checkpoint.opener import open_checkpoint
    from ...ops import get_op

    plan.validate()  # an invalid plan is a PlanError, not an identity question
    served = Path(served_dir).expanduser().resolve()
    if plan.config_overrides:
        return f"it changes the config ({', '.join(sorted(plan.config_overrides))})"
    reader = None
    for step in plan.steps:
        spec = get_op(step.op)
        params = spec.resolve_params(step)
        if len(step.inputs) != 1 or step.base is not None:
            return f"tensor {step.output!r} combines {len(step.inputs)} inputs with {step.op!r}"
        if step.op == "passthrough":
            if float(params["scale"]) != 1.0:
                return f"tensor {step.output!r} is scaled by {params['scale']}"
        elif step.op == "linear":
            w = float(params["weight"][0])
            if not params["normalize"] and w != 1.0:
                return f"tensor {step.output!r} is weighted {w} without normalize"
        else:
            return f"tensor {step.output!r} goes through operator {step.op!r}"
        ref = step.inputs[0]
        if ref.tensor != step.output:
            return f"tensor {step.output!r} is read from {ref.tensor!r}"
        src = Path(plan.sources[ref.model]).expanduser().resolve()
        if src != served:
            return f"tensor {step.output!r} comes from {src}, not {served}"
        if reader is None:
            reader = open_checkpoint(served)
        if not reader.has(step.output):
            return f"tensor {step.output!r} is not in {served}"
        if plan.dtype:
            from ...checkpoint.writer import parse_dtype

            if parse_dtype(plan.dtype) != reader.dtype(step.output):
                return f"it casts to {plan.dtype} but {step.output!r} is {reader.dtype(step.output)}"
    return None


# -- the backend --------------------------------------------------------------------------


@register_backend("api")
class APIBackend(Backend):
    """Scores tasks through an OpenAI-compatible endpoint (see the module docstring).

    Options (``backend.options`` in a run config): ``base_url`` (required, e.g.
    ``http://127.0.0.1:8000/v1``), ``model`` (default: the only model ``/models`` lists),
    ``endpoint`` ("completions" or "chat"), ``api_key_env``, ``concurrency`` (4),
    ``timeout`` (60 s per read), ``max_retries`` (4), ``backoff`` (0.5 s), ``max_backoff``
    (30 s), ``prompts_per_request`` (1; completions only, servers that accept a list of
    prompts go faster with more), ``max_stop`` (4), ``system_prompt`` (chat),
    ``max_tokens_field`` ("max_tokens"; newer OpenAI chat models want
    "max_completion_tokens"), ``echo_max_tokens`` (0; servers that refuse 0 take 1, the
    generated token is ignored), ``seed`` (sent when given), ``headers`` (extra, not
    secret), ``served_model_dir`` (the checkpoint the endpoint serves, to accept identity
    plans). ``device``/``dtype``/``batch_size`` of the run config do not apply and are ignored.
    """

    def __init__(
        self,
        model_dir: str | None = None,
        device: str | None = None,
        dtype: Any = None,
        batch_size: int | None = None,
        *,
        base_url: str | None = None,
        model: str | None = None,
        endpoint: str = "completions",
        api_key_env: str | None = None,
        concurrency: int = 4,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 30.0,
        prompts_per_request: int = 1,
        max_stop: int = 4,
        system_prompt: str | None = None,
        max_tokens_field: str = "max_tokens",
        echo_max_tokens: int = 0,
        seed: int | None = None,
        headers: Mapping[str, str] | None = None,
        served_model_dir: str | None = None,
        **unknown: Any,
    ):
        if unknown:
            known = sorted(
                "base_url model endpoint api_key_env concurrency timeout max_retries backoff "
                "max_backoff prompts_per_request max_stop system_prompt max_tokens_field "
                "echo_max_tokens seed headers served_model_dir".split()
            )
            raise BackendError(
                f"backend.options.{sorted(unknown)[0]}: unknown option of the api backend; "
                f"known: {', '.join(known)}"
            )
        super().__init__(str(model_dir) if model_dir is not None else "", device)
        if not base_url:
            raise BackendError("backend.options.base_url: required by the api backend (e.g. http://127.0.0.1:8000/v1)")
        if endpoint not in _ENDPOINTS:
            raise BackendError(f"backend.options.endpoint: {endpoint!r} is not one of {', '.join(_ENDPOINTS)}")
        for name, value, low in (
            ("concurrency", concurrency, 1),
            ("prompts_per_request", prompts_per_request, 1),
            ("max_retries", max_retries, 0),
            ("max_stop", max_stop, 0),
            ("echo_max_tokens", echo_max_tokens, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BackendError(f"backend.options.{name}: must be an integer >= {low}, got {value!r}")
        if echo_max_tokens > 1:
            raise BackendError(f"backend.options.echo_max_tokens: must be 0 or 1, got {echo_max_tokens}")
        for name, value in (("timeout", timeout), ("backoff", backoff), ("max_backoff", max_backoff)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise BackendError(f"backend.options.{name}: must be a number of seconds >= 0, got {value!r}")
        self.endpoint = endpoint
        self.concurrency = concurrency
        self.prompts_per_request = prompts_per_request if endpoint == "completions" else 1
        self.max_stop = max_stop
        self.system_prompt = system_prompt
        self.max_tokens_field = max_tokens_field
        self.echo_max_tokens = echo_max_tokens
        self.seed = seed
        self.served_model_dir = served_model_dir
        self.options = {  # what repr/reports may show: the key's variable name, never the key
            "base_url": redact_url(base_url),
            "endpoint": endpoint,
            "api_key_env": api_key_env,
        }
        self.client = APIClient(
            base_url,
            api_key=read_api_key(api_key_env),
            timeout=timeout,
            retry=RetryPolicy(int(max_retries), float(backoff), float(max_backoff)),
            headers=headers,
            key_hint=api_key_env,
            seed=seed,
        )
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()
        self._task: str | None = None
        self.model = model if model is not None else self._only_model()

    def __repr__(self) -> str:
        return f"APIBackend(base_url={self.client.url('')!r}, model={self.model!r}, endpoint={self.endpoint!r})"

    def _only_model(self) -> str:
        listing = self.client.request("GET", "models")
        data = listing.get("data") if isinstance(listing, dict) else None
        ids = [m.get("id") for m in data or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]
        if len(ids) != 1:
            raise BackendError(
                f"backend.options.model: required: {self.client.url('models')} lists "
                f"{len(ids)} models{' (' + ', '.join(ids[:5]) + ')' if ids else ''}"
            )
        return ids[0]

    @property
    def stats(self) -> dict[str, Any]:
        return self.client.stats

    # -- weights ----------------------------------------------------------------------
    def target_tensors(self) -> Mapping[str, Any]:
        return {}

    def load_plan(self, plan: Any, materializer: Any) -> None:
        """Accept only a plan that changes nothing about the served model (see module doc)."""
        if plan is None or not plan.steps:
            return
        where = f"the api backend cannot change the weights served at {self.client.url('')} (model {self.model!r})"
        if not self.served_model_dir:
            raise BackendError(
                f"{where}: plan {plan.hash()} needs merged weights; the api backend scores fixed "
                "endpoints (set backend.options.served_model_dir to score the served checkpoint itself)"
            )
        problem = identity_problem(plan, self.served_model_dir)
        if problem is not None:
            raise BackendError(f"{where}: plan {plan.hash()} is not the served checkpoint: {problem}")

    # -- concurrency ------------------------------------------------------------------
    def _run_all(self, jobs: Sequence[Callable[[], Any]]) -> list[Any]:
        """Run ``jobs`` with at most ``concurrency`` in flight; results in order. The first
        error cancels what has not started and is raised."""
        if self.concurrency == 1 or len(jobs) <= 1:
            return [job() for job in jobs]
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="evomerge-api")
            pool = self._pool
        return run_jobs(pool, jobs)

    # -- generation -------------------------------------------------------------------
    def _where(self) -> str:
        return f"task {self._task}: " if self._task else ""

    def _choices(self, resp: Any, expected: int, path: str) -> list[dict[str, Any]]:
        url = self.client.url(path)
        if not isinstance(resp, dict):
            raise BackendError(f"{self._where()}{url}: response is not a JSON object")
        choices = resp.get("choices")
        if not isinstance(choices, list) or not choices:
            raise BackendError(f"{self._where()}{url}: response has no choices")
        if not all(isinstance(c, dict) for c in choices):
            raise BackendError(f"{self._where()}{url}: malformed choices (not JSON objects)")
        if len(choices) != expected:
            raise BackendError(
                f"{self._where()}{url}: {len(choices)} choices for {expected} prompt(s) "
                "(does the server accept a list of prompts? set prompts_per_request: 1)"
            )
        if all(isinstance(c.get("index"), int) for c in choices):
            choices = sorted(choices, key=lambda c: c["index"])
        return choices

    def _sampling(self, max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, self.max_tokens_field: int(max_tokens), "temperature": 0}
        if self.seed is not None:
            body["seed"] = int(self.seed)
        return body

    def _complete(self, prompts: list[str], max_new_tokens: int, stop: list[str]) -> list[str]:
        body = self._sampling(max_new_tokens)
        body["prompt"] = prompts[0] if len(prompts) == 1 else prompts
        if stop:
            body["stop"] = stop
        resp = self.client.request("POST", "completions", body)
        texts = []
        for c in self._choices(resp, len(prompts), "completions"):
            text = c.get("text")
            if not isinstance(text, str):
                raise BackendError(f"{self._where()}{self.client.url('completions')}: a choice has no 'text'")
            texts.append(text)
        return texts

    def _chat(self, prompt: str, max_new_tokens: int, stop: list[str]) -> list[str]:
        messages = []
        if self.system_prompt:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": prompt})
        body = self._sampling(max_new_tokens)
        body["messages"] = messages
        if stop:
            body["stop"] = stop
        resp = self.client.request("POST", "chat/completions", body)
        (choice,) = self._choices(resp, 1, "chat/completions")
        message = choice.get("message")
        content = message.get("content") if isinstance(message, dict) else None
        if content is None and isinstance(message, dict) and not message.get("refusal"):
            content = ""  # some servers send null content for an empty answer
        if not isinstance(content, str):
            raise BackendError(
                f"{self._where()}{self.client.url('chat/completions')}: a choice has no message content"
            )
        return [content]

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        """Greedy completions of ``prompts`` (temperature 0), cut at every stop string."""
        prompts = list(prompts)
        if not prompts:
            return []
        sent = list(stop)[: self.max_stop]
        if self.endpoint == "chat":
            jobs = [lambda p=p: self._chat(p, max_new_tokens, sent) for p in prompts]
        else:
            n = self.prompts_per_request
            jobs = [
                lambda chunk=prompts[i : i + n]: self._complete(chunk, max_new_tokens, sent)
                for i in range(0, len(prompts), n)
            ]
        texts = [t for chunk in self._run_all(jobs) for t in chunk]
        return [truncate_at_stop(t, stop) for t in texts]

    # -- log-likelihood ---------------------------------------------------------------
    def _echo(self, pairs: list[tuple[str, str]]) -> list[Loglik]:
        prompts = [ctx + cont for ctx, cont in pairs]
        body = self._sampling(self.echo_max_tokens)
        body.update(prompt=prompts[0] if len(prompts) == 1 else prompts, echo=True, logprobs=1)
        resp = self.client.request("POST", "completions", body)
        choices = self._choices(resp, len(prompts), "completions")
        return [self._continuation_loglik(c, ctx, cont) for c, (ctx, cont) in zip(choices, pairs)]

    def _continuation_loglik(self, choice: dict[str, Any], context: str, continuation: str) -> Loglik:
        url = self.client.url("completions")
        lp = choice.get("logprobs")
        token_lps = lp.get("token_logprobs") if isinstance(lp, dict) else None
        if not isinstance(token_lps, list) or not token_lps:
            raise BackendError(
                f"{self._where()}{url}: the response has no logprobs, which log-likelihood "
                "scoring (multiple_choice, neg_perplexity) needs (echo + logprobs unsupported?)"
            )
        offsets = lp.get("text_offset")
        if not isinstance(offsets, list) or len(offsets) != len(token_lps):
            tokens = lp.get("tokens")
            if isinstance(tokens, list) and len(tokens) == len(token_lps) and all(isinstance(t, str) for t in tokens):
                offsets, pos = [], 0
                for t in tokens:
                    offsets.append(pos)
                    pos += len(t)
            else:
                raise BackendError(f"{self._where()}{url}: logprobs without text_offset or tokens")
        if not all(isinstance(o, int) for o in offsets) or any(
            b < a for a, b in zip(offsets, offsets[1:])
        ):
            raise BackendError(f"{self._where()}{url}: malformed logprobs.text_offset (not non-decreasing integers)")
        prompt_len = len(context) + len(continuation)
        boundary = len(context.rstrip(" "))
        ends = token_ends(offsets, prompt_len)
        total, count = 0.0, 0
        for i, (start, end, value) in enumerate(zip(offsets, ends, token_lps)):
            if start >= prompt_len:
                break  # echo_max_tokens: 1 adds a generated token after the prompt
            if min(end, prompt_len) <= boundary:
                continue  # a context token
            if value is None and i == 0 and len(offsets) > 1 and offsets[1] == start:
                continue  # a zero-width BOS before an empty context: it has no logprob
            if value is None:
                raise BackendError(
                    f"{self._where()}{url}: no logprob for a continuation token at offset {start} "
                    "(an empty context with no BOS cannot be scored)"
                )
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BackendError(f"{self._where()}{url}: malformed token_logprobs value {value!r}")
            total += float(value)
            count += 1
        if count == 0:
            raise BackendError(
                f"{self._where()}{url}: no continuation tokens in the echoed logprobs for {continuation!r}"
            )
        return Loglik(total, count)

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[Loglik]:
        """Summed log p(continuation | context) per request, from echoed prompt logprobs."""
        requests = list(requests)
        if not requests:
            return []
        if self.endpoint == "chat":
            raise BackendError(self._chat_refusal(self._task))
        n = self.prompts_per_request
        jobs = [lambda chunk=requests[i : i + n]: self._echo(chunk) for i in range(0, len(requests), n)]
        return [ll for chunk in self._run_all(jobs) for ll in chunk]

    def _chat_refusal(self, task: str | None, scoring: str | None = None) -> str:
        what = f"task {task} (scoring: {scoring})" if task and scoring else (f"task {task}" if task else "log-likelihood scoring")
        return (
            f"{what} needs prompt log-likelihoods, which chat endpoints cannot give; use "
            "backend.options.endpoint: completions (echo + logprobs)"
        )

    # -- the Backend contract ---------------------------------------------------------
    def evaluate(self, tasks, split: str = "search") -> dict[str, np.ndarray]:
        if self.endpoint == "chat":
            for t in tasks:
                if not t.spec.needs_generation:
                    raise BackendError(self._chat_refusal(t.name, t.spec.scoring))
        out: dict[str, np.ndarray] = {}
        try:
            for t in tasks:
                self._task = t.name
                out[t.name] = evaluate_task(t, split, self.generate, self.loglikelihood)
        finally:
            self._task = None
        return out

    def close(self) -> None:
        with self._pool_lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self.client.close()
