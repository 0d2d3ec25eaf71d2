"""The model zoo: a tiny Llama base and its experts, trained here, deterministically.

``build_zoo(variant)`` / ``load_zoo(variant)`` (see :mod:`evomerge.zoo.build`); the skills
and fitness task files are in :mod:`evomerge.zoo.tasks`. Imports are lazy so that
``import evomerge.zoo`` stays cheap (no torch).
"""

from __future__ import annotations

__all__ = ["ZooError", "ZooManifest", "ZooMember", "build_zoo", "default_root", "load_zoo", "load_zoo_dir", "zoo_spec"]


def __getattr__(name: str):
    if name in __all__:
        from . import build

        return getattr(build, name)
    raise AttributeError(name)
