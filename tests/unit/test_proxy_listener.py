"""The PROXY header check in front of asyncssh (bastion/transport/proxy_protocol.py, #22), on its own: a real
asyncssh server behind ProxyProtocolListener on loopback, real asyncssh clients over sockets that first send a
header (or not), and a recorder for what the listener reports. 127.0.0.1 is the balancer; 127.0.0.2 is not.

What the gateway does with the reports (audit rows, penalties) is tested with the real server and OpenSSH in
tests/integration/test_proxy_protocol.py.
"""

from __future__ import annotations

import asyncio
import socket

import asyncssh
import pytest
import uvloop

from bastion import transport
from bastion.policy.netguard import parse_networks
from bastion.policy.proxy_header import v2_header


class Recorder:
    def __init__(self) -> None:
        self.refusals: list[tuple[tuple[str, int], str, str, bool]] = []
        self.checks: list[tuple[tuple[str, int], str]] = []

    def refused(self, peer, kind, reason, balancer):
        self.refusals.append((peer, kind, reason, balancer))

    def no_client(self, peer, what):
        self.checks.append((peer, what))


class _Server(asyncssh.SSHServer):
    def __init__(self, peers: list, in_place: bool):
        self._peers, self._in_place = peers, in_place

    def connection_made(self, conn):
        self._peers.append(conn.get_extra_info("peername")[:2])
        if self._in_place:  # as bastion's connections read, with the fast path on
            transport.receive_in_place(conn)

    def begin_auth(self, username):
        return False  # no authentication: the test is about what comes before it


class Bed:
    def __init__(self, server, port, peers, events):
        self.server, self.port, self.peers, self.events = server, port, peers, events

    def socket(self, source: str = "127.0.0.1") -> socket.socket:
        sock = socket.socket()
        sock.bind((source, 0))
        sock.setblocking(False)
        return sock

    async def connect(self, source: str = "127.0.0.1") -> socket.socket:
        sock = self.socket(source)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        return sock

    async def ssh_run(self, sock: socket.socket) -> str:
        """A real SSH session over `sock` (after whatever the test sent first): runs one command."""
        async with asyncssh.connect(sock=sock, username="u", known_hosts=None) as client:
            return (await client.run("hello", check=True)).stdout

    async def closed_without_banner(self, sock: socket.socket, timeout: float = 5.0) -> bytes:
        """What the server sent before closing the connection (nothing, when it never reached SSH)."""
        loop = asyncio.get_running_loop()
        received = b""
        while True:
            try:
                chunk = await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
        sock.close()
        return received


LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
_loop = ["uvloop"]


@pytest.fixture(autouse=True, params=sorted(LOOPS))
def event_loop_kind(request):
    """Every test on both loops `serve` can run (event_loop): their transports differ where it matters here."""
    _loop[0] = request.param
    return request.param


def run(test, in_place: bool = True, timeout: float = 5.0, max_length: int = 4096):
    async def main():
        transport.install(fast_path=True)
        peers: list = []
        events = Recorder()

        async def process(proc):
            proc.stdout.write(f"{proc.command} from {proc.get_extra_info('peername')[0]}")
            proc.exit(0)

        listener = transport.ProxyProtocolListener(lambda: parse_networks(["127.0.0.1/32"]), events,
                                                   timeout=timeout, max_length=max_length)
        server = await asyncssh.listen("127.0.0.1", 0, server_host_keys=[asyncssh.generate_private_key(
            "ssh-ed25519")], process_factory=process, server_factory=lambda: _Server(peers, in_place),
            tunnel=listener)
        try:
            await test(Bed(server, server.sockets[0].getsockname()[1], peers, events))
        finally:
            server.close()
            await server.wait_closed()

    with asyncio.Runner(loop_factory=LOOPS[_loop[0]]) as runner:
        runner.run(main())


@pytest.mark.parametrize("in_place", [True, False], ids=["fast path reads", "asyncssh reads"])
@pytest.mark.parametrize("header", [
    v2_header(("10.1.2.3", 5555), ("10.0.0.1", 22)),
    v2_header(("2001:db8::7", 5555), ("2001:db8::1", 22), tlvs=b"\x05\x00\x04abcd"),
    b"PROXY TCP4 10.1.2.3 10.0.0.1 5555 22\r\n",
], ids=["v2 IPv4", "v2 IPv6 with a TLV", "v1"])
def test_the_header_client_is_the_peer_the_server_sees(header, in_place):
    async def test(bed):
        sock = await bed.connect()
        await asyncio.get_running_loop().sock_sendall(sock, header)
        out = await bed.ssh_run(sock)
        claimed = "10.1.2.3" if b"10.1.2.3" in header or b"\x0a\x01\x02\x03" in header else "2001:db8::7"
        assert out == f"hello from {claimed}"
        assert bed.peers == [(claimed, 5555)]
        assert bed.events.refusals == [] and bed.events.checks == []

    run(test, in_place)


def test_a_header_split_into_single_bytes_and_ssh_in_the_same_segment_as_its_end():
    """TCP may deliver the header a byte at a time; what follows it in the last segment is SSH's."""
    async def test(bed):
        loop = asyncio.get_running_loop()
        sock = await bed.connect()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        header = v2_header(("10.9.8.7", 4444))
        for byte in header[:-1]:
            await loop.sock_sendall(sock, bytes([byte]))
            await asyncio.sleep(0.002)
        await loop.sock_sendall(sock, header[-1:] + b"SSH-2.0-Early_bird\r\n")
        banner = await asyncio.wait_for(loop.sock_recv(sock, 4096), 5)
        assert banner.startswith(b"SSH-2.0-")
        sock.close()
        for _ in range(100):
            if bed.peers:
                break
            await asyncio.sleep(0.01)
        assert bed.peers == [("10.9.8.7", 4444)]

    run(test)


@pytest.mark.parametrize("in_place", [True, False], ids=["fast path reads", "asyncssh reads"])
def test_a_direct_client_logs_in_as_without_the_check(in_place):
    async def test(bed):
        assert await bed.ssh_run(await bed.connect("127.0.0.2")) == "hello from 127.0.0.2"
        assert bed.events.refusals == []

    run(test, in_place)


@pytest.mark.parametrize("header", [v2_header(("10.1.2.3", 5555)), b"PROXY TCP4 10.1.2.3 10.0.0.1 5555 22\r\n"],
                         ids=["v2", "v1"])
def test_a_header_from_anyone_but_the_balancer_is_refused(header):
    async def test(bed):
        sock = await bed.connect("127.0.0.2")
        await asyncio.get_running_loop().sock_sendall(sock, header + b"SSH-2.0-Forger\r\n")
        sent = await bed.closed_without_banner(sock)
        assert sent.startswith(b"SSH-2.0-")  # the server spoke first, as to any direct client
        assert [address for address, _ in bed.peers] == ["127.0.0.2"]
        [(peer, kind, reason, balancer)] = bed.events.refusals
        assert (peer[0], kind, balancer) == ("127.0.0.2", "forged", False)
        assert "not in proxy_protocol_from" in reason

    run(test)


@pytest.mark.parametrize("first, kind, words", [
    (b"SSH-2.0-OpenSSH_9.6\r\n", "missing", "no PROXY header from the load balancer"),
    (b"PROXY TCP4 10.1.2.3 10.0.0.1 05555 22\r\n", "malformed", "leading zeros"),
    (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x08" + bytes(8), "malformed", "shorter than 12"),
    (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x10\x00", "malformed", "more than the 1024 allowed"),
    (b"PROXY UNKNOWN\r\n", "no client", "names no TCP client (UNKNOWN)"),
    (v2_header(("10.1.2.3", 5555))[:20], "timeout", "an incomplete PROXY header from the load balancer within"),
    (b"", "timeout", "no PROXY header from the load balancer within 0.3s"),
], ids=["missing", "v1 leading zero", "v2 short block", "v2 too long", "UNKNOWN", "incomplete", "silent"])
def test_the_balancer_without_a_good_header_is_refused(first, kind, words):
    async def test(bed):
        sock = await bed.connect()
        await asyncio.get_running_loop().sock_sendall(sock, first)
        assert await bed.closed_without_banner(sock) == b""  # SSH never started
        assert bed.peers == []
        [(peer, got_kind, reason, balancer)] = bed.events.refusals
        assert (peer[0], got_kind, balancer) == ("127.0.0.1", kind, True)
        assert words in reason

    run(test, timeout=0.3, max_length=1024)


def test_a_health_check_is_closed_quietly():
    async def test(bed):
        loop = asyncio.get_running_loop()
        for _ in range(3):
            sock = await bed.connect()
            await loop.sock_sendall(sock, v2_header(None))
            assert await bed.closed_without_banner(sock) == b""
        sock = await bed.connect()
        sock.close()  # a plain TCP check: connect, close
        for _ in range(100):
            if len(bed.events.checks) == 4:
                break
            await asyncio.sleep(0.01)
        assert [what for _, what in bed.events.checks] == ["PROXY v2 LOCAL"] * 3 + ["closed before sending a byte"]
        assert bed.peers == [] and bed.events.refusals == []

    run(test)


def test_a_connection_reset_before_it_is_accepted_has_no_peer_and_is_closed_quietly():
    """HAProxy's checks send the LOCAL header and reset at once; when the reset comes before the accept, the socket
    has no peer address (getpeername: ENOTCONN). Nobody to serve, audit or penalize: it must not be taken for a
    direct client at 0.0.0.0 (seen with HAProxy in tests/e2e/test_e2e_haproxy.py before this was handled)."""
    async def test(bed):
        for first in (v2_header(None), b""):
            # blocking, without yielding to the loop: the kernel completes the handshake, the loop accepts later
            sock = socket.create_connection(("127.0.0.1", bed.port), timeout=5)
            sock.sendall(first)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            sock.close()  # RST, before the listener's accept runs
        for _ in range(100):
            if len(bed.events.checks) == 2:
                break
            await asyncio.sleep(0.01)
        assert bed.peers == [] and bed.events.refusals == []
        # uvloop asks the socket for its peer (none after a reset); asyncio keeps the address accept() gave
        expected = {"uvloop": ["reset before it was accepted"] * 2,
                    "asyncio": ["PROXY v2 LOCAL", "closed before sending a byte"]}[_loop[0]]
        assert [what for _, what in bed.events.checks] == expected

    run(test)
