"""Quick ACKs are armed on every read while a client logs in, and never after (see bastion/quickack.py).

A real asyncssh server with public-key login on loopback, a real asyncssh client; `_arm` is wrapped to record
what state the connection was in at each call. The latency it saves is measured in the benchmark, not here.
"""

from __future__ import annotations

import asyncio
import socket

import asyncssh
import pytest

from bastion import quickack

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux-only")


class _Server(asyncssh.SSHServer):
    def __init__(self, key, conns):
        self._key, self._conns = key, conns

    def connection_made(self, conn):
        self._conns.append(conn)

    def begin_auth(self, username):
        return True

    def public_key_auth_supported(self):
        return True

    def validate_public_key(self, username, key):
        return key == self._key.convert_to_public()


async def _login_and_echo(calls):
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    conns: list = []

    async def echo(process):
        process.stdout.write(await process.stdin.read(5))
        process.exit(0)

    server = await asyncssh.listen("127.0.0.1", 0, server_host_keys=[host_key], process_factory=echo,
                                   server_factory=lambda: _Server(client_key, conns))
    port = server.sockets[0].getsockname()[1]
    try:
        async with asyncssh.connect("127.0.0.1", port, username="u", client_keys=[client_key],
                                    known_hosts=None) as client:
            calls_at_login = len(calls)
            for _ in range(3):  # traffic after login must not arm it again
                result = await client.run("x", input="hello")
                assert result.stdout == "hello"
            return conns[0].get_extra_info("sockname")[1], calls_at_login
    finally:
        server.close()
        await server.wait_closed()


def test_armed_on_every_read_before_login_and_never_after(monkeypatch):
    calls: list[tuple[int, bool]] = []
    original_arm = quickack._arm

    def recording_arm(sock):
        calls.append((sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE), sock.getsockname()[1]))
        original_arm(sock)
        # the option really is set: getsockopt reports quick-ACK mode on right after arming
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1

    monkeypatch.setattr(quickack, "_arm", recording_arm)
    assert quickack.apply()
    server_port, calls_at_login = asyncio.run(_login_and_echo(calls))
    assert calls_at_login >= 4, calls  # version, kexinit, kex, newkeys, service request, auth...
    assert len(calls) == calls_at_login, "armed again after login"
    assert all(kind == socket.SOCK_STREAM and port == server_port for kind, port in calls), "not the server's socket"


def test_apply_twice_wraps_once():
    assert quickack.apply()
    wrapped = asyncssh.connection.SSHServerConnection.data_received
    assert quickack.apply()
    assert asyncssh.connection.SSHServerConnection.data_received is wrapped
