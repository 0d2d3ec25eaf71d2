"""Ensemble recipes (``ensemble.yaml``) and serving them behind one endpoint.

An output-level merge of API-only models cannot be written as weights: what is exported is
an *ensemble recipe*, the endpoints and how to mix their next-token distributions::

    format: 1
    kind: evomerge-ensemble
    name: zoo_mixture-rank1
    endpoints:
      - {name: m1, base_url: "http://127.0.0.1:8001/v1", model: expert_a, api_key_env: null}
      - {name: m2, base_url: "http://127.0.0.1:8002/v1", model: expert_b, api_key_env: MY_KEY}
    weights: [0.7, 0.3]        # one per endpoint, >= 0 (normalized when served)
    combine: linear            # or log_linear
    top_logprobs: 5            # alternatives asked per endpoint and step

Keys never appear in the file: ``api_key_env`` names the environment variable that holds
an endpoint's key when the ensemble is served (a field called ``api_key`` is refused).

``evomerge serve --ensemble ensemble.yaml`` serves it: :class:`EnsembleService` has
:class:`~evomerge.serve.server.ModelService`'s interface, so the same HTTP layer, auth
and OpenAI error shape apply. Completions and chat are greedy answers of the mixture
(:class:`~evomerge.fitness.backends.mixture_decoder.MixtureDecoder`); chat messages are joined by newlines
(the upstream endpoints' chat templates are not known here); ``logprobs`` are refused;
``usage`` counts generated tokens only (no local tokenizer for prompts). An upstream
failure (endpoint down, HTTP error after retries) answers 502 with one line naming it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import BackendError, ConfigError
from ..fitness.backends.mixture_decoder import (
    COMBINES,
    Endpoint,
    EndpointPool,
    MixtureDecoder,
    normalize_weights,
    read_keys,
)
from ..netclient import APIClient, RetryPolicy, read_api_key
from .server import MAX_TOP_LOGPROBS, OpenAIServer, RequestError, check_auth

ENSEMBLE_FILE = "ensemble.yaml"
ENSEMBLE_KIND = "evomerge-ensemble"
ENSEMBLE_FORMAT = 1
_FIELDS = ("format", "kind", "name", "endpoints", "weights", "combine", "top_logprobs")
_ENDPOINT_FIELDS = ("name", "base_url", "model", "api_key_env")


@dataclass
class Ensemble:
    endpoints: list[Endpoint]
    weights: list[float]
    combine: str = "linear"
    top_logprobs: int = 5
    name: str = "ensemble"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ENSEMBLE_FORMAT,
            "kind": ENSEMBLE_KIND,
            "name": self.name,
            "endpoints": [e.to_dict() for e in self.endpoints],
            "weights": [float(w) for w in self.weights],
            "combine": self.combine,
            "top_logprobs": int(self.top_logprobs),
        }


def parse_ensemble(data: Any, source: str = "ensemble") -> Ensemble:
    """Check an ensemble mapping; every problem is one ConfigError line naming the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level")
    for key in data:
        if key not in _FIELDS:
            hint = " (keys never go in the file: name their environment variable in endpoints[].api_key_env)" \
                if "key" in str(key) else ""
            raise ConfigError(f"{source}: {key}: unknown field{hint}")
    if data.get("format", ENSEMBLE_FORMAT) != ENSEMBLE_FORMAT:
        raise ConfigError(f"{source}: format: unsupported ensemble format {data.get('format')!r}")
    if data.get("kind", ENSEMBLE_KIND) != ENSEMBLE_KIND:
        raise ConfigError(f"{source}: kind: expected {ENSEMBLE_KIND!r}, got {data.get('kind')!r}")
    eps = data.get("endpoints")
    if not isinstance(eps, list) or not eps:
        raise ConfigError(f"{source}: endpoints: required, a non-empty list")
    endpoints = []
    for i, e in enumerate(eps):
        where = f"{source}: endpoints[{i}]"
        if not isinstance(e, dict):
            raise ConfigError(f"{where}: expected a mapping")
        for key in e:
            if key not in _ENDPOINT_FIELDS:
                hint = " (name the key's environment variable in api_key_env)" if "key" in str(key) else ""
                raise ConfigError(f"{where}.{key}: unknown field{hint}")
        url = e.get("base_url")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.base_url: required, an http(s) URL, got {url!r}")
        for key in ("name", "model", "api_key_env"):
            if e.get(key) is not None and not (isinstance(e[key], str) and e[key].strip()):
                raise ConfigError(f"{where}.{key}: must be a non-empty string or null, got {e[key]!r}")
        endpoints.append(Endpoint(name=e.get("name") or f"m{i + 1}", base_url=url, model=e.get("model"),
                                  api_key_env=e.get("api_key_env")))
    names = [e.name for e in endpoints]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: endpoints: names must be distinct, got {names}")
    weights = data.get("weights")
    if not isinstance(weights, list) or len(weights) != len(endpoints):
        raise ConfigError(f"{source}: weights: required, one number per endpoint ({len(endpoints)})")
    try:
        norm = normalize_weights(weights)
    except (BackendError, TypeError, ValueError):
        raise ConfigError(f"{source}: weights: must be finite numbers >= 0, got {weights!r}") from None
    combine = data.get("combine", "linear")
    if combine not in COMBINES:
        raise ConfigError(f"{source}: combine: must be one of {', '.join(COMBINES)}, got {combine!r}")
    top = data.get("top_logprobs", 5)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise ConfigError(f"{source}: top_logprobs: must be an integer >= 1, got {top!r}")
    name = data.get("name") or "ensemble"
    return Ensemble(endpoints, [float(w) for w in norm], combine, top, str(name))


def load_ensemble(path: str | Path) -> Ensemble:
    path = Path(path)
    if path.is_dir():
        path = path / ENSEMBLE_FILE
    if not path.is_file():
        raise ConfigError(f"ensemble file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    return parse_ensemble(data, str(path))


def _probe_model_id(url: str, key_env: str | None) -> str | None:
    """The only model an endpoint lists, or None (down, several models, key not set)."""
    try:
        client = APIClient(url, api_key=read_api_key(key_env) if key_env else None, timeout=5.0,
                           retry=RetryPolicy(0))
        try:
            listing = client.request("GET", "models")
        finally:
            client.close()
    except BackendError:
        return None
    data = listing.get("data") if isinstance(listing, dict) else None
    ids = [m.get("id") for m in data or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]
    return ids[0] if len(ids) == 1 else None


def ensemble_from_recipe(recipe: Mapping[str, Any], api_key_env: str | Mapping[str, str] | None = None,
                         default_top_logprobs: int = 5, model_ids: Mapping[str, str] | None = None,
                         name: str = "ensemble") -> Ensemble:
    """The ensemble of an ``output_mixture`` recipe. ``api_key_env``: one variable name for
    every endpoint or a mapping key -> name. Model ids come from ``model_ids`` (the recipe's
    or the given), else from the endpoint's ``/models`` when it answers, else null."""
    weights = dict(recipe["weights"])
    ids = {**dict(recipe.get("model_ids") or {}), **dict(model_ids or {})}
    endpoints = []
    for key in weights:
        url = str(recipe["sources"][key])
        url = url[len("api:"):] if url.startswith("api:") else url
        env = api_key_env.get(key) if isinstance(api_key_env, Mapping) else api_key_env
        model = ids.get(key) or _probe_model_id(url, env)
        endpoints.append(Endpoint(name=key, base_url=url, model=model, api_key_env=env))
    top = recipe.get("top_logprobs") or default_top_logprobs
    return Ensemble(endpoints, [float(w) for w in weights.values()], recipe.get("combine", "linear"), int(top), name)


def write_ensemble(ensemble: Ensemble, target: Path, card: Mapping[str, Any] | None = None,
                   recipe: Mapping[str, Any] | None = None) -> Path:
    """Write ``ensemble.yaml`` (+ ``README.md`` card and ``evomerge_recipe.yaml``) into ``target``."""
    from ..checkpoint.writer import CARD_FILE, RECIPE_FILE, render_model_card

    target = Path(target)
    target.mkdir(parents=True, exist_ok=True)
    if ensemble.name == "ensemble":
        ensemble.name = target.name
    (target / ENSEMBLE_FILE).write_text(yaml.safe_dump(ensemble.to_dict(), sort_keys=False), encoding="utf-8")
    if recipe is not None:
        (target / RECIPE_FILE).write_text(yaml.safe_dump(dict(recipe), sort_keys=False), encoding="utf-8")
    full = {
        "name": target.name,
        "description": (
            "An output-level ensemble of API-only models made with evomerge: greedy decoding from a "
            f"{ensemble.combine} mixture of the endpoints' next-token distributions. Serve it with "
            f"`evomerge serve --ensemble {ENSEMBLE_FILE}`."
        ),
        "method": "output_mixture",
        "sources": {e.name: e.base_url for e in ensemble.endpoints},
        "weights": {e.name: w for e, w in zip(ensemble.endpoints, ensemble.weights)},
        **dict(card or {}),
    }
    (target / CARD_FILE).write_text(render_model_card(full, recipe, {}), encoding="utf-8")
    return target


class EnsembleService:
    """:class:`~evomerge.serve.server.ModelService`'s interface over a mixture of endpoints."""

    def __init__(self, ensemble: Ensemble, *, model_name: str | None = None, concurrency: int = 8,
                 timeout: float = 60.0, max_retries: int = 2, prompts_per_request: int = 64):
        self.ensemble = ensemble
        self.pool = EndpointPool(ensemble.endpoints, read_keys(ensemble.endpoints), concurrency=concurrency,
                                 timeout=timeout, max_retries=max_retries, prompts_per_request=prompts_per_request)
        self.decoder = MixtureDecoder(self.pool, ensemble.weights, ensemble.combine, ensemble.top_logprobs)
        self.name = model_name or ensemble.name
        self.created = int(time.time())
        self.max_logprobs = MAX_TOP_LOGPROBS  # accepted by the parser, refused below with a clear line
        self.lock = threading.Lock()

    def __repr__(self) -> str:
        return f"EnsembleService({self.name!r}, {self.decoder!r})"

    def _generate(self, prompts: list[str], max_tokens: int, stop: list[str]) -> tuple[list[str], list[int]]:
        if max_tokens == 0:
            return [""] * len(prompts), [0] * len(prompts)
        try:
            return self.decoder.generate_counted(prompts, max_tokens, stop)
        except BackendError as err:
            raise RequestError(502, f"upstream endpoint failed: {err}") from None

    def complete(self, prompts: list[str], max_tokens: int, stop: list[str], echo: bool,
                 logprobs: int | None) -> tuple[list[dict[str, Any]], dict[str, int]]:
        if logprobs is not None:
            raise RequestError(400, "logprobs are not served by an ensemble (its upstream endpoints give them)",
                               "logprobs")
        texts, counts = self._generate(prompts, max_tokens, stop)
        choices = [{
            "index": i,
            "text": prompt + text if echo else text,
            "logprobs": None,
            "finish_reason": "length" if max_tokens == 0 or n >= max_tokens else "stop",
        } for i, (prompt, text, n) in enumerate(zip(prompts, texts, counts))]
        total = sum(counts)
        return choices, {"prompt_tokens": 0, "completion_tokens": total, "total_tokens": total}

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return "\n".join(m["content"] for m in messages)

    def chat(self, messages: list[dict[str, str]], max_tokens: int | None,
             stop: list[str]) -> tuple[dict[str, Any], dict[str, int]]:
        max_tokens = 256 if max_tokens is None else max_tokens
        (text,), (n,) = self._generate([self.render_chat(messages)], max_tokens, stop)
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": "length" if n >= max_tokens else "stop"}
        return choice, {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}

    def close(self) -> None:
        self.pool.close()


def make_ensemble_server(ensemble: str | Path | Ensemble, host: str = "127.0.0.1", port: int = 8000, *,
                         api_key_env: str | None = None, model_name: str | None = None,
                         concurrency: int = 8, timeout: float = 60.0, max_retries: int = 2,
                         no_auth: bool = False) -> OpenAIServer:
    """Bind an OpenAI-compatible server whose answers are the ensemble's (``port=0``: any free port).

    Keys (this server's and every endpoint's) are read before binding, so a missing
    variable fails fast with one line; beyond loopback a key is required (or ``no_auth``)."""
    key = read_api_key(api_key_env, field="--api-key-env")
    check_auth(host, key, no_auth)
    if not isinstance(ensemble, Ensemble):
        ensemble = load_ensemble(ensemble)
    service = EnsembleService(ensemble, model_name=model_name, concurrency=concurrency, timeout=timeout,
                              max_retries=max_retries)
    try:
        return OpenAIServer((host, int(port)), service, key, no_auth=no_auth)  # type: ignore[arg-type]
    except BaseException:
        service.close()
        raise
