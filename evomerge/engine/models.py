"""Resolve the model references of a run config into local checkpoint directories.

``zoo:<member>`` names a member of the locally built full zoo (``zoo:base``,
``zoo:expert_a``, ``zoo:lora_b`` ...; `evomerge zoo build` lists them);
``zoo:<variant>/<member>`` picks the variant (``full`` or ``test``). Everything else must be
an existing local directory: nothing is ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError

ZOO_VARIANTS = ("full", "test")


def resolve_model(ref: str) -> str:
    if ref.startswith("zoo:"):
        from ..zoo.build import load_zoo

        rest = ref[4:]
        variant, _, member = rest.partition("/")
        if variant not in ZOO_VARIANTS or not member:
            variant, member = "full", rest
        return str(load_zoo(variant).member(member).path)
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"model directory not found: {ref}")
    return str(path.resolve())


def resolve_models(models: dict[str, str]) -> dict[str, str]:
    return {key: resolve_model(ref) for key, ref in models.items()}
