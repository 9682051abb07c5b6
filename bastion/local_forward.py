"""direct-tcpip channels (ssh -J / -W / -L / -D): canonicalize and resolve the target once, ask the pure
policy engine, connect to exactly the checked address, commit the audit row, then let asyncssh confirm
the channel. Refusals are ChannelOpenErrors whose reason the user's ssh client prints."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from dataclasses import replace
from typing import TYPE_CHECKING

import asyncssh

from .audit import AUDIT_DOWN, AuditUnavailable, ChannelRecord
from .db import utc_now
from .netguard import IPAddress, TargetError, canonical_address, parse_host, parse_port
from .policy import AccessRequest, Decision, evaluate
from .tunnel import Tunnel, connect_target

if TYPE_CHECKING:
    from .sshd import GatewayConnection


async def open_tunnel(connection: "GatewayConnection", dest_host: str, dest_port: int) -> Tunnel:
    """Decide and connect one direct-tcpip request; returns the Tunnel or raises ChannelOpenError."""
    ctx = connection.ctx
    if connection.session_committed is not None:
        await connection.session_committed  # the channel row must not land before its session's
    if connection.session_id is None:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, AUDIT_DOWN)
    opened_at = utc_now()
    request = None
    try:
        decision, request = await _decide(connection, dest_host, dest_port, opened_at)
        target_ip = str(decision.address if decision.address is not None else request.addresses[0])
    except TargetError as exc:
        decision, target_ip = Decision(False, str(exc), None, None), None
    except asyncio.CancelledError:
        raise
    except Exception:
        connection.log.exception("error deciding %r:%r", dest_host[:256], dest_port)
        decision, target_ip = Decision(False, "internal error while checking policy; ask your bastion admin to check its log", None, None), None
    if decision.allowed and connection.open_channels_of_user() >= ctx.config.max_channels_per_user:
        limit = ctx.config.max_channels_per_user
        decision = Decision(False, f"too many open channels for {connection.user} (limit {limit}); close some or ask your bastion admin", None, None)
    record = ChannelRecord(
        session_id=connection.session_id or "",
        user=connection.user,
        kind="direct-tcpip",
        target_host=dest_host[:1024],
        target_ip=target_ip,
        target_port=dest_port,
        decision="allow" if decision.allowed else "deny",
        rule=decision.rule,
        reason=decision.reason,
        opened_at=opened_at,
        closed_at=None if decision.allowed else opened_at,  # a refused channel never opens
    )
    if not decision.allowed:
        connection.log.info("refused %s:%d: %s", dest_host[:256], dest_port, decision.reason)
        await _record_or_refuse(connection, record)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, decision.reason)

    assert decision.address is not None
    tunnel = Tunnel(on_close=connection.tunnel_closed)
    tunnel.request = request
    try:
        await connect_target(tunnel, decision.address, dest_port, ctx.config.connect_timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        reason = f"cannot connect to {format_target(decision.address, dest_port)}: {describe_os_error(exc)}"
        connection.log.info("%s", reason)
        await _record_or_refuse(connection, replace(record, reason=reason, closed_at=utc_now()))
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, reason) from None
    try:
        tunnel.channel_id = await _record_or_refuse(connection, record)
    except BaseException:
        tunnel.abort()
        raise
    if connection.conn is None:
        tunnel.abort()
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "SSH connection closed")
    connection.add_tunnel(tunnel)
    connection.log.info("tunnel %d to %s:%d (%s)", tunnel.channel_id, dest_host[:256], dest_port, decision.rule)
    return tunnel


async def _decide(
    connection: "GatewayConnection", dest_host: str, dest_port: int, now
) -> tuple[Decision, AccessRequest]:
    host = parse_host(dest_host)
    port = parse_port(dest_port)
    if isinstance(host, str):
        addresses = await _resolve(host, port, connection.ctx.config.resolve_timeout)
        if not addresses:
            raise TargetError(f"cannot resolve {host}")
    else:
        addresses = (host,)
    policy = await connection.ctx.policy.current()
    request = AccessRequest(user=connection.user, host=host, addresses=addresses, port=port, now=now)
    return evaluate(policy, connection.ctx.guard, request), request


async def _resolve(host: str, port: int, timeout: float) -> tuple[IPAddress, ...]:
    """Every address the name resolves to, canonical and in resolver order; () when it does not resolve."""
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout)
    except (OSError, asyncio.TimeoutError):
        return ()
    addresses: list[IPAddress] = []
    for family, _, _, _, sockaddr in infos:
        if family in (socket.AF_INET, socket.AF_INET6):
            address = canonical_address(ipaddress.ip_address(sockaddr[0].split("%", 1)[0]))
            if address not in addresses:
                addresses.append(address)
    return tuple(addresses)


async def _record_or_refuse(connection: "GatewayConnection", record: ChannelRecord) -> int:
    """Commit the channel's row; if the audit log cannot take it, the channel is refused (fail closed)."""
    try:
        return await connection.ctx.audit.record_channel(record)
    except AuditUnavailable as exc:
        connection.log.error("%s", exc)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, AUDIT_DOWN) from None


def format_target(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def describe_os_error(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__
