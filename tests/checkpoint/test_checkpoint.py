"""Checkpoints in and out: reader, LoRA reader/saver, compatibility checks, writer."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from tiny_models import make_tiny_gpt2, make_tiny_llama, make_tiny_lora

from evomerge.checkpoint import (
    CheckpointReader,
    LoraReader,
    check_compatible,
    clear_reader_cache,
    open_checkpoint,
    parse_size,
    save_lora_adapter,
    write_checkpoint,
)
from evomerge.checkpoint import opener as opener_mod
from evomerge.errors import CheckpointError, ConfigError, IncompatibleModelsError

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "llama": make_tiny_llama(root / "llama", seed=0),
        "llama_b": make_tiny_llama(root / "llama_b", seed=1),
        "sharded": make_tiny_llama(root / "sharded", seed=0, shard_size="2KB"),
        "untied": make_tiny_llama(root / "untied", seed=3, tie=False),
        "gpt2": make_tiny_gpt2(root / "gpt2", seed=0),
    }


@pytest.fixture(autouse=True)
def _fresh_cache():
    clear_reader_cache()
    yield
    clear_reader_cache()


def hf_state_dict(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


# -- reading ------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["llama", "sharded", "untied", "gpt2"])
def test_reader_equals_transformers_state_dict(zoo, which):
    r = CheckpointReader(zoo[which])
    sd = hf_state_dict(zoo[which])
    tied = r.layout.tied_embeddings
    expected = {k for k in sd if not (tied and k == "lm_head.weight")}
    assert set(r.names) == expected
    for name in r.names:
        t = r.get(name)
        assert r.shape(name) == tuple(t.shape) == tuple(sd[name].shape)
        assert r.dtype(name) == t.dtype == torch.float32
        assert torch.equal(t, sd[name]), name
    assert r.num_parameters == sum(sd[n].numel() for n in expected)
    assert r.nbytes == 4 * r.num_parameters


def test_sharded_reader_uses_index_and_one_handle_per_shard(zoo, monkeypatch):
    r = CheckpointReader(zoo["sharded"])
    shards = sorted(p.name for p in zoo["sharded"].glob("model-*.safetensors"))
    assert len(shards) > 2 and [p.name for p in r.shard_files] == shards
    opened = []
    real = __import__("safetensors").safe_open

    def counting(path, *a, **k):
        opened.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr("safetensors.safe_open", counting)
    for _ in range(2):
        for name in r.names:
            r.get(name)
    assert sorted(opened) == shards  # each shard opened exactly once


def test_reader_is_lazy_and_names_are_natural_order(tmp_path):
    path = make_tiny_llama(tmp_path / "m", layers=12, hidden=8)
    r = CheckpointReader(path)
    # metadata comes from the headers: no shard handle opened yet
    assert r.shape("model.embed_tokens.weight") == (40, 8)
    assert r.dtype("model.norm.weight") == torch.float32
    assert r._handles == {}
    layers = [r.layout.layer_of(n) for n in r.names if r.layout.layer_of(n) is not None]
    assert layers == sorted(layers) and layers[-1] == 11  # layers.2 before layers.10
    t = r.get("model.layers.3.mlp.up_proj.weight")
    assert len(r._handles) == 1
    # zero-copy: a view of the memory-mapped file, not a fresh allocation
    assert t.untyped_storage().nbytes() == t.numel() * 4
    t16 = r.get("model.layers.3.mlp.up_proj.weight", dtype=torch.bfloat16, device="cpu")
    assert t16.dtype == torch.bfloat16 and torch.allclose(t16.float(), t, atol=1e-2)
    r.close()
    assert r._handles == {}
    assert torch.equal(r.get("model.layers.3.mlp.up_proj.weight"), t)


def test_layout_llama_and_gpt2(zoo):
    lay = CheckpointReader(zoo["llama"]).layout
    assert (lay.layer_prefix, lay.num_layers, lay.tied_embeddings) == ("model.layers.", 2, True)
    assert not CheckpointReader(zoo["untied"]).layout.tied_embeddings
    g = CheckpointReader(zoo["gpt2"])
    lay = g.layout
    assert (lay.layer_prefix, lay.num_layers, lay.tied_embeddings) == ("transformer.h.", 2, True)
    assert lay.layer_of("transformer.h.1.attn.c_attn.weight") == 1
    assert lay.layer_of("transformer.wte.weight") is None
    assert lay.kind_of("transformer.h.0.attn.c_attn.weight") == "attn"
    assert lay.kind_of("transformer.h.0.mlp.c_fc.weight") == "mlp"
    assert lay.kind_of("transformer.h.0.ln_1.weight") == "norm"
    assert lay.kind_of("transformer.wte.weight") == "embed"
    assert lay.rename_layer("transformer.h.0.mlp.c_fc.bias", 5) == "transformer.h.5.mlp.c_fc.bias"


def test_tokenizer_files(zoo, tmp_path):
    r = CheckpointReader(zoo["llama"])
    assert r.tokenizer_dir == r.path
    assert {p.name for p in r.tokenizer_files} >= {"tokenizer.json", "tokenizer_config.json"}
    bare = CheckpointReader(make_tiny_llama(tmp_path / "bare", tokenizer=False))
    assert bare.tokenizer_dir is None and bare.tokenizer_files == []


def test_open_checkpoint_caches_per_path_and_notices_rewrites(tmp_path):
    path = make_tiny_llama(tmp_path / "m", seed=0)
    a = open_checkpoint(path)
    assert open_checkpoint(str(path) + "/") is a
    assert open_checkpoint(tmp_path / "x" / ".." / "m") is a
    old = a.get("model.norm.weight").clone()
    make_tiny_llama(tmp_path / "m", seed=5, hidden=32)  # rebuilt in place: re-read
    b = open_checkpoint(path)
    assert b is not a and b.shape("model.norm.weight") == (32,)
    clear_reader_cache()
    assert open_checkpoint(path) is not b
    assert old.shape == (16,)


def test_reader_cache_is_bounded(tmp_path, zoo, monkeypatch):
    monkeypatch.setattr(opener_mod, "MAX_CACHED_READERS", 2)
    paths = [zoo["llama"], zoo["llama_b"], zoo["gpt2"]]
    first = open_checkpoint(paths[0])
    second = open_checkpoint(paths[1])
    second.get("model.norm.weight")
    assert open_checkpoint(paths[0]) is first  # now the most recently used
    open_checkpoint(paths[2])  # evicts the least recently used: paths[1]
    assert len(opener_mod._CACHE) == 2 and open_checkpoint(paths[0]) is first
    assert open_checkpoint(paths[1]) is not second
    assert second._handles == {} and second.get("model.norm.weight").shape == (16,)  # still usable


# -- bad inputs -----------------------------------------------------------------------------
def _copy_model(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_missing_directory_and_config(tmp_path, zoo):
    with pytest.raises(CheckpointError, match="does not exist"):
        CheckpointReader(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="does not exist"):
        open_checkpoint(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="not a directory"):
        CheckpointReader(zoo["llama"] / "model.safetensors")
    d = _copy_model(zoo["llama"], tmp_path / "noconf")
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"missing config file .*config\.json"):
        CheckpointReader(d)
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot read config file"):
        CheckpointReader(d)


def test_missing_weights_and_pickles_refused(tmp_path, zoo):
    d = _copy_model(zoo["llama"], tmp_path / "noweights")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        CheckpointReader(d)
    (d / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(CheckpointError, match=r"pickled weights \(pytorch_model\.bin\).*convert to safetensors"):
        CheckpointReader(d)
    (d / "config.json").unlink()  # the pickle message wins over the missing config
    with pytest.raises(CheckpointError, match="refuses pickles"):
        open_checkpoint(d)
    e = tmp_path / "pt_only"
    e.mkdir()
    (e / "weights.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"weights\.pt"):
        CheckpointReader(e)


def _rewrite_header(path: Path, mutate) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    mutate(header)
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + raw[8 + n :])


def test_corrupt_and_truncated_safetensors(tmp_path, zoo):
    d = _copy_model(zoo["llama"], tmp_path / "bad")
    f = d / "model.safetensors"
    good = f.read_bytes()

    f.write_bytes(good[: len(good) // 2])  # truncated: data offsets past EOF
    with pytest.raises(CheckpointError, match=r"truncated safetensors file .*model\.safetensors: tensor"):
        CheckpointReader(d)

    f.write_bytes(good[:5])
    with pytest.raises(CheckpointError, match=r"corrupt safetensors file .*model\.safetensors"):
        CheckpointReader(d)

    f.write_bytes(struct.pack("<Q", 10**9) + good[8:])  # header length beyond the file
    with pytest.raises(CheckpointError, match="header length 1000000000 exceeds the file size"):
        CheckpointReader(d)

    n = struct.unpack("<Q", good[:8])[0]
    f.write_bytes(good[:8] + b"{" + b"x" * (n - 1) + good[8 + n :])
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        CheckpointReader(d)

    f.write_bytes(good)

    def bad_offsets(h):
        h["model.norm.weight"]["data_offsets"] = [0, 7]

    _rewrite_header(f, bad_offsets)
    with pytest.raises(CheckpointError, match="'model.norm.weight' does not match its shape"):
        CheckpointReader(d)


def test_sharded_index_errors(tmp_path, zoo):
    d = _copy_model(zoo["sharded"], tmp_path / "sh")
    shard = sorted(d.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing shard .*{shard.name}"):
        CheckpointReader(d)
    d2 = _copy_model(zoo["sharded"], tmp_path / "sh2")
    idx = json.loads((d2 / "model.safetensors.index.json").read_text())
    first = sorted(d2.glob("model-*.safetensors"))[0].name
    idx["weight_map"]["model.ghost.weight"] = first
    (d2 / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match=f"'model.ghost.weight' is listed in .* but missing from shard .*{first}"):
        CheckpointReader(d2)
    (d2 / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="has no 'weight_map'"):
        CheckpointReader(d2)


def test_unknown_tensor_name(zoo):
    r = CheckpointReader(zoo["llama"])
    assert not r.has("model.ghost")
    with pytest.raises(CheckpointError, match="has no tensor 'model.ghost'"):
        r.get("model.ghost")


# -- LoRA ---------------------------------------------------------------------------------
def _peft_merged(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    return model.merge_and_unload().state_dict()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"rank_pattern": {"v_proj": 3}, "alpha_pattern": {"up_proj": 8.0}},
        {"use_rslora": True, "r": 4},
    ],
    ids=["plain", "patterns", "rslora"],
)
def test_lora_reader_equals_peft_merge(tmp_path, zoo, kwargs):
    adapter = make_tiny_lora(zoo["llama"], tmp_path / "lora", **kwargs)
    r = open_checkpoint(adapter)
    assert isinstance(r, LoraReader)
    assert r.names == CheckpointReader(zoo["llama"]).names
    assert r.config == CheckpointReader(zoo["llama"]).config
    merged = _peft_merged(zoo["llama"], adapter)
    for name in r.names:
        assert torch.allclose(r.get(name), merged[name], atol=1e-6), name
    assert len(r.lora_modules) == 6  # q, v, up in 2 layers
    name = "model.layers.1.self_attn.v_proj.weight"
    a, b, scale = r.lora_factors(name)
    base = CheckpointReader(zoo["llama"]).get(name)
    assert torch.allclose(r.get(name), base + scale * b @ a, atol=1e-6)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    rank = kwargs.get("rank_pattern", {}).get("v_proj", cfg["r"])
    assert a.shape == (rank, 16)
    if kwargs.get("use_rslora"):
        assert scale == pytest.approx(cfg["lora_alpha"] / rank**0.5)
    assert r.lora_factors("model.layers.0.self_attn.k_proj.weight") is None
    assert r.lora_factors("model.layers.0.self_attn.q_proj") is not None  # module name too


@pytest.mark.parametrize("fifo", [True, False])
def test_lora_reader_gpt2_conv1d(tmp_path, zoo, fifo):
    adapter = make_tiny_lora(zoo["gpt2"], tmp_path / "g", target_modules=("c_attn", "c_proj", "c_fc"), fan_in_fan_out=True)
    if not fifo:  # PEFT transposes Conv1D deltas even when the config says false
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        cfg["fan_in_fan_out"] = False
        (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    r = open_checkpoint(adapter)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = _peft_merged(zoo["gpt2"], adapter)
    for name in r.names:
        assert torch.allclose(r.get(name), merged[name], atol=1e-6), name
    assert r.lora_transposed("transformer.h.0.attn.c_attn.weight")
    assert r.lora_transposed("transformer.h.0.attn.c_proj.weight")  # square: from the config


def test_lora_base_resolution(tmp_path, zoo, monkeypatch):
    import shutil

    base = _copy_model(zoo["llama"], tmp_path / "base")
    adapter = make_tiny_lora(base, tmp_path / "ad")
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = "../base"  # relative to the adapter directory
    cfg_path.write_text(json.dumps(cfg))
    r = open_checkpoint(adapter)
    assert r.base.path == base.resolve()
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3-8B"
    cfg_path.write_text(json.dumps(cfg))
    clear_reader_cache()
    with monkeypatch.context() as m:  # a Hub id: looked up in the (empty, offline) HF cache
        m.setenv("HF_HUB_OFFLINE", "1")
        m.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
        with pytest.raises(CheckpointError, match=r"base model: Hub model meta-llama/Llama-3-8B is not in the local HF cache"):
            open_checkpoint(adapter)
    r2 = open_checkpoint(adapter, base=base)  # explicit base wins
    assert r2.base.path == base.resolve()
    moved = shutil.copytree(base, tmp_path / "moved")
    assert LoraReader(adapter, base=moved).base.path == moved.resolve()
    with pytest.raises(CheckpointError, match="not a LoRA adapter"):
        open_checkpoint(base, base=base)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    clear_reader_cache()
    with pytest.raises(CheckpointError, match="pickled weights"):
        open_checkpoint(adapter, base=base)


def test_lora_adapter_for_other_base_is_rejected(tmp_path, zoo):
    big = make_tiny_llama(tmp_path / "big", hidden=32)
    adapter = make_tiny_lora(big, tmp_path / "ad")
    with pytest.raises(CheckpointError, match="adapter made for another base"):
        LoraReader(adapter, base=zoo["llama"])


def test_save_lora_adapter_round_trips_through_peft(tmp_path, zoo):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    src = open_checkpoint(make_tiny_lora(zoo["llama"], tmp_path / "src", r=2, alpha=4.0))
    factors = {}
    for name in src.lora_modules:
        a, b, _ = src.lora_factors(name)
        factors[name.removesuffix(".weight")] = (a * 0.5, b)
    # one module with a different rank exercises rank_pattern
    extra = "model.layers.1.self_attn.k_proj"
    g = torch.Generator().manual_seed(0)
    factors[extra] = (torch.randn(3, 16, generator=g), torch.randn(8, 3, generator=g))
    out = save_lora_adapter(
        tmp_path / "saved", factors, r=2, alpha=4.0, target_modules=None, base_model_path=zoo["llama"],
    )
    saved = open_checkpoint(out)
    assert set(saved.lora_modules) == {f"{m}.weight" for m in factors}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["llama"]), out)
    merged = model.merge_and_unload().state_dict()
    base = CheckpointReader(zoo["llama"])
    for name in saved.names:
        assert torch.allclose(saved.get(name), merged[name], atol=1e-6), name
    a, b, scale = saved.lora_factors(extra)
    assert a.shape == (3, 16) and scale == pytest.approx(4.0 / 3)
    q = "model.layers.0.self_attn.q_proj.weight"
    a0, b0, s0 = src.lora_factors(q)
    assert torch.allclose(saved.get(q), base.get(q) + s0 * b0 @ (a0 * 0.5), atol=1e-6)
    with pytest.raises(CheckpointError, match="already exists"):
        save_lora_adapter(out, factors, 2, 4.0, None, zoo["llama"])
    with pytest.raises(ValueError, match="not covered by target_modules"):
        save_lora_adapter(tmp_path / "x", factors, 2, 4.0, ["q_proj"], zoo["llama"])
    # short target names: PEFT adapts every matching module (zero delta where no factors)
    short = save_lora_adapter(tmp_path / "short", {extra: factors[extra]}, 3, 3.0, ["k_proj"], zoo["llama"])
    with warnings.catch_warnings():  # PEFT warns about the modules left at zero
        warnings.simplefilter("ignore")
        merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(zoo["llama"]), short).merge_and_unload().state_dict()
    k0 = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(merged[k0], base.get(k0))
    assert torch.allclose(open_checkpoint(short).get(f"{extra}.weight"), merged[f"{extra}.weight"], atol=1e-6)


# -- compatibility ------------------------------------------------------------------------
def test_compatible_sources_report(zoo):
    rep = check_compatible({"a": open_checkpoint(zoo["llama"]), "b": open_checkpoint(zoo["llama_b"]), "c": open_checkpoint(zoo["sharded"])})
    assert rep.reference == "a" and rep.models == ["a", "b", "c"]
    assert rep.common_names == CheckpointReader(zoo["llama"]).names
    assert rep.layout.num_layers == 2 and rep.vocab_size == 40 and rep.tokenizer_hash


def test_incompatible_sources(tmp_path, zoo):
    a = open_checkpoint(zoo["llama"])
    with pytest.raises(IncompatibleModelsError, match="different architectures: model 'g' has model_type='gpt2'"):
        check_compatible({"a": a, "g": open_checkpoint(zoo["gpt2"])})
    deep = open_checkpoint(make_tiny_llama(tmp_path / "deep", layers=3))
    with pytest.raises(IncompatibleModelsError, match=r"model 'deep' has tensor\(s\) 'model.layers.2."):
        check_compatible({"a": a, "deep": deep})
    with pytest.raises(IncompatibleModelsError, match=r"model 'a' lacks tensor\(s\) 'model.layers.2."):
        check_compatible({"deep": deep, "a": a})
    check_compatible({"a": a, "deep": deep}, same_layer_count=False)
    wide = open_checkpoint(make_tiny_llama(tmp_path / "wide", hidden=32))
    with pytest.raises(IncompatibleModelsError, match=r"shape mismatch for tensor '.*': model 'wide' has \[.*\], model 'a' has"):
        check_compatible({"a": a, "wide": wide})
    untied = open_checkpoint(zoo["untied"])
    with pytest.raises(IncompatibleModelsError, match="model 'u' has tensor\\(s\\) 'lm_head.weight'"):
        check_compatible({"a": a, "u": untied})


def test_vocab_size_mismatch_is_explicit(tmp_path, zoo):
    big = open_checkpoint(make_tiny_llama(tmp_path / "v48", vocab=48))
    with pytest.raises(IncompatibleModelsError, match="vocab size mismatch: model 'big' has vocab_size 48, model 'a' has 40"):
        check_compatible({"a": open_checkpoint(zoo["llama"]), "big": big})


def test_tokenizer_checks(tmp_path, zoo):
    a = open_checkpoint(zoo["llama"])
    other = open_checkpoint(make_tiny_llama(tmp_path / "salt", tokenizer_salt=5))
    with pytest.raises(IncompatibleModelsError, match="different tokenizers: token '0' has id 4 in model 'a' but id"):
        check_compatible({"a": a, "o": other})
    check_compatible({"a": a, "o": other}, require_same_tokenizer=False)
    bare = open_checkpoint(make_tiny_llama(tmp_path / "bare", tokenizer=False))
    # a source without tokenizer files merges (as in mergekit) with a warning naming it
    with pytest.warns(UserWarning, match=r"model\(s\) 'bare' have no tokenizer files: merged assuming their token ids match 'a'"):
        check_compatible({"a": a, "bare": bare})
    check_compatible({"a": a, "bare": bare}, require_same_tokenizer=False)
    bare2 = open_checkpoint(make_tiny_llama(tmp_path / "bare2", seed=1, tokenizer=False))
    with pytest.raises(IncompatibleModelsError, match="no source model has tokenizer files .*add tokenizer files to one source"):
        check_compatible({"bare": bare, "bare2": bare2})
    # LoRA readers use their base's tokenizer
    lora = open_checkpoint(make_tiny_lora(zoo["llama"], tmp_path / "lora"))
    assert check_compatible({"a": a, "l": lora}).common_names == a.names


# -- writer -------------------------------------------------------------------------------
def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1.5 kb") == 1500
    assert parse_size("64KiB") == 65536
    assert parse_size(123) == 123
    for bad in ("2 parsecs", "", "-1GB", 0):
        with pytest.raises(ConfigError, match="shard_size"):
            parse_size(bad)


def test_write_sharded_checkpoint_loads_in_transformers(tmp_path, zoo):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = CheckpointReader(zoo["llama"])
    out = write_checkpoint(
        tmp_path / "out", src.iter_tensors(), src.config, tokenizer_dir=src.tokenizer_dir,
        shard_size="3KB", recipe={"merge_method": "linear", "weights": [0.5, 0.5]},
        card={"name": "tiny-merge", "sources": {"a": "x/a", "b": "x/b"}, "scores": {"math": 0.75}},
    )
    files = sorted(p.name for p in out.iterdir())
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 1 and all(f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    assert not [f for f in files if f.startswith(".")]
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(idx["weight_map"]) == set(src.names)
    assert idx["metadata"]["total_size"] == src.nbytes
    back = CheckpointReader(out)
    for name in src.names:
        assert torch.equal(back.get(name), src.get(name))
    assert yaml.safe_load((out / "evomerge_recipe.yaml").read_text()) == {"merge_method": "linear", "weights": [0.5, 0.5]}
    card = (out / "README.md").read_text()
    assert card.startswith("---\n") and "# tiny-merge" in card and "| math | search | 0.75 |" in card
    assert "`linear`" in card and "x/b" in card
    model = AutoModelForCausalLM.from_pretrained(out)
    sd = model.state_dict()
    assert torch.equal(sd["model.layers.1.mlp.down_proj.weight"], src.get("model.layers.1.mlp.down_proj.weight"))
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("ab")["input_ids"] == AutoTokenizer.from_pretrained(zoo["llama"])("ab")["input_ids"]


def test_write_single_file_with_dtype(tmp_path, zoo):
    src = CheckpointReader(zoo["llama"])
    out = write_checkpoint(tmp_path / "bf", src.iter_tensors(), src.config, dtype="bfloat16")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    back = CheckpointReader(out)
    assert back.dtype("model.norm.weight") == torch.bfloat16
    assert back.config["dtype"] == "bfloat16"
    # shared storage (tied tensors passed twice) is written as two tensors
    emb = src.get("model.embed_tokens.weight")
    out2 = write_checkpoint(tmp_path / "tied", [("a", emb), ("b", emb), ("c", emb[:3])], {})
    r2 = CheckpointReader(out2)
    assert torch.equal(r2.get("b"), emb) and r2.shape("c") == (3, 16)


def test_write_is_atomic_on_exception(tmp_path, zoo):
    src = CheckpointReader(zoo["llama"])

    def crashing():
        for i, (n, t) in enumerate(src.iter_tensors()):
            if i == 5:
                raise RuntimeError("boom")
            yield n, t

    with pytest.raises(RuntimeError, match="boom"):
        write_checkpoint(tmp_path / "out", crashing(), src.config, shard_size="1KB")
    assert list(tmp_path.iterdir()) == []
    # an existing checkpoint is neither clobbered nor half-replaced
    out = write_checkpoint(tmp_path / "out", src.iter_tensors(), src.config)
    with pytest.raises(CheckpointError, match="already exists and is not empty"):
        write_checkpoint(tmp_path / "out", src.iter_tensors(), src.config)
    with pytest.raises(RuntimeError, match="boom"):
        write_checkpoint(tmp_path / "out", crashing(), src.config, overwrite=True)
    assert torch.equal(CheckpointReader(out).get("model.norm.weight"), src.get("model.norm.weight"))
    other = CheckpointReader(zoo["llama_b"])
    write_checkpoint(tmp_path / "out", other.iter_tensors(), other.config, overwrite=True)
    clear_reader_cache()
    assert torch.equal(CheckpointReader(out).get("model.norm.weight"), other.get("model.norm.weight"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.slow
def test_write_is_atomic_on_hard_crash(tmp_path, zoo):
    """A process killed mid-write (no cleanup runs) leaves no directory at out_dir."""
    script = textwrap.dedent(
        f"""
        import os
        from evomerge.checkpoint import CheckpointReader, write_checkpoint
        src = CheckpointReader({str(zoo["llama"])!r})
        def stream():
            for i, item in enumerate(src.iter_tensors()):
                if i == 8:
                    os._exit(9)
                yield item
        write_checkpoint({str(tmp_path / "out")!r}, stream(), src.config, shard_size="1KB")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == 9, proc.stderr.decode()
    assert not (tmp_path / "out").exists()
    partial = [p.name for p in tmp_path.iterdir()]
    assert len(partial) == 1 and partial[0].startswith(".out.partial-")
    with pytest.raises(CheckpointError):
        CheckpointReader(tmp_path / "out")


def test_writer_rejects_bad_tokenizer_dir(tmp_path, zoo):
    src = CheckpointReader(zoo["llama"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="holds no tokenizer files"):
        write_checkpoint(tmp_path / "o", src.iter_tensors(), src.config, tokenizer_dir=empty)
    assert not (tmp_path / "o").exists()


def test_atomic_output_dir_keeps_a_concurrent_finished_build(tmp_path):
    """keep_existing True drops the new folder (no partial left); False or None replaces."""
    from evomerge.checkpoint.writer import atomic_output_dir

    out = tmp_path / "build"
    with atomic_output_dir(out) as tmp:
        (tmp / "who").write_text("first")
    with atomic_output_dir(out, overwrite=True, keep_existing=lambda: (out / "who").is_file()) as tmp:
        (tmp / "who").write_text("second")
    assert (out / "who").read_text() == "first"
    with atomic_output_dir(out, overwrite=True, keep_existing=lambda: False) as tmp:
        (tmp / "who").write_text("third")
    assert (out / "who").read_text() == "third"
    with pytest.raises(RuntimeError), atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "who").write_text("fourth")
        raise RuntimeError("build failed")
    assert (out / "who").read_text() == "third"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["build"]
