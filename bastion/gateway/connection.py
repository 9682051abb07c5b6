"""asyncssh glue: one `GatewayConnection` per SSH connection, translating callbacks into policy
questions, audit rows and tunnels. Who may reach what is decided in policy/decide.py; channel work is in
direct_tcpip.py (ssh -J/-L/-D) and remote_forward.py (ssh -R)."""

from __future__ import annotations

import asyncio
import ipaddress
import itertools
import logging
import random
import secrets
from typing import Any

import asyncssh

from .. import transport
from ..audit.writer import AUDIT_DOWN, AuditUnavailable, SessionRecord
from ..clock import utc_now
from ..policy.authorized_keys import key_login_refusal
from ..policy.certificates import (
    Certificate,
    certificate_key_options,
    certificate_refusal,
    describe_certificate,
    unreadable_refusal,
)
from ..policy.decide import login_refusal, session_cap_refusal
from ..policy.keys import weak_key_reason
from ..policy.krl import Credential
from ..policy.limits import is_exempt
from ..policy.model import Policy
from ..policy.netguard import canonical_address
from ..policy.revocation import revocation_refusal
from ..store.interface import PublicKey
from .auth_log import AuthEvents
from .banner import BannerSession
from .context import ServerContext
from .direct_tcpip import open_tunnel
from .remote_forward import open_listener
from .security_keys import SecurityKeys
from .session import SessionChannels
from .totp import SecondFactor

log = logging.getLogger("bastion.sshd")

_connection_numbers = itertools.count(1)


class ConnectionLog(logging.LoggerAdapter):
    """Every line of a connection starts with its context, read when the line is written: `[conn=c1 user=alice
    session=…]`. The same context rides along as record attributes (conn, user, session, client_ip, client_port)
    for the JSON log format."""

    def __init__(self, logger: logging.Logger, owner: "GatewayConnection"):
        super().__init__(logger, {})
        self.owner = owner

    def process(self, msg: str, kwargs: Any) -> tuple[str, Any]:
        owner = self.owner
        context = f"conn=c{owner.number}"
        fields: dict[str, Any] = {"conn": f"c{owner.number}"}
        if owner.user:
            context += f" user={owner.user}"
            fields["user"] = owner.user
        if owner.session_id:
            context += f" session={owner.session_id}"
            fields["session"] = owner.session_id
        if getattr(owner, "client_ip", None):
            fields["client_ip"], fields["client_port"] = owner.client_ip, owner.client_port
        fields["context"] = context
        kwargs["extra"] = {**fields, **kwargs.get("extra", {})}
        return f"[{context}] {msg}", kwargs


class GatewayConnection(SecurityKeys, SecondFactor, SessionChannels, asyncssh.SSHServer):
    """asyncssh's callbacks for one SSH connection: the limits before login, authentication, and the channel
    requests, handed to direct_tcpip, remote_forward and banner. The session's state and its channels are
    SessionChannels' (session.py)."""

    def __init__(self, context: ServerContext):
        super().__init__(context)
        self.number = next(_connection_numbers)
        self.failed_auths = 0
        self._keys: dict[str, PublicKey] = {}
        self._login_policy: Policy | None = None  # as read at the first auth request; re-read at session start
        self._counted_unauthenticated = False
        self._exempt = False  # inside penalty_exempt: no per-source penalty, no startup-limit drop
        self._server_fault = False  # refused for our own failure (audit down): not the source's fault
        self._session_row_queued = False  # the session row is on its way to the audit log: end it on close
        self._session_timer: asyncio.TimerHandle | None = None
        self._offered_ca: str | None = None  # the CA of the certificate examine_certificate just accepted (#21)
        self._certificate_key_type = ""
        self.log = ConnectionLog(log, self)
        self.auth_log = AuthEvents(self)  # the OpenSSH-worded lines fail2ban reads (auth_log.py)

    # ---- connection ---------------------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        """Apply the pre-authentication limits: penalized sources and the startup limit are dropped."""
        self.conn = conn
        peer = conn.get_extra_info("peername")
        if not peer:  # reset before it was accepted (uvloop then has no peer): nobody to serve, audit or penalize
            self.client_ip, self.client_port = "0.0.0.0", 0
            conn.abort()
            return
        self.client_ip = str(canonical_address(ipaddress.ip_address(peer[0].split("%", 1)[0])))
        self.client_port = int(peer[1])
        now = asyncio.get_running_loop().time()
        ctx = self.ctx
        # Read from the running config, so a SIGHUP reload changes the list for the next connection.
        self._exempt = is_exempt(self.client_ip, ctx.config.penalty_exempt)
        if not self._exempt and ctx.penalties.refused_until(self.client_ip, now) is not None:
            self.log.debug("dropped: source %s is penalized", self.client_ip)
            ctx.metrics.dropped("penalized")
            conn.abort()
            return
        # An exempt source still counts as unauthenticated (so others are dropped sooner), but is not dropped.
        if not self._exempt and ctx.startup_limit.should_drop(ctx.unauthenticated, random.random()):
            if not ctx.dropping:
                ctx.dropping = True
                log.warning("startup limit %s reached: dropping new unauthenticated connections",
                            ctx.startup_limit)
                ctx.audit.record_auth("", self.client_ip, self.client_port, "none", None, "failure",
                                      f"startup limit {ctx.startup_limit} reached; dropping connections")
            ctx.metrics.dropped("startup_limit")
            conn.abort()
            return
        if ctx.unauthenticated < ctx.startup_limit.start:
            ctx.dropping = False
        ctx.unauthenticated += 1
        self._counted_unauthenticated = True
        self.accepted_at = ctx.metrics.clock()  # handshake_done measures from here
        ctx.connections.add(self)
        ctx.no_connections.clear()
        transport.receive_in_place(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection is gone: close its tunnels, end its session row, count a failed source."""
        self.ctx.connections.discard(self)
        if not self.ctx.connections:
            self.ctx.no_connections.set()
        if self.session_id is not None:
            sessions = self.ctx.sessions_by_user.get(self.user, set())
            sessions.discard(self)
            if not sessions:
                self.ctx.sessions_by_user.pop(self.user, None)
        for timer in (self._unused_timer, self._session_timer):
            if timer is not None:
                timer.cancel()
        if self._counted_unauthenticated:
            self._counted_unauthenticated = False
            self.ctx.unauthenticated -= 1
            self.auth_log.closed_before_login(exc, self.end_reason)
            self._penalize(exc)
        had_tunnels = bool(self.tunnels)
        # Count the open tunnels' bytes now: their own close callbacks come later than this row.
        bytes_up = self.bytes_up + sum(t.bytes_up for t in self.tunnels)
        bytes_down = self.bytes_down + sum(t.bytes_down for t in self.tunnels)
        for tunnel in list(self.tunnels):
            tunnel.abort()
        if self.session_id is not None and self._session_row_queued:
            reason = self.end_reason or describe_disconnect(exc, had_tunnels)
            self.ctx.audit.end_session(self.session_id, reason, bytes_up, bytes_down)
            self.log.info("session %s ended: %s", self.session_id, reason)
            self.auth_log.disconnected(exc)
        self.conn = None

    def _penalize(self, exc: Exception | None) -> None:
        """A connection that never authenticated counts against its source (audited once per penalty), unless
        it was refused for the server's own fault: once the store is back, the next login must work."""
        if self._server_fault:
            return
        if isinstance(exc, asyncssh.ConnectionLost) and "Login timeout" in str(exc):
            self.ctx.audit.record_auth(self.user, self.client_ip, self.client_port, "none", None, "failure",
                                       "login grace time exceeded")
        if self._exempt:
            return  # penalty_exempt: never penalized (the login timeout above is still audited)
        length = self.ctx.penalties.failed(self.client_ip, asyncio.get_running_loop().time())
        if length is not None:
            self.ctx.metrics.penalized()
            reason = f"source refused for {length:g}s after repeated failed connections"
            self.log.warning("%s: %s", self.client_ip, reason)
            self.ctx.audit.record_auth(self.user, self.client_ip, self.client_port, "none", None, "failure", reason)

    def disconnect(self, reason: str) -> None:
        """Close the connection from our side, telling the client why."""
        self.end_reason = self.end_reason or reason
        if self.conn is not None:
            self.conn.disconnect(asyncssh.DISC_BY_APPLICATION, reason)

    # ---- authentication -----------------------------------------------------------------------

    async def begin_auth(self, username: str) -> bool:
        """Return True: authentication is always required (False would let the client in unchecked).

        The user's keys and the policy (for the account's expiry) are read here; an unknown user simply has
        none, so it fails exactly like a known user with an unknown key. Both are read again when the session
        would begin (`_begin_session`): what changes during the login counts."""
        self.accepted_at = self.ctx.metrics.handshake_done(self.accepted_at)  # the first request only
        self.user = username[:256]
        self._keys, self._login_policy = await self._read_identity()
        refusal = self.ctx.store.login_refusal()  # (#22) a shared store unreachable for longer than its grace
        if refusal is not None:
            self._keys = {}  # no key is accepted; the client is told why
            self._server_fault = True  # not the client's fault: no penalty
            self.log.error("refusing login: %s", refusal)
            self.ctx.audit.record_auth(self.user, self.client_ip, self.client_port, "none", None, "failure", refusal)
            self.disconnect(refusal)
        self.auth_log.user_named(self.user in self._login_policy.users)
        await self.second_factor_begin(self._login_policy)  # a one-time code after the key? (totp.py, #21)
        return True

    async def _read_identity(self) -> tuple[dict[str, PublicKey], Policy]:
        keys = await asyncio.to_thread(self.ctx.store.user_keys, self.user)
        policy = await self.ctx.policy.current()
        return {key.fingerprint: key for key in keys}, policy

    # public_key_auth_supported, kbdint_auth_supported: SecondFactor's (keys first, then a one-time code if needed)

    def password_auth_supported(self) -> bool:
        return False

    def host_based_auth_supported(self) -> bool:
        return False

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Return True if `key` is one of the user's keys and the account may log in now. This only says whether
        the key would be accepted; the client proves possession afterwards, so success is recorded once the
        session begins (auth_completed, then _begin_session)."""
        fingerprint = key.get_fingerprint("sha256")
        if fingerprint in self._keys:
            assert self._login_policy is not None
            reason = weak_key_reason(key) or login_refusal(self._login_policy, self.user, fingerprint,
                                                           frozenset(self._keys), utc_now()) \
                or key_login_refusal(self._keys[fingerprint].options, ipaddress.ip_address(self.client_ip), utc_now())
            reason = reason or self.security_key_type_refusal(key)  # (#21) only security keys? security_keys.py
            credential = Credential(bytes(key.public_data))
            reason = reason or revocation_refusal(self._login_policy, self.ctx.revoked_keys, credential)  # (#21)
            if reason is None:
                if not self.ctx.audit.healthy:
                    self._refuse_unaudited(fingerprint)
                    return False
                self.credential = credential
                self.key_fingerprint = fingerprint
                self.key_options = self._keys[fingerprint].options  # from=, permitopen=, … of its line
                self.certificate = None  # a certificate offered before this key does not log in
                return True
        else:
            reason = "key not accepted"
        self.auth_log.failed_publickey(key)
        self._publickey_refused(fingerprint, reason)
        return False

    def examine_certificate(self, username: str, certificate: Certificate, key: asyncssh.SSHKey) -> bool:
        """Return True if this user certificate may log the user in (policy/certificates.py; called by
        transport/certificates.py once asyncssh has checked the CA's signature). asyncssh checks it again and the
        client proves possession of `key` afterwards, so success is recorded when the session begins. A refusal is
        logged and audited with the certificate's key id, serial and CA, and counts toward max_auth_tries."""
        assert self._login_policy is not None
        fingerprint = key.get_fingerprint("sha256")
        self._offered_ca = None
        reason = certificate_refusal(self._login_policy, certificate, self.user, ipaddress.ip_address(self.client_ip),
                                     utc_now())
        reason = reason or self.security_key_type_refusal(key)  # (#21) only security keys? security_keys.py
        credential = Credential(bytes(key.public_data), certificate.ca_key, certificate.serial, certificate.key_id)
        reason = reason or revocation_refusal(self._login_policy, self.ctx.revoked_keys, credential)  # (#21)
        if reason is None:
            if not self.ctx.audit.healthy:
                self._refuse_unaudited(fingerprint)
                return False
            self._offered_ca = certificate.ca_fingerprint
            self.certificate = certificate
            self.credential = credential
            self.key_fingerprint = fingerprint
            self.key_options = certificate_key_options(certificate)  # no permit-port-forwarding: no tunnels
            algorithm = key.get_algorithm()
            self._certificate_key_type = algorithm.decode() if isinstance(algorithm, bytes) else str(algorithm)
            return True
        self.auth_log.failed_publickey(key, certificate)
        self._publickey_refused(fingerprint, f"certificate refused: {reason}: {describe_certificate(certificate)}",
                                certificate)
        return False

    def certificate_unreadable(self, username: str, key_data: bytes, problem: str) -> None:
        """A certificate asyncssh could not read (an unknown critical option, a bad signature) was refused: audit
        it, named by what it claims, and count it toward max_auth_tries like any refused key."""
        self._publickey_refused(None, unreadable_refusal(key_data, problem))

    def _publickey_refused(self, fingerprint: str | None, reason: str,
                           certificate: Certificate | None = None) -> None:
        """A refused key or certificate: logged, audited, counted toward max_auth_tries (then disconnected)."""
        self.log.info("key %s refused: %s", fingerprint or "(certificate)", reason)
        self.ctx.audit.record_auth(self.user, self.client_ip, self.client_port, "publickey", fingerprint, "failure",
                                   reason, certificate=certificate)
        self.count_failure("publickey")

    def count_failure(self, method: str) -> bool:
        """One more failed attempt, its own row already written; at max_auth_tries the connection is closed, with
        a row and sshd's line saying so. Returns True when it was."""
        self.failed_auths += 1
        if self.failed_auths < self.ctx.config.max_auth_tries or self.conn is None:
            return False
        self.log.info("too many authentication failures (%d)", self.failed_auths)
        self.auth_log.too_many_failures()
        self.ctx.audit.record_auth(self.user, self.client_ip, self.client_port, method, None, "failure",
                                   "too many authentication failures")
        self.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "Too many authentication failures")
        return True

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        """Return True only for the CA of the certificate that `examine_certificate` has just accepted: a
        certificate nobody examined (the transport hook missing) is refused."""
        return self._offered_ca is not None and key.get_fingerprint("sha256") == self._offered_ca

    def _refuse_unaudited(self, fingerprint: str | None) -> None:
        """Fail closed: nothing may happen that the audit log cannot record. The refusal is itself a write,
        so it also tells the writer when the store has recovered. It is the server's fault, not the client's:
        it does not count toward the source's penalty."""
        self._server_fault = True
        self.log.error("refusing login: the audit log cannot be written")
        self.ctx.audit.record_auth(self.user, self.client_ip, self.client_port, "publickey", fingerprint, "failure",
                                   "audit log unavailable")
        self.disconnect(AUDIT_DOWN)

    def auth_completed(self) -> None:
        """The client proved possession of an accepted key. From here the connection is a session that
        revocation sees; it begins for real in `_begin_session`, which channels and the banner wait for.
        The per-user session cap and the session timers apply now."""
        assert self.conn is not None and self.key_fingerprint is not None
        ctx = self.ctx
        self._counted_unauthenticated = False
        ctx.unauthenticated -= 1
        ctx.penalties.succeeded(self.client_ip)
        self.session_id = secrets.token_hex(6)
        self.started_at = utc_now()
        accepted = self._keys.get(self.key_fingerprint)
        if self.totp_verified:  # sshd names the last method of the chain
            self.auth_log.accepted_keyboard_interactive()
        else:
            certificate = self.certificate
            self.auth_log.accepted_publickey(self._certificate_key_type if certificate or not accepted
                                             else accepted.key_type, self.key_fingerprint, certificate)
        ctx.sessions_by_user.setdefault(self.user, set()).add(self)
        self.session_committed = asyncio.ensure_future(self._begin_session())
        refusal = session_cap_refusal(self.user, len(ctx.sessions_of(self.user)), ctx.config.max_sessions_per_user)
        if refusal is not None:
            self.disconnect(refusal.reason)
            return
        loop = asyncio.get_running_loop()
        if ctx.config.max_session_seconds:
            self._session_timer = loop.call_later(
                ctx.config.max_session_seconds, self.disconnect, "maximum session length reached"
            )
        self._channels_changed()

    async def _begin_session(self) -> None:
        """Decide the login against the store as it is now, not as it was at the first auth request: a key
        removed, or a user removed or expired, while the client was authenticating means no session. Then
        record the login and commit the session row, before any channel may open."""
        assert self.key_fingerprint is not None
        try:
            keys, policy = await self._read_identity()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("cannot read the user's keys and policy")
            self._forget_session()
            self.disconnect("internal error while checking the login; ask your bastion admin to check its log")
            return
        if self.certificate is not None:  # (#21) the certificate against the policy as it is now
            refusal = certificate_refusal(policy, self.certificate, self.user, ipaddress.ip_address(self.client_ip),
                                          utc_now())
        else:
            refusal = login_refusal(policy, self.user, self.key_fingerprint, frozenset(keys), utc_now())
        if refusal is None and self.certificate is None:  # the key's options as stored now: an import may have
            self.key_options = keys[self.key_fingerprint].options  # narrowed them meanwhile
            refusal = key_login_refusal(self.key_options, ipaddress.ip_address(self.client_ip), utc_now())
        refusal = refusal or self.second_factor_refusal(policy)  # (#21) a code the policy wants now
        if refusal is None and self.credential is not None:  # (#21) revoked during the login (a KRL, an apply)
            refusal = revocation_refusal(policy, self.ctx.revoked_keys, self.credential)
        refusal = refusal or self.security_key_session_refusal(  # (#21) security keys as the policy wants now
            policy, self._certificate_key_type if self.certificate is not None else keys[self.key_fingerprint].key_type)
        if self.conn is None:  # gone while we read: no session to record
            self._forget_session()
            return
        if refusal is not None:
            self.log.info("login refused: %s during login", refusal)
            self.ctx.audit.record_auth(self.user, self.client_ip, self.client_port, self.auth_method,
                                       self.key_fingerprint, "failure", f"{refusal} during login",
                                       certificate=self.certificate)
            self._forget_session()
            self.disconnect(f"login refused: {refusal}")
            return
        accepted = "key accepted" if self.certificate is None else \
            f"certificate accepted: {describe_certificate(self.certificate)}"
        accepted += self.security_key_note()  # (#21) what the security key asserted
        if self.totp_verified:
            accepted += " with a verification code"
        self.ctx.audit.record_auth(self.user, self.client_ip, self.client_port, self.auth_method, self.key_fingerprint,
                                   "success", accepted, certificate=self.certificate)
        self.log.info("logged in from %s:%d with %s%s", self.client_ip, self.client_port, self.key_fingerprint,
                      "" if self.certificate is None else f" ({accepted})")
        self._session_row_queued = True
        try:
            await self.ctx.audit.open_session(SessionRecord(
                id=self.session_id or "",
                user=self.user,
                client_ip=self.client_ip,
                client_port=self.client_port,
                key_fingerprint=self.key_fingerprint,
                client_version=str(self.conn.get_extra_info("client_version") or "")[:256],
                started_at=self.started_at,
                certificate=self.certificate,  # (#21) its columns
            ))
        except AuditUnavailable:
            self._forget_session()  # there is no row to end
            self._refuse_unaudited(self.key_fingerprint)

    def _forget_session(self) -> None:
        """The session never began: nothing to end in the audit log, nothing for the per-user cap to count."""
        sessions = self.ctx.sessions_by_user.get(self.user, set())
        sessions.discard(self)
        if not sessions:
            self.ctx.sessions_by_user.pop(self.user, None)
        self.session_id = None
        self._session_row_queued = False

    # ---- channels -----------------------------------------------------------------------------

    def session_requested(self) -> asyncssh.SSHServerSession:
        """A shell gets a short text about the user's access; commands and subsystems are refused."""
        return BannerSession(self)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        """direct-tcpip (ssh -J / -W / -L / -D): returns a coroutine that asyncssh awaits before confirming
        the channel. It resolves to the Tunnel, or raises ChannelOpenError (administratively prohibited for
        a refusal, connect failed for an unreachable target)."""
        return self.ctx.metrics.channel_open("direct-tcpip", open_tunnel(self, dest_host, dest_port))

    def server_requested(self, listen_host: str, listen_port: int) -> Any:
        """tcpip-forward (ssh -R): returns a coroutine that asyncssh awaits; it resolves to our own listener
        (granted and bound) or False (refused; the client reports the forward failed)."""
        return open_listener(self, listen_host, listen_port)

    def unix_connection_requested(self, dest_path: str) -> bool:
        """Forwarding to UNIX sockets on the bastion is never allowed."""
        return False

    def unix_server_requested(self, listen_path: str) -> bool:
        return False



def describe_disconnect(exc: Exception | None, had_tunnels: bool) -> str:
    """A client that closes TCP with no tunnel open (ssh -W does) has disconnected, not been lost."""
    if exc is None or (isinstance(exc, asyncssh.DisconnectError) and exc.code == asyncssh.DISC_BY_APPLICATION):
        return "client disconnected"
    if isinstance(exc, asyncssh.ConnectionLost):
        return "connection lost with tunnels open" if had_tunnels else "client disconnected"
    return f"connection lost: {exc}"
