"""The audit log: every login, session, channel, listener and refusal, written by one thread off the event loop.

Writes are queued and committed in small batches (one commit for many rows); the WAL is checkpointed by a thread
of its own (checkpoint.py), so commits do not wait for its disk flushes. A channel's or listener's row is
committed before its first byte flows: `record_channel()` and `record_listener()` return only after the commit.
If the store cannot be written, those calls raise `AuditUnavailable` and the caller refuses.

Every row change is also appended, in the same transaction, to the hash chain in `audit_events`
(see chain.py), so later edits to history show in `bastion audit verify`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from ..clock import iso, utc_now
from ..policy.certificates import Certificate
from ..store.schema import connect
from .chain import AUDIT_TABLES, CHAIN_TABLE, Head, adopt_existing_rows, append, read_head
from .checkpoint import Checkpointer
from .filters import ip_key

log = logging.getLogger("bastion.audit")

_STOP = object()
_BATCH = 256
_PROBE_SECONDS = 1.0


# What a user is told when the audit log cannot record their session or channel.
AUDIT_DOWN = "audit log unavailable; try again later or tell your bastion admin"


class AuditUnavailable(Exception):
    """The audit store could not commit a row; nothing that needs it may proceed."""


@dataclass(frozen=True, slots=True)
class SessionRecord:
    id: str
    user: str
    client_ip: str
    client_port: int
    key_fingerprint: str
    client_version: str
    started_at: datetime
    certificate: Certificate | None = None  # the certificate that logged in (#21): its columns


@dataclass(frozen=True, slots=True)
class ChannelRecord:
    session_id: str
    user: str
    kind: str  # direct-tcpip | forwarded-tcpip
    target_host: str  # as the client asked (forwarded-tcpip: the listen address)
    target_ip: str | None  # as connected (allowed) or resolved (denied)
    target_port: int
    decision: str  # allow | deny
    rule: str | None
    reason: str
    opened_at: datetime
    closed_at: datetime | None = None  # set when the channel never opened (refused, target unreachable)
    listener_id: int | None = None  # forwarded-tcpip: the listener the connection came in through
    peer_ip: str | None = None  # forwarded-tcpip: who connected to the listener
    peer_port: int | None = None


@dataclass(frozen=True, slots=True)
class ListenerRecord:
    session_id: str
    user: str
    listen_host: str
    listen_port: int  # the port actually bound (the requested one if refused)
    requested_port: int
    decision: str  # allow | deny
    rule: str | None
    reason: str
    opened_at: datetime
    closed_at: datetime | None = None  # set when the listener never opened (refused, bind failed)


@dataclass(frozen=True, slots=True)
class _Change:
    """One row change for the writer: an insert (row_id None) or an update of row `row_id`."""

    table: str  # "" is a no-op that only reports back (flush)
    row_id: Any
    values: dict[str, Any]
    done: Callable[[Any], None] | None = None


_FOREVER = 253402300799  # 9999-12-31T23:59:59Z; ssh-keygen's "forever" is 2**64-1
CERTIFICATE_COLUMNS = ("cert_key_id", "cert_serial", "cert_ca", "cert_principals", "cert_valid_after",
                       "cert_valid_before")


def certificate_columns(cert: Certificate | None) -> dict[str, Any]:
    """The auth and session rows' certificate columns (#21): NULL for a key login. The serial is a uint64, so
    text; principals a JSON array; validity ISO 8601 in UTC, "forever" past year 9999."""
    if cert is None:
        return {}
    return {
        "cert_key_id": cert.key_id, "cert_serial": str(cert.serial), "cert_ca": cert.ca_fingerprint,
        "cert_principals": json.dumps(list(cert.principals), ensure_ascii=False),
        "cert_valid_after": _cert_time(cert.valid_after), "cert_valid_before": _cert_time(cert.valid_before),
    }


def _cert_time(seconds: int) -> str:
    if seconds >= _FOREVER:
        return "forever"
    return iso(datetime.fromtimestamp(max(seconds, 0), timezone.utc))


class AuditLog:
    """Queue rows to a writer thread; `await` the rows that must be durable before going on.

    `clock` is for tests; production uses the wall clock in UTC."""

    def __init__(self, path: Path, clock: Callable[[], datetime] = utc_now):
        self.path = path
        self._clock = clock
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._head: Head | None = None  # the chain's newest event as this writer last committed it
        self._checkpointer = Checkpointer(path)
        # False from a failed write until the next successful one; read by the event loop to refuse new
        # logins while nothing could be recorded (fail closed).
        self.healthy = True
        # Told of each row change as it is queued (an awaited one once committed): observer(table, row_id, values),
        # on the event loop. service/metrics.py counts from it; it must be quick and must not raise.
        self.observer: Callable[[str, Any, dict[str, Any]], None] | None = None

    @property
    def queue_depth(self) -> int:
        """Row changes queued and not yet taken by the writer thread."""
        return self._queue.qsize()

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self, recover: bool = True) -> int:
        """Open the store, chain rows older than the chain, mark rows a crash left open (unless `recover` is
        False: a worker of `serve --workers` must not close its siblings' rows), start the writer.
        Returns how many rows were closed."""
        conn = self._conn = connect(self.path)
        conn.isolation_level = None  # transactions are explicit: BEGIN IMMEDIATE reads the chain head under lock
        conn.create_function("ip_key", 1, ip_key, deterministic=True)
        now = iso(self._clock())
        with _transaction(conn):
            head = read_head(conn)
            if head.seq == 0:
                self._start_chain(conn, head, now)
            closed = self._close_after_crash(conn, head, now) if recover else 0
        self._head = head
        self._checkpointer.start(conn)
        self._thread = threading.Thread(target=self._write_forever, name="audit-writer", daemon=True)
        self._thread.start()
        return closed

    def stop(self) -> None:
        """Write everything queued, then stop the writer and close the store."""
        if self._thread is None:
            return
        self._queue.put(_STOP)
        self._thread.join()
        self._thread = None
        self._checkpointer.stop()
        assert self._conn is not None
        self._conn.close()

    @staticmethod
    def _start_chain(conn: sqlite3.Connection, head: Head, now: str) -> None:
        """An empty chain: the first start after the upgrade adopts the rows written before it, once. If the chain
        was started before, someone emptied it: adopting now would bless whatever the rows say, so record that."""
        started = conn.execute("SELECT value FROM meta WHERE key = 'audit_chain_started'").fetchone()
        if started is not None and not _has_audit_rows(conn):
            return  # started, and nothing was ever written (a restart, or a worker after its supervisor)
        if started is not None:
            log.error("the audit chain started at %s is empty: its events were deleted", started[0])
            append(conn, head, now, "alarm", CHAIN_TABLE, 0, {"chain_started": started[0], "found_seq": 0})
            return
        conn.execute("UPDATE channels SET target_ip_key = ip_key(target_ip) "
                     "WHERE target_ip IS NOT NULL AND target_ip_key IS NULL")
        if adopted := adopt_existing_rows(conn, now, head):
            log.info("audit chain started: %d existing rows adopted", adopted)
        conn.execute("INSERT INTO meta (key, value) VALUES ('audit_chain_started', ?)", [now])

    def _close_after_crash(self, conn: sqlite3.Connection, head: Head, now: str) -> int:
        counts = []
        for table, column, values in (
            ("sessions", "ended_at", {"ended_at": now, "end_reason": "crash"}),
            ("channels", "closed_at", {"closed_at": now, "close_reason": "crash"}),
            ("listeners", "closed_at", {"closed_at": now, "close_reason": "crash"}),
        ):
            ids = [row[0] for row in conn.execute(f"SELECT id FROM {table} WHERE {column} IS NULL")]
            for row_id in ids:
                _apply(conn, head, now, _Change(table, row_id, values))
            counts.append(len(ids))
        if any(counts):
            log.warning("marked %d sessions, %d channels and %d listeners left open by a crash as ended", *counts)
        return sum(counts)

    # ---- the writer thread ------------------------------------------------------------------

    def _write_forever(self) -> None:
        stopping = False
        while not stopping:
            try:
                # While the store is failing, try it again every second even with nothing to write: logins are
                # refused only while `healthy` is False, so it must turn True soon after the store recovers.
                batch = [self._queue.get(timeout=None if self.healthy else _PROBE_SECONDS)]
            except queue.Empty:
                batch = [_Change("", None, {})]  # a no-op: takes the write lock and commits
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stopping = True
                batch = [item for item in batch if item is not _STOP]
            if batch:
                self._write_batch(batch)

    def _write_batch(self, batch: list[_Change]) -> None:
        conn = self._conn
        assert conn is not None
        time = iso(self._clock())
        try:
            with _transaction(conn):  # one transaction, one commit for the batch
                head = self._head_for_write(conn, time)
                results = [_apply(conn, head, time, change) for change in batch]
        except Exception as exc:  # sqlite3.Error, or a value SQLite refused; the writer must outlive it
            store_down = isinstance(exc, sqlite3.OperationalError)  # locked, full, read-only, I/O error
            if len(batch) > 1 and not store_down:  # write the others one by one, so only the bad row fails
                for change in batch:
                    self._write_batch([change])
                return
            # The whole store is failing: retrying row by row would only multiply the wait on a lock.
            log.error("audit write failed, %d rows not written (%s): %s", len(batch),
                      ", ".join(sorted({change.table or "flush" for change in batch})), exc)
            self.healthy = False
            for change in batch:
                if change.done is not None:
                    change.done(AuditUnavailable(f"audit log unavailable: {exc}"))
            return
        self._head = head
        self._checkpointer.wrote(len(batch))
        if not self.healthy:
            log.warning("audit log writable again")
            self.healthy = True
        for change, result in zip(batch, results):
            if change.done is not None:
                change.done(result)

    def _head_for_write(self, conn: sqlite3.Connection, time: str) -> Head:
        """The chain head in the database. Another process may have appended (a prune); if the head went
        *back* or changed under us, events were deleted while we ran: say so in the chain itself."""
        head = read_head(conn)
        mine = self._head
        if mine is not None and (head.seq < mine.seq or (head.seq == mine.seq and head.hash != mine.hash)):
            log.error("audit chain cut while running: head was %d, is now %d", mine.seq, head.seq)
            append(conn, head, time, "alarm", CHAIN_TABLE, head.seq + 1,
                   {"expected_seq": mine.seq, "expected_hash": mine.hash, "found_seq": head.seq})
        return head

    def _submit(self, table: str, row_id: Any, values: dict[str, Any]) -> None:
        self._queue.put(_Change(table, row_id, values))
        if self.observer is not None:
            self.observer(table, row_id, values)

    async def _commit(self, table: str, row_id: Any, values: dict[str, Any]) -> Any:
        """Queue a change and wait until it is committed; returns the row's id."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def done(result: Any) -> None:
            loop.call_soon_threadsafe(_settle, future, result)

        if self._thread is None:
            raise AuditUnavailable("audit log is not running")
        self._queue.put(_Change(table, row_id, values, done))
        committed = await future
        if self.observer is not None and table:
            self.observer(table, row_id, values)
        return committed

    # ---- typed records ----------------------------------------------------------------------

    def record_auth(
        self,
        user: str,
        client_ip: str,
        client_port: int,
        method: str,
        key_fingerprint: str | None,
        result: str,
        reason: str,
        certificate: Certificate | None = None,
    ) -> None:
        """`certificate`: the certificate offered, for its columns (#21)."""
        self._submit("auth", None, {
            "time": iso(self._clock()), "user": user, "client_ip": client_ip, "client_port": client_port,
            "method": method, "key_fingerprint": key_fingerprint, "result": result, "reason": reason,
            **certificate_columns(certificate),
        })

    async def open_session(self, record: SessionRecord) -> None:
        """Committed before the session may open a channel; AuditUnavailable if it cannot be written."""
        await self._commit("sessions", None, {
            "id": record.id, "user": record.user, "client_ip": record.client_ip, "client_port": record.client_port,
            "key_fingerprint": record.key_fingerprint, "client_version": record.client_version,
            "started_at": iso(record.started_at), **certificate_columns(record.certificate),
        })

    def end_session(self, session_id: str, reason: str, bytes_up: int, bytes_down: int) -> None:
        self._submit("sessions", session_id, {
            "ended_at": iso(self._clock()), "end_reason": reason, "bytes_up": bytes_up, "bytes_down": bytes_down,
        })

    async def record_channel(self, record: ChannelRecord) -> int:
        """Commit a channel decision (allow or deny) and return the channel id."""
        # a refused channel never opens: it is closed the moment it is decided
        closed_at = record.closed_at or (record.opened_at if record.decision == "deny" else None)
        return await self._commit("channels", None, {
            "session_id": record.session_id, "user": record.user, "kind": record.kind,
            "target_host": record.target_host, "target_ip": record.target_ip, "target_port": record.target_port,
            "decision": record.decision, "rule": record.rule, "reason": record.reason,
            "opened_at": iso(record.opened_at), "closed_at": iso(closed_at) if closed_at else None,
            "listener_id": record.listener_id, "peer_ip": record.peer_ip, "peer_port": record.peer_port,
            "target_ip_key": ip_key(record.target_ip),
        })

    def close_channel(self, channel_id: int, bytes_up: int, bytes_down: int, reason: str | None = None) -> None:
        """`reason` when the bastion closed it (revoked, shutdown); None when a side hung up."""
        self._submit("channels", channel_id, {
            "closed_at": iso(self._clock()), "bytes_up": bytes_up, "bytes_down": bytes_down, "close_reason": reason,
        })

    async def record_listener(self, record: ListenerRecord) -> int:
        """Commit a remote-forward listener decision (allow or deny) before it is announced; returns its id."""
        closed_at = record.closed_at or (record.opened_at if record.decision == "deny" else None)
        return await self._commit("listeners", None, {
            "session_id": record.session_id, "user": record.user, "listen_host": record.listen_host,
            "listen_port": record.listen_port, "requested_port": record.requested_port,
            "decision": record.decision, "rule": record.rule, "reason": record.reason,
            "opened_at": iso(record.opened_at), "closed_at": iso(closed_at) if closed_at else None,
            # a listener that never opened was closed for the reason it was refused or failed
            "close_reason": record.reason if closed_at else None,
        })

    def close_listener(self, listener_id: int, reason: str) -> None:
        self._submit("listeners", listener_id, {"closed_at": iso(self._clock()), "close_reason": reason})

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        await self._commit("", None, {})


class _transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error. IMMEDIATE takes the write lock first, so the chain
    head read inside is the one the new events link to, even with a prune running in another process."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, kind, value, traceback) -> None:
        if kind is None:
            self.conn.execute("COMMIT")
        elif self.conn.in_transaction:  # an error may already have rolled it back; the original propagates
            self.conn.execute("ROLLBACK")


def _apply(conn: sqlite3.Connection, head: Head, time: str, change: _Change) -> Any:
    """Write one change and chain the row's new state. Returns the row id, or None for an update of no row."""
    if not change.table:
        return None
    names = list(change.values)
    if change.row_id is None:
        kind = "insert"
        cursor = conn.execute(
            f"INSERT INTO {change.table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))}) RETURNING *",
            list(change.values.values()),
        )
    else:
        kind = "update"
        cursor = conn.execute(
            f"UPDATE {change.table} SET {', '.join(f'{name} = ?' for name in names)} WHERE id = ? RETURNING *",
            [*change.values.values(), change.row_id],
        )
    rows = cursor.fetchall()  # fetch all: a statement left open would block the COMMIT
    if not rows:
        return None  # nothing changed, nothing to chain
    state = dict(zip([d[0] for d in cursor.description], rows[0]))
    append(conn, head, time, kind, change.table, state["id"], state)
    return state["id"]


def _has_audit_rows(conn: sqlite3.Connection) -> bool:
    return any(conn.execute(f"SELECT 1 FROM {table} LIMIT 1").fetchone() for table in AUDIT_TABLES)


def _settle(future: asyncio.Future, result: Any) -> None:
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)
