"""`evomerge zoo build | show`: the locally trained model zoo."""

from __future__ import annotations

import click


@click.group()
def zoo() -> None:
    """Build and inspect the model zoo (a tiny Llama base + experts, trained here)."""


@zoo.command("build")
@click.option("--variant", type=click.Choice(["full", "test"]), default="full", show_default=True)
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Zoo root folder (default: $EVOMERGE_HOME/zoo or ~/.cache/evomerge/zoo).")
@click.option("--force", is_flag=True, help="Rebuild even if a complete build of this spec exists.")
@click.option("--no-progress", is_flag=True)
def build(variant: str, out: str | None, force: bool, no_progress: bool) -> None:
    """Train the zoo VARIANT (cached by its config hash) and print where it is."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from ..zoo.build import build_zoo

    console = Console(stderr=True)
    if no_progress:
        manifest = build_zoo(variant, root=out, force=force)
    else:
        with Progress(
            TextColumn("[bold]zoo[/] {task.description}"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total} steps"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        ) as bar:
            task = bar.add_task(f"{variant}: training", total=None)

            def progress(stage: str, done: int, total: int) -> None:
                bar.update(task, completed=done, total=total, description=f"{variant}: {stage}")

            manifest = build_zoo(variant, root=out, force=force, progress=progress)
    _print_manifest(manifest)


@zoo.command("show")
@click.option("--variant", type=click.Choice(["full", "test"]), default="full", show_default=True)
@click.option("--out", "out", type=click.Path(file_okay=False), default=None, help="Zoo root folder.")
def show(variant: str, out: str | None) -> None:
    """Print the members and held-out accuracies of a built zoo."""
    from ..zoo.build import load_zoo

    _print_manifest(load_zoo(variant, root=out))


def _print_manifest(manifest) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    state = "cached" if manifest.cache_hit else f"built in {manifest.build_seconds:.1f} s"
    console.print(f"zoo [bold]{manifest.variant}[/] ({state}): {manifest.root}")
    members = [manifest.base, *manifest.experts, *manifest.lora]
    cols = [k for k in ("cipher_a", "cipher_b", "cipher_c", "combined", "cross") if k in manifest.base.metrics]
    table = Table("model", "kind", *cols)
    for m in members:
        table.add_row(m.name, m.kind, *(f"{m.metrics.get(c, float('nan')):.1f}" for c in cols))
    console.print(table)
    console.print(f"tasks: {manifest.tasks_dir}")


COMMANDS = [zoo]
