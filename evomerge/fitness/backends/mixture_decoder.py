"""Output-level merging: greedy decoding from a weighted mixture of API-only models.

When a provider offers only text and logprobs, weights cannot be merged at all; what can be
merged is the models' *next-token distributions*. :class:`MixtureDecoder` decodes greedily,
one token per step, over N OpenAI-compatible ``/completions`` endpoints:

1. every step sends one request per endpoint (and per chunk of ``prompts_per_request``
   prompts) with the batch's current texts (prompt + answer so far), ``max_tokens: 1``,
   ``temperature: 0`` and ``logprobs: k``; the endpoints are queried concurrently;
2. per prompt, each endpoint's reply gives its top-k next tokens with logprobs. They are
   combined over the union of the listed tokens:

   - ``linear``:     score(t) = sum_i w_i p_i(t)          (a mixture of distributions)
   - ``log_linear``: score(t) = sum_i w_i log p_i(t)      (a product of experts; the
     normalization does not change the argmax)

   A token that endpoint i did not list gets i's *floor*: ``min(smallest listed p,
   1 - sum of listed p)``. That is the largest probability the unlisted token can have
   (it is not more likely than anything in the top-k, and all unlisted tokens share the
   leftover mass), so the floor never lets a missing token outrank a listed one of the
   same endpoint, and it is 0 (exact) when the top-k covers the vocabulary. For
   ``log_linear`` the floor is bounded below by ``1e-12`` so log stays finite.
   Endpoints with weight 0 are not queried at all (a one-endpoint mixture *is* that model);
3. the argmax token (ties: the first listed, in endpoint order) is appended as text; the
   answer ends at EOS, at a stop string (cut before it, checked client-side on the whole
   answer so a stop spanning two steps is found) or after ``max_new_tokens`` tokens.

EOS: a token is EOS when its text is one of ``eos_tokens`` (``</s>``, ``<|endoftext|>``,
``<|im_end|>``, ... by default), when it is empty (servers that skip special tokens), or
when an endpoint ended a completion with it (``finish_reason: "stop"`` with empty text and
the token listed in ``logprobs``: such tokens are learned per endpoint). An endpoint that
ends with ``finish_reason: "stop"``, empty text and *no* logprobs entry (``evomerge serve``
without ``--logprobs-eos``, many servers) tells only that its greedy choice is EOS: it then
counts as p(EOS) = 1 for that step, an approximation; start our servers with
``--logprobs-eos`` for the exact distribution at the end of answers.

Tokens are matched across endpoints by their text, so the mixture is meaningful for
endpoints sharing a tokenizer (the usual case: fine-tunes of one base). Each step resends
the text, which the server re-tokenizes: exact for tokenizers whose tokenization of the
concatenation keeps the chosen tokens (character-level, most BPE answers).

Log-likelihood (tasks scored by ``multiple_choice`` / ``neg_perplexity``) is read from
echoed prompt logprobs, one request per endpoint, as the ``api`` backend does: ``linear``
is exact per token (log sum_i w_i p_i(token)); ``log_linear`` is normalized over the union
of the endpoints' top-k alternatives at each position (exact when top-k covers the
vocabulary). The endpoints must tokenize the continuation identically (checked).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ...errors import BackendError
from ...netclient import (
    APIClient,
    RetryPolicy,
    Secret,
    read_api_key,
    redact_url,
    run_jobs,
    token_ends,
)
from ..scoring import Loglik, truncate_at_stop

COMBINES = ("linear", "log_linear")
DEFAULT_EOS_TOKENS = ("</s>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<eos>",
                      "<|end|>", "<end_of_turn>")
EOS = "\x00<eos>"  # the key EOS tokens of every endpoint are mapped to (never a real token text)
LOG_FLOOR = 1e-12


@dataclass(frozen=True)
class Endpoint:
    """One OpenAI-compatible completions endpoint of a mixture.

    ``model``: the id sent in requests (None: the only model ``/models`` lists);
    ``api_key_env``: the *name* of the environment variable holding its key (never the key).
    """

    name: str
    base_url: str
    model: str | None = None
    api_key_env: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "base_url": self.base_url, "model": self.model, "api_key_env": self.api_key_env}


def normalize_weights(values: Sequence[float], where: str = "weights") -> np.ndarray:
    """Nonnegative weights summing to 1 (all zero: uniform). Negative or non-finite: an error."""
    w = np.asarray([float(v) for v in values], dtype=np.float64)
    if w.size == 0:
        raise BackendError(f"{where}: no weights")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise BackendError(f"{where}: weights must be finite and >= 0, got {w.tolist()}")
    total = float(w.sum())
    return np.full(w.size, 1.0 / w.size) if total <= 0 else w / total


def endpoint_floor(probs: Mapping[str, float]) -> float:
    """The probability an unlisted token gets from this endpoint (see the module docstring)."""
    if not probs:
        return 0.0
    listed = list(probs.values())
    return max(0.0, min(min(listed), 1.0 - sum(listed)))


def combine_distributions(dists: Sequence[Mapping[str, float]], weights: Sequence[float],
                          combine: str) -> tuple[str, float]:
    """Argmax token of a weighted combination of top-k distributions (``{token: logprob}``).

    Returns ``(token, score)``: score is the mixture probability (``linear``) or the
    weighted log-probability sum (``log_linear``). Ties go to the first token listed, in
    endpoint order.
    """
    if combine not in COMBINES:
        raise BackendError(f"combine: {combine!r} is not one of {', '.join(COMBINES)}")
    order: dict[str, None] = {}
    probs = []
    for d in dists:
        p = {t: math.exp(lp) for t, lp in d.items()}
        probs.append(p)
        for t in sorted(p, key=lambda t: -p[t]):
            order.setdefault(t, None)
    if not order:
        raise BackendError("no endpoint listed any next token")
    floors = [endpoint_floor(p) for p in probs]
    best_tok, best = "", -math.inf
    for t in order:
        if combine == "linear":
            s = sum(w * p.get(t, f) for w, p, f in zip(weights, probs, floors))
        else:
            s = sum(w * math.log(max(p.get(t, f), LOG_FLOOR)) for w, p, f in zip(weights, probs, floors))
        if s > best:
            best_tok, best = t, s
    return best_tok, best


class EndpointPool:
    """Long-lived clients for a set of endpoints: keep-alive connections, model ids, keys.

    ``api_keys``: endpoint name -> key (a :class:`Secret`); build it with :func:`read_keys`.
    One thread pool (``concurrency`` requests in flight over all endpoints) serves every
    decoder made over the pool.
    """

    def __init__(self, endpoints: Sequence[Endpoint], api_keys: Mapping[str, Secret | None] | None = None, *,
                 concurrency: int = 8, timeout: float = 60.0, max_retries: int = 2, backoff: float = 0.5,
                 max_backoff: float = 10.0, prompts_per_request: int = 64,
                 eos_tokens: Sequence[str] = DEFAULT_EOS_TOKENS):
        if not endpoints:
            raise BackendError("a mixture needs at least one endpoint")
        names = [e.name for e in endpoints]
        if len(set(names)) != len(names):
            raise BackendError(f"endpoint names must be distinct, got {names}")
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise BackendError(f"concurrency: must be an integer >= 1, got {concurrency!r}")
        if isinstance(prompts_per_request, bool) or not isinstance(prompts_per_request, int) or prompts_per_request < 1:
            raise BackendError(f"prompts_per_request: must be an integer >= 1, got {prompts_per_request!r}")
        keys = dict(api_keys or {})
        self.endpoints = list(endpoints)
        self.prompts_per_request = prompts_per_request
        self.eos_tokens = frozenset(eos_tokens)
        self.clients = {
            e.name: APIClient(e.base_url, api_key=keys.get(e.name), timeout=timeout,
                              retry=RetryPolicy(int(max_retries), float(backoff), float(max_backoff)),
                              key_hint=e.api_key_env)
            for e in self.endpoints
        }
        self._models: dict[str, str] = {e.name: e.model for e in self.endpoints if e.model}
        self._learned_eos: dict[str, set[str]] = {e.name: set() for e in self.endpoints}
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(concurrency, thread_name_prefix="evomerge-mixture")
        self.steps = 0

    def __repr__(self) -> str:
        return f"EndpointPool({[redact_url(e.base_url) for e in self.endpoints]})"

    def endpoint(self, name: str) -> Endpoint:
        for e in self.endpoints:
            if e.name == name:
                return e
        raise BackendError(f"no endpoint named {name!r}")

    @property
    def stats(self) -> dict[str, Any]:
        per = {n: dict(c.stats) for n, c in self.clients.items()}
        return {"requests": sum(s["requests"] for s in per.values()),
                "retries": sum(s["retries"] for s in per.values()), "steps": self.steps, "endpoints": per}

    def model_id(self, name: str) -> str:
        """The model id sent to endpoint ``name`` (asked from ``/models`` once when not given)."""
        with self._lock:
            if name in self._models:
                return self._models[name]
        client = self.clients[name]
        listing = client.request("GET", "models")
        data = listing.get("data") if isinstance(listing, dict) else None
        ids = [m.get("id") for m in data or [] if isinstance(m, dict) and isinstance(m.get("id"), str)]
        if len(ids) != 1:
            raise BackendError(f"endpoint {name}: model id required: {client.url('models')} lists {len(ids)} models")
        with self._lock:
            self._models[name] = ids[0]
        return ids[0]

    def run_all(self, jobs: Sequence[Callable[[], Any]]) -> list[Any]:
        """Run jobs concurrently; results in order; the first error cancels the rest and is raised."""
        if len(jobs) <= 1:
            return [job() for job in jobs]
        return run_jobs(self._executor, jobs)

    def completions(self, name: str, body: dict[str, Any], expected: int) -> list[dict[str, Any]]:
        """POST /completions to endpoint ``name``; the choices in prompt order (checked)."""
        client = self.clients[name]
        body = {"model": self.model_id(name), "temperature": 0, **body}
        try:
            resp = client.request("POST", "completions", body)
        except BackendError as err:
            raise BackendError(f"endpoint {name}: {err}") from None
        url = client.url("completions")
        choices = resp.get("choices") if isinstance(resp, dict) else None
        if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
            raise BackendError(f"endpoint {name}: {url}: response has no valid choices")
        if len(choices) != expected:
            raise BackendError(f"endpoint {name}: {url}: {len(choices)} choices for {expected} prompt(s) "
                               "(the mixture sends a list of prompts per request)")
        if all(isinstance(c.get("index"), int) for c in choices):
            choices = sorted(choices, key=lambda c: c["index"])
        return choices

    # -- next-token distributions ------------------------------------------------------
    def _key(self, name: str, token: str) -> str:
        if token == "" or token in self.eos_tokens or token in self._learned_eos[name]:
            return EOS
        return token

    def next_token_dist(self, name: str, choice: dict[str, Any]) -> dict[str, float]:
        """``{token: logprob}`` of one endpoint's next token from a ``max_tokens: 1`` reply."""
        url = self.clients[name].url("completions")
        text = choice.get("text")
        if not isinstance(text, str):
            raise BackendError(f"endpoint {name}: {url}: a choice has no 'text'")
        lp = choice.get("logprobs")
        tokens = lp.get("tokens") if isinstance(lp, dict) else None
        tops = lp.get("top_logprobs") if isinstance(lp, dict) else None
        values = lp.get("token_logprobs") if isinstance(lp, dict) else None
        ended = text == "" and choice.get("finish_reason") == "stop"
        if not tokens:
            if ended:  # the greedy choice is EOS, its distribution unknown (module docstring)
                return {EOS: 0.0}
            raise BackendError(f"endpoint {name}: {url}: the reply has no logprobs (does the server support them?)")
        first = tokens[0]
        if ended and isinstance(first, str) and first:
            with self._lock:
                self._learned_eos[name].add(first)
        top = tops[0] if isinstance(tops, list) and tops and isinstance(tops[0], dict) else {}
        dist: dict[str, float] = {}
        items = list(top.items())
        if isinstance(first, str) and isinstance(values, list) and values and isinstance(values[0], (int, float)):
            items.append((first, float(values[0])))
        for tok, value in items:
            if not isinstance(tok, str) or isinstance(value, bool) or not isinstance(value, (int, float)):
                raise BackendError(f"endpoint {name}: {url}: malformed top_logprobs entry {tok!r}: {value!r}")
            key = self._key(name, tok)
            v = float(value)
            if key in dist and key == EOS and tok != first:  # several EOS spellings: add them up
                dist[key] = float(np.logaddexp(dist[key], v))
            else:
                dist[key] = v
        return dist

    def step(self, name: str, texts: list[str], top: int) -> list[dict[str, float]]:
        choices = self.completions(name, {"prompt": texts, "max_tokens": 1, "logprobs": int(top)}, len(texts))
        return [self.next_token_dist(name, c) for c in choices]

    # -- echoed prompt logprobs --------------------------------------------------------
    def continuation_tokens(self, name: str, choice: dict[str, Any], context: str,
                            continuation: str) -> list[tuple[int, str, float, dict[str, float]]]:
        """(offset, token, logprob, top alternatives) of every continuation token in an echo reply
        (the api backend's boundary rule: tokens covering a character after
        ``context.rstrip(" ")``)."""
        url = self.clients[name].url("completions")
        lp = choice.get("logprobs")
        values = lp.get("token_logprobs") if isinstance(lp, dict) else None
        offsets = lp.get("text_offset") if isinstance(lp, dict) else None
        tops = lp.get("top_logprobs") if isinstance(lp, dict) else None
        tokens = lp.get("tokens") if isinstance(lp, dict) else None
        if not isinstance(values, list) or not isinstance(offsets, list) or len(offsets) != len(values):
            raise BackendError(f"endpoint {name}: {url}: echo reply without token_logprobs/text_offset")
        prompt_len = len(context) + len(continuation)
        boundary = len(context.rstrip(" "))
        ends = token_ends(offsets, prompt_len)
        out = []
        for i, (start, end, value) in enumerate(zip(offsets, ends, values)):
            if start >= prompt_len:
                break
            if min(end, prompt_len) <= boundary:
                continue
            if value is None:
                if i == 0 and len(offsets) > 1 and offsets[1] == start:
                    continue
                raise BackendError(f"endpoint {name}: {url}: no logprob for a continuation token at offset {start}")
            top = tops[i] if isinstance(tops, list) and i < len(tops) and isinstance(tops[i], dict) else {}
            tok = tokens[i] if isinstance(tokens, list) and i < len(tokens) and isinstance(tokens[i], str) else None
            if tok is None:
                tok = (context + continuation)[start:min(end, prompt_len)]
            out.append((int(start), tok, float(value), {str(k): float(v) for k, v in top.items()}))
        if not out:
            raise BackendError(f"endpoint {name}: {url}: no continuation tokens echoed for {continuation!r}")
        return out

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        for c in self.clients.values():
            c.close()


def read_keys(endpoints: Sequence[Endpoint]) -> dict[str, Secret | None]:
    """Each endpoint's key from the environment variable it names (None when it names none)."""
    return {e.name: read_api_key(e.api_key_env, field=f"endpoint {e.name}: api_key_env") for e in endpoints}


class MixtureDecoder:
    """Greedy decoding and log-likelihood of one weighted mixture over an :class:`EndpointPool`.

    ``weights``: one per pool endpoint (normalized here: nonnegative, all zero -> uniform).
    """

    def __init__(self, pool: EndpointPool, weights: Sequence[float], combine: str = "linear",
                 top_logprobs: int = 5):
        if combine not in COMBINES:
            raise BackendError(f"combine: {combine!r} is not one of {', '.join(COMBINES)}")
        if isinstance(top_logprobs, bool) or not isinstance(top_logprobs, int) or top_logprobs < 1:
            raise BackendError(f"top_logprobs: must be an integer >= 1, got {top_logprobs!r}")
        if len(weights) != len(pool.endpoints):
            raise BackendError(f"weights: {len(weights)} values for {len(pool.endpoints)} endpoints")
        self.pool = pool
        self.weights = normalize_weights(weights)
        self.combine = combine
        self.top_logprobs = top_logprobs
        self.active = [(e.name, float(w)) for e, w in zip(pool.endpoints, self.weights) if w > 0]

    def __repr__(self) -> str:
        mix = ", ".join(f"{n}={w:.3g}" for n, w in self.active)
        return f"MixtureDecoder({self.combine}: {mix})"

    def _chunks(self, items: list[Any]) -> list[list[Any]]:
        n = self.pool.prompts_per_request
        return [items[i:i + n] for i in range(0, len(items), n)]

    def generate(self, prompts: Sequence[str], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        """Greedy answers of the mixture, cut at EOS, at every stop string, after ``max_new_tokens``."""
        return self.generate_counted(prompts, max_new_tokens, stop)[0]

    def generate_counted(self, prompts: Sequence[str], max_new_tokens: int,
                         stop: Sequence[str] = ()) -> tuple[list[str], list[int]]:
        """:meth:`generate` plus the number of tokens chosen per answer (``max_new_tokens``
        means the answer was cut by the limit)."""
        prompts = list(prompts)
        answers = [""] * len(prompts)
        counts = [0] * len(prompts)
        live = list(range(len(prompts)))
        stop = [s for s in stop if s]
        for _ in range(int(max_new_tokens)):
            if not live:
                break
            texts = [prompts[i] + answers[i] for i in live]
            chunks = self._chunks(texts)
            jobs = [lambda n=name, c=chunk: self.pool.step(n, c, self.top_logprobs)
                    for name, _w in self.active for chunk in chunks]
            results = self.pool.run_all(jobs)
            self.pool.steps += 1
            per_endpoint = []
            for e in range(len(self.active)):
                per_endpoint.append([d for r in results[e * len(chunks):(e + 1) * len(chunks)] for d in r])
            weights = [w for _n, w in self.active]
            still = []
            for j, i in enumerate(live):
                token, _score = combine_distributions([d[j] for d in per_endpoint], weights, self.combine)
                if token == EOS:
                    continue
                answers[i] += token
                counts[i] += 1
                if stop:
                    cut = truncate_at_stop(answers[i], stop)
                    if cut != answers[i]:
                        answers[i] = cut
                        continue
                still.append(i)
            live = still
        return answers, counts

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[Loglik]:
        """Summed log p_mixture(continuation | context) per request (module docstring)."""
        requests = list(requests)
        if not requests:
            return []
        top = 1 if self.combine == "linear" else self.top_logprobs
        chunks = self._chunks(requests)

        def echo(name: str, chunk: list[tuple[str, str]]):
            body = {"prompt": [c + x for c, x in chunk], "max_tokens": 0, "echo": True, "logprobs": top}
            choices = self.pool.completions(name, body, len(chunk))
            return [self.pool.continuation_tokens(name, ch, c, x) for ch, (c, x) in zip(choices, chunk)]

        jobs = [lambda n=name, c=chunk: echo(n, c) for name, _w in self.active for chunk in chunks]
        results = self.pool.run_all(jobs)
        per_endpoint = [[t for r in results[e * len(chunks):(e + 1) * len(chunks)] for t in r]
                        for e in range(len(self.active))]
        weights = np.array([w for _n, w in self.active])
        out = []
        for r, (_ctx, cont) in enumerate(requests):
            toks = [pe[r] for pe in per_endpoint]
            offsets = [tuple(o for o, _tok, _v, _t in t) for t in toks]
            if any(o != offsets[0] for o in offsets[1:]):
                raise BackendError(
                    f"endpoints {', '.join(n for n, _ in self.active)} tokenize {cont!r} differently; "
                    "a token-level mixture needs endpoints sharing a tokenizer")
            total = 0.0
            for k in range(len(offsets[0])):
                lps = np.array([t[k][2] for t in toks])
                if self.combine == "linear":
                    total += float(np.log(np.dot(weights, np.exp(lps))))
                    continue
                actual = toks[0][k][1]  # the continuation's own token: its logprob is exact everywhere
                probs = []
                for t in toks:
                    d = {tok: math.exp(v) for tok, v in t[k][3].items()}
                    probs.append(d)
                floors = [endpoint_floor(p) for p in probs]
                for d, t in zip(probs, toks):
                    d[actual] = math.exp(t[k][2])
                union = {tok for d in probs for tok in d if tok != actual}
                scores = [float(np.dot(weights, lps))]
                scores += [sum(w * math.log(max(p.get(tok, f), LOG_FLOOR)) for w, p, f in zip(weights, probs, floors))
                           for tok in union]
                total += scores[0] - float(np.logaddexp.reduce(scores))
            out.append(Loglik(total, len(offsets[0])))
        return out
