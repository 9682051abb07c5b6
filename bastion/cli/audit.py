"""`bastion audit …`: read the audit log (logins, sessions, channels) as a table or JSON."""

from __future__ import annotations

from typing import Optional

import typer

from ..audit_query import TABLES, parse_moment, query
from .common import config_of, human_bytes, print_json, print_table

app = typer.Typer(help="Query the audit log: auth, sessions, channels.", no_args_is_help=True)

_SHOWN = {
    "auth": ["time", "user", "client_ip", "method", "key_fingerprint", "result", "reason"],
    "sessions": ["id", "user", "client_ip", "started_at", "ended_at", "end_reason", "bytes_up", "bytes_down"],
    "channels": ["id", "session_id", "user", "target_host", "target_ip", "target_port", "decision", "reason",
                 "opened_at", "closed_at", "bytes_up", "bytes_down"],
}


def _run(ctx: typer.Context, table: str, user, since, until, denied, limit, json) -> None:
    config = config_of(ctx)
    rows = query(
        config.database,
        table,
        user=user,
        since=parse_moment(since) if since else None,
        until=parse_moment(until) if until else None,
        denied=denied,
        limit=limit,
    )
    if json:
        print_json(rows)
        return
    for row in rows:
        for column in ("bytes_up", "bytes_down"):
            if column in row:
                row[column] = human_bytes(row[column])
    print_table(rows, _SHOWN[table], empty=f"no {table} rows match")


def _command(table: str, example: str):
    def command(
        ctx: typer.Context,
        user: Optional[str] = typer.Option(None, "--user", help="Only this user."),
        since: Optional[str] = typer.Option(None, "--since", help="From this time: 15m, 2h, 7d or ISO 8601."),
        until: Optional[str] = typer.Option(None, "--until", help="Before this time: 15m, 2h, 7d or ISO 8601."),
        denied: bool = typer.Option(False, "--denied", help="Only refusals (channels) or failures (auth)."),
        limit: Optional[int] = typer.Option(None, "--limit", min=1, help="At most this many (the newest)."),
        json: bool = typer.Option(False, "--json", help="Print a JSON array."),
    ) -> None:
        _run(ctx, table, user, since, until, denied, limit, json)

    command.__doc__ = f"List {table} rows from the audit log, oldest first.\n\nExample: {example}"
    return command


app.command("auth")(_command("auth", "bastion audit auth --since 1h --denied"))
app.command("sessions")(_command("sessions", "bastion audit sessions --user alice --since 2h"))
app.command("channels")(_command("channels", "bastion audit channels --since 2h --json"))
assert set(_SHOWN) == set(TABLES)
