"""Write merged models as ordinary Hugging Face directories.

:func:`write_checkpoint` streams ``(name, tensor)`` pairs into sharded safetensors, so a
merge of models bigger than RAM never holds more than one shard (``shard_size``) plus the
tensor being added. Next to the weights it writes ``config.json`` (the caller passes the
final config, e.g. with the new ``num_hidden_layers``), the tokenizer files copied from a
chosen source, the recipe (``evomerge_recipe.yaml``) and a generated model card
(``README.md``).

Everything is written into a hidden temporary directory next to ``out_dir`` and renamed
into place at the end (:func:`atomic_output_dir`): a crash, a full disk or an exception in
the middle leaves at most a ``.NAME.partial-*`` directory, never a partial checkpoint that
looks complete. Shard names (``model-00001-of-0000N``) need the shard count, unknown while
streaming, so shards get temporary names and are renamed once the stream ends.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from ..errors import CheckpointError, ConfigError
from .reader import CONFIG_FILE, INDEX_FILE, SINGLE_FILE, tokenizer_files_in

RECIPE_FILE = "evomerge_recipe.yaml"
MERGEKIT_FILE = "mergekit_config.yml"
CARD_FILE = "README.md"

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}

_DTYPE_NAMES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "fp64": torch.float64,
}


def parse_size(size: int | str) -> int:
    """Bytes from ``2GB`` / ``500MB`` / ``64KiB`` / ``1_000_000`` (decimal units, as HF)."""
    if isinstance(size, bool):
        raise ConfigError(f"shard_size: expected a size like '2GB', got {size!r}")
    if isinstance(size, int):
        n = size
    else:
        m = re.fullmatch(r"\s*([0-9][0-9_]*(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", str(size))
        if m is None or m.group(2).lower() not in _UNITS:
            raise ConfigError(f"shard_size: cannot parse {size!r}; use e.g. '500MB' or '2GB'")
        n = int(float(m.group(1).replace("_", "")) * _UNITS[m.group(2).lower()])
    if n <= 0:
        raise ConfigError(f"shard_size must be positive, got {size!r}")
    return n


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"bfloat16"``/``"bf16"``/``torch.bfloat16`` -> torch dtype (ConfigError when unknown)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPE_NAMES:
        raise ConfigError(f"dtype: unknown dtype {dtype!r}; use one of float32, float16, bfloat16")
    return _DTYPE_NAMES[key]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def make_output_parent(out: str | os.PathLike) -> Path:
    """Create the folder that will hold ``out``; one line when it cannot be (a regular file
    on the way, no permission, a read-only filesystem)."""
    parent = Path(out).expanduser().absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        blocked = next((p for p in [parent, *parent.parents] if p.exists() and not p.is_dir()), None)
        why = f"{blocked} is a file, not a folder" if blocked else (err.strerror or str(err))
        raise CheckpointError(f"cannot create output folder {parent}: {why}") from None
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"cannot write into {parent}: permission denied or read-only filesystem")
    return parent


@contextmanager
def atomic_output_dir(
    out_dir: str | os.PathLike,
    overwrite: bool = False,
    keep_existing: Callable[[], bool] | None = None,
) -> Iterator[Path]:
    """Yield a fresh temporary directory that becomes ``out_dir`` only if the block succeeds.

    The temporary directory sits next to ``out_dir`` (same filesystem, so the final rename
    is atomic) and is removed on any exception. An existing non-empty ``out_dir`` is an
    error unless ``overwrite``; then it is swapped out only after the new one is complete.

    Args:
        out_dir: the directory to create (or replace, with ``overwrite``).
        overwrite: replace an existing non-empty ``out_dir`` instead of refusing.
        keep_existing: asked once the block succeeded; when it returns True (another
            process finished the same build meanwhile), the new directory is discarded and
            the existing ``out_dir`` kept.

    Raises:
        CheckpointError: ``out_dir`` is a file, is non-empty without ``overwrite``, or its
            folder cannot be written.
    """
    out = Path(out_dir).expanduser().absolute()
    if out.exists():
        if not out.is_dir():
            raise CheckpointError(f"output path {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise CheckpointError(f"output directory {out} already exists and is not empty (choose another or overwrite)")
    make_output_parent(out)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as err:
        raise CheckpointError(f"cannot write into {out.parent}: {err.strerror or err}") from None
    try:
        os.chmod(tmp, 0o755)
        yield tmp
        if keep_existing is not None and keep_existing():
            shutil.rmtree(tmp, ignore_errors=True)
        elif out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class _ShardWriter:
    """Buffers tensors up to ``limit`` bytes, then writes them as one temporary shard."""

    def __init__(self, folder: Path, limit: int):
        self.folder = folder
        self.limit = limit
        self.buffer: dict[str, torch.Tensor] = {}
        self.buffer_bytes = 0
        self.storages: set[int] = set()
        self.shards: list[tuple[Path, list[str]]] = []
        self.seen: set[str] = set()
        self.total_bytes = 0
        self.total_params = 0

    def add(self, name: str, t: torch.Tensor, dtype: torch.dtype | None) -> None:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"tensor {name!r}: expected a torch.Tensor, got {type(t).__name__}")
        if name in self.seen:
            raise ValueError(f"tensor {name!r} written twice")
        self.seen.add(name)
        t = t.detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.to("cpu").contiguous()
        nb = t.numel() * t.element_size()
        # safetensors refuses tensors sharing storage, and a view would save its whole base.
        ptr = t.untyped_storage().data_ptr()
        if ptr in self.storages or t.untyped_storage().nbytes() != nb:
            t = t.clone()
            ptr = t.untyped_storage().data_ptr()
        if self.buffer and self.buffer_bytes + nb > self.limit:
            self.flush()
        self.buffer[name] = t
        self.storages.add(ptr)
        self.buffer_bytes += nb
        self.total_bytes += nb
        self.total_params += t.numel()

    def flush(self) -> None:
        if not self.buffer:
            return
        from safetensors.torch import save_file

        path = self.folder / f".shard-{len(self.shards) + 1:05d}.safetensors.part"
        save_file(self.buffer, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.buffer)))
        self.buffer = {}
        self.storages = set()
        self.buffer_bytes = 0

    def finish(self) -> dict[str, str]:
        """Rename temporary shards to their final names; returns the weight map."""
        self.flush()
        n = len(self.shards)
        if n == 0:
            raise CheckpointError("nothing to write: the merge produced no tensors")
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(self.shards, start=1):
            final = SINGLE_FILE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.rename(path, self.folder / final)
            for name in names:
                weight_map[name] = final
        if n > 1:
            index = {
                "metadata": {"total_size": self.total_bytes, "total_parameters": self.total_params},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return weight_map


def write_checkpoint(
    out_dir: str | os.PathLike,
    tensors: Iterable[tuple[str, torch.Tensor]],
    config: Mapping[str, Any],
    tokenizer_dir: str | os.PathLike | None = None,
    shard_size: int | str = "2GB",
    recipe: Mapping[str, Any] | None = None,
    card: Mapping[str, Any] | None = None,
    dtype: str | torch.dtype | None = None,
    *,
    overwrite: bool = False,
    extra_files: Iterable[str | os.PathLike] = (),
    mergekit_config: str | None = None,
    chat_template: str | None = None,
) -> Path:
    """Stream ``tensors`` into an HF checkpoint directory at ``out_dir``; returns its path.

    ``dtype`` casts floating tensors (and sets the config's dtype). ``extra_files`` are
    copied as they are (e.g. ``generation_config.json``). ``mergekit_config``: YAML text
    written as ``mergekit_config.yml`` (the card then carries the ``mergekit`` tag).
    ``chat_template``: template text that replaces the copied tokenizer's. Peak memory: one shard plus one
    tensor. The directory appears only when complete (see :func:`atomic_output_dir`).
    """
    limit = parse_size(shard_size)
    torch_dtype = parse_dtype(dtype)
    cfg = dict(config)
    if torch_dtype is not None:
        cfg["dtype"] = dtype_name(torch_dtype)
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = dtype_name(torch_dtype)
    tok_files: list[Path] = []
    if tokenizer_dir is not None:
        tdir = Path(tokenizer_dir)
        tok_files = tokenizer_files_in(tdir) if tdir.is_dir() else []
        if not tok_files:
            raise CheckpointError(f"tokenizer source {tdir} holds no tokenizer files")
    extras = [Path(p) for p in extra_files]
    for p in extras:
        if not p.is_file():
            raise CheckpointError(f"file to copy into the checkpoint does not exist: {p}")

    out = Path(out_dir)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        shards = _ShardWriter(tmp, limit)
        for name, t in tensors:
            shards.add(name, t, torch_dtype)
        shards.finish()
        (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        for f in tok_files:
            shutil.copy2(f, tmp / f.name)
        for f in extras:
            shutil.copy2(f, tmp / f.name)
        if chat_template is not None:
            from .chat_template import apply_chat_template

            apply_chat_template(tmp, chat_template)
        if recipe is not None:
            (tmp / RECIPE_FILE).write_text(
                yaml.safe_dump(plain_data(recipe), sort_keys=False), encoding="utf-8"
            )
        if mergekit_config is not None:
            (tmp / MERGEKIT_FILE).write_text(mergekit_config, encoding="utf-8")
        if card is not None:
            text = render_model_card(card, recipe, cfg, mergekit=mergekit_config is not None)
            (tmp / CARD_FILE).write_text(text, encoding="utf-8")
    return out


def render_model_card(card: Mapping[str, Any], recipe: Mapping[str, Any] | None,
                      config: Mapping[str, Any], *, mergekit: bool = False) -> str:
    """A Hugging Face model card (see :func:`evomerge.checkpoint.card.build_model_card`)."""
    from .card import build_model_card

    return build_model_card(card, recipe, config, mergekit=mergekit)


def plain_data(value: Any) -> Any:
    """numpy scalars/arrays, tuples and Paths -> plain YAML/JSON types."""
    if isinstance(value, Mapping):
        return {str(k): plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [plain_data(v) for v in value]
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, torch.dtype):
        return dtype_name(value)
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return plain_data(value.tolist())
    return value
