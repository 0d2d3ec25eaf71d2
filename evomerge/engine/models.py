"""Resolve the model references of a run config into local checkpoint directories.

``zoo:<member>`` names a member of the locally built full zoo (``zoo:base``,
``zoo:experts/<name>``, ``zoo:lora/<name>``); ``zoo:<variant>/<member>`` picks the variant
(``full`` or ``test``). Everything else must be an existing local directory: nothing is
ever downloaded.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import CheckpointError

ZOO_VARIANTS = ("full", "test")


def resolve_model(ref: str) -> str:
    if ref.startswith("zoo:"):
        from ..zoo import load_zoo

        rest = ref[4:]
        variant, _, member = rest.partition("/")
        if variant not in ZOO_VARIANTS:
            variant, member = "full", rest
        manifest = load_zoo(variant)
        if manifest is None:
            raise CheckpointError(
                f"model {ref!r}: the {variant} zoo is not built; run `evomerge zoo build --variant {variant}`"
            )
        return str(manifest.path_of(member))
    path = Path(ref).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"model directory not found: {ref}")
    return str(path.resolve())


def resolve_models(models: dict[str, str]) -> dict[str, str]:
    return {key: resolve_model(ref) for key, ref in models.items()}
