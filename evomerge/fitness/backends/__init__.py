"""Fitness backends: hf (default), vllm, api."""

from .base import Backend, make_backend, register_backend

__all__ = ["Backend", "make_backend", "register_backend"]
