"""`evomerge merge RECIPE.yaml --out DIR`: the counterpart of `mergekit-yaml`.

Compiles the recipe (evomerge or mergekit YAML; a saved MergePlan is accepted as it is)
to a MergePlan, materializes it to an HF
directory (sharded safetensors, config, tokenizer, the normalized recipe as
``evomerge_recipe.yaml`` and a model card) and prints a one-line summary.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..errors import ConfigError, PlanError


def _device(name: str):
    from ..devices import check_device

    return None if name == "auto" else check_device(name, "--device")


@click.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--out", "out", type=click.Path(file_okay=False), default=None,
              help="Output directory (an HF checkpoint).")
@click.option("--device", default="auto", show_default=True,
              help="Where operators compute: auto (CUDA when present), cpu, cuda, cuda:N.")
@click.option("--shard-size", default="2GB", show_default=True, help="Max safetensors shard size.")
@click.option("--print-plan", is_flag=True, help="Print the compiled MergePlan (YAML); alone, do not merge.")
@click.option("--mergekit-out", type=click.Path(dir_okay=False), default=None,
              help="Also write the recipe as a mergekit config (fails if mergekit cannot express it).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
def merge(recipe, out, device, shard_size, print_plan, mergekit_out, overwrite):
    """Merge models as RECIPE.yaml says (evomerge or mergekit format)."""
    from ..checkpoint.writer import parse_size
    from ..materialize import Materializer
    from ..plan import MergePlan
    from ..recipe import compile_recipe, read_recipe_file, recipe_to_mergekit_yaml

    if out is None and not print_plan and mergekit_out is None:
        raise ConfigError("--out: missing (where to write the merged model)")
    parse_size(shard_size)  # fail on a bad size before any work
    dev = _device(device)
    t0 = time.perf_counter()
    raw = read_recipe_file(recipe)
    if "steps" in raw and "sources" in raw:  # a MergePlan (e.g. saved from --print-plan)
        try:
            plan = MergePlan.from_dict(raw)
            plan.validate()
        except PlanError as e:
            raise PlanError(f"{recipe}: {e}") from None
    else:
        plan = compile_recipe(Path(recipe))
    compile_s = time.perf_counter() - t0
    if print_plan:
        click.echo(plan.to_yaml().rstrip())
    if mergekit_out is not None:
        text = recipe_to_mergekit_yaml(plan)
        try:
            Path(mergekit_out).expanduser().write_text(text, encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"--mergekit-out {mergekit_out}: cannot write ({err.strerror or err})") from None
        click.echo(f"wrote mergekit config {mergekit_out}", err=print_plan)
    if out is None:
        return
    mat = Materializer(device=dev)
    t1 = time.perf_counter()
    path = mat.materialize_to_disk(
        plan, out, shard_size=shard_size, recipe=plan.meta.get("recipe"),
        card={"recipe_file": str(Path(recipe).expanduser().absolute())}, overwrite=overwrite,
    )
    seconds = time.perf_counter() - t1
    gb = mat.bytes_read / 1e9
    read = f"{gb:.2f} GB" if gb >= 1 else f"{mat.bytes_read / 1e6:.1f} MB"
    click.echo(
        f"merged {len(plan.steps)} tensors ({plan.meta.get('method', 'plan')}, {len(plan.sources)} sources) "
        f"in {seconds:.2f} s on {mat.device.type}: {read} read, "
        f"{gb / max(seconds, 1e-9):.2f} GB/s (compile {compile_s * 1000:.0f} ms) -> {path}",
        err=print_plan,
    )


COMMANDS = [merge]
