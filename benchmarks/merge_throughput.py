"""Merge throughput: evomerge TIES / DARE-TIES vs a plain tensor copy vs mergekit.

Builds random Llama-shaped checkpoints on disk (a base and three fine-tunes = base + small
noise; default ~1B parameters each, bf16), then, in one run:

1. copy: reads every input tensor of the merge from the same safetensors files and copies
   it (``clone`` on CPU, a host-to-device copy on CUDA): the memory-bandwidth limit;
2. evomerge: materializes a TIES and a DARE-TIES merge of base + 3 fine-tunes (density
   0.5) *in memory* (every output tensor computed, nothing written), timing seconds and
   GB/s of input bytes read, and the ratio to the copy;
3. mergekit (when ``mergekit-yaml`` is on PATH or given with ``--mergekit-bin``): the same
   recipe, exported with ``recipe_to_mergekit_yaml``, run by ``mergekit-yaml`` to disk; for
   a like-for-like ratio evomerge also writes the same merge to disk (``--no-disk`` skips).

Targets: evomerge >= 40% of copy bandwidth, >= 5x faster than mergekit's TIES.

    .venv/bin/python benchmarks/merge_throughput.py --small          # < 1 min
    .venv/bin/python benchmarks/merge_throughput.py --mergekit-bin /tmp/mkvenv/bin/mergekit-yaml

The models (~2 GB each at the default size) live in ``--workdir`` (a temporary directory by
default) and are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from evomerge.checkpoint.reader import clear_reader_cache, open_checkpoint  # noqa: E402
from evomerge.materialize import Materializer  # noqa: E402
from evomerge.recipe import compile_recipe, recipe_to_mergekit_yaml  # noqa: E402

SHAPES = {
    # ~1.0B parameters: Llama-style with grouped-query attention, untied head
    "default": dict(hidden=2048, layers=16, intermediate=7168, vocab=32000, heads=32, kv_heads=8),
    "small": dict(hidden=1024, layers=4, intermediate=2816, vocab=16000, heads=16, kv_heads=4),
}
FINETUNES = ("ft1", "ft2", "ft3")


# -- random checkpoints ---------------------------------------------------------------------
def tensor_shapes(hidden, layers, intermediate, vocab, heads, kv_heads):
    head_dim = hidden // heads
    kv = kv_heads * head_dim
    out = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (hidden,)),
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "post_attention_layernorm.weight", (hidden,)),
            (p + "mlp.gate_proj.weight", (intermediate, hidden)),
            (p + "mlp.up_proj.weight", (intermediate, hidden)),
            (p + "mlp.down_proj.weight", (hidden, intermediate)),
        ]
    out += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return out


def _write_tokenizer(vocab: int, dirs: list[Path]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {"<unk>": 0, "<s>": 1, "</s>": 2}
    table.update({f"t{i}": i for i in range(3, vocab)})
    tok = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    for d in dirs:
        fast.save_pretrained(d)


def build_models(root: Path, shape: dict, shard_bytes: int = 2 * 10**9, seed: int = 0) -> dict[str, Path]:
    """Base (N(0, 0.02)) and fine-tunes (base + N(0, 0.002)), bf16, streamed shard by shard."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    names = ["base", *FINETUNES]
    dirs = {n: root / n for n in names}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(
        hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
        tie_word_embeddings=False, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, dtype="bfloat16",
    )
    cfg.architectures = ["LlamaForCausalLM"]
    gen = torch.Generator().manual_seed(seed)
    shards = [0]
    size = 0
    buffers = {n: {} for n in names}
    weight_maps = {n: {} for n in names}

    def flush():
        k = len(shards)
        for n in names:
            save_file(buffers[n], str(dirs[n] / f"shard-{k:05d}.safetensors"), metadata={"format": "pt"})
            for t in buffers[n]:
                weight_maps[n][t] = f"shard-{k:05d}.safetensors"
            buffers[n].clear()
        shards.append(k)

    for name, shp in tensor_shapes(**shape):
        nb = 2
        for d in shp:
            nb *= d
        if size and size + nb > shard_bytes:
            flush()
            size = 0
        if name.endswith("norm.weight"):
            base = torch.ones(shp)
        else:
            base = torch.randn(shp, generator=gen).mul_(0.02)
        buffers["base"][name] = base.to(torch.bfloat16)
        for n in FINETUNES:
            buffers[n][name] = torch.randn(shp, generator=gen).mul_(0.002).add_(base).to(torch.bfloat16)
        del base
        size += nb
    flush()
    for n in names:
        total = sum((dirs[n] / f).stat().st_size for f in set(weight_maps[n].values()))
        index = {"metadata": {"total_size": total}, "weight_map": weight_maps[n]}
        (dirs[n] / "model.safetensors.index.json").write_text(json.dumps(index))
        cfg.save_pretrained(dirs[n])
    _write_tokenizer(shape["vocab"], list(dirs.values()))
    return dirs


# -- measurements ---------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_pass(plan, device: torch.device) -> tuple[float, int]:
    """Read every input of every step and copy it once: (seconds, bytes read)."""
    readers = {k: open_checkpoint(p) for k, p in plan.sources.items()}
    nbytes = 0
    _sync(device)
    t0 = time.perf_counter()
    for step in plan.steps:
        refs = list(step.inputs) + ([step.base] if step.base is not None else [])
        for ref in refs:
            r = readers[ref.model]
            t = r.get(ref.tensor)
            if device.type == "cpu":
                out = torch.empty_like(t)
                out.copy_(t)
            else:
                out = t.to(device, non_blocking=False)
            nbytes += t.numel() * t.element_size()
            del out, t
    _sync(device)
    return time.perf_counter() - t0, nbytes


def merge_pass(plan, device: torch.device) -> tuple[float, int]:
    """Materialize every output tensor in memory (nothing written): (seconds, bytes read)."""
    mat = Materializer(device=device)
    _sync(device)
    t0 = time.perf_counter()
    n = 0
    for _, t in mat.iter_tensors(plan):
        n += 1
        del t
    _sync(device)
    assert n == len(plan.steps)
    return time.perf_counter() - t0, mat.bytes_read


def disk_pass(plan, device: torch.device, out: Path) -> float:
    t0 = time.perf_counter()
    Materializer(device=device).materialize_to_disk(plan, out, shard_size="2GB", overwrite=True)
    return time.perf_counter() - t0


def mergekit_pass(mk_bin: str, recipe: dict, out: Path, device: torch.device, root: Path) -> float:
    cfg = root / "mergekit_ties.yaml"
    cfg.write_text(recipe_to_mergekit_yaml(recipe))
    cmd = [mk_bin, str(cfg), str(out), "--random-seed", "0", "--allow-crimes"]
    if device.type == "cuda":
        cmd.append("--cuda")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
    return seconds


def _recipe(method: str, dirs: dict[str, Path]) -> dict:
    return {
        "merge_method": method,
        "sources": {k: str(v) for k, v in dirs.items()},
        "base_model": "base",
        "models": [{"model": n, "parameters": {"weight": 1.0, "density": 0.5}} for n in FINETUNES],
        "dtype": "bfloat16",
        "seed": 0,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--small", action="store_true", help="small preset (~78M params) that runs in < 1 min")
    for k in ("hidden", "layers", "intermediate", "vocab", "heads", "kv_heads"):
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None)
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    ap.add_argument("--workdir", default=None, help="where the random models go (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the models (reuse them with --workdir)")
    ap.add_argument("--mergekit-bin", default=None, help="mergekit-yaml executable (default: from PATH)")
    ap.add_argument("--no-mergekit", action="store_true", help="skip the mergekit comparison")
    ap.add_argument("--no-disk", action="store_true", help="skip the to-disk evomerge run")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args(argv)

    shape = dict(SHAPES["small" if args.small else "default"])
    for k in shape:
        v = getattr(args, k)
        if v is not None:
            shape[k] = v
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else torch.device(args.device)
    params = sum(int(torch.Size(s).numel()) for _, s in tensor_shapes(**shape))
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="evomerge_bench_"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"shape {shape}: {params / 1e9:.3f} B params, {params * 2 / 1e9:.2f} GB per model (bf16); "
          f"device {device}, {torch.get_num_threads()} threads; models in {root}")
    try:
        if all((root / n / "model.safetensors.index.json").is_file() for n in ("base", *FINETUNES)):
            dirs = {n: root / n for n in ("base", *FINETUNES)}
            print("reusing models")
        else:
            t0 = time.perf_counter()
            dirs = build_models(root, shape)
            print(f"built 4 models in {time.perf_counter() - t0:.1f} s")
        clear_reader_cache()
        plans = {m: compile_recipe(_recipe(m, dirs)) for m in ("ties", "dare_ties")}
        copy_pass(plans["ties"], device)  # warm the page cache (and CUDA context)
        copy_s, copy_b = min(copy_pass(plans["ties"], device) for _ in range(2))
        copy_bw = copy_b / copy_s / 1e9
        print(f"{'copy':10s} {copy_s:8.2f} s  {copy_b / 1e9:7.2f} GB read  {copy_bw:7.2f} GB/s")
        results = {}
        for m, plan in plans.items():
            s, b = merge_pass(plan, device)
            results[m] = s
            bw = b / s / 1e9
            print(f"{m:10s} {s:8.2f} s  {b / 1e9:7.2f} GB read  {bw:7.2f} GB/s  "
                  f"{100 * bw / copy_bw:5.1f}% of copy (target >= 40%)")
        mk_bin = None if args.no_mergekit else (args.mergekit_bin or shutil.which("mergekit-yaml"))
        if mk_bin is None:
            print("mergekit: skipped (mergekit-yaml not found; pass --mergekit-bin)")
        else:
            if not args.no_disk:
                disk_s = disk_pass(plans["ties"], device, root / "evomerge_out")
                print(f"{'ties->disk':10s} {disk_s:8.2f} s  (evomerge merge to disk, same recipe)")
                shutil.rmtree(root / "evomerge_out", ignore_errors=True)
            mk_s = mergekit_pass(mk_bin, _recipe("ties", dirs), root / "mergekit_out", device, root)
            shutil.rmtree(root / "mergekit_out", ignore_errors=True)
            print(f"{'mergekit':10s} {mk_s:8.2f} s  (mergekit-yaml ties to disk, incl. startup)")
            print(f"mergekit / evomerge TIES: {mk_s / results['ties']:.1f}x (in memory)"
                  + ("" if args.no_disk else f", {mk_s / disk_s:.1f}x (both to disk)")
                  + "  (target >= 5x)")
    finally:
        clear_reader_cache()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
