"""asyncssh glue: one `GatewayConnection` per SSH connection, translating callbacks into
policy questions, audit rows and tunnels. Who may do what is decided in `policy.py`, not here."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import os
import logging
import secrets
import socket
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import asyncssh

from .audit import AuditLog, AuditUnavailable, ChannelRecord, SessionRecord
from .banner import BannerSession
from .config import Config
from .db import utc_now
from .netguard import IPAddress, NetGuard, TargetError, canonical_address, parse_host, parse_port
from .policy import AccessRequest, Decision, Policy, evaluate
from .store import PublicKey, Store
from .remote_forward import open_listener
from .tunnel import Tunnel, connect_target

log = logging.getLogger("bastion.sshd")

_connection_numbers = itertools.count(1)


class PolicyCache:
    """The policy in force, reloaded from the store when its version changes (checked on each use, in a
    worker thread, so `policy apply` takes effect at the next channel open without a restart)."""

    def __init__(self, store: Store, on_change: Callable[[Policy], None] | None = None):
        self._store = store
        self._version = -1
        self._policy: Policy | None = None
        self._on_change = on_change

    def _refresh(self) -> tuple[bool, Policy]:
        version = self._store.policy_version()
        if version != self._version or self._policy is None:
            self._version, self._policy = self._store.load_policy()
            return True, self._policy
        return False, self._policy

    async def current(self) -> Policy:
        changed, policy = await asyncio.to_thread(self._refresh)
        if changed and self._on_change is not None:
            self._on_change(policy)
        return policy


@dataclass(slots=True)
class ServerContext:
    """What every connection shares; passed in through the server factory (no module globals)."""

    config: Config
    store: Store
    audit: AuditLog
    policy: PolicyCache
    guard: NetGuard
    connections: set["GatewayConnection"] = field(default_factory=set)


class ConnectionLog(logging.LoggerAdapter):
    def process(self, msg: str, kwargs: Any) -> tuple[str, Any]:
        return f"[{self.extra['context']}] {msg}", kwargs


class GatewayConnection(asyncssh.SSHServer):
    """One SSH connection: authentication, the session channel, and direct-tcpip tunnels."""

    def __init__(self, context: ServerContext):
        self.ctx = context
        self.number = next(_connection_numbers)
        self.conn: asyncssh.SSHServerConnection | None = None
        self.client_ip = ""
        self.client_port = 0
        self.user = ""
        self.session_id: str | None = None
        self.key_fingerprint: str | None = None
        self.failed_auths = 0
        self.tunnels: set[Tunnel] = set()
        self.listeners: set = set()
        self.bytes_up = 0
        self.bytes_down = 0
        self.end_reason: str | None = None
        self.started_at = None
        self._keys: dict[str, PublicKey] = {}
        self.log = ConnectionLog(log, {"context": f"conn=c{self.number}"})

    # ---- connection ---------------------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("", 0)
        self.client_ip = str(canonical_address_text(peer[0]))
        self.client_port = int(peer[1])
        self.ctx.connections.add(self)
        self.log.debug("connection from %s:%d", self.client_ip, self.client_port)

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone: close its tunnels and end its session row."""
        self.ctx.connections.discard(self)
        had_tunnels = bool(self.tunnels)
        for tunnel in list(self.tunnels):
            tunnel.abort()
        if self.session_id is not None:
            reason = self.end_reason or describe_disconnect(exc, had_tunnels)
            self.ctx.audit.end_session(self.session_id, reason, self.bytes_up, self.bytes_down)
            self.log.info("session %s ended: %s", self.session_id, reason)
        elif isinstance(exc, asyncssh.ConnectionLost) and "Login timeout" in str(exc):
            self.ctx.audit.record_auth(
                self.user, self.client_ip, self.client_port, "none", None, "failure", "login grace time exceeded"
            )

    def disconnect(self, reason: str) -> None:
        """Close the connection from our side, telling the client why."""
        self.end_reason = reason
        if self.conn is not None:
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, reason)

    def describe(self) -> dict[str, Any]:
        """A live view for `bastion sessions list`."""
        return {
            "id": self.session_id,
            "user": self.user,
            "client_ip": self.client_ip,
            "client_port": self.client_port,
            "started_at": self.started_at,
            "channels": len(self.tunnels),
            "listeners": len(self.listeners),
            "bytes_up": self.bytes_up + sum(t.bytes_up for t in self.tunnels),
            "bytes_down": self.bytes_down + sum(t.bytes_down for t in self.tunnels),
        }

    def revalidate(self, policy: Policy, fingerprints: frozenset[str], now) -> list[str]:
        """Re-check a live session against the access now in force (after a policy or user change, or an
        expiry). Ends the session if its user or key is gone or expired; closes tunnels and listeners that
        are no longer granted. Returns what was ended, for the operator."""
        if self.session_id is None:
            return []
        reason = session_revocation(policy, self.user, self.key_fingerprint, fingerprints, now)
        if reason is not None:
            self.log.info("ending session: %s", reason)
            self.disconnect(reason)
            return [f"session {self.session_id} ({self.user}): {reason}"]
        ended = []
        for tunnel in list(self.tunnels):
            request = replace(tunnel.request, now=now)
            decision = evaluate(policy, self.ctx.guard, request)
            if not decision.allowed:
                self.log.info("closing tunnel %s: %s", tunnel.channel_id, decision.reason)
                tunnel.close_reason = f"revoked: {decision.reason}"
                tunnel.close()
                ended.append(f"channel {tunnel.channel_id} ({self.user}): {decision.reason}")
        for listener in list(self.listeners):
            decision = listener.recheck(policy, now)
            if not decision.allowed:
                listener.close_with(f"revoked: {decision.reason}")
                ended.append(f"listener {listener.listener_id} ({self.user}): {decision.reason}")
        return ended

    # ---- authentication -----------------------------------------------------------------------

    async def begin_auth(self, username: str) -> bool:
        """Return True: authentication is always required (False would let the client in unchecked).

        The user's keys are loaded here; an unknown user simply has none, so it fails exactly like a
        known user with an unknown key."""
        self.user = username
        self.log = ConnectionLog(log, {"context": f"conn=c{self.number} user={username}"})
        keys = await asyncio.to_thread(self.ctx.store.user_keys, username)
        self._keys = {key.fingerprint: key for key in keys}
        return True

    def public_key_auth_supported(self) -> bool:
        """Public keys are the only method offered."""
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Return True if `key` is one of the user's keys. This only says whether the key would be
        accepted; the client proves possession afterwards, so success is recorded in auth_completed."""
        fingerprint = key.get_fingerprint("sha256")
        if fingerprint in self._keys:
            self.key_fingerprint = fingerprint
            return True
        self.failed_auths += 1
        self.ctx.audit.record_auth(
            username, self.client_ip, self.client_port, "publickey", fingerprint, "failure", "key not accepted"
        )
        if self.failed_auths >= self.ctx.config.max_auth_tries:
            self.log.info("too many authentication failures (%d)", self.failed_auths)
            self.ctx.audit.record_auth(
                username, self.client_ip, self.client_port, "publickey", None, "failure",
                "too many authentication failures",
            )
            assert self.conn is not None
            self.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "Too many authentication failures")
        return False

    def auth_completed(self) -> None:
        """The client proved possession of an accepted key: record the login and open the session row."""
        assert self.conn is not None and self.key_fingerprint is not None
        self.session_id = secrets.token_hex(6)
        self.started_at = utc_now()
        self.log = ConnectionLog(log, {"context": f"conn=c{self.number} user={self.user} session={self.session_id}"})
        self.ctx.audit.record_auth(
            self.user, self.client_ip, self.client_port, "publickey", self.key_fingerprint, "success", "key accepted"
        )
        self.ctx.audit.open_session(
            SessionRecord(
                id=self.session_id,
                user=self.user,
                client_ip=self.client_ip,
                client_port=self.client_port,
                key_fingerprint=self.key_fingerprint,
                client_version=str(self.conn.get_extra_info("client_version") or ""),
                started_at=self.started_at,
            )
        )
        self.log.info("logged in from %s:%d with %s", self.client_ip, self.client_port, self.key_fingerprint)

    # ---- channels -----------------------------------------------------------------------------

    def session_requested(self) -> asyncssh.SSHServerSession:
        """A shell gets a short text about the user's access; commands and subsystems are refused."""
        return BannerSession(self)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        """direct-tcpip (ssh -J / -W / -L / -D): decide, connect, then confirm the channel.

        Returns a coroutine; asyncssh awaits it before confirming. It resolves to the Tunnel, or raises
        ChannelOpenError (administratively prohibited for a refusal, connect failed for an unreachable target)."""
        return self._open_tunnel(dest_host, dest_port)

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        """tcpip-forward (ssh -R): returns a coroutine that asyncssh awaits; it resolves to our own listener
        (granted and bound) or False (refused; the client reports the forward failed)."""
        return open_listener(self, listen_host, listen_port)

    def unix_connection_requested(self, dest_path: str) -> bool:
        """Forwarding to UNIX sockets on the bastion is never allowed."""
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        return False

    async def _open_tunnel(self, dest_host: str, dest_port: int) -> Tunnel:
        opened_at = utc_now()
        request = None
        try:
            decision, request = await self._decide(dest_host, dest_port, opened_at)
            target_ip = str(decision.address if decision.address is not None else request.addresses[0])
        except TargetError as exc:
            decision, target_ip = Decision(False, str(exc), None, None), None
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("error deciding %r:%r", dest_host, dest_port)
            decision, target_ip = Decision(False, "internal error while checking policy", None, None), None
        record = ChannelRecord(
            session_id=self.session_id or "",
            user=self.user,
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
            self.log.info("refused %s:%d: %s", dest_host[:256], dest_port, decision.reason)
            await self._record_or_refuse(record)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, decision.reason)

        assert decision.address is not None
        tunnel = Tunnel(on_close=self._tunnel_closed)
        tunnel.request = request
        try:
            await connect_target(tunnel, decision.address, dest_port, self.ctx.config.connect_timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            reason = f"cannot connect to {format_target(decision.address, dest_port)}: {describe_os_error(exc)}"
            self.log.info("%s", reason)
            record = replace(record, reason=reason, closed_at=utc_now())
            await self._record_or_refuse(record)
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, reason) from None
        try:
            tunnel.channel_id = await self.ctx.audit.record_channel(record)
        except BaseException:
            tunnel.abort()
            raise
        if self.conn is None or self.session_id is None:
            tunnel.abort()
            raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "SSH connection closed")
        self.tunnels.add(tunnel)
        self.log.info("tunnel %d to %s:%d (%s)", tunnel.channel_id, dest_host[:256], dest_port, decision.rule)
        return tunnel

    async def _decide(self, dest_host: str, dest_port: int, now) -> tuple[Decision, AccessRequest]:
        """Canonicalize and resolve the target once, then ask the pure policy engine."""
        host = parse_host(dest_host)
        port = parse_port(dest_port)
        if isinstance(host, str):
            addresses = await self._resolve(host, port)
            if not addresses:
                raise TargetError(f"cannot resolve {host}")
        else:
            addresses = (host,)
        policy = await self.ctx.policy.current()
        request = AccessRequest(user=self.user, host=host, addresses=addresses, port=port, now=now)
        return evaluate(policy, self.ctx.guard, request), request

    async def _resolve(self, host: str, port: int) -> tuple[IPAddress, ...]:
        loop = asyncio.get_running_loop()
        try:
            infos = await asyncio.wait_for(
                loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), self.ctx.config.resolve_timeout
            )
        except (OSError, asyncio.TimeoutError):
            return ()
        addresses: list[IPAddress] = []
        for family, _, _, _, sockaddr in infos:
            if family not in (socket.AF_INET, socket.AF_INET6):
                continue
            address = canonical_address_text(sockaddr[0])
            if address not in addresses:
                addresses.append(address)
        return tuple(addresses)

    async def _record_or_refuse(self, record: ChannelRecord) -> int:
        try:
            return await self.ctx.audit.record_channel(record)
        except AuditUnavailable as exc:
            self.log.error("%s", exc)
            raise asyncssh.ChannelOpenError(
                asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED, "audit log unavailable; try again later"
            ) from None

    def _tunnel_closed(self, tunnel: Tunnel) -> None:
        self.tunnels.discard(tunnel)
        self.bytes_up += tunnel.bytes_up
        self.bytes_down += tunnel.bytes_down
        if tunnel.channel_id is not None:
            self.ctx.audit.close_channel(tunnel.channel_id, tunnel.bytes_up, tunnel.bytes_down)


def canonical_address_text(text: str) -> IPAddress:
    """A socket address string (maybe with a %zone) as a canonical address object."""
    return canonical_address(ipaddress.ip_address(text.split("%", 1)[0]))


def session_revocation(
    policy: Policy, user: str, fingerprint: str | None, fingerprints: frozenset[str], now
) -> str | None:
    """Why a logged-in session may no longer continue, or None. The key and user checks are about identity,
    not grants, so they live here; grants are re-checked with evaluate()."""
    user_policy = policy.users.get(user)
    if user_policy is None:
        return "user removed"
    if fingerprint not in fingerprints:
        return "key removed"
    if user_policy.expires is not None and now >= user_policy.expires:
        return f"access expired at {user_policy.expires:%Y-%m-%dT%H:%M:%SZ}"
    return None


def describe_disconnect(exc: Exception | None, had_tunnels: bool) -> str:
    """A client that closes TCP with no tunnel open (ssh -W does) has disconnected, not been lost."""
    if exc is None or (isinstance(exc, asyncssh.DisconnectError) and exc.code == asyncssh.DISC_BY_APPLICATION):
        return "client disconnected"
    if isinstance(exc, asyncssh.ConnectionLost):
        return "connection lost with tunnels open" if had_tunnels else "client disconnected"
    return f"connection lost: {exc}"


def format_target(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


def describe_os_error(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__
