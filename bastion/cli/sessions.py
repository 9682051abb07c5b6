"""`bastion sessions …`: live sessions of the running server, through its control socket."""

from __future__ import annotations

import getpass
from typing import Optional

import typer

from ..errors import BastionError
from ..service.control import request
from .common import config_of, human_bytes, print_json, print_table

app = typer.Typer(help="List and end live sessions of the running server.", no_args_is_help=True)


@app.command("list")
def list_sessions(ctx: typer.Context, json: bool = typer.Option(False, "--json", help="Print a JSON array.")) -> None:
    """Live sessions: id, user, source, start, open channels and listeners, bytes so far.

    Example: bastion sessions list --json
    """
    sessions = request(config_of(ctx).home, {"op": "sessions"})["sessions"]
    if json:
        print_json(sessions)
        return
    rows = [{"id": row["id"], "user": row["user"], "source": _address(row["client_ip"], row["client_port"]),
             "started": row["started_at"],  # shown as 2026-12-01T23:23:23Z (print_table)
             "channels": row["channels"], "listeners": row["listeners"],
             "up": human_bytes(row["bytes_up"]), "down": human_bytes(row["bytes_down"])} for row in sessions]
    print_table(rows, ["id", "user", "source", "started", "channels", "listeners", "up", "down"],
                empty="no live sessions", drop=["down", "up", "listeners", "channels", "started"])


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@app.command("kill")
def kill(
    ctx: typer.Context,
    session_id: Optional[str] = typer.Argument(None, help="The session id, as `sessions list` shows it."),
    user: Optional[str] = typer.Option(None, "--user", help="End every live session of this user."),
) -> None:
    """End live sessions at once; the audit log records who ended them.

    Example: bastion sessions kill 3f2a9c1d0b7e    |    bastion sessions kill --user alice
    """
    if (session_id is None) == (user is None):
        raise BastionError("give either a session id or --user NAME")
    message = {"op": "kill", "by": getpass.getuser(), "session": session_id, "user": user}
    killed = request(config_of(ctx).home, message)["killed"]
    for killed_id in killed:
        typer.echo(f"ended session {killed_id}")
