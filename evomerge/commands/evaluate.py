"""`evomerge eval TARGET` and `evomerge select RUN`: scores with standard errors, per split."""

from __future__ import annotations

import json

import click

from ..fitness.tasks import SPLITS


@click.command(name="eval")
@click.argument("target")
@click.option("--tasks", "tasks", multiple=True,
              help="Task YAML (repeat, or comma-separated). Default for a run: the run's tasks.")
@click.option("--split", type=click.Choice(SPLITS), default="validation", show_default=True)
@click.option("--batch-size", type=int, default=None, help="Backend batch size (model/recipe targets).")
@click.option("--device", default=None, help="Backend device (model/recipe targets).")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON.")
def eval_cmd(target, tasks, split, batch_size, device, as_json):
    """Score TARGET on one split, with standard errors.

    TARGET: a model directory, a recipe YAML (evomerge or mergekit), or a run directory:
    RUN (its final model, else its best candidate), RUN:final, RUN:top-K, RUN:baselines.
    """
    from ..engine.evaltarget import eval_target
    from ..engine.selection import rows_table, wide_console

    names = [t for entry in tasks for t in entry.split(",") if t]
    backend = {k: v for k, v in (("batch_size", batch_size), ("device", device)) if v is not None}
    rows = eval_target(target, split=split, tasks=names or None, backend=backend or None)
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    wide_console().print(rows_table(rows, title=f"{target}: {split} split (%, ± standard error)",
                               splits=(split,), tasks=True))


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--top-k", type=int, default=None, help="Candidates re-scored (default: the run's).")
@click.option("--json", "as_json", is_flag=True, help="Print final.json.")
def select(run_dir, top_k, as_json):
    """Choose RUN_DIR's final model on its validation split (writes final.json)."""
    from ..engine.runner import print_final
    from ..engine.selection import select_final

    final = select_final(run_dir, top_k=top_k)
    if as_json:
        click.echo(json.dumps(final, indent=1))
        return
    print_final(run_dir)


COMMANDS = [eval_cmd, select]
