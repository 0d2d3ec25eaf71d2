"""A real two-node Ray cluster on loopback for tests, started the usual way (`ray start`), that
owns its processes: its own temp dirs, free ports, its own HOME (so its auth token is the
test's), every node started with `--block` in its own process group and stopped by that group
only (never `ray stop`: other Ray instances on the machine are not the test's)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, token: bool = True, cpus: int = 1, store_bytes: int = 80 * 2**20):
        # short paths: Ray's unix sockets live under the temp dir (108-byte limit)
        self.root = Path(tempfile.mkdtemp(prefix="evr-", dir="/tmp"))
        self.home = self.root / "home"
        self.home.mkdir()
        self.cpus, self.store_bytes = cpus, store_bytes
        self.env = dict(os.environ, HOME=str(self.home), OMP_NUM_THREADS="1",
                        RAY_USAGE_STATS_ENABLED="0")
        for k in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
            self.env.pop(k, None)
        if not token:
            self.env["RAY_AUTH_MODE"] = "disabled"
        self.tokened = token
        self.procs: list[subprocess.Popen] = []
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        if token:  # the documented way: a token in ~/.ray/auth_token before `ray start --head`
            subprocess.run([RAY, "get-auth-token", "--generate"], env=self.env, check=True,
                           capture_output=True, timeout=60)

    @property
    def token(self) -> str:
        return (self.home / ".ray" / "auth_token").read_text().strip()

    def __enter__(self) -> LocalCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self, args: list[str], name: str, env: dict | None = None) -> None:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen([RAY, "start", "--block", "--disable-usage-stats",
                              f"--num-cpus={self.cpus}", f"--object-store-memory={self.store_bytes}",
                              f"--dashboard-agent-listen-port={free_port()}",
                              "--node-ip-address=127.0.0.1", *args],  # loopback only
                             env=env or self.env, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs.append(p)

    def start_head(self) -> None:
        self._start(["--head", f"--port={self.port}", "--include-dashboard=false",
                     f"--dashboard-port={free_port()}", f"--ray-client-server-port={free_port()}",
                     f"--temp-dir={self.root / 'head'}", "--resources", json.dumps({"head": 1})],
                    "head")

    def add_node(self, resources: dict) -> None:
        # Ray's docs: RAY_AUTH_MODE=token on every node joining a token cluster (`ray start
        # --address` does not switch it on from ~/.ray/auth_token by itself)
        env = dict(self.env, RAY_AUTH_MODE="token") if self.tokened else self.env
        self._start([f"--address={self.address}", "--resources", json.dumps(resources)],
                    f"node{len(self.procs)}", env)

    def wait_nodes(self, n: int, timeout: float = 120) -> None:
        """Until the GCS lists n alive nodes (asked with the cluster's token)."""
        code = ("import ray,sys,time; ray.init(address=sys.argv[1], log_to_driver=False)\n"
                "end = time.monotonic() + float(sys.argv[3])\n"
                "while sum(x['Alive'] for x in ray.nodes()) < int(sys.argv[2]):\n"
                "    assert time.monotonic() < end, 'timeout'\n"
                "    time.sleep(0.5)\n")
        env = dict(self.env, RAY_AUTH_MODE="token") if self.tokened else self.env
        deadline = time.monotonic() + timeout
        while True:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"a ray start exited ({p.returncode}): {self.logs()}")
            r = subprocess.run([sys.executable, "-c", code, self.address, str(n), str(timeout)],
                               env=env, capture_output=True, text=True, timeout=timeout + 60)
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not up with {n} nodes: {r.stderr[-800:]} "
                                   f"{self.logs()}")
            time.sleep(1)

    def logs(self) -> str:
        return " | ".join(p.read_text()[-800:] for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        """SIGTERM each `ray start --block` (it stops its node), then SIGKILL what is left of
        each process group this cluster started."""
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.root, ignore_errors=True)

    def alive_group_members(self) -> list[int]:
        """PIDs still in any of this cluster's process groups (should be none after stop)."""
        pgids = {p.pid for p in self.procs}
        return [pid for pid, _, pgid, state, _ in processes() if pgid in pgids and state != "Z"]


def processes() -> list[tuple[int, int, int, str, str]]:
    """(pid, ppid, pgid, state, executable name) of every process, from /proc."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            exe = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace")
        except (OSError, IndexError):
            continue
        out.append((int(d.name), int(fields[1]), int(fields[2]), fields[0], os.path.basename(exe)))
    return out
