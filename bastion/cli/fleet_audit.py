"""`bastion audit ship status` and the `--store postgresql://…` side of `bastion audit` (#22 part 3): the fleet's
audit trail that each node's shipper (audit/shipper.py) fills."""

from __future__ import annotations

from typing import Any, Optional

import typer

from ..audit import fleet
from ..audit.filters import Filters
from ..audit.shipper import fleet_status
from ..config import Config
from ..errors import BastionError
from ..printable import printable
from . import audit_output as output
from .common import config_of, err_console, print_json

app = typer.Typer(help="The fleet's audit trail in PostgreSQL (audit_ship_to): how far each node has shipped.",
                  no_args_is_help=True)

STORE_HELP = ("Query the fleet's audit trail in PostgreSQL (postgresql://USER@HOST/DB, as in audit_ship_to) "
              "instead of this node's; rows get a node column.")
STORE = typer.Option(None, "--store", help=STORE_HELP)
NODE = typer.Option(None, "--node", help="With --store: only this node's rows.")


@app.command()
def status(
    ctx: typer.Context,
    store: Optional[str] = typer.Option(None, "--store", help="The PostgreSQL to ask (default: audit_ship_to)."),
    json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Per node: last local seq, last shipped seq, backlog (events not yet in PostgreSQL), lag (how long the
    oldest of them has waited) and the shipper's last error. This node is measured now; the others as their
    shippers last reported. Exit 1 when PostgreSQL cannot be asked or a node reports an error.

    Example: bastion audit ship status
    """
    config = config_of(ctx)
    url = store or config.audit_ship_to
    if not url:
        _fail("audit shipping is off: set audit_ship_to = \"postgresql://…\" in config.toml, or pass --store", 2)
    try:
        rows, problem = fleet_status(config.database, url, config.node)
    except BastionError as exc:
        _fail(f"error: {exc}", 2)
    if json:
        print_json({"store": fleet.redact(url), "node": config.node, "error": problem,
                    "nodes": [r.as_dict() for r in rows]})
    else:
        columns = ["node", "local_seq", "shipped_seq", "backlog", "lag", "last_error", "source"]
        cells = [[output.cell(r.node), output.cell(r.local_seq), output.cell(r.shipped_seq), output.cell(r.backlog),
                  "" if r.lag_seconds is None else f"{r.lag_seconds:.1f}s", output.cell(r.last_error or ""),
                  r.source] for r in rows]
        output.screen().print(f"shipping to {fleet.redact(url)} (this node: {config.node})", markup=False)
        if cells:
            output.show(output.table(columns, cells, drop=["source", "last_error"]))
        else:
            output.screen().print("(no node has shipped yet)", markup=False)
        if problem:
            err_console.print(printable(f"error: {problem}"), markup=False, highlight=False, soft_wrap=True)
    if problem or any(r.last_error for r in rows):
        raise typer.Exit(1)


def _fail(text: str, code: int) -> None:
    err_console.print(printable(text), markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def open_store(url: str) -> Any:
    return fleet.open_store(url)


def select(conn: Any, table: str, filters: Filters, columns: list[str], node: Optional[str]) -> Any:
    return fleet.select(conn, table, filters, columns, node)


def verify(url: str, node: Optional[str], json: bool, progress: Any) -> bool:
    """`audit verify --store`: every node's chain (or one's), printed; True when intact."""
    conn = fleet.open_store(url)
    try:
        result = fleet.verify(conn, node, progress)
    finally:
        conn.close()
    if json:
        print_json({"store": fleet.redact(url), **result.as_dict()})
        return result.intact
    if not result.nodes:
        typer.echo(f"no events{f' of node {node}' if node else ''} in {fleet.redact(url)}")
    for name, report in result.nodes.items():
        if report.intact:
            span = f"seq {report.first_seq}..{report.head.seq}" if report.events else "no events yet"
            typer.echo(printable(f"{name}: intact: {report.events} events ({span}), {report.rows} rows; "
                                 f"head {report.head.seq}:{report.head.hash}"))
        else:
            typer.echo(printable(f"{name}: BROKEN: {report.problem_count} problem(s); first: {report.problems[0]}"))
            for problem in report.problems[1:]:
                typer.echo(f"  {printable(problem)}")
            if report.problem_count > len(report.problems):
                typer.echo(f"  ... and {report.problem_count - len(report.problems)} more")
    return result.intact


def shipped_through(config: Config) -> int:
    """For `audit prune` with audit_ship_to: the newest seq of this node PostgreSQL holds. Refuses (an error
    naming --force) when PostgreSQL cannot be asked: pruning might then remove events it never got."""
    try:
        conn = fleet.open_store(config.audit_ship_to)
    except fleet.FleetError as exc:
        raise BastionError(f"{exc}; audit_ship_to is set, and without PostgreSQL nobody can tell which events "
                           "were shipped, so nothing was pruned (--force prunes anyway, losing what was not "
                           "shipped from the fleet's trail)") from None
    try:
        return fleet.shipped_head(conn, config.node).seq
    finally:
        conn.close()


def follow(url: str, tables: list[str], filters: Filters, interval: float, node: Optional[str], jsonl: bool,
           limit: Optional[int]) -> None:
    """`audit follow --store`: each line starts with the node (JSON lines carry it as "node")."""
    conn = fleet.open_store(url)
    try:
        events = fleet.follow(conn, tables, filters, filters.since, interval, node)
        for count, event in enumerate(events, start=1):
            if jsonl:
                output.write_jsonl([event])
            else:
                print(f"{printable(event['node'])}  {output.follow_line(event)}", flush=True)
            if limit is not None and count >= limit:
                break
    except (KeyboardInterrupt, BrokenPipeError):  # Ctrl-C, or the reader went away: a normal end for a tail
        pass
    finally:
        conn.close()


def session_record(conn: Any, session_id: str, columns: dict[str, list[str]], node: Optional[str]) -> Any:
    return fleet.session_record(conn, session_id, columns, node)


def sqlite_speaking(conn: Any) -> Any:
    return fleet.SqliteSpeaking(conn)
