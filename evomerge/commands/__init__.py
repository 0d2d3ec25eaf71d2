"""CLI commands, one module per area. Add a command here to expose it as `evomerge <name>`."""

COMMANDS: list = []
