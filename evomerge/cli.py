"""The `evomerge` command: one thin click command per verb; the work lives in the package.

Every error a user can cause (:class:`evomerge.errors.EvomergeError`) is printed as one
line, ``error: ...``, with a non-zero exit code.
"""

from __future__ import annotations

import sys

import click

from .errors import EvomergeError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):  # one-line errors for everything users can cause
        try:
            _wire()
            return super().invoke(ctx)
        except EvomergeError as err:
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except click.UsageError as err:  # a bad option value: one line too, like config values
            if err.ctx is None or not err.ctx.parent:
                raise
            click.echo(f"error: {err.format_message()}", err=True)
            sys.exit(err.exit_code)


@click.group(cls=_Group)
@click.version_option(package_name="evomerge")
def main() -> None:
    """Evolve model merges: search merge recipes with evolution strategies."""


def _wire() -> None:
    # Plug-ins lower layers look up: zoo: model references (checkpoint cannot import the zoo).
    # Wired when a command runs, not at import, so `evomerge --help` stays torch-free.
    from .zoo.refs import register_zoo_refs

    register_zoo_refs()


def _register() -> None:
    # Each area keeps its own commands next to its code; this is the one list of them.
    from .commands import COMMANDS

    for cmd in COMMANDS:
        main.add_command(cmd)


_register()

if __name__ == "__main__":
    main()
