"""Fitness: scoring on hand-made examples, task loading and its errors, the HF backend."""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from evomerge.errors import BackendError, CheckpointError, TaskError
from evomerge.fitness import (
    Example,
    Loglik,
    combined_fitness,
    evaluate_task,
    flatten_scores,
    load_task,
    load_tasks,
    make_backend,
    scoring,
    task_weights,
    truncate_at_stop,
)
from evomerge.fitness.scoring import parse_last_number

torch.set_num_threads(1)


def ex(target: str, prompt: str = "p", choices=None, answer=None) -> Example:
    return Example(prompt, target, tuple(choices) if choices else None, answer)


# -- scoring on hand-made examples --------------------------------------------------------


def test_exact_match_strips_whitespace():
    got = scoring.exact_match(
        [" 42\n", "42", "4 2", ""], [ex("42"), ex(" 42 "), ex("42"), ex("42")]
    )
    assert got.tolist() == [1.0, 1.0, 0.0, 0.0]


def test_contains():
    got = scoring.contains(
        ["the answer is abc.", "ab", "xabcx"], [ex("abc"), ex("abc"), ex(" abc ")]
    )
    assert got.tolist() == [1.0, 0.0, 1.0]


def test_regex_group_whole_match_and_no_match():
    pat = r"answer: (\w+)"
    got = scoring.regex(
        ["answer: cat!", "answer: dog", "nothing"], [ex("cat"), ex("cat"), ex("cat")], pattern=pat
    )
    assert got.tolist() == [1.0, 0.0, 0.0]
    whole = scoring.regex(["x 123 y"], [ex("123")], pattern=r"\d+")
    assert whole.tolist() == [1.0]


@pytest.mark.parametrize(
    "output, target, want",
    [
        ("so 12+34=46", "46", 1.0),
        ("046", "46", 1.0),
        ("1,234 apples", "1234", 1.0),
        ("it is -7.", "-7", 1.0),
        ("2.50", "2.5", 1.0),
        ("first 46 then 47", "46", 0.0),
        ("no digits here", "46", 0.0),
    ],
)
def test_last_number(output, target, want):
    assert scoring.last_number([output], [ex(target)]).tolist() == [want]


def test_parse_last_number():
    assert parse_last_number("a 3 b 4.5 c") == 4.5
    assert parse_last_number("none") is None
    assert parse_last_number("total: 1,000.") == 1000.0


def test_multiple_choice_argmax_and_length_normalization():
    e = ex("bb", choices=["a", "bbbb"], answer=1)
    # raw sums: choice 0 is higher (-2 > -3); per character: choice 1 is higher (-0.75 > -2)
    lls = [[Loglik(-2.0, 1), Loglik(-3.0, 4)]]
    assert scoring.multiple_choice(lls, [e]).tolist() == [0.0]
    assert scoring.multiple_choice(lls, [e], length_normalize=True).tolist() == [1.0]


def test_neg_perplexity_is_inverse_perplexity_in_unit_interval():
    lls = [[Loglik(-2.0, 4)], [Loglik(0.0, 3)], [Loglik(-1e6, 1)]]
    got = scoring.neg_perplexity(lls, [ex("t")] * 3)
    assert got[0] == pytest.approx(math.exp(-0.5))
    assert got[1] == 1.0 and 0.0 <= got[2] < 1e-9


def test_truncate_at_stop_takes_earliest():
    assert truncate_at_stop("abc\ndef.", ["."] + ["\n"]) == "abc"
    assert truncate_at_stop("abc", []) == "abc"


def test_combined_fitness_and_flatten():
    scores = {
        "a": np.array([1.0, 0.0]),
        "b": np.array([1.0, 1.0, 1.0, 1.0]),
        "report": np.array([0.0]),
    }
    # only weighted tasks count: (1 * 0.5 + 3 * 1.0) / 4
    assert combined_fitness(scores, {"a": 1.0, "b": 3.0}) == pytest.approx(0.875)
    assert flatten_scores(scores, ["b", "a"]).tolist() == [1, 1, 1, 1, 1, 0]
    with pytest.raises(KeyError):
        combined_fitness(scores, {"missing": 1.0})
    with pytest.raises(ValueError):
        combined_fitness(scores, {"a": 0.0})


# -- task files ---------------------------------------------------------------------------


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_task(dir: Path, name: str = "t", records=None, **fields) -> Path:
    records = (
        records if records is not None else [{"input": f"x{i}", "target": str(i)} for i in range(5)]
    )
    write_jsonl(dir / f"{name}.jsonl", records)
    spec = {"name": name, "data": f"{name}.jsonl", "prompt": "{input}=", "scoring": "exact_match"}
    spec.update(fields)
    path = dir / f"{name}.yaml"
    import yaml

    path.write_text(yaml.safe_dump(spec))
    return path


def test_load_task_renders_prompts_and_splits(tmp_path):
    write_jsonl(tmp_path / "h.jsonl", [{"input": "h", "target": "9"}])
    task = load_task(write_task(tmp_path, heldout_data="h.jsonl", num_examples=3))
    assert task.name == "t" and task.weight == 1.0
    assert [e.prompt for e in task.examples("search")] == ["x0=", "x1=", "x2="]
    assert [e.target for e in task.examples()] == ["0", "1", "2"]
    assert task.examples("heldout")[0].prompt == "h="
    assert len(task.fingerprint()) == 64


def test_numeric_target_becomes_string(tmp_path):
    task = load_task(
        write_task(tmp_path, records=[{"input": "a", "target": 46}], scoring="last_number")
    )
    assert task.examples()[0].target == "46"


def test_few_shot_prefix(tmp_path):
    write_jsonl(
        tmp_path / "fs.jsonl", [{"input": "a", "target": "1"}, {"input": "b", "target": "2"}]
    )
    task = load_task(
        write_task(tmp_path, few_shot=2, few_shot_data="fs.jsonl", few_shot_separator=";")
    )
    assert task.examples()[0].prompt == "a=1;b=2;x0="


def test_multiple_choice_examples(tmp_path):
    recs = [{"q": "2+2", "choices": ["3", "4"], "answer": 1}]
    task = load_task(write_task(tmp_path, records=recs, prompt="{q}=", scoring="multiple_choice"))
    e = task.examples()[0]
    assert e.choices == ("3", "4") and e.answer == 1 and e.target == "4"


def test_load_tasks_weights_and_base_dir(tmp_path):
    write_task(tmp_path, "a")
    write_task(tmp_path, "b")
    tasks = load_tasks([{"path": "a.yaml", "weight": 2}, "b.yaml"], base_dir=tmp_path)
    assert [t.name for t in tasks] == ["a", "b"]
    assert task_weights(tasks) == {"a": 2.0, "b": 1.0}
    from types import SimpleNamespace  # a config model's TaskRef: path/weight attributes

    assert load_tasks([SimpleNamespace(path=str(tmp_path / "a.yaml"), weight=0.5)])[0].weight == 0.5
    with pytest.raises(TaskError, match="used twice"):
        load_tasks([tmp_path / "a.yaml", tmp_path / "a.yaml"])
    with pytest.raises(TaskError, match=r"tasks\[0\].weight"):
        load_tasks([{"path": tmp_path / "a.yaml", "weight": -1}])


def _task_error(path) -> str:
    with pytest.raises(TaskError) as info:
        load_task(path)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_error_missing_yaml(tmp_path):
    assert "task file not found" in _task_error(tmp_path / "nope.yaml")


def test_error_missing_data_file(tmp_path):
    p = write_task(tmp_path)
    (tmp_path / "t.jsonl").unlink()
    msg = _task_error(p)
    assert "data file not found" in msg and "t.jsonl" in msg


def test_error_missing_heldout_file(tmp_path):
    assert "heldout_data file not found" in _task_error(
        write_task(tmp_path, heldout_data="gone.jsonl")
    )


def test_error_empty_dataset(tmp_path):
    msg = _task_error(write_task(tmp_path, records=[]))
    assert "task t has no examples in split search" in msg


def test_error_bad_jsonl_line(tmp_path):
    p = write_task(tmp_path)
    with open(tmp_path / "t.jsonl", "a") as fh:
        fh.write("{not json\n")
    assert f"{tmp_path / 't.jsonl'}:6: bad JSON line" in _task_error(p)


def test_error_template_field_missing(tmp_path):
    msg = _task_error(write_task(tmp_path, prompt="{question}="))
    assert f"{tmp_path / 't.jsonl'}:1" in msg and "'question' missing from record" in msg


def test_error_malformed_template(tmp_path):
    assert "bad prompt template" in _task_error(write_task(tmp_path, prompt="{input="))


def test_error_target_field_missing(tmp_path):
    assert "target field 'answer' missing" in _task_error(
        write_task(tmp_path, target_field="answer")
    )


def test_error_unknown_scoring(tmp_path):
    msg = _task_error(write_task(tmp_path, scoring="bleu"))
    assert "scoring" in msg and "unknown scoring 'bleu'" in msg and "t.yaml" in msg


def test_error_unknown_field_names_field_and_file(tmp_path):
    msg = _task_error(write_task(tmp_path, max_new_token=3))
    assert msg.startswith(str(tmp_path / "t.yaml")) and "max_new_token: unknown field" in msg


def test_error_missing_required_field(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("name: x\nscoring: exact_match\n")
    assert "data: required field is missing" in _task_error(p)


def test_error_bad_field_value(tmp_path):
    assert "max_new_tokens" in _task_error(write_task(tmp_path, max_new_tokens=0))


def test_error_regex_needs_pattern(tmp_path):
    assert "regex: required" in _task_error(write_task(tmp_path, scoring="regex"))
    assert "regex: invalid pattern" in _task_error(
        write_task(tmp_path, scoring="regex", regex="(unclosed")
    )


def test_error_few_shot_without_data(tmp_path):
    assert "few_shot_data" in _task_error(write_task(tmp_path, few_shot=1))


def test_error_multiple_choice_bad_answer(tmp_path):
    recs = [{"q": "x", "choices": ["a", "b"], "answer": 2}]
    msg = _task_error(write_task(tmp_path, records=recs, prompt="{q}", scoring="multiple_choice"))
    assert "'answer' must be an index" in msg


def test_error_invalid_yaml(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("name: [unclosed\n")
    assert "invalid YAML" in _task_error(p)


def test_error_no_heldout_split(tmp_path):
    task = load_task(write_task(tmp_path))
    with pytest.raises(TaskError, match="has no heldout split"):
        task.examples("heldout")


def test_evaluate_task_dispatches_and_cuts_stop_strings(tmp_path):
    task = load_task(write_task(tmp_path, stop=["\n"], max_new_tokens=4))
    seen = {}

    def generate(prompts, max_new_tokens, stop):
        seen.update(n=max_new_tokens, stop=stop)
        return [p[1:-1] + "\nmore" for p in prompts]  # "x3=" -> "3\nmore"

    got = evaluate_task(task, "search", generate, lambda reqs: [])
    assert got.tolist() == [1.0] * 5 and seen == {"n": 4, "stop": ["\n"]}


def test_evaluate_task_regroups_loglik_requests(tmp_path):
    recs = [
        {"q": "a", "choices": ["x", "y", "z"], "answer": 2},
        {"q": "b", "choices": ["x", "y"], "answer": 0},
    ]
    task = load_task(write_task(tmp_path, records=recs, prompt="{q}", scoring="multiple_choice"))
    logp = {("a", "z"): -1.0, ("b", "x"): -1.0}
    got = evaluate_task(
        task, "search", None, lambda reqs: [Loglik(logp.get(r, -5.0), 1) for r in reqs]
    )
    assert got.tolist() == [1.0, 1.0]


# -- the HF backend -----------------------------------------------------------------------

tiny_models = pytest.importorskip("tiny_models")
VOCAB = 99  # digits, letters, punctuation, space: every character the prompts use


def make_lively_llama(dir: Path, seed: int) -> Path:
    """A random tiny Llama whose matrices have std 0.3 instead of HF's 0.02, so its greedy
    outputs differ from prompt to prompt (at std 0.02 every prompt gives the same token)."""
    from transformers import AutoModelForCausalLM

    tiny_models.make_tiny_llama(dir, seed=seed, hidden=32, vocab=VOCAB)
    model = AutoModelForCausalLM.from_pretrained(str(dir))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(str(dir))
    return dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return make_lively_llama(tmp_path_factory.mktemp("m") / "tiny", seed=0)


@pytest.fixture(scope="module")
def backend(tiny_dir):
    b = make_backend("hf", model_dir=str(tiny_dir), device="cpu", batch_size=64)
    yield b
    b.close()


def _prompts(n=40, seed=0):
    rng = random.Random(seed)
    return [
        "".join(rng.choice("abcdefghij0123456789") for _ in range(rng.randint(1, 9))) + "="
        for _ in range(n)
    ]


def test_target_tensors_are_the_model_tensors_under_checkpoint_names(backend, tiny_dir):
    from safetensors import safe_open

    tensors = backend.target_tensors()
    with safe_open(str(tiny_dir / "model.safetensors"), "pt") as fh:
        saved = set(fh.keys())
    assert saved <= set(tensors)
    params = dict(backend.model.named_parameters())
    assert all(tensors[name] is p for name, p in params.items())
    # tied head: its own name, the very tensor of the embeddings
    assert tensors["lm_head.weight"] is tensors["model.embed_tokens.weight"]
    assert not any("rotary" in name for name in tensors)


def test_batched_generation_equals_unbatched(backend):
    prompts = _prompts()
    batched = backend.generate(prompts, 6)
    assert len(set(batched)) > 3  # the random model does not give one answer to everything
    backend.batch_size = 1
    try:
        single = backend.generate(prompts, 6)
    finally:
        backend.batch_size = 64
    assert batched == single


def test_loop_and_generate_agree(backend):
    prompts = _prompts(seed=1)
    loop = backend.generate(prompts, 5)
    backend.generation = "generate"
    try:
        hf = backend.generate(prompts, 5)
    finally:
        backend.generation = "loop"
    assert loop == hf


def test_generation_is_deterministic_across_calls_and_instances(backend, tiny_dir):
    prompts = _prompts(seed=2)
    first = backend.generate(prompts, 6)
    assert backend.generate(prompts, 6) == first
    other = make_backend("hf", model_dir=str(tiny_dir), device="cpu", batch_size=7)
    assert other.generate(prompts, 6) == first


def test_stop_strings_cut_generation(backend):
    prompts = _prompts(seed=3)
    plain = backend.generate(prompts, 6)
    # stop at the second character of the first output that has one
    p, out = next((p, o) for p, o in zip(prompts, plain) if len(o) >= 2)
    stop = out[1]
    assert backend.generate([p], 6, [stop]) == [out[: out.index(stop)]]


def test_in_place_weight_writes_change_outputs_and_restore(backend, tmp_path):
    from transformers import AutoModelForCausalLM

    other_dir = make_lively_llama(tmp_path / "other", seed=1)
    other = AutoModelForCausalLM.from_pretrained(str(other_dir)).state_dict()
    prompts = _prompts(seed=4)
    before = backend.generate(prompts, 6)
    tensors = backend.target_tensors()
    saved = {k: v.detach().clone() for k, v in tensors.items()}
    ptrs = {k: v.data_ptr() for k, v in tensors.items()}
    with torch.no_grad():
        for name, value in other.items():
            tensors[name].copy_(value)
    after = backend.generate(prompts, 6)
    assert after != before
    assert {k: v.data_ptr() for k, v in backend.target_tensors().items()} == ptrs
    with torch.no_grad():
        for name, value in saved.items():
            tensors[name].copy_(value)
    assert backend.generate(prompts, 6) == before


def test_gpt2_learned_positions_batched_equals_unbatched(tmp_path):
    from transformers import AutoModelForCausalLM

    d = tiny_models.make_tiny_gpt2(tmp_path / "g", vocab=VOCAB)
    model = AutoModelForCausalLM.from_pretrained(str(d))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    model.save_pretrained(str(d))
    b = make_backend("hf", model_dir=str(d), device="cpu")
    prompts = _prompts(seed=7)
    batched = b.generate(prompts, 6)
    assert len(set(batched)) > 3
    b.batch_size = 1
    assert b.generate(prompts, 6) == batched


def test_long_prompts_keep_their_end_within_the_positions(backend):
    long = "ab" * 40 + "="  # 81 characters + BOS, the model has 64 positions
    with pytest.warns(UserWarning, match="cut to their last 58 tokens"):
        out = backend.generate([long], 6)
    ids = backend.tokenizer(long)["input_ids"]
    assert len(ids) == 82
    with torch.inference_mode():
        assert out == backend._generate_loop([ids[-58:]], 6, [])
    with pytest.raises(BackendError, match="leaves no room"):
        backend.generate(["a="], 64)


def _manual_loglik(backend, context: str, continuation: str) -> float:
    tok = backend.tokenizer
    ctx = tok(context)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = backend.model(input_ids=ids).logits[0].log_softmax(-1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def test_loglikelihood_matches_a_plain_forward_and_batching(backend):
    reqs = [("ab=", "12"), ("a=", "xyz"), ("abcdefgh=", "q"), ("7=", "0123")]
    got = backend.loglikelihood(reqs)
    for (c, x), ll in zip(reqs, got):
        assert ll.num_tokens == len(x)
        assert ll.logprob == pytest.approx(_manual_loglik(backend, c, x), abs=1e-4)
    backend.loglik_batch_size = 1
    try:
        single = backend.loglikelihood(reqs)
    finally:
        backend.loglik_batch_size = backend.batch_size
    assert [a.logprob for a in single] == pytest.approx([a.logprob for a in got], abs=1e-5)


def test_multiple_choice_picks_the_more_likely_choice(backend, tmp_path):
    prompts = _prompts(n=12, seed=5)
    pairs = [(p, c) for p in prompts for c in ("ab", "9")]
    lls = backend.loglikelihood(pairs)
    records = []
    for i, p in enumerate(prompts):
        best = int(np.argmax([lls[2 * i].logprob, lls[2 * i + 1].logprob]))
        records.append({"q": p, "choices": ["ab", "9"], "answer": best if i % 2 == 0 else 1 - best})
    task = load_task(write_task(tmp_path, records=records, prompt="{q}", scoring="multiple_choice"))
    scores = backend.evaluate([task])["t"]
    assert scores.tolist() == [1.0 if i % 2 == 0 else 0.0 for i in range(12)]


def test_neg_perplexity_task(backend, tmp_path):
    records = [{"input": p, "target": "123"} for p in _prompts(n=5, seed=6)]
    task = load_task(write_task(tmp_path, records=records, scoring="neg_perplexity"))
    scores = backend.evaluate([task])["t"]
    lls = backend.loglikelihood([(e.prompt, e.target) for e in task.examples()])
    assert scores == pytest.approx([math.exp(ll.logprob / 3) for ll in lls])
    assert np.all((scores > 0) & (scores < 1))


def test_backend_errors(tmp_path):
    with pytest.raises(CheckpointError, match="model directory not found"):
        make_backend("hf", model_dir=str(tmp_path / "none"))
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no .safetensors weights"):
        make_backend("hf", model_dir=str(tmp_path / "cfg"))


# -- a trained model scores well above an untrained one -----------------------------------


COPY_VOCAB = 40  # specials, digits, a-z: the copy task writes "abc" + "z" -> "abc"


def make_copy_llama(dir: Path) -> Path:
    """A random Llama shaped to learn copying fast (4 heads of 16, MLP 4x)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=COPY_VOCAB,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        pad_token_id=tiny_models.PAD_ID,
        bos_token_id=tiny_models.BOS_ID,
        eos_token_id=tiny_models.EOS_ID,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        LlamaForCausalLM(cfg).save_pretrained(str(dir))
    tiny_models.char_tokenizer(COPY_VOCAB).save_pretrained(str(dir))
    return dir


def _train_copy_model(model_dir: Path, steps: int = 100) -> None:
    """Teach ``sz`` -> ``s</s>`` (s: 1-4 letters of a-j) with loss on the answer only."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    torch.manual_seed(0)  # dropout-free model; seeds nothing else but keeps runs identical
    model.train()
    for _ in range(steps):
        seqs, labels = [], []
        for _ in range(64):
            s = "".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 4)))
            p = tok(s + "z")["input_ids"]
            a = tok(s, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            seqs.append(p + a)
            labels.append([-100] * len(p) + a)
        w = max(map(len, seqs))
        ids = torch.tensor([s + [tok.pad_token_id] * (w - len(s)) for s in seqs])
        lab = torch.tensor([s + [-100] * (w - len(s)) for s in labels])
        loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(str(model_dir))


@pytest.mark.slow
def test_trained_copy_model_scores_well_above_untrained(tmp_path):
    rng = random.Random(1)
    words = [
        "".join(rng.choice("abcdefghij") for _ in range(rng.randint(1, 4))) for _ in range(200)
    ]
    task = load_task(
        write_task(
            tmp_path,
            records=[{"input": w, "target": w} for w in words],
            prompt="{input}z",
            max_new_tokens=6,
        )
    )
    model_dir = make_copy_llama(tmp_path / "copy")
    untrained = (
        make_backend("hf", model_dir=str(model_dir), device="cpu").evaluate([task])["t"].mean()
    )
    t0 = time.perf_counter()
    _train_copy_model(model_dir)
    train_s = time.perf_counter() - t0
    backend = make_backend("hf", model_dir=str(model_dir), device="cpu")
    t0 = time.perf_counter()
    trained = backend.evaluate([task])["t"].mean()
    eval_s = time.perf_counter() - t0
    print(
        f"copy task: untrained {untrained:.3f}, trained {trained:.3f}; train {train_s:.1f}s, eval 200 in {eval_s:.2f}s"
    )
    assert untrained < 0.05
    assert trained > 0.6
