"""What the gateway tells its metrics, beyond what the audit log already sees: connections dropped before
login, penalties, the time to the first authentication request and the time a channel takes to open.

This class is the no-op used when `metrics_listen` is off (the default): every call costs an attribute lookup
and nothing else, and `channel_open` hands the coroutine back untouched. service/metrics.py subclasses it with
Prometheus counters; the gateway never imports prometheus_client."""

from __future__ import annotations

from typing import Awaitable, TypeVar

T = TypeVar("T")


class GatewayMetrics:
    """The gateway's side of the metrics; one per server process, in the ServerContext."""

    def clock(self) -> float:
        """A start time for `handshake_done` (monotonic seconds; 0.0 when metrics are off)."""
        return 0.0

    def dropped(self, why: str) -> None:
        """A connection was dropped before its SSH handshake: why is "penalized" (its source is serving a
        penalty) or "startup_limit" (max_startups)."""

    def penalized(self) -> None:
        """A source was given a penalty for repeated connections that never authenticated."""

    def handshake_done(self, started: float | None) -> None:
        """The first authentication request arrived on a connection accepted at `started` (from `clock()`):
        the version exchange, key exchange and service request are done. None: already measured. Returns None,
        for the caller to store, so a second user name on the same connection is not measured twice."""
        return None

    def channel_open(self, kind: str, opening: Awaitable[T]) -> Awaitable[T]:
        """Time `opening` (the coroutine asyncssh awaits before confirming or refusing a channel of `kind`)."""
        return opening
