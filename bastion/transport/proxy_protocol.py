"""Behind a load balancer (#22): the PROXY protocol header read before asyncssh sees a byte.

asyncssh's `listen(tunnel=…)` accepts any object with `create_server(session_factory, host, port)` and wraps
what it returns in its SSHAcceptor, exactly as for its own SSH-tunnelled listeners; `session_factory()` makes
the SSHServerConnection, an asyncio protocol. ProxyProtocolListener is such an object: it listens with the
event loop's own TCP server, and each accepted socket's first protocol is a _FirstBytes, which

- from a balancer (an address in `proxy_protocol_from`): reads the header (policy/proxy_header.py) within
  HEADER_TIMEOUT seconds and at most `max_length` bytes, then makes the SSH connection, sets the client's address
  as its `peername` extra info (what the gateway reads in connection_made, so audit rows, penalties, the startup
  limit, penalty_exempt, logs and `from=` all see the client) and hands it the socket transport itself, with
  whatever followed the header. A v2 LOCAL header (the balancer's health check) is closed quietly (as is a
  connection reset before it was accepted, which has no peer address at all: HAProxy's checks often are); a missing,
  malformed, incomplete or late header, or one naming no TCP client, is refused: `events.refused`, then abort.
- from anyone else: hands the socket to the SSH connection at once (the server speaks first, as without a
  balancer) but sees the client's first bytes before it does: a PROXY signature there is a forged header,
  refused the same way, and then counts against that source like any connection that never logs in.

The SSH connection gets the real socket transport (not a wrapper), so the fast path's in-place reads, corking
and flow control work as without a balancer; the one private name touched is asyncssh's own copy of the peer
address (`_peer_addr`, `_peer_port`), set to the client's for what asyncssh does with it after the handshake
begins (its logs, a config reload's Match).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from ..policy.netguard import IPNetwork, canonical_address
from ..policy.proxy_header import MAX_LENGTH, ProxyHeaderError, parse, starts_like_header

HEADER_TIMEOUT = 5.0  # the spec asks for at least 3 s, to cover a TCP retransmit


class ProxyEvents(Protocol):
    """What the bastion does about what the header check saw; `peer` is the TCP peer (address, port)."""

    def refused(self, peer: tuple[str, int], kind: str, reason: str, balancer: bool) -> None:
        """A connection closed for its header: `kind` is one of "forged", "missing", "malformed", "timeout",
        "no client"; `balancer` whether the peer is in proxy_protocol_from."""

    def no_client(self, peer: tuple[str, int], what: str) -> None:
        """A connection with no client behind it, closed quietly: the balancer's health check (a v2 LOCAL
        header, or closed before sending a byte), or one reset before it was accepted."""


def _canonical(host: str) -> str:
    return str(canonical_address(ipaddress.ip_address(host.split("%", 1)[0])))


class ProxyProtocolListener:
    """The `tunnel` argument of asyncssh.listen/create_server that puts the PROXY header check in front of it.
    `balancers()` is read for each connection, so a reloaded proxy_protocol_from applies to the next one."""

    def __init__(self, balancers: Callable[[], Sequence[IPNetwork]], events: ProxyEvents, *,
                 reuse_address: bool = True, reuse_port: bool = False, backlog: int = 100,
                 timeout: float = HEADER_TIMEOUT, max_length: int = MAX_LENGTH):
        self.balancers = balancers
        self.events = events
        self.timeout = timeout
        self.max_length = max_length
        self._server_options = {"reuse_address": reuse_address, "reuse_port": reuse_port, "backlog": backlog}

    def is_balancer(self, address: str) -> bool:
        ip = ipaddress.ip_address(address)
        return any(ip in network for network in self.balancers())

    async def create_server(self, session_factory: Callable[[str, int], Any], host: str,
                            port: int) -> asyncio.AbstractServer:
        """Listen on host:port; asyncssh wraps the server returned in its SSHAcceptor."""
        loop = asyncio.get_running_loop()
        return await loop.create_server(lambda: _FirstBytes(self, session_factory), host or None, port,
                                        **self._server_options)


class _FirstBytes(asyncio.Protocol):
    """The socket's protocol until the SSH connection may have it: see the module's docstring."""

    def __init__(self, listener: ProxyProtocolListener, session_factory: Callable[[str, int], Any]):
        self._listener = listener
        self._factory = session_factory
        self._transport: asyncio.Transport | None = None
        self._peer = ("0.0.0.0", 0)
        self._buffer = b""
        self._timer: asyncio.TimerHandle | None = None
        self._conn: Any = None  # the SSH connection, once made
        self._next: Any = None  # while peeking at a direct client: the protocol the SSH connection gave the socket
        self._done = False  # refused, or closed as a health check

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        peer = transport.get_extra_info("peername")
        if not peer:
            # Reset before we accepted it (getpeername: ENOTCONN), as HAProxy's checks often are: nobody to
            # serve, audit or penalize, and no way to tell a balancer's connection from anyone else's.
            self._done = True
            self._listener.events.no_client(self._peer, "reset before it was accepted")
            transport.abort()
            return
        self._peer = (_canonical(peer[0]), int(peer[1]))
        if self._listener.is_balancer(self._peer[0]):
            self._timer = asyncio.get_running_loop().call_later(self._listener.timeout, self._timed_out)
            return
        self._start_ssh(None)
        if not transport.is_closing():  # not dropped at once (a penalized source, the startup limit)
            self._next = transport.get_protocol()  # the SSH connection, or its in-place reader (the fast path)
            transport.set_protocol(self)

    def data_received(self, data: bytes) -> None:
        if self._done:
            return
        self._buffer += data
        if self._next is not None:
            self._peek()
        else:
            self._read_header()

    def _peek(self) -> None:
        """A direct client's first bytes: a PROXY signature is refused; anything else goes on to SSH."""
        verdict = starts_like_header(self._buffer)
        if verdict is None:
            return
        if verdict:
            self._refuse("forged", f"PROXY header from {self._peer[0]}, which is not in proxy_protocol_from",
                         balancer=False)
            return  # connection_lost reaches the SSH connection through _next
        assert self._transport is not None
        self._transport.set_protocol(self._next)
        self._next = None
        data, self._buffer = self._buffer, b""
        self._conn.data_received(data)

    def _read_header(self) -> None:
        try:
            header = parse(self._buffer, self._listener.max_length)
        except ProxyHeaderError as exc:
            if starts_like_header(self._buffer) is False:
                self._refuse("missing", "no PROXY header from the load balancer (is send-proxy-v2 set on its "
                                        "server line?)", balancer=True)
            else:
                self._refuse("malformed", f"malformed PROXY header from the load balancer: {exc}", balancer=True)
            return
        if header is None:
            return
        self._cancel_timer()
        rest, self._buffer = self._buffer[header.length:], b""
        if header.local:
            self._done = True
            self._listener.events.no_client(self._peer, "PROXY v2 LOCAL")
            assert self._transport is not None
            self._transport.close()
            return
        if header.source is None:
            self._refuse("no client", f"PROXY header from the load balancer names no TCP client ({header.kind})",
                         balancer=True)
            return
        self._start_ssh((_canonical(header.source[0]), header.source[1]))
        if rest and self._transport is not None and not self._transport.is_closing():
            self._conn.data_received(rest)

    def _start_ssh(self, client: tuple[str, int] | None) -> None:
        """Make the SSH connection and give it the socket (its connection_made sends our version line)."""
        transport = self._transport
        assert transport is not None
        conn = self._factory("", 0)  # asyncssh's factory ignores the original host and port
        if client is not None:
            # read by the gateway's connection_made, before asyncssh's own peername (the balancer's)
            conn.set_extra_info(peername=client, proxied_by=self._peer)
        self._conn = conn
        transport.set_protocol(conn)
        conn.connection_made(transport)
        if client is not None:
            conn._peer_addr, conn._peer_port = client

    def _refuse(self, kind: str, reason: str, balancer: bool) -> None:
        self._done = True
        self._cancel_timer()
        self._listener.events.refused(self._peer, kind, reason, balancer)
        if self._transport is not None:
            self._transport.abort()

    def _timed_out(self) -> None:
        self._timer = None
        what = "an incomplete PROXY header" if self._buffer else "no PROXY header"
        self._refuse("timeout", f"{what} from the load balancer within {self._listener.timeout:g}s", balancer=True)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def eof_received(self) -> bool | None:
        if self._next is not None:
            return self._next.eof_received()
        return None  # before the header: the transport closes, and connection_lost says what was seen

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._next is not None:
            self._next.connection_lost(exc)
            self._next = None
            return
        if self._conn is None and not self._done:
            self._done = True
            if self._buffer:
                self._listener.events.refused(self._peer, "malformed", "the load balancer closed the connection "
                                              "inside the PROXY header", True)
            else:
                self._listener.events.no_client(self._peer, "closed before sending a byte")

    def pause_writing(self) -> None:
        if self._next is not None:
            self._next.pause_writing()

    def resume_writing(self) -> None:
        if self._next is not None:
            self._next.resume_writing()
