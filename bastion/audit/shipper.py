"""The audit shipper (#22 part 3): a thread of the server that copies the local hash chain to PostgreSQL.

The login path never waits for it: the writer commits locally (writer.py, fail closed on a local failure), and
this thread reads the committed events by seq from a read-only SQLite connection, a batch at a time, and
stores them with fleet.store_batch — in order, at least once, idempotent by (node, seq); a second thread reads
and prepares the next batch meanwhile. While PostgreSQL cannot
be reached it retries with a growing pause (0.5 s doubling up to `max_backoff`); the events wait in the local
chain, which is the backlog.

Where shipping resumes is read from PostgreSQL itself (the node's max seq), at start and after every
reconnect, not kept locally: PostgreSQL is what must hold every event, so it is the one to ask; nothing local
can drift from it (a restored database backup, a lost state file), and re-sending what it already has costs
nothing (skipped by (node, seq), its hash compared). The head found there is checked against the local event
of that seq: a different hash is an alarm (two nodes with one node_id, or a replaced local database) and
shipping stops rather than mixing two chains.

With `live` and `kill` it also publishes the node's live sessions (a heartbeat) and carries out `sessions kill
--store` requests addressed to this node: it LISTENs on a second connection of its own (so no notification can
arrive while the first is busy shipping), waits there instead of sleeping between looks at the local chain, and
looks for requests when one names this node, right after each (re)connection (requests made while it was not
listening), and every KILL_POLL_SECONDS. The event loop never waits for any of it.

For `bastion audit ship status` and `audit prune` without PostgreSQL at hand, the thread also writes what it
knows to HOME/audit-ship.json (atomically) after each batch and each error: shipped seq, last error.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

from ..clock import iso, utc_now
from ..store.schema import connect as connect_sqlite
from .chain import Head
from .fleet import (HEARTBEAT_SECONDS, KILL_POLL_SECONDS, KILLS, Batch, FleetError, NodeStatus, ShipAlarm,
                    check_schema, connect, kill_done, lag_of, node_reports, open_store, pending_kills, prepare_batch,
                    publish_sessions, redact, report_node, shipped_head, store_batch, table_types)

log = logging.getLogger("bastion.audit")

STATUS_FILE = "audit-ship.json"
# a database that stops answering mid-batch (a stuck lock, a slow disk) is an error after a minute; a silent network
# cut, where the server never sees the statement and so never times it out, is one after 10 s of data sent and not
# acknowledged (tcp_user_timeout), and an idle dead peer is noticed by TCP keepalives: the thread never hangs
_SESSION = {"options": "-c statement_timeout=60000 -c lock_timeout=30000", "keepalives": 1, "keepalives_idle": 30,
            "keepalives_interval": 10, "keepalives_count": 3, "tcp_user_timeout": 10000}
_EVENT_COLUMNS = "seq, time, kind, tbl, row_id, payload, prev_hash, hash"


def read_status(home: Path) -> dict[str, Any]:
    """What the server's shipper last wrote (empty when it never ran)."""
    try:
        return json.loads((home / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


class Shipper:
    """Start with `start()`, end with `stop()`. `poll` seconds between looks at the local chain when idle."""

    def __init__(self, database: Path, url: str, node: str, *, batch: int = 2000, poll: float = 0.2,
                 max_backoff: float = 10.0, report_every: float = 5.0,
                 clock: Callable[[], float] = time.monotonic,
                 live: Callable[[], list[dict[str, Any]]] | None = None,
                 kill: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
                 kill_poll: float = KILL_POLL_SECONDS) -> None:
        """`live` and `kill` (the server's control requests, run from this thread): publish the node's live
        sessions every HEARTBEAT_SECONDS and carry out `sessions kill --store` requests addressed to it, when
        notified and every `kill_poll` seconds."""
        self.database, self.url, self.node = database, url, node
        self.batch, self.poll, self.max_backoff, self.report_every = batch, poll, max_backoff, report_every
        self._clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.shipped = Head()  # what PostgreSQL holds of this node, as far as this thread knows
        self.local_seq = 0
        self.lag_seconds = 0.0
        self.last_error: str | None = None
        self.connected = False
        self.shipped_total = 0
        self.live, self.kill = live, kill
        self._last_heartbeat = -HEARTBEAT_SECONDS
        self.kill_poll = kill_poll
        self._last_kill_poll = 0.0
        self._kills_due = False  # a request for this node was notified (or may have been, while away)
        self._reader: ThreadPoolExecutor | None = None  # reads and prepares the next batch (_drain)
        self._reader_db: sqlite3.Connection | None = None  # its own connection, used on its thread only

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="audit-shipper", daemon=True)
        self._thread.start()
        log.info("shipping the audit log to %s as node %s", redact(self.url), self.node)

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # ---- the thread ----

    def _run(self) -> None:
        backoff = 0.5
        local: sqlite3.Connection | None = None
        pg = listen = None
        while not self._stop.is_set():
            try:
                if local is None:
                    local = connect_sqlite(self.database, readonly=True)
                if pg is None:
                    pg = connect(self.url, **_SESSION)
                    check_schema(pg, self.url)  # `bastion store migrate` makes it; until then events wait here
                    if self.kill is not None:
                        listen = connect(self.url, **_SESSION)
                        listen.execute(f"LISTEN {KILLS}")
                        self._kills_due = True  # what was requested while this node was not listening
                    self.shipped = shipped_head(pg, self.node)
                    self._check_resume(local)
                    self.connected = True
                    if self.last_error:
                        log.info("audit shipping to %s resumed at seq %d", redact(self.url), self.shipped.seq)
                    self.last_error = None
                    self._write_status()
                self._drain(local, pg, listen)
                self._fleet_sessions(pg)
                backoff = 0.5
                self._wait(listen)
            except ShipAlarm as exc:
                self._failed(f"ALARM: {exc}", error=True)
                try:  # so `ship status` on any node shows it
                    if pg is not None:
                        report_node(pg, self.node, self.local_seq, self.shipped.seq, self.lag_seconds,
                                    self.last_error)
                except Exception:  # PostgreSQL went too: the local status file still says it
                    pass
                pg, listen = self._close(pg), self._close(listen)
                self._stop.wait(60.0)  # an operator must look: retry rarely, never overwrite
            except Exception as exc:  # psycopg.Error, FleetError, sqlite3.Error, OSError: wait and retry
                text = str(exc) if isinstance(exc, FleetError) else f"{type(exc).__name__}: {_first_line(exc)}"
                if local is not None and not isinstance(exc, sqlite3.Error):
                    try:
                        self._measure(local)  # the backlog grows while PostgreSQL is away: keep it visible
                    except sqlite3.Error:
                        pass
                self._failed(redact(text), error=self.connected or self.last_error is None)
                pg, listen = self._close(pg), self._close(listen)
                if isinstance(exc, sqlite3.Error) and local is not None:
                    local.close()
                    local = None
                self._stop.wait(backoff)
                backoff = min(self.max_backoff, backoff * 2)
        self._close(pg)
        self._close(listen)
        if local is not None:
            local.close()
        if self._reader is not None:
            self._reader.submit(self._close_reader)
            self._reader.shutdown(wait=True)
            self._reader = None

    def _close_reader(self) -> None:
        if self._reader_db is not None:
            self._reader_db.close()
            self._reader_db = None

    def _check_resume(self, local: sqlite3.Connection) -> None:
        """PostgreSQL's newest event of this node must be this chain's event of that seq."""
        if self.shipped.seq == 0:
            return
        row = local.execute("SELECT hash FROM audit_events WHERE seq = ?", [self.shipped.seq]).fetchone()
        head = local.execute("SELECT max(seq) FROM audit_events").fetchone()[0] or 0
        if row is not None and row[0] != self.shipped.hash:
            raise ShipAlarm(f"node {self.node!r} event {self.shipped.seq} in PostgreSQL is not this node's event "
                            "of that seq: two nodes share this node_id, or this node's audit database was replaced")
        if row is None and self.shipped.seq > head:
            raise ShipAlarm(f"PostgreSQL holds node {self.node!r} up to seq {self.shipped.seq}, this node's chain "
                            f"ends at {head}: two nodes share this node_id, or this audit database was replaced")

    def _drain(self, local: sqlite3.Connection, pg: Any, listen: Any = None) -> None:
        """Ship every committed event after the shipped head, a batch per transaction; between batches of a long
        backlog, carry out a kill request notified meanwhile. While PostgreSQL stores a full batch, a second
        thread reads and prepares the next one (fleet.prepare_batch): the two run at once, in two processes, and
        a batch is counted shipped only once its transaction committed."""
        last_report = 0.0
        types = table_types(pg)
        pending = self._prepare_after(self.shipped.seq, types)
        while not self._stop.is_set():
            events, batch, head = pending.result()
            self.local_seq = head
            if events and events[0][0] != self.shipped.seq + 1:
                log.warning("audit events %d..%d were pruned here before they were shipped (prune --force?)",
                            self.shipped.seq + 1, events[0][0] - 1)
            # a full batch: more may wait, read and prepare them meanwhile (dropped if this one fails)
            pending = self._prepare_after(events[-1][0], types) if len(events) == self.batch else None
            if events:
                store_batch(pg, batch)
                self.shipped = Head(events[-1][0], events[-1][7])
                self.shipped_total += len(events)
            self._measure(local, head)
            now = self._clock()
            if events or now - last_report >= self.report_every:
                report_node(pg, self.node, head, self.shipped.seq, self.lag_seconds, None)
                self._write_status()
                last_report = now
            if pending is None:
                return
            if listen is not None:
                self._wait(listen, 0)
                self._fleet_sessions(pg)

    def _prepare_after(self, seq: int, types: dict[str, Any]) -> "Future[tuple[list[Any], Batch, int]]":
        """On the reader thread: the batch of events after `seq`, prepared, and the local head."""
        if self._reader is None:
            self._reader = ThreadPoolExecutor(1, thread_name_prefix="audit-shipper-read")
        return self._reader.submit(self._read, seq, types)

    def _read(self, seq: int, types: dict[str, Any]) -> tuple[list[Any], Batch, int]:
        """The reader thread's own read-only SQLite connection (opened again after an error)."""
        try:
            if self._reader_db is None:
                self._reader_db = connect_sqlite(self.database, readonly=True)
            events = self._reader_db.execute(f"SELECT {_EVENT_COLUMNS} FROM audit_events WHERE seq > ? ORDER BY seq "
                                             "LIMIT ?", [seq, self.batch]).fetchall()
            head = self._reader_db.execute("SELECT max(seq) FROM audit_events").fetchone()[0] or 0
        except BaseException:
            if self._reader_db is not None:
                self._reader_db.close()
                self._reader_db = None
            raise
        return events, prepare_batch(types, self.node, events), head

    def _wait(self, listen: Any, timeout: float | None = None) -> None:
        """`poll` seconds (or `timeout`) before the next look at the local chain, or less when a kill request for
        this node is notified (then it is carried out at once)."""
        timeout = self.poll if timeout is None else timeout
        if listen is None:
            self._stop.wait(timeout)
            return
        for note in listen.notifies(timeout=timeout, stop_after=1):
            if note.payload == self.node:
                self._kills_due = True

    def _fleet_sessions(self, pg: Any) -> None:
        """Kill requests for this node when notified or due, then (after any, so the sessions published are
        without them, or every HEARTBEAT_SECONDS) the live sessions as the control socket lists them."""
        now = self._clock()
        killed = False
        if self.kill is not None and (self._kills_due or now - self._last_kill_poll >= self.kill_poll):
            self._kills_due, self._last_kill_poll = False, now
            killed = self._carry_out_kills(pg)
        if self.live is not None and (killed or now - self._last_heartbeat >= HEARTBEAT_SECONDS):
            self._heartbeat(pg)

    def _carry_out_kills(self, pg: Any) -> bool:
        """Every pending request for this node, through the control socket; True when there was one."""
        assert self.kill is not None
        pending = pending_kills(pg, self.node)
        for kill_id, session_id, user, by in pending:
            try:
                answer = self.kill({"op": "kill", "by": f"{by} (fleet)", "session": session_id, "user": user})
                result = {"ok": True, "killed": answer.get("killed", [])}
            except Exception as exc:  # NotRunning, a session already gone: the answer says so
                result = {"ok": False, "error": str(exc)}
            kill_done(pg, kill_id, result)
            log.info("fleet kill request %d by %s: %s", kill_id, by, result)
        return bool(pending)

    def _heartbeat(self, pg: Any) -> None:
        """Publish the live sessions as the control socket lists them (every worker's)."""
        assert self.live is not None
        self._last_heartbeat = self._clock()
        try:
            sessions = self.live()
        except Exception as exc:  # the control socket is not up yet, or going away
            log.debug("no live sessions to publish: %s", exc)
            return
        publish_sessions(pg, self.node, sessions)

    def _measure(self, local: sqlite3.Connection, head: int | None = None) -> None:
        """The backlog (local head past the shipped one) and how long its oldest event has waited."""
        if head is None:
            head = local.execute("SELECT max(seq) FROM audit_events").fetchone()[0] or 0
        self.local_seq = head
        unshipped = local.execute("SELECT time FROM audit_events WHERE seq > ? ORDER BY seq LIMIT 1",
                                  [self.shipped.seq]).fetchone()
        self.lag_seconds = lag_of(unshipped[0] if unshipped else None, utc_now())

    @property
    def backlog(self) -> int:
        return max(0, self.local_seq - self.shipped.seq)

    def _failed(self, text: str, error: bool) -> None:
        if text != self.last_error:
            (log.error if error else log.warning)("audit shipping to PostgreSQL: %s (events wait here; retrying)",
                                                  text)
        self.connected = False
        self.last_error = text
        self._write_status()

    def _close(self, pg: Any) -> None:
        if pg is not None:
            try:
                pg.close()
            except Exception:  # already broken: nothing more to do
                pass
        return None

    def _write_status(self) -> None:
        status = {"node": self.node, "store": redact(self.url), "shipped_seq": self.shipped.seq,
                  "shipped_hash": self.shipped.hash, "local_seq": self.local_seq, "lag_seconds": self.lag_seconds,
                  "connected": self.connected, "last_error": self.last_error, "updated_at": iso(utc_now())}
        path = self.database.parent / STATUS_FILE
        temporary = path.with_name(f".{STATUS_FILE}.{os.getpid()}")
        try:
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as out:
                json.dump(status, out)
            os.replace(temporary, path)
        except OSError as exc:  # the status is a convenience; shipping goes on
            log.debug("cannot write %s: %s", path, exc)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def fleet_status(database: Path, url: str | None, node: str) -> tuple[list[NodeStatus], str | None]:
    """`audit ship status`: this node measured now (local head, shipped head from PostgreSQL, backlog, lag of
    the oldest unshipped event, the shipper's last error), then every other node as its shipper last reported.
    Returns the rows and why PostgreSQL could not be asked (None when it could)."""
    saved = read_status(database.parent)
    local_seq: int | None = None
    oldest: dict[int, str] = {}
    local = None
    if database.exists():
        local = connect_sqlite(database, readonly=True)
        local_seq = local.execute("SELECT max(seq) FROM audit_events").fetchone()[0] or 0
    reports: list[dict[str, Any]] = []
    problem = None
    shipped: int | None = saved.get("shipped_seq") if saved.get("node") == node else None
    if url:
        try:
            conn = open_store(url)
        except FleetError as exc:
            problem = str(exc)
        else:
            try:
                reports = node_reports(conn)
                shipped = next((r["shipped_seq"] for r in reports if r["node"] == node), 0)
            finally:
                conn.close()
    rows = []
    if local is not None:
        try:
            if shipped is not None:
                found = local.execute("SELECT time FROM audit_events WHERE seq > ? ORDER BY seq LIMIT 1",
                                      [shipped]).fetchone()
                if found:
                    oldest[shipped] = found[0]
        finally:
            local.close()
    if local_seq is not None or any(r["node"] == node for r in reports):
        backlog = None if local_seq is None or shipped is None else max(0, local_seq - shipped)
        lag = None if shipped is None else lag_of(oldest.get(shipped), utc_now()) if local_seq is not None else None
        rows.append(NodeStatus(node, local_seq, shipped, backlog, lag,
                               saved.get("last_error") if saved.get("node") == node else None, "local"))
    for report in reports:
        if report["node"] == node:
            continue
        local_reported = report["reported_local_seq"]
        backlog = None if local_reported is None else max(0, local_reported - report["shipped_seq"])
        error = report["reported_error"]
        ago = report["reported_seconds_ago"]
        rows.append(NodeStatus(report["node"], local_reported, report["shipped_seq"], backlog,
                               report["reported_lag_seconds"], error, "reported" if ago is None else
                               f"reported {ago:.0f}s ago"))
    return rows, problem
