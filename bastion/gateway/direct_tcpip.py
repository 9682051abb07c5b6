"""direct-tcpip channels (ssh -J / -W / -L / -D): canonicalize and resolve the target once, ask the pure
policy engine, connect to exactly the checked address, commit the audit row, then let asyncssh confirm
the channel. Refusals are ChannelOpenErrors whose reason the user's ssh client prints."""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace

import asyncssh

from ..audit.writer import AUDIT_DOWN, AuditUnavailable, ChannelRecord
from ..clock import utc_now
from ..policy.authorized_keys import key_open_refusal
from ..policy.decide import channel_cap_refusal, evaluate
from ..policy.model import AccessRequest, Decision, Policy
from ..policy.netguard import IPAddress, TargetError, parse_host, parse_port
from .context import ChannelOwner
from .relay import Tunnel, connect_target
from .resolve import resolve



async def open_tunnel(connection: ChannelOwner, dest_host: str, dest_port: int) -> Tunnel:
    """Decide and connect one direct-tcpip request; returns the Tunnel or raises ChannelOpenError.

    Once allowed, the open is pending: it holds one of the user's channel slots and revocation sees it, from
    the moment it is decided until the channel is confirmed. Its audit row is committed before the first
    packet toward the target, and it is checked once more against the newest policy before it opens."""
    ctx = connection.ctx
    if connection.session_committed is not None:
        await connection.session_committed  # the channel row must not land before its session's
    if connection.session_id is None:
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, AUDIT_DOWN)
    opened_at = utc_now()
    request = policy = None
    try:
        decision, request, policy = await _decide(connection, dest_host, dest_port, opened_at)
        target_ip = str(decision.address if decision.address is not None else request.addresses[0])
    except TargetError as exc:
        decision, target_ip = Decision(False, str(exc), None, None), None
    except asyncio.CancelledError:
        raise
    except Exception:
        connection.log.exception("error deciding %r:%r", dest_host[:256], dest_port)
        decision, target_ip = Decision(False, "internal error while checking policy; ask your bastion admin to check its log", None, None), None
    if decision.allowed:  # the key's own authorized_keys options narrow the policy's grant further
        narrowed = key_open_refusal(connection.key_options, dest_host, dest_port)
        decision = Decision(False, narrowed, None, None) if narrowed else decision
    if decision.allowed:
        decision = channel_cap_refusal(connection.user, connection.open_channels_of_user(),
                                       ctx.config.max_channels_per_user) or decision
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
        if connection.refusal_counted():
            await _record_or_refuse(connection, record)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, decision.reason)

    assert decision.address is not None and request is not None
    tunnel = Tunnel(on_close=connection.tunnel_closed)
    tunnel.request = request
    connection.add_tunnel(tunnel)  # no await since the cap check: the slot is taken, revocation sees it
    try:
        # No packet leaves toward the target before a row naming it is committed.
        tunnel.channel_id = await _record_or_refuse(connection, record)
        if not tunnel.ended:
            await connect_target(tunnel, decision.address, dest_port, ctx.config.connect_timeout)
    except (OSError, asyncio.TimeoutError) as exc:
        reason = f"cannot connect to {format_target(decision.address, dest_port)}: {describe_os_error(exc)}"
        connection.log.info("%s", reason)
        tunnel.close_reason = reason
        tunnel.abort()
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, reason) from None
    except BaseException:
        tunnel.abort()
        raise
    refusal = _refusal_before_open(connection, tunnel, policy)
    if refusal is not None:
        tunnel.abort()  # also cuts a target leg that connected while the tunnel was revoked
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, refusal)
    connection.log.info("tunnel %d to %s:%d (%s)", tunnel.channel_id, dest_host[:256], dest_port, decision.rule)
    return tunnel


def _refusal_before_open(connection: ChannelOwner, tunnel: Tunnel, decided_with: Policy | None) -> str | None:
    """Why a pending tunnel must not open after all, or None: revoked while it connected, a newer policy
    loaded since it was decided no longer grants it, or the SSH connection went away."""
    if tunnel.ended:
        return tunnel.close_reason or "SSH connection closed"
    latest = connection.ctx.policy.latest
    if latest is not None and latest is not decided_with and tunnel.request is not None:
        request = replace(tunnel.request, now=utc_now(), extra_groups=connection.extra_groups(latest))
        decision = evaluate(latest, connection.ctx.guard, request)
        if not decision.allowed:
            tunnel.close_reason = f"revoked: {decision.reason}"
            return tunnel.close_reason
    if connection.conn is None:
        tunnel.close_reason = "SSH connection closed"
        return tunnel.close_reason
    return None


async def _decide(
    connection: ChannelOwner, dest_host: str, dest_port: int, now
) -> tuple[Decision, AccessRequest, Policy]:
    host = parse_host(dest_host)
    port = parse_port(dest_port)
    if isinstance(host, str):
        addresses = await resolve(host, port, connection.ctx.config.resolve_timeout)
        if not addresses:
            raise TargetError(f"cannot resolve {host}")
    else:
        addresses = (host,)
    policy = await connection.ctx.policy.current()
    request = AccessRequest(user=connection.user, host=host, addresses=addresses, port=port, now=now,
                            extra_groups=connection.extra_groups(policy))
    return evaluate(policy, connection.ctx.guard, request), request, policy


async def _record_or_refuse(connection: ChannelOwner, record: ChannelRecord) -> int:
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
