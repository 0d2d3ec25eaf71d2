"""`evomerge push EXPORT_DIR REPO_ID`: upload an exported merge to the Hugging Face Hub."""

from __future__ import annotations

import click


@click.command()
@click.argument("export_dir", type=click.Path(file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private.")
@click.option("--dry-run", is_flag=True, help="List the files that would be uploaded; contact nobody.")
@click.option("--message", default=None, help="Commit message.")
def push(export_dir, repo_id, private, dry_run, message):
    """Upload EXPORT_DIR (from `evomerge export` or `merge`) to the Hub as REPO_ID.

    The token comes from the environment (HF_TOKEN) or a stored `hf auth login`; it is never
    printed or written. HF_ENDPOINT selects another Hub endpoint."""
    from ..checkpoint.push import plan_push
    from ..checkpoint.push import push as do_push

    plan = plan_push(export_dir, repo_id)
    size = _size(plan.total_bytes)
    if dry_run:
        for path, n in plan.files:
            click.echo(f"{_size(n):>10}  {path}")
        click.echo(f"dry run: would upload {len(plan.files)} files ({size}) to {repo_id}"
                   f"{' (private)' if private else ''}")
        return
    url = do_push(plan, private=private, commit_message=message)
    click.echo(f"pushed {len(plan.files)} files ({size}) to {repo_id}: {url}")


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


COMMANDS = [push]
