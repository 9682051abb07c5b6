"""Lifecycle of the gateway: prepare the home, start listening, stop gracefully on SIGTERM, reload on SIGHUP."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal

import asyncssh

from .. import __version__, transport
from ..audit.shipper import Shipper
from ..audit.writer import AuditLog
from ..clock import utc_now
from ..config import Config, load_config
from ..errors import BastionError, ConfigError, StoreError
from ..gateway.connection import GatewayConnection
from ..gateway.context import PolicyCache, ServerContext
from ..gateway.local_addresses import make_guard
from ..gateway.proxied import ProxyHeaderEvents
from ..policy.decide import next_expiry
from ..policy.limits import SourcePenalties, StartupLimit
from ..policy.model import Policy
from ..store.cached import CachedStore
from ..store.sqlite import Store
from . import event_loop, sd_notify
from .control import request as control_request
from .control import serve_lock, start_control_server
from .home import HomeAuthority, load_host_keys
from .metrics import Metrics, start_metrics_server
from .revoked_keys import RevokedKeysWatcher

log = logging.getLogger("bastion.service")


class Gateway:
    """A running gateway: the listener, the shared context, and the signals that steer it."""

    def __init__(self, config: Config, worker: int | None = None):
        self.config = config
        self.worker = worker  # None: the only process; N: worker N of `serve --workers`
        # The store: the home's SQLite file, or a shared PostgreSQL (#22) that this node reads as a copy in memory,
        # told of every change by LISTEN/NOTIFY (store/cached.py); the audit log is local either way.
        try:
            self.store = Store(config.store or config.database, statement_timeout_ms=5000 if config.store else 0)
        except StoreError as exc:
            raise _unreadable_store(exc) if config.store else exc from None
        self.cached: CachedStore | None = None
        if config.store:
            self.cached = CachedStore(self.store, config.store, config.store_outage_grace_seconds,
                                      on_change=self._store_changed, on_outage=self._store_outage)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.audit = AuditLog(config.database)
        access = self.cached or self.store
        self.context = ServerContext(
            config=config,
            store=access,
            audit=self.audit,
            policy=PolicyCache(access, on_change=self._policy_changed, home_authority=HomeAuthority(config)),
            guard=make_guard(config),
            startup_limit=StartupLimit.parse(config.max_startups),
            penalties=SourcePenalties(config.penalty_threshold, config.penalty_seconds, config.penalty_max_seconds),
        )
        # Prometheus metrics (service/metrics.py) only when metrics_listen is set; else the context's no-op.
        self.metrics: Metrics | None = None
        if config.metrics_listen:
            self.metrics = self.context.metrics = Metrics()
            self.metrics.watch(self.context)
            self.audit.observer = self.metrics.audited
            if self.cached is not None:
                self.metrics.watch_store(self.cached)  # store reachability (#22)
        self._metrics_server: asyncio.AbstractServer | None = None
        self.revoked_keys = RevokedKeysWatcher(self.context, self.revalidate)  # revoked_keys files (#21)
        self.metrics_address: tuple[str, int] | None = None
        self._server: asyncio.AbstractServer | None = None
        self._control: asyncio.AbstractServer | None = None
        self._expiry_timer: asyncio.TimerHandle | None = None
        self._stop = asyncio.Event()
        self.address: tuple[str, int] | None = None
        self.transport: transport.TransportStatus | None = None
        # audit_ship_to (#22): a thread copies the local audit chain to PostgreSQL; one per node, so with
        # workers only worker 0 runs it (they all write the one local chain)
        self.shipper: Shipper | None = None
        if config.audit_ship_to and not worker:
            home = config.home  # the fleet's live sessions and kills go through the control socket (all workers)
            self.shipper = Shipper(config.database, config.audit_ship_to, config.node,
                                   live=lambda: control_request(home, {"op": "sessions"})["sessions"],
                                   kill=lambda message: control_request(home, message))
            if self.metrics is not None:
                self.metrics.watch_shipper(self.shipper)

    async def start(self) -> None:
        self.transport = transport.install(fast_path=self.config.fast_path)
        # Host keys as pairs that sign with ssh-ed25519 and rsa-sha2-* only (transport/algorithms.py); a weak
        # one is refused here, before anything is started.
        host_keys = transport.host_key_pairs(load_host_keys(self.config))
        self.revoked_keys.load()  # (#21) before the first login; a file that cannot be read refuses them
        self.audit.start(recover=self.worker is None)  # with workers, the supervisor recovered once
        if self.metrics is not None:
            try:
                self._metrics_server = await start_metrics_server(self.metrics, self.config.metrics_listen)
            except ConfigError:
                self.audit.stop()
                raise
            host, port = self.metrics_address = self._metrics_server.sockets[0].getsockname()[:2]
            log.info("metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host, port)
        try:
            self._server = await self._listen(host_keys)
        except OSError as exc:
            if self._metrics_server is not None:
                self._metrics_server.close()
            self.audit.stop()
            raise ConfigError(f"cannot listen on {self.config.listen}: {exc.strerror or exc}") from None
        sockname = self._server.sockets[0].getsockname()
        self.address = (sockname[0], sockname[1])
        self._control = await start_control_server(self.config.home, self.handle_control, self.worker)
        if self.shipper is not None:
            self.shipper.start()  # its own thread and connections: never on this loop, never in a login
        self.revoked_keys.start()
        self._loop = asyncio.get_running_loop()
        if self.cached is not None:  # (#22) the first snapshot, then a thread listening for changes
            try:
                await asyncio.to_thread(self.cached.start)
            except StoreError as exc:
                raise _unreadable_store(exc) from None
        await self.context.policy.current()  # loads the policy and schedules the first expiry

    async def _listen(self, host_keys: list[asyncssh.SSHKeyPair]) -> asyncio.AbstractServer:
        return await asyncssh.create_server(
            lambda: GatewayConnection(self.context),
            self.config.listen_host,
            self.config.listen_port,
            server_host_keys=host_keys,
            # explicit lists: nothing weaker than OpenSSH 9.x (transport/algorithms.py)
            **transport.server_options(compression=self.config.compression),
            server_version=f"bastion_{__version__}",
            login_timeout=self.config.login_grace_seconds,
            password_auth=False,
            kbdint_auth=True,  # only for a one-time code after the key (gateway/totp.py, #21)
            gss_host=None,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_pty=True,
            line_editor=False,
            reuse_address=True,
            keepalive_interval=self.config.keepalive_interval,
            keepalive_count_max=self.config.keepalive_count_max,
            reuse_port=self.worker is not None,
            **self._proxy_protocol(),
        )

    def _proxy_protocol(self) -> dict:
        """With proxy_protocol_from set, a PROXY header check in front of asyncssh (#22), through asyncssh's
        `tunnel` listener hook (transport/proxy_protocol.py); the list is read per connection, so a reload
        changes it. Empty: nothing in front, as without the feature."""
        if not self.config.proxy_protocol_from:
            return {}
        self.proxy_events = ProxyHeaderEvents(self.context)
        log.info("connections from %s must start with a PROXY protocol header",
                 ", ".join(map(str, self.config.proxy_protocol_from)))
        return {"tunnel": transport.ProxyProtocolListener(lambda: self.context.config.proxy_protocol_from,
                                                          self.proxy_events, reuse_address=True,
                                                          reuse_port=self.worker is not None)}

    # ---- the control socket -----------------------------------------------------------------

    async def handle_control(self, request: dict) -> dict:
        """Answer one control-socket request (see control.py)."""
        op = request.get("op")
        live = [c for c in self.context.connections if c.session_id is not None]
        if op == "sessions":
            return {"ok": True, "sessions": [dict(c.describe(), worker=self.worker or 0) for c in live]}
        if op == "kill":
            by = str(request.get("by") or "admin")[:64]
            if request.get("session"):
                chosen = [c for c in live if c.session_id == request["session"]]
                missing = f"no live session {request['session']!r}"
            elif request.get("user"):
                chosen = [c for c in live if c.user == request["user"]]
                missing = f"user {request['user']!r} has no live session"
            else:
                return {"ok": False, "error": "kill needs a session id or a user"}
            if not chosen:
                return {"ok": False, "error": missing}
            for connection in chosen:
                connection.log.info("killed by %s", by)
                connection.disconnect(f"killed by {by} (bastion sessions kill)")
            return {"ok": True, "killed": [c.session_id for c in chosen]}
        if op == "revalidate":
            ended = await self.revalidate(str(request.get("why") or "requested"))
            return {"ok": True, "ended": ended}
        return {"ok": False, "error": f"unknown request {op!r}"}

    # ---- revocation -------------------------------------------------------------------------

    async def revalidate(self, why: str) -> list[str]:
        """Re-check every live session against the policy and keys in force now."""
        policy = await self.context.policy.current()
        live = [c for c in self.context.connections if c.session_id is not None]
        users = {c.user for c in live}

        def load_fingerprints() -> dict[str, frozenset[str]]:
            return {user: frozenset(k.fingerprint for k in self.context.store.user_keys(user)) for user in users}

        fingerprints = await asyncio.to_thread(load_fingerprints)
        now = utc_now()
        ended: list[str] = []
        for connection in live:
            ended += connection.revalidate(policy, fingerprints.get(connection.user, frozenset()), now)
        if ended:
            log.info("re-checked live sessions (%s): %s", why, "; ".join(ended))
        return ended

    def _store_changed(self, version: int) -> None:
        """(#22, the store's listener thread) another node or the CLI changed the shared store: load the new
        policy on the loop; a new version re-checks every live session (_policy_changed)."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(self.context.policy.current()))

    def _store_outage(self, state: str, detail: str) -> None:
        """(#22, the listener thread) the shared store was lost, stayed lost past the grace, or is back: an audit
        row each time (user "", method "store"), as the startup limit's are; the log line is the store's own."""
        result = "success" if state == "restored" else "failure"

        def record() -> None:
            self.audit.record_auth("", "0.0.0.0", 0, "store", None, result, detail)

        if self._loop is not None:
            self._loop.call_soon_threadsafe(record)

    def _policy_changed(self, policy: Policy) -> None:
        """A new policy version was loaded: re-check live sessions, and wake up again at the next expiry."""
        asyncio.ensure_future(self.revalidate("policy changed"))
        self._schedule_expiry(policy)

    def _schedule_expiry(self, policy: Policy) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        now = utc_now()
        moment = next_expiry(policy, now)
        if moment is None:
            return
        delay = max(0.0, (moment - now).total_seconds()) + 0.01

        def expire() -> None:
            asyncio.ensure_future(self._expire(policy))

        self._expiry_timer = asyncio.get_running_loop().call_later(delay, expire)

    async def _expire(self, policy: Policy) -> None:
        await self.revalidate("expiry")
        self._schedule_expiry(await self.context.policy.current())

    def request_stop(self) -> None:
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read the config; a broken one is refused and the running one stays."""
        sd_notify.reloading()
        try:
            config = load_config(self.config.home, overrides={"listen": self.config.listen})
        except BastionError as exc:
            log.error("reload refused, keeping the running config: %s", exc)
            sd_notify.ready()
            return
        # The listener was made with these; a new value takes effect at the next start, not now.
        for key in ("listen", "compression", "fast_path", "workers", "event_loop", "log_level", "log_format",
                    "metrics_listen", "store", "audit_ship_to", "node_id"):  # the shipper (#22) keeps its own
            running = getattr(self.config, key)
            if getattr(config, key) != running:
                log.warning("%s changes need a restart; keeping %s", key, running)
                config = dataclasses.replace(config, **{key: running})
        if bool(config.proxy_protocol_from) != bool(self.config.proxy_protocol_from):  # a listener of another kind
            log.warning("turning proxy_protocol_from on or off needs a restart; keeping %s",
                        list(map(str, self.config.proxy_protocol_from)))
            config = dataclasses.replace(config, proxy_protocol_from=self.config.proxy_protocol_from)
        self.config = config
        self.context.config = config
        self.context.guard = make_guard(config)
        self.context.startup_limit = StartupLimit.parse(config.max_startups)
        if self.cached is not None:  # (#22) a new grace counts from the start of an outage already under way
            self.cached.grace_seconds = config.store_outage_grace_seconds
        asyncio.ensure_future(self.revoked_keys.check(force=True))  # (#21) the files again, perhaps others
        log.info("configuration reloaded")
        sd_notify.ready()

    async def run_until_stopped(self, drain_seconds: float = 10.0) -> None:
        await self._stop.wait()
        await self.stop(drain_seconds)

    async def stop(self, drain_seconds: float = 10.0) -> None:
        """Stop accepting, tell connected users, let tunnels finish for up to `drain_seconds`, then close."""
        assert self._server is not None
        sd_notify.stopping()
        self._server.close()
        if self._control is not None:
            self._control.close()
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
        self.revoked_keys.stop()
        ctx = self.context
        if ctx.connections:
            log.info("stopping: %d connections, %d tunnels open; draining for up to %gs",
                     len(ctx.connections), len(ctx.tunnels), drain_seconds)
            if ctx.tunnels:
                await _wait(ctx.no_tunnels, drain_seconds)
            for connection in list(ctx.connections):
                connection.disconnect("server shutting down")
            # Closing a connection aborts its tunnels; their audit rows are queued as they finish.
            await _wait(ctx.no_connections, 5.0)
            if ctx.tunnels:
                await _wait(ctx.no_tunnels, 5.0)
            if ctx.connections or ctx.tunnels:
                log.warning("%d connections, %d tunnels did not close in time", len(ctx.connections), len(ctx.tunnels))
        if self._metrics_server is not None:  # served through the drain, so it can be watched
            self._metrics_server.close()
        self.audit.stop()
        if self.shipper is not None:  # what it has not shipped waits in the local chain for the next start
            await asyncio.get_running_loop().run_in_executor(None, self.shipper.stop)
        if self.cached is not None:  # its listener thread, then the store
            await asyncio.get_running_loop().run_in_executor(None, self.cached.close)
        else:
            self.store.close()
        log.info("stopped")


async def _wait(event: asyncio.Event, timeout: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout)
    except asyncio.TimeoutError:
        pass


async def serve(config: Config, drain_seconds: float = 10.0, worker: int | None = None) -> None:
    """Run until SIGTERM/SIGINT. Prints one 'listening on' line when ready. Refuses to start (AlreadyRunning)
    while another server runs on the home; worker N of `run` leaves that to its supervisor, which holds the
    lock for all workers."""
    # before anything touches the home: a second server would mark the first one's open rows as crashed
    with serve_lock(config.home) if worker is None else contextlib.nullcontext():
        gateway = Gateway(config, worker)
        await gateway.start()
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, gateway.request_stop)
        loop.add_signal_handler(signal.SIGINT, gateway.request_stop)
        loop.add_signal_handler(signal.SIGHUP, gateway.reload)
        assert gateway.address is not None
        host, port = gateway.address
        who = "" if worker is None else f" (worker {worker}, pid {os.getpid()})"
        log.info("bastion %s listening on %s:%d%s (home %s, %s, event loop %s)", __version__, host, port, who,
                 config.home, gateway.transport.describe(), config.event_loop)
        sd_notify.ready(f"listening on {host}:{port}")
        try:
            await gateway.run_until_stopped(drain_seconds)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)


def run(config: Config) -> int:
    """`bastion serve`: one process, or with `workers` > 1 a supervisor that recovers the audit log once,
    forks the workers (each its own event loop and audit writer on the shared WAL database, all on one port
    with SO_REUSEPORT), forwards SIGTERM/SIGINT/SIGHUP to them and exits when they all have."""
    drain = config.shutdown_grace_seconds
    if config.workers <= 1:
        event_loop.run(serve(config, drain), config.event_loop)
        return 0
    if config.metrics_listen:
        raise ConfigError("metrics_listen needs workers = 1: each worker counts only its own connections and they "
                          "cannot share one metrics port; set workers = 1 or leave metrics_listen empty")
    if config.listen_port == 0:
        raise ConfigError("--workers needs a fixed port: with port 0 every worker would get its own")
    with serve_lock(config.home):  # the workers inherit the descriptor: the lock lives while any of them does
        return _supervise(config, drain)


def _supervise(config: Config, drain: float) -> int:
    """`run` with workers, under the serve lock: recover once, fork, forward signals, exit with the worst code."""
    recovery = AuditLog(config.database)
    recovery.start()  # marks rows a crash left open, before any worker writes
    recovery.stop()
    workers: list[int] = []
    for index in range(config.workers):
        pid = os.fork()
        if pid == 0:  # the worker: a fresh event loop of its own
            code = 0
            try:
                event_loop.run(serve(config, drain, worker=index), config.event_loop)
            except BaseException:  # a worker must never return into the supervisor's code
                log.exception("worker %d failed", index)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        workers.append(pid)

    live = set(workers)

    def forward(signum: int, _frame) -> None:
        for pid in live:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    worst = 0
    while live:
        pid, status = os.wait()
        live.discard(pid)
        code = os.waitstatus_to_exitcode(status)
        code = code if code >= 0 else 128 - code  # killed by signal N: 128 + N, like a shell
        if code and live:
            # A worker died on its own: stop the rest so the service manager restarts a whole server.
            log.error("worker %d exited with %d; stopping the others", pid, code)
            forward(signal.SIGTERM, None)
        worst = max(worst, code)
    return worst


def _unreadable_store(exc: StoreError) -> StoreError:
    """A node that cannot read its PostgreSQL store when it starts does not start (#22): it has no copy to serve on."""
    return StoreError(f"cannot read the store (config `store`): {exc}; a node that has never read it has no policy "
                      "to serve on: start it once PostgreSQL is reachable")
