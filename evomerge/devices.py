"""Device names users write (``--device``, ``backend.device``): parsed and checked in one line.

A name that torch cannot parse, a CUDA device on a machine without CUDA, or ``cuda:N``
beyond the GPUs present is a :class:`~evomerge.errors.ConfigError` naming the field, before
any model is loaded (torch's own errors are tracebacks or assertion failures).
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError


def check_device(name: str | None, field: str, *, present: bool = True) -> Any:
    """``torch.device`` for ``name`` (None stays None). With ``present``, the device must
    exist on this machine (a Ray cluster's workers may have devices the driver lacks)."""
    if name is None:
        return None
    import torch

    try:
        dev = torch.device(str(name))
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"{field} {name}: unknown device; use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"{field} {name}: evomerge computes on cpu or cuda")
    if not present:
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"{field} {name}: CUDA is not available on this machine (use cpu)")
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise ConfigError(f"{field} {name}: this machine has {count} CUDA device(s) "
                              f"(cuda:0..cuda:{count - 1})")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{field} {name}: MPS is not available on this machine")
    return dev
