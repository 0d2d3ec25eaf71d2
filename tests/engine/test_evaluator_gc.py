"""A search worker freezes what is alive after its one-time merge setup, so the cyclic
collector's full passes no longer walk the model and the compiler's objects each time
(measured on SmolLM2: 0.24-0.30 s every ~14 candidates); closing the worker undoes it."""

from __future__ import annotations

import gc
import json

from tiny_models import make_tiny_expert, make_tiny_llama

from evomerge.checkpoint.opener import open_checkpoint
from evomerge.engine.evaluator import EvalSpec, Evaluator
from evomerge.plan import MergePlan, TensorRef, TensorStep


def _ties_plan(base, experts, density: float) -> dict:
    names = open_checkpoint(base).names
    sources = {"base": str(base), **{f"e{i}": str(e) for i, e in enumerate(experts)}}
    steps = [TensorStep(n, "ties", [TensorRef(f"e{i}", n) for i in range(len(experts))],
                        base=TensorRef("base", n),
                        params={"weight": [1.0] * len(experts), "density": [density] * len(experts)})
             for n in names]
    return MergePlan(sources=sources, steps=steps).to_dict()


def test_worker_freezes_after_its_setup_and_unfreezes_on_close(tmp_path):
    base = make_tiny_llama(tmp_path / "base", seed=0, hidden=32)
    experts = [make_tiny_expert(base, tmp_path / f"e{i}", seed=i + 1, scale=0.05) for i in range(2)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"input": s, "target": "x"}) + "\n"
                                              for s in ("abc", "hello", "cab")))
    (tmp_path / "t.yaml").write_text("name: t\ndata: t.jsonl\nscoring: exact_match\nmax_new_tokens: 2\n")
    spec = EvalSpec(model_dir=str(base), tasks=[{"path": str(tmp_path / "t.yaml"), "weight": 1.0}],
                    backend={"name": "hf", "dtype": "float32", "batch_size": 8})
    gc.unfreeze()
    ev = Evaluator(spec)
    try:
        assert gc.get_freeze_count() == 0
        first = ev.evaluate(_ties_plan(base, experts, 0.5))
        assert first.error is None and first.setup_seconds and first.setup_seconds > 0
        frozen = gc.get_freeze_count()
        assert frozen > 0  # the model's parameters and modules among them
        second = ev.evaluate(_ties_plan(base, experts, 0.3))  # no setup: no second freeze
        assert second.error is None and second.setup_seconds is None
        assert gc.get_freeze_count() <= frozen  # (frozen objects still go by refcount)
    finally:
        ev.close()
    assert gc.get_freeze_count() == 0
