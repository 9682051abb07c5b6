"""bastion's relay (gateway/relay.py) on a real asyncssh server: what one read of the SSH connection brings for the
target goes out in one write, in order, and the client's EOF follows the last byte.

The server runs in a background loop on loopback and hands each direct-tcpip channel to a `Tunnel` connected to
a sink that hashes what it gets until EOF; the client is asyncssh. It runs on the path the switch asks for, read
as the server reads it (BASTION_FAST_PATH): the fast path, or asyncssh as shipped (.ci/run's second run); one
write per read is the fast path's (after_read), everything else holds on both.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import random
import socket
import threading

import asyncssh
import pytest

from bastion import transport
from bastion.config import load_config
from bastion.gateway import relay as tunnel
from bastion.gateway.relay import Tunnel, connect_target
from bastion.transport import in_place

# Not periodic: data overwritten by later data at the same place in a reused buffer must not look the same.
UP = random.Random(1).randbytes(6 * 1024 * 1024)
DOWN = random.Random(2).randbytes(6 * 1024 * 1024)
PACKETS = len(UP) // 32768  # channel-data packets it takes at asyncssh's default packet size


@pytest.fixture(scope="module", autouse=True)
def transport_path(tmp_path_factory) -> transport.TransportStatus:
    """The fast path if the switch is on (as the server reads it) and it can be installed, else asyncssh as
    shipped."""
    return transport.install(fast_path=load_config(home=tmp_path_factory.mktemp("home")).fast_path)


class _Sink:
    """Hashes what each connection sends until EOF, in a thread. A slow sink has a small receive buffer and
    starts reading late, so the relay's write buffer to it fills and the relay stops taking client data."""

    def __init__(self, slow: bool = False):
        self.listener = socket.socket()
        if slow:
            self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)  # inherited on accept
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.port = self.listener.getsockname()[1]
        self.slow = slow
        self.digests: list[bytes] = []
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.listener.accept()
        digest = hashlib.sha256()
        if self.slow:
            threading.Event().wait(0.5)
        with conn:
            while data := conn.recv(1 << 16):
                digest.update(data)
        self.digests.append(digest.digest())
        self.done.set()


class _Source:
    """Sends DOWN to each connection, then closes it, in a thread."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(DOWN)


class _CountingTransport:
    """The target transport, counting the writes the relay makes."""

    def __init__(self, transport, writes: list[int]):
        self._transport = transport
        self._writes = writes

    def write(self, data):
        self._writes.append(1)
        self._transport.write(data)

    def writelines(self, chunks):
        self._writes.append(len(chunks))
        self._transport.writelines(chunks)

    def __getattr__(self, name):
        return getattr(self._transport, name)


class _RelayServer(asyncssh.SSHServer):
    def connection_made(self, conn):
        transport.receive_in_place(conn)  # as bastion's connections do (no-op without the fast path)

    def begin_auth(self, username):
        return False

    async def connection_requested(self, dest_host, dest_port, orig_host, orig_port):
        relay = Tunnel(on_close=lambda _: None)
        await connect_target(relay, ipaddress.ip_address(dest_host), dest_port, timeout=5)
        return relay


def _serve(new_loop, **options):
    loop = new_loop()
    ready = threading.Event()
    holder = {}

    async def start():
        key = asyncssh.generate_private_key("ssh-ed25519")
        holder["server"] = await asyncssh.create_server(_RelayServer, "127.0.0.1", 0, server_host_keys=[key],
                                                        **options)
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()), daemon=True)
    thread.start()
    assert ready.wait(10)

    def stop():
        loop.call_soon_threadsafe(holder["server"].close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    return holder["server"].sockets[0].getsockname()[1], stop


def _loops():
    loops = [pytest.param(asyncio.new_event_loop, id="asyncio")]
    try:
        import uvloop
        loops.append(pytest.param(uvloop.new_event_loop, id="uvloop"))
    except ImportError:  # pragma: no cover
        pass
    return loops


@pytest.mark.both_paths
@pytest.mark.parametrize("new_loop", _loops())
@pytest.mark.parametrize("slow_target", [False, True], ids=["fast target", "slow target"])
def test_one_write_to_the_target_per_read(monkeypatch, transport_path, new_loop, slow_target):
    writes: list[int] = []
    original = tunnel._TargetProtocol.connection_made

    def counted(self, transport):
        original(self, _CountingTransport(transport, writes))

    monkeypatch.setattr(tunnel._TargetProtocol, "connection_made", counted)
    reads = [0]  # reads of the server's SSH connection (the handshake's included)
    original_updated = in_place._InPlaceReader.buffer_updated

    def counted_read(self, nbytes):
        reads[0] += 1
        original_updated(self, nbytes)

    monkeypatch.setattr(in_place._InPlaceReader, "buffer_updated", counted_read)
    resumes = [0]  # the target drained and the channel handed over what it held meanwhile
    original_resume = Tunnel._resume_client

    def counted_resume(self):
        resumes[0] += 1
        original_resume(self)

    monkeypatch.setattr(Tunnel, "_resume_client", counted_resume)
    sink = _Sink(slow=slow_target)
    port, stop = _serve(new_loop)

    async def upload():
        async with asyncssh.connect("127.0.0.1", port, known_hosts=None, username="u") as conn:
            _, writer = await conn.open_connection("127.0.0.1", sink.port)
            writer.write(UP)
            writer.write_eof()
            await writer.channel.wait_closed()

    try:
        asyncio.run(asyncio.wait_for(upload(), 30))  # a relay that stops granting window stalls the client
        assert sink.done.wait(10)
    finally:
        stop()
        sink.listener.close()
    assert sink.digests == [hashlib.sha256(UP).digest()]  # every byte, in order, then EOF
    assert sum(writes) >= PACKETS  # every packet's data went through the counted writes
    if slow_target:
        assert resumes[0] > 0  # the relay did stop taking client data, and took it again
    if transport_path.fast_path:  # asyncssh as shipped hands the relay one packet at a time
        assert len(writes) <= reads[0] + resumes[0], (writes, reads, resumes)  # at most one per read or resume
        assert max(writes) > 1, writes  # and a read with several packets went out in one write


@pytest.mark.both_paths
@pytest.mark.parametrize("new_loop", _loops())
@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes128-ctr"])
def test_target_bytes_arrive_intact_while_rekeying(new_loop, cipher):
    """Target bytes that wait, in packets held back during a key exchange (every 1 MB here) or in the send
    buffer while the window is closed (the client's is small), all arrive, in order."""
    source = _Source()
    port, stop = _serve(new_loop, rekey_bytes=1_000_000)

    async def download() -> bytes:
        async with asyncssh.connect("127.0.0.1", port, known_hosts=None, username="u",
                                    encryption_algs=[cipher]) as conn:
            # a window that ends inside a read, and a held-back rest below the channel's high-water mark (64 KiB),
            # so the target is still read while data waits for the window
            reader, _ = await conn.open_connection("127.0.0.1", source.port, window=50_000)
            parts = [await reader.read(1000)]
            await asyncio.sleep(0.3)
            while data := await reader.read(1 << 16):
                parts.append(data)
            return b"".join(parts)

    try:
        down = asyncio.run(asyncio.wait_for(download(), 30))
    finally:
        stop()
        source.listener.close()
    assert len(down) == len(DOWN)
    assert hashlib.sha256(down).digest() == hashlib.sha256(DOWN).digest()
