"""The one entry point for reading a checkpoint: :func:`open_checkpoint`, memoized.

It returns a :class:`~evomerge.checkpoint.reader.CheckpointReader`, or a
:class:`~evomerge.checkpoint.lora.LoraReader` for a PEFT adapter directory, and memoizes
readers per resolved path because a plan is compiled and materialized once per candidate,
thousands of times per run. Living here (above both readers) keeps ``reader`` and ``lora``
free of each other's imports: ``lora`` -> ``reader``, never back.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from .lora import LoraReader
from .reader import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    CheckpointReader,
    check_model_dir,
    files_stamp,
    is_lora_dir,
)

# Readers are cheap (headers only) but each holds its shards' memory maps open.
MAX_CACHED_READERS = 64
_CACHE: dict[tuple[str, str | None], tuple[tuple, Any]] = {}
_CACHE_LOCK = threading.Lock()


def open_checkpoint(path: str | os.PathLike, base: str | os.PathLike | None = None):
    """A reader for ``path``: a dense checkpoint, or base + LoRA adapter presented densely.

    Memoized per (resolved path, resolved base); a directory whose files changed since (new
    mtime or size of config/weights) is re-read.
    """
    p = check_model_dir(Path(path).expanduser().resolve())
    b = Path(base).expanduser().resolve() if base is not None else None
    key = (str(p), str(b) if b is not None else None)
    stamp = files_stamp(p) + (files_stamp(b) if b is not None else ())
    with _CACHE_LOCK:
        hit = _CACHE.get(key)
        if hit is not None and hit[0] == stamp:
            reader = hit[1]
            if not (reader.is_lora and not reader.base_is_current()):
                _CACHE[key] = _CACHE.pop(key)  # most recently used goes last
                return reader
    if is_lora_dir(p):
        reader = LoraReader(p, base=b)
    else:
        if b is not None:
            raise CheckpointError(f"{p} is not a LoRA adapter (no {ADAPTER_CONFIG}), so base= does not apply")
        if (p / ADAPTER_WEIGHTS).is_file():
            raise CheckpointError(f"{p} has {ADAPTER_WEIGHTS} but no {ADAPTER_CONFIG}")
        reader = CheckpointReader(p)
    with _CACHE_LOCK:
        _CACHE.pop(key, None)
        _CACHE[key] = (stamp, reader)
        while len(_CACHE) > MAX_CACHED_READERS:  # least recently used first
            _, evicted = _CACHE.pop(next(iter(_CACHE)))
            evicted.close()  # its holders still work: handles reopen on the next get
    return reader


def clear_reader_cache() -> None:
    """Forget every memoized reader (their shard handles close when unreferenced)."""
    with _CACHE_LOCK:
        for _, reader in _CACHE.values():
            reader.close()
        _CACHE.clear()
