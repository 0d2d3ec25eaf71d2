"""Export the best individuals of a run as Hugging Face checkpoints.

Each exported folder holds sharded safetensors, config, tokenizer, the decoded recipe
(`evomerge_recipe.yaml`, which `evomerge merge` rebuilds bit for bit) and a model card with
the run's scores.
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
                 shard_size: str = "2GB") -> Path:
    """Export the run's final model (``final.json``: chosen on validation) to ``out_dir/final``;
    a run that has not been through selection exports its best by search fitness."""
    from .selection import load_final

    final = load_final(run_dir)
    if final is None:
        return export_top(run_dir, 1, out_dir, device=device, shard_size=shard_size)[0]
    f = final["final"]
    fin = next(r for r in final["rows"] if r.get("final"))
    rec = {"id": f["id"], "recipe": final["recipe"], "plan_hash": f["plan_hash"],
           "fitness": (fin["splits"].get("search") or {}).get("fitness"),
           "scores": {s: v["fitness"] for s, v in fin["splits"].items() if v},
           "label": f["label"], "chosen_by": final["chosen_by"]}
    return _export(run_dir, [(Path(out_dir) / "final", rec)], device, shard_size)[0]


def export_top(run_dir: str | Path, k: int, out_dir: str | Path, device: str | None = None,
               shard_size: str = "2GB") -> list[Path]:
    store = RunStore.open(run_dir)
    best = top_records(store.read_evals(), k)
    if not best:
        raise RunError(f"run {store.dir} has no successful evaluation to export")
    out = Path(out_dir)
    return _export(run_dir, [(out / f"rank{rank}-id{rec['id']}", rec)
                             for rank, rec in enumerate(best, 1)], device, shard_size)


def _export(run_dir: str | Path, targets: list[tuple[Path, dict[str, Any]]],
            device: str | None, shard_size: str) -> list[Path]:
    from ..materialize import Materializer
    from ..recipe import compile_recipe
    from ..spaces import make_space
    from .models import resolve_models

    store = RunStore.open(run_dir)
    cfg = store.config()
    space = make_space(cfg.space, resolve_models(cfg.models), cfg.base_model, seed=cfg.seed,
                       dtype=cfg.dtype)
    mat = Materializer(device=device)
    paths = []
    for target, rec in targets:
        target.parent.mkdir(parents=True, exist_ok=True)
        card = {
            "run": cfg.name,
            "candidate_id": rec["id"],
            "fitness": rec["fitness"],
            "scores": rec["scores"],
            "plan_hash": rec["plan_hash"],
            "optimizer": cfg.optimizer.name,
            "space": cfg.space.type,
        }
        if rec.get("chosen_by"):
            card.update(model=rec["label"], chosen_by=rec["chosen_by"])
        if space.remote:  # black-box: the weights live with a provider or behind APIs
            paths.append(space.export(rec, target, card, cfg))
            continue
        plan = compile_recipe(rec["recipe"])
        paths.append(mat.materialize_to_disk(plan, target, shard_size=shard_size,
                                             recipe=rec["recipe"], card=card))
    return paths
