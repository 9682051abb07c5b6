"""Remote forwarding (ssh -R) under policy: granted listeners relay back to the client, port 0, refusals,
conflicts, cancel, and listeners closing with their session; each audited."""

from __future__ import annotations

import re
import socket
import threading
import time

import pytest

from testbed import DEFAULT_POLICY, kill_group, netns_connect, netns_socket, stop_process, wait_until

pytestmark = pytest.mark.netns

LISTEN_POLICY = DEFAULT_POLICY + 'listen = ["127.0.0.1:9000-9009"]\n'


@pytest.fixture
def local_service(testbed):
    """An echo server on 127.0.0.1 in gw: the service on alice's machine that -R exposes."""
    server = netns_socket(testbed.gw)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    stop = threading.Event()

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1]
    stop.set()
    server.close()


def echo_through(testbed, port: int, payload: bytes = b"ping through -R\n") -> bytes:
    with netns_connect(testbed.gw, ("127.0.0.1", port)) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def listening(testbed, port: int) -> bool:
    try:
        netns_connect(testbed.gw, ("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def remote_forward(ssh, spec: str):
    return ssh.popen("-N", "-o", "ExitOnForwardFailure=yes", "-R", spec, "bastion")


def test_granted_remote_forward_relays_and_is_audited(bastion, ssh, testbed, local_service):
    bastion.apply_policy(LISTEN_POLICY)
    proc = remote_forward(ssh, f"9000:127.0.0.1:{local_service}")
    try:
        wait_until(lambda: listening(testbed, 9000), 10, "bastion listening on 127.0.0.1:9000")
        assert echo_through(testbed, 9000, b"x" * 100_000) == b"x" * 100_000
        listeners = bastion.wait_audit("listeners", lambda rows: rows, "listener row")
        assert listeners[0]["decision"] == "allow" and listeners[0]["listen_port"] == 9000
        assert listeners[0]["rule"] == "users.alice.listen: 127.0.0.1:9000-9009"
        # (the readiness probes above were inbound connections too; the payload's is the one that moved 100 kB)
        channels = bastion.wait_audit(
            "channels", lambda rows: any(r["kind"] == "forwarded-tcpip" and r["bytes_up"] == 100_000 for r in rows),
            "forwarded-tcpip channel closed with its byte counts",
        )
        [inbound] = [r for r in channels if r["kind"] == "forwarded-tcpip" and r["bytes_up"] == 100_000]
        assert inbound["peer_ip"] == "127.0.0.1" and inbound["listener_id"] == listeners[0]["id"]
        assert inbound["bytes_down"] == 100_000 and inbound["closed_at"]
    finally:
        stop_process(proc)
        kill_group(proc)
    # the listener goes with its session
    wait_until(lambda: not listening(testbed, 9000), 10, "port 9000 closed after the session ended")
    bastion.wait_audit("listeners", lambda rows: rows[0]["closed_at"], "listener row closed")


def test_port_zero_picks_a_granted_port_and_tells_the_client(bastion, ssh, testbed, local_service):
    bastion.apply_policy(LISTEN_POLICY)
    proc = remote_forward(ssh, f"0:127.0.0.1:{local_service}")
    try:
        line = b""
        deadline = time.monotonic() + 10
        while b"Allocated port" not in line and time.monotonic() < deadline:
            line = proc.stderr.readline()
        match = re.search(rb"Allocated port (\d+)", line)
        assert match, f"ssh did not report an allocated port: {line!r}"
        port = int(match.group(1))
        assert 9000 <= port <= 9009
        wait_until(lambda: listening(testbed, port), 10, f"listening on {port}")
        assert echo_through(testbed, port) == b"ping through -R\n"
    finally:
        stop_process(proc)
        kill_group(proc)


@pytest.mark.parametrize("spec", ["9999:127.0.0.1:{port}", "0.0.0.0:9001:127.0.0.1:{port}"])
def test_refused_remote_forward_fails_the_client_and_is_audited(bastion, ssh, testbed, local_service, spec):
    bastion.apply_policy(LISTEN_POLICY)
    result = ssh.run("-N", "-o", "ExitOnForwardFailure=yes", "-R", spec.format(port=local_service), "bastion",
                     timeout=15)
    assert result.returncode != 0
    assert b"remote port forwarding failed" in result.stderr
    rows = bastion.wait_audit("listeners", lambda rows: rows, "listener refusal row")
    assert rows[0]["decision"] == "deny" and "may not listen" in rows[0]["reason"]


def test_nothing_is_granted_by_default(bastion, ssh, local_service):
    result = ssh.run("-N", "-o", "ExitOnForwardFailure=yes", "-R", f"9000:127.0.0.1:{local_service}", "bastion")
    assert result.returncode != 0 and b"remote port forwarding failed" in result.stderr


def test_second_session_cannot_take_a_held_port(bastion, ssh, testbed, local_service):
    bastion.apply_policy(LISTEN_POLICY)
    first = remote_forward(ssh, f"9000:127.0.0.1:{local_service}")
    try:
        wait_until(lambda: listening(testbed, 9000), 10, "first listener")
        second = ssh.run("-N", "-o", "ExitOnForwardFailure=yes", "-R", f"9000:127.0.0.1:{local_service}",
                         "bastion", timeout=15)
        assert second.returncode != 0 and b"remote port forwarding failed" in second.stderr
        assert echo_through(testbed, 9000) == b"ping through -R\n"  # the first keeps it
        rows = bastion.wait_audit("listeners", lambda rows: len(rows) == 2, "both listener rows")
        assert rows[1]["decision"] == "deny" and "already in use" in rows[1]["reason"]
    finally:
        stop_process(first)
        kill_group(first)


def test_cancel_closes_the_listener_paramiko(bastion, testbed, keys, local_service):
    """paramiko as the second client: tcpip-forward then cancel-tcpip-forward."""
    from testbed import paramiko_connect

    bastion.apply_policy(LISTEN_POLICY)
    client = paramiko_connect(testbed, bastion, "alice", keys["alice"])
    try:
        transport = client.get_transport()
        port = transport.request_port_forward("localhost", 0)
        assert 9000 <= port <= 9009
        wait_until(lambda: listening(testbed, port), 10, "paramiko listener")
        # the probe that found the listener was an inbound connection: take its channel before cancelling,
        # or it may arrive after the cancel, when paramiko has no handler left for it (and fails the transport)
        probe = transport.accept(10)
        assert probe is not None, "the probe's connection was not forwarded to the client"
        probe.close()
        transport.cancel_port_forward("localhost", port)
        wait_until(lambda: not listening(testbed, port), 10, "listener closed after cancel")
        rows = bastion.wait_audit("listeners", lambda rows: rows and rows[0]["closed_at"], "listener closed row")
        assert rows[0]["close_reason"] == "cancelled by client"
        assert transport.is_active()  # the session itself goes on
    finally:
        client.close()


def test_sessions_kill_audits_the_listener_as_killed(bastion, ssh, testbed, local_service):
    """#20: a listener closed by `bastion sessions kill` says killed, not "cancelled by client"."""
    bastion.apply_policy(LISTEN_POLICY)
    proc = remote_forward(ssh, f"9000:127.0.0.1:{local_service}")
    try:
        wait_until(lambda: listening(testbed, 9000), 10, "bastion listening on 127.0.0.1:9000")
        [session] = bastion.wait_audit("sessions", lambda rows: rows, "the session row")
        bastion.cli("sessions", "kill", session["id"])
        rows = bastion.wait_audit("listeners", lambda rows: rows[0]["closed_at"], "listener row closed")
        assert rows[0]["close_reason"].startswith("killed by "), rows[0]
    finally:
        stop_process(proc)
        kill_group(proc)


def test_client_leaving_audits_the_listener_as_session_ended(bastion, ssh, testbed, local_service):
    """#20: a listener that closes because its client went away says the session ended; only the client's own
    cancel-tcpip-forward (test_cancel_closes_the_listener_paramiko) is "cancelled by client"."""
    bastion.apply_policy(LISTEN_POLICY)
    proc = remote_forward(ssh, f"9000:127.0.0.1:{local_service}")
    try:
        wait_until(lambda: listening(testbed, 9000), 10, "bastion listening on 127.0.0.1:9000")
    finally:
        stop_process(proc)  # the client ends its session; it never cancels the forward
        kill_group(proc)
    rows = bastion.wait_audit("listeners", lambda rows: rows[0]["closed_at"], "listener row closed")
    assert rows[0]["close_reason"] == "session ended", rows[0]
