"""CLI commands, one module per area. Add a command here to expose it as `evomerge <name>`."""

from .run import COMMANDS as _RUN_COMMANDS

COMMANDS: list = [*_RUN_COMMANDS]
