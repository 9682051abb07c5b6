"""Tamper evidence for the audit log: every change to an audit row is also an event in `audit_events`, and each
event's hash covers the previous event's hash, so an edit anywhere shows.

Rows are updated (a session ends, a channel closes), so the chain records *changes*, not rows. An event holds
the row's full state after the change, as canonical JSON (keys sorted, no spaces, UTF-8), and

    hash = SHA-256( prev_hash "\\n" seq "\\n" time "\\n" kind "\\n" tbl "\\n" json(row_id) "\\n" payload )

as lowercase hex; the first event's prev_hash is 64 zeros. `verify()` recomputes every hash and link, then
checks that each audit row equals the payload of its latest event, so it names:
- an edited event (its hash no longer matches), a deleted one (a gap in seq), an inserted or replaced one
  (a link that does not match);
- an edited row (differs from its last event), a deleted row (an event but no row), an inserted row (a row
  without event).

Kinds: insert/update (the writer), adopt (rows that existed before the chain, once), restate (a row's state
carried over a prune), anchor (a prune: which prefix went and its last hash), alarm (the writer found the
chain's tail gone while it ran, or the whole chain gone at start). Limits: whoever can write the file can rebuild the whole chain, and deleting
the newest events with their rows leaves a shorter valid chain; both are caught only against a head recorded
elsewhere (`verify --head SEQ:HASH`; `follow --jsonl` and `export` carry hashes).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, TypeVar

AUDIT_TABLES = ("auth", "sessions", "channels", "listeners")
GENESIS = "0" * 64
CHAIN_TABLE = "audit_events"  # tbl of anchor and alarm events
_SHOWN_PROBLEMS = 20


def canonical(state: dict[str, Any]) -> str:
    return json.dumps(state, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def event_hash(prev_hash: str, seq: int, time: str, kind: str, tbl: str, row_id: Any, payload: str) -> str:
    identity = str(row_id) if type(row_id) is int else json.dumps(row_id)  # the same text, faster for ints
    material = f"{prev_hash}\n{seq}\n{time}\n{kind}\n{tbl}\n{identity}\n{payload}"
    return hashlib.sha256(material.encode()).hexdigest()


@dataclass(slots=True)
class Head:
    """The newest event: where the next one links."""

    seq: int = 0
    hash: str = GENESIS


def read_head(conn: sqlite3.Connection) -> Head:
    row = conn.execute("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1").fetchone()
    return Head(row[0], row[1]) if row else Head()


def append(conn: sqlite3.Connection, head: Head, time: str, kind: str, tbl: str, row_id: Any,
           state: dict[str, Any]) -> None:
    """Add one event after `head` (inside the caller's transaction) and move `head` to it."""
    payload = canonical(state)
    seq = head.seq + 1
    digest = event_hash(head.hash, seq, time, kind, tbl, row_id, payload)
    conn.execute(
        "INSERT INTO audit_events (seq, time, kind, tbl, row_id, payload, prev_hash, hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [seq, time, kind, tbl, row_id, payload, head.hash, digest],
    )
    head.seq, head.hash = seq, digest


def adopt_existing_rows(conn: sqlite3.Connection, time: str, head: Head) -> int:
    """Once, when the chain is empty: an `adopt` event for every audit row written before the chain existed."""
    if head.seq != 0:
        return 0
    adopted = 0
    for table in AUDIT_TABLES:
        cursor = conn.execute(f"SELECT * FROM {table} ORDER BY id")
        columns = [d[0] for d in cursor.description]
        for row in cursor.fetchall():
            state = dict(zip(columns, row))
            append(conn, head, time, "adopt", table, state["id"], state)
            adopted += 1
    return adopted


# ---- progress -----------------------------------------------------------------------------------------

Progress = Callable[[str, int, "int | None"], None]
"""How far a long task is: (what, done, total); total None while unknown. The CLI draws it (or not)."""
T = TypeVar("T")


class Meter:
    """Counts work done and tells a Progress callback every `every` steps (cheap enough per row)."""

    def __init__(self, progress: Progress | None, what: str, total: int | None, done: int = 0, every: int = 4096):
        self.progress, self.what, self.total, self.done, self.every = progress, what, total, done, every
        self._next = done + every
        if progress is not None:
            progress(what, done, total)

    def step(self, count: int = 1) -> None:
        self.done += count
        if self.progress is not None and self.done >= self._next:
            self._next = self.done + self.every
            self.progress(self.what, self.done, self.total)

    def finish(self) -> None:
        if self.progress is not None:
            self.progress(self.what, self.total if self.total is not None else self.done, self.total)

    def over(self, items: Iterable[T]) -> Iterator[T]:
        """The items, counted as they pass (the items themselves when nobody is watching)."""
        if self.progress is None:
            yield from items
            return
        for item in items:
            yield item
            self.step()


# ---- verification -------------------------------------------------------------------------------------


@dataclass(slots=True)
class ChainReport:
    """What verify found. `problems` are in chain order then table order; the first is the first break."""

    events: int = 0
    first_seq: int | None = None
    head: Head = field(default_factory=Head)
    rows: int = 0
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0

    @property
    def intact(self) -> bool:
        return self.problem_count == 0

    def problem(self, text: str) -> None:
        self.problem_count += 1
        if len(self.problems) < _SHOWN_PROBLEMS:
            self.problems.append(text)

    def as_dict(self) -> dict[str, Any]:
        return {"intact": self.intact, "events": self.events, "first_seq": self.first_seq,
                "head_seq": self.head.seq, "head_hash": self.head.hash, "rows": self.rows,
                "problem_count": self.problem_count, "problems": self.problems}


def missing(first: int, last: int) -> str:
    return f"event {first}" if first == last else f"events {first}..{last}"


EventRow = tuple[int, str, str, str, Any, str, str, str]  # seq, time, kind, tbl, row_id, payload, prev, hash


def check_events(events: Iterator[EventRow], report: ChainReport) -> dict[int, str]:
    """Recompute every hash and link. Returns the anchors seen: pruned_through seq -> the hash it ended with."""
    anchors: dict[int, str] = {}
    first: EventRow | None = None
    last_seq, last_hash = 0, GENESIS
    for event in events:
        seq, time, kind, tbl, row_id, payload, prev_hash, digest = event
        report.events += 1
        if first is None:
            first = event
        elif seq != last_seq + 1:
            report.problem(f"{missing(last_seq + 1, seq - 1)} deleted: the chain jumps from seq {last_seq} to {seq}")
        elif prev_hash != last_hash:
            report.problem(f"event {seq} inserted or replaced, or event {last_seq} rewritten: "
                           f"its prev_hash does not link to event {last_seq}")
        if event_hash(prev_hash, seq, time, kind, tbl, row_id, payload) != digest:
            report.problem(f"event {seq} ({kind} {tbl} {row_id}) edited: its hash does not match its content")
        if kind == "anchor":
            try:
                anchor = json.loads(payload)
                anchors[int(anchor["pruned_through"])] = str(anchor["pruned_head"])
            except (ValueError, KeyError, TypeError):
                report.problem(f"event {seq} is an anchor that cannot be read")
        elif kind == "alarm":
            report.problem(f"event {seq}: the audit writer found the chain cut while it ran: {payload}")
        last_seq, last_hash = seq, digest
    report.head = Head(last_seq, last_hash)
    if first is not None:
        report.first_seq = first[0]
        if first[0] == 1 and first[6] != GENESIS:
            report.problem("event 1 does not start from the genesis hash")
        elif first[0] > 1 and anchors.get(first[0] - 1) != first[6]:
            report.problem(f"{missing(1, first[0] - 1)} deleted: no prune anchor accounts for them")
    return anchors


def check_rows(conn: sqlite3.Connection, report: ChainReport, meter: Meter | None = None) -> None:
    """Each audit row must equal the state in its latest event; each row with an event must exist."""
    for table in AUDIT_TABLES:
        # the bare `payload` comes from the row holding max(seq) (an SQLite guarantee for min/max queries)
        latest = conn.execute(
            "SELECT row_id, max(seq), payload FROM audit_events WHERE tbl = ? GROUP BY row_id ORDER BY row_id",
            [table],
        )
        cursor = conn.execute(f"SELECT * FROM {table} ORDER BY id")
        columns = [d[0] for d in cursor.description]
        rows = (dict(zip(columns, values)) for values in (meter.over(cursor) if meter else cursor))
        row, event = next(rows, None), next(latest, None)
        while row is not None or event is not None:
            if event is None or (row is not None and _order(row["id"]) < _order(event[0])):
                assert row is not None
                report.rows += 1
                report.problem(f"{table} row {row['id']!r} inserted: no audit event wrote it")
                row = next(rows, None)
            elif row is None or _order(event[0]) < _order(row["id"]):
                report.problem(f"{table} row {event[0]!r} deleted: event {event[1]} wrote it, the row is gone")
                event = next(latest, None)
            else:
                report.rows += 1
                _compare(table, row, event, report)
                row, event = next(rows, None), next(latest, None)


def _order(value: Any) -> tuple[int, Any]:
    """SQLite's ORDER BY across types (numbers before text before blobs), so a forged row_id cannot derail the walk."""
    if isinstance(value, (int, float)):
        return (1, value)
    if isinstance(value, str):
        return (2, value.encode())
    if isinstance(value, bytes):
        return (3, value)
    return (0, 0)


def _compare(table: str, row: dict[str, Any], event: tuple[Any, int, str], report: ChainReport) -> None:
    if canonical(row) == event[2]:  # the common case, and cheap: the payload is this very serialization
        return
    try:
        state = json.loads(event[2])
    except ValueError:
        state = {}
    changed = [c for c in row if row[c] != state.get(c)]
    if changed:
        shown = ", ".join(f"{c} is {row[c]!r}, event {event[1]} says {state.get(c)!r}" for c in changed[:3])
        report.problem(f"{table} row {row['id']!r} edited: {shown}")


def verify_database(conn: sqlite3.Connection, progress: Progress | None = None) -> ChainReport:
    """Walk the whole chain, then compare the audit tables with it. Read-only; streams, so memory stays flat."""
    report = ChainReport()
    total = None
    if progress is not None:  # counting is quick next to hashing every event
        total = sum(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
                    for table in (CHAIN_TABLE, *AUDIT_TABLES))
    meter = Meter(progress, "verifying", total)
    check_events(meter.over(conn.execute("SELECT seq, time, kind, tbl, row_id, payload, prev_hash, hash "
                                         "FROM audit_events ORDER BY seq")), report)
    check_rows(conn, report, meter)
    meter.finish()
    return report


def check_head(conn: sqlite3.Connection, expected: str, report: ChainReport) -> None:
    """`--head SEQ:HASH`, recorded elsewhere earlier: the chain must still contain it (or a prune anchor of it)."""
    seq_text, _, digest = expected.partition(":")
    if not seq_text.isdigit() or len(digest) != 64:
        report.problem(f"cannot read head {expected!r}: expected SEQ:HASH as printed by `bastion audit verify`")
        return
    seq = int(seq_text)
    row = conn.execute("SELECT hash FROM audit_events WHERE seq = ?", [seq]).fetchone()
    if row is not None:
        if row[0] != digest:
            report.problem(f"event {seq} is not the one recorded elsewhere: the chain was rewritten from there on")
        return
    if seq > report.head.seq:
        report.problem(f"{missing(report.head.seq + 1, seq)} deleted: the recorded head is seq {seq}, "
                       f"the chain ends at {report.head.seq}")
        return
    anchored = conn.execute(
        "SELECT 1 FROM audit_events WHERE kind = 'anchor' AND json_extract(payload, '$.pruned_through') = ? "
        "AND json_extract(payload, '$.pruned_head') = ?", [seq, digest]).fetchone()
    if anchored is None:
        report.problem(f"event {seq} was pruned and no anchor confirms the recorded hash")
