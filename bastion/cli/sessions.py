"""`bastion sessions …`: live sessions of the running server, through its control socket."""

from __future__ import annotations

import getpass
from typing import Optional

import typer

from ..errors import BastionError
from ..service.control import request
from ..audit import fleet
from .common import config_of, err_console, human_bytes, print_json, print_table

app = typer.Typer(help="List and end live sessions of the running server.", no_args_is_help=True)


STORE = typer.Option(None, "--store", help="Every node's live sessions, as their audit shippers last published "
                                           "them (every 2 s) in the fleet's PostgreSQL (postgresql://…).")


@app.command("list")
def list_sessions(ctx: typer.Context, json: bool = typer.Option(False, "--json", help="Print a JSON array."),
                  store: Optional[str] = STORE) -> None:
    """Live sessions: id, user, source, start, open channels and listeners, bytes so far.

    Example: bastion sessions list --json    |    bastion sessions list --store postgresql://bastion@db/bastion
    """
    stale: list[str] = []
    if store:  # (#22) the fleet: a node column
        conn = fleet.open_store(store)
        try:
            sessions, stale = fleet.live_sessions(conn)
        finally:
            conn.close()
    else:
        sessions = request(config_of(ctx).home, {"op": "sessions"})["sessions"]
    for node in stale:
        err_console.print(f"node {node}: not heard of for over {fleet.STALE_SECONDS:g}s; its sessions are not "
                          "listed", markup=False, highlight=False)
    if json:
        print_json(sessions)
        return
    rows = [{**({"node": row["node"]} if store else {}),
             "id": row["id"], "user": row["user"], "source": _address(row["client_ip"], row["client_port"]),
             "started": row["started_at"],  # shown as 2026-12-01T23:23:23Z (print_table)
             "channels": row["channels"], "listeners": row["listeners"],
             "up": human_bytes(row["bytes_up"]), "down": human_bytes(row["bytes_down"])} for row in sessions]
    print_table(rows, [*(["node"] if store else []), "id", "user", "source", "started", "channels", "listeners", "up",
                       "down"],
                empty="no live sessions", drop=["down", "up", "listeners", "channels", "started"])


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@app.command("kill")
def kill(
    ctx: typer.Context,
    session_id: Optional[str] = typer.Argument(None, help="The session id, as `sessions list` shows it."),
    user: Optional[str] = typer.Option(None, "--user", help="End every live session of this user."),
    store: Optional[str] = typer.Option(None, "--store", help="On whichever node holds it: the request goes "
                                                              "through the fleet's PostgreSQL, which notifies "
                                                              "that node's shipper at once."),
) -> None:
    """End live sessions at once; the audit log records who ended them.

    Example: bastion sessions kill 3f2a9c1d0b7e    |    bastion sessions kill --user alice
    """
    if (session_id is None) == (user is None):
        raise BastionError("give either a session id or --user NAME")
    if store:  # (#22)
        conn = fleet.open_store(store)
        try:
            answers = fleet.request_kill(conn, session_id, user, getpass.getuser())
        finally:
            conn.close()
        for answer in answers:
            for killed_id in answer.get("killed", []):
                typer.echo(f"ended session {killed_id} on node {answer['node']}")
            if not answer["ok"]:
                err_console.print(f"node {answer['node']}: {answer['error']}", markup=False, highlight=False)
        if not all(answer["ok"] for answer in answers):
            raise typer.Exit(1)
        return
    message = {"op": "kill", "by": getpass.getuser(), "session": session_id, "user": user}
    killed = request(config_of(ctx).home, message)["killed"]
    for killed_id in killed:
        typer.echo(f"ended session {killed_id}")
