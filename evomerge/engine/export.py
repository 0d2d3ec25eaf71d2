"""Export the best individuals of a run as Hugging Face checkpoints.

Each exported folder holds sharded safetensors, config, tokenizer, the decoded recipe
(`evomerge_recipe.yaml`, which `evomerge merge` rebuilds bit for bit; Hub sources written
``org/name@commit``), `mergekit_config.yml` when mergekit can express the recipe, and a
Hub-ready model card (``huggingface_hub`` ModelCard) with the run's scores, each with its
split and standard error. `evomerge push DIR REPO_ID` uploads such a folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import RunError
from .store import RunStore


def top_records(records: list[dict[str, Any]], k: int) -> list[dict[str, Any]]:
    """Best k successful records, one per distinct plan."""
    seen: set[str] = set()
    out = []
    for rec in sorted((r for r in records if not r.get("failed")), key=lambda r: (-r["fitness"], r["id"])):
        if rec["plan_hash"] in seen:
            continue
        seen.add(rec["plan_hash"])
        out.append(rec)
        if len(out) == k:
            break
    return out


def export_final(run_dir: str | Path, out_dir: str | Path, device: str | None = None,
                 shard_size: str = "2GB", overwrite: bool = False) -> Path:
    """Export the run's final model (``final.json``: chosen on validation) to ``out_dir/final``;
    a run that has not been through selection exports its best by search fitness."""
    from .selection import load_final

    final = load_final(run_dir)
    if final is None:
        return export_top(run_dir, 1, out_dir, device=device, shard_size=shard_size,
                          overwrite=overwrite)[0]
    f = final["final"]
    fin = next(r for r in final["rows"] if r.get("final"))
    def tasks_of(split: str) -> dict[str, Any]:  # {task: {mean, se}} as the card reads it
        return {t: {"mean": v.get("mean"), "stderr": v.get("se")}
                for t, v in ((fin["splits"].get(split) or {}).get("tasks") or {}).items()}

    rec = {"id": f["id"], "recipe": final["recipe"], "plan_hash": f["plan_hash"],
           "fitness": (fin["splits"].get("search") or {}).get("fitness"),
           "scores": {t: v["mean"] for t, v in tasks_of("search").items()},
           "validation": tasks_of("validation"), "heldout": tasks_of("heldout"),
           "label": f["label"], "chosen_by": final["chosen_by"]}
    return export_records(run_dir, [(Path(out_dir) / "final", rec)], device, shard_size, overwrite)[0]


def export_top(run_dir: str | Path, k: int, out_dir: str | Path, device: str | None = None,
               shard_size: str = "2GB", overwrite: bool = False) -> list[Path]:
    """The best ``k`` (>= 1) by search fitness as HF folders ``rank<i>-id<id>`` under
    ``out_dir``; existing folders are an error unless ``overwrite`` (then each is replaced
    atomically)."""
    if k < 1:
        raise RunError(f"--top: must be >= 1, got {k}")
    store = RunStore.open(run_dir)
    best = top_records(store.read_evals(), k)
    if not best:
        raise RunError(f"run {store.dir} has no successful evaluation to export")
    out = Path(out_dir)
    return export_records(run_dir, [(out / f"rank{rank}-id{rec['id']}", rec)
                             for rank, rec in enumerate(best, 1)], device, shard_size, overwrite)


def export_records(run_dir: str | Path, targets: list[tuple[Path, dict[str, Any]]],
            device: str | None, shard_size: str, overwrite: bool = False) -> list[Path]:
    from ..checkpoint.card import score_rows_of_record
    from ..checkpoint.writer import make_output_parent
    from ..devices import check_device
    from ..materialize import Materializer
    from ..recipe import compile_recipe
    from ..spaces import make_space
    from .models import read_pins, resolve_models

    dev = check_device(device, "--device")
    store = RunStore.open(run_dir)
    cfg = store.config()
    models = resolve_models(cfg.models, read_pins(store.dir))  # the commits the run used
    space = make_space(cfg.space, models, cfg.base_model, seed=cfg.seed,
                       dtype=cfg.dtype)
    mat = Materializer(device=dev)
    paths = []
    for target, rec in targets:
        make_output_parent(target)
        card = {
            "run": cfg.name,
            "candidate_id": rec["id"],
            "fitness": rec["fitness"],
            "evaluations": score_rows_of_record(rec),
            "plan_hash": rec["plan_hash"],
            "optimizer": cfg.optimizer.name,
            "space": cfg.space.type,
        }
        if rec.get("tradeoff"):
            card["tradeoff"] = rec["tradeoff"]
        if rec.get("chosen_by"):
            card.update(model=rec["label"], chosen_by=rec["chosen_by"])
        if space.remote:  # black-box: the weights live with a provider or behind APIs
            paths.append(space.export(rec, target, card, cfg))
            continue
        plan = compile_recipe(rec["recipe"])
        paths.append(mat.materialize_to_disk(plan, target, shard_size=shard_size,
                                             recipe=rec["recipe"], card=card, overwrite=overwrite))
    return paths
