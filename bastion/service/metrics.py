"""Prometheus metrics of one server process, served over plain HTTP from its event loop (`metrics_listen`).

Three sources, one private registry (never prometheus_client's global one):
- the audit log's observer (`audited`): every login outcome, session, channel decision, listener decision and
  closed channel's bytes, counted from the same row changes the audit trail records, so the counters and
  `bastion audit …` agree;
- the gateway's calls (gateway/metrics.py): drops before login, penalties, handshake and channel-open times;
- the live ServerContext, read when scraped (`_Live`): sessions, channels and listeners open, bytes relayed
  by open tunnels, audit queue, policy version and age, the transport's fast path.

Scrapes are answered on the event loop, so the live state is read between callbacks, never half-changed, and
with no thread touching it. Label values are from fixed sets: a client's free text (user names before login,
target names, refusal reasons) never becomes a label, so no client can grow the number of series. There is no
per-user label: user names are bounded by the policy but can be thousands, and who did what is the audit log's.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from typing import Any, Awaitable, Iterable, TypeVar

import asyncssh
from prometheus_client import (CollectorRegistry, Counter, Histogram, ProcessCollector, disable_created_metrics,
                               generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import __version__, transport
from ..config import split_listen
from ..errors import ConfigError
from ..gateway.context import ServerContext
from ..gateway.metrics import GatewayMetrics

log = logging.getLogger("bastion.metrics")

T = TypeVar("T")

# Seconds; a loopback handshake takes a few ms, a remote one tens, a stalled one up to login_grace_seconds.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

AUTH_METHODS = frozenset({"publickey", "publickey+totp", "keyboard-interactive", "password", "hostbased", "none"})
CHANNEL_KINDS = frozenset({"direct-tcpip", "forwarded-tcpip"})
DECISIONS = frozenset({"allow", "deny"})

# The audit's free-text login reasons, as a small fixed set of classes: (class, test on the reason). The first
# match wins; a reason nobody listed here is "other" (add it when a new refusal appears, e.g. a second factor).
AUTH_REASONS: tuple[tuple[str, Any], ...] = (
    ("audit_unavailable", lambda r: r.startswith("audit log unavailable")),
    ("second_factor", lambda r: "verification code" in r),  # wrong, used, required, not enrolled (#21)
    ("revoked", lambda r: "revoked" in r),  # a key, certificate or CA revoked (KRL or policy), or unreadable list
    ("changed_during_login", lambda r: r.endswith(" during login")),
    ("certificate", lambda r: r.startswith("certificate refused")),
    ("unknown_key", lambda r: r == "key not accepted"),
    ("weak_key", lambda r: r.startswith(("DSA keys are refused", "RSA keys need at least"))),
    ("key_options", lambda r: r.startswith(("key not allowed from", "key expired at"))),
    ("account", lambda r: r in ("user removed", "key removed") or r.startswith("access expired at")),
    ("too_many_failures", lambda r: r == "too many authentication failures"),
    ("login_timeout", lambda r: r == "login grace time exceeded"),
    ("penalty", lambda r: r.startswith("source refused for")),
    ("startup_limit", lambda r: r.startswith("startup limit")),
)
AUTH_REASON_CLASSES = frozenset({"accepted", "other", *(name for name, _ in AUTH_REASONS)})


def auth_reason_class(result: str, reason: str) -> str:
    """The bounded class of an audited login outcome's reason: "accepted" for a success, else one of
    AUTH_REASONS' names, else "other". Never the reason itself."""
    if result == "success":
        return "accepted"
    for name, matches in AUTH_REASONS:
        if matches(reason):
            return name
    return "other"


def _bounded(value: Any, allowed: frozenset[str]) -> str:
    return value if isinstance(value, str) and value in allowed else "other"


class Metrics(GatewayMetrics):
    """The counters and histograms of one server process, and the registry a scrape reads."""

    def __init__(self) -> None:
        # No `…_created` series: in the text format a Prometheus 2.x server stores each as one more gauge, and
        # nothing reads them. (A switch of prometheus_client for the whole process; the server has no other use.)
        disable_created_metrics()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.auth = Counter(
            "bastion_auth_attempts", "Login outcomes as audited, by method, result and a bounded reason class.",
            ["method", "result", "reason"], registry=r)
        self.sessions = Counter("bastion_sessions", "Sessions begun (logins whose session row was committed).",
                                registry=r)
        self.channel_opens = Counter(
            "bastion_channel_opens", "Channel requests decided, as audited, by kind and decision.",
            ["kind", "decision"], registry=r)
        self.listener_requests = Counter(
            "bastion_listener_requests", "Remote-forward (ssh -R) listener requests decided, as audited.",
            ["decision"], registry=r)
        self.drops = Counter(
            "bastion_connections_dropped", "Connections dropped before their SSH handshake, by why: "
            "startup_limit (max_startups) or penalized (the source is serving a penalty).", ["reason"], registry=r)
        self.penalties = Counter("bastion_penalties", "Penalties given to sources for repeated connections "
                                 "that never authenticated.", registry=r)
        self.handshake = Histogram(
            "bastion_handshake_duration_seconds", "From accepting the TCP connection to the client's first "
            "authentication request (version and key exchange).", buckets=LATENCY_BUCKETS, registry=r)
        self.channel_open_seconds = Histogram(
            "bastion_channel_open_duration_seconds", "From a direct-tcpip request to its answer, by result: "
            "opened, refused (policy, caps, audit), failed (target unreachable) or aborted.",
            ["kind", "result"], buckets=LATENCY_BUCKETS, registry=r)
        # Bytes of channels already closed; the open ones' are added when scraped (_Live).
        self.closed_bytes = {"to_target": 0, "to_client": 0}
        # Series that exist from the start, so a rate over them works from the first scrape.
        self.auth.labels("publickey", "success", "accepted")
        self.auth.labels("publickey", "failure", "unknown_key")
        for kind in sorted(CHANNEL_KINDS):
            for decision in sorted(DECISIONS):
                self.channel_opens.labels(kind, decision)
        for decision in sorted(DECISIONS):
            self.listener_requests.labels(decision)
        for reason in ("startup_limit", "penalized"):
            self.drops.labels(reason)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, process_resident_memory_bytes, open fds

    def watch(self, context: ServerContext) -> None:
        """Read this context's live state at each scrape."""
        self.registry.register(_Live(context, self.closed_bytes))

    def watch_shipper(self, shipper: Any) -> None:
        """The audit shipper's backlog and lag (audit_ship_to, #22), read at each scrape from what its thread
        last measured (no database is touched on the event loop)."""
        self.registry.register(_Shipping(shipper))

    def watch_store(self, cached: Any) -> None:
        """The shared PostgreSQL store's reachability (store = "postgresql://…", #22), read at each scrape from
        what the node's store listener last found (no database is touched on the event loop). Not called for the
        embedded SQLite store, so those series are absent there."""
        self.registry.register(_Store(cached))

    def exposition(self) -> bytes:
        """The text a scrape gets (Prometheus text format 0.0.4)."""
        return generate_latest(self.registry)

    # ---- the audit log's observer ----------------------------------------------------------------

    def audited(self, table: str, row_id: Any, values: dict[str, Any]) -> None:
        """Count one audited row change (AuditLog.observer). Never raises into the audit log's caller."""
        try:
            if table == "auth":
                result = _bounded(values.get("result"), frozenset({"success", "failure"}))
                self.auth.labels(_bounded(values.get("method"), AUTH_METHODS), result,
                                 auth_reason_class(result, str(values.get("reason") or ""))).inc()
            elif table == "sessions" and row_id is None:
                self.sessions.inc()
            elif table == "channels" and row_id is None:
                self.channel_opens.labels(_bounded(values.get("kind"), CHANNEL_KINDS),
                                          _bounded(values.get("decision"), DECISIONS)).inc()
            elif table == "channels" and "bytes_up" in values:  # closed: its bytes move from live to here
                up, down = values.get("bytes_up"), values.get("bytes_down")
                self.closed_bytes["to_target"] += up if isinstance(up, int) and up > 0 else 0
                self.closed_bytes["to_client"] += down if isinstance(down, int) and down > 0 else 0
            elif table == "listeners" and row_id is None:
                self.listener_requests.labels(_bounded(values.get("decision"), DECISIONS)).inc()
        except Exception:  # a metric must never cost a login or a channel
            log.exception("metrics: cannot count an audited %s row", table)

    # ---- the gateway's calls (gateway/metrics.py) ------------------------------------------------

    def clock(self) -> float:
        return time.perf_counter()

    def dropped(self, why: str) -> None:
        self.drops.labels(_bounded(why, frozenset({"startup_limit", "penalized"}))).inc()

    def penalized(self) -> None:
        self.penalties.inc()

    def handshake_done(self, started: float | None) -> None:
        if started is not None:
            self.handshake.observe(time.perf_counter() - started)
        return None

    def channel_open(self, kind: str, opening: Awaitable[T]) -> Awaitable[T]:
        return self._timed(_bounded(kind, CHANNEL_KINDS), opening)

    async def _timed(self, kind: str, opening: Awaitable[T]) -> T:
        started = time.perf_counter()
        result = "aborted"
        try:
            answer = await opening
            result = "refused" if answer is None or answer is False else "opened"
            return answer
        except asyncssh.ChannelOpenError as exc:
            result = "failed" if exc.code == asyncssh.OPEN_CONNECT_FAILED else "refused"
            raise
        finally:
            self.channel_open_seconds.labels(kind, result).observe(time.perf_counter() - started)


class _Live(Collector):
    """Gauges (and the relayed-bytes counter) read from the running server when scraped."""

    def __init__(self, context: ServerContext, closed_bytes: dict[str, int]):
        self.context = context
        self.closed_bytes = closed_bytes

    def collect(self) -> Iterable[Metric]:
        ctx = self.context
        yield _gauge("bastion_sessions_open", "Logged-in sessions now.",
                     sum(len(sessions) for sessions in ctx.sessions_by_user.values()))
        yield _gauge("bastion_connections_unauthenticated", "Connections that have not logged in yet "
                     "(what max_startups counts).", ctx.unauthenticated)
        tunnels = list(ctx.tunnels)
        channels = GaugeMetricFamily("bastion_channels_open", "Tunnels open or being opened, by kind.",
                                     labels=["kind"])
        # a tunnel with no access request is an inbound connection to an ssh -R listener
        forwarded = sum(1 for tunnel in tunnels if tunnel.request is None)
        channels.add_metric(["direct-tcpip"], len(tunnels) - forwarded)
        channels.add_metric(["forwarded-tcpip"], forwarded)
        yield channels
        yield _gauge("bastion_listeners_open", "Remote-forward (ssh -R) listeners open.",
                     sum(len(getattr(connection, "listeners", ())) for connection in ctx.connections))
        relayed = CounterMetricFamily("bastion_relayed_bytes", "Bytes relayed through tunnels, by direction "
                                      "(to_target: from the SSH client; to_client: from the target).",
                                      labels=["direction"], unit="bytes")
        relayed.add_metric(["to_target"], self.closed_bytes["to_target"] + sum(t.bytes_up for t in tunnels))
        relayed.add_metric(["to_client"], self.closed_bytes["to_client"] + sum(t.bytes_down for t in tunnels))
        yield relayed
        yield _gauge("bastion_audit_queue_depth", "Audit row changes queued for the writer thread.",
                     ctx.audit.queue_depth)
        yield _gauge("bastion_audit_writable", "1 while the audit log takes writes; 0 after a failed write "
                     "(logins are refused then).", 1 if ctx.audit.healthy else 0)
        yield _gauge("bastion_policy_version", "Version of the policy this process holds (-1: none loaded).",
                     ctx.policy.version)
        if ctx.policy.loaded_at is not None:
            yield _gauge("bastion_policy_age_seconds", "Seconds since this process loaded the policy version it "
                         "holds (it checks for a newer one at each login and channel open).",
                         max(0.0, time.time() - ctx.policy.loaded_at))
        status = transport.status(ctx.config.fast_path)
        yield _gauge("bastion_transport_fast_path_enabled", "1 if the AES-GCM/ChaCha20 fast path is on, 0 if "
                     "asyncssh runs as shipped.", 1 if status.fast_path else 0)
        info = GaugeMetricFamily("bastion_build_info", "Versions of this server; always 1.",
                                 labels=["version", "asyncssh", "python"])
        info.add_metric([__version__, status.asyncssh_version, platform.python_version()], 1)
        yield info


class _Shipping(Collector):
    """audit_ship_to (#22): how far this node's audit events have reached the fleet's PostgreSQL."""

    def __init__(self, shipper: Any):
        self.shipper = shipper

    def collect(self) -> Iterable[Metric]:
        shipper = self.shipper
        yield _gauge("bastion_audit_ship_backlog_events", "Audit events written here and not yet in the fleet's "
                     "PostgreSQL.", shipper.backlog)
        yield _gauge("bastion_audit_ship_lag_seconds", "How long the oldest audit event not yet shipped has waited "
                     "(0 when none waits).", shipper.lag_seconds)
        yield _gauge("bastion_audit_ship_connected", "1 while the shipper is connected to PostgreSQL, 0 while it "
                     "retries.", 1 if shipper.connected else 0)
        shipped = CounterMetricFamily("bastion_audit_shipped_events", "Audit events this process shipped to "
                                      "PostgreSQL.")
        shipped.add_metric([], shipper.shipped_total)
        yield shipped


class _Store(Collector):
    """store = "postgresql://…" (#22): whether this node's copy of the shared store is kept current."""

    def __init__(self, cached: Any):
        self.cached = cached

    def collect(self) -> Iterable[Metric]:
        cached = self.cached
        yield _gauge("bastion_store_reachable", "1 while the PostgreSQL store answers this node's pings, 0 during "
                     "an outage (the node serves on the policy it holds for store_outage_grace, then refuses "
                     "logins).", 1 if cached.healthy() else 0)
        yield _gauge("bastion_store_unreachable_seconds", "Seconds since the PostgreSQL store was found "
                     "unreachable (0 while it is reachable).", cached.unreachable_seconds())


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


# ---- the HTTP endpoint ---------------------------------------------------------------------------

# The text format every Prometheus server reads (prometheus_client's CONTENT_TYPE_LATEST is 1.0.0 now, which a
# Prometheus 2.x server, e.g. Debian 12's, does not know).
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"
_REQUEST_LIMIT = 8192  # bytes of request line and headers
_REQUEST_SECONDS = 5.0  # a scraper that sends nothing is dropped after this long
# Scrapes answered at once; past it a connection is closed unanswered, so idle connections to the metrics port
# cannot use up the file descriptors the SSH side needs (a Prometheus server makes one at a time).
_MAX_CLIENTS = 16


async def start_metrics_server(metrics: Metrics, listen: str) -> asyncio.AbstractServer:
    """Serve GET /metrics on `listen` (HOST:PORT) from the running loop; anything else gets 404 or 405.
    ConfigError (one line) if the address cannot be bound."""
    host, port = split_listen(listen)
    clients = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal clients
        if clients >= _MAX_CLIENTS:
            writer.transport.abort()
            return
        clients += 1
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_SECONDS)
            parts = head.split(b"\r\n", 1)[0].split()
            if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
                status, body, kind = b"400 Bad Request", b"bad request\n", b"text/plain; charset=utf-8"
            elif parts[0] not in (b"GET", b"HEAD"):
                status, body, kind = b"405 Method Not Allowed", b"only GET\n", b"text/plain; charset=utf-8"
            elif parts[1].split(b"?", 1)[0] != b"/metrics":
                status, body, kind = b"404 Not Found", b"metrics are at /metrics\n", b"text/plain; charset=utf-8"
            else:
                status, body, kind = b"200 OK", metrics.exposition(), CONTENT_TYPE
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind + b"\r\nContent-Length: "
                         + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                         + (b"" if parts[:1] == [b"HEAD"] else body))
            await writer.drain()
        except asyncio.CancelledError:
            raise
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass  # a scraper that hung up, sent too much or nothing: nothing to answer
        except Exception:
            log.exception("metrics: cannot answer a scrape")
        finally:
            clients -= 1
            writer.close()

    try:
        return await asyncio.start_server(answer, host, port, limit=_REQUEST_LIMIT, reuse_address=True)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {listen}: {exc.strerror or exc}") from None
