"""Quick ACKs are armed on every read while a client logs in, and never after (see bastion/quickack.py).

A real asyncssh server with public-key login on loopback, a real asyncssh client; `arm` is wrapped to record
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
    original_arm = quickack.arm

    def recording_arm(sock):
        calls.append((sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE), sock.getsockname()[1]))
        original_arm(sock)
        # the option really is set: getsockopt reports quick-ACK mode on right after arming
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1

    monkeypatch.setattr(quickack, "arm", recording_arm)
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


def test_target_leg_acks_small_reads_at_once_and_leaves_bulk_alone(monkeypatch):
    """A real TCP connection to a loopback 'target' through the relay's protocol: a 100-byte message is
    ACKed at once; of a 1 MiB burst only the reads shorter than SMALL_READ are."""
    from bastion import tunnel

    armed: list[int] = []
    monkeypatch.setattr(quickack, "arm", lambda sock: armed.append(sock.getsockname()[1]))

    async def run() -> tuple[list[int], int, list[int]]:
        sent = asyncio.Event()
        got_all = asyncio.Event()
        relay = tunnel.Tunnel(on_close=lambda _: None)

        async def target(reader, writer):
            writer.write(b"m" * 100)
            await writer.drain()
            await sent.wait()
            writer.write(b"b" * (1 << 20))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(target, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await asyncio.get_running_loop().create_connection(
            lambda: tunnel._TargetProtocol(relay), "127.0.0.1", port)
        local_port = transport.get_extra_info("sockname")[1]
        sink = relay._chan = _Sink(got_all)  # stands in for the SSH channel: the relay writes into it
        transport.resume_reading()
        while relay.bytes_down < 100:
            await asyncio.sleep(0.01)
        small_reads_armed = len(armed)
        sent.set()
        await asyncio.wait_for(got_all.wait(), 10)
        transport.close()
        server.close()
        await server.wait_closed()
        assert set(armed) == {local_port}
        return armed, small_reads_armed, sink.reads

    armed_calls, after_message, reads = asyncio.run(run())
    assert after_message == 1
    assert any(n >= tunnel.SMALL_READ for n in reads)
    assert len(armed_calls) == sum(1 for n in reads if n < tunnel.SMALL_READ), reads


class _Sink:
    def __init__(self, done: asyncio.Event):
        self.size, self._done, self.reads = 0, done, []

    def write(self, data: bytes) -> None:
        self.reads.append(len(data))
        self.size += len(data)
        if self.size >= 100 + (1 << 20):
            self._done.set()
