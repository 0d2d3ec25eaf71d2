"""The model behind ``evomerge serve``: completions, chat, per-token logprobs, sampling and
token streams over one HF checkpoint, one request at a time (:class:`ModelService`).

The HTTP side lives in :mod:`evomerge.serve.server`; this module knows nothing about HTTP
beyond :class:`RequestError` (a status and one line).

Work per request is bounded before any tokenizing: at most ``max_prompts`` prompts of at
most ``max_prompt_chars`` characters each (the body size is bounded before that by the
server); then prompt tokens plus ``max_tokens`` must fit the model's positions.

Greedy decoding (the default: no ``temperature`` or ``temperature: 0``) is the HF
backend's batched loop, so answers agree with the HF fitness backend. ``temperature > 0``
samples (with ``top_p`` nucleus filtering) from a ``torch.Generator`` seeded by ``seed``
(random when absent): the same seed and request give the same answer.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import BackendError

MAX_TOP_LOGPROBS = 5
MAX_PROMPTS = 256
_ENCODE_CACHE_LIMIT = 50_000


@dataclass(frozen=True)
class Sampling:
    """How to pick each token: greedy when ``temperature`` is 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


GREEDY = Sampling()


def default_prompt_chars(context: int | None) -> int:
    """Characters a prompt may have before it is tokenized: generous for any tokenizer
    (16 characters per position), never unbounded."""
    return int(min(max((context or 32768) * 16, 4096), 4_000_000))


class RequestError(Exception):
    """A request the server refuses: HTTP status + one-line message (OpenAI error JSON)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        if self.status == 401:
            kind = "authentication_error"
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class ModelService:
    """The served model: greedy completions, chat, and per-token logprobs, one at a time.

    Generation reuses :class:`~evomerge.fitness.backends.hf.HFBackend` (same tokenization,
    same greedy loop), so a task scored through this server agrees with the HF backend on
    the same checkpoint.
    """

    def __init__(
        self,
        model_dir: str | Path,
        *,
        model_name: str | None = None,
        device: str | None = None,
        dtype: Any = None,
        batch_size: int = 16,
        max_logprobs: int = MAX_TOP_LOGPROBS,
        logprobs_eos: bool = False,
        max_prompt_chars: int | None = None,
        max_prompts: int = MAX_PROMPTS,
    ):
        from ..fitness.backends.hf import HFBackend

        self.model_dir = Path(model_dir).expanduser().resolve()
        self.backend = HFBackend(str(self.model_dir), device=device, dtype=dtype, batch_size=batch_size)
        self.tokenizer = self.backend.tokenizer
        self.name = model_name or self.model_dir.name
        self.created = int(time.time())
        self.lock = threading.Lock()
        # most top alternatives a request may ask for (OpenAI's legacy cap is 5; a higher
        # cap lets an output-level mixture see whole distributions of small vocabularies)
        self.max_logprobs = int(max_logprobs)
        # report the EOS token that ended a completion as a last logprobs entry (text
        # unchanged, as OpenAI's legacy completions do): the mixture decoder needs p(EOS)
        self.logprobs_eos = bool(logprobs_eos)
        probe = self.tokenizer("", add_special_tokens=True)["input_ids"]
        self._adds_bos = bool(probe) and probe[0] == self.tokenizer.bos_token_id
        self.context = self.backend.max_length
        self.max_prompt_chars = int(max_prompt_chars or default_prompt_chars(self.context))
        self.max_prompts = int(max_prompts)

    def limits(self) -> dict[str, Any]:
        return {"context": self.context, "max_prompt_chars": self.max_prompt_chars,
                "max_prompts": self.max_prompts}

    # -- bounds, before and after tokenizing ----------------------------------------------
    def check_prompts(self, prompts: list[str], param: str = "prompt") -> None:
        """Refuse too many or too long prompts without tokenizing anything."""
        if len(prompts) > self.max_prompts:
            raise RequestError(400, f"{len(prompts)} prompts; this server takes at most {self.max_prompts} "
                                    "per request", param)
        for p in prompts:
            if len(p) > self.max_prompt_chars:
                raise RequestError(400, f"the prompt is {len(p)} characters; this server takes at most "
                                        f"{self.max_prompt_chars} (--max-prompt-chars)", param,
                                   "context_length_exceeded")

    def fit(self, prompt: str, max_tokens: int, param: str = "prompt") -> list[int]:
        """Token ids of ``prompt`` (with BOS); prompt + ``max_tokens`` must fit the context."""
        ids = self.backend._encode([prompt])[0]
        limit = self.context
        if limit and max_tokens >= limit:
            raise RequestError(400, f"max_tokens {max_tokens} leaves no room for a prompt in {self.name}'s "
                                    f"{limit} positions", "max_tokens", "context_length_exceeded")
        if limit and len(ids) + max_tokens > limit:
            raise RequestError(400, f"the prompt is {len(ids)} tokens and max_tokens {max_tokens}; "
                                    f"{self.name} takes at most {limit} (max_position_embeddings)",
                               param, "context_length_exceeded")
        if not ids:
            raise RequestError(400, "empty prompt (the tokenizer adds no BOS)", param)
        return ids

    # -- helpers ----------------------------------------------------------------------
    def _count(self, text: str, special: bool) -> int:
        return len(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _trim_cache(self) -> None:
        cache = getattr(self.backend, "_encode_cache", None)
        if cache is not None and len(cache) > _ENCODE_CACHE_LIMIT:
            cache.clear()

    def _generate(self, prompts: list[str], max_tokens: int, stop: list[str]) -> list[str]:
        if max_tokens == 0:
            return [""] * len(prompts)
        try:
            return self.backend.generate(prompts, max_tokens, stop)
        except BackendError as err:
            raise RequestError(400, str(err)) from None

    LOGPROB_BATCH = 16  # texts per forward pass (batch x length x vocab floats)

    def _encode_for_logprobs(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if not getattr(self.tokenizer, "is_fast", False):
            raise RequestError(400, "logprobs need a fast tokenizer (offsets); this model has a slow one", "logprobs")
        enc = self.tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, spans = list(enc["input_ids"]), [tuple(s) for s in enc["offset_mapping"]]
        limit = self.backend.max_length
        if limit and len(ids) > limit:
            raise RequestError(
                400, f"the text is {len(ids)} tokens; {self.name} takes at most {limit} (max_position_embeddings)",
                "prompt", "context_length_exceeded",
            )
        if not ids:
            raise RequestError(400, "empty prompt (the tokenizer adds no BOS)", "prompt")
        return ids, spans

    def _log_softmax_batch(self, id_lists: list[list[int]]) -> list[Any]:
        """Next-token log-probabilities at every position of each sequence, computed in
        right-padded batches (positions of real tokens are unaffected by the padding)."""
        import torch

        out = []
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        dev = self.backend.torch_device
        for k in range(0, len(id_lists), self.LOGPROB_BATCH):
            chunk = id_lists[k:k + self.LOGPROB_BATCH]
            width = max(len(ids) for ids in chunk)
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for b, ids in enumerate(chunk):
                input_ids[b, :len(ids)] = torch.tensor(ids)
                mask[b, :len(ids)] = 1
            with torch.inference_mode():
                logits = self.backend.model(input_ids=input_ids.to(dev), attention_mask=mask.to(dev),
                                            use_cache=False).logits
                logp = logits.float().log_softmax(dim=-1).cpu()
            out.extend(logp[b, :len(ids)] for b, ids in enumerate(chunk))
        return out

    def token_logprobs_batch(self, texts: list[str], report_from: list[int], top: int,
                             eos_after: list[bool]) -> list[dict[str, Any]]:
        """OpenAI legacy ``logprobs`` for each text's tokens starting at or after character
        ``report_from[i]`` (0: every token, the first has no logprob), one batched forward
        per :attr:`LOGPROB_BATCH` texts.

        ``eos_after[i]``: when the greedy next token after the text is EOS, append it (the
        token that ended the completion) with its logprob and top alternatives."""
        encoded = [self._encode_for_logprobs(t) for t in texts]
        logps = self._log_softmax_batch([ids for ids, _ in encoded])
        return [self._logprob_entries(text, ids, spans, logp, start, top, eos)
                for text, (ids, spans), logp, start, eos in zip(texts, encoded, logps, report_from, eos_after)]

    def _logprob_entries(self, text: str, ids: list[int], spans: list[tuple[int, int]], logp: Any,
                         report_from: int, top: int, eos_after: bool) -> dict[str, Any]:
        def alternatives(row: Any) -> dict[str, float] | None:
            if top <= 0:
                return None
            vals, idx = row.topk(min(top, row.numel()))
            return {self.tokenizer.decode([int(j)]): float(v) for v, j in zip(vals, idx)}

        tokens, token_lps, offsets, tops = [], [], [], []
        for i, (tid, (s, e)) in enumerate(zip(ids, spans)):
            if s < report_from:
                continue  # a prompt token when only the completion's logprobs are asked
            tokens.append(text[s:e] if e > s else self.tokenizer.convert_ids_to_tokens(tid))
            offsets.append(int(s))
            if i == 0:
                token_lps.append(None)
                tops.append(None)
                continue
            token_lps.append(float(logp[i - 1][tid]))
            tops.append(alternatives(logp[i - 1]))
        eos_id = self.tokenizer.eos_token_id
        if eos_after and eos_id is not None and int(logp[len(ids) - 1].argmax()) == eos_id:
            row = logp[len(ids) - 1]
            tokens.append(self.tokenizer.eos_token)
            offsets.append(len(text))
            token_lps.append(float(row[eos_id]))
            tops.append(alternatives(row))
        return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}

    # -- endpoints --------------------------------------------------------------------
    def complete(
        self, prompts: list[str], max_tokens: int, stop: list[str], echo: bool, logprobs: int | None,
        sampling: Sampling = GREEDY,
    ) -> tuple[list[dict[str, Any]], dict[str, int]]:
        self.check_prompts(prompts)
        with self.lock:
            self._trim_cache()
            encoded = [self.fit(p, max_tokens) for p in prompts]
            if sampling.greedy:
                texts = self._generate(prompts, max_tokens, stop)
            else:
                gen = self._generator(sampling)
                texts = ["".join(d for d, _ in self._stream(ids, max_tokens, stop, sampling, gen))
                         for ids in encoded]
            choices, p_tok, c_tok = [], 0, 0
            n_gens = [self._count(text, False) if text else 0 for text in texts]
            lps: list[Any] = [None] * len(prompts)
            if logprobs is not None:
                lps = self.token_logprobs_batch(
                    [p + t for p, t in zip(prompts, texts)],
                    [0 if echo else len(p) for p in prompts], logprobs,
                    [self.logprobs_eos and n < max_tokens for n in n_gens])
            for i, (prompt, text, n_gen, lp) in enumerate(zip(prompts, texts, n_gens, lps)):
                n_prompt = self._count(prompt, True)
                p_tok, c_tok = p_tok + n_prompt, c_tok + n_gen
                choices.append({
                    "index": i,
                    "text": prompt + text if echo else text,
                    "logprobs": lp,
                    "finish_reason": "length" if max_tokens == 0 or n_gen >= max_tokens else "stop",
                })
        return choices, {"prompt_tokens": p_tok, "completion_tokens": c_tok, "total_tokens": p_tok + c_tok}

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            bos = self.tokenizer.bos_token
            if self._adds_bos and bos and text.startswith(bos):
                text = text[len(bos):]  # the tokenizer adds it again when encoding
            return text
        return "\n".join(m["content"] for m in messages)

    def chat_prompt(self, messages: list[dict[str, str]], max_tokens: int | None) -> tuple[str, list[int], int]:
        """The rendered prompt, its ids and the max_tokens to use (checked against the context)."""
        self.check_prompts([m["content"] for m in messages], "messages")
        prompt = self.render_chat(messages)
        self.check_prompts([prompt], "messages")
        if max_tokens is None:
            n_prompt = len(self.backend._encode([prompt])[0])
            room = (self.context or (n_prompt + 256)) - n_prompt
            max_tokens = max(1, min(256, room))
        return prompt, self.fit(prompt, max_tokens, "messages"), max_tokens

    def chat(self, messages: list[dict[str, str]], max_tokens: int | None, stop: list[str],
             sampling: Sampling = GREEDY) -> tuple[dict[str, Any], dict[str, int]]:
        with self.lock:
            self._trim_cache()
            prompt, ids, max_tokens = self.chat_prompt(messages, max_tokens)
            n_prompt = len(ids)
            if sampling.greedy:
                (text,) = self._generate([prompt], max_tokens, stop)
            else:
                text = "".join(d for d, _ in self._stream(ids, max_tokens, stop, sampling,
                                                         self._generator(sampling)))
            n_gen = self._count(text, False) if text else 0
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": "length" if n_gen >= max_tokens else "stop",
        }
        return choice, {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}

    # -- token streams (streaming responses, sampling) --------------------------------------
    def _generator(self, sampling: Sampling) -> Any:
        import torch

        seed = sampling.seed if sampling.seed is not None else secrets.randbits(63)
        return torch.Generator(device="cpu").manual_seed(int(seed))

    def _pick(self, logits: Any, sampling: Sampling, gen: Any) -> int:
        import torch

        if sampling.greedy:
            return int(logits.argmax())
        probs = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(0) - sorted_p < sampling.top_p  # smallest set reaching top_p
            keep[0] = True
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=gen))

    def _tokens(self, ids: list[int], max_tokens: int, sampling: Sampling, gen: Any) -> Iterator[int]:
        """Next tokens of one sequence (stops after EOS or ``max_tokens``)."""
        import torch

        from ..fitness.backends.kv_cache import cache_kwarg, last_logits_kwargs, new_cache

        model, dev = self.backend.model, self.backend.torch_device
        cache = {cache_kwarg(model): new_cache(model)}
        inp = torch.tensor([ids], dtype=torch.long, device=dev)
        pos = torch.arange(len(ids), device=dev)[None, :]
        with torch.inference_mode():
            for _ in range(max_tokens):
                out = model(input_ids=inp, position_ids=pos, use_cache=True,
                            **last_logits_kwargs(model), **cache)
                tok = self._pick(out.logits[0, -1], sampling, gen)
                yield tok
                if tok in self.backend.eos_ids:
                    return
                inp = torch.tensor([[tok]], dtype=torch.long, device=dev)
                pos = pos[:, -1:] + 1

    def _stream(self, ids: list[int], max_tokens: int, stop: list[str], sampling: Sampling,
                gen: Any) -> Iterator[tuple[str, str | None]]:
        """(text delta, finish_reason or None) pairs; text that could begin a stop string is
        held back until it cannot; the last pair carries "stop" or "length"."""
        toks: list[int] = []
        sent = 0
        for tok in self._tokens(ids, max_tokens, sampling, gen):
            if tok in self.backend.eos_ids:
                finish = "stop"
                break
            toks.append(tok)
            text = self.backend._decode(toks)
            cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
            if cut >= 0:
                yield text[sent:cut], "stop"
                return
            hold = max((k for s in stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            if len(text) - hold > sent:
                yield text[sent:len(text) - hold], None
                sent = len(text) - hold
        else:
            finish = "length" if len(toks) >= max_tokens else "stop"
        yield self.backend._decode(toks)[sent:], finish

    def stream(self, ids: list[int], max_tokens: int, stop: list[str],
               sampling: Sampling = GREEDY) -> Iterator[tuple[str, str | None]]:
        """A streamed answer under the model lock (held until the stream ends or is closed)."""
        with self.lock:
            yield from self._stream(ids, max_tokens, stop, sampling, self._generator(sampling))

    def close(self) -> None:
        self.backend.close()
