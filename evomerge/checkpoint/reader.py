"""Lazy, memory-mapped reading of Hugging Face checkpoints from local directories.

A merge touches every tensor of several models, often bigger together than RAM, so nothing
here loads a model: names, shapes and dtypes come from the safetensors headers (parsed and
checked by hand, a few KB per shard), and :meth:`CheckpointReader.get` returns one tensor
backed by the memory-mapped file (``safetensors.safe_open``, one handle per shard, opened
on first use). The OS pages weights in and out as the materializer streams through them.

Only safetensors are read. Pickled weights (``pytorch_model.bin``, ``*.pt``) can run code
when loaded, so they are refused with a message saying how to convert them.

:func:`evomerge.checkpoint.opener.open_checkpoint` is the entry point the rest of evomerge
uses: it returns a :class:`CheckpointReader` (from here), or a
:class:`~evomerge.checkpoint.lora.LoraReader` for a PEFT adapter directory.
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from .layout import ModelLayout, detect_layout

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# Files that make up a tokenizer in an HF directory (copied together by the writer).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "spiece.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "chat_template.jinja",
    "chat_template.json",
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# safetensors dtype codes -> (torch dtype, bytes per element)
DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 8),
    "F32": (torch.float32, 4),
    "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2),
    "I64": (torch.int64, 8),
    "I32": (torch.int32, 4),
    "I16": (torch.int16, 2),
    "I8": (torch.int8, 1),
    "U8": (torch.uint8, 1),
    "BOOL": (torch.bool, 1),
}
for _code, _attr, _size in (
    ("F8_E4M3", "float8_e4m3fn", 1),
    ("F8_E5M2", "float8_e5m2", 1),
    ("U16", "uint16", 2),
    ("U32", "uint32", 4),
    ("U64", "uint64", 8),
):
    if hasattr(torch, _attr):
        DTYPES[_code] = (getattr(torch, _attr), _size)

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit


class TensorInfo:
    """Where one tensor lives: shard file, dtype code, shape, byte range in the data area."""

    __slots__ = ("file", "dtype_code", "shape", "start", "end")

    def __init__(self, file: Path, dtype_code: str, shape: tuple[int, ...], start: int, end: int):
        self.file = file
        self.dtype_code = dtype_code
        self.shape = shape
        self.start = start
        self.end = end

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.dtype_code][0]

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and check one safetensors header without touching the tensor data.

    Raises CheckpointError naming the file for anything a truncated or corrupt file shows:
    a header length beyond the file, bad JSON, unknown dtypes, byte ranges that do not fit
    the shape or run past the end of the file.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"corrupt safetensors file {path}: shorter than its 8-byte header length ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"corrupt or truncated safetensors file {path}: header length {n} "
                    f"exceeds the file size {size}"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt safetensors file {path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"corrupt safetensors file {path}: header is not a JSON object")
    data_size = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            code = entry["dtype"]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"corrupt safetensors file {path}: bad header entry for tensor {name!r}") from None
        if code not in DTYPES:
            raise CheckpointError(f"unsupported dtype {code!r} for tensor {name!r} in {path}")
        info = TensorInfo(path, code, shape, start, end)
        if start < 0 or end < start or info.nbytes != info.numel * DTYPES[code][1]:
            raise CheckpointError(
                f"corrupt safetensors file {path}: byte range of tensor {name!r} does not match "
                f"its shape {list(shape)} and dtype {code}"
            )
        if end > data_size:
            raise CheckpointError(
                f"truncated safetensors file {path}: tensor {name!r} ends at byte {end} of the "
                f"data area but the file holds only {data_size} data bytes"
            )
        out[name] = info
    return out


def natural_key(name: str) -> tuple:
    """Sort key with numbers compared as numbers: layers.2 < layers.10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"missing {what} {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read {what} {path}: {e}") from None


def tokenizer_files_in(path: Path) -> list[Path]:
    """The tokenizer files present in directory ``path`` (see TOKENIZER_FILES)."""
    return [path / f for f in TOKENIZER_FILES if (path / f).is_file()]


def check_model_dir(path: Path) -> Path:
    """Existing directory, or a CheckpointError saying what is wrong."""
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is not a directory (give the model's directory)")
    return path


def _refuse_pickles(path: Path) -> None:
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{path} holds only pickled weights ({', '.join(pickles[:3])}); evomerge refuses "
            f"pickles because loading them can run code: convert to safetensors first, e.g. "
            f"AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out_dir)"
        )


class CheckpointReader:
    """One local HF checkpoint directory, read tensor by tensor.

    Tensors returned by :meth:`get` (without ``device``/``dtype`` changes) are views of the
    memory-mapped file shared by every caller: treat them as read-only and clone before
    writing into them.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = check_model_dir(Path(path).expanduser().resolve())
        # Weights first: a directory of pickles gets the "convert to safetensors" message
        # even when it lacks a config too.
        self._infos = self._read_index()
        self.config: dict[str, Any] = load_json(self.path / CONFIG_FILE, "config file")
        if not isinstance(self.config, dict):
            raise CheckpointError(f"config file {self.path / CONFIG_FILE} is not a JSON object")
        self.names: list[str] = sorted(self._infos, key=natural_key)
        self._handles: dict[Path, Any] = {}
        self._lock = threading.Lock()
        self._layout: ModelLayout | None = None

    # -- discovery ----------------------------------------------------------------------
    def _read_index(self) -> dict[str, TensorInfo]:
        index = self.path / INDEX_FILE
        single = self.path / SINGLE_FILE
        if index.is_file():
            return self._read_sharded(index)
        if single.is_file():
            infos = read_safetensors_header(single)
            if not infos:
                raise CheckpointError(f"safetensors file {single} holds no tensors")
            return infos
        _refuse_pickles(self.path)
        others = sorted(p.name for p in self.path.glob("*.safetensors"))
        hint = f" (found {', '.join(others[:3])})" if others else ""
        raise CheckpointError(
            f"no {SINGLE_FILE} or {INDEX_FILE} in {self.path}{hint}"
        )

    def _read_sharded(self, index: Path) -> dict[str, TensorInfo]:
        data = load_json(index, "shard index")
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"shard index {index} has no 'weight_map'")
        headers: dict[str, dict[str, TensorInfo]] = {}
        infos: dict[str, TensorInfo] = {}
        for name, shard in weight_map.items():
            if not isinstance(shard, str) or "/" in shard or "\\" in shard or shard.startswith("."):
                raise CheckpointError(f"shard index {index}: bad shard file name {shard!r} for tensor {name!r}")
            if shard not in headers:
                shard_path = self.path / shard
                if not shard_path.is_file():
                    raise CheckpointError(
                        f"missing shard {shard_path} (listed in {index.name} for tensor {name!r})"
                    )
                headers[shard] = read_safetensors_header(shard_path)
            info = headers[shard].get(name)
            if info is None:
                raise CheckpointError(
                    f"tensor {name!r} is listed in {index.name} but missing from shard {self.path / shard}"
                )
            infos[name] = info
        return infos

    # -- metadata -----------------------------------------------------------------------
    @property
    def layout(self) -> ModelLayout:
        if self._layout is None:
            self._layout = detect_layout(self.names, self.config)
        return self._layout

    def has(self, name: str) -> bool:
        return name in self._infos

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"model {self.path} has no tensor {name!r}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self.info(name).shape

    def dtype(self, name: str) -> torch.dtype:
        return self.info(name).dtype

    @property
    def nbytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())

    @property
    def num_parameters(self) -> int:
        return sum(i.numel for i in self._infos.values())

    @property
    def shard_files(self) -> list[Path]:
        return sorted({i.file for i in self._infos.values()})

    @property
    def tokenizer_files(self) -> list[Path]:
        return tokenizer_files_in(self.path)

    @property
    def tokenizer_dir(self) -> Path | None:
        """This directory when it holds a tokenizer, else None."""
        return self.path if self.tokenizer_files else None

    @property
    def is_lora(self) -> bool:
        return False

    # -- data ---------------------------------------------------------------------------
    def _handle(self, file: Path):
        h = self._handles.get(file)
        if h is None:
            from safetensors import safe_open

            with self._lock:
                h = self._handles.get(file)
                if h is None:
                    try:
                        h = safe_open(str(file), framework="pt", device="cpu")
                    except Exception as e:  # safetensors raises its own error types
                        raise CheckpointError(f"cannot open safetensors file {file}: {e}") from None
                    self._handles[file] = h
        return h

    def get(self, name: str, device: Any = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor ``name``, memory-mapped on CPU, moved/cast when asked."""
        info = self.info(name)
        try:
            t = self._handle(info.file).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {name!r} from {info.file}: {e}") from None
        if device is not None or dtype is not None:
            t = t.to(device=device, dtype=dtype)
        return t

    def iter_tensors(self, names: Iterable[str] | None = None, device: Any = None, dtype: torch.dtype | None = None):
        for n in self.names if names is None else names:
            yield n, self.get(n, device=device, dtype=dtype)

    def close(self) -> None:
        """Drop the shard handles (reopened lazily by the next :meth:`get`)."""
        with self._lock:
            self._handles.clear()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.path)!r}, {len(self.names)} tensors)"


def files_stamp(path: Path) -> tuple:
    """Cheap fingerprint of a directory's key files: a rebuilt checkpoint is re-read."""
    out = []
    for f in (CONFIG_FILE, INDEX_FILE, SINGLE_FILE, ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        try:
            st = (path / f).stat()
            out.append((f, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((f, None, None))
    return tuple(out)


def is_lora_dir(path: Path) -> bool:
    """Whether ``path`` holds a PEFT adapter (an ``adapter_config.json``)."""
    return (path / ADAPTER_CONFIG).is_file()
