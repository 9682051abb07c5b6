"""How audit rows are shown: an aligned table in human units on a terminal; JSON, JSON lines or CSV with the
stored values for programs (streamed, so a million rows never sit in memory).

What a person reads (table cells, `audit follow` lines) passes through `cell`/`printable`: user names, client
versions and target hosts are the client's choice, and a newline or an escape sequence in one must not reach the
admin's terminal. Programs get the exact values; JSON and CSV quote them (JSON escapes every non-printable
character: `json_escaped`)."""

from __future__ import annotations

import csv
import json
import sys
from datetime import datetime
from typing import Any, Iterable

from rich.console import Console

from ..clock import human
from ..printable import json_escaped, printable
from .common import FittedTable, fit_table, human_bytes, screen_width, show_table

# what a person wants to see per table; programs get every stored column
SHOWN = {
    "auth": ["time", "user", "client", "method", "key_fingerprint", "result", "reason", "certificate"],
    "sessions": ["id", "user", "client", "started_at", "duration", "end_reason", "up", "down", "certificate"],
    "channels": ["id", "session_id", "user", "kind", "target", "decision", "reason", "opened_at", "duration",
                 "up", "down", "close_reason"],
    "listeners": ["id", "session_id", "user", "listen", "decision", "reason", "opened_at", "duration",
                  "close_reason"],
}
# free text: wraps at spaces, and a word too long for the column may lose its end ('…'), with the narrowest the
# column may become (`what` names addresses: wide enough for one); every other column (ids, fingerprints,
# addresses, times) is never broken
_TEXT = {"certificate": 12, "reason": 16, "what": 24, "outcome": 12, "end_reason": 12, "close_reason": 12, "client_version": 12}
# what goes first when the terminal is too narrow for all of SHOWN (`--json` and `--csv` keep everything)
_DROP = {
    "auth": ["certificate", "method", "key_fingerprint", "client"],
    "sessions": ["certificate", "down", "up", "duration", "client"],
    "channels": ["kind", "id", "down", "up", "duration", "close_reason", "session_id"],
    "listeners": ["id", "duration", "close_reason", "session_id"],
    "timeline": ["down", "up", "duration"],
}
_TIMES = {"time", "started_at", "opened_at"}
_END = {"sessions": ("started_at", "ended_at"), "channels": ("opened_at", "closed_at"),
        "listeners": ("opened_at", "closed_at")}


def screen() -> Console:
    """For lines and notes: the terminal's width, else (a pipe or a file) no limit: one line per line."""
    return Console(width=screen_width() or 100_000, highlight=False)


def show(fitted: FittedTable) -> None:
    """Print a table fitted to the terminal (common.fit_table), saying which columns it left out."""
    show_table(fitted)


def cell(value: Any) -> str:
    """A table cell: the value as text, non-printable characters escaped; None is empty."""
    return "" if value is None else printable(str(value))


def table(columns: list[str], rows: list[list[str]], drop: Iterable[str] = (), title: str | None = None,
          justify: dict[str, str] | None = None) -> FittedTable:
    """Rows of cells (text already) as a table that fits the terminal without breaking an id."""
    return fit_table(columns, rows, screen_width(), drop=list(drop), text=_TEXT, justify=justify, title=title)


def moment(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def human_duration(start: str | None, end: str | None) -> str:
    """'0.4s', '12s', '4m 03s', '2h 10m', '3d 4h'; 'open' while there is no end."""
    if not start:
        return ""
    if not end:
        return "open"
    seconds = max(0.0, (moment(end) - moment(start)).total_seconds())
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m {whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h {whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d {whole % 86400 // 3600}h"


def _address(host: Any, port: Any) -> str:
    host = str(host)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def for_people(table: str, row: dict[str, Any]) -> dict[str, Any]:
    """The row with the derived columns of SHOWN: client, target, duration, up/down in human units."""
    shown = dict(row)
    if "client_ip" in row:
        shown["client"] = _address(row["client_ip"], row["client_port"])
    if row.get("cert_serial") is not None:  # (#21) the certificate that logged in: key id and serial
        shown["certificate"] = f"{row.get('cert_key_id') or ''} #{row['cert_serial']}"
    if table == "channels":
        target = _address(row["target_host"], row["target_port"])
        if row.get("target_ip") and row["target_ip"] != row["target_host"]:
            target += f" ({row['target_ip']})"
        if row.get("peer_ip"):
            target = f"{_address(row['peer_ip'], row['peer_port'])} -> {target}"
        shown["target"] = target
    if table == "listeners":
        asked = "" if row["requested_port"] == row["listen_port"] else f" (asked {row['requested_port']})"
        shown["listen"] = _address(row["listen_host"], row["listen_port"]) + asked
    if table in _END:
        start, end = _END[table]
        refused = row.get("decision") == "deny"  # a refusal never opened: no duration
        shown["duration"] = "" if refused else human_duration(row[start], row[end])
    for column in _TIMES & set(row):
        shown[column] = human(row[column]) if row[column] else row[column]
    if "bytes_up" in row:
        shown["up"], shown["down"] = human_bytes(row["bytes_up"]), human_bytes(row["bytes_down"])
    return shown


def print_rows(table_name: str, rows: Iterable[dict[str, Any]], empty: str, note: str | None = None,
               first: tuple[str, ...] = ()) -> None:
    """`first`: columns shown before the table's own (the fleet's `node`, #22)."""
    columns = [*first, *SHOWN[table_name]]
    cells = []
    for row in rows:
        shown = for_people(table_name, row)
        cells.append([cell(shown.get(c)) for c in columns])
    if not cells:
        screen().print(f"({empty})", markup=False)
        return
    show(table(columns, cells, _DROP[table_name]))
    if note:
        screen().print(note, markup=False, style="dim")


def write_json(rows: Iterable[Any]) -> None:
    """A JSON array, written as it goes."""
    out = sys.stdout
    first = True
    for row in rows:
        out.write(("[\n  " if first else ",\n  ") + json_escaped(json.dumps(row, default=str, ensure_ascii=False)))
        first = False
    out.write("[]\n" if first else "\n]\n")


def write_jsonl(rows: Iterable[Any]) -> None:
    for row in rows:
        sys.stdout.write(json_escaped(json.dumps(row, default=str, ensure_ascii=False)) + "\n")
        sys.stdout.flush()


def write_csv(columns: list[str], rows: Iterable[dict[str, Any]]) -> None:
    writer = csv.DictWriter(sys.stdout, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})


def timeline_table(entries: list[dict[str, Any]]) -> FittedTable:
    cells = []
    for entry in entries:
        duration, up, down = "", "", ""
        outcome = entry.get("reason") or ""
        if entry["event"].startswith("channel") and not entry["event"].endswith("deny"):
            duration = human_duration(entry["time"], entry.get("closed_at"))
            up, down = human_bytes(entry["bytes_up"]), human_bytes(entry["bytes_down"])
            if entry.get("close_reason"):
                outcome += f"; closed: {entry['close_reason']}"
        elif entry["event"].startswith("listener") and entry["event"].endswith("allow"):
            duration = human_duration(entry["time"], entry.get("closed_at"))
            if entry.get("close_reason"):
                outcome += f"; closed: {entry['close_reason']}"
        elif entry["event"] == "session end":
            duration = human_duration(entry["started_at"], entry["time"])
            up, down = human_bytes(entry["bytes_up"]), human_bytes(entry["bytes_down"])
        cells.append([cell(value) for value in (human(entry["time"]), entry["event"], entry["what"], outcome,
                                                duration, up, down)])
    return table(["time", "event", "what", "outcome", "duration", "up", "down"], cells, _DROP["timeline"])


def follow_line(event: dict[str, Any]) -> str:
    """One line per event for `audit follow` on a terminal: time, what happened, to whom and where (one line
    whatever the client put in its user name or target: see `cell`)."""
    return printable(_follow_text(event))


def _follow_text(event: dict[str, Any]) -> str:
    row, table, kind = event["row"], event["table"], event["kind"]
    if kind == "alarm":
        return f"{human(event['time'])}  {'ALARM':<15}  the audit chain was cut while the server ran: {json.dumps(row)}"
    if table == "auth":
        label = f"login {row['result']}"
        what = f"{row['user']} from {_address(row['client_ip'], row['client_port'])}: {row['reason']}"
    elif table == "sessions":
        label = "session start" if kind == "insert" else "session end"
        what = f"{row['id']} {row['user']} from {_address(row['client_ip'], row['client_port'])}"
        if kind != "insert":
            what += f": {row['end_reason']}, {human_duration(row['started_at'], row['ended_at'])}, " \
                    f"up {human_bytes(row['bytes_up'])}, down {human_bytes(row['bytes_down'])}"
    else:
        shown = for_people(table, row)
        label = f"{table[:-1]} {row['decision'] if kind == 'insert' else 'close'}"
        what = f"{row['id']} {row['user']} {shown['target'] if table == 'channels' else shown['listen']}: "
        if kind == "insert":
            what += row["reason"]
        elif table == "channels":
            what += f"{shown['duration']}, up {shown['up']}, down {shown['down']}"
            what += f", {row['close_reason']}" if row.get("close_reason") else ""
        else:
            what += f"{shown['duration']}, {row['close_reason']}"
    return f"{human(event['time'])}  {label:<15}  {what}"
