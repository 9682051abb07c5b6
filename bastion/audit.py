"""The audit log: every login, session, channel and refusal, written by one thread off the event loop.

Writes are queued and committed in small batches (one fsync for many rows). A channel's row is committed
before its first byte flows: `open_channel()` and `deny_channel()` return only after the commit. If the
store cannot be written, those calls raise `AuditUnavailable` and the caller refuses the channel.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from .db import connect, iso, utc_now

log = logging.getLogger("bastion.audit")

_STOP = object()
_BATCH = 256


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


@dataclass(frozen=True, slots=True)
class ChannelRecord:
    session_id: str
    user: str
    kind: str  # direct-tcpip
    target_host: str  # as the client asked
    target_ip: str | None  # as connected (allowed) or resolved (denied)
    target_port: int
    decision: str  # allow | deny
    rule: str | None
    reason: str
    opened_at: datetime
    closed_at: datetime | None = None  # set when the channel never opened (refused, target unreachable)


class AuditLog:
    """Queue rows to a writer thread; `await` the rows that must be durable before going on."""

    def __init__(self, path: Path):
        self.path = path
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None

    # ---- lifecycle --------------------------------------------------------------------------

    def start(self) -> int:
        """Open the store, mark rows a crash left open, start the writer. Returns how many rows were closed."""
        self._conn = connect(self.path)
        closed = self._close_after_crash(self._conn)
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
        assert self._conn is not None
        self._conn.close()

    @staticmethod
    def _close_after_crash(conn: sqlite3.Connection) -> int:
        now = iso(utc_now())
        with conn:
            sessions = conn.execute(
                "UPDATE sessions SET ended_at = ?, end_reason = 'crash' WHERE ended_at IS NULL", [now]
            ).rowcount
            channels = conn.execute(
                "UPDATE channels SET closed_at = ? WHERE closed_at IS NULL", [now]
            ).rowcount
        if sessions or channels:
            log.warning("marked %d sessions and %d channels left open by a crash as ended", sessions, channels)
        return sessions + channels

    # ---- the writer thread ------------------------------------------------------------------

    def _write_forever(self) -> None:
        conn = self._conn
        assert conn is not None
        stopping = False
        while not stopping:
            batch = [self._queue.get()]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stopping = True
                batch = [item for item in batch if item is not _STOP]
            results: list[tuple[Callable | None, Any]] = []
            try:
                with conn:  # one transaction, one commit for the batch
                    for sql, params, done in batch:
                        cursor = conn.execute(sql, params)
                        results.append((done, cursor.lastrowid))
            except sqlite3.Error as exc:
                log.error("audit write failed, %d rows not written: %s", len(batch), exc)
                error = AuditUnavailable(f"audit log unavailable: {exc}")
                for _, _, done in batch:
                    if done is not None:
                        done(error)
                continue
            for done, rowid in results:
                if done is not None:
                    done(rowid)

    def _submit(self, sql: str, params: list) -> None:
        self._queue.put((sql, params, None))

    async def _commit(self, sql: str, params: list) -> int:
        """Queue a row and wait until it is committed; returns its rowid."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[int] = loop.create_future()

        def done(result: int | Exception) -> None:
            loop.call_soon_threadsafe(_settle, future, result)

        if self._thread is None:
            raise AuditUnavailable("audit log is not running")
        self._queue.put((sql, params, done))
        return await future

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
    ) -> None:
        self._submit(
            "INSERT INTO auth (time, user, client_ip, client_port, method, key_fingerprint, result, reason) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [iso(utc_now()), user, client_ip, client_port, method, key_fingerprint, result, reason],
        )

    def open_session(self, record: SessionRecord) -> None:
        """Queued, not awaited: the writer keeps order, so the row lands before any of its channels'."""
        self._submit(
            "INSERT INTO sessions (id, user, client_ip, client_port, key_fingerprint, client_version, started_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                record.id,
                record.user,
                record.client_ip,
                record.client_port,
                record.key_fingerprint,
                record.client_version,
                iso(record.started_at),
            ],
        )

    def end_session(self, session_id: str, reason: str, bytes_up: int, bytes_down: int) -> None:
        self._submit(
            "UPDATE sessions SET ended_at = ?, end_reason = ?, bytes_up = ?, bytes_down = ? WHERE id = ?",
            [iso(utc_now()), reason, bytes_up, bytes_down, session_id],
        )

    async def record_channel(self, record: ChannelRecord) -> int:
        """Commit a channel decision (allow or deny) and return the channel id."""
        return await self._commit(
            "INSERT INTO channels (session_id, user, kind, target_host, target_ip, target_port, decision, rule, "
            "reason, opened_at, closed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                record.session_id,
                record.user,
                record.kind,
                record.target_host,
                record.target_ip,
                record.target_port,
                record.decision,
                record.rule,
                record.reason,
                iso(record.opened_at),
                # a refused channel never opens: it is closed the moment it is decided
                iso(record.closed_at or record.opened_at) if record.closed_at or record.decision == "deny" else None,
            ],
        )

    def close_channel(self, channel_id: int, bytes_up: int, bytes_down: int) -> None:
        self._submit(
            "UPDATE channels SET closed_at = ?, bytes_up = ?, bytes_down = ? WHERE id = ?",
            [iso(utc_now()), bytes_up, bytes_down, channel_id],
        )

    async def flush(self) -> None:
        """Wait until everything queued so far is committed."""
        await self._commit("SELECT 1", [])


def _settle(future: asyncio.Future, result: Any) -> None:
    if future.done():
        return
    if isinstance(result, Exception):
        future.set_exception(result)
    else:
        future.set_result(result)
