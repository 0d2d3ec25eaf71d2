"""Imports the built-in search spaces so they register."""

from . import layer_swap, parameter  # noqa: F401
