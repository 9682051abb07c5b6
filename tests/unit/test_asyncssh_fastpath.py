"""The asyncssh fast path: bytes arrive intact both ways, with every cipher, however the reads are cut.

The server is a real asyncssh server on loopback with the fast path installed; the clients are asyncssh
(which shares the patched code) and paramiko (which does not: an independent check of the wire format).
A proxy between them can re-cut the byte stream into random pieces, so packet headers and bodies are split
across reads at every possible place.

The path is the one the switch asks for, read as the server reads it (BASTION_FAST_PATH): .ci/run runs the
tests marked `both_paths` a second time with it false, on asyncssh as shipped. Tests of the fast path's own
workings skip, saying why, when it is off or cannot be installed (an asyncssh other than the pinned one).
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import socket
import sys
import threading
import time

import asyncssh
import paramiko
import pytest
from asyncssh import connection
from asyncssh.constants import MSG_CHANNEL_DATA

from testbed import stand_ins
from asyncssh.packet import String, UInt32

from bastion import transport
from bastion.config import load_config
from bastion.transport import in_place, pins, send

SIZE = 6 * 1024 * 1024
CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
           "aes128-ctr", "aes256-cbc"]
PARAMIKO_CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes256-cbc"]


def _payload(seed: bytes, size: int = SIZE) -> bytes:
    # not periodic: bytes moved to the wrong place in a buffer must not happen to match
    return random.Random(seed).randbytes(size)


DOWN = _payload(b"down")  # target -> client
UP = _payload(b"up")  # client -> target


@pytest.fixture(scope="module", autouse=True)
def transport_path(tmp_path_factory) -> transport.TransportStatus:
    """The fast path if the switch is on (as the server reads it) and it can be installed, else asyncssh as
    shipped."""
    return transport.install(fast_path=load_config(home=tmp_path_factory.mktemp("home")).fast_path)


@pytest.fixture
def fast_path(transport_path):
    """For tests of the fast path's own workings: skipped, with the reason, where it is not installed."""
    if not transport_path.fast_path:
        pytest.skip(f"tests the fast path itself: {transport_path.describe()}")


fast_path_only = pytest.mark.usefixtures("fast_path")


@fast_path_only
def test_installed_asyncssh_matches_the_pinned_sources():
    assert pins.changed_functions() == []


@fast_path_only
def test_a_changed_asyncssh_function_is_detected(monkeypatch):
    monkeypatch.setitem(pins._EXPECTED_SOURCE, "connection.SSHConnection._recv_packet", "0" * 16)
    assert pins.changed_functions() == ["connection.SSHConnection._recv_packet"]


@pytest.mark.skipif(transport.status().fast_path, reason="the installed asyncssh is the one the fast path is "
                                                          "pinned to")
def test_another_asyncssh_runs_as_shipped():
    """Where the fast path cannot be installed (an asyncssh other than the pinned one), asking for it
    replaces nothing of asyncssh, and the status says why."""
    status = transport.install(fast_path=True)
    assert not status.fast_path and "differs from the version it was written for" in status.reason
    assert not hasattr(connection.SSHConnection.send_packet, "_bastion_original")


class _Server(asyncssh.SSHServer):
    def connection_made(self, conn):
        transport.receive_in_place(conn)  # as bastion's server connections do (no-op without the fast path)

    def begin_auth(self, username):
        return False  # no auth: these tests are about the transport

    def connection_requested(self, *args):
        return True  # asyncssh's own forwarder to the target


class _Targets:
    """A source (sends DOWN, then closes) and a sink (hashes what it gets) on loopback, in threads."""

    def __init__(self):
        self.source = socket.create_server(("127.0.0.1", 0))
        self.sink = socket.create_server(("127.0.0.1", 0))
        self.sunk: list[bytes] = []
        threading.Thread(target=self._serve, args=(self.source, self._send_down), daemon=True).start()
        threading.Thread(target=self._serve, args=(self.sink, self._hash_up), daemon=True).start()

    @staticmethod
    def _serve(listener, handle):
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                handle(conn)

    @staticmethod
    def _send_down(conn):
        conn.sendall(DOWN)

    def _hash_up(self, conn):
        digest = hashlib.sha256()
        while data := conn.recv(1 << 16):
            digest.update(data)
        self.sunk.append(digest.digest())

    def close(self):
        self.source.close()
        self.sink.close()


class _Recutter:
    """A TCP proxy that forwards each direction in random-sized pieces (1 byte to 70 kB)."""

    def __init__(self, upstream_port: int, seed: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self._upstream = upstream_port
        self._random = random.Random(seed)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self._upstream))
        for src, dst in ((client, server), (server, client)):
            src.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._pump, args=(src, dst, random.Random(self._random.random())),
                             daemon=True).start()

    @staticmethod
    def _pump(src, dst, rng):
        try:
            while data := src.recv(70000):
                while data:
                    cut = rng.choice((1, 3, 4, 5, 15, 16, 17, 31, 100, 1500, 32768, 70000))
                    dst.sendall(data[:cut])
                    data = data[cut:]
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self):
        self.listener.close()


def _serve(rekey_bytes: int | None, server=None, new_loop=asyncio.new_event_loop):
    """Start the asyncssh server in a background loop; returns (port, stop)."""
    loop = new_loop()
    ready = threading.Event()
    holder = {}

    async def start():
        key = asyncssh.generate_private_key("ssh-ed25519")
        options = {"rekey_bytes": rekey_bytes} if rekey_bytes else {}
        holder["server"] = await asyncssh.create_server(server or _Server, "127.0.0.1", 0,
                                                        server_host_keys=[key], encryption_algs=CIPHERS,
                                                        **options)
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(start()), loop.run_forever()),
                              daemon=True)
    thread.start()
    assert ready.wait(10)
    port = holder["server"].sockets[0].getsockname()[1]

    def stop():
        loop.call_soon_threadsafe(holder["server"].close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)

    return port, stop


def _through_asyncssh(port: int, cipher: str, targets: _Targets) -> tuple[bytes, bytes]:
    async def scenario():
        async with asyncssh.connect("127.0.0.1", port, known_hosts=None, username="u",
                                    encryption_algs=[cipher]) as conn:
            reader, _ = await conn.open_connection("127.0.0.1", targets.source.getsockname()[1])
            down = await reader.read()
            _, writer = await conn.open_connection("127.0.0.1", targets.sink.getsockname()[1])
            writer.write(UP)
            writer.write_eof()
            await writer.channel.wait_closed()
        return down

    down = asyncio.run(scenario())
    return down, _wait_for_sink(targets)


def _through_paramiko(port: int, cipher: str, targets: _Targets) -> tuple[bytes, bytes]:
    sock = socket.create_connection(("127.0.0.1", port))
    transport = paramiko.Transport(sock)
    transport.get_security_options().ciphers = (cipher,)
    transport.start_client(timeout=10)
    transport.auth_none("u")
    try:
        chan = transport.open_channel("direct-tcpip", ("127.0.0.1", targets.source.getsockname()[1]),
                                      ("127.0.0.1", 0))
        parts = []
        while data := chan.recv(1 << 16):
            parts.append(data)
        chan.close()
        chan = transport.open_channel("direct-tcpip", ("127.0.0.1", targets.sink.getsockname()[1]),
                                      ("127.0.0.1", 0))
        chan.sendall(UP)
        chan.shutdown_write()
        while chan.recv(1 << 16):
            pass
        chan.close()
        return b"".join(parts), _wait_for_sink(targets)
    finally:
        transport.close()


def _wait_for_sink(targets: _Targets) -> bytes:
    for _ in range(500):
        if targets.sunk:
            return targets.sunk.pop()
        threading.Event().wait(0.02)
    raise AssertionError("the sink never saw the upload end")


def _run(client, cipher: str, recut: bool, rekey_bytes: int | None = None):
    targets = _Targets()
    port, stop = _serve(rekey_bytes)
    proxy = _Recutter(port, seed=len(cipher)) if recut else None
    try:
        down, up_digest = client(proxy.port if proxy else port, cipher, targets)
    finally:
        stop()
        targets.close()
        if proxy:
            proxy.close()
    assert len(down) == len(DOWN)
    assert hashlib.sha256(down).digest() == hashlib.sha256(DOWN).digest()
    assert up_digest == hashlib.sha256(UP).digest()


@pytest.mark.both_paths
@pytest.mark.parametrize("cipher", CIPHERS)
def test_asyncssh_client_both_directions(cipher):
    _run(_through_asyncssh, cipher, recut=False)


@pytest.mark.both_paths
@pytest.mark.parametrize("cipher", PARAMIKO_CIPHERS)
def test_paramiko_client_both_directions(cipher):
    _run(_through_paramiko, cipher, recut=False)


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "aes128-ctr"])
def test_reads_cut_at_every_boundary(cipher):
    _run(_through_paramiko, cipher, recut=True)


@pytest.mark.both_paths
@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"])
def test_rekeying_while_data_flows(cipher):
    _run(_through_asyncssh, cipher, recut=True, rekey_bytes=1_000_000)


@pytest.mark.both_paths
@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"])
def test_the_server_rekeys_after_every_rekey_bytes_it_sends(monkeypatch, cipher):
    """Channel data sealed in bulk still counts toward the rekey limit: the server starts a key exchange
    once it has sent rekey_bytes, every time."""
    started: list[int] = []
    original = connection.SSHConnection._send_kexinit

    def counting(self):
        if self.is_server():
            started.append(self._rekey_bytes_sent)
        original(self)

    monkeypatch.setattr(connection.SSHConnection, "_send_kexinit", counting)
    _run(_through_asyncssh, cipher, recut=False, rekey_bytes=1_000_000)
    assert len(started) >= 1 + len(DOWN) // 1_000_000, started  # the first key exchange, then one per 1 MB
    assert all(sent < 1_000_000 + 40_000 for sent in started), started  # at most a packet past the limit


@fast_path_only
def test_the_server_reads_in_place(monkeypatch):
    """After login, a server connection's socket reads into its own buffer: no bytes object per read for
    asyncssh's data_received to append."""
    handed: list[int] = []
    original = connection.SSHConnection.data_received

    def counting(self, data, datatype=None):
        if self.is_server():
            handed.append(len(data))
        original(self, data, datatype)

    monkeypatch.setattr(connection.SSHConnection, "data_received", counting)
    _run(_through_asyncssh, "aes128-gcm@openssh.com", recut=False)
    assert 0 < sum(handed) < 16384, handed  # the handshake and login (see _login_scratch), and nothing after


@fast_path_only
@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com", "aes128-ctr"])
def test_reading_in_place_with_little_room(monkeypatch, cipher):
    """With room for 1000 bytes per read, every 32 KiB packet arrives in pieces: the buffer moves what is not
    parsed yet to the front, and grows for a packet larger than it, without losing or reordering a byte."""
    monkeypatch.setattr(in_place, "_RECV_ROOM", 1000)
    if cipher in PARAMIKO_CIPHERS:
        _run(_through_paramiko, cipher, recut=True)
    _run(_through_asyncssh, cipher, recut=True, rekey_bytes=1_000_000)


class _CountingTransport:
    """A server connection's transport, counting single writes (gathered writes go through writelines)."""

    def __init__(self, transport, writes: list[int]):
        self._transport = transport
        self._writes = writes

    def write(self, data):
        self._writes[0] += 1
        self._transport.write(data)

    def __getattr__(self, name):
        return getattr(self._transport, name)


class _InPlaceConn:
    """Just what the in-place buffer looks at; each 'parse' consumes all but the last 10 bytes that arrived."""

    def __init__(self):
        self._inpbuf, self._inpos, self._inpend, self._inpview = b"", 0, 0, None
        self._bastion_bytes_only = False
        self._recv_blocksize = 16
        self._recv_handler = self._recv_pkthdr
        self.parsed = b""

    def _recv_pkthdr(self):
        pass

    def _recv_packet(self):
        pass

    def _recv_data(self):
        if type(self._inpbuf) is bytes:
            self._inpend = len(self._inpbuf)
        upto = max(self._inpos, self._inpend - 10)
        self.parsed += bytes(self._inpbuf[self._inpos:upto])
        self._inpos = upto


@fast_path_only
def test_data_handed_to_an_in_place_buffer_is_appended(monkeypatch):
    """data_received on a connection that reads in place (not a path bastion's reads take, but asyncssh's
    own callers may): the bytes land after what is there, the buffer moves and grows, nothing is lost."""
    monkeypatch.setattr(in_place, "_RECV_ROOM", 1000)
    conn = _InPlaceConn()
    assert in_place._room(conn, 1000) is not None  # maps the first buffer, as the first read does
    sent = random.Random(3).randbytes(20000)
    for start in range(0, len(sent), 3000):  # pieces larger than the buffer's room
        in_place._data_received(conn, sent[start:start + 3000])
    assert type(conn._inpbuf) is not bytes
    assert conn.parsed + bytes(conn._inpbuf[conn._inpos:conn._inpend]) == sent


@fast_path_only
@pytest.mark.parametrize("failing", ["every mapping", "a larger mapping"])
def test_no_memory_for_a_receive_buffer_falls_back_to_bytes(monkeypatch, failing):
    """Out of memory or of mappings (vm.max_map_count), a connection reads as asyncssh does: nothing lost."""
    real_mmap = in_place.mmap.mmap
    refused = []

    def mmap_or_refuse(fileno, length):
        if failing == "every mapping" or length > 2 * in_place._RECV_ROOM:
            refused.append(length)
            raise OSError(12, "Cannot allocate memory")
        return real_mmap(fileno, length)

    monkeypatch.setattr(in_place.mmap, "mmap", mmap_or_refuse)
    monkeypatch.setattr(in_place, "_RECV_ROOM", 1000)  # a 32 KiB packet needs a larger buffer
    _run(_through_paramiko, "aes128-gcm@openssh.com", recut=True)
    assert refused


@pytest.fixture
def server_writes(monkeypatch) -> list[int]:
    """A one-item list: how many single writes the server connections made."""
    writes = [0]
    original = connection.SSHServerConnection.connection_made

    def counted(self, transport):
        # under the module name of the transport it wraps: the fast path gathers only on uvloop's transports
        counting = type("CountingTransport", (_CountingTransport,), {"__module__": type(transport).__module__})
        original(self, counting(transport, writes))

    monkeypatch.setattr(connection.SSHServerConnection, "connection_made", counted)
    return writes


@fast_path_only
@pytest.mark.parametrize("cipher, per_data_packet", [("aes128-gcm@openssh.com", 1), ("aes256-cbc", 2)])
def test_ignore_packet_only_with_cbc(server_writes, cipher, per_data_packet):
    """asyncssh puts an empty IGNORE before every packet; we keep that only where it helps (CBC)."""
    _run(_through_paramiko, cipher, recut=False)
    writes = server_writes[0]
    data_packets = len(DOWN) // 32768
    assert data_packets * per_data_packet <= writes < data_packets * per_data_packet * 1.1 + 60, writes


class _FreezableProxy:
    """A TCP proxy that can go silent both ways (a peer that vanished without closing the connection)."""

    def __init__(self, upstream_port: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.frozen = threading.Event()
        self._upstream = upstream_port
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self._upstream))
        for src, dst in ((client, server), (server, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src, dst):
        try:
            while data := src.recv(65536):
                if not self.frozen.is_set():
                    dst.sendall(data)
        except OSError:
            pass


def test_keepalive_counts_silence_from_the_last_read():
    """Steady traffic for 5 intervals keeps the session; silence ends it after interval x (count_max + 1)."""
    interval, count_max = 0.3, 2
    lost_at: list[float] = []

    class _Server(asyncssh.SSHServer):
        def begin_auth(self, username):
            return False

        def connection_lost(self, exc):
            lost_at.append(time.monotonic())

    async def scenario():
        key = asyncssh.generate_private_key("ssh-ed25519")
        server = await asyncssh.create_server(_Server, "127.0.0.1", 0, server_host_keys=[key],
                                              keepalive_interval=interval, keepalive_count_max=count_max)
        proxy = _FreezableProxy(server.sockets[0].getsockname()[1])
        conn = await asyncssh.connect("127.0.0.1", proxy.port, known_hosts=None, username="u")
        for _ in range(int(5 * interval / 0.05)):  # a request every 50 ms: never idle for an interval
            with pytest.raises(asyncssh.ChannelOpenError):  # a round trip: the server reads a packet
                await conn.create_session(asyncssh.SSHClientSession)
            await asyncio.sleep(0.05)
        assert not lost_at, "an active session was dropped by the keepalive check"
        proxy.frozen.set()
        frozen_at = time.monotonic()
        for _ in range(100):
            if lost_at:
                break
            await asyncio.sleep(0.05)
        conn.abort()
        server.close()
        return lost_at[0] - frozen_at if lost_at else None

    silence = asyncio.run(scenario())
    assert silence is not None, "the server never dropped the silent peer"
    assert interval * (count_max + 1) - 0.1 <= silence <= interval * (count_max + 1) + 1.0, silence


def test_packet_debug_logging_still_works(caplog, monkeypatch):
    """At asyncssh's debug level 3 every packet is logged, as without the fast path."""
    monkeypatch.setattr(sys.modules[__name__], "DOWN", _payload(b"down", 256 * 1024))
    monkeypatch.setattr(sys.modules[__name__], "UP", _payload(b"up", 256 * 1024))
    asyncssh.set_debug_level(3)
    try:
        with caplog.at_level("DEBUG", logger="asyncssh"):
            _run(_through_asyncssh, "aes128-gcm@openssh.com", recut=False)
    finally:
        asyncssh.set_debug_level(1)
    sent = [r for r in caplog.records if "] Sent MSG_CHANNEL_DATA" in r.getMessage()]
    received = [r for r in caplog.records if "] Received MSG_CHANNEL_DATA" in r.getMessage()]
    assert len(sent) >= 2 * len(DOWN) // 32768 and len(received) >= 2 * len(UP) // 32768


def test_a_buffer_changed_after_write_does_not_change_what_is_sent():
    """Writes are kept without a copy only when they are immutable bytes."""
    targets = _Targets()
    port, stop = _serve(None)

    async def scenario():
        async with asyncssh.connect("127.0.0.1", port, known_hosts=None, username="u") as conn:
            _, writer = await conn.open_connection("127.0.0.1", targets.sink.getsockname()[1])
            buffer = bytearray(UP)
            writer.write(buffer)  # most of it waits in the channel's send buffer for window
            buffer[:] = bytes(len(buffer))
            writer.write(memoryview(buffer)[:0])
            writer.write_eof()
            await writer.channel.wait_closed()

    try:
        asyncio.run(scenario())
        assert _wait_for_sink(targets) == hashlib.sha256(UP).digest()
    finally:
        stop()
        targets.close()


class _SmallWindowServer(_Server):
    """Channels with a 4 KiB window, smaller than a packet, so one packet can exceed it."""

    def connection_made(self, conn):
        super().connection_made(conn)
        self._conn = conn

    def connection_requested(self, *args):
        return self._conn.create_tcp_channel(window=4096), asyncssh.SSHTCPSession()


class _Disconnected(asyncssh.SSHClient):
    def __init__(self):
        self.reason = ""

    def connection_lost(self, exc):
        self.reason = str(exc)


@pytest.mark.parametrize("fault, reason", [
    ("beyond the window", "Window exceeded"),
    ("to an unknown channel", "Invalid channel number"),
    ("with a length past the end", "Incomplete packet"),
    ("with bytes after the data", "Unexpected data at end of packet"),
])
@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"])
def test_malformed_channel_data_is_refused_as_asyncssh_refuses_it(fault, reason, cipher):
    """Channel data takes a shorter path to the channel; what it skips must still be refused the same way
    (after well-formed data packets: with AES-GCM, the bulk loop opens the faulty one and must leave it, and
    its IV, to the general path)."""
    targets = _Targets()
    port, stop = _serve(None, server=_SmallWindowServer)

    async def scenario() -> str:
        conn, client = await asyncssh.create_connection(_Disconnected, "127.0.0.1", port, known_hosts=None,
                                                        username="u", encryption_algs=[cipher])
        async with conn:
            _, writer = await conn.open_connection("127.0.0.1", targets.sink.getsockname()[1])
            chan = writer.channel
            server_chan = chan._send_chan
            data = b"x" * 100
            if fault == "beyond the window":
                assert chan._send_window == 4096
                args = [UInt32(server_chan), String(b"x" * 4097)]
            elif fault == "to an unknown channel":
                args = [UInt32(server_chan + 1000), String(data)]
            elif fault == "with a length past the end":
                args = [UInt32(server_chan), UInt32(len(data) + 1), data]
            else:
                args = [UInt32(server_chan), UInt32(len(data) - 1), data]
            for _ in range(3):  # well-formed, most likely in the same read as the faulty one
                conn.send_packet(MSG_CHANNEL_DATA, UInt32(server_chan), String(b"y" * 10))
            conn.send_packet(MSG_CHANNEL_DATA, *args)
            await asyncio.wait_for(conn.wait_closed(), 10)
        return client.reason

    try:
        assert reason in asyncio.run(scenario())
    finally:
        stop()
        targets.close()


class _SourceSession(asyncssh.SSHTCPSession):
    """Sends DOWN down the channel and closes it: no target socket (asyncssh's own forwarder loses data
    that arrives before its channel opens under uvloop, the fault bastion's relay was built to avoid)."""

    def connection_made(self, chan):
        chan.write(DOWN)
        chan.close()


class _SourceServer(_Server):
    def connection_requested(self, *args):
        return _SourceSession()


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"])
@pytest.mark.parametrize("recut, rekey_bytes", [(False, None), (True, None), (False, 1_000_000)])
@fast_path_only
def test_uvloop_gathers_a_flush_into_one_writev(server_writes, cipher, recut, rekey_bytes):
    """On uvloop a channel flush of many packets goes out in one writelines, not one write per packet."""
    uvloop = pytest.importorskip("uvloop")
    port, stop = _serve(rekey_bytes, server=_SourceServer, new_loop=uvloop.new_event_loop)
    proxy = _Recutter(port, seed=len(cipher)) if recut else None

    async def scenario() -> bytes:
        async with asyncssh.connect("127.0.0.1", proxy.port if proxy else port, known_hosts=None, username="u",
                                    encryption_algs=[cipher]) as conn:
            reader, _ = await conn.open_connection("127.0.0.1", 9)  # nothing is connected: the session is the source
            return await reader.read()

    try:
        down = asyncio.run(scenario())
    finally:
        stop()
        if proxy:
            proxy.close()
    assert hashlib.sha256(down).digest() == hashlib.sha256(DOWN).digest()
    if rekey_bytes is None:  # (packets held back during a key exchange go out one by one once it is done)
        assert server_writes[0] < len(DOWN) // 32768 // 4, server_writes  # the other packets went out gathered


class _InterleavingServer(_Server):
    """A session that writes stdout, stderr and stdout again at once, more than the client's window holds:
    the send buffer holds all three, and each flush must stop where the kind of data changes."""

    def session_requested(self):
        return _InterleavingSession()


class _InterleavingSession(asyncssh.SSHServerSession):
    def connection_made(self, chan):
        self._chan = chan
        chan.set_encoding(None)  # bytes, as a tunnel's channel

    def shell_requested(self):
        return True

    def session_started(self):
        self._chan.write(DOWN[:300_000])
        self._chan.write_stderr(UP[:70_000])
        self._chan.write(DOWN[300_000:])
        self._chan.exit(0)


@pytest.mark.parametrize("cipher", ["aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"])
def test_stdout_and_stderr_interleaved_behind_a_small_window(cipher):
    port, stop = _serve(None, server=_InterleavingServer)

    async def scenario() -> tuple[bytes, bytes]:
        async with asyncssh.connect("127.0.0.1", port, known_hosts=None, username="u",
                                    encryption_algs=[cipher]) as conn:
            result = await conn.run(encoding=None, window=50_000, check=False)
        return result.stdout, result.stderr

    try:
        stdout, stderr = asyncio.run(asyncio.wait_for(scenario(), 30))
    finally:
        stop()
    assert hashlib.sha256(stdout).digest() == hashlib.sha256(DOWN).digest()
    assert stderr == UP[:70_000]


STAND_IN_SIZE = 32768  # channel data per packet for the stand-ins (testbed/stand_ins.py; tests do not import bench/)


class _ClosingSession:
    """Closes its channel after the first packet; takes views of channel data, as the relay does, if `views`."""

    def __init__(self, chan, views: bool) -> None:
        self.chan, self.takes_views, self.received = chan, views, []

    def data_received(self, data, datatype) -> None:
        self.received.append(bytes(data))
        self.chan._send_state = "close_pending"  # what SSHChannel.close sets first


@fast_path_only
@pytest.mark.parametrize("views", [True, False])
def test_data_after_the_session_closed_its_channel_is_dropped_within_one_read(views):
    """A read of four packets: the first reaches the session, which closes the channel; the other three are
    dropped, as asyncssh's _accept_data drops data for a closing channel (the fast path hands packets on
    itself while the channel is the one it checked earlier in the read)."""
    conn = stand_ins.receiving_connection(STAND_IN_SIZE)
    chan = conn._channels[0]
    chan._session = session = _ClosingSession(chan, views)
    chan._recv_buf = []
    read = b"".join(stand_ins.sealed_packets(4, _payload(b"stand-in", STAND_IN_SIZE)))
    conn._inpbuf, conn._inpos, conn._inpend = read, 0, len(read)
    conn._recv_data()
    assert conn._inpend == conn._inpos, "not every packet was parsed"
    assert len(session.received) == 1 and len(session.received[0]) == STAND_IN_SIZE


@fast_path_only
@pytest.mark.parametrize("queued, window, rekey_left, shortcut", [
    (False, 1 << 20, 1 << 20, True),  # nothing queued, room in the window: sealed at once
    (True, 1 << 20, 1 << 20, False),  # data already waiting: it goes first, by the general flush
    (False, 10, 1 << 20, False),  # more than the window: the general flush sends what fits and keeps the rest
    (False, 1 << 20, 0, False),  # the rekey byte limit is reached: the general path starts the key exchange
])
def test_a_small_write_on_an_idle_channel_is_sealed_without_the_general_flush(monkeypatch, queued, window,
                                                                               rekey_left, shortcut):
    chan = stand_ins.sending_channel(STAND_IN_SIZE)
    conn = chan._conn
    chan._send_window, conn._rekey_bytes = window, conn._rekey_bytes_sent + rekey_left
    general = []
    monkeypatch.setattr(send, "_flush_packets", lambda ch: general.append(len(ch._send_buf)))
    if queued:
        chan._send_buf.append((memoryview(b"earlier"), None))
        chan._send_buf_len = 7
    chan.write(b"x" * 64)
    assert general == ([] if shortcut else [2 if queued else 1])
    assert conn._send_seq == (1 if shortcut else 0)
    assert chan._send_buf_len == (0 if shortcut else 64 + 7 * queued)
