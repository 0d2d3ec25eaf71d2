"""Upload an exported merge to the Hugging Face Hub: ``evomerge push EXPORT_DIR REPO_ID``.

Uses ``huggingface_hub`` (``create_repo`` then ``upload_folder``). The token is
``huggingface_hub``'s own: ``HF_TOKEN`` from the environment (or a stored ``hf auth login``);
evomerge never prints, logs or writes it. ``HF_ENDPOINT`` picks the Hub (read when pushing).

What is uploaded: every regular file of the export directory except hidden ones (partial
writes); the directory must be a complete checkpoint (``config.json``, safetensors weights)
and hold no pickled weights. ``dry_run`` lists the files and contacts nobody.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, ConfigError
from .reader import CONFIG_FILE, PICKLE_SUFFIXES


@dataclass
class PushPlan:
    folder: Path
    repo_id: str
    files: list[tuple[str, int]]  # (path in repo, bytes)

    @property
    def total_bytes(self) -> int:
        return sum(n for _, n in self.files)


def plan_push(folder: str | os.PathLike, repo_id: str) -> PushPlan:
    """Check the export directory and the repo id; list what would be uploaded."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        first = str(e).splitlines()[0]
        raise ConfigError(f"REPO_ID {repo_id!r} is not a valid Hub repository id: {first}") from None
    if "/" not in repo_id:
        raise ConfigError(f"REPO_ID {repo_id!r}: give it as owner/name (e.g. your-user/my-merge)")
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise CheckpointError(f"export directory {root} not found")
    files = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        if p.name.endswith(PICKLE_SUFFIXES):
            raise CheckpointError(f"{root} holds pickled weights ({rel}); evomerge pushes safetensors only")
        files.append((rel.as_posix(), p.stat().st_size))
    names = {f for f, _ in files}
    if CONFIG_FILE not in names or not any(f.endswith(".safetensors") for f in names):
        raise CheckpointError(
            f"{root} is not a complete checkpoint (needs {CONFIG_FILE} and safetensors weights); "
            f"push a folder written by `evomerge export` or `evomerge merge`"
        )
    return PushPlan(root, repo_id, files)


def push(plan: PushPlan, private: bool = False, commit_message: str | None = None) -> str:
    """Create the repository (if needed) and upload the folder; returns the commit URL."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.errors import HfHubHTTPError

    token = get_token()
    if not token:
        raise ConfigError("push: no Hugging Face token; set HF_TOKEN (a token with write access)")
    endpoint = os.environ.get("HF_ENDPOINT") or None
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(plan.repo_id, private=True if private else None, exist_ok=True,
                        repo_type="model")
        info = api.upload_folder(
            folder_path=str(plan.folder), repo_id=plan.repo_id, repo_type="model",
            commit_message=commit_message or "Upload merged model (evomerge)",
            ignore_patterns=[".*", "**/.*"],
        )
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise ConfigError(
                f"push to {plan.repo_id}: the Hub refused the token (HTTP {status}); set HF_TOKEN "
                f"to a token with write access to {plan.repo_id.split('/')[0]}"
            ) from None
        raise ConfigError(f"push to {plan.repo_id}: the Hub answered HTTP {status}") from None
    except Exception as err:  # connection refused, DNS, timeouts (httpx errors are not OSErrors)
        if type(err).__module__.split(".")[0] not in ("httpx", "httpx2", "builtins", "socket", "ssl"):
            raise
        raise ConfigError(f"push to {plan.repo_id}: cannot reach the Hub at "
                          f"{endpoint or 'huggingface.co'} ({type(err).__name__})") from None
    return str(getattr(info, "commit_url", None) or info)
