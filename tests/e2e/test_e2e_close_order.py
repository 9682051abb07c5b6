"""Scenarios: both close orders of a tunnel, repeated, because the bad ones hang only some of the time.

Reference: through a plain OpenSSH sshd as jump host, `ssh -W` to a target that writes and closes exits at once
with the whole payload, whether or not the client's stdin is still open. The bastion must do the same
(compare ronf/asyncssh#471, where the built-in forwarder left ProxyJump hanging about 1 run in 5).
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess

import pytest

from testbed import CLOSE_FIRST_PAYLOAD, CLOSE_FIRST_PORT, ECHO_PORT, LAN_ADDR, free_port, recv_all

pytestmark = [pytest.mark.netns, pytest.mark.both_paths]  # tunnels: on the fast path and asyncssh as shipped (.ci/run)

RUNS = 20
TIMEOUT = 10


def digest(data: bytes) -> str:
    return f"{len(data)} bytes, sha256 {hashlib.sha256(data).hexdigest()[:16]}"


def stdio_forward_keeping_stdin_open(ssh, host: str, port: int) -> tuple[int | None, bytes, bytes]:
    """`ssh -W` whose stdin stays open until ssh has exited, so only the target can start the close."""
    read_end, write_end = os.pipe()
    try:
        proc = ssh.popen("-W", f"{host}:{port}", "bastion", stdin=read_end)
        os.close(read_end)
        try:
            out, err = proc.communicate(timeout=TIMEOUT)
            return proc.returncode, out, err
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            return None, out, err
    finally:
        os.close(write_end)


def test_target_closes_first_every_run_exits_with_full_payload(bastion, ssh):
    failures = []
    expected = digest(CLOSE_FIRST_PAYLOAD)
    for run in range(RUNS):
        # odd runs: stdin open (only the target closes); even runs: stdin at EOF too (the two EOFs race)
        if run % 2:
            code, out, err = stdio_forward_keeping_stdin_open(ssh, LAN_ADDR, CLOSE_FIRST_PORT)
        else:
            try:
                result = ssh.stdio_forward(LAN_ADDR, CLOSE_FIRST_PORT, timeout=TIMEOUT)
                code, out, err = result.returncode, result.stdout, result.stderr
            except subprocess.TimeoutExpired as exc:
                code, out, err = None, exc.stdout or b"", exc.stderr or b""
        if code != 0 or out != CLOSE_FIRST_PAYLOAD:
            state = "hung (killed after timeout)" if code is None else f"exit {code}"
            stdin = "open" if run % 2 else "EOF"
            failures.append(f"run {run + 1} (stdin {stdin}): {state}, got {digest(out)}, "
                            f"stderr {err.decode(errors='replace').strip()!r}")
    assert not failures, f"expected exit 0 and {expected} every run; {len(failures)}/{RUNS} failed:\n  " + \
        "\n  ".join(failures)

    rows = bastion.wait_audit("channels", lambda rows: len(rows) == RUNS and all(r["closed_at"] for r in rows),
                              f"{RUNS} closed channels")
    assert all(r["bytes_down"] == len(CLOSE_FIRST_PAYLOAD) for r in rows), [r["bytes_down"] for r in rows]


def test_client_half_closes_first_with_stdio_forward(bastion, ssh):
    # the client sends and then EOF; the echo target answers, sees EOF and closes
    message = b"client closes first\n" * 500
    for _ in range(5):
        result = ssh.stdio_forward(LAN_ADDR, ECHO_PORT, input=message, timeout=TIMEOUT)
        assert result.returncode == 0, result.stderr.decode(errors="replace")
        assert result.stdout == message
    bastion.wait_audit("channels", lambda rows: len(rows) == 5 and all(r["closed_at"] for r in rows),
                       "5 closed channels")


def test_client_socket_close_closes_the_channel_while_the_session_lives(testbed, bastion, ssh):
    # 1. ssh -L stays up; one forwarded connection is used and then closed by the client
    port = free_port(testbed.gw)
    with ssh.forward("-L", f"127.0.0.1:{port}:{LAN_ADDR}:{ECHO_PORT}", port):
        sock = testbed.connect(testbed.gw, ("127.0.0.1", port))
        sock.sendall(b"hello")
        assert sock.recv(5) == b"hello"
        sock.close()

        # 2. the channel is closed in the audit while the session is still open
        rows = bastion.wait_audit("channels", lambda rows: len(rows) == 1 and rows[0]["closed_at"],
                                  "the forwarded channel closed")
        assert rows[0]["bytes_up"] == rows[0]["bytes_down"] == 5, rows
        sessions = bastion.audit("sessions")
        assert [s["ended_at"] for s in sessions] == [None], sessions

    # 3. ssh went away: the session ends too
    bastion.wait_audit("sessions", lambda rows: rows and rows[0]["ended_at"], "session end")


def test_client_killed_with_tunnel_open_leaves_nothing_open(testbed, bastion, ssh):
    # 1. a tunnel with data in flight, then the client dies without a word (SIGKILL)
    port = free_port(testbed.gw)
    with ssh.forward("-L", f"127.0.0.1:{port}:{LAN_ADDR}:{ECHO_PORT}", port) as proc:
        with testbed.connect(testbed.gw, ("127.0.0.1", port)) as sock:
            sock.sendall(b"x" * 1000)
            assert len(sock.recv(1000)) > 0
            bastion.wait_audit("channels", lambda rows: len(rows) == 1, "channel opened")
            proc.send_signal(signal.SIGKILL)
            proc.wait(TIMEOUT)
            sock.settimeout(TIMEOUT)
            recv_all_ignoring_reset(sock)

    # 2. the bastion notices the dead TCP connection and closes the channel and the session
    bastion.wait_audit("channels", lambda rows: rows[0]["closed_at"], "channel closed after client death")
    sessions = bastion.wait_audit("sessions", lambda rows: rows and rows[0]["ended_at"], "session end")
    assert sessions[0]["end_reason"] != "crash", sessions


def recv_all_ignoring_reset(sock: socket.socket) -> bytes:
    try:
        return recv_all(sock)
    except ConnectionResetError:
        return b""
