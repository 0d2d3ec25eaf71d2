"""`evomerge push` against a real local HTTP server speaking the Hub's upload routes
(tests/fake_hub.py; HF_ENDPOINT points at it): never the real Hub. Also the Hub's gated /
missing answers for model downloads, through huggingface_hub's own error handling."""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner
from fake_hub import FakeHub
from tiny_models import make_tiny_expert, make_tiny_llama

from evomerge.checkpoint.resolve import resolve_ref
from evomerge.cli import main
from evomerge.errors import CheckpointError

TOKEN = "hf_evomergeTestSecret123"


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("push")
    make_tiny_llama(root / "base", seed=0)
    make_tiny_expert(root / "base", root / "a", seed=1)
    recipe = root / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "task_arithmetic", "base_model": str(root / "base"),
        "models": [{"model": str(root / "a"), "parameters": {"weight": 0.5}}]}))
    res = CliRunner().invoke(main, ["merge", str(recipe), "--out", str(root / "out")])
    assert res.exit_code == 0, res.output
    return root / "out"


@pytest.fixture
def hub(monkeypatch):
    with FakeHub(TOKEN) as h:
        monkeypatch.setenv("HF_ENDPOINT", h.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        # lm-eval tasks (tests/fitness/test_lmeval.py, same process) switch huggingface_hub's cached
        # offline constant on for the whole process; this fake Hub is on loopback
        import huggingface_hub.constants as hub_constants

        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        yield h


def _files(d):
    return sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())


def test_push_uploads_the_export_and_never_shows_the_token(export_dir, hub):
    res = CliRunner().invoke(main, ["push", str(export_dir), "me/tiny-merge", "--private"])
    assert res.exit_code == 0, res.output
    assert "pushed" in res.output and "me/tiny-merge" in res.output
    repo = hub.repos["me/tiny-merge"]
    assert repo["private"] is True
    assert hub.validated_cards == 1 and hub.invalid_cards == []
    assert sorted(repo["files"]) == _files(export_dir)
    assert "mergekit_config.yml" in repo["files"] and "README.md" in repo["files"]
    for name, data in repo["files"].items():
        assert data == (export_dir / name).read_bytes()
        assert TOKEN.encode() not in data
    assert TOKEN not in res.output
    # the token went only into the Authorization header
    writes = [r for r in hub.requests if r[0] == "POST"]
    auth = [{k.lower(): v for k, v in r[2].items()}.get("authorization") for r in writes]
    assert writes and all(a == f"Bearer {TOKEN}" for a in auth)
    assert all(TOKEN not in v for r in hub.requests for k, v in r[2].items() if k.lower() != "authorization")


def test_push_dry_run_lists_files_and_contacts_nobody(export_dir, hub):
    res = CliRunner().invoke(main, ["push", str(export_dir), "me/x", "--dry-run"])
    assert res.exit_code == 0, res.output
    for f in _files(export_dir):
        assert f in res.output
    assert f"would upload {len(_files(export_dir))} files" in res.output
    assert hub.requests == []


@pytest.mark.parametrize("args, env, message", [
    (["me/x"], {"HF_TOKEN": "hf_wrong"}, "error: push to me/x: the Hub refused the token (HTTP 401); set HF_TOKEN"),
    (["not a repo"], {}, "error: REPO_ID 'not a repo' is not a valid Hub repository id"),
    (["tiny"], {}, "error: REPO_ID 'tiny': give it as owner/name"),
])
def test_push_errors_are_one_line(export_dir, hub, monkeypatch, args, env, message):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    res = CliRunner().invoke(main, ["push", str(export_dir), *args])
    assert res.exit_code != 0
    assert res.output.strip().splitlines() == [message] or res.output.startswith(message), res.output
    assert len(res.output.strip().splitlines()) == 1 and "hf_wrong" not in res.output


def test_push_refuses_incomplete_or_pickled_folders(tmp_path, hub):
    (tmp_path / "config.json").write_text("{}")
    res = CliRunner().invoke(main, ["push", str(tmp_path), "me/x"])
    assert res.exit_code != 0 and "is not a complete checkpoint" in res.output
    (tmp_path / "model.safetensors").write_bytes(b"")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    res = CliRunner().invoke(main, ["push", str(tmp_path), "me/x"])
    assert res.exit_code != 0 and "pushes safetensors only" in res.output
    assert hub.requests == []


def test_gated_and_missing_hub_models_are_one_line(hub, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    hub.gated.add("acme/gated")
    with pytest.raises(CheckpointError, match=r"^Hub model acme/gated is gated: accept its terms on its Hub page, then set HF_TOKEN"):
        resolve_ref("acme/gated")
    with pytest.raises(CheckpointError, match=r"^Hub model acme/missing not found \(check the spelling; a private repository needs HF_TOKEN\)"):
        resolve_ref("acme/missing")


def test_hub_download_fetches_only_safetensors_config_and_tokenizer(hub, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    model = make_tiny_llama(tmp_path / "m", seed=3)
    sha = hub.add_model("acme/tiny", model, extra={"pytorch_model.bin": b"pickle!",
                                                    "training_args.pt": b"pickle!",
                                                    "modeling_custom.py": b"import os"})
    cache = tmp_path / "cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    r = resolve_ref("acme/tiny")
    assert r.revision == sha and r.path.endswith(f"models--acme--tiny/snapshots/{sha}")
    assert sorted(hub.downloaded) == sorted(p.name for p in model.iterdir())
    assert not any(n.endswith((".bin", ".pt", ".py")) for n in hub.downloaded)
    assert load_file(f"{r.path}/model.safetensors").keys() == load_file(str(model / "model.safetensors")).keys()
    # afterwards it resolves offline from the cache, at the same commit
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.downloaded.clear()
    assert resolve_ref("acme/tiny").path == r.path and hub.downloaded == []
