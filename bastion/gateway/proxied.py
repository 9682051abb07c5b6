"""Behind a load balancer (#22): what the bastion does when the PROXY header check (transport/proxy_protocol.py)
refuses a connection or sees a health check. A refusal is logged and audited as an auth row with the TCP peer's
address and the reason; a balancer that lost its `send-proxy-v2`, or a scanner repeating a forged header, could
repeat one per connection, so each (peer, kind) gets at most one row a minute (policy/throttle.py), which says how
many were left out. Health checks, and connections reset before they were accepted, are counted and logged at debug level
only: they are no one's login."""

from __future__ import annotations

import asyncio
import logging

from ..policy.throttle import RowThrottle
from .context import ServerContext

log = logging.getLogger("bastion.sshd")

ROW_INTERVAL = 60.0


class ProxyHeaderEvents:
    """The gateway's side of transport.ProxyEvents for one server process."""

    def __init__(self, ctx: ServerContext, interval: float = ROW_INTERVAL):
        self.ctx = ctx
        self.throttle = RowThrottle(interval)
        self.refusals = 0
        self.no_clients = 0  # health checks, and connections reset before they were accepted

    def refused(self, peer: tuple[str, int], kind: str, reason: str, balancer: bool) -> None:
        """Log and audit (at most one row per peer and kind a minute). A forged header is the source's doing
        and counts against it like any connection that never logs in (the gateway's own connection_lost); the
        balancer's failures never do: they would lock out everyone behind it."""
        self.refusals += 1
        left_out = self.throttle.admit((peer[0], kind), asyncio.get_running_loop().time())
        if left_out is None:
            log.debug("refused connection from %s port %d: %s", peer[0], peer[1], reason)
            return
        if left_out:
            reason += f" ({left_out} more like it since the last such row)"
        log.warning("refused connection from %s port %d: %s", peer[0], peer[1], reason)
        self.ctx.audit.record_auth("", peer[0], peer[1], "none", None, "failure", reason)

    def no_client(self, peer: tuple[str, int], what: str) -> None:
        """A health check, or a connection reset before it was accepted: counted, logged at debug level."""
        self.no_clients += 1
        log.debug("connection from %s port %d with no client (%s): closed", peer[0], peer[1], what)
