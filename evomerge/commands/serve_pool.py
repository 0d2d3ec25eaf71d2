"""`evomerge serve-pool`: a provider's LoRA pool behind an HTTP API (black-box merging).

Users send control vectors (per adapter sparsity alpha and signed scale beta) and get
losses and scores back; weights leave the server only as an export the operator allowed.
The pool is :mod:`evomerge.blackbox.pool`, the API :mod:`evomerge.blackbox.pool_server`.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from ..errors import ConfigError

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def _pairs(values: tuple[str, ...], option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"{option}: expected NAME=PATH, got {v!r}")
        if name in out:
            raise ConfigError(f"{option}: name {name!r} given twice")
        out[name.strip()] = path.strip()
    return out


def load_pool_dir(root: str | Path):
    """The PoolManifest of a pool folder built by ``evomerge zoo build --pool`` (or the
    SmolLM2 pool): the manifest is the folder's JSON file that ``PoolManifest.from_dict``
    accepts."""
    from ..zoo import pool as zoo_pool  # H-ZOO's module

    folder = Path(root).expanduser().resolve()
    if not folder.is_dir():
        raise ConfigError(f"--pool-dir: {folder} is not a folder")
    loader = getattr(zoo_pool, "load_pool_manifest", None)
    if loader is not None:
        return loader(folder)
    names = [getattr(zoo_pool, "MANIFEST", None), getattr(zoo_pool, "POOL_MANIFEST", None), "pool.json"]
    candidates = [folder / n for n in names if n] + sorted(folder.glob("*.json"))
    problems = []
    for path in dict.fromkeys(candidates):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            manifest = zoo_pool.PoolManifest.from_dict(data, root=folder) if _takes_root(zoo_pool) \
                else zoo_pool.PoolManifest.from_dict(data)
        except Exception as err:  # noqa: BLE001 - try the next JSON file, report if none fits
            problems.append(f"{path.name}: {type(err).__name__}: {err}")
            continue
        return manifest
    detail = f" ({problems[0]})" if problems else ""
    raise ConfigError(f"--pool-dir: no pool manifest found in {folder}{detail}")


def _takes_root(module) -> bool:
    import inspect

    try:
        return "root" in inspect.signature(module.PoolManifest.from_dict).parameters
    except (TypeError, ValueError):
        return False


@click.command("serve-pool")
@click.option("--base", default=None, type=click.Path(file_okay=False), help="Base model folder (HF checkpoint).")
@click.option("--adapter", "adapters", multiple=True, metavar="NAME=DIR",
              help="A PEFT LoRA adapter of the pool (repeat; pool order = option order).")
@click.option("--pool-dir", default=None, type=click.Path(file_okay=False),
              help="A pool folder with its manifest (base, adapters, target tasks) instead of --base/--adapter.")
@click.option("--task", "tasks", multiple=True, metavar="NAME=YAML", help="A hosted task (repeat).")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8321, show_default=True, help="Port (0: any free port).")
@click.option("--token-env", default="EVOMERGE_POOL_TOKEN", show_default=True, metavar="NAME",
              help="Environment variable holding the bearer token every /v1 request must send.")
@click.option("--no-auth", is_flag=True, help="Serve without a token (explicit opt-out).")
@click.option("--allow-export", "allow_export", multiple=True,
              type=click.Choice(["none", "adapter", "model", "all"]), default=("none",), show_default=True,
              help="Which merged weights clients may download (repeat to allow several).")
@click.option("--max-sessions", type=int, default=8, show_default=True)
@click.option("--max-examples", type=int, default=2000, show_default=True, help="Uploaded examples per session.")
@click.option("--max-body-bytes", type=int, default=8 << 20, show_default=True)
@click.option("--session-ttl", type=float, default=3600.0, show_default=True, help="Idle seconds before a session expires.")
@click.option("--beta-range", type=(float, float), default=(-1.5, 1.5), show_default=True,
              help="Allowed range of each adapter's signed scale beta.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present).")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--quiet", is_flag=True, help="No access log.")
def serve_pool(base, adapters, pool_dir, tasks, host, port, token_env, no_auth, allow_export, max_sessions,
               max_examples, max_body_bytes, session_ttl, beta_range, device, batch_size, threads, quiet):
    """Serve a base model + LoRA adapters: clients evaluate merges by control vector only."""
    from ..netclient import read_api_key

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port: must be 0..65535, got {port}")
    for name, value in (("--max-sessions", max_sessions), ("--max-examples", max_examples),
                        ("--max-body-bytes", max_body_bytes), ("--batch-size", batch_size)):
        if value < 1:
            raise ConfigError(f"{name}: must be >= 1, got {value}")
    if not session_ttl > 0:
        raise ConfigError(f"--session-ttl: must be > 0, got {session_ttl}")
    if not beta_range[0] < beta_range[1]:
        raise ConfigError(f"--beta-range: low must be below high, got {beta_range}")
    # the token first: a server that would refuse to start fails before loading anything
    token = None
    if not no_auth:
        secret = read_api_key(token_env, field="--token-env")
        token = secret.reveal()
    exports = set(allow_export) - {"none"}
    if "all" in exports:
        exports = {"adapter", "model"}
    if "none" in allow_export and exports:
        raise ConfigError("--allow-export: 'none' cannot be combined with other kinds")

    hosted = _pairs(tasks, "--task")
    descriptions: dict[str, str] = {}
    if pool_dir is not None:
        if base is not None or adapters:
            raise ConfigError("--pool-dir replaces --base/--adapter: give one or the other")
        manifest = load_pool_dir(pool_dir)
        base_dir = str(manifest.base)
        adapter_dirs = {k: str(v) for k, v in manifest.adapters.items()}
        descriptions = dict(manifest.descriptions)
        for name, path in manifest.target_tasks.items():
            hosted.setdefault(name, str(path))
    else:
        if base is None or not adapters:
            raise ConfigError("give --base DIR and at least one --adapter NAME=DIR (or --pool-dir)")
        base_dir, adapter_dirs = base, _pairs(adapters, "--adapter")

    if threads is not None:
        import torch

        torch.set_num_threads(max(1, threads))
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr)

    import uvicorn

    from ..blackbox.pool import LoraPool
    from ..blackbox.pool_server import bind_socket, create_app, uvicorn_config

    pool = LoraPool.from_dirs(base_dir, adapter_dirs, device=device, descriptions=descriptions,
                              beta_range=tuple(beta_range), batch_size=batch_size)
    app = create_app(pool, token, tasks=hosted, allow_export=exports, max_sessions=max_sessions,
                     max_examples=max_examples, max_body_bytes=max_body_bytes, session_ttl=session_ttl)
    sock = bind_socket(host, port)
    actual = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    if token is None:
        click.echo("warning: serving WITHOUT auth (--no-auth): anyone who can reach the port can use the pool",
                   err=True)
        if host not in LOCAL_HOSTS:
            click.echo(f"warning: {host} is not a loopback address", err=True)
    auth = f"bearer token from ${token_env}" if token is not None else "no auth"
    click.echo(f"serving LoRA pool at http://{shown}:{actual} ({auth}; exports: "
               f"{', '.join(sorted(exports)) or 'none'}; Ctrl-C to stop)")
    click.echo(f"base: {pool.base_path} ({pool.info()['base']['model_type']}, rank {pool.rank})")
    for i, name in enumerate(pool.names):
        desc = f" - {pool.descriptions[name]}" if pool.descriptions[name] else ""
        click.echo(f"  [{i}] {name}{desc}")
    if hosted:
        click.echo(f"hosted tasks: {', '.join(hosted)}")
    sys.stdout.flush()
    server = uvicorn.Server(uvicorn_config(app, access_log=not quiet, log_level="warning" if quiet else "info"))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        pool.close()


COMMANDS = [serve_pool]
