"""vLLM serves an exported data-flow (DFS) model as an ordinary checkpoint, agreeing with HF.

In the vLLM test group (`.ci/vllm.sh` runs it in .venv-vllm); skipped where vLLM is not
importable. The zoo and helpers are test_vllm_backend's (heads at least 32 wide for vLLM's
CPU attention).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_vllm_backend import ENGINE_OPTS, agreement, outputs, tasks, vllm_module, zoo  # noqa: E402,F401

from evomerge.checkpoint.opener import open_checkpoint  # noqa: E402
from evomerge.fitness import make_backend  # noqa: E402
from evomerge.materialize import Materializer  # noqa: E402
from evomerge.recipe import compile_recipe  # noqa: E402
from evomerge.spaces.dfs import dfs_recipe  # noqa: E402

PROJ = ("self_attn.o_proj.", "mlp.down_proj.")


@pytest.mark.slow
def test_vllm_serves_an_exported_dfs_path_like_hf(zoo, tasks, tmp_path):  # noqa: F811
    experts = {m.name: str(m.path) for m in zoo.experts}
    a, b, c = list(experts)
    last = open_checkpoint(experts[a]).layout.num_layers - 1
    assert last + 1 < 5
    # longer than any source, one layer twice, every transition scaled
    path = [(a, 0), (b, 0), (c, last), (a, last), (b, 0)]
    scales = [1.0, 1.6, 0.7, 1.25, 0.9]
    plan = compile_recipe(dfs_recipe(experts, path, scales, a, PROJ))
    mat = Materializer("cpu", cache_sources=True)
    out = mat.materialize_to_disk(plan, tmp_path / "dfs")

    resident = make_backend("hf", model_dir=experts[a], max_layers=6, batch_size=256)
    resident.load_plan(plan, mat)  # the in-process DFS evaluation the search uses
    hf = make_backend("hf", model_dir=str(out), batch_size=256)
    engine = make_backend("vllm", model_dir=str(out), **ENGINE_OPTS)
    try:
        (digest,) = engine.llm.collective_rpc("evomerge_weights_digest")
        assert any(n.startswith("model.layers.4.") for n in digest)
        assert not any(n.startswith("model.layers.5.") for n in digest)
        want = outputs(hf, tasks)
        assert outputs(resident, tasks) == want
        same, n = agreement(outputs(engine, tasks), want)
        print(f"vLLM vs HF greedy agreement on a 5-layer DFS export: {same}/{n}")
        assert same >= 0.99 * n
        pairs = [("abc>", "012"), ("ijkl>", "5"), ("qr>", "77")]
        v, h = engine.loglikelihood(pairs), hf.loglikelihood(pairs)
        assert [x.logprob for x in v] == pytest.approx([x.logprob for x in h], abs=1e-3)
    finally:
        engine.close()
        hf.close()
        resident.close()
