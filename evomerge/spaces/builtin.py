"""Imports the built-in search spaces so they register."""

from . import layer_swap, m2n2, parameter  # noqa: F401
