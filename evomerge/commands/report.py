"""`evomerge report RUN`: a self-contained HTML report of a run directory."""

from __future__ import annotations

import click


@click.command()
@click.argument("run_dir", metavar="RUN")
@click.option("--out", "out", type=click.Path(dir_okay=False), default=None,
              help="Where to write the HTML (default: RUN/report.html).")
def report(run_dir: str, out: str | None) -> None:
    """Write RUN's HTML report (tables, curves, Pareto front, best recipe, metadata)."""
    from ..report.html import write_report

    path = write_report(run_dir, out)
    click.echo(str(path))


COMMANDS = [report]
