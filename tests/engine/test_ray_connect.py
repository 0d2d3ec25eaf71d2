"""Joining a Ray cluster, without starting one: where the auth token comes from (Ray's
documented precedence), when it is sent, and the one-line errors of the GCS probe against real
loopback sockets (nothing listening; an HTTP server that is not a Ray GCS)."""

from __future__ import annotations

import http.server
import threading

import pytest
from ray_cluster import free_port

from evomerge.engine.ray_connect import RayConnectError, _token_for, is_this_machine, probe


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray/auth_token").write_text("filetoken\n")
    return tmp_path


def test_token_precedence_env_then_path_then_default_file(home, monkeypatch):
    assert _token_for("127.0.0.1:6379") == ("filetoken", str(home / ".ray/auth_token"))
    (home / "tok").write_text("pathtoken")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(home / "tok"))
    assert _token_for("127.0.0.1:6379")[0] == "pathtoken"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "envtoken")
    assert _token_for("10.1.2.3:6379") == ("envtoken", "RAY_AUTH_TOKEN")  # env: any address
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert _token_for("127.0.0.1:6379") == (None, "RAY_AUTH_MODE=disabled")


def test_default_token_file_goes_only_to_this_machine_unless_token_mode(home, monkeypatch):
    assert is_this_machine("127.0.0.1") and is_this_machine("localhost")
    assert not is_this_machine("203.0.113.9") and not is_this_machine("no-such-host.invalid")
    tok, why = _token_for("203.0.113.9:6379")  # TEST-NET-3: never this machine
    assert tok is None and "only to an address on this machine" in why
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert _token_for("203.0.113.9:6379")[0] == "filetoken"


def test_unreadable_or_empty_token_path_is_one_line(home, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(home / "missing"))
    with pytest.raises(RayConnectError, match="cannot read the token file"):
        _token_for("127.0.0.1:1")
    (home / "empty").write_text("\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(home / "empty"))
    with pytest.raises(RayConnectError, match="token file is empty"):
        _token_for("127.0.0.1:1")


def test_probe_nothing_listening_fails_fast_in_one_line():
    addr = f"127.0.0.1:{free_port()}"
    with pytest.raises(RayConnectError, match="no Ray cluster answers at") as err:
        probe(addr, None, "none")
    assert "ray start --head" in str(err.value) and "\n" not in str(err.value)


def test_probe_of_a_server_that_is_not_ray_names_it():
    server = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        with pytest.raises(RayConnectError) as err:
            probe(f"127.0.0.1:{server.server_port}", None, "none", timeout=5)
    finally:
        server.shutdown()
        server.server_close()
    msg = str(err.value)
    # gRPC reports a non-HTTP/2 peer as unavailable; the line says what it met
    assert "\n" not in msg and "no Ray cluster answers at" in msg and "HTTP/2" in msg, msg
