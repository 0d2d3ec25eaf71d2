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


def export_top(run_dir: str | Path, k: int, out_dir: str | Path, device: str | None = None,
               shard_size: str = "2GB", overwrite: bool = False) -> list[Path]:
    """The best ``k`` (>= 1) as HF folders ``rank<i>-id<id>`` under ``out_dir``; existing
    folders are an error unless ``overwrite`` (then each is replaced atomically)."""
    from ..checkpoint.writer import make_output_parent
    from ..devices import check_device
    from ..materialize import Materializer
    from ..recipe import compile_recipe
    from ..spaces import make_space
    from .models import resolve_models

    if k < 1:
        raise RunError(f"--top: must be >= 1, got {k}")
    dev = check_device(device, "--device")
    store = RunStore.open(run_dir)
    records = store.read_evals()
    best = top_records(records, k)
    if not best:
        raise RunError(f"run {store.dir} has no successful evaluation to export")
    cfg = store.config()
    out_dir = Path(out_dir)
    make_output_parent(out_dir / "x")
    space = make_space(cfg.space, resolve_models(cfg.models), cfg.base_model, seed=cfg.seed,
                       dtype=cfg.dtype)
    mat = Materializer(device=dev)
    paths = []
    for rank, rec in enumerate(best, 1):
        target = out_dir / f"rank{rank}-id{rec['id']}"
        card = {
            "run": cfg.name,
            "candidate_id": rec["id"],
            "fitness": rec["fitness"],
            "scores": rec["scores"],
            "plan_hash": rec["plan_hash"],
            "optimizer": cfg.optimizer.name,
            "space": cfg.space.type,
        }
        if space.remote:  # black-box: the weights live with a provider or behind APIs
            paths.append(space.export(rec, target, card, cfg))
            continue
        plan = compile_recipe(rec["recipe"])
        paths.append(mat.materialize_to_disk(plan, target, shard_size=shard_size,
                                             recipe=rec["recipe"], card=card, overwrite=overwrite))
    return paths
