"""`evomerge serve MODEL_DIR`: an OpenAI-compatible API over a local checkpoint.

Try an exported merge with any OpenAI client, or score it with the ``api`` fitness backend.
The server itself lives in :mod:`evomerge.serve.server`.
"""

from __future__ import annotations

import logging
import sys

import click

from ..errors import ConfigError


@click.command()
@click.argument("model_dir", type=click.Path(file_okay=False), required=False)
@click.option("--ensemble", "ensemble", type=click.Path(exists=True), default=None,
              help="Serve an ensemble recipe (ensemble.yaml exported from an output_mixture run) instead of MODEL_DIR.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", type=int, default=8000, show_default=True, help="Port (0: any free port).")
@click.option("--api-key-env", default=None, metavar="NAME",
              help="Require 'Authorization: Bearer <key>' with the key from environment variable NAME "
                   "(needed when --host is not loopback).")
@click.option("--no-auth", is_flag=True, help="Serve a non-loopback --host without a key (explicit opt-out).")
@click.option("--max-body-bytes", type=click.IntRange(min=1024), default=8 << 20, show_default=True,
              help="Largest request body; bigger ones get 413 before being read.")
@click.option("--max-prompt-chars", type=click.IntRange(min=1), default=None,
              help="Longest prompt in characters, refused before tokenizing (default: 16 per position).")
@click.option("--model-name", default=None, help="Model id clients send (default: the directory name).")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: CUDA when present).")
@click.option("--dtype", default=None, help="float32, bfloat16, float16 (default: float32 on CPU).")
@click.option("--batch-size", type=int, default=16, show_default=True,
              help="Prompts generated together within one request.")
@click.option("--threads", type=int, default=None, help="torch CPU threads.")
@click.option("--max-logprobs", type=int, default=5, show_default=True,
              help="Most top alternatives a request may ask for (raise it to mix whole distributions).")
@click.option("--logprobs-eos", is_flag=True,
              help="List the EOS token that ended a completion in its logprobs (exact output-level mixtures).")
@click.option("--quiet", is_flag=True, help="No access log.")
def serve(model_dir, ensemble, host, port, api_key_env, no_auth, max_body_bytes, max_prompt_chars, model_name,
          device, dtype, batch_size, threads, max_logprobs, logprobs_eos, quiet):
    """Serve MODEL_DIR (an HF checkpoint, zoo:NAME or a Hub id org/name[@rev]) with /v1/completions, /v1/chat/completions, /v1/models.

    With --ensemble ENSEMBLE.yaml, serve the greedy answers of a mixture of OpenAI-compatible
    endpoints instead (keys of the endpoints are read from the variables the file names)."""
    from ..serve import make_server

    if not 0 <= port <= 65535:
        raise ConfigError(f"--port: must be 0..65535, got {port}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size: must be >= 1, got {batch_size}")
    if (model_dir is None) == (ensemble is None):
        raise ConfigError("give either MODEL_DIR or --ensemble ENSEMBLE.yaml (exactly one)")
    if max_logprobs < 0:
        raise ConfigError(f"--max-logprobs: must be >= 0, got {max_logprobs}")
    if threads is not None:
        import torch

        torch.set_num_threads(max(1, threads))
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s",
                        stream=sys.stderr)
    if ensemble is not None:
        from ..serve.ensemble import make_ensemble_server

        server = make_ensemble_server(ensemble, host, port, api_key_env=api_key_env, model_name=model_name,
                                      no_auth=no_auth)
    else:
        from ..checkpoint.resolve import resolve_model_dir

        model_dir = resolve_model_dir(model_dir)  # a directory, zoo:NAME or a Hub id org/name[@rev]
        server = make_server(model_dir, host, port, api_key_env=api_key_env, no_auth=no_auth,
                             model_name=model_name, device=device, dtype=dtype, batch_size=batch_size,
                             max_logprobs=max_logprobs, logprobs_eos=logprobs_eos, max_body=max_body_bytes,
                             max_prompt_chars=max_prompt_chars)
    if api_key_env is None and no_auth:
        click.echo(f"warning: serving on {host} WITHOUT a key (--no-auth): anyone who can reach the port "
                   "can use the model", err=True)
    auth = f", key from ${api_key_env}" if api_key_env else ""
    click.echo(f"serving {server.service.name} at {server.url} (Ctrl-C to stop{auth})", err=False)
    sys.stdout.flush()
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.service.close()


COMMANDS = [serve]
