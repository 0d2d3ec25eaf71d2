"""Ask/tell optimizers with exact, explicit state."""

from .base import (
    FAILED_FITNESS,
    Candidate,
    Optimizer,
    Result,
    list_optimizers,
    make_optimizer,
    register_optimizer,
)

__all__ = [
    "FAILED_FITNESS", "Candidate", "Optimizer", "Result", "list_optimizers",
    "make_optimizer", "register_optimizer",
]
