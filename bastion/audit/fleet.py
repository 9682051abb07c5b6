"""The fleet's audit trail in PostgreSQL (#22 part 3): every node's hash-chained events, and the rows they describe.

Each node writes its audit locally first (writer.py, SQLite, the hash chain in chain.py) and its shipper
(shipper.py) copies the chain's events here, in order:

    audit_events (node, seq, time, kind, tbl, row_id, payload, prev_hash, hash)   PRIMARY KEY (node, seq)

An event already here is never changed: a second copy of (node, seq) is skipped when its hash is the same, and
is an alarm when it differs (two nodes with one node_id, or a node whose local chain was replaced) — never an
overwrite. In the same transaction each event's payload (the row's full state) is upserted into tables shaped
like the local ones with a `node` column — auth, sessions, channels, listeners — so the queries and filters of
`bastion audit` (filters.py) run here as written, through a small dialect switch (`postgres_sql`).
`audit_nodes` holds what each shipper last reported (its local head, lag, last error) for `audit ship status`.

The schema grows by numbered migrations, like the SQLite ones, recorded in `schema_version` (the store's
tables, store/pg_schema.py, may share the database and keep theirs in `store_schema_version`). They are run by
`bastion store migrate` only, explicitly: a shipper or `audit … --store` that finds the schema missing or old says
to run it (`check_schema`) and changes nothing; the shipper keeps its node serving, the events waiting locally.
"""

from __future__ import annotations

import json
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from ..clock import iso

from ..errors import BastionError
from .chain import AUDIT_TABLES, ChainReport, Head, Meter, Progress, check_events
from .filters import TIME_COLUMN, Filters, ip_key, where_clause

if TYPE_CHECKING:
    import psycopg

# ---- schema ---------------------------------------------------------------------------------------------

_CERT = """
    cert_key_id TEXT, cert_serial TEXT, cert_ca TEXT, cert_principals TEXT, cert_valid_after TEXT,
    cert_valid_before TEXT,"""
# every state table: its node, the local row's columns, an indexed sortable form of each address the filters
# compare (ip_key, computed here from the payload), the seq of the event that wrote the row first and last
MIGRATIONS: tuple[str, ...] = (
    # 1: events, state tables, node reports
    f"""
    CREATE TABLE audit_events (
        node TEXT NOT NULL,
        seq BIGINT NOT NULL,
        time TEXT NOT NULL,
        kind TEXT NOT NULL,
        tbl TEXT NOT NULL,
        row_id JSONB NOT NULL,             -- a number or a string, as in the local chain (the hash depends on it)
        payload TEXT NOT NULL,             -- the canonical JSON the hash covers, byte for byte
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL,
        shipped_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (node, seq)
    );
    CREATE INDEX audit_events_time ON audit_events (time);

    CREATE TABLE audit_nodes (
        node TEXT PRIMARY KEY,
        local_seq BIGINT NOT NULL,         -- the node's local head when it last reported
        shipped_seq BIGINT NOT NULL,
        lag_seconds DOUBLE PRECISION NOT NULL DEFAULT 0,
        last_error TEXT,
        reported_at TIMESTAMPTZ NOT NULL DEFAULT now()
    );

    CREATE TABLE auth (
        node TEXT NOT NULL, id BIGINT NOT NULL,
        time TEXT, "user" TEXT, client_ip TEXT, client_port INTEGER, method TEXT, key_fingerprint TEXT,
        result TEXT, reason TEXT,{_CERT}
        client_ip_key TEXT, first_seq BIGINT NOT NULL, seq BIGINT NOT NULL,
        PRIMARY KEY (node, id)
    );
    CREATE INDEX auth_time ON auth (time);
    CREATE INDEX auth_user_time ON auth ("user", time);
    CREATE INDEX auth_failures ON auth (time) WHERE result = 'failure';
    CREATE INDEX auth_client ON auth (client_ip_key, time);

    CREATE TABLE sessions (
        node TEXT NOT NULL, id TEXT NOT NULL,
        "user" TEXT, client_ip TEXT, client_port INTEGER, key_fingerprint TEXT, client_version TEXT,
        started_at TEXT, ended_at TEXT, end_reason TEXT, bytes_up BIGINT, bytes_down BIGINT,{_CERT}
        client_ip_key TEXT, first_seq BIGINT NOT NULL, seq BIGINT NOT NULL,
        PRIMARY KEY (node, id)
    );
    CREATE INDEX sessions_started ON sessions (started_at);
    CREATE INDEX sessions_user_started ON sessions ("user", started_at);
    CREATE INDEX sessions_client ON sessions (client_ip_key, started_at);

    CREATE TABLE channels (
        node TEXT NOT NULL, id BIGINT NOT NULL,
        session_id TEXT, "user" TEXT, kind TEXT, target_host TEXT, target_ip TEXT, target_port INTEGER,
        decision TEXT, rule TEXT, reason TEXT, opened_at TEXT, closed_at TEXT, bytes_up BIGINT, bytes_down BIGINT,
        listener_id BIGINT, peer_ip TEXT, peer_port INTEGER, target_ip_key TEXT, close_reason TEXT,
        first_seq BIGINT NOT NULL, seq BIGINT NOT NULL,
        PRIMARY KEY (node, id)
    );
    CREATE INDEX channels_opened ON channels (opened_at);
    CREATE INDEX channels_user_opened ON channels ("user", opened_at);
    CREATE INDEX channels_session ON channels (node, session_id);
    CREATE INDEX channels_target_ip ON channels (target_ip_key, opened_at);
    CREATE INDEX channels_target_host ON channels (lower(target_host), opened_at);
    CREATE INDEX channels_denied ON channels (opened_at) WHERE decision = 'deny';

    CREATE TABLE listeners (
        node TEXT NOT NULL, id BIGINT NOT NULL,
        session_id TEXT, "user" TEXT, listen_host TEXT, listen_port INTEGER, requested_port INTEGER,
        decision TEXT, rule TEXT, reason TEXT, opened_at TEXT, closed_at TEXT, close_reason TEXT,
        listen_host_key TEXT, first_seq BIGINT NOT NULL, seq BIGINT NOT NULL,
        PRIMARY KEY (node, id)
    );
    CREATE INDEX listeners_opened ON listeners (opened_at);
    CREATE INDEX listeners_user_opened ON listeners ("user", opened_at);
    CREATE INDEX listeners_session ON listeners (node, session_id);
    """,
    # 2: the fleet's live sessions, as each node's shipper last saw them (a heartbeat), and kill requests that
    # the owning node's shipper carries out
    """
    CREATE TABLE live_sessions (
        node TEXT NOT NULL, id TEXT NOT NULL,
        "user" TEXT, client_ip TEXT, client_port INTEGER, started_at TEXT, channels INTEGER, listeners INTEGER,
        bytes_up BIGINT, bytes_down BIGINT, worker INTEGER,
        seen_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        PRIMARY KEY (node, id)
    );
    CREATE TABLE session_kills (
        id BIGSERIAL PRIMARY KEY,
        node TEXT NOT NULL,
        session_id TEXT,                   -- or every session of "user" on that node
        "user" TEXT,
        requested_by TEXT NOT NULL,
        requested_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        done_at TIMESTAMPTZ,
        result TEXT                        -- JSON: the node's answer
    );
    CREATE INDEX session_kills_pending ON session_kills (node) WHERE done_at IS NULL;
    """,
    # 3: `sessions --denied` looks for a refused channel or listener of each session: only refusals indexed
    """
    CREATE INDEX channels_denied_session ON channels (node, session_id) WHERE decision = 'deny';
    CREATE INDEX listeners_denied_session ON listeners (node, session_id) WHERE decision = 'deny';
    """,
)
LIVE_COLUMNS = ("id", "user", "client_ip", "client_port", "started_at", "channels", "listeners", "bytes_up",
                "bytes_down", "worker")
HEARTBEAT_SECONDS = 2.0
# `sessions kill --store`: the request's INSERT notifies KILLS (payload: the node) in its transaction, and the node's
# shipper, listening, carries it out at once; the answer's UPDATE notifies KILLS_DONE (payload: the request's id)
# for the CLI waiting on it. Each node also looks for requests right after it (re)connects — any made while it
# was not listening — and every KILL_POLL_SECONDS (a CLI of an earlier bastion does not notify).
KILLS, KILLS_DONE = "bastion_session_kills", "bastion_session_kills_done"
KILL_POLL_SECONDS = 2.0
STALE_SECONDS = 10.0  # a node not heard of for this long: its sessions are not listed as live
# the columns computed here, not shipped: an address's ip_key
_KEYS = {"auth": {"client_ip_key": "client_ip"}, "sessions": {"client_ip_key": "client_ip"},
         "listeners": {"listen_host_key": "listen_host"}, "channels": {}}
_OWN = {"node", "first_seq", "seq"}


class FleetError(BastionError):
    """The fleet's PostgreSQL cannot be reached or used; the message says which and why (no password)."""


class ShipAlarm(FleetError):
    """An event already in PostgreSQL differs from the local one of the same (node, seq)."""


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]*):[^@/]*@", r"\1:***@", url)


def connect(url: str, *, timeout: float = 5.0, autocommit: bool = True, **options: Any) -> "psycopg.Connection":
    """A psycopg 3 connection (autocommit: each `conn.transaction()` is a real one); an error names the
    redacted URL, and says what to install when psycopg is missing."""
    try:
        import psycopg
    except ImportError:
        raise FleetError("PostgreSQL needs psycopg 3: pip install 'bastion[fleet]' (or psycopg[binary])") from None
    try:
        return psycopg.connect(url, connect_timeout=max(1, int(timeout)), autocommit=autocommit,
                               application_name="bastion", **options)
    except psycopg.Error as exc:
        raise FleetError(f"{redact(url)}: cannot connect: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def migrate(conn: "psycopg.Connection") -> tuple[int, int]:
    """`bastion store migrate`: bring the schema to the newest version, under an advisory lock (two runs take
    turns), in one transaction. Returns (version before, version now). A trail made by an earlier bastion's
    shipper (which migrated it itself, into the same `schema_version`) is taken as it is and only moved on."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(22022022)")
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        version = (row[0] if row else None) or 0
        if version > len(MIGRATIONS):
            raise FleetError(f"the fleet's audit schema is newer than this bastion (version {version}, this one "
                             f"knows {len(MIGRATIONS)}); upgrade bastion")
        for number in range(version + 1, len(MIGRATIONS) + 1):
            conn.execute(MIGRATIONS[number - 1])
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", [number])
    return version, len(MIGRATIONS)


def schema_version(conn: "psycopg.Connection") -> int:
    exists = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()[0]
    if not exists:
        return 0
    return conn.execute("SELECT coalesce(max(version), 0) FROM schema_version").fetchone()[0]


def check_schema(conn: "psycopg.Connection", url: str) -> int:
    """The trail's schema version when this bastion can use it as it is; else FleetError, one line saying
    what to run. Never changes the schema (`bastion store migrate` does, explicitly)."""
    version = schema_version(conn)
    if version == len(MIGRATIONS):
        return version
    if version > len(MIGRATIONS):
        raise FleetError(f"{redact(url)}: the audit trail's schema (version {version}) is newer than this bastion "
                         f"({len(MIGRATIONS)}); upgrade bastion")
    state = "no bastion audit trail here yet" if version == 0 else \
        f"the audit trail's schema version {version} is old (this bastion needs {len(MIGRATIONS)})"
    raise FleetError(f"{redact(url)}: {state}; run `bastion store migrate` (once, from a node with audit_ship_to)")


def open_store(url: str) -> "psycopg.Connection":
    """A connection for queries: the schema must be there, at this bastion's version (`store migrate`)."""
    conn = connect(url, autocommit=True)
    try:
        check_schema(conn, url)
    except BaseException:
        conn.close()
        raise
    return conn


# ---- shipping -------------------------------------------------------------------------------------------

Event = tuple[int, str, str, str, Any, str, str, str]  # seq, time, kind, tbl, row_id, payload, prev_hash, hash


def shipped_head(conn: "psycopg.Connection", node: str) -> Head:
    """The newest event of `node` in PostgreSQL: where its shipping resumes."""
    row = conn.execute("SELECT seq, hash FROM audit_events WHERE node = %s ORDER BY seq DESC LIMIT 1",
                       [node]).fetchone()
    return Head(row[0], row[1]) if row else Head()


_columns_cache: dict[int, dict[str, list[tuple[str, str]]]] = {}


def table_types(conn: "psycopg.Connection") -> dict[str, list[tuple[str, str]]]:
    """Each state table's columns and their SQL types, in order (read once per connection)."""
    key = id(conn)
    cached = _columns_cache.get(key)
    if cached is None:
        cached = {}
        for table in AUDIT_TABLES:
            rows = conn.execute("SELECT column_name, data_type FROM information_schema.columns WHERE table_name = %s "
                                "AND table_schema = current_schema() ORDER BY ordinal_position", [table]).fetchall()
            cached[table] = [(name, kind) for name, kind in rows]
        _columns_cache.clear()  # one live connection per process matters; never grow
        _columns_cache[key] = cached
    return cached



def _table_columns(conn: "psycopg.Connection") -> dict[str, list[str]]:
    return {table: [name for name, _ in columns] for table, columns in table_types(conn).items()}


_COPY_EVENTS = "COPY audit_events (node, seq, time, kind, tbl, row_id, payload, prev_hash, hash) FROM STDIN"
_STATE_KINDS = ("insert", "update", "adopt", "restate")  # the events whose payload is a row's whole state


def _copy_field(text: str) -> str:
    """A value in COPY's text format: backslash and the row and field separators escaped."""
    if "\\" in text or "\t" in text or "\n" in text or "\r" in text:
        text = text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    return text


@dataclass(slots=True)
class Batch:
    """Events of a node made ready to store (prepare_batch): the events, and in COPY's text format the events
    and the newest state of each row they describe, per table."""
    node: str
    events: Sequence[Event]
    copy: str
    states: dict[str, str]


def prepare_batch(types: dict[str, list[tuple[str, str]]], node: str, events: Sequence[Event]) -> Batch:
    """The Python half of shipping, needing no connection (the shipper runs it on the next batch while
    PostgreSQL stores the current one): the events' COPY lines, and each row's newest state in the batch
    (json.loads of its payload), with the seq of its first event in the batch and its address keys (ip_key)."""
    name = _copy_field(node)
    lines = [f"{name}\t{seq}\t{_copy_field(time_)}\t{_copy_field(kind)}\t{_copy_field(tbl)}\t"
             f"{row_id if type(row_id) is int else _copy_field(json.dumps(row_id))}\t{_copy_field(payload)}\t"
             f"{_copy_field(prev)}\t{_copy_field(digest)}\n"
             for seq, time_, kind, tbl, row_id, payload, prev, digest in events]
    latest: dict[tuple[str, Any], tuple[int, int, str]] = {}
    for seq, _, kind, tbl, row_id, payload, _, _ in events:
        if tbl in types and kind in _STATE_KINDS:
            first = latest.get((tbl, row_id), (seq, 0, ""))[0]
            latest[(tbl, row_id)] = (first, seq, payload)
    by_table: dict[str, list[str]] = {}
    for (tbl, _), (first, seq, payload) in latest.items():
        by_table.setdefault(tbl, []).append(_state_line(tbl, types[tbl], name, first, seq, payload))
    return Batch(node, events, "".join(lines), {tbl: "".join(rows) for tbl, rows in by_table.items()})


def ship_batch(conn: "psycopg.Connection", node: str, events: Sequence[Event]) -> int:
    """Store `events` (consecutive, oldest first) of `node` and upsert the rows they describe, in one
    transaction. Events already stored with the same hash are skipped; one with a different hash raises
    ShipAlarm and nothing of the batch is stored. Returns how many events were new."""
    return store_batch(conn, prepare_batch(table_types(conn), node, events))


def store_batch(conn: "psycopg.Connection", batch: Batch) -> int:
    """ship_batch's PostgreSQL half, one transaction. The events go in with one COPY: those of the batch
    already stored are left out first (their hashes compared), and a copy of (node, seq) stored meanwhile by
    someone else fails the transaction on the primary key: nothing is overwritten, the retry compares the
    hashes. The rows go into a temporary table of the session's own with one COPY per table, then into the
    table with one INSERT … ON CONFLICT (node, id) that never puts an older state over a newer one. So a
    batch costs a few round trips whatever its size."""
    node, events = batch.node, batch.events
    if not events:
        return 0
    types = table_types(conn)
    with conn.transaction():
        existing = dict(conn.execute(
            "SELECT seq, hash FROM audit_events WHERE node = %s AND seq BETWEEN %s AND %s",
            [node, events[0][0], events[-1][0]]).fetchall())
        for event in events:
            if event[0] in existing and existing[event[0]] != event[7]:
                raise ShipAlarm(f"node {node!r} event {event[0]} is already in PostgreSQL with another hash "
                                f"({existing[event[0]][:12]}…, here {event[7][:12]}…): two nodes share this "
                                "node_id, or this node's audit database was replaced; nothing was overwritten")
        if existing:
            fresh = [e for e in events if e[0] not in existing]
            if not fresh:
                return 0
            batch = prepare_batch(types, node, fresh)  # the rows of the events stored before were stored then
        with conn.cursor() as cur, cur.copy(_COPY_EVENTS) as copy:
            copy.write(batch.copy)
        for tbl, rows in batch.states.items():
            names = [column for column, _ in types[tbl]]
            columns = ", ".join(_quote(c) for c in names)
            # emptied at each commit; PUBLIC may create temporary tables unless an administrator revoked it
            conn.execute(f"CREATE TEMP TABLE IF NOT EXISTS ship_{tbl} (LIKE {tbl}) ON COMMIT DELETE ROWS")
            with conn.cursor() as cur, cur.copy(f"COPY pg_temp.ship_{tbl} ({columns}) FROM STDIN") as copy:
                copy.write(rows)
            updated = [c for c in names if c not in ("node", "id", "first_seq")]
            conn.execute(
                f"INSERT INTO {tbl} ({columns}) SELECT {columns} FROM pg_temp.ship_{tbl} ON CONFLICT (node, id) "
                "DO UPDATE SET " + ", ".join(f"{_quote(c)} = EXCLUDED.{_quote(c)}" for c in updated)
                + f" WHERE {tbl}.seq < EXCLUDED.seq")
    return len(batch.events)


def _state_line(table: str, columns: list[tuple[str, str]], node: str, first: int, seq: int, payload: str) -> str:
    """One row of `table` in COPY's text format from an event's payload (its whole state), with its node
    (already in COPY's form), the seqs of its first and newest events in the batch, and the address keys."""
    state = json.loads(payload)
    get = state.get
    keys = _KEYS[table]
    fields = []
    for name, _ in columns:
        if name in _OWN or name in keys:  # ours, whatever the payload says
            fields.append(node if name == "node" else str(first) if name == "first_seq" else str(seq)
                          if name == "seq" else _ip_key_text(get(keys[name])))
            continue
        value = get(name)
        if type(value) is str:
            value = _copy_field(value)
        elif value is None:
            value = "\\N"
        elif type(value) is int or name == "cert_serial":
            value = str(value)
        else:  # what psycopg would send for another JSON value in a column of that type
            value = _copy_field(json.dumps(value) if isinstance(value, (dict, list)) else str(value))
        fields.append(value)
    return "\t".join(fields) + "\n"


def _ip_key_text(address: Any) -> str:
    """ip_key in COPY's text format; the same few client addresses come again and again."""
    return _ip_key_cached(address) if type(address) is str else "\\N"


@lru_cache(maxsize=4096)
def _ip_key_cached(address: str) -> str:
    key = ip_key(address)
    return "\\N" if key is None else key


def _quote(column: str) -> str:
    return '"user"' if column == "user" else column


def _state_values(table: str, names: list[str], node: str, first: int, seq: int, payload: str) -> tuple:
    state = json.loads(payload)
    keys = _KEYS[table]
    values = []
    for name in names:
        if name == "node":
            values.append(node)
        elif name == "first_seq":
            values.append(first)
        elif name == "seq":
            values.append(seq)
        elif name in keys:
            values.append(ip_key(state.get(keys[name])))
        else:
            value = state.get(name)
            values.append(str(value) if name == "cert_serial" and value is not None else value)
    return tuple(values)


def report_node(conn: "psycopg.Connection", node: str, local_seq: int, shipped_seq: int, lag: float,
                error: str | None) -> None:
    """What this node's shipper knows, for `audit ship status` anywhere in the fleet."""
    conn.execute(
        "INSERT INTO audit_nodes (node, local_seq, shipped_seq, lag_seconds, last_error, reported_at) "
        "VALUES (%s, %s, %s, %s, %s, now()) ON CONFLICT (node) DO UPDATE SET local_seq = EXCLUDED.local_seq, "
        "shipped_seq = EXCLUDED.shipped_seq, lag_seconds = EXCLUDED.lag_seconds, last_error = EXCLUDED.last_error, "
        "reported_at = now()", [node, local_seq, shipped_seq, lag, error])
    if not conn.autocommit:
        conn.commit()


def node_reports(conn: "psycopg.Connection") -> list[dict[str, Any]]:
    """Every node that shipped: the max seq stored here, and what its shipper last reported."""
    rows = conn.execute(
        "SELECT e.node, e.shipped, e.last_time, n.local_seq, n.lag_seconds, n.last_error, "
        "extract(epoch FROM now() - n.reported_at) FROM (SELECT node, max(seq) shipped, "
        "(SELECT time FROM audit_events x WHERE x.node = a.node ORDER BY seq DESC LIMIT 1) last_time "
        "FROM audit_events a GROUP BY node) e LEFT JOIN audit_nodes n ON n.node = e.node ORDER BY e.node"
    ).fetchall()
    return [{"node": node, "shipped_seq": shipped, "last_shipped_time": last_time, "reported_local_seq": local,
             "reported_lag_seconds": lag, "reported_error": error,
             "reported_seconds_ago": float(ago) if ago is not None else None}
            for node, shipped, last_time, local, lag, error, ago in rows]


# ---- queries: the SQLite filters, spoken to PostgreSQL ---------------------------------------------------

_IP_KEY = re.compile(r"ip_key\((\w+\.)?(\w+)\)")
_NOCASE = re.compile(r"(\w+) = \? COLLATE NOCASE")
_USER = re.compile(r'(?<![\w."])user(?![\w"])')
_SESSION_OF = re.compile(r"(\w+)\.id = (\w+)\.session_id")
_SESSION_IS = re.compile(r"(\w+)\.session_id = (\w+)\.id")
_EITHER_REFUSED = re.compile(r"\(EXISTS \((SELECT 1 FROM channels c WHERE [^()]*)\) "
                             r"OR EXISTS \((SELECT 1 FROM listeners l WHERE [^()]*)\)\)")


def postgres_sql(sql: str) -> str:
    """A WHERE clause of filters.where_clause (SQLite) as PostgreSQL reads it on the fleet's tables:
    placeholders %s, `ip_key(col)` the stored `col_key`, COLLATE NOCASE as lower(), LIKE (ASCII case-insensitive
    in SQLite) as ILIKE, SQLite's index-off `+col` plain, the reserved word user quoted, and a row's session looked
    up on the same node."""
    sql = sql.replace("%", "%%")
    sql = _IP_KEY.sub(lambda m: f"{m.group(1) or ''}{m.group(2)}_key", sql)
    sql = _NOCASE.sub(r"lower(\1) = ?", sql)
    sql = sql.replace(" LIKE ", " ILIKE ").replace("+target_ip_key", "target_ip_key")
    sql = _USER.sub('"user"', sql)
    sql = _SESSION_OF.sub(r"\1.node = \2.node AND \1.id = \2.session_id", sql)
    sql = _SESSION_IS.sub(r"\1.node = \2.node AND \1.session_id = \2.id", sql)
    sql = sql.replace("session_id IN (SELECT id FROM sessions WHERE",
                      "(node, session_id) IN (SELECT node, id FROM sessions WHERE")
    sql = sql.replace("id IN (SELECT session_id FROM channels WHERE",
                      "(node, id) IN (SELECT node, session_id FROM channels WHERE")
    # sessions --denied: one EXISTS over both tables, probed per session through the partial indexes; an OR of two
    # EXISTS makes PostgreSQL hash every refusal of the trail first (8 ms against 240 ms on a million channels)
    sql = _EITHER_REFUSED.sub(r"EXISTS (\1 UNION ALL \2)", sql)
    return sql.replace("?", "%s")


def select(conn: "psycopg.Connection", table: str, filters: Filters, columns: list[str],
           node: str | None = None) -> Iterator[dict[str, Any]]:
    """Rows of one audit table across the fleet, oldest first, with their node; `node` keeps one node's.
    With a limit, the newest `limit` rows. `columns` are the local query's (query.COLUMNS)."""
    where, params = where_clause(table, filters)
    where = postgres_sql(where) if where else ""
    if node is not None:
        where = f"node = %s AND ({where})" if where else "node = %s"
        params = [node, *params]
    names = ["node", *columns]
    time_column = TIME_COLUMN[table]
    sql = f"SELECT {', '.join(_quote(c) for c in names)} FROM {table}" + (f" WHERE {where}" if where else "")
    if filters.limit is not None:
        rows = conn.execute(sql + f" ORDER BY {time_column} DESC, node DESC, first_seq DESC LIMIT %s",
                            [*params, filters.limit]).fetchall()
        for values in reversed(rows):
            yield _typed(dict(zip(names, values)))
        return
    with conn.cursor() as cur:  # streamed: a million rows never sit in memory at once
        for values in cur.stream(sql + f" ORDER BY {time_column}, node, first_seq", params):
            yield _typed(dict(zip(names, values)))


def _typed(row: dict[str, Any]) -> dict[str, Any]:
    """As the local query shows them: a certificate's serial as a number, its principals as a list."""
    if row.get("cert_serial") is not None:
        row["cert_serial"] = int(row["cert_serial"])
    if isinstance(row.get("cert_principals"), str):
        try:
            row["cert_principals"] = json.loads(row["cert_principals"])
        except ValueError:
            pass
    return row


# ---- verification ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class FleetReport:
    """verify --store: one ChainReport per node."""

    nodes: dict[str, ChainReport] = field(default_factory=dict)

    @property
    def intact(self) -> bool:
        return all(report.intact for report in self.nodes.values())

    def as_dict(self) -> dict[str, Any]:
        return {"intact": self.intact, "nodes": {name: r.as_dict() for name, r in self.nodes.items()}}


def verify(conn: "psycopg.Connection", node: str | None = None, progress: Progress | None = None) -> FleetReport:
    """Every node's chain as chain.py checks a local one (hashes, links, gaps, anchors), then every state row
    against its latest event. One snapshot (REPEATABLE READ) while shippers keep writing."""
    result = FleetReport()
    conn.autocommit = False
    conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        nodes = [node] if node is not None else [r[0] for r in conn.execute(
            "SELECT DISTINCT node FROM audit_events ORDER BY node").fetchall()]
        total = None
        if progress is not None:
            total = conn.execute("SELECT count(*) FROM audit_events" + (" WHERE node = %s" if node else ""),
                                 [node] if node else []).fetchone()[0]
        meter = Meter(progress, "verifying", total)
        columns = _table_columns(conn)
        for name in nodes:
            report = ChainReport()
            with conn.cursor(name="bastion_verify") as cur:
                cur.itersize = 5000
                cur.execute("SELECT seq, time, kind, tbl, row_id, payload, prev_hash, hash FROM audit_events "
                            "WHERE node = %s ORDER BY seq", [name])
                check_events(meter.over(tuple(row) for row in cur), report)
            _check_rows(conn, name, columns, report)
            result.nodes[name] = report
        meter.finish()
    finally:
        conn.rollback()
        conn.autocommit = True
    return result


def _check_rows(conn: "psycopg.Connection", node: str, columns: dict[str, list[str]], report: ChainReport) -> None:
    """Each state row equals the payload of its row's latest event; each such event has its row. One streamed
    join per table (rows against the latest event of each row id), so memory stays flat on a large trail."""
    for table in AUDIT_TABLES:
        names = [c for c in columns[table] if c not in _OWN and c not in _KEYS[table]]
        with conn.cursor(name=f"bastion_rows_{table}") as cur:
            cur.itersize = 5000
            cur.execute(
                f"SELECT {', '.join('t.' + _quote(c) for c in names)}, t.id IS NOT NULL, e.row_id, e.seq, e.payload "
                f"FROM (SELECT * FROM {table} WHERE node = %s) t FULL JOIN (SELECT DISTINCT ON (row_id) row_id, seq, "
                "payload FROM audit_events WHERE node = %s AND tbl = %s AND kind IN ('insert', 'update', 'adopt', "
                "'restate') ORDER BY row_id, seq DESC) e ON e.row_id = to_jsonb(t.id)", [node, node, table])
            for values in cur:
                row = dict(zip(names, values))
                present, row_id, seq, payload = values[len(names):]
                if not present:
                    report.problem(f"node {node}: {table} row {row_id!r} deleted: event {seq} wrote it, the row "
                                   "is gone")
                    continue
                report.rows += 1
                if seq is None:
                    report.problem(f"node {node}: {table} row {row['id']!r} inserted: no shipped event wrote it")
                    continue
                state = json.loads(payload)
                changed = [c for c in names if _stored(c, state.get(c)) != row[c]]
                if changed:
                    shown = ", ".join(f"{c} is {row[c]!r}, event {seq} says {state.get(c)!r}" for c in changed[:3])
                    report.problem(f"node {node}: {table} row {row['id']!r} edited: {shown}")


def _stored(column: str, value: Any) -> Any:
    return str(value) if column == "cert_serial" and value is not None else value


# ---- status ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class NodeStatus:
    node: str
    local_seq: int | None
    shipped_seq: int | None
    backlog: int | None
    lag_seconds: float | None
    last_error: str | None
    source: str  # "local" (this node, measured now) or "reported" (what its shipper last wrote)

    def as_dict(self) -> dict[str, Any]:
        return {"node": self.node, "local_seq": self.local_seq, "shipped_seq": self.shipped_seq,
                "backlog": self.backlog, "lag_seconds": self.lag_seconds, "last_error": self.last_error,
                "source": self.source}


def lag_of(oldest_unshipped: str | None, now: datetime) -> float:
    """Seconds the oldest event not yet shipped has waited (0 when nothing waits)."""
    if oldest_unshipped is None:
        return 0.0
    written = datetime.fromisoformat(oldest_unshipped.replace("Z", "+00:00"))
    return max(0.0, (now - written).total_seconds())


# ---- live tail ------------------------------------------------------------------------------------------


def follow(conn: "psycopg.Connection", tables: Sequence[str], filters: Filters, since: datetime | None,
           poll_seconds: float = 0.5, node: str | None = None,
           sleep: Callable[[float], None] = time.sleep) -> Iterator[dict[str, Any]]:
    """`audit follow --store`: new events of every node (or one) as their shippers store them, forever, each as
    query.AuditEvent.as_dict() with its node. Per node, a seek by (node, seq) past the last one seen; the nodes
    are looked up again on each poll, so one that starts shipping later is followed from its first event. The
    filters match through the fleet's tables, as the local follow matches through the local ones."""
    wanted = [t for t in tables if t in AUDIT_TABLES]
    filters = replace(filters, since=None, limit=None)
    where = {}
    for table in wanted:
        sql, params = where_clause(table, filters)
        where[table] = (postgres_sql(sql) if sql else "", params)
    after: dict[str, int] = {}
    known = False
    while True:
        # every shipper reports itself in audit_nodes after its first batch
        names = [node] if node is not None else [r[0] for r in conn.execute("SELECT node FROM audit_nodes ORDER BY 1")]
        for name in names:
            if name not in after:
                if since is not None:
                    row = conn.execute("SELECT max(seq) FROM audit_events WHERE node = %s AND time < %s",
                                       [name, iso(since)]).fetchone()
                elif not known:  # at start: only what comes next
                    row = conn.execute("SELECT max(seq) FROM audit_events WHERE node = %s", [name]).fetchone()
                else:  # a node seen for the first time while following: from its beginning
                    row = (0,)
                after[name] = (row[0] if row else 0) or 0
        known = True
        batch: list[tuple] = []
        for name in names:
            rows = conn.execute(
                "SELECT node, seq, time, kind, tbl, row_id, payload, hash FROM audit_events WHERE node = %s "
                "AND seq > %s ORDER BY seq LIMIT 1000", [name, after[name]]).fetchall()
            if rows:
                after[name] = rows[-1][1]
                batch.extend(rows)
        if not batch:
            sleep(poll_seconds)
            continue
        ids: dict[tuple[str, str], list] = defaultdict(list)
        for name, _, _, kind, table, row_id, _, _ in batch:
            if table in where and kind in ("insert", "update"):
                ids[(name, table)].append(row_id)
        matching: set[tuple[str, str, Any]] = set()
        for (name, table), row_ids in ids.items():
            sql, params = where[table]
            found = conn.execute(f"SELECT id FROM {table} WHERE node = %s AND id = ANY(%s)"
                                 + (f" AND ({sql})" if sql else ""), [name, row_ids, *params])
            matching.update((name, table, row[0]) for row in found)
        for name, seq, time_, kind, table, row_id, payload, digest in sorted(batch, key=lambda e: (e[2], e[0], e[1])):
            if kind == "alarm" or (name, table, row_id) in matching and kind in ("insert", "update"):
                row = json.loads(payload)
                row.pop("target_ip_key", None)
                yield {"node": name, "seq": seq, "time": time_, "kind": kind, "table": table, "row": row,
                       "hash": digest}


# ---- one session --------------------------------------------------------------------------------------


def session_record(conn: "psycopg.Connection", session_id: str, columns: dict[str, list[str]],
                   node: str | None = None, login_window_seconds: int = 600) -> dict[str, Any]:
    """`audit show ID --store`: as query.session_record, from the fleet's tables: the session (on `node`, which
    must be given when two nodes have a session of that id), its logins, channels and listeners, with its node."""
    from .query import NotFound

    sessions = list(select(conn, "sessions", Filters(session=session_id), columns["sessions"], node))
    if not sessions:
        raise NotFound(f"no session {session_id!r} in the fleet's audit trail"
                       + (f" from node {node}" if node else ""))
    if len(sessions) > 1:
        raise BastionError(f"session {session_id!r} is on several nodes ({', '.join(s['node'] for s in sessions)}); "
                           "choose one with --node")
    session = sessions[0]
    started = datetime.fromisoformat(session["started_at"].replace("Z", "+00:00"))
    auth = conn.execute(
        f"SELECT {', '.join(_quote(c) for c in columns['auth'])} FROM auth WHERE node = %s AND time >= %s "
        "AND time <= %s AND client_ip = %s AND client_port = %s AND \"user\" = %s ORDER BY time, id",
        [session["node"], iso(started - timedelta(seconds=login_window_seconds)), session["started_at"],
         session["client_ip"], session["client_port"], session["user"]]).fetchall()
    return {
        "node": session["node"],
        "session": session,
        "auth": [_typed(dict(zip(columns["auth"], row))) for row in auth],
        "channels": list(select(conn, "channels", Filters(session=session_id), columns["channels"],
                                session["node"])),
        "listeners": list(select(conn, "listeners", Filters(session=session_id), columns["listeners"],
                                 session["node"])),
    }


# ---- statistics: query.stats on the fleet's tables -------------------------------------------------------

_PLACEHOLDER = re.compile(r"\?(\d*)")


class SqliteSpeaking:
    """Enough of an sqlite3 connection for query.stats to run unchanged on the fleet's tables (all nodes
    together): SQLite's `?` and numbered `?N` parameters become psycopg's, with the filters' dialect switch
    (postgres_sql), a comparison summed as a number cast to one, an unnamed subquery named, and numeric sums
    as ints."""

    def __init__(self, conn: "psycopg.Connection"):
        self.conn = conn

    def execute(self, sql: str, params: Sequence[Any] = ()) -> "_Rows":
        order: list[int] = []
        highest = 0

        def number(match: re.Match) -> str:
            nonlocal highest
            index = int(match.group(1)) if match.group(1) else highest + 1
            highest = max(highest, index)
            order.append(index - 1)
            return "%s"

        sql = postgres_sql(sql).replace("%s", "?")  # back to ?, then numbered in SQLite's order
        sql = _PLACEHOLDER.sub(number, sql)
        sql = sql.replace("decision = 'deny' FROM", "(decision = 'deny')::int FROM").replace(") GROUP BY",
                                                                                         ") AS rows GROUP BY")
        return _Rows(self.conn.execute(sql, [params[i] for i in order]).fetchall())


class _Rows:
    def __init__(self, rows: list[tuple]):
        self.rows = [tuple(int(v) if type(v).__name__ == "Decimal" else v for v in row) for row in rows]

    def fetchall(self) -> list[tuple]:
        return self.rows

    def fetchone(self) -> tuple | None:
        return self.rows[0] if self.rows else None

    def __iter__(self) -> Iterator[tuple]:
        return iter(self.rows)



# ---- the fleet's live sessions ----------------------------------------------------------------------------


def publish_sessions(conn: "psycopg.Connection", node: str, sessions: list[dict[str, Any]]) -> None:
    """Replace this node's live sessions with `sessions` (what its control socket said), in one transaction."""
    with conn.transaction():
        conn.execute("DELETE FROM live_sessions WHERE node = %s", [node])
        if sessions:
            with conn.cursor() as cur:
                cur.executemany(
                    f"INSERT INTO live_sessions (node, {', '.join(_quote(c) for c in LIVE_COLUMNS)}) "
                    f"VALUES (%s, {', '.join(['%s'] * len(LIVE_COLUMNS))})",
                    [(node, *(s.get(c) for c in LIVE_COLUMNS)) for s in sessions])
        conn.execute("UPDATE audit_nodes SET reported_at = now() WHERE node = %s", [node])


def pending_kills(conn: "psycopg.Connection", node: str) -> list[tuple[int, str | None, str | None, str]]:
    return [tuple(r) for r in conn.execute(
        "SELECT id, session_id, \"user\", requested_by FROM session_kills WHERE node = %s AND done_at IS NULL "
        "ORDER BY id", [node])]


def kill_done(conn: "psycopg.Connection", kill_id: int, result: dict[str, Any]) -> None:
    """Record the node's answer; the CLI waiting for it is told at commit."""
    with conn.transaction():
        conn.execute("UPDATE session_kills SET done_at = now(), result = %s WHERE id = %s",
                     [json.dumps(result), kill_id])
        conn.execute("SELECT pg_notify(%s, %s)", [KILLS_DONE, str(kill_id)])


def live_sessions(conn: "psycopg.Connection", node: str | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """The live sessions of every node heard of within STALE_SECONDS (or of `node`), and the nodes that were
    not (their sessions are unknown)."""
    rows = conn.execute(
        f"SELECT l.node, {', '.join('l.' + _quote(c) for c in LIVE_COLUMNS)} FROM live_sessions l JOIN audit_nodes n "
        "ON n.node = l.node WHERE n.reported_at > now() - make_interval(secs => %s)"
        + (" AND l.node = %s" if node else "") + " ORDER BY l.started_at, l.node, l.id",
        [STALE_SECONDS, node] if node else [STALE_SECONDS]).fetchall()
    stale = [r[0] for r in conn.execute(
        "SELECT node FROM audit_nodes WHERE reported_at <= now() - make_interval(secs => %s)"
        + (" AND node = %s" if node else "") + " ORDER BY node", [STALE_SECONDS, node] if node else [STALE_SECONDS])]
    return [dict(zip(("node", *LIVE_COLUMNS), row)) for row in rows], stale


def request_kill(conn: "psycopg.Connection", session_id: str | None, user: str | None, by: str,
                 wait_seconds: float = 10.0) -> list[dict[str, Any]]:
    """Ask the node(s) holding the session (or the user's sessions) to end it; wait for their answers. Returns
    one answer per node: {"node", "ok", "killed" or "error"}; a node that did not answer in time says so."""
    sessions, _ = live_sessions(conn)
    nodes = sorted({s["node"] for s in sessions if (session_id and s["id"] == session_id)
                    or (user and s["user"] == user)})
    if not nodes:
        what = f"no live session {session_id!r}" if session_id else f"user {user!r} has no live session"
        raise BastionError(f"{what} on any node heard of in the last {STALE_SECONDS:g}s")
    conn.execute(f"LISTEN {KILLS_DONE}")  # before the requests: no answer can come unheard
    ids = {}
    with conn.transaction():  # each owning node is told at commit, so it never looks before the row is there
        for name in nodes:
            ids[name] = conn.execute(
                "INSERT INTO session_kills (node, session_id, \"user\", requested_by) VALUES (%s, %s, %s, %s) "
                "RETURNING id", [name, session_id, user, by]).fetchone()[0]
            conn.execute("SELECT pg_notify(%s, %s)", [KILLS, name])
    deadline = time.monotonic() + wait_seconds
    answers: dict[str, dict[str, Any]] = {}
    while True:
        for name, kill_id in ids.items():
            if name in answers:
                continue
            row = conn.execute("SELECT result FROM session_kills WHERE id = %s AND done_at IS NOT NULL",
                               [kill_id]).fetchone()
            if row is not None:
                answers[name] = {"node": name, **json.loads(row[0])}
        remaining = deadline - time.monotonic()
        if len(answers) == len(ids) or remaining <= 0:
            break
        # woken by an answer's notification; looked again after at most 0.5 s all the same (a notification that
        # arrived during the SELECT above is not kept by every psycopg version)
        for _ in conn.notifies(timeout=min(0.5, remaining), stop_after=1):
            pass
    conn.execute(f"UNLISTEN {KILLS_DONE}")
    for name in ids:
        answers.setdefault(name, {"node": name, "ok": False,
                                  "error": f"node {name} did not answer within {wait_seconds:g}s (its shipper "
                                           "carries kills out; it is asked again when it reconnects)"})
    return [answers[name] for name in sorted(answers)]
