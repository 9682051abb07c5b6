"""Keeping the audit log verifiable over time: verify it, prune old rows with an anchor, export it for elsewhere.

Prune removes a *prefix* of the chain (events written before the cutoff) and the finished rows whose last
event lies in it. Rows still open keep their state: a `restate` event carries it past the cut. An `anchor`
event records the last pruned seq and its hash, so the first remaining event still links to something
verify can check. Each step is its own short transaction, so the server's writer waits at most a moment.

An export is the chain itself, one JSON object per line between a header and a trailer. Every event holds
its row's full state, so the file is self-contained: `bastion audit verify --file` (or twenty lines of any
language, see the README) checks it without the database.
"""

from __future__ import annotations

import json
import re
import sqlite3
import sys
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Iterator, TextIO

from .chain import (AUDIT_TABLES, CHAIN_TABLE, ChainReport, Meter, Progress, append, check_events, check_head,
                    read_head, verify_database)
from ..clock import iso
from ..errors import BastionError
from ..safe_files import is_stdout, new_file
from ..store.schema import connect
from .query import open_reader

EXPORT_FORMAT = "bastion-audit-export"
_HEAD = re.compile(r"[0-9]{1,18}:[0-9a-f]{64}")  # 18 digits: a seq SQLite's 64-bit INTEGER can hold
_EVENT_FIELDS = ("seq", "time", "kind", "tbl", "row_id", "payload", "prev_hash", "hash")
_FINISHED = {"auth": None, "sessions": "ended_at", "channels": "closed_at", "listeners": "closed_at"}


class AuditTampered(BastionError):
    """The chain does not verify; pruning now would erase the evidence."""


def verify(database: Path, head: str | None = None, progress: Progress | None = None) -> ChainReport:
    """The whole chain and every audit row (see chain.py); `head` is a SEQ:HASH recorded elsewhere earlier."""
    if head is not None and not _HEAD.fullmatch(head):  # bad input, not a finding about the chain
        raise BastionError(f"cannot read --head {head!r}: expected SEQ:HASH (a number, a colon, 64 hex "
                           "digits) as printed by `bastion audit verify`")
    conn = open_reader(database)
    try:
        conn.execute("BEGIN")  # one snapshot for the chain and the rows, even while the server writes
        report = verify_database(conn, progress)
        if head is not None:
            check_head(conn, head, report)
        conn.execute("COMMIT")
        return report
    finally:
        conn.close()


@dataclass(slots=True)
class PruneReport:
    cutoff: str
    events: int = 0
    deleted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(AUDIT_TABLES, 0))
    restated: int = 0
    held_back: bool = False  # old events kept because they were not shipped yet (#22)


def prune(database: Path, older_than: timedelta, now: datetime, chunk: int = 5000, *, dry_run: bool = False,
          progress: Progress | None = None, through: int | None = None) -> PruneReport:
    """Delete finished rows whose last change was written before `now - older_than`, keeping the chain
    verifiable. Refuses when the chain does not verify (pruning would launder the tampering). With `dry_run`,
    counts what it would delete and carry over, on a read-only connection, and changes nothing. `through`: no
    event after this seq goes, however old (#22: the events not yet shipped to the fleet's PostgreSQL)."""
    report = verify(database, progress=progress)
    if not report.intact:
        raise AuditTampered(f"the audit log does not verify, so nothing was pruned: {report.problems[0]}")
    result = PruneReport(cutoff=iso(now - older_than))
    conn = open_reader(database) if dry_run else connect(database)
    conn.isolation_level = None
    try:
        if dry_run:
            conn.execute("BEGIN")  # one snapshot for the whole count
        first_row = conn.execute("SELECT min(seq) FROM audit_events").fetchone()
        young = conn.execute("SELECT seq FROM audit_events WHERE time >= ? ORDER BY seq LIMIT 1",
                             [result.cutoff]).fetchone()
        first = first_row[0] or 1
        last = young[0] - 1 if young else read_head(conn).seq
        if through is not None and through < last:
            last = through
            result.held_back = True
        meter = Meter(progress, "counting" if dry_run else "pruning", max(0, last - first + 1))
        while first <= last:
            through = min(first + chunk - 1, last)
            if dry_run:
                _count_through(conn, first, through, result)
            else:
                _prune_through(conn, first, through, iso(now), result)
            meter.step(through - first + 1)
            first = through + 1
        meter.finish()
        if dry_run:
            conn.execute("COMMIT")
        else:
            conn.execute("PRAGMA optimize")
    finally:
        conn.close()
    return result


def _leaving(conn: sqlite3.Connection, first: int, through: int) -> Iterator[tuple[str, Any, dict[str, Any], bool]]:
    """The rows whose newest event lies in seq first..through: (table, id, state, finished). A finished row goes
    with its events; an open one is carried past the cut by a `restate` event."""
    latest: dict[tuple[str, Any], str] = {}
    for table, row_id, payload in conn.execute(
        "SELECT tbl, row_id, payload FROM audit_events WHERE seq BETWEEN ? AND ? ORDER BY seq", [first, through]
    ):
        if table in _FINISHED:
            latest[(table, row_id)] = payload
    for (table, row_id), payload in latest.items():
        later = conn.execute("SELECT 1 FROM audit_events WHERE tbl = ? AND row_id = ? AND seq > ? LIMIT 1",
                             [table, row_id, through]).fetchone()
        if later is not None:
            continue  # its newer events stay, and each carries the full state
        state = json.loads(payload)
        column = _FINISHED[table]
        yield table, row_id, state, column is None or state.get(column) is not None


def _count_through(conn: sqlite3.Connection, first: int, through: int, result: PruneReport) -> None:
    for table, _, _, finished in _leaving(conn, first, through):
        if finished:
            result.deleted[table] += 1
        else:
            result.restated += 1
    result.events += through - first + 1  # seq has no gaps (verify said so)


def _prune_through(conn: sqlite3.Connection, first: int, through: int, now: str, result: PruneReport) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        head = read_head(conn)
        pruned_head = conn.execute("SELECT hash FROM audit_events WHERE seq = ?", [through]).fetchone()[0]
        for table, row_id, state, finished in list(_leaving(conn, first, through)):
            if finished:
                conn.execute(f"DELETE FROM {table} WHERE id = ?", [row_id])
                result.deleted[table] += 1
            else:  # still open: carry its state past the cut
                append(conn, head, now, "restate", table, row_id, state)
                result.restated += 1
        result.events += conn.execute("DELETE FROM audit_events WHERE seq BETWEEN ? AND ?", [first, through]).rowcount
        append(conn, head, now, "anchor", CHAIN_TABLE, through,
               {"pruned_through": through, "pruned_head": pruned_head, "cutoff": result.cutoff})
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@dataclass(slots=True)
class VacuumReport:
    before: int  # bytes of the database file (its WAL checkpointed into it)
    after: int


def vacuum(database: Path) -> VacuumReport:
    """Give the space of pruned rows back to the file system: SQLite's VACUUM rewrites the file without its free
    pages. Safe while the server runs: VACUUM holds the write lock while it works, so the server's audit writes
    wait for it (for up to their 10 s busy timeout)."""
    if not database.exists():
        raise BastionError(f"{database}: no database here; run `bastion init` first")
    conn = connect(database)
    conn.isolation_level = None
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # what the WAL holds goes into the file first
        before = database.stat().st_size
        conn.execute("VACUUM")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")  # the rewritten pages sit in the WAL until now
        return VacuumReport(before, database.stat().st_size)
    finally:
        conn.close()


# ---- export -----------------------------------------------------------------------------------------------


def export(database: Path, destination: Path, now: datetime, progress: Progress | None = None) -> dict[str, Any]:
    """Write the chain to `destination`, or to standard output when it is `-`. Returns the trailer.

    A file is new, mode 0600 (it holds every login and target), written whole under a temporary name and only
    then linked into place: never over an existing file, never through a planted link (safe_files)."""
    if is_stdout(destination):
        return _write_export(database, sys.stdout, now, progress)
    with new_file(Path(destination)) as out:
        return _write_export(database, out, now, progress)


def _write_export(database: Path, out: TextIO, now: datetime, progress: Progress | None) -> dict[str, Any]:
    conn = open_reader(database)
    try:
        conn.execute("BEGIN")  # one snapshot: a prune or new rows during the export change nothing in it
        first = conn.execute("SELECT seq, prev_hash FROM audit_events ORDER BY seq LIMIT 1").fetchone()
        count, head_seq, head_hash = 0, 0, None
        out.write(json.dumps({
            "format": EXPORT_FORMAT, "version": 1, "hash": "sha256-chain-v1", "exported_at": iso(now),
            "source": str(database), "first_seq": first[0] if first else None,
            "first_prev_hash": first[1] if first else None}) + "\n")
        total = conn.execute("SELECT count(*) FROM audit_events").fetchone()[0] if progress else None
        meter = Meter(progress, "exporting", total)
        cursor = conn.execute(f"SELECT {', '.join(_EVENT_FIELDS)} FROM audit_events ORDER BY seq")
        for values in meter.over(cursor):
            out.write(json.dumps(dict(zip(_EVENT_FIELDS, values)), ensure_ascii=False) + "\n")
            count, head_seq, head_hash = count + 1, values[0], values[7]
        trailer = {"end": True, "events": count, "head_seq": head_seq, "head_hash": head_hash}
        out.write(json.dumps(trailer) + "\n")
        out.flush()
        meter.finish()
        conn.execute("COMMIT")
        return trailer
    finally:
        conn.close()


def verify_export(path: Path) -> ChainReport:
    """Check an export file: its header, every hash and link, and that the trailer names the last event."""
    report = ChainReport()
    try:
        with open(path, encoding="utf-8") as lines:
            header = _json_line(next(lines, ""), path, 1)
            if header.get("format") != EXPORT_FORMAT:
                raise BastionError(f"{path}:1: not a bastion audit export (format {header.get('format')!r})")
            trailer: dict[str, Any] = {}
            check_events(_events(lines, path, trailer), report)
    except OSError as exc:
        raise BastionError(f"{path}: cannot read export: {exc.strerror}") from None
    except UnicodeDecodeError as exc:  # an export is UTF-8 JSON lines: binary bytes are no export, as bad JSON is
        raise BastionError(f"{path}: not a bastion audit export (not UTF-8 text at byte {exc.start})") from None
    if not trailer:
        report.problem("the export has no trailer: it was cut short")
    elif (trailer.get("events"), trailer.get("head_seq")) != (report.events, report.head.seq) or (
            report.events and trailer.get("head_hash") != report.head.hash):
        report.problem(f"the trailer says {trailer.get('events')} events ending at seq {trailer.get('head_seq')}, "
                       f"the file holds {report.events} ending at seq {report.head.seq}")
    return report


def _events(lines: Iterator[str], path: Path, trailer: dict[str, Any]) -> Iterator[tuple]:
    for number, line in enumerate(lines, start=2):
        record = _json_line(line, path, number)
        if record.get("end") is True:
            trailer.update(record)
            return
        try:
            yield tuple(record[name] for name in _EVENT_FIELDS)
        except KeyError as exc:
            raise BastionError(f"{path}:{number}: event without {exc.args[0]!r}") from None


def _json_line(line: str, path: Path, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except ValueError:
        raise BastionError(f"{path}:{number}: not a JSON line") from None
    if not isinstance(record, dict):
        raise BastionError(f"{path}:{number}: not a JSON object")
    return record
