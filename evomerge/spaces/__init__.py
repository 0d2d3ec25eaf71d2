"""Search spaces: genome (unit box) -> recipe -> MergePlan."""

from .base import SearchSpace, make_space, register_space

__all__ = ["SearchSpace", "make_space", "register_space"]
