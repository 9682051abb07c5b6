"""What every connection of one server process shares: config, store, audit log, the policy in force and
the live-connection bookkeeping. Passed to each connection through asyncssh's server factory (no globals)."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
import logging
from datetime import datetime
from typing import Any, Callable, Protocol

from ..audit.writer import AuditLog
from ..config import Config
from ..policy.authorized_keys import KeyOptions
from ..policy.limits import SourcePenalties, StartupLimit
from ..policy.model import CertAuthority, Policy
from ..policy.netguard import NetGuard
from ..policy.revocation import RevokedKeyFiles
from ..policy.signing import with_home_authority
from ..store.interface import AccessStore
from .metrics import GatewayMetrics
from .relay import Tunnel



class ChannelOwner(Protocol):
    """What a channel handler (direct_tcpip, remote_forward, banner) and the service need of the connection that
    owns it: GatewayConnection is one; the handlers never see the asyncssh callback class itself."""

    ctx: "ServerContext"
    user: str
    session_id: str | None
    session_committed: asyncio.Future | None  # the session row; a channel waits for it
    conn: Any  # the asyncssh connection; None once it is gone
    end_reason: str | None
    key_options: KeyOptions  # of the key that logged in: permitopen=, permitlisten=, no-port-forwarding
    log: logging.LoggerAdapter

    def open_channels_of_user(self) -> int: ...
    def refusal_counted(self) -> bool: ...
    def add_tunnel(self, tunnel: Tunnel) -> None: ...
    def tunnel_closed(self, tunnel: Tunnel) -> None: ...
    def add_listener(self, listener: Any) -> None: ...
    def remove_listener(self, listener: Any) -> None: ...
    def disconnect(self, reason: str) -> None: ...
    def describe(self) -> dict[str, Any]: ...
    def revalidate(self, policy: Policy, fingerprints: frozenset[str], now: datetime) -> list[str]: ...
    def extra_groups(self, policy: Policy) -> tuple[str, ...]: ...  # a certificate's principals as groups (#21)


class PolicyCache:
    """The policy in force, reloaded from the store when its version changes (checked on each use, in a
    worker thread, so `policy apply` takes effect at the next channel open without a restart).

    Loads run in worker threads and may overlap; one lock makes them take turns, so each load reads the store
    after the one before it and a slow, older load cannot install a stale policy over a newer one. Only the
    newest policy reports a change (its re-check and expiry timer), whatever order the threads finish in."""

    def __init__(self, store: AccessStore, on_change: Callable[[Policy], None] | None = None,
                 home_authority: Callable[[], CertAuthority | None] | None = None):
        self._store = store
        self._lock = threading.Lock()
        self._version = -1
        self._policy: Policy | None = None
        self._on_change = on_change
        # the home CA (`bastion ca init`, #21), trusted as CA `home` over the stored policy; a new one is a change
        self._home_authority = home_authority
        self._authority: CertAuthority | None = None
        self.loaded_at: float | None = None  # time.time() when the version held was loaded (metrics: its age)

    @property
    def latest(self) -> Policy | None:
        """The newest policy loaded so far, without asking the store (for a last check before a channel opens)."""
        return self._policy

    @property
    def version(self) -> int:
        """The version of the policy held (-1 before the first load)."""
        return self._version

    def _refresh(self) -> tuple[bool, Policy]:
        with self._lock:
            version = self._store.policy_version()
            authority = self._home_authority() if self._home_authority is not None else None
            if version != self._version or self._policy is None or authority != self._authority:
                self._version, stored = self._store.load_policy()
                self._authority, self._policy = authority, with_home_authority(stored, authority)
                self.loaded_at = time.time()
                return True, self._policy
            return False, self._policy

    async def current(self) -> Policy:
        changed, policy = await asyncio.to_thread(self._refresh)
        if changed and self._on_change is not None and policy is self._policy:
            self._on_change(policy)  # only for the newest: an older load that finished late must not reschedule
        return self._policy or policy


@dataclass(slots=True)
class ServerContext:
    """What every connection shares; passed in through the server factory (no module globals)."""

    config: Config
    store: AccessStore
    audit: AuditLog
    policy: PolicyCache
    guard: NetGuard
    startup_limit: StartupLimit = field(default_factory=StartupLimit)
    penalties: SourcePenalties = field(default_factory=SourcePenalties)
    connections: set["ChannelOwner"] = field(default_factory=set)
    tunnels: set[Tunnel] = field(default_factory=set)  # every open tunnel, for a graceful stop
    no_tunnels: asyncio.Event = field(default_factory=asyncio.Event)
    no_connections: asyncio.Event = field(default_factory=asyncio.Event)
    unauthenticated: int = 0
    dropping: bool = False  # inside a burst of startup-limit drops (audited once per burst)
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)  # a no-op unless metrics_listen is set
    revoked_keys: RevokedKeyFiles = field(default_factory=RevokedKeyFiles)  # the config's KRLs as last read (#21)

    sessions_by_user: dict[str, set["ChannelOwner"]] = field(default_factory=dict)

    def sessions_of(self, user: str) -> set["ChannelOwner"]:
        """The user's logged-in connections: a dict lookup, not a scan (10,000 sessions are normal)."""
        return self.sessions_by_user.get(user, set())
