"""The log-likelihood objective (``scoring: loglik`` and ``loglik_mix``) on a real tiny model.

The backend's teacher-forced, batched, padded scoring must equal a direct computation: one
unpadded forward pass per example, log-softmax, the gold answer's tokens picked by hand.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from evomerge.errors import ConfigError, TaskError
from evomerge.fitness import load_task, make_backend
from evomerge.fitness.racing import evaluate_racing
from tests.tiny_models import make_tiny_llama

RECORDS = [
    {"input": "ab3", "target": "7"},
    {"input": "x", "target": "hello"},
    {"input": "q9z0cc", "target": "42"},
    {"input": "mm", "target": "a b"},
    {"input": "k", "target": "zz"},
]


def write_task(dir, name="t", records=RECORDS, **fields):
    (dir / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    spec = {"name": name, "data": f"{name}.jsonl", "prompt": "{input}=", "scoring": "loglik"}
    spec.update(fields)
    path = dir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("ll") / "tiny", seed=3, hidden=32)


@pytest.fixture(scope="module")
def backend(model_dir):
    b = make_backend("hf", model_dir=str(model_dir), device="cpu", batch_size=2)
    yield b
    b.close()


def direct_logprobs(model_dir, prompt: str, answer: str) -> list[float]:
    """Per-token log p(answer token | everything before), one example, no padding."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    ctx = tok(prompt)["input_ids"]  # with BOS, as the backend encodes
    full = tok(prompt + answer)["input_ids"]
    assert full[: len(ctx)] == ctx  # char-level: the answer's tokens follow the prompt's
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([full])).logits[0].log_softmax(-1)
    return [float(logp[i - 1, full[i]]) for i in range(len(ctx), len(full))]


@pytest.mark.parametrize("norm", ["token", "answer"])
@pytest.mark.parametrize("transform", ["prob", "logprob"])
def test_loglik_equals_direct_computation(backend, model_dir, tmp_path, norm, transform):
    task = load_task(write_task(tmp_path, loglik_norm=norm, loglik_transform=transform))
    got = backend.evaluate([task])["t"]
    want = []
    for r in RECORDS:
        lps = direct_logprobs(model_dir, r["input"] + "=", r["target"])
        v = sum(lps) / len(lps) if norm == "token" else sum(lps)
        want.append(math.exp(v) if transform == "prob" else v)
    assert got == pytest.approx(want, rel=1e-4, abs=1e-6)
    if transform == "prob":
        assert np.all((got > 0) & (got <= 1))
    else:
        assert np.all(got < 0)
    assert task.spec.bounded == (transform == "prob")


def test_loglik_suffix_is_scored_after_the_answer(backend, model_dir, tmp_path):
    task = load_task(write_task(tmp_path, loglik_norm="answer", loglik_transform="logprob",
                                loglik_suffix="."))
    got = backend.evaluate([task])["t"]
    want = [sum(direct_logprobs(model_dir, r["input"] + "=", r["target"] + ".")) for r in RECORDS]
    assert got == pytest.approx(want, rel=1e-4)


def test_mixed_with_exact_match(backend, tmp_path):
    em = load_task(write_task(tmp_path, name="em", scoring="exact_match", max_new_tokens=5))
    ll = load_task(write_task(tmp_path, name="ll", loglik_norm="answer"))
    mixed = load_task(write_task(tmp_path, name="mx", scoring="exact_match", max_new_tokens=5,
                                 loglik_mix=0.25, loglik_norm="answer"))
    out = backend.evaluate([em, ll, mixed])
    assert out["mx"] == pytest.approx(0.75 * out["em"] + 0.25 * out["ll"])
    # a model that answers right gets the exact-match part: make one target the model's output
    first = backend.generate(["ab3="], 5)[0]
    recs = [{"input": "ab3", "target": first}]
    right = load_task(write_task(tmp_path, name="r", records=recs, scoring="exact_match",
                                 max_new_tokens=5, loglik_mix=0.5))
    ll_only = load_task(write_task(tmp_path, name="r2", records=recs))
    got = backend.evaluate([right, ll_only])
    assert got["r"][0] == pytest.approx(0.5 + 0.5 * got["r2"][0])
    # mix 1: the log-likelihood alone, no generation
    full = load_task(write_task(tmp_path, name="m1", scoring="exact_match", loglik_mix=1.0))
    token = load_task(write_task(tmp_path, name="tk"))
    got = backend.evaluate([full, token])
    assert got["m1"] == pytest.approx(got["tk"])


def test_bad_loglik_fields_are_one_line_errors(tmp_path):
    with pytest.raises(TaskError, match="loglik_mix: .*loglik_transform: prob"):
        load_task(write_task(tmp_path, scoring="exact_match", loglik_mix=0.5,
                             loglik_transform="logprob"))
    with pytest.raises(TaskError, match="loglik_mix: only for generation scorers"):
        load_task(write_task(tmp_path, loglik_mix=0.5))
    with pytest.raises(TaskError, match="loglik_norm"):
        load_task(write_task(tmp_path, loglik_norm="char"))
    with pytest.raises(TaskError, match="loglik_mix"):
        load_task(write_task(tmp_path, scoring="exact_match", loglik_mix=1.5))


def test_racing_takes_prob_form_and_refuses_raw_logprob(backend, tmp_path):
    recs = [{"input": f"{i}x{i % 7}", "target": str(i % 10)} for i in range(40)]
    prob = load_task(write_task(tmp_path, name="p", records=recs))
    full = backend.evaluate([prob])["p"]
    # a best far above anything reachable: cut after the first slice, partial scores agree
    res = evaluate_racing(backend, [prob], best_so_far=0.99, first_fraction=0.25)
    assert res.cut and res.evaluated < res.total
    seen = ~np.isnan(res.scores["p"])
    assert res.scores["p"][seen] == pytest.approx(full[seen])
    # a best below every score: finished, the same as the plain evaluation
    res = evaluate_racing(backend, [prob], best_so_far=0.0, first_fraction=0.25)
    assert res.complete and res.scores["p"] == pytest.approx(full)
    raw = load_task(write_task(tmp_path, name="r", records=recs, loglik_transform="logprob"))
    with pytest.raises(ConfigError, match="racing.enabled: task.* r score raw log-probabilities"):
        evaluate_racing(backend, [raw], best_so_far=-1.0)


def test_search_refuses_racing_on_raw_logprob(test_zoo, tmp_path):
    from evomerge.config import parse_config
    from evomerge.engine.search import Search

    raw = write_task(tmp_path, name="r", loglik_transform="logprob")
    members = {"base": str(test_zoo.base.path), **{m.name: str(m.path) for m in test_zoo.experts}}
    cfg = parse_config({"name": "x", "models": members, "base_model": "base",
                        "tasks": [{"path": str(raw)}], "racing": {"enabled": True}, "budget": 2})
    with pytest.raises(ConfigError, match="racing.enabled: task.* r score raw"):
        Search(cfg, store=None)
