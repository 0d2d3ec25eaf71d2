"""Where zoo builds live and how a finished build gets there.

Every zoo build (the toy zoo, its LoRA pool, the SmolLM2 base, pool and experts) is a
folder under :func:`default_root`, keyed by a config hash, written into a temporary
sibling and renamed into place only when complete (:func:`staged_build`, one
implementation: :func:`evomerge.checkpoint.writer.atomic_output_dir`).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from ..errors import EvomergeError

T = TypeVar("T", bound=Any)

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: training steps done so far out of all the build's steps."""

STALE_PARTIAL_S = 6 * 3600
"""A ``.partial`` folder older than this belongs to a build that is not running any more."""


class ZooError(EvomergeError):
    """The zoo cannot be built or loaded (unknown variant, missing or incomplete build)."""


def default_root() -> Path:
    """``$EVOMERGE_HOME/zoo``, else ``~/.cache/evomerge/zoo``."""
    home = os.environ.get("EVOMERGE_HOME")
    if home:
        return Path(home).expanduser() / "zoo"
    return Path.home() / ".cache" / "evomerge" / "zoo"


def root_of(root: str | os.PathLike | None) -> Path:
    """Where builds live: ``root`` (``~`` expanded), else :func:`default_root`."""
    return Path(root).expanduser() if root is not None else default_root()


def reuse(final: Path, read: Callable[[Path], T | None]) -> T | None:
    """The complete build in ``final`` (``read`` gives it, or None), marked ``cache_hit``."""
    cached = read(final)
    if cached is not None:
        cached.cache_hit = True
    return cached


def clear_stale_partials(base_root: Path, folder_name: str, max_age_s: float = STALE_PARTIAL_S) -> None:
    """Remove ``.partial`` leftovers of interrupted builds (old enough not to be running).

    Args:
        base_root: the folder holding the build.
        folder_name: the build's folder name (its partials are ``.<name>.partial-*``).
        max_age_s: leftovers younger than this may belong to a running build and stay.
    """
    now = time.time()
    for p in base_root.glob(f".{folder_name}.partial-*"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


@contextmanager
def staged_build(final: Path, keep_existing: Callable[[], bool] | None = None) -> Iterator[Path]:
    """A temporary folder next to ``final`` that replaces it when the block succeeds.

    Stale partials of ``final`` are cleared first; on any exception the temporary folder
    is removed and ``final`` is left as it was.

    Args:
        final: the build's folder.
        keep_existing: asked when the block succeeded; True (a concurrent build of the same
            config finished first: same bytes) keeps theirs and drops ours.

    Raises:
        CheckpointError: the folder holding ``final`` cannot be created or written.
    """
    from ..checkpoint.writer import atomic_output_dir

    clear_stale_partials(final.parent, final.name)
    with atomic_output_dir(final, overwrite=True, keep_existing=keep_existing) as tmp:
        yield tmp
