"""Where the Ray executor runs: a private local Ray, or a cluster the user names.

- No address: ``ray.init(address="local")``, a private instance inside this process, whatever
  the machine has running or recorded (``RAY_ADDRESS``, Ray's ``ray_current_cluster`` file).
  ``RAY_ADDRESS`` is ignored, and a note on stderr says so and how to follow it.
- ``auto`` (Ray's lookup: ``RAY_ADDRESS``, then the cluster ``ray start`` recorded on this
  machine) or ``host:port``: join it. Token authentication (Ray >= 2.52) the way Ray documents
  it: the token comes from ``RAY_AUTH_TOKEN``, else the file ``RAY_AUTH_TOKEN_PATH`` names,
  else ``~/.ray/auth_token``. When ``RAY_AUTH_MODE`` is unset, token mode is switched on when a
  token is available: from the environment for any address, from ``~/.ray/auth_token`` only for
  an address on this machine (never sent elsewhere unless ``RAY_AUTH_MODE=token``).
  ``RAY_AUTH_MODE=disabled`` never sends a token.
- Before ``ray.init`` a GCS probe (one gRPC call, seconds) turns the usual failures (nothing
  listening, token missing or wrong, not a Ray GCS) into one line naming the fix, instead of
  Ray's ~20-30 s retry loop and a ``ConnectionError`` traceback.
- ``ray://host:port`` (Ray Client) is passed to Ray as is.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from pathlib import Path

from ..errors import EvomergeError
from .executor import WorkersLostError

PROBE_TIMEOUT_S = 5.0


class RayConnectError(EvomergeError):
    """A Ray cluster cannot be joined (not running, token missing or rejected, bad address)."""


def start_local(object_store_bytes: int, num_cpus: int | None) -> None:
    """A private local Ray in this process (never a cluster found on the machine)."""
    import ray

    env_addr = os.environ.get("RAY_ADDRESS", "").strip()
    if env_addr:
        print(f"note: RAY_ADDRESS={env_addr} is set but not used: without --address evomerge "
              "starts a private local Ray; pass --address auto to join that cluster",
              file=sys.stderr)
    ray.init(address="local", include_dashboard=False, log_to_driver=False,
             object_store_memory=object_store_bytes, num_cpus=num_cpus)


def join(address: str) -> str:
    """Join the cluster at ``address`` (``auto``, ``host:port``, ``ray://...``); returns the
    GCS address joined. Raises :class:`RayConnectError` with one line on failure."""
    import ray

    address = address.strip()
    if address.startswith("ray://"):
        _init(address, address)
        return address
    gcs = resolve(address)
    token, source = _token_for(gcs)
    if token is not None and not os.environ.get("RAY_AUTH_MODE"):
        _enable_token_mode()
    probe(gcs, token, source)
    _init(gcs, address)
    return ray.get_runtime_context().gcs_address


def resolve(address: str) -> str:
    """``auto`` or ``host:port`` -> the GCS ``ip:port`` (one line when it cannot be found)."""
    from ray._private import services

    try:
        gcs = services.canonicalize_bootstrap_address(address)
    except ConnectionError as err:
        raise RayConnectError(
            f"--address {address}: no running Ray cluster found ({_first_line(err)}); start one "
            "with `ray start --head --port PORT` and pass --address 127.0.0.1:PORT, or leave out "
            "--address to run on a private local Ray") from None
    except (ValueError, OSError) as err:
        raise RayConnectError(f"--address {address}: not a Ray address "
                              f"(host:port, auto or ray://host:port): {_first_line(err)}") from None
    if gcs is None:
        raise RayConnectError(f"--address {address}: not a Ray cluster address "
                              "(leave out --address for a private local Ray)")
    return gcs


def default_token_path() -> Path:
    return Path.home() / ".ray" / "auth_token"


def _token_for(gcs: str) -> tuple[str | None, str]:
    """(token or None, where it came from), by Ray's precedence."""
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode and mode != "token":
        return None, f"RAY_AUTH_MODE={mode}"
    env_tok = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if env_tok:
        return env_tok, "RAY_AUTH_TOKEN"
    path = os.environ.get("RAY_AUTH_TOKEN_PATH", "").strip()
    if path:
        try:
            tok = Path(path).read_text().strip()
        except OSError as err:
            raise RayConnectError(f"RAY_AUTH_TOKEN_PATH={path}: cannot read the token file "
                                  f"({err.strerror or err})") from None
        if not tok:
            raise RayConnectError(f"RAY_AUTH_TOKEN_PATH={path}: the token file is empty")
        return tok, f"RAY_AUTH_TOKEN_PATH={path}"
    default = default_token_path()
    if default.is_file():
        if mode == "token" or is_this_machine(gcs.rsplit(":", 1)[0]):
            tok = default.read_text().strip()
            if tok:
                return tok, str(default)
        else:
            return None, (f"{default} is sent only to an address on this machine unless "
                          "RAY_AUTH_MODE=token")
    return None, "none found: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH unset, no ~/.ray/auth_token"


def is_this_machine(host: str) -> bool:
    """True when ``host`` is a loopback address or one of this machine's own addresses."""
    host = host.strip("[]")
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    for family, _, _, _, sockaddr in infos:
        ip = sockaddr[0]
        if ip.startswith("127.") or ip == "::1":
            return True
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((ip, 0))  # binds only to an address of a local interface
            return True
        except OSError:
            continue
    return False


def _enable_token_mode() -> None:
    """RAY_AUTH_MODE=token for this process (and Ray's cached config), as Ray does itself for
    ``address="auto"`` when a token is available."""
    os.environ["RAY_AUTH_MODE"] = "token"
    try:
        from ray._raylet import AuthenticationTokenLoader, Config

        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
    except (ImportError, AttributeError):  # a Ray without token auth: nothing to refresh
        pass


def probe(gcs: str, token: str | None, source: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """One authenticated gRPC call to the GCS at ``gcs``; one line naming the fix on failure."""
    import grpc

    try:
        from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
    except ImportError:  # layout of another Ray version: let ray.init report
        return
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    channel = grpc.insecure_channel(gcs)
    try:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout,
                          metadata=metadata)
    except grpc.RpcError as err:
        code = err.code()
        detail = _first_line(err.details() or code.name)
        if code == grpc.StatusCode.UNAUTHENTICATED:
            if token is None:
                raise RayConnectError(
                    f"the Ray cluster at {gcs} requires its auth token ({source}): run "
                    "`ray get-auth-token` on its head node and set RAY_AUTH_TOKEN to it (or "
                    "RAY_AUTH_TOKEN_PATH to a file holding it)") from None
            raise RayConnectError(
                f"the Ray cluster at {gcs} rejected the token from {source}: set RAY_AUTH_TOKEN "
                "to the cluster's own token (`ray get-auth-token` on its head node prints it)"
            ) from None
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            raise RayConnectError(
                f"no Ray cluster answers at {gcs} ({detail}): start one with `ray start --head "
                "--port PORT`, check the address, or leave out --address to run on a private "
                "local Ray") from None
        raise RayConnectError(f"{gcs} does not answer like a Ray cluster's GCS "
                              f"({code.name}: {detail})") from None
    finally:
        channel.close()


def _init(target: str, given: str) -> None:
    import ray

    try:
        ray.init(address=target, include_dashboard=False, log_to_driver=False,
                 ignore_reinit_error=True)
    except Exception as err:  # noqa: BLE001 - Ray raises many types; one line for all
        raise RayConnectError(f"could not join the Ray cluster at {given}: "
                              f"{type(err).__name__}: {_first_line(err)}") from None


def _first_line(err: BaseException | str) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


class RayNodeLostError(WorkersLostError):
    """The Ray node under the driver died, or the cluster stopped answering."""


class NodeWatch:
    """Notices the local Ray node dying under the driver, which Ray itself does not report: the
    driver's ``ray.wait`` then just never returns a result. Two probes: the raylet process when
    this process started it (instant), and the GCS's view of this driver's node every
    ``interval_s`` (a node the GCS marks dead, or a GCS that does not answer in ``timeout_s``).
    """

    def __init__(self, interval_s: float = 5.0, timeout_s: float = 15.0):
        import ray

        self.interval_s, self.timeout_s = interval_s, timeout_s
        self.node_id = ray.get_runtime_context().get_node_id()
        node = getattr(ray._private.worker, "_global_node", None)
        procs = getattr(node, "all_processes", None) or {}
        self.raylets = [info.process for info in procs.get("raylet", [])
                        if getattr(info, "process", None) is not None]
        self._last = time.monotonic()
        self.lost: str | None = None

    def check(self) -> None:
        """Raise :class:`RayNodeLostError` (one line) when the node is gone."""
        for proc in self.raylets:
            code = proc.poll()
            if code is not None:
                self._fail(f"the local Ray node died under the driver (its raylet exited with "
                           f"code {code})")
        if time.monotonic() - self._last < self.interval_s:
            return
        self._last = time.monotonic()
        box: dict[str, object] = {}

        def ask() -> None:
            import ray

            try:
                box["nodes"] = ray.nodes()
            except Exception as err:  # noqa: BLE001 - reported below as one line
                box["error"] = err

        t = threading.Thread(target=ask, daemon=True)
        t.start()
        t.join(self.timeout_s)
        if t.is_alive():
            self._fail(f"the Ray cluster stopped answering (no reply from its GCS in "
                       f"{self.timeout_s:.0f} s)")
        if "error" in box:
            self._fail(f"the Ray cluster stopped answering ({_first_line(box['error'])})")
        mine = [n for n in box.get("nodes", []) if n.get("NodeID") == self.node_id]
        if mine and not mine[0].get("Alive", True):
            self._fail("the Ray node under the driver died (the cluster marked it dead)")

    def _fail(self, message: str) -> None:
        self.lost = message
        raise RayNodeLostError(message)
