"""A TCP connection reset before the server accepted it has no peer address (uvloop's getpeername fails with
ENOTCONN). There is nobody to serve, audit or penalize: it must not be taken for a client at 0.0.0.0, whose
repeated "failures" once wrote penalty rows for 0.0.0.0 (seen behind HAProxy, whose checks reset at once)."""

from __future__ import annotations

import json
import signal
import socket
import time

from tests.integration.test_serve_loopback import bastion, home, start_serve  # noqa: F401 (fixtures)

RESETS = 80


def test_connections_reset_before_accept_leave_no_trace(home):
    config = home / "config.toml"
    config.write_text(config.read_text() + "\n")  # the server's defaults: uvloop, penalties on
    proc, port = start_serve(home)
    try:
        proc.send_signal(signal.SIGSTOP)  # the kernel completes the handshakes; the server accepts them later
        for _ in range(RESETS):
            sock = socket.create_connection(("127.0.0.1", port), timeout=5)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()  # RST before the accept
        proc.send_signal(signal.SIGCONT)
        time.sleep(2)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:  # and it still serves
            assert sock.recv(64).startswith(b"SSH-2.0-")
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    rows = json.loads(bastion(home, "audit", "auth", "--json").stdout)
    assert [row for row in rows if row["client_ip"] == "0.0.0.0"] == []
