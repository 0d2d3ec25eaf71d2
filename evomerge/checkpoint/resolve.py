"""One resolver for every model reference a user writes: a local directory, ``zoo:x``, or a
Hugging Face Hub id ``org/name`` (optionally ``org/name@revision``).

Everything downstream sees a local directory. Hub ids go through ``huggingface_hub``'s
``snapshot_download`` with only safetensors, JSON (config, index, tokenizer), tokenizer and
chat-template files allowed — never pickled weights (``*.bin``, ``*.pt``) nor code. The local
HF cache is used as it is: ``HF_HUB_CACHE`` / ``HF_HOME`` pick it, ``HF_HUB_OFFLINE=1``
forbids any network access and ``HF_ENDPOINT`` picks the Hub (all read when a reference is
resolved, not at import). The token
is ``huggingface_hub``'s own (``HF_TOKEN`` or a login); evomerge never reads or writes it.

A resolved Hub model lives in ``<cache>/models--org--name/snapshots/<commit>``, so its
directory names the exact commit: :func:`hub_ref_of_path` turns any such directory back into
``org/name@<commit>``, which is how runs, recipes, model cards and mergekit configs record
the revision a merge used (see :func:`portable_ref`).

``zoo:`` references belong to the model zoo (:mod:`evomerge.zoo.refs`), a layer above this
one: the engine and the CLI register its resolver here (:func:`register_ref_scheme`), so
this package never imports the zoo.

Precedence, as in ``transformers``: an existing local directory wins over a Hub id of the
same spelling; ``./x/y`` or an absolute path is never a Hub id.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

# What a merge needs from a Hub repository: weights (safetensors only), config and index
# JSON, tokenizer files, chat templates. Nothing pickled, no remote code.
HUB_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "tokenizer.model",
    "spiece.model",
    "merges.txt",
    "vocab.txt",
    "*.tiktoken",
    "*.jinja",
]
# Reference schemes a higher layer provides: prefix -> resolver(ref) -> local directory.
# ``zoo:`` is the model zoo's (evomerge.zoo.refs); the engine and the CLI wire it.
_SCHEMES: dict[str, Callable[[str], str]] = {}

_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?"
_HUB_RE = re.compile(rf"^(?P<repo>{_NAME}/{_NAME})(?:@(?P<rev>[A-Za-z0-9._/-]+))?$")
_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference made local. ``revision`` is the commit hash for Hub models."""

    ref: str  # as the user wrote it
    path: str  # local directory (absolute)
    repo_id: str | None = None  # Hub models only
    revision: str | None = None  # resolved commit hash (Hub models only)
    requested: str | None = None  # the revision as written (branch, tag, commit) or None

    @property
    def pinned(self) -> str:
        """The reference that rebuilds exactly this model (``org/name@commit`` for the Hub)."""
        return f"{self.repo_id}@{self.revision}" if self.repo_id else self.ref

    @property
    def key_hint(self) -> str:
        """A short name for recipe keys: the repo's name, the zoo member, the folder."""
        if self.repo_id:
            return self.repo_id.split("/", 1)[1]
        if self.ref.startswith("zoo:"):
            return self.ref.rsplit("/", 1)[-1].removeprefix("zoo:")
        return Path(self.path).name

    def to_dict(self) -> dict[str, str | None]:
        return {"ref": self.ref, "path": self.path, "repo_id": self.repo_id,
                "revision": self.revision, "pinned": self.pinned}


def parse_hub_id(ref: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision or None)`` when ``ref`` is spelled like a Hub id, else None."""
    if not isinstance(ref, str) or ref.startswith((".", "/", "~")) or "\\" in ref:
        return None
    m = _HUB_RE.match(ref)
    if m is None or "--" in m.group("repo") or ".." in m.group("repo"):
        return None
    return m.group("repo"), m.group("rev")


def hub_cache_dir() -> Path:
    """The HF hub cache as the environment says now (HF_HUB_CACHE, else HF_HOME/hub)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.path.expandvars(os.environ["HF_HUB_CACHE"])).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.path.expandvars(os.environ["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def hub_offline() -> bool:
    v = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return v.strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_ref_of_path(path: str | os.PathLike) -> str | None:
    """``org/name@commit`` when ``path`` is (inside) a Hub cache snapshot, else None."""
    p = Path(path)
    for d in (p, *p.parents):
        if d.parent.name == "snapshots" and d.parent.parent.name.startswith("models--"):
            repo = d.parent.parent.name.removeprefix("models--").replace("--", "/", 1)
            return f"{repo}@{d.name}" if "/" in repo else None
    return None


def hub_repo_of_path(path: str | os.PathLike) -> str | None:
    """``org/name`` when ``path`` is a Hub cache snapshot (for model cards' ``base_model``)."""
    ref = hub_ref_of_path(path)
    return ref.split("@", 1)[0] if ref else None


def portable_ref(path: str | os.PathLike) -> str:
    """A reference another machine can resolve: ``org/name@commit`` for Hub snapshots,
    else the path itself."""
    return hub_ref_of_path(path) or str(path)


def portable_recipe(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """``recipe`` with its ``sources`` that are Hub snapshots written ``org/name@commit``."""
    out = dict(recipe)
    if isinstance(out.get("sources"), Mapping):
        out["sources"] = {k: portable_ref(v) if isinstance(v, str) else v
                          for k, v in out["sources"].items()}
    return out


def resolve_ref(ref: str, base_dir: str | os.PathLike | None = None, *,
                pinned: str | None = None) -> ResolvedModel:
    """Turn ``ref`` into a local directory (see the module docstring). ``base_dir``: where
    relative paths start (default: the current directory). ``pinned``: a commit to use for a
    Hub id written without one (a resumed run reuses the revision it started with).
    CheckpointError with one line on failure."""
    if not isinstance(ref, (str, os.PathLike)) or not str(ref):
        raise CheckpointError(f"expected a model directory, zoo:NAME or a Hub id, got {ref!r}")
    ref = str(ref)
    for prefix, resolver in _SCHEMES.items():
        if ref.startswith(prefix):
            return ResolvedModel(ref, resolver(ref))
    if ref.startswith("zoo:"):
        raise CheckpointError(f"{ref}: zoo: references need the model zoo's resolver: call "
                              "evomerge.zoo.refs.register_zoo_refs() first (the CLI and the "
                              "engine do)")
    local = Path(os.path.expanduser(ref))
    if not local.is_absolute():
        local = Path(base_dir or Path.cwd()) / local
    if local.is_dir():
        return ResolvedModel(ref, os.path.normpath(local.absolute()))
    hub = parse_hub_id(ref)
    if hub is None:
        if local.exists():
            raise CheckpointError(f"model directory {os.path.normpath(local)!r} is a file, not a model directory")
        raise CheckpointError(f"model directory not found: {os.path.normpath(local)}")
    repo_id, rev = hub
    path = download_hub_model(repo_id, rev or pinned)
    return ResolvedModel(ref, path, repo_id, Path(path).name, rev)


def register_ref_scheme(prefix: str, resolver: Callable[[str], str]) -> None:
    """Let :func:`resolve_ref` hand references starting with ``prefix`` (e.g. ``zoo:``) to
    ``resolver``, which returns the local directory or raises CheckpointError (one line).
    Registering the same prefix again replaces its resolver.

    Args:
        prefix: the scheme as users write it, colon included.
        resolver: reference (as written) -> local directory.
    """
    _SCHEMES[prefix] = resolver


def resolve_model_dir(ref: str, base_dir: str | os.PathLike | None = None) -> str:
    """The local directory of ``ref`` (for commands that only need the path: eval, serve)."""
    return resolve_ref(ref, base_dir).path


def download_hub_model(repo_id: str, revision: str | None = None) -> str:
    """The snapshot directory of ``repo_id`` at ``revision`` (default ``main``), fetched into
    (or found in) the local HF cache. Only :data:`HUB_ALLOW_PATTERNS` files are fetched."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache = hub_cache_dir()
    offline = hub_offline()
    shown = f"{repo_id}@{revision}" if revision else repo_id
    try:
        path = snapshot_download(
            repo_id, revision=revision, cache_dir=str(cache), local_files_only=offline,
            allow_patterns=HUB_ALLOW_PATTERNS, endpoint=os.environ.get("HF_ENDPOINT") or None,
        )
    except GatedRepoError:
        raise CheckpointError(
            f"Hub model {repo_id} is gated: accept its terms on its Hub page, then set HF_TOKEN "
            f"(or run `hf auth login`) and retry"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(
            f"Hub model {repo_id} has no revision {revision!r} (a branch, tag or commit hash)"
        ) from None
    except RepositoryNotFoundError:
        raise CheckpointError(
            f"Hub model {repo_id} not found (check the spelling; a private repository needs "
            f"HF_TOKEN); no local directory {repo_id!r} either"
        ) from None
    except LocalEntryNotFoundError:
        if offline:
            raise CheckpointError(
                f"Hub model {shown} is not in the local HF cache ({cache}) and HF_HUB_OFFLINE is "
                f"set: download it once online (unset HF_HUB_OFFLINE) or point HF_HUB_CACHE at a "
                f"cache that holds it"
            ) from None
        raise CheckpointError(
            f"Hub model {shown}: the Hub cannot be reached and the model is not in the local HF "
            f"cache ({cache}); check the network or set HF_HUB_CACHE"
        ) from None
    except HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", "?")
        if status in (401, 403):
            raise CheckpointError(
                f"Hub model {repo_id}: access denied (HTTP {status}); set HF_TOKEN to a token "
                f"that can read it"
            ) from None
        raise CheckpointError(f"Hub model {shown}: download failed (HTTP {status})") from None
    except (OSError, ValueError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"Hub model {shown}: {first}") from None
    return _check_snapshot(Path(path), shown)


def _check_snapshot(path: Path, shown: str) -> str:
    if not (path.is_dir() and any(p.name.endswith(".safetensors") for p in path.iterdir())):
        raise CheckpointError(
            f"Hub model {shown} has no safetensors weights; evomerge loads safetensors only "
            f"(pickled *.bin / *.pt weights are never downloaded)"
        )
    return str(path)
