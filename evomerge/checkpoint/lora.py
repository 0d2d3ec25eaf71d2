"""PEFT LoRA adapters, read as dense models and written back in PEFT format.

:class:`LoraReader` presents "base + adapter" with the same API as
:class:`~evomerge.checkpoint.reader.CheckpointReader`, so every merge operator works on LoRA
experts unchanged: ``get(name)`` returns ``W_base + scale * B @ A`` for adapted weights
(PEFT's own merge formula) and the base tensor otherwise. Nothing dense is stored; the delta
is formed on demand, one tensor at a time.

:meth:`LoraReader.lora_factors` exposes the raw factors for methods that merge in factor
space (LoraHub, black-box Evo-Merging), and :func:`save_lora_adapter` writes merged factors
as an adapter that ``peft.PeftModel.from_pretrained`` loads.

Supported adapter features: ``r``, ``lora_alpha``, ``rank_pattern`` / ``alpha_pattern``
(matched like PEFT: the pattern must match the end of the module name at a ``.``
boundary), ``use_rslora`` (scale ``alpha / sqrt(r)``), ``fan_in_fan_out`` (and GPT-2
``Conv1D`` modules, which PEFT transposes whatever the config says), embedding LoRA
(``lora_embedding_A/B``), ``lora_bias`` and ``modules_to_save`` (full replacement
tensors). DoRA and layer replication change more than a weight delta and are refused.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ..errors import CheckpointError
from .layout import ModelLayout
from .reader import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    PICKLE_SUFFIXES,
    CheckpointReader,
    TensorInfo,
    check_model_dir,
    files_stamp,
    load_json,
    natural_key,
    read_safetensors_header,
    tokenizer_files_in,
)

PEFT_PREFIX = "base_model.model."
# Model families whose projections are transformers' Conv1D (weights stored [in, out]):
# PEFT forces fan_in_fan_out=True for them even when adapter_config.json says False.
CONV1D_MODEL_TYPES = frozenset({"gpt2", "decision_transformer", "imagegpt"})

_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
    r"(?:\.(?P<adapter>[^.]+))??(?:\.(?P<param>weight|bias))?$"
)


class LoraFactors(NamedTuple):
    """Raw PEFT factors of one adapted weight.

    ``A`` is ``[r, in]`` (``lora_A.weight``; ``[r, num_embeddings]`` for embeddings), ``B``
    is ``[out, r]``. The dense delta is ``scale * B @ A``, transposed when the base weight
    is stored ``[in, out]`` (Conv1D / ``fan_in_fan_out``) or is an embedding — see
    :meth:`LoraReader.lora_transposed`.
    """

    A: torch.Tensor
    B: torch.Tensor
    scale: float


class _Module:
    __slots__ = ("module", "weight", "a", "b", "bias", "embedding", "scale", "transpose", "rank")

    def __init__(self, module: str):
        self.module = module
        self.weight = f"{module}.weight"
        self.a: str | None = None
        self.b: str | None = None
        self.bias: str | None = None
        self.embedding = False
        self.scale = 1.0
        self.transpose = False
        self.rank = 0


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: first key matching the end of ``module``."""
    for key, value in patterns.items():
        try:
            hit = re.match(rf"(.*\.)?({key})$", module)
        except re.error as e:
            raise CheckpointError(f"adapter config: bad rank/alpha pattern {key!r}: {e}") from None
        if hit:
            return value
    return default


def resolve_base_path(adapter_dir: Path, value: str | None) -> Path:
    """``base_model_name_or_path`` as a local directory (relative: to the adapter dir), or a
    Hub id resolved through the local HF cache (:mod:`evomerge.checkpoint.resolve`)."""
    if not value:
        raise CheckpointError(
            f"LoRA adapter {adapter_dir} names no base model (base_model_name_or_path is empty): pass base="
        )
    p = Path(value).expanduser()
    candidates = [p] if p.is_absolute() else [adapter_dir / p, Path.cwd() / p]
    for c in candidates:
        if c.is_dir():
            return c.resolve()
    from .resolve import download_hub_model, parse_hub_id

    hub = parse_hub_id(value)
    if hub is not None:  # a Hub id, as PEFT writes it: through the HF cache (HF_HUB_OFFLINE...)
        try:
            return Path(download_hub_model(*hub)).resolve()
        except CheckpointError as e:
            raise CheckpointError(f"LoRA adapter {adapter_dir}: base model: {e}") from None
    raise CheckpointError(
        f"LoRA adapter {adapter_dir}: base model {value!r} is neither a local directory nor a "
        f"Hub id; pass the base checkpoint's local path as base="
    )


class LoraReader:
    """Base checkpoint + PEFT LoRA adapter, read as one dense model."""

    def __init__(self, path: str | os.PathLike, base: str | os.PathLike | CheckpointReader | None = None):
        self.path = check_model_dir(Path(path).expanduser().resolve())
        self.adapter_config: dict[str, Any] = load_json(self.path / ADAPTER_CONFIG, "adapter config")
        cfg = self.adapter_config
        if not isinstance(cfg, dict):
            raise CheckpointError(f"adapter config {self.path / ADAPTER_CONFIG} is not a JSON object")
        peft_type = str(cfg.get("peft_type", "LORA")).upper()
        if peft_type != "LORA":
            raise CheckpointError(f"adapter {self.path} is a {peft_type} adapter; only LoRA is supported")
        if cfg.get("use_dora"):
            raise CheckpointError(f"adapter {self.path} uses DoRA (use_dora: true), which evomerge does not read")
        if cfg.get("layer_replication"):
            raise CheckpointError(f"adapter {self.path} uses layer_replication, which evomerge does not read")

        if isinstance(base, CheckpointReader):
            self.base = base
        else:
            base_path = (
                check_model_dir(Path(base).expanduser().resolve())
                if base is not None
                else resolve_base_path(self.path, cfg.get("base_model_name_or_path"))
            )
            if (base_path / ADAPTER_CONFIG).is_file():
                raise CheckpointError(f"base model {base_path} of adapter {self.path} is itself an adapter")
            self.base = CheckpointReader(base_path)
        self._base_stamp = files_stamp(self.base.path)

        weights = self.path / ADAPTER_WEIGHTS
        if not weights.is_file():
            pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(
                    f"adapter {self.path} holds only pickled weights ({pickles[0]}); evomerge refuses "
                    f"pickles because loading them can run code: re-save it with safetensors "
                    f"(PeftModel.save_pretrained(dir, safe_serialization=True))"
                )
            raise CheckpointError(f"missing adapter weights {weights}")
        self._adapter_file = weights
        self._adapter_infos: dict[str, TensorInfo] = read_safetensors_header(weights)
        self._handle = None
        self._lock = threading.Lock()
        self._modules: dict[str, _Module] = {}  # keyed by dense weight name
        self._bias_of: dict[str, _Module] = {}  # dense bias name -> module with lora_bias
        self._replaced: dict[str, str] = {}  # dense name -> adapter key (modules_to_save)
        self._parse_keys()

    # -- parsing ------------------------------------------------------------------------
    def _parse_keys(self) -> None:
        cfg = self.adapter_config
        mods: dict[str, _Module] = {}
        for key in self._adapter_infos:
            name = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            if "lora_magnitude_vector" in name:
                raise CheckpointError(f"adapter {self.path} has DoRA tensors ({key}); DoRA is not supported")
            m = _KEY.match(name)
            if m is None:
                if not self.base.has(name):
                    raise CheckpointError(
                        f"adapter tensor {key!r} in {self._adapter_file} matches no tensor of the base model {self.base.path}"
                    )
                if tuple(self._adapter_infos[key].shape) != tuple(self.base.shape(name)):
                    raise CheckpointError(
                        f"adapter tensor {key!r} has shape {list(self._adapter_infos[key].shape)} "
                        f"but base tensor {name!r} has {list(self.base.shape(name))}"
                    )
                self._replaced[name] = key
                continue
            module, part, param = m.group("module"), m.group("part"), m.group("param")
            mod = mods.setdefault(module, _Module(module))
            if part.startswith("lora_embedding"):
                mod.embedding = True
            if param == "bias":
                if part != "lora_B":
                    raise CheckpointError(f"unexpected LoRA bias tensor {key!r} in {self._adapter_file}")
                mod.bias = key
            elif part.endswith("A"):
                mod.a = key
            else:
                mod.b = key

        use_rslora = bool(cfg.get("use_rslora", False))
        fifo = bool(cfg.get("fan_in_fan_out", False)) or (
            str(self.base.config.get("model_type", "")) in CONV1D_MODEL_TYPES
        )
        alpha0 = cfg.get("lora_alpha", cfg.get("r", 8))
        r0 = cfg.get("r")
        rank_pattern = cfg.get("rank_pattern") or {}
        alpha_pattern = cfg.get("alpha_pattern") or {}
        for module, mod in mods.items():
            if mod.a is None or mod.b is None:
                raise CheckpointError(
                    f"adapter {self._adapter_file} has only one LoRA factor for module {module!r}"
                )
            if not self.base.has(mod.weight):
                raise CheckpointError(
                    f"adapter {self._adapter_file} adapts module {module!r} but the base model "
                    f"{self.base.path} has no tensor {mod.weight!r}"
                )
            a_shape = self._adapter_infos[mod.a].shape
            b_shape = self._adapter_infos[mod.b].shape
            if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
                raise CheckpointError(
                    f"adapter {self._adapter_file}: LoRA factors of {module!r} have incompatible "
                    f"shapes A {list(a_shape)} and B {list(b_shape)}"
                )
            rank = int(a_shape[0])
            want_r = pattern_value(rank_pattern, module, r0)
            if want_r is not None and int(want_r) != rank:
                raise CheckpointError(
                    f"adapter {self.path}: module {module!r} has rank {rank} in its weights but "
                    f"{want_r} in adapter_config.json"
                )
            alpha = float(pattern_value(alpha_pattern, module, alpha0))
            mod.rank = rank
            mod.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank
            w_shape = tuple(self.base.shape(mod.weight))
            straight = (int(b_shape[0]), int(a_shape[1]))
            if mod.embedding:
                mod.transpose = True
            elif w_shape == straight and w_shape == straight[::-1]:  # square: trust the config
                mod.transpose = fifo
            else:
                mod.transpose = w_shape != straight
            want = straight[::-1] if mod.transpose else straight
            if w_shape != want:
                raise CheckpointError(
                    f"adapter {self.path}: LoRA delta of {module!r} has shape {list(want)} but the "
                    f"base tensor {mod.weight!r} has {list(w_shape)} (adapter made for another base?)"
                )
            self._modules[mod.weight] = mod
            if mod.bias is not None:
                bias_name = f"{module}.bias"
                if not self.base.has(bias_name):
                    raise CheckpointError(
                        f"adapter {self.path} has a LoRA bias for {module!r} but the base has no {bias_name!r}"
                    )
                self._bias_of[bias_name] = mod
        if not self._modules and not self._replaced:
            raise CheckpointError(f"adapter {self._adapter_file} holds no LoRA tensors")

    # -- reader API ---------------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        return self.base.config

    @property
    def names(self) -> list[str]:
        return self.base.names

    @property
    def layout(self) -> ModelLayout:
        return self.base.layout

    @property
    def is_lora(self) -> bool:
        return True

    def has(self, name: str) -> bool:
        return self.base.has(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def dtype(self, name: str) -> torch.dtype:
        return self.base.dtype(name)

    def info(self, name: str) -> TensorInfo:
        return self.base.info(name)

    @property
    def nbytes(self) -> int:
        return self.base.nbytes

    @property
    def num_parameters(self) -> int:
        return self.base.num_parameters

    @property
    def tokenizer_files(self) -> list[Path]:
        """The adapter's own tokenizer when it ships one, else the base's."""
        return tokenizer_files_in(self.path) or self.base.tokenizer_files

    @property
    def tokenizer_dir(self) -> Path | None:
        files = self.tokenizer_files
        return files[0].parent if files else None

    @property
    def lora_modules(self) -> list[str]:
        """Dense weight names that carry a LoRA delta, in natural order."""
        return sorted(self._modules, key=natural_key)

    def base_is_current(self) -> bool:
        return files_stamp(self.base.path) == self._base_stamp

    def _raw(self, key: str) -> torch.Tensor:
        if self._handle is None:
            from safetensors import safe_open

            with self._lock:
                if self._handle is None:
                    try:
                        self._handle = safe_open(str(self._adapter_file), framework="pt", device="cpu")
                    except Exception as e:
                        raise CheckpointError(f"cannot open adapter weights {self._adapter_file}: {e}") from None
        return self._handle.get_tensor(key)

    def _module(self, name: str) -> _Module | None:
        mod = self._modules.get(name)
        if mod is None and not name.endswith(".weight"):
            mod = self._modules.get(f"{name}.weight")
        return mod

    def lora_factors(self, name: str) -> LoraFactors | None:
        """Raw ``(A, B, scale)`` of dense weight ``name`` (or its module name); None if not adapted."""
        mod = self._module(name)
        if mod is None:
            return None
        return LoraFactors(self._raw(mod.a), self._raw(mod.b), mod.scale)

    def lora_transposed(self, name: str) -> bool:
        """True when the dense delta of ``name`` is ``(scale * B @ A).T`` (Conv1D, embeddings)."""
        mod = self._module(name)
        if mod is None:
            raise KeyError(name)
        return mod.transpose

    def lora_delta(self, name: str, device: Any = None) -> torch.Tensor | None:
        """The dense float32 delta ``W - W_base`` of an adapted weight, None otherwise."""
        mod = self._module(name)
        if mod is None:
            return None
        a = self._raw(mod.a).to(device=device, dtype=torch.float32)
        b = self._raw(mod.b).to(device=device, dtype=torch.float32)
        delta = b @ a
        if mod.transpose:
            delta = delta.T
        return delta.mul_(mod.scale)

    def get(self, name: str, device: Any = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense tensor ``name``: base + LoRA delta, an adapter replacement, or the base's."""
        out_dtype = dtype or self.base.dtype(name)
        if name in self._replaced:
            return self._raw(self._replaced[name]).to(device=device, dtype=out_dtype)
        mod = self._modules.get(name)
        bias_mod = self._bias_of.get(name)
        if mod is None and bias_mod is None:
            return self.base.get(name, device=device, dtype=dtype)
        w = self.base.get(name, device=device, dtype=torch.float32)
        if mod is not None:
            w = w + self.lora_delta(name, device=w.device)
        else:
            b_bias = self._raw(bias_mod.bias).to(device=w.device, dtype=torch.float32)
            w = w + bias_mod.scale * b_bias
        return w.to(dtype=out_dtype)

    def iter_tensors(self, names: Iterable[str] | None = None, device: Any = None, dtype: torch.dtype | None = None):
        for n in self.names if names is None else names:
            yield n, self.get(n, device=device, dtype=dtype)

    def close(self) -> None:
        with self._lock:
            self._handle = None
        self.base.close()

    def __repr__(self) -> str:
        return f"LoraReader({str(self.path)!r}, base={str(self.base.path)!r}, {len(self._modules)} adapted)"


def save_lora_adapter(
    out_dir: str | os.PathLike,
    factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    r: int,
    alpha: float,
    target_modules: Iterable[str] | str | None,
    base_model_path: str | os.PathLike | None,
    *,
    fan_in_fan_out: bool = False,
    use_rslora: bool = False,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Write ``{module: (A, B)}`` as a PEFT LoRA adapter directory; returns its path.

    ``module`` is the module name (``model.layers.0.self_attn.q_proj``; a trailing
    ``.weight`` is accepted). ``A`` is ``[rank, in]``, ``B`` ``[out, rank]``. Modules
    whose rank differs from ``r`` get a ``rank_pattern`` entry, so mixed ranks load too.
    ``target_modules`` defaults to the full module names (PEFT then adapts exactly these);
    short names like ``q_proj`` adapt every matching module, the ones without factors with
    zero deltas. The directory is written atomically (see
    :func:`evomerge.checkpoint.writer.atomic_output_dir`).
    """
    from safetensors.torch import save_file

    from .writer import atomic_output_dir

    if not factors:
        raise ValueError("save_lora_adapter needs at least one module's factors")
    tensors: dict[str, torch.Tensor] = {}
    rank_pattern: dict[str, int] = {}
    modules: list[str] = []
    for module, (a, b) in factors.items():
        module = module[: -len(".weight")] if module.endswith(".weight") else module
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(
                f"LoRA factors of {module!r} have incompatible shapes A {list(a.shape)} and B {list(b.shape)}"
            )
        rank = int(a.shape[0])
        if rank != int(r):
            rank_pattern[re.escape(module)] = rank
        modules.append(module)
        for part, t in (("lora_A", a), ("lora_B", b)):
            t = t.detach().to("cpu")
            if dtype is not None:
                t = t.to(dtype)
            tensors[f"{PEFT_PREFIX}{module}.{part}.weight"] = t.contiguous().clone()
    if target_modules is None:  # exactly the given modules: PEFT adds no zero adapters
        targets: list[str] | str = sorted(modules, key=natural_key)
    elif isinstance(target_modules, str):  # a regex, as PEFT reads it
        targets = target_modules
    else:
        targets = sorted(set(target_modules))
        for m in modules:
            if not any(m == t or m.endswith("." + t) for t in targets):
                raise ValueError(f"module {m!r} is not covered by target_modules {targets}")
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base_model_path) if base_model_path is not None else None,
        "r": int(r),
        "lora_alpha": float(alpha),
        "target_modules": targets,
        "rank_pattern": rank_pattern,
        "alpha_pattern": {},
        "lora_dropout": 0.0,
        "fan_in_fan_out": bool(fan_in_fan_out),
        "bias": "none",
        "use_rslora": bool(use_rslora),
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    with atomic_output_dir(out_dir, overwrite=overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return Path(out_dir)
