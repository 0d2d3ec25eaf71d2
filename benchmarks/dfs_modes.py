"""DFS at a size where evaluation strategy matters: cost per candidate and folding error.

    python benchmarks/dfs_modes.py [--hidden 1024] [--layers 12] [--device cuda] [--paths 4]

Three random Llama sources (a base and two noisy copies) are written to a temp dir; random
data-flow paths of 1..1.5 L layers with scaled transitions are then evaluated (one forward
of a batch of 16 x 128 tokens) three ways:

- slots: the HF backend's resident model keeps P = max path layer slots; a candidate writes
  its layers in place and the active stack is cut to its path (what the engine does);
- zeroed: every slot stays active; unused ones get o_proj/down_proj scaled by 0 (an exact
  identity for a pre-norm block) so the forward always runs P layers;
- rebuild: write the candidate to disk, load a fresh model, run it.

Then the folding error: the exported (folded) model vs Sakana's direct form (unscaled layer
copies, residual stream scaled by forward pre-hooks), max |logit difference| relative to
the logits' spread and the greedy (argmax) agreement over all positions, at the model's
norm epsilon and at eps ~ 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evomerge.fitness.backends.hf import HFBackend  # noqa: E402
from evomerge.materialize import Materializer  # noqa: E402
from evomerge.recipe import compile_recipe  # noqa: E402
from evomerge.spaces.dfs import dfs_recipe  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
from tiny_models import char_tokenizer, scale_layer_inputs  # noqa: E402

PROJ = ("self_attn.o_proj.", "mlp.down_proj.")


def make_sources(root: Path, hidden: int, layers: int, eps: float, device: str) -> dict[str, str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer(8192)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75) // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                      num_key_value_heads=max(1, hidden // 256), vocab_size=8192,
                      max_position_embeddings=512, rms_norm_eps=eps, tie_word_embeddings=True)
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg).to(device)
    out = {}
    for k, noise in (("a", 0.0), ("b", 0.01), ("c", 0.01)):
        with torch.no_grad():
            m = base if noise == 0 else None
            if m is None:
                m = LlamaForCausalLM(cfg).to(device)
                m.load_state_dict(base.state_dict())
                for p in m.parameters():
                    p.add_(torch.randn_like(p) * noise)
        m.save_pretrained(root / k)
        tok.save_pretrained(root / k)
        out[k] = str(root / k)
    return out


def random_path(rng, models, layers, n):
    keys = list(models)
    path = [(keys[rng.integers(len(keys))], int(rng.integers(layers))) for _ in range(n)]
    scales = [1.0] + [float(np.exp(rng.uniform(np.log(0.5), np.log(2.0)))) for _ in range(n - 1)]
    return path, scales


def forward(model, ids):
    with torch.inference_mode():
        return model(input_ids=ids).logits


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def modes(models, paths, P, ids, device, dtype):
    mat = Materializer(device, cache_sources=True)
    be = HFBackend(models["a"], device=device, dtype=dtype, max_layers=P)
    t = {"slots": [], "zeroed": [], "rebuild": []}
    logits = {"slots": [], "zeroed": [], "rebuild": []}
    for i, (path, scales) in enumerate([paths[0]] + paths):  # the first is a warm-up
        for mode, pad in (("slots", None), ("zeroed", P)):
            rec = dfs_recipe(models, path, scales, "a", PROJ, pad_to=pad)
            sync(device)
            t0 = time.perf_counter()
            be.load_plan(compile_recipe(rec), mat)
            out = forward(be.model, ids)
            sync(device)
            if i:
                t[mode].append(time.perf_counter() - t0)
                logits[mode].append(out.float().cpu())
    be.close()
    with tempfile.TemporaryDirectory() as tmp:
        for i, (path, scales) in enumerate(paths):
            sync(device)
            t0 = time.perf_counter()
            d = Materializer(device).materialize_to_disk(
                compile_recipe(dfs_recipe(models, path, scales, "a", PROJ)), Path(tmp) / f"c{i}")
            fresh = HFBackend(str(d), device=device, dtype=dtype)
            out = forward(fresh.model, ids)
            sync(device)
            t["rebuild"].append(time.perf_counter() - t0)
            logits["rebuild"].append(out.float().cpu())
            fresh.close()
    diff = max(float((a - b).abs().max()) for k in ("zeroed", "rebuild")
               for a, b in zip(logits["slots"], logits[k]))
    return {k: float(np.mean(v)) for k, v in t.items()}, diff


def folding_error(models, path, scales, ids, device):
    from transformers import AutoModelForCausalLM

    with tempfile.TemporaryDirectory() as tmp:
        mat = Materializer(device)
        f = mat.materialize_to_disk(compile_recipe(dfs_recipe(models, path, scales, "a", PROJ)),
                                    Path(tmp) / "f")
        d = mat.materialize_to_disk(compile_recipe(dfs_recipe(models, path, [1.0] * len(path),
                                                              "a", PROJ)), Path(tmp) / "d")
        folded = AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).to(device).eval()
        direct = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).to(device).eval()
        plain = forward(direct, ids).float()
        scale_layer_inputs(direct, scales)
        a, b = forward(folded, ids).float(), forward(direct, ids).float()
        spread = float(b.std())
        return {"max_abs_diff": float((a - b).abs().max()), "logit_std": spread,
                "effect_of_scales": float((b - plain).abs().max()),
                "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--paths", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = args.device
    L = args.layers
    P = (3 * L) // 2
    rng = np.random.default_rng(0)
    ids = torch.randint(4, 8192, (16, 128), generator=torch.Generator().manual_seed(0)).to(dev)
    report = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
              "hidden": args.hidden, "layers": L, "max_path": P, "dtype": args.dtype,
              "load": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        models = make_sources(Path(tmp) / "eps", args.hidden, L, 1e-6, dev)
        n_params = sum(p.numel() for p in HFBackend(models["a"], device="cpu").model.parameters())
        report["params_per_source"] = n_params
        lengths = np.linspace(L, P, args.paths).round().astype(int)
        paths = [random_path(rng, models, L, int(n)) for n in lengths]
        secs, diff = modes(models, paths, P, ids, dev, args.dtype)
        report.update(seconds=secs, path_lengths=[int(n) for n in lengths], modes_max_diff=diff)
        long_path = random_path(rng, models, L, P)
        report["fold_eps_1e-6"] = folding_error(models, *long_path, ids, dev)
        exact = make_sources(Path(tmp) / "exact", args.hidden, L, 1e-30, dev)
        report["fold_eps_0"] = folding_error(exact, *long_path, ids, dev)
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
