"""A local Hugging Face Hub cache in the Hub's own layout, built from models on disk.

``<cache>/models--org--name/{blobs/<sha256>, snapshots/<commit>/<file> -> ../../blobs/<sha256>,
refs/<branch>}``: exactly what ``huggingface_hub`` writes when it downloads, so tests resolve
Hub ids through ``huggingface_hub`` itself, offline, against real files.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def add_to_hub_cache(cache: str | Path, repo_id: str, model_dir: str | Path,
                     branch: str = "main", commit: str | None = None,
                     skip: tuple[str, ...] = ()) -> tuple[Path, str]:
    """Store the files of ``model_dir`` as ``repo_id`` at a new commit; returns
    ``(snapshot dir, commit hash)``. ``skip``: file names left out (e.g. tokenizer files)."""
    cache = Path(cache)
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    files = sorted(p for p in Path(model_dir).iterdir() if p.is_file() and p.name not in skip)
    if commit is None:
        h = hashlib.sha1(repo_id.encode())
        for p in files:
            h.update(p.name.encode())
            h.update(p.read_bytes())
        commit = h.hexdigest()
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for p in files:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(p, blob)
        link = snap / p.name
        if not link.exists():
            os.symlink(os.path.relpath(blob, snap), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return snap, commit
