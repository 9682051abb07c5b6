"""Quick ACKs are armed on every read while a client logs in, and never after (see bastion/transport/quickack.py).

A real asyncssh server with public-key login on loopback, a real asyncssh client; `arm` is wrapped to record
what state the connection was in at each call. The latency it saves is measured in the benchmark, not here.
"""

from __future__ import annotations

import asyncio
import socket

import asyncssh
import pytest

from bastion import transport
from bastion.config import load_config
from bastion.transport import quickack

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_QUICKACK"), reason="TCP_QUICKACK is Linux-only")


class _Server(asyncssh.SSHServer):
    def __init__(self, key, conns, in_place):
        self._key, self._conns, self._in_place = key, conns, in_place

    def connection_made(self, conn):
        self._conns.append(conn)
        if self._in_place:  # as bastion's connections read, with the fast path on
            assert transport.receive_in_place(conn)

    def begin_auth(self, username):
        return True

    def public_key_auth_supported(self):
        return True

    def validate_public_key(self, username, key):
        return key == self._key.convert_to_public()


async def _login_and_echo(calls, in_place=False):
    client_key = asyncssh.generate_private_key("ssh-ed25519")
    host_key = asyncssh.generate_private_key("ssh-ed25519")
    conns: list = []

    async def echo(process):
        process.stdout.write(await process.stdin.read(5))
        process.exit(0)

    server = await asyncssh.listen("127.0.0.1", 0, server_host_keys=[host_key], process_factory=echo,
                                   server_factory=lambda: _Server(client_key, conns, in_place))
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


@pytest.mark.parametrize("in_place", [False, True], ids=["data_received", "read in place"])
def test_armed_on_every_read_before_login_and_never_after(monkeypatch, tmp_path, in_place):
    calls: list[tuple[int, bool]] = []
    original_arm = quickack.arm

    def recording_arm(sock):
        calls.append((sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE), sock.getsockname()[1]))
        original_arm(sock)
        # the option really is set: getsockopt reports quick-ACK mode on right after arming
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK) == 1

    monkeypatch.setattr(quickack, "arm", recording_arm)
    assert quickack.apply()
    if in_place:  # the fast path if the switch (as the server reads it) is on and it can be installed
        status = transport.install(fast_path=load_config(home=tmp_path).fast_path)
        if not status.fast_path:
            pytest.skip(f"reading in place is the fast path's: {status.describe()}")
    server_port, calls_at_login = asyncio.run(_login_and_echo(calls, in_place))
    assert calls_at_login >= 4, calls  # version, kexinit, kex, newkeys, service request, auth...
    assert len(calls) == calls_at_login, "armed again after login"
    assert all(kind == socket.SOCK_STREAM and port == server_port for kind, port in calls), "not the server's socket"


def test_apply_twice_wraps_once():
    assert quickack.apply()
    wrapped = asyncssh.connection.SSHServerConnection.data_received
    assert quickack.apply()
    assert asyncssh.connection.SSHServerConnection.data_received is wrapped


def test_target_leg_acks_small_reads_of_the_handshake_only(monkeypatch):
    """A real TCP connection to a loopback 'target' through the relay's protocol: among the first
    HANDSHAKE_READS reads the small ones are ACKed at once, large ones are not, and later reads never are."""
    from bastion.gateway import relay as tunnel

    armed: list[int] = []
    monkeypatch.setattr(quickack, "arm", lambda sock: armed.append(sock.getsockname()[1]))
    burst = 1 << 20
    messages = tunnel.HANDSHAKE_READS + 8

    async def run() -> tuple[int, list[int], list[int]]:
        next_message = asyncio.Event()
        done = asyncio.Event()
        relay = tunnel.Tunnel(on_close=lambda _: None)

        async def target(reader, writer):
            writer.write(b"b" * burst)  # read in large pieces
            await writer.drain()
            for _ in range(messages):  # each its own read: the relay acknowledges before the next is sent
                await next_message.wait()
                next_message.clear()
                writer.write(b"m" * 100)
                await writer.drain()
            await done.wait()
            writer.close()

        server = await asyncio.start_server(target, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        transport, _ = await asyncio.get_running_loop().create_connection(
            lambda: tunnel._TargetProtocol(relay), "127.0.0.1", port)
        local_port = transport.get_extra_info("sockname")[1]
        sink = relay._chan = _Sink(burst, next_message, done, messages)  # stands in for the SSH channel
        transport.resume_reading()
        await asyncio.wait_for(done.wait(), 10)
        transport.close()
        server.close()
        await server.wait_closed()
        return local_port, armed, sink.reads

    local_port, armed_calls, reads = asyncio.run(run())
    first = reads[:tunnel.HANDSHAKE_READS]
    assert any(n >= tunnel.SMALL_READ for n in first), reads  # the burst came in large reads
    assert len(reads) > tunnel.HANDSHAKE_READS and all(n < tunnel.SMALL_READ for n in reads[-8:]), reads
    assert len(armed_calls) == sum(1 for n in first if n < tunnel.SMALL_READ), reads
    assert set(armed_calls) == {local_port}


class _Sink:
    """Counts what the relay writes; after the burst, asks the target for one message at a time."""

    def __init__(self, burst: int, next_message: asyncio.Event, done: asyncio.Event, messages: int):
        self.reads: list[int] = []
        self._burst, self._next, self._done, self._messages = burst, next_message, done, messages
        self._size = 0

    def write(self, data: bytes) -> None:
        self.reads.append(len(data))
        self._size += len(data)
        if self._size >= self._burst + 100 * self._messages:
            self._done.set()
        elif self._size >= self._burst:
            self._next.set()
