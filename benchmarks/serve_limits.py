"""`evomerge serve` under oversize requests: answer time and the server's peak memory.

Starts `evomerge serve` as a separate process on 127.0.0.1 over a tiny random checkpoint
(tests/tiny_models.py), records its resident memory (VmRSS) idle, then sends a 20 MB body,
a 2 MB prompt that fits the body limit, a 2 MB chat message and a normal request, and prints
per request the status, the seconds to the answer and the server's peak memory (VmHWM).
Before the limits (issue 12) a 2 MB prompt took the server from 0.41 to 1.25 GB and a 20 MB
one past 6.4 GB with no answer.

    .venv/bin/python benchmarks/serve_limits.py
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))


def _mem(pid: int, key: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _post(port: int, path: str, body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    try:
        conn.putrequest("POST", path)
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        try:
            for i in range(0, len(body), 1 << 16):
                conn.send(body[i:i + (1 << 16)])
        except (BrokenPipeError, ConnectionResetError):
            pass
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def main() -> None:
    import tiny_models

    tmp = Path(tempfile.mkdtemp(prefix="serve-limits-"))
    model = tiny_models.make_tiny_llama(tmp / "tiny", seed=3, hidden=32, vocab=40)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "serve", str(model), "--port", "0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        url = proc.stdout.readline().split(" at ", 1)[1].split()[0]
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        print(f"server idle: {_mem(proc.pid, 'VmRSS'):.0f} MB resident")
        cases = [
            ("20 MB prompt (body over the limit)", "/v1/completions", {"prompt": "a" * (20 << 20)}),
            ("2 MB prompt (body fits)", "/v1/completions", {"prompt": "ab" * (1 << 20)}),
            ("2 MB chat message", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * (2 << 20)}]}),
            ("normal prompt, 8 tokens", "/v1/completions", {"prompt": "hello", "max_tokens": 8}),
        ]
        for label, path, body in cases:
            t0 = time.perf_counter()
            status = _post(port, path, json.dumps(body).encode())
            print(f"{label:38s} HTTP {status}  {time.perf_counter() - t0:6.3f} s  "
                  f"peak {_mem(proc.pid, 'VmHWM'):.0f} MB")
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average: {os.getloadavg()[0]:.2f} (1 min)")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    main()
