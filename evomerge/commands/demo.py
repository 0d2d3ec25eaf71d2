"""`evomerge demo`: build the zoo, evolve a merge of its experts, print the held-out table."""

from __future__ import annotations

import click


@click.command()
@click.option("--runs-dir", default="runs", show_default=True)
@click.option("--name", default="zoo-demo", show_default=True,
              help="Run name; an existing completed run of this name is reused.")
@click.option("--fresh", is_flag=True, help="Start a new run (timestamped name) instead of reusing.")
@click.option("--budget", type=int, default=None, help="Override the preset's evaluation budget.")
@click.option("--no-progress", is_flag=True)
def demo(runs_dir, name, fresh, budget, no_progress):
    """Build the local model zoo, evolve a merge of its experts, compare on held-out data."""
    from ..engine.demo import format_table, margins, run_demo
    from ..engine.selection import wide_console

    result = run_demo(runs_dir=runs_dir, name=name, fresh=fresh, budget=budget,
                      progress=not no_progress)
    con = wide_console()
    con.print(format_table(result))
    m = margins(result)
    s = result["seconds"]
    con.print(
        f"final (evolved, chosen on validation: {result['final']['label']}): held-out "
        f"{m['evolved']:.1f} ±{m['evolved_se']:.1f}  |  vs best expert {m['vs_best_expert']:+.1f}"
        f"  |  vs best untuned merge ({m['best_untuned']:.1f} ±{m['best_untuned_se']:.1f}) "
        f"{m['vs_best_untuned']:+.1f} points", highlight=False)
    con.print(
        f"search + selection: {result['budget']} evaluations in {s['search_and_selection']:.0f} s; zoo "
        f"{'cached' if result['zoo_cache_hit'] else 'built'} in {s['zoo']:.0f} s; total {s['total']:.0f} s",
        highlight=False)
    con.print(f"run directory: {result['run_dir']}\nexported final: {result['export']}", highlight=False)


COMMANDS = [demo]
