"""`evomerge demo`: build the zoo, evolve a merge of its experts, print the held-out table."""

from __future__ import annotations

import click


@click.command()
@click.option("--runs-dir", default="runs", show_default=True)
@click.option("--name", default="zoo-demo", show_default=True,
              help="Run name; an existing completed run of this name is reused.")
@click.option("--fresh", is_flag=True, help="Start a new run (timestamped name) instead of reusing.")
@click.option("--budget", type=click.IntRange(min=1), default=None,
              help="Override the preset's evaluation budget.")
@click.option("--no-progress", is_flag=True)
def demo(runs_dir, name, fresh, budget, no_progress):
    """Build the local model zoo, evolve a merge of its experts, compare on held-out data."""
    from rich.console import Console

    from ..engine.demo import format_table, margins, run_demo

    result = run_demo(runs_dir=runs_dir, name=name, fresh=fresh, budget=budget,
                      progress=not no_progress)
    con = Console()
    con.print(format_table(result))
    m = margins(result)
    s = result["seconds"]
    con.print(
        f"evolved merge: {m['evolved']:.1f}  |  vs best expert {m['vs_best_expert']:+.1f} points"
        f"  |  vs best untuned merge {m['vs_best_untuned']:+.1f} points"
    )
    con.print(
        f"search: {result['budget']} evaluations in {s['search']:.0f} s; zoo "
        f"{'cached' if result['zoo_cache_hit'] else 'built'} in {s['zoo']:.0f} s; total {s['total']:.0f} s"
    )
    con.print(f"run directory: {result['run_dir']}\nexported best: {result['export']}")


COMMANDS = [demo]
