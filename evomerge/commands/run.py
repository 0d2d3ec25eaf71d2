"""`evomerge run | resume | status | export`."""

from __future__ import annotations

import json
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from ..config import load_config

_LOG_HELP = ("Experiment logger: tensorboard (default when installed), wandb, mlflow, or none; "
             "repeat for several.")


def _executor_overrides(executor, workers, address):
    out = {}
    if executor:
        out["name"] = executor
    if workers:
        out["workers"] = workers
    if address:
        out["address"] = address
        out.setdefault("name", "ray")
    return out


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--runs-dir", default="runs", show_default=True, help="Folder holding run directories.")
@click.option("--name", default=None, help="Run name (default: the config's name).")
@click.option("--budget", type=click.IntRange(min=1), default=None,
              help="Override the number of evaluations.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default=None)
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Ray workers (default: from resources).")
@click.option("--address", default=None, help="Ray cluster address (auto, ray://host:port).")
@click.option("--force", is_flag=True, help="Continue a run whose config changed.")
@click.option("--no-progress", is_flag=True)
@click.option("--log", "log", multiple=True, metavar="NAME", help=_LOG_HELP)
def run(config, runs_dir, name, budget, executor, workers, address, force, no_progress, log):
    """Start (or continue) a search from a run CONFIG.yaml."""
    from ..engine.runner import run_search, with_overrides
    from ..engine.store import check_run_name

    cfg = with_overrides(load_config(config), name=name, budget=budget,
                         executor=_executor_overrides(executor, workers, address))
    run_dir = Path(runs_dir) / check_run_name(cfg.name)
    best = run_search(cfg, run_dir, force=force, progress=not no_progress, loggers=list(log) or None)
    _print_best(best, run_dir)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Continue even if config.yaml was edited.")
@click.option("--budget", type=click.IntRange(min=1), default=None,
              help="Extend (or set) the number of evaluations.")
@click.option("--executor", type=click.Choice(["local", "ray"]), default=None)
@click.option("--workers", type=click.IntRange(min=1), default=None)
@click.option("--address", default=None)
@click.option("--no-progress", is_flag=True)
@click.option("--log", "log", multiple=True, metavar="NAME", help=_LOG_HELP)
def resume(run_dir, force, budget, executor, workers, address, no_progress, log):
    """Continue RUN_DIR exactly where it stopped (after any crash)."""
    from ..engine.runner import resume_search

    best = resume_search(run_dir, force=force, budget=budget, progress=not no_progress,
                         executor=_executor_overrides(executor, workers, address),
                         loggers=list(log) or None)
    _print_best(best, Path(run_dir))


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.option("--plot/--no-plot", default=True, help="Write fitness.png into the run directory.")
def status(run_dir, as_json, plot):
    """Show progress of RUN_DIR and plot fitness over evaluations."""
    from ..engine.report import format_fitness, plot_fitness, summarize
    from ..fitness.stderr import format_score

    s = summarize(run_dir)
    png = plot_fitness(run_dir) if plot else None
    if as_json:
        click.echo(json.dumps(dict(s, plot=str(png) if png else None), indent=1))
        return
    con = Console()
    t = Table(title=f"run {s['run']}", show_header=False)
    t.add_row("evaluations", f"{s['evaluations']} / {s['budget']}" + (" (complete)" if s["complete"] else ""))
    t.add_row("evaluated / cached / failed / pending",
              f"{s['evaluated']} / {s['cached']} / {s['failed']} / {s['pending']}")
    if s["generations"]:
        t.add_row("generations", str(s["generations"]))
    if s["seconds_per_evaluation"] is not None:
        t.add_row("seconds per evaluation", f"{s['seconds_per_evaluation']:.2f}")
    if s.get("merge_seconds") is not None:
        m, e = s["merge_seconds"], s["eval_seconds"]
        text = f"mean {m:.2f} / {e:.2f} (merge {100 * m / max(m + e, 1e-9):.0f}%)"
        if s.get("merge_seconds_median") is not None:
            m, e = s["merge_seconds_median"], s["eval_seconds_median"]
            text += f"; median {m:.2f} / {e:.2f} (merge {100 * m / max(m + e, 1e-9):.0f}%)"
        if s.get("merge_setup_seconds") is not None:
            m, e = s["merge_seconds_without_setup"], s["eval_seconds"]
            text += (f"; one-time setup {s['merge_setup_seconds']:.1f} s in all, mean without it "
                     f"{m:.2f} / {e:.2f} (merge {100 * m / max(m + e, 1e-9):.0f}%)")
        t.add_row("merge s / eval s per candidate", text)
    if s["evaluations_per_second"]:
        t.add_row("evaluations per second", f"{s['evaluations_per_second']:.2f}")
    if s["best"]:
        b = s["best"]
        t.add_row("best candidate (search split)", f"id {b['id']}: {format_score(b['fitness'], b['se'])}")
        for task, v in b["scores"].items():
            t.add_row(f"  {task}", format_fitness(v))
    if s.get("best_baseline"):
        b = s["best_baseline"]
        t.add_row("best baseline (search split)", f"{b['label']}: {format_score(b['fitness'], b['se'])}")
    if s.get("final"):
        f = s["final"]
        t.add_row("final model", f"{f['label']} (chosen by {f['chosen_by']})")
        for split, v in f["splits"].items():
            if v and v.get("fitness") is not None:
                t.add_row(f"  {split}", format_score(v["fitness"], v["se"]))
    if s.get("racing"):
        r = s["racing"]
        t.add_row("racing", f"{r['cut']} cut, {r['examples_saved']} example evaluations saved "
                            f"({r['fraction_saved'] * 100:.0f}%)")
    workers = (s.get("executor") or {}).get("workers") or {}
    for w, ws in workers.items():
        t.add_row(f"worker {w}", f"{ws.get('evaluations', 0)} evals, utilisation {ws.get('utilisation', 0) * 100:.0f}%")
    if png:
        t.add_row("plot", str(png))
    con.print(t)


@click.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--top", "k", type=click.IntRange(min=1), default=None,
              help="Export the K best by search fitness instead of the final model.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False))
@click.option("--device", default=None)
@click.option("--shard-size", default="2GB", show_default=True)
@click.option("--overwrite", is_flag=True, help="Replace exported folders that already exist.")
@click.option("--pareto", is_flag=True,
              help="Export every Pareto-front member to OUT/pareto/<rank>-cand<id>/ plus front.json.")
@click.option("--prefer", default=None, metavar="TASK=W,...",
              help="Export the front member maximizing the weighted objective sum "
                   "(with --pareto: mark it in front.json).")
def export(run_dir, k, out_dir, device, shard_size, overwrite, pareto, prefer):
    """Export RUN_DIR's final model (chosen on validation; the best by search fitness for a
    run without selection), or with --top K the K best by search fitness, or with --pareto /
    --prefer the Pareto front / its preferred member, as HF checkpoints."""
    from ..engine.export import export_final, export_top

    if pareto or prefer is not None:
        from ..errors import ConfigError
        from ..report.front import parse_preference
        from ..report.pareto_export import export_pareto

        if k is not None:
            raise ConfigError("--top cannot be combined with --pareto/--prefer")
        weights = parse_preference(prefer) if prefer is not None else None
        paths, doc = export_pareto(run_dir, out_dir, pareto=pareto, prefer=weights,
                                   device=device, shard_size=shard_size, overwrite=overwrite)
        if doc["split"] == "search":
            click.echo("note: the front is on the search split (the run has no validation scores)")
        for p in paths:
            click.echo(str(p))
        return
    if k is None:
        click.echo(str(export_final(run_dir, out_dir, device=device, shard_size=shard_size,
                                    overwrite=overwrite)))
        return
    for p in export_top(run_dir, k, out_dir, device=device, shard_size=shard_size,
                        overwrite=overwrite):
        click.echo(str(p))


def _print_best(best, run_dir: Path) -> None:
    from ..engine.report import format_fitness
    from ..engine.runner import print_final

    if best is not None and print_final(run_dir):  # the baseline/final table, with SE
        return
    if best is None:
        click.echo(f"run finished without a successful evaluation: {run_dir}")
        return
    scores = ", ".join(f"{k} {format_fitness(v)}" for k, v in best["scores"].items())
    click.echo(f"best candidate {best['id']}: fitness {format_fitness(best['fitness'])} ({scores})")
    click.echo(f"run directory: {run_dir}")


COMMANDS = [run, resume, status, export]
