"""``mixture`` backend: scores tasks through an output-level mixture of API-only endpoints.

The run's models are ``api:<base_url>`` references and its space is ``output_mixture``:
each candidate's control plan (op ``output_mixture``) names the endpoints (its sources) and
the mixture weights. :meth:`MixtureBackend.load_plan` reads them; :meth:`evaluate` scores
every task per example through :class:`~evomerge.fitness.backends.mixture_decoder.MixtureDecoder`, with the
same scoring code as every other backend (so a task's scorer, stop strings and
``max_new_tokens`` apply unchanged). Connections (keep-alive), model ids and keys are kept
across candidates in one :class:`~evomerge.fitness.backends.mixture_decoder.EndpointPool`.

Options (``backend.options``): ``api_key_env`` (one environment variable *name* for every
endpoint, or a mapping model key -> name; keys are read from the environment and never
stored), ``top_logprobs`` (5; used when the space does not set it), ``concurrency`` (8
requests in flight), ``timeout`` (60 s), ``max_retries`` (2), ``backoff`` (0.5 s),
``prompts_per_request`` (64), ``model_ids`` (key -> model id; default: the only model an
endpoint lists), ``eos_tokens`` (extra token texts that end an answer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ...errors import BackendError
from ...netclient import read_api_key
from ...ops.mixture_control import MIXTURE_OUTPUT
from ..scoring import evaluate_task
from .base import Backend, register_backend
from .mixture_decoder import DEFAULT_EOS_TOKENS, Endpoint, EndpointPool, MixtureDecoder

_KNOWN = ("api_key_env", "top_logprobs", "concurrency", "timeout", "max_retries", "backoff",
          "prompts_per_request", "model_ids", "eos_tokens")


@register_backend("mixture")
class MixtureBackend(Backend):
    def __init__(self, model_dir: str | None = None, device: str | None = None, dtype: Any = None,
                 batch_size: int | None = None, *, api_key_env: str | Mapping[str, str] | None = None,
                 top_logprobs: int = 5, concurrency: int = 8, timeout: float = 60.0, max_retries: int = 2,
                 backoff: float = 0.5, prompts_per_request: int = 64,
                 model_ids: Mapping[str, str] | None = None, eos_tokens: list[str] | None = None,
                 **unknown: Any):
        if unknown:
            raise BackendError(f"backend.options.{sorted(unknown)[0]}: unknown option of the mixture backend; "
                               f"known: {', '.join(_KNOWN)}")
        super().__init__(str(model_dir or ""), device)
        if api_key_env is not None and not isinstance(api_key_env, (str, Mapping)):
            raise BackendError("backend.options.api_key_env: one environment variable name, or a mapping "
                               f"model key -> name, got {api_key_env!r}")
        for name, value, low in (("top_logprobs", top_logprobs, 1), ("concurrency", concurrency, 1),
                                 ("max_retries", max_retries, 0), ("prompts_per_request", prompts_per_request, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise BackendError(f"backend.options.{name}: must be an integer >= {low}, got {value!r}")
        for name, value in (("timeout", timeout), ("backoff", backoff)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise BackendError(f"backend.options.{name}: must be a number of seconds >= 0, got {value!r}")
        if model_ids is not None and not isinstance(model_ids, Mapping):
            raise BackendError(f"backend.options.model_ids: a mapping model key -> model id, got {model_ids!r}")
        if eos_tokens is not None and (not isinstance(eos_tokens, list)
                                       or not all(isinstance(t, str) and t for t in eos_tokens)):
            raise BackendError(f"backend.options.eos_tokens: a list of non-empty strings, got {eos_tokens!r}")
        self.api_key_env = api_key_env
        self.top_logprobs = top_logprobs
        self.pool_options = dict(concurrency=concurrency, timeout=float(timeout), max_retries=max_retries,
                                 backoff=float(backoff), prompts_per_request=prompts_per_request,
                                 eos_tokens=tuple(DEFAULT_EOS_TOKENS) + tuple(eos_tokens or ()))
        self.model_ids = dict(model_ids or {})
        self.options = {"api_key_env": api_key_env}  # names only, never keys
        self.pool: EndpointPool | None = None
        self.decoder: MixtureDecoder | None = None

    def __repr__(self) -> str:
        return f"MixtureBackend({self.decoder!r})"

    @property
    def stats(self) -> dict[str, Any]:
        return self.pool.stats if self.pool is not None else {}

    def target_tensors(self) -> Mapping[str, Any]:
        return {}

    def _key_env(self, key: str) -> str | None:
        if isinstance(self.api_key_env, Mapping):
            return self.api_key_env.get(key)
        return self.api_key_env

    def _endpoints(self, plan: Any, step: Any) -> list[Endpoint]:
        ids = {**self.model_ids, **dict(plan.meta.get("model_ids") or {})}
        out = []
        for ref in step.inputs:
            src = plan.sources[ref.model]
            if not src.startswith("api:"):
                raise BackendError(f"model {ref.model!r}: the mixture backend needs api:<base_url> sources, got {src!r}")
            out.append(Endpoint(ref.model, src[len("api:"):], ids.get(ref.model), self._key_env(ref.model)))
        return out

    def load_plan(self, plan: Any, materializer: Any) -> None:
        """Take the mixture (endpoints, weights, combine, top_logprobs) of a control plan."""
        from ...ops import get_op

        if plan is None or len(plan.steps) != 1 or plan.steps[0].op != "output_mixture":
            raise BackendError("the mixture backend runs output_mixture control plans only "
                               "(space.type: output_mixture)")
        plan.validate()
        step = plan.steps[0]
        assert step.output == MIXTURE_OUTPUT, step.output
        params = get_op("output_mixture").resolve_params(step)
        endpoints = self._endpoints(plan, step)
        if self.pool is None or [e.to_dict() for e in self.pool.endpoints] != [e.to_dict() for e in endpoints]:
            if self.pool is not None:
                self.pool.close()
            keys = {e.name: read_api_key(e.api_key_env, field=f"backend.options.api_key_env ({e.name})")
                    for e in endpoints}
            self.pool = EndpointPool(endpoints, keys, **self.pool_options)
        top = int(step.params["top_logprobs"]) if "top_logprobs" in step.params else self.top_logprobs
        self.decoder = MixtureDecoder(self.pool, params["weight"], str(params["combine"]), top)

    def evaluate(self, tasks, split: str = "search") -> dict[str, np.ndarray]:
        if self.decoder is None:
            raise BackendError("the mixture backend has no mixture loaded (load_plan first)")
        out: dict[str, np.ndarray] = {}
        for t in tasks:
            try:
                out[t.name] = evaluate_task(t, split, self.decoder.generate, self.decoder.loglikelihood)
            except BackendError as err:
                raise BackendError(f"task {t.name}: {err}") from None
        return out

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None
