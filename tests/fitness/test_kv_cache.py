"""The HF backend's greedy loop on the current cache API: no deprecation warnings about
``past_key_values`` (transformers 5.x renames it to ``cache`` and drops the old name in
5.40), and the same answers as ``model.generate``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tiny_models

SCRIPT = r"""
import logging, sys, warnings
sys.path.insert(0, sys.argv[2])
from transformers.utils import logging as hf_logging
records = []
class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())
hf_logging.get_logger("transformers").addHandler(Keep())
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    from evomerge.fitness import make_backend
    b = make_backend("hf", model_dir=sys.argv[1], device="cpu", batch_size=4)
    prompts = ["abc", "hello", "12+3=", "zz"]
    loop = b.generate(prompts, 6, ["q"])
    b.generation = "generate"
    hf = b.generate(prompts, 6, ["q"])
    import evomerge.zoo.smollm2_pool  # noqa: F401 (its own greedy loop uses the same helper)
bad = [str(w.message) for w in caught
       if issubclass(w.category, (FutureWarning, DeprecationWarning))
       and ("past_key_values" in str(w.message) or "cache" in str(w.message).lower())]
bad += [m for m in records if "past_key_values" in m or "deprecated" in m.lower()]
print("LOOP", loop)
print("HF", hf)
print("BAD", bad)
assert loop == hf, (loop, hf)
assert not bad, bad
"""


def test_greedy_loop_raises_no_cache_deprecation_and_matches_generate(tmp_path):
    model = tiny_models.make_tiny_llama(tmp_path / "tiny", seed=5, hidden=32, vocab=40)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="always")
    import evomerge

    root = str(Path(evomerge.__file__).resolve().parents[1])  # the evomerge under test
    res = subprocess.run([sys.executable, "-c", SCRIPT, str(model), root], capture_output=True,
                         text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "past_key_values" not in res.stderr
