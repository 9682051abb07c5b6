"""Reading the audit log: filtered queries on a read-only connection (never blocks the server's writer)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from .db import iso, open_database, utc_now
from .errors import BastionError

TABLES = {
    "auth": ("time", ["time", "user", "client_ip", "client_port", "method", "key_fingerprint", "result", "reason"]),
    "sessions": (
        "started_at",
        ["id", "user", "client_ip", "client_port", "key_fingerprint", "client_version", "started_at", "ended_at",
         "end_reason", "bytes_up", "bytes_down"],
    ),
    "channels": (
        "opened_at",
        ["id", "session_id", "user", "kind", "target_host", "target_ip", "target_port", "decision", "rule", "reason",
         "opened_at", "closed_at", "bytes_up", "bytes_down"],
    ),
}

_RELATIVE = re.compile(r"(\d+)\s*([smhdw])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_moment(text: str, now: datetime | None = None) -> datetime:
    """'15m', '2h', '7d' (that long ago) or ISO 8601 ('2026-11-21', '2026-11-21T10:00:00Z'); naive means UTC."""
    text = text.strip()
    match = _RELATIVE.fullmatch(text)
    if match:
        amount, unit = int(match.group(1)), match.group(2)
        return (now or utc_now()) - timedelta(**{_UNITS[unit]: amount})
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BastionError(f"cannot read time {text!r}: use e.g. 15m, 2h, 7d or 2026-11-21T10:00:00Z") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def query(
    database: Path,
    table: str,
    *,
    user: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    denied: bool = False,
    limit: int | None = None,
) -> list[dict]:
    """Rows of one audit table, oldest first, filtered; `denied` means refusals (channels) or failures (auth)."""
    time_column, columns = TABLES[table]
    where, params = [], []
    if user is not None:
        where.append("user = ?")
        params.append(user)
    if since is not None:
        where.append(f"{time_column} >= ?")
        params.append(iso(since))
    if until is not None:
        where.append(f"{time_column} < ?")
        params.append(iso(until))
    if denied:
        if table == "channels":
            where.append("decision = 'deny'")
        elif table == "auth":
            where.append("result = 'failure'")
        else:
            raise BastionError("--denied applies to channels and auth")
    sql = f"SELECT {', '.join(columns)} FROM {table}"
    if where:
        sql += " WHERE " + " AND ".join(where)
    order = f" ORDER BY {time_column} DESC, rowid DESC"
    if limit is not None:
        sql += order + " LIMIT ?"
        params.append(limit)
    else:
        sql += order
    db = open_database(database, readonly=True)
    try:
        rows = list(db.query(sql, params))
    finally:
        db.conn.close()
    rows.reverse()
    return rows
