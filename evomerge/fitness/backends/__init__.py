"""Fitness backends: hf (default), vllm, api."""

from .base import Backend, LocalBackend, make_backend, register_backend

__all__ = ["Backend", "LocalBackend", "make_backend", "register_backend"]
