"""One registry class for every kind of plug-in: operators, optimizers, spaces, backends.

Each package face keeps one :class:`Registry` and an explicit list of its built-ins (its
``builtin.py``), imported on the first lookup: importing a registry registers nothing by
itself (mergekit's style, no import side effects), and a user's own plug-in registers with
the same decorator the built-ins use.

    SPACES = Registry("search space", "space.type: ", ConfigError, builtins="evomerge.spaces.builtin")

    @SPACES.register("parameter")
    class ParameterSpace: ...

    SPACES.get("parameter")       # the class; an unknown name raises one clear line
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Names users write in YAML -> the registered implementations of one kind.

    Args:
        kind: what is registered, for messages ("merge operator", "optimizer", ...).
        field: the config field named at the start of an unknown-name error
            ("space.type: "), or "".
        error: the exception type raised for an unknown name (a one-line user error).
        builtins: the dotted module whose import registers the built-ins (loaded on the
            first lookup, not when the registry is created).
        hint: text appended to the unknown-name error (e.g. other accepted spellings).
    """

    def __init__(self, kind: str, field: str, error: type[Exception], builtins: str,
                 hint: str = ""):
        self.kind, self.field, self.error, self.hint = kind, field, error, hint
        self._builtins = builtins
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering its argument under ``name``.

        Raises:
            ValueError: ``name`` is registered already (a programming error).
        """

        def deco(obj: T) -> T:
            self.add(name, obj)
            return obj

        return deco

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name`` (ValueError if the name is taken)."""
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._items[name] = obj

    def get(self, name: str) -> T:
        """The implementation registered as ``name``.

        Raises:
            the registry's ``error`` type: unknown name, with the known names listed.
        """
        self.load_builtins()
        try:
            return self._items[name]
        except KeyError:
            raise self.error(
                f"{self.field}unknown {self.kind} {name!r}; known: {', '.join(self.names())}{self.hint}"
            ) from None

    def find(self, name: str) -> T | None:
        """The implementation registered as ``name``, or None."""
        self.load_builtins()
        return self._items.get(name)

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        self.load_builtins()
        return sorted(self._items)

    def load_builtins(self) -> None:
        """Import the explicit list of built-ins (once; Python caches the import)."""
        importlib.import_module(self._builtins)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
