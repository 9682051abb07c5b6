"""`bastion audit …`: query the audit log, follow it live, summarize it, verify, prune and export it."""

from __future__ import annotations

import functools
import os
import sqlite3
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from ..audit.filters import TABLES, FilterError, Filters, parse_age, where_clause
from ..audit.query import (COLUMNS, DamagedDatabase, follow as follow_events, make_filters, open_reader, select,
                           session_record, start_seq, stats as audit_stats, timeline)
from ..audit.retention import (export as export_chain, prune as prune_chain, vacuum as vacuum_database,
                               verify as verify_chain, verify_export)
from ..clock import human, utc_now
from ..errors import BastionError
from ..errors import DamagedDatabase as Damaged
from ..printable import printable
from ..safe_files import is_stdout
from . import audit_output as output
from . import fleet_audit
from .common import config_of, err_console, human_bytes, print_json, progress_bar

app = typer.Typer(help="Query the audit log: auth, sessions, channels, listeners; show, follow, stats; verify, "
                       "prune, vacuum, export.\n\nExample: bastion audit channels --denied --since 1d",
                  no_args_is_help=True)

_MOST = 2**63 - 1  # the largest count SQLite takes as a LIMIT
_TABLE_LIMIT = 1000  # on a terminal without --limit: the newest this many, and a note that there are more


def _reported(command: Callable) -> Callable:
    """Library errors become a message and exit code 2 here, at the edge, also when typer is invoked directly."""

    @functools.wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except FilterError as exc:
            raise typer.BadParameter(str(exc)) from None
        except Damaged as exc:  # a problem found in the home, not in what was typed
            err_console.print(printable(f"error: {exc}"), markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except sqlite3.DatabaseError as exc:  # damage SQLite meets only on the pages a query reads
            database = config_of(kwargs["ctx"]).database  # every audit command takes ctx
            err_console.print(printable(f"error: {DamagedDatabase(database, exc)}"), markup=False,
                              highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except BastionError as exc:
            err_console.print(printable(f"error: {exc}"), markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except BrokenPipeError:  # `| head` has read enough: stop quietly, as other Unix tools do
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit flush must not fail again
            raise typer.Exit(0) from None

    return run


def _format(json: bool, jsonl: bool, csv: bool) -> str:
    chosen = [name for name, on in (("json", json), ("jsonl", jsonl), ("csv", csv)) if on]
    if len(chosen) > 1:
        raise typer.BadParameter(f"choose one output format, not {' and '.join('--' + c for c in chosen)}")
    return chosen[0] if chosen else "table"


# the filters every query shares, as typer options
USER = typer.Option(None, "--user", help="Only this user.")
SINCE = typer.Option(None, "--since", help="From this time: 15m, 2h, 7d or ISO 8601 (UTC unless a zone is given).")
UNTIL = typer.Option(None, "--until", help="Before this time: 15m, 2h, 7d or ISO 8601.")
TARGET = typer.Option(None, "--target", help="HOST|CIDR[:PORT]: 10.1.2.3, 10.0.0.0/16:22, db.corp.internal, "
                                             "*.corp.internal, [fd00::/64]:22. Sessions: those that opened one.")
DENIED = typer.Option(False, "--denied", help="Only refusals: failed logins, refused channels or listeners, "
                                              "sessions with a refusal.")
SESSION = typer.Option(None, "--session", help="Only this session id.")
CLIENT = typer.Option(None, "--client", help="Only clients from this address or CIDR.")
CERT_SERIAL = typer.Option(None, "--cert-serial", min=0, max=2**64 - 1,
                           help="Only logins with the certificate of this serial (channels, listeners: of sessions "
                                "that logged in with it).")
KEY_ID = typer.Option(None, "--key-id", help="Only logins with a certificate of this key id (as `ssh-keygen -I` "
                                             "set it); channels, listeners: of such sessions.")
JSON = typer.Option(False, "--json", help="Print a JSON array of the stored values.")
JSONL = typer.Option(False, "--jsonl", help="Print one JSON object per line (for SIEM shippers).")
CSV = typer.Option(False, "--csv", help="Print CSV with a header line.")


def _list_command(table: str, example: str) -> Callable:
    def command(
        ctx: typer.Context,
        user: Optional[str] = USER,
        since: Optional[str] = SINCE,
        until: Optional[str] = UNTIL,
        target: Optional[str] = TARGET,
        denied: bool = DENIED,
        session: Optional[str] = SESSION,
        client: Optional[str] = CLIENT,
        cert_serial: Optional[int] = CERT_SERIAL,
        key_id: Optional[str] = KEY_ID,
        limit: Optional[int] = typer.Option(None, "--limit", min=1, max=_MOST,
                                            help="At most this many (the newest)."),
        json: bool = JSON,
        jsonl: bool = JSONL,
        csv: bool = CSV,
        store: Optional[str] = fleet_audit.STORE,
        node: Optional[str] = fleet_audit.NODE,
    ) -> None:
        shape = _format(json, jsonl, csv)
        if node is not None and store is None:
            raise typer.BadParameter("--node needs --store: this node's own log holds only its own rows")
        shown_limit = limit if limit is not None or shape != "table" else _TABLE_LIMIT + 1
        filters = make_filters(user=user, since=since, until=until, target=target, denied=denied, session=session,
                               client=client, limit=shown_limit, cert_serial=cert_serial, key_id=key_id)
        # --store (#22): the same filters on the fleet's PostgreSQL, rows with their node
        conn = fleet_audit.open_store(store) if store else open_reader(config_of(ctx).database)
        try:
            rows = (fleet_audit.select(conn, table, filters, COLUMNS[table], node) if store
                    else select(conn, table, filters))
            if shape == "json":
                output.write_json(rows)
            elif shape == "jsonl":
                output.write_jsonl(rows)
            elif shape == "csv":
                output.write_csv((["node"] if store else []) + COLUMNS[table], rows)
            else:
                listed = list(rows)
                note = None
                if limit is None and len(listed) > _TABLE_LIMIT:
                    listed = listed[1:]
                    note = f"(the newest {_TABLE_LIMIT}; use --limit N, or --jsonl for all)"
                output.print_rows(table, listed, empty=f"no {table} match", note=note, first=("node",) if store else ())
        finally:
            conn.close()

    noun = "logins (auth)" if table == "auth" else table
    command.__doc__ = f"List {noun} from the audit log, oldest first, filtered.\n\nExample: {example}"
    return _reported(command)


app.command("auth")(_list_command("auth", "bastion audit auth --denied --since 1h --client 203.0.113.0/24"))
app.command("sessions")(_list_command("sessions", "bastion audit sessions --user alice --since 2h    |    "
                                                 "bastion audit sessions --cert-serial 7"))
app.command("channels")(_list_command("channels", "bastion audit channels --target 10.0.0.0/16:22 --since 7d --json"))
app.command("listeners")(_list_command("listeners", "bastion audit listeners --user alice --since 1d"))
assert set(output.SHOWN) == set(COLUMNS) == set(TABLES)
app.add_typer(fleet_audit.app, name="ship")  # (#22)


@app.command()
@_reported
def show(
    ctx: typer.Context,
    session_id: str = typer.Argument(..., help="The session id, as listed by `bastion audit sessions`."),
    json: bool = typer.Option(False, "--json", help="Print the session, its logins, channels and listeners as JSON."),
    store: Optional[str] = fleet_audit.STORE,
    node: Optional[str] = fleet_audit.NODE,
) -> None:
    """One session as a timeline: login, each listener and channel with decision, reason, bytes and duration, end.

    Example: bastion audit show 3f2a9c1b7d04
    """
    if node is not None and store is None:
        raise typer.BadParameter("--node needs --store")
    conn = fleet_audit.open_store(store) if store else open_reader(config_of(ctx).database)
    try:  # --store (#22): the session from the fleet's trail, with its node
        record = (fleet_audit.session_record(conn, session_id, COLUMNS, node) if store
                  else session_record(conn, session_id))
    finally:
        conn.close()
    entries = timeline(record)
    if json:
        print_json({**record, "timeline": entries})
        return
    output.show(output.timeline_table(entries))


@app.command()
@_reported
def follow(
    ctx: typer.Context,
    table: Optional[list[str]] = typer.Option(None, "--table", help="auth, sessions, channels or listeners; "
                                                                    "repeat for several (default: all)."),
    user: Optional[str] = USER,
    since: Optional[str] = typer.Option(None, "--since", help="Start with events written since then (15m, 2h, ISO "
                                                              "8601); default: only new ones."),
    target: Optional[str] = TARGET,
    denied: bool = DENIED,
    session: Optional[str] = SESSION,
    client: Optional[str] = CLIENT,
    cert_serial: Optional[int] = CERT_SERIAL,
    key_id: Optional[str] = KEY_ID,
    limit: Optional[int] = typer.Option(None, "--limit", min=1, max=_MOST, help="Stop after this many events."),
    jsonl: bool = JSONL,
    interval: float = typer.Option(0.5, "--interval", min=0.05, help="Seconds between looks for new events."),
    store: Optional[str] = typer.Option(None, "--store", help="Follow the fleet's audit trail in PostgreSQL "
                                                              "(postgresql://…): every node's events as shipped."),
    node: Optional[str] = fleet_audit.NODE,
) -> None:
    """Print audit events as they are written, like `tail -f`, with the query filters. Ctrl-C stops it.

    Example: bastion audit follow --denied --jsonl
    """
    filters = make_filters(user=user, since=since, target=target, denied=denied, session=session, client=client,
                           cert_serial=cert_serial, key_id=key_id)
    tables = _follow_tables(table, filters)
    if store is not None:  # (#22)
        fleet_audit.follow(store, tables, filters, interval, node, jsonl, limit)
        return
    if node is not None:
        raise typer.BadParameter("--node needs --store")
    conn = open_reader(config_of(ctx).database)
    try:
        events = follow_events(conn, tables, filters, start_seq(conn, filters.since), interval)
        for count, event in enumerate(events, start=1):
            if jsonl:
                output.write_jsonl([event.as_dict()])
            else:
                print(output.follow_line(event.as_dict()), flush=True)
            if limit is not None and count >= limit:
                break
    except (KeyboardInterrupt, BrokenPipeError):  # Ctrl-C, or the reader went away: a normal end for a tail
        pass
    finally:
        conn.close()


def _follow_tables(asked: Optional[list[str]], filters: Filters) -> list[str]:
    """The tables to follow: those asked for (each must accept the filters), or every table the filters fit."""
    for name in asked or []:
        if name not in TABLES:
            raise FilterError(f"unknown table {name!r}: one of {', '.join(TABLES)}")
    tables = []
    # following refusals means the refusals themselves, not every event of a session that had one
    default = [t for t in TABLES if t != "sessions"] if filters.denied else TABLES
    for name in asked or default:
        try:
            where_clause(name, filters)
        except FilterError:
            if asked:
                raise
            continue  # e.g. --target: logins have no target, so follow the other tables
        tables.append(name)
    return tables


@app.command()
@_reported
def stats(
    ctx: typer.Context,
    since: str = typer.Option("7d", "--since", help="From this time: 15m, 2h, 7d or ISO 8601."),
    until: Optional[str] = UNTIL,
    top: int = typer.Option(10, "--top", min=1, max=_MOST, help="How many users, targets and sources to list."),
    json: bool = typer.Option(False, "--json", help="Print JSON."),
    store: Optional[str] = typer.Option(None, "--store", help="Summarize the fleet's audit trail in PostgreSQL "
                                                              "(postgresql://…): every node together."),
) -> None:
    """Sessions and refusals per day, top users, top targets, top refused targets and sources.

    Example: bastion audit stats --since 30d --top 5
    """
    filters = make_filters(since=since, until=until)
    assert filters.since is not None
    conn = fleet_audit.open_store(store) if store else open_reader(config_of(ctx).database)
    try:  # --store (#22): the same queries, spoken to PostgreSQL
        summary = audit_stats(fleet_audit.sqlite_speaking(conn) if store else conn, filters.since, filters.until,
                              top)
    finally:
        conn.close()
    if json:
        print_json(summary)
        return
    until = human(summary["until"]) if summary["until"] else "now"
    output.screen().print(f"audit summary from {human(summary['since'])} to {until}", markup=False)
    for title, key in (("per day", "per_day"), ("top users", "top_users"), ("top targets", "top_targets"),
                       ("top refused targets", "top_refused_targets"),
                       ("top sources of refusals", "top_refused_sources")):
        _print_section(title, summary[key])


def _print_section(title: str, rows: list[dict[str, Any]]) -> None:
    if not rows:
        output.screen().print(f"{title}: (none)", markup=False)
        return
    columns = list(rows[0])
    cells = [[human_bytes(v) if k == "bytes" else output.cell(v) for k, v in row.items()] for row in rows]
    right = {c: "right" for c in columns if c not in ("day", "user", "target", "client_ip")}
    output.show(output.table(columns, cells, drop=reversed(columns[1:]), title=title, justify=right))


@app.command()
@_reported
def verify(
    ctx: typer.Context,
    head: Optional[str] = typer.Option(None, "--head", help="SEQ:HASH printed by an earlier verify or export and "
                                                            "kept elsewhere: the chain must still contain it."),
    file: Optional[Path] = typer.Option(None, "--file", help="Verify an export file instead of the database."),
    json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    store: Optional[str] = typer.Option(None, "--store", help="Verify every node's chain in the fleet's "
                                                              "PostgreSQL (postgresql://…) instead."),
    node: Optional[str] = fleet_audit.NODE,
) -> None:
    """Check the hash chain and every audit row against it; exit 1 when anything was tampered with.

    Names the first edited, inserted or deleted row or event first. Exit 0 when intact.

    Example: bastion audit verify --head 18234:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08
    """
    if store is not None:  # (#22) each node's chain as shipped, and the fleet's rows against it
        if file is not None or head is not None:
            raise typer.BadParameter("--store checks the fleet's chains; --file and --head check this node's")
        with progress_bar() as progress:
            if not fleet_audit.verify(store, node, json, progress):
                raise typer.Exit(1)
        return
    if node is not None:
        raise typer.BadParameter("--node needs --store")
    if file is not None:
        report = verify_export(file)
    else:
        with progress_bar() as progress:  # a bar on a terminal (stderr); nothing when piped
            report = verify_chain(config_of(ctx).database, head, progress)
    if json:
        print_json(report.as_dict())
    elif report.intact:
        span = f"seq {report.first_seq}..{report.head.seq}" if report.events else "no events yet"
        what = f"{report.events} events ({span})" + ("" if file else f", {report.rows} rows")
        typer.echo(f"intact: {what}; head {report.head.seq}:{report.head.hash}")
    else:
        # an export file comes from elsewhere: what a problem quotes from it is shown escaped
        typer.echo(printable(f"BROKEN: {report.problem_count} problem(s); first: {report.problems[0]}"))
        for problem in report.problems[1:]:
            typer.echo(f"  {printable(problem)}")
        if report.problem_count > len(report.problems):
            typer.echo(f"  ... and {report.problem_count - len(report.problems)} more")
    if not report.intact:
        raise typer.Exit(1)


@app.command()
@_reported
def prune(
    ctx: typer.Context,
    older_than: str = typer.Option(..., "--older-than", help="Age: 90d, 12w, 36h."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Say what would be deleted (rows per table, events, the "
                                                          "cutoff) and change nothing."),
    vacuum: bool = typer.Option(False, "--vacuum", help="Then give the freed space back to the file system, as "
                                                        "`bastion audit vacuum` does."),
    force: bool = typer.Option(False, "--force", help="With audit_ship_to: prune even when the fleet's "
                                                      "PostgreSQL cannot be asked, and events not yet shipped."),
) -> None:
    """Delete finished rows last changed before the given age, keeping the chain verifiable.

    An anchor event records the hash of what was pruned. Refuses when the log does not verify. The file keeps
    its size (SQLite reuses the freed pages); --vacuum, or `bastion audit vacuum` later, shrinks it.

    Example: bastion audit prune --older-than 90d --dry-run    |    bastion audit prune --older-than 90d --vacuum
    """
    if dry_run and vacuum:
        raise typer.BadParameter("--dry-run changes nothing, so it cannot --vacuum; choose one")
    age = parse_age(older_than)
    config = config_of(ctx)
    database = config.database
    # (#22) with audit_ship_to, events PostgreSQL does not have yet stay, however old
    through = fleet_audit.shipped_through(config) if config.audit_ship_to and not force else None
    with progress_bar() as progress:
        result = prune_chain(database, age, utc_now(), dry_run=dry_run, progress=progress, through=through)
    deleted = ", ".join(f"{count} {table}" for table, count in result.deleted.items())
    if result.held_back:
        typer.echo(f"keeping the events after seq {through}: not yet shipped to the fleet's PostgreSQL")
    if dry_run:
        typer.echo(f"would prune before {human(result.cutoff)}: {deleted}; {result.events} events, "
                   f"{result.restated} open rows carried over (dry run: nothing changed)")
        return
    typer.echo(f"pruned before {human(result.cutoff)}: {deleted}; {result.events} events, {result.restated} open "
               "rows carried over")
    if vacuum:
        _vacuum(database)


@app.command()
@_reported
def vacuum(ctx: typer.Context) -> None:
    """Give the space freed by `audit prune` back to the file system (SQLite's VACUUM), and say how much.

    Safe while the server runs: it takes the database's write lock while it works, and the server's audit writes
    wait for it. They wait at most 10 seconds (the busy timeout); a vacuum that takes longer makes logins fail
    closed until it ends, so on a large log run it at a quiet hour. It needs free disk space about the size of
    the database.

    Example: bastion audit vacuum
    """
    _vacuum(config_of(ctx).database)


def _vacuum(database: Path) -> None:
    result = vacuum_database(database)
    typer.echo(f"vacuumed {database}: {human_bytes(result.before)} -> {human_bytes(result.after)} "
               f"({human_bytes(max(0, result.before - result.after))} given back)")


@app.command()
@_reported
def export(
    ctx: typer.Context,
    file: Path = typer.Argument(..., help="A new file to write the export to (JSON lines, mode 0600; never "
                                          "over an existing file), or - for standard output."),
) -> None:
    """Write the hash chain to a self-contained file that `verify --file` checks anywhere.

    Every change, each with its row's full state, as JSON lines; no database needed to check it.

    Example: bastion audit export /srv/archive/bastion-audit-2026-11.jsonl    |    bastion audit export - | gzip
    """
    with progress_bar() as progress:
        trailer = export_chain(config_of(ctx).database, file, utc_now(), progress)
    where = "standard output" if is_stdout(file) else file
    typer.echo(f"exported {trailer['events']} events to {where}; head {trailer['head_seq']}:{trailer['head_hash']}",
               err=is_stdout(file))  # with -, standard output is the export alone

