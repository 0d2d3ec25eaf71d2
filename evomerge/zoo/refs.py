"""``zoo:`` model references: ``zoo:<member>`` (the full zoo) or ``zoo:<variant>/<member>``.

The checkpoint layer resolves every model reference (:func:`evomerge.checkpoint.resolve.
resolve_ref`) but sits below the zoo, so the zoo's resolver is registered into it by the
layers that import both (the engine's model resolution and the CLI), by calling
:func:`register_zoo_refs`. Importing this module registers nothing.
"""

from __future__ import annotations

from ..checkpoint.resolve import register_ref_scheme
from ..errors import CheckpointError

ZOO_VARIANTS = ("full", "test")
PREFIX = "zoo:"


def resolve_zoo_ref(ref: str) -> str:
    """The directory of the zoo member ``ref`` names.

    Args:
        ref: ``zoo:<member>`` (full zoo) or ``zoo:<variant>/<member>``.

    Raises:
        CheckpointError: no member named, or the zoo is not built / has no such member
            (one line, starting with the reference).
    """
    from .build import ZooError, load_zoo

    rest = ref[len(PREFIX):]
    variant, _, member = rest.partition("/")
    if variant not in ZOO_VARIANTS or not member:
        variant, member = "full", rest
    if not member:
        raise CheckpointError(f"{ref!r}: name a zoo member, e.g. zoo:base or zoo:test/expert_a")
    try:
        return str(load_zoo(variant).member(member).path)
    except ZooError as err:
        raise CheckpointError(f"{ref}: {err}") from None


def register_zoo_refs() -> None:
    """Make ``zoo:`` references resolvable everywhere a model is named (idempotent)."""
    register_ref_scheme(PREFIX, resolve_zoo_ref)
