"""One logged-in session's state and the registry of its channels: the tunnels and listeners it holds (pending ones
included, so caps and revocation see them), its byte counts, its refusal rate, the unused-session timer, and the
re-check a revocation runs over all of it. GatewayConnection (connection.py) is the asyncssh side of the same
object; the channel handlers see it through the ChannelOwner protocol (context.py)."""

from __future__ import annotations

import asyncio
import collections
import logging
from dataclasses import replace
from typing import Any

from ..policy.authorized_keys import KeyOptions
from ..policy.certificates import Certificate, certificate_groups, certificate_session_refusal
from ..policy.decide import evaluate, login_refusal
from ..policy.krl import Credential
from ..policy.model import Policy
from ..policy.revocation import revocation_refusal
from .context import ServerContext
from .relay import Tunnel


class SessionChannels:
    """State shared by the connection's callbacks and its channel handlers."""

    log: logging.LoggerAdapter

    def __init__(self, context: ServerContext):
        self.ctx = context
        self.conn: Any = None  # the asyncssh connection; None once it is gone
        self.client_ip = ""
        self.client_port = 0
        self.user = ""
        self.session_id: str | None = None
        self.started_at = None
        self.key_fingerprint: str | None = None
        self.key_options = KeyOptions()  # the authorized_keys options of the key that logged in
        self.certificate: Certificate | None = None  # the user certificate that logged in, if one did (#21)
        self.credential: Credential | None = None  # the key or certificate that logged in, for revocation (#21)
        self.end_reason: str | None = None
        self.session_committed: asyncio.Future | None = None  # the session row; channels wait for it
        self.tunnels: set[Tunnel] = set()
        self.listeners: set = set()
        self.bytes_up = 0  # of closed tunnels; open ones count their own
        self.bytes_down = 0
        self._refusals: collections.deque[float] = collections.deque()  # times of recent refused requests
        self._unused_timer: asyncio.TimerHandle | None = None

    def disconnect(self, reason: str) -> None:
        raise NotImplementedError  # the connection's (connection.py)

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

    def extra_groups(self, policy: Policy) -> tuple[str, ...]:
        """The groups whose rules this session has besides its user's (#21): the certificate's principals that
        name groups, where its CA says principals_as_groups = true; () for a key login."""
        if self.certificate is None:
            return ()
        return certificate_groups(policy, self.certificate, self.user)

    def revalidate(self, policy: Policy, fingerprints: frozenset[str], now) -> list[str]:
        """Re-check a live session against the access now in force (after a policy or user change, or an
        expiry). Ends the session if its user or key is gone or expired; closes tunnels and listeners that
        are no longer granted. Returns what was ended, for the operator."""
        if self.session_id is None:
            return []
        if self.certificate is not None:
            reason = certificate_session_refusal(policy, self.certificate.ca_fingerprint, self.user, now)
        else:
            reason = login_refusal(policy, self.user, self.key_fingerprint, fingerprints, now)
        if reason is None and self.credential is not None:  # (#21) revoked by the policy or a revoked_keys file
            reason = revocation_refusal(policy, self.ctx.revoked_keys, self.credential, live=True)
        if reason is not None:
            self.log.info("ending session: %s", reason)
            self.disconnect(reason)
            return [f"session {self.session_id} ({self.user}): {reason}"]
        ended = []
        for tunnel in list(self.tunnels):
            if tunnel.request is None:  # an inbound -R connection: it lives with its listener's session
                continue
            decision = evaluate(policy, self.ctx.guard,
                                replace(tunnel.request, now=now, extra_groups=self.extra_groups(policy)))
            if not decision.allowed:  # pending opens too: they are in the set from the moment they are decided
                self.log.info("closing tunnel %s: %s", tunnel.channel_id, decision.reason)
                tunnel.revoke(f"revoked: {decision.reason}")
                ended.append(f"channel {tunnel.channel_id} ({self.user}): {decision.reason}")
        for listener in list(self.listeners):
            decision = listener.recheck(policy, now)
            if not decision.allowed:
                listener.close_with(f"revoked: {decision.reason}")
                ended.append(f"listener {listener.listener_id} ({self.user}): {decision.reason}")
        return ended

    def refusal_counted(self) -> bool:
        """Count one refused request of this session. Returns False, and disconnects the session, once it has had
        `max_refusals_per_minute` in the last minute: its end row says why, and the refusals past the limit are
        not written (one session must not fill the audit disk with refusals)."""
        limit = self.ctx.config.max_refusals_per_minute
        now = asyncio.get_running_loop().time()
        window = self._refusals
        while window and window[0] <= now - 60:
            window.popleft()
        if len(window) >= limit:
            if self.end_reason is None:
                self.log.warning("disconnecting: %d refused requests within a minute", limit)
                self.disconnect(f"too many refused requests ({limit} within a minute)")
            return False
        window.append(now)
        return True

    def open_channels_of_user(self) -> int:
        return sum(len(c.tunnels) for c in self.ctx.sessions_of(self.user))

    def add_tunnel(self, tunnel: Tunnel) -> None:
        self.tunnels.add(tunnel)
        self.ctx.tunnels.add(tunnel)
        self.ctx.no_tunnels.clear()
        self._channels_changed()

    def add_listener(self, listener: Any) -> None:
        self.listeners.add(listener)
        self._channels_changed()

    def remove_listener(self, listener: Any) -> None:
        self.listeners.discard(listener)
        self._channels_changed()

    def tunnel_closed(self, tunnel: Tunnel) -> None:
        self.tunnels.discard(tunnel)
        self.ctx.tunnels.discard(tunnel)
        if not self.ctx.tunnels:
            self.ctx.no_tunnels.set()
        self.bytes_up += tunnel.bytes_up
        self.bytes_down += tunnel.bytes_down
        if tunnel.channel_id is not None:
            self.ctx.audit.close_channel(tunnel.channel_id, tunnel.bytes_up, tunnel.bytes_down,
                                         reason=tunnel.close_reason)
        self._channels_changed()

    def _channels_changed(self) -> None:
        """Arm the unused-session timer while nothing is open; disarm it while something is."""
        timeout = self.ctx.config.unused_timeout_seconds
        if not timeout or self.session_id is None or self.conn is None:
            return
        busy = bool(self.tunnels or self.listeners)
        if busy and self._unused_timer is not None:
            self._unused_timer.cancel()
            self._unused_timer = None
        elif not busy and self._unused_timer is None:
            self._unused_timer = asyncio.get_running_loop().call_later(
                timeout, self.disconnect, f"no open channel for {timeout:g}s"
            )
