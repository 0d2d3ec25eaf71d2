"""Random Llama-shaped checkpoints for the merge benchmarks: a base and three fine-tunes.

The base is N(0, 0.02) (norm weights 1), each fine-tune the base plus N(0, 0.002), all in
bf16, written shard by shard as safetensors with an index, a config and a word-level
tokenizer, so every loader (evomerge, transformers, mergekit) takes them as real models.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

SHAPES = {
    # ~1.0B parameters: Llama-style with grouped-query attention, untied head
    "default": dict(hidden=2048, layers=16, intermediate=7168, vocab=32000, heads=32, kv_heads=8),
    "small": dict(hidden=1024, layers=4, intermediate=2816, vocab=16000, heads=16, kv_heads=4),
}
FINETUNES = ("ft1", "ft2", "ft3")


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


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Write the merge benchmarks' random base and "
                                             "fine-tunes (bf16 safetensors) into OUT/{base,ft1,ft2,ft3}.")
    ap.add_argument("out", help="directory for the four models")
    ap.add_argument("--small", action="store_true", help="small preset (~78M params)")
    for k in SHAPES["default"]:
        ap.add_argument(f"--{k.replace('_', '-')}", type=int, default=None)
    args = ap.parse_args(argv)
    shape = dict(SHAPES["small" if args.small else "default"])
    shape.update({k: getattr(args, k) for k in shape if getattr(args, k) is not None})
    dirs = build_models(Path(args.out), shape)
    print("\n".join(str(d) for d in dirs.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
