"""Remote forwarding (ssh -R): listeners on the bastion, granted by policy, whose inbound connections are
relayed back to the client as forwarded-tcpip channels.

Each listener and each inbound connection is audited; a connection's row is committed before any of its
bytes flow. Listeners close when cancelled, when the session ends, or when a revocation narrows the grant.
"""

from __future__ import annotations

import asyncio
import errno
import random
from dataclasses import replace

import asyncssh

from ..audit.writer import AuditUnavailable, ChannelRecord, ListenerRecord
from ..clock import utc_now
from ..policy.authorized_keys import key_listen_refusal
from ..policy.decide import channel_cap_refusal, evaluate_listen, listen_ranges
from ..policy.model import Decision, ListenRequest, Policy, parse_bind_address
from ..policy.netguard import IPAddress, TargetError
from .context import ChannelOwner
from .relay import Tunnel, inbound_protocol


_PORT_ATTEMPTS = 64  # for port 0: how many free-port candidates to try within the granted ranges


class RemoteListener(asyncssh.SSHListener):
    """One granted `tcpip-forward`: an asyncio server on the bastion bound to exactly what was granted."""

    def __init__(self, connection: ChannelOwner, request: ListenRequest, wire_host: str):
        super().__init__()
        self.connection = connection
        self.request = request  # port is the bound port, never 0
        self.wire_host = wire_host  # the address string the client sent; echoed back on each connection
        self.listener_id: int | None = None
        self.server: asyncio.AbstractServer | None = None
        self._close_reason: str | None = None  # set by close_with (revoked); otherwise decided at close
        self._closed = False
        # Set once the listener's own row is committed (or cannot be): a connection that comes in while the row
        # is on its way waits for it, so the connection's row can name its listener.
        self.row_known = asyncio.Event()

    def get_port(self) -> int:
        return self.request.port

    def recheck(self, policy: Policy, now) -> Decision:
        request = replace(self.request.with_time(now), extra_groups=self.connection.extra_groups(policy))
        return evaluate_listen(policy, request)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def close_reason(self) -> str:
        return self._close_reason or "cancelled by client"

    def close_with(self, reason: str) -> None:
        self._close_reason = reason
        self.close()

    def close(self) -> None:
        """Stop accepting; connections already relayed stay until they or the session end."""
        if self._closed:
            return
        self._closed = True
        if self._close_reason is None:
            # The bastion ending the session (sessions kill, shutdown, a timeout) sets end_reason before asyncssh
            # closes the listeners, while the connection is still up: that reason, not the client's cancel.
            if self.connection.end_reason is not None:
                self._close_reason = self.connection.end_reason
            elif (self.connection.session_id is None or self.connection.conn is None
                  or self.connection.conn.get_extra_info("socket") is None):
                # asyncssh closes a connection's listeners as it drops the connection, before the session's own
                # connection_lost, and only after letting go of the socket; an explicit cancel-tcpip-forward
                # comes while the socket is still there.
                self._close_reason = "session ended"
        if self.server is not None:
            self.server.close()
        self.connection.remove_listener(self)
        if self.listener_id is not None:
            self.connection.ctx.audit.close_listener(self.listener_id, self.close_reason)

    async def wait_closed(self) -> None:
        if self.server is not None:
            await self.server.wait_closed()

    # ---- inbound connections ----------------------------------------------------------------

    def _accept(self) -> asyncio.Protocol:
        tunnel = Tunnel(on_close=self.connection.tunnel_closed)
        protocol = inbound_protocol(tunnel)
        asyncio.get_running_loop().call_soon(self._start_forward, tunnel)
        return protocol

    def _start_forward(self, tunnel: Tunnel) -> None:
        task = asyncio.ensure_future(self._forward(tunnel))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # errors are handled inside

    async def _forward(self, tunnel: Tunnel) -> None:
        """Audit the inbound connection, then open a forwarded-tcpip channel back to the client. It takes one of
        the user's channel slots from the moment it is decided; the listener closing meanwhile refuses it."""
        transport = tunnel.target_transport
        if transport is None or transport.is_closing():
            return
        connection = self.connection
        peer = transport.get_extra_info("peername") or ("", 0)
        try:
            await asyncio.wait_for(self.row_known.wait(), connection.ctx.config.connect_timeout)
        except asyncio.TimeoutError:
            pass
        if self.listener_id is None:  # the listener never got its row: it is not open, nothing is forwarded
            tunnel.close_reason = "listener not open"
            tunnel.abort()
            return
        cap = channel_cap_refusal(connection.user, connection.open_channels_of_user(),
                                  connection.ctx.config.max_channels_per_user)
        refusal = cap.reason if cap is not None else None
        now = utc_now()
        record = ChannelRecord(
            session_id=connection.session_id or "",
            user=connection.user,
            kind="forwarded-tcpip",
            target_host=self.wire_host,
            target_ip=str(self.request.bind),
            target_port=self.request.port,
            decision="deny" if refusal else "allow",
            rule=None,
            reason=refusal or "inbound connection on a granted listener",
            opened_at=now,
            closed_at=now if refusal else None,
            listener_id=self.listener_id,
            peer_ip=str(peer[0]),
            peer_port=int(peer[1]),
        )
        if refusal is None:
            connection.add_tunnel(tunnel)  # no await since the cap check: the slot is taken
        try:
            channel_id = await connection.ctx.audit.record_channel(record)
            if refusal is not None:
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, refusal)
            tunnel.channel_id = channel_id
            if self._closed or tunnel.ended or connection.conn is None:
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, f"listener closed: {self.close_reason}")
            await connection.conn.create_connection(lambda: tunnel, self.wire_host, self.request.port, str(peer[0]),
                                                    int(peer[1]))
        except (asyncssh.ChannelOpenError, AuditUnavailable, OSError) as exc:
            connection.log.info("inbound connection from %s not forwarded: %s", peer[0], exc)
            tunnel.close_reason = tunnel.close_reason or f"not forwarded: {exc}"
            tunnel.abort()  # its on_close runs once the TCP side is gone


async def open_listener(connection: ChannelOwner, wire_host: str, wire_port: int) -> RemoteListener | bool:
    """Decide and bind one tcpip-forward request; returns the listener, or False (the client is told it failed)."""
    ctx = connection.ctx
    if connection.session_committed is not None:
        await connection.session_committed  # the listener row must not land before its session's
    if connection.session_id is None:
        return False
    now = utc_now()
    try:
        bind = parse_bind_address(wire_host)
        policy = await ctx.policy.current()
        request = ListenRequest(user=connection.user, bind=bind, port=wire_port, now=now,
                                extra_groups=connection.extra_groups(policy))
        decision = evaluate_listen(policy, request)
        narrowed = key_listen_refusal(connection.key_options, wire_host, wire_port) if decision.allowed else None
        decision = Decision(False, narrowed, None, None) if narrowed else decision
    except TargetError as exc:
        bind, decision = None, Decision(False, str(exc), None, None)
        request = None
    listener = None
    if decision.allowed and request is not None:
        listener, failure = await _bind(connection, request, wire_host, policy)
        if listener is None:
            decision = Decision(False, failure, decision.rule, None)
        else:
            connection.add_listener(listener)  # pending: a revocation from now on closes it
    record = ListenerRecord(
        session_id=connection.session_id or "",
        user=connection.user,
        listen_host=str(bind) if bind is not None else wire_host[:256],
        listen_port=listener.request.port if listener else wire_port,
        requested_port=wire_port,
        decision="allow" if decision.allowed else "deny",
        rule=decision.rule,
        reason=decision.reason,
        opened_at=now,
        closed_at=None if decision.allowed else now,
    )
    if listener is None:
        connection.log.info("refused remote forward %s:%d: %s", wire_host[:256], wire_port, decision.reason)
        if not connection.refusal_counted():
            return False
    try:
        listener_id = await ctx.audit.record_listener(record)
    except AuditUnavailable as exc:
        connection.log.error("%s", exc)
        if listener is not None:
            listener.close_with("audit log unavailable")
            listener.row_known.set()
        return False
    if listener is None:
        return False
    listener.listener_id = listener_id
    listener.row_known.set()
    refusal = _refusal_before_open(connection, listener, policy)
    if refusal is not None:
        if listener.closed:  # closed before it had a row to close
            ctx.audit.close_listener(listener_id, listener.close_reason)
        else:
            listener.close_with(refusal)
        return False
    connection.log.info("listening on %s:%d for the client (%s)", listener.request.bind, listener.request.port,
                        decision.rule)
    return listener


async def _bind(
    connection: ChannelOwner, request: ListenRequest, wire_host: str, policy: Policy
) -> tuple[RemoteListener | None, str]:
    """Bind the granted address; for port 0 pick a free port inside the granted ranges."""
    if request.port != 0:
        candidates = [request.port]
    else:
        ranges = listen_ranges(policy, request.user, request.bind, request.now, request.extra_groups)
        candidates = _port_candidates(ranges)
        if not candidates:
            return None, f"{connection.user} has no port range granted on {request.bind}"
    loop = asyncio.get_running_loop()
    last_error = ""
    for port in candidates:
        bound = request.with_port(port)
        listener = RemoteListener(connection, bound, wire_host)
        try:
            listener.server = await loop.create_server(listener._accept, str(bound.bind), port, reuse_address=True)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                last_error = f"{_show(bound.bind)}:{port} is already in use"
                continue
            return None, f"cannot listen on {_show(bound.bind)}:{port}: {exc.strerror or exc}"
        return listener, ""
    return None, last_error


def _refusal_before_open(connection: ChannelOwner, listener: RemoteListener, decided_with: Policy) -> str | None:
    """Why a pending listener must not be announced after all: revoked while its row was written, or a newer
    policy loaded since it was decided no longer grants it, or the SSH connection went away."""
    if listener.closed:
        return listener.close_reason
    latest = connection.ctx.policy.latest
    if latest is not None and latest is not decided_with:
        decision = listener.recheck(latest, utc_now())
        if not decision.allowed:
            return f"revoked: {decision.reason}"
    if connection.conn is None:
        return "session ended"
    return None


def _port_candidates(ranges: list[tuple[int, int]]) -> list[int]:
    """Up to _PORT_ATTEMPTS ports spread over the granted ranges, in random order (no predictable reuse)."""
    ports: list[int] = []
    for low, high in ranges:
        count = high - low + 1
        if count <= _PORT_ATTEMPTS:
            ports.extend(range(low, high + 1))
        else:
            ports.extend(random.sample(range(low, high + 1), _PORT_ATTEMPTS))
    random.shuffle(ports)
    return ports[:_PORT_ATTEMPTS]


def _show(address: IPAddress) -> str:
    return f"[{address}]" if address.version == 6 else str(address)
