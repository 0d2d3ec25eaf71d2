"""Merge operators: one registry, each operator a small function on torch tensors."""

from .registry import OpContext, OpSpec, get_op, list_ops, register_op

__all__ = ["OpContext", "OpSpec", "get_op", "list_ops", "register_op"]
