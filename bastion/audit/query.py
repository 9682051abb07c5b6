"""Reading the audit log: filtered rows, one session's timeline, statistics and a live tail.

Everything here reads through `open_reader()`: a read-only connection to the WAL database, so a query never
blocks the server's writer (and never holds a read transaction longer than one statement, except `export`).
"""

from __future__ import annotations

import json
import sqlite3
import time as clock
from collections import defaultdict
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..clock import iso, utc_now
from ..errors import BastionError, StoreError
from ..errors import DamagedDatabase as _Damaged
from ..store.schema import MIGRATIONS, connect
from .filters import TABLES, TIME_COLUMN, Filters, ip_key, parse_client, parse_target, where_clause
from .filters import parse_moment as _parse_moment

# the certificate that logged in (#21); NULL for a key login
CERT_COLUMNS = ["cert_key_id", "cert_serial", "cert_ca", "cert_principals", "cert_valid_after", "cert_valid_before"]
COLUMNS = {
    "auth": ["id", "time", "user", "client_ip", "client_port", "method", "key_fingerprint", "result", "reason",
             *CERT_COLUMNS],
    "sessions": ["id", "user", "client_ip", "client_port", "key_fingerprint", "client_version", "started_at",
                 "ended_at", "end_reason", "bytes_up", "bytes_down", *CERT_COLUMNS],
    "channels": ["id", "session_id", "user", "kind", "target_host", "target_ip", "target_port", "decision", "rule",
                 "reason", "opened_at", "closed_at", "close_reason", "bytes_up", "bytes_down", "listener_id", "peer_ip",
                 "peer_port"],
    "listeners": ["id", "session_id", "user", "listen_host", "listen_port", "requested_port", "decision", "rule",
                  "reason", "opened_at", "closed_at", "close_reason"],
}
# how long before a session's start its logins may lie (the login grace time is far shorter)
_LOGIN_WINDOW_SECONDS = 600


class NotFound(BastionError):
    """The audit log has no such row."""


class DamagedDatabase(_Damaged):
    """The database file is there but SQLite cannot read it (not a database, malformed, unreadable): a problem
    found, not bad input, so the CLI exits 1. Named by the file and SQLite's words."""

    def __init__(self, database: Path, exc: sqlite3.Error):
        super().__init__(f"{database}: {exc} (run `bastion doctor`)")


def parse_moment(text: str, now: datetime | None = None) -> datetime:
    """'15m', '2h', '7d' (that long ago) or ISO 8601; see filters.parse_moment."""
    return _parse_moment(text, now or utc_now())


def open_reader(database: Path) -> sqlite3.Connection:
    """A read-only connection with the `ip_key` SQL function the filters use."""
    if not database.exists():
        raise StoreError(f"{database}: no database here; run `bastion init` first")
    conn = connect(database, readonly=True)
    try:
        conn.execute("PRAGMA query_only = ON")
        conn.create_function("ip_key", 1, ip_key, deterministic=True)
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.DatabaseError as exc:  # SQLite reads the file only now: garbage bytes show up here
        conn.close()
        raise DamagedDatabase(database, exc) from None
    if version < len(MIGRATIONS):
        conn.close()
        raise StoreError(f"{database}: the schema is older than this bastion (version {version}, want "
                         f"{len(MIGRATIONS)}); run `bastion init` or start the server once to upgrade it")
    return conn


def select(conn: sqlite3.Connection, table: str, filters: Filters) -> Iterator[dict[str, Any]]:
    """Rows of one audit table that match, oldest first. With a limit, the newest `limit` rows."""
    where, params = where_clause(table, filters, time_first=_time_first(conn, table, filters))
    columns = COLUMNS[table]
    time_column = TIME_COLUMN[table]
    sql = f"SELECT {', '.join(columns)} FROM {table}" + (f" WHERE {where}" if where else "")
    if filters.limit is not None:
        rows = conn.execute(sql + f" ORDER BY {time_column} DESC, rowid DESC LIMIT ?", [*params, filters.limit])
        for values in reversed(rows.fetchall()):
            yield _typed(dict(zip(columns, values)))
        return
    for values in conn.execute(sql + f" ORDER BY {time_column}, rowid", params):
        yield _typed(dict(zip(columns, values)))


def _typed(row: dict[str, Any]) -> dict[str, Any]:
    """A certificate's serial as a number and its principals as a list (stored as text: a uint64, a JSON array)."""
    if row.get("cert_serial") is not None:
        row["cert_serial"] = int(row["cert_serial"])
    if row.get("cert_principals") is not None:
        try:
            row["cert_principals"] = json.loads(row["cert_principals"])
        except ValueError:
            pass  # shown as stored
    return row


_PROBE_ROWS = 20_000


def _time_first(conn: sqlite3.Connection, table: str, filters: Filters) -> bool:
    """For a target network and a time window on channels: which index finds fewer rows? SQLite cannot know how
    many addresses a range holds, so ask both, each capped at _PROBE_ROWS entries (a few ms at most)."""
    target = filters.target
    if table not in ("channels", "sessions") or target is None or target.key_range is None or (
            filters.since is None and filters.until is None) or target.key_range[0] == target.key_range[1]:
        return False
    window = conn.execute(
        "SELECT count(*) FROM (SELECT 1 FROM channels WHERE opened_at >= ? AND opened_at < ? LIMIT ?)",
        [iso(filters.since) if filters.since else "", iso(filters.until) if filters.until else "9999", _PROBE_ROWS],
    ).fetchone()[0]
    network = conn.execute(
        "SELECT count(*) FROM (SELECT 1 FROM channels WHERE target_ip_key BETWEEN ? AND ? LIMIT ?)",
        [*target.key_range, _PROBE_ROWS],
    ).fetchone()[0]
    return window < network


def make_filters(
    *,
    user: str | None = None,
    since: datetime | str | None = None,
    until: datetime | str | None = None,
    target: str | None = None,
    denied: bool = False,
    session: str | None = None,
    client: str | None = None,
    limit: int | None = None,
    now: datetime | None = None,
    cert_serial: int | None = None,
    key_id: str | None = None,
) -> Filters:
    """Filters from the CLI's spelling: times as datetimes or text ('2h', ISO 8601), target and client as text."""
    now = now or utc_now()
    return Filters(
        user=user,
        since=_parse_moment(since, now) if isinstance(since, str) else since,
        until=_parse_moment(until, now) if isinstance(until, str) else until,
        target=parse_target(target) if target is not None else None,
        denied=denied,
        session=session,
        client=parse_client(client) if client is not None else None,
        limit=limit,
        cert_serial=cert_serial,
        key_id=key_id,
    )


def query(database: Path, table: str, **filters: Any) -> list[dict[str, Any]]:
    """Rows of one audit table, oldest first; keyword filters as in `make_filters`."""
    conn = open_reader(database)
    try:
        return list(select(conn, table, make_filters(**filters)))
    finally:
        conn.close()


# ---- one session ----------------------------------------------------------------------------------------


def session_record(conn: sqlite3.Connection, session_id: str) -> dict[str, Any]:
    """A session with its logins (same client address and port, just before it), channels and listeners."""
    session = next(select(conn, "sessions", Filters(session=session_id)), None)
    if session is None:
        raise NotFound(f"no session {session_id!r} in the audit log; list them with `bastion audit sessions`")
    started = datetime.fromisoformat(session["started_at"].replace("Z", "+00:00"))
    auth = list(conn.execute(
        f"SELECT {', '.join(COLUMNS['auth'])} FROM auth WHERE time >= ? AND time <= ? AND client_ip = ? "
        "AND client_port = ? AND user = ? ORDER BY time, id",
        [iso(started - timedelta(seconds=_LOGIN_WINDOW_SECONDS)),
         session["started_at"], session["client_ip"], session["client_port"], session["user"]],
    ))
    return {
        "session": session,
        "auth": [_typed(dict(zip(COLUMNS["auth"], row))) for row in auth],
        "channels": list(select(conn, "channels", Filters(session=session_id))),
        "listeners": list(select(conn, "listeners", Filters(session=session_id))),
    }


def timeline(record: dict[str, Any]) -> list[dict[str, Any]]:
    """The session as events in time order: login(s), start, each listener and channel (with how it ended), end."""
    session = record["session"]
    entries: list[tuple[str, int, dict[str, Any]]] = []
    for row in record["auth"]:
        entries.append((row["time"], 0, {"time": row["time"], "event": f"login {row['result']}",
                                         "what": f"{row['method']} {row['key_fingerprint'] or ''}".strip(),
                                         "reason": row["reason"]}))
    certificate = "" if not session.get("cert_key_id") and session.get("cert_serial") is None else (
        f" with certificate key id {session['cert_key_id']} serial {session['cert_serial']} CA {session['cert_ca']}"
        f" valid {session['cert_valid_after']} to {session['cert_valid_before']}")  # (#21)
    entries.append((session["started_at"], 1, {
        "time": session["started_at"], "event": "session start",
        "what": f"{session['user']} from {session['client_ip']}:{session['client_port']} ({session['client_version']})"
                f"{certificate}",
        "reason": ""}))
    for row in record["channels"]:
        where = f"{row['target_host']}:{row['target_port']}"
        if row["target_ip"] and row["target_ip"] != row["target_host"]:
            where += f" ({row['target_ip']})"
        if row["peer_ip"]:
            where = f"{row['peer_ip']}:{row['peer_port']} -> {where}"
        entries.append((row["opened_at"], 2, {
            "time": row["opened_at"], "event": f"channel {row['id']} {row['decision']}",
            "what": f"{row['kind']} {where}", "reason": _reason(row), "closed_at": row["closed_at"],
            "close_reason": row["close_reason"], "bytes_up": row["bytes_up"], "bytes_down": row["bytes_down"]}))
    for row in record["listeners"]:
        requested = "" if row["requested_port"] == row["listen_port"] else f" (asked {row['requested_port']})"
        entries.append((row["opened_at"], 2, {
            "time": row["opened_at"], "event": f"listener {row['id']} {row['decision']}",
            "what": f"{row['listen_host']}:{row['listen_port']}{requested}", "reason": _reason(row),
            "closed_at": row["closed_at"], "close_reason": row["close_reason"]}))
    if session["ended_at"]:
        entries.append((session["ended_at"], 4, {
            "time": session["ended_at"], "event": "session end", "what": session["end_reason"] or "",
            "reason": "", "started_at": session["started_at"],
            "bytes_up": session["bytes_up"], "bytes_down": session["bytes_down"]}))
    # a stable sort: at the same millisecond, channels before listeners (as appended)
    return [entry for _, _, entry in sorted(entries, key=lambda e: (e[0], e[1]))]


def _reason(row: dict[str, Any]) -> str:
    return f"{row['reason']} [{row['rule']}]" if row.get("rule") else row["reason"]


# ---- statistics -----------------------------------------------------------------------------------------


def stats(conn: sqlite3.Connection, since: datetime, until: datetime | None = None, top: int = 10) -> dict[str, Any]:
    """Per-day counts, top users, top targets, top refused targets and top sources of refusals."""
    low = iso(since)
    high = iso(until) if until else "9999"

    def rows(sql: str, *params: Any) -> list[tuple]:
        return conn.execute(sql, [low, high, *params]).fetchall()

    days: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(
        ("sessions", "channels", "refused_channels", "refused_listeners", "auth_failures"), 0))
    for name, sql in (
        ("sessions", "SELECT substr(started_at, 1, 10) d, count(*) FROM sessions WHERE started_at >= ? AND started_at < ? GROUP BY d"),
        ("channels", "SELECT substr(opened_at, 1, 10) d, count(*) FROM channels WHERE opened_at >= ? AND opened_at < ? GROUP BY d"),
        ("refused_channels", "SELECT substr(opened_at, 1, 10) d, count(*) FROM channels WHERE decision = 'deny' "
                             "AND opened_at >= ? AND opened_at < ? GROUP BY d"),
        ("refused_listeners", "SELECT substr(opened_at, 1, 10) d, count(*) FROM listeners WHERE decision = 'deny' "
                              "AND opened_at >= ? AND opened_at < ? GROUP BY d"),
        ("auth_failures", "SELECT substr(time, 1, 10) d, count(*) FROM auth WHERE result = 'failure' "
                          "AND time >= ? AND time < ? GROUP BY d"),
    ):
        for day, count in rows(sql):
            days[day][name] = count
    target = "target_host || ':' || target_port"
    return {
        "since": low,
        "until": iso(until) if until else None,
        "per_day": [{"day": day, **counts} for day, counts in sorted(days.items())],
        "top_users": [{"user": u, "sessions": s, "channels": c, "refused": r} for u, s, c, r in rows(
            "SELECT user, sum(session), sum(channel), sum(refused) FROM ("
            " SELECT user, 1 session, 0 channel, 0 refused FROM sessions WHERE started_at >= ? AND started_at < ?"
            " UNION ALL SELECT user, 0, 1, decision = 'deny' FROM channels WHERE opened_at >= ?3 AND opened_at < ?4"
            ") GROUP BY user ORDER BY 2 DESC, 3 DESC, user LIMIT ?5", low, high, top)],
        "top_targets": [{"target": t, "channels": n, "bytes": b} for t, n, b in rows(
            f"SELECT {target} t, count(*), sum(bytes_up + bytes_down) FROM channels WHERE opened_at >= ? "
            "AND opened_at < ? AND decision = 'allow' GROUP BY t ORDER BY 2 DESC, 3 DESC, t LIMIT ?", top)],
        "top_refused_targets": [{"target": t, "refusals": n} for t, n in rows(
            f"SELECT {target} t, count(*) FROM channels WHERE decision = 'deny' AND opened_at >= ? "
            "AND opened_at < ? GROUP BY t ORDER BY 2 DESC, t LIMIT ?", top)],
        "top_refused_sources": [{"client_ip": ip, "refusals": n, "auth_failures": a} for ip, n, a in rows(
            "SELECT client_ip, count(*), sum(is_auth) FROM ("
            " SELECT client_ip, 1 is_auth FROM auth WHERE result = 'failure' AND time >= ? AND time < ?"
            " UNION ALL SELECT s.client_ip, 0 FROM channels c JOIN sessions s ON s.id = c.session_id"
            "  WHERE c.decision = 'deny' AND c.opened_at >= ?1 AND c.opened_at < ?2"
            " UNION ALL SELECT s.client_ip, 0 FROM listeners l JOIN sessions s ON s.id = l.session_id"
            "  WHERE l.decision = 'deny' AND l.opened_at >= ?1 AND l.opened_at < ?2"
            ") GROUP BY client_ip ORDER BY 2 DESC, client_ip LIMIT ?3", top)],
    }


# ---- live tail ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One change as the chain recorded it: `row` is the row's state after the change."""

    seq: int
    time: str
    kind: str  # insert | update | alarm
    table: str
    row: dict[str, Any]
    hash: str

    def as_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "time": self.time, "kind": self.kind, "table": self.table, "row": self.row,
                "hash": self.hash}


def start_seq(conn: sqlite3.Connection, since: datetime | None) -> int:
    """Follow from here: the current head, or the last event written before `since`."""
    if since is None:
        row = conn.execute("SELECT max(seq) FROM audit_events").fetchone()
    else:  # from the newest backwards: a recent `since` stops after a few rows
        row = conn.execute("SELECT seq FROM audit_events WHERE time < ? ORDER BY seq DESC LIMIT 1",
                           [iso(since)]).fetchone()
    return (row[0] or 0) if row else 0


def follow(conn: sqlite3.Connection, tables: Iterable[str], filters: Filters, after: int,
           poll_seconds: float = 0.5, sleep: Callable[[float], None] = clock.sleep) -> Iterator[AuditEvent]:
    """New events after seq `after`, as they are committed, forever. Polls by seq (a cheap primary-key seek),
    sleeping `poll_seconds` when nothing is new. A row matches by the same SQL as the queries: what filters
    look at (user, target, client, session, start time, decision) does not change once written."""
    wanted = [t for t in tables if t in TABLES]
    filters = replace(filters, since=None, limit=None)  # `since` chose the start; `limit` is the caller's
    where = {table: where_clause(table, filters) for table in wanted}
    while True:
        events = conn.execute(
            "SELECT seq, time, kind, tbl, row_id, payload, hash FROM audit_events WHERE seq > ? ORDER BY seq "
            "LIMIT 1000", [after]).fetchall()
        if not events:
            sleep(poll_seconds)
            continue
        after = events[-1][0]
        ids: dict[str, list] = defaultdict(list)
        for _, _, kind, table, row_id, _, _ in events:
            if table in where and kind in ("insert", "update"):
                ids[table].append(row_id)
        matching: set[tuple[str, Any]] = set()
        for table, row_ids in ids.items():
            sql, params = where[table]
            for start in range(0, len(row_ids), 500):
                chunk = row_ids[start:start + 500]
                found = conn.execute(
                    f"SELECT id FROM {table} WHERE id IN ({', '.join('?' * len(chunk))})" + (f" AND {sql}" if sql else ""),
                    [*chunk, *params])
                matching.update((table, row[0]) for row in found)
        for seq, time, kind, table, row_id, payload, digest in events:
            if kind == "alarm" or (table, row_id) in matching and kind in ("insert", "update"):
                row = _typed(json.loads(payload))
                row.pop("target_ip_key", None)
                yield AuditEvent(seq, time, kind, table, row, digest)

