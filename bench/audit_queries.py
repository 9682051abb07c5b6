"""Benchmark: the audit queries on a large log. Not a test; run it by hand and record the numbers.

    .venv/bin/python bench/audit_queries.py                 # 1,000,000 channels, 100,000 sessions, 90 days
    .venv/bin/python bench/audit_queries.py --channels 100000 --sessions 10000 --db /tmp/small.db

Fills an SQLite file through the real schema (with a valid hash chain: one event per row, as `adopt` would
write it), then times each filtered query shape through the same code the CLI uses (`bastion.audit.query.select` on a
read-only connection): the median of several warm runs and the first run. Also times `verify` over the whole
chain, and the writer's throughput (record_channel + close_channel through AuditLog, on a fresh database).
Prints a table, then the same numbers as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bastion.audit.writer import AuditLog, ChannelRecord  # noqa: E402
from bastion.audit.chain import Head, canonical, event_hash  # noqa: E402
from bastion.audit.filters import ip_key  # noqa: E402
from bastion.audit.query import make_filters, open_reader, select, session_record, stats, timeline  # noqa: E402
from bastion.audit.retention import verify  # noqa: E402
from bastion.store.schema import connect, migrate  # noqa: E402
from bastion.clock import iso  # noqa: E402

import sqlite_utils  # noqa: E402

PORTS = [22, 22, 22, 5432, 443, 3306, 8080, 6379]


def fill(path: Path, sessions: int, channels: int, days: int, now: datetime, seed: int = 4) -> dict:
    """Sessions spread evenly over `days`, each with a Poisson-ish number of channels; 5% of channels refused,
    10% of logins preceded by a failure, one listener per 10 sessions."""
    rng = random.Random(seed)
    migrate(sqlite_utils.Database(connect(path)))
    conn = connect(path)
    conn.isolation_level = None
    conn.execute("PRAGMA synchronous = OFF")
    users = [f"user{n:03d}" for n in range(300)]
    weights = [1 / (n + 1) ** 0.8 for n in range(len(users))]  # a few busy users, a long tail
    clients = [f"203.0.113.{n}" for n in range(1, 200)] + [f"10.8.{n // 250}.{n % 250 + 1}" for n in range(800)]
    hosts = [f"10.{rng.randrange(1, 40)}.{rng.randrange(256)}.{rng.randrange(1, 255)}" for _ in range(5000)]
    names = {h: f"host{n}.corp.internal" for n, h in enumerate(hosts) if n % 3 == 0}
    head = Head()
    per_channel = channels / sessions
    start = now - timedelta(days=days)
    step = timedelta(days=days) / sessions
    counts = dict.fromkeys(("sessions", "channels", "auth", "listeners", "events"), 0)
    batch: dict[str, list] = {"auth": [], "sessions": [], "channels": [], "listeners": [], "events": []}
    columns: dict[str, list[str]] = {}
    for table in ("auth", "sessions", "channels", "listeners"):
        columns[table] = [r[1] for r in conn.execute(f"PRAGMA table_info({table})")]

    def add(table: str, row: dict, when: str) -> None:
        state = {c: row.get(c) for c in columns[table]}
        payload = canonical(state)
        seq = head.seq + 1
        digest = event_hash(head.hash, seq, when, "adopt", table, state["id"], payload)
        batch[table].append([state[c] for c in columns[table]])
        batch["events"].append((seq, when, "adopt", table, state["id"], payload, head.hash, digest))
        head.seq, head.hash = seq, digest
        counts[table] += 1

    def flush() -> None:
        conn.execute("BEGIN")
        for table, rows in batch.items():
            if rows:
                if table == "events":
                    conn.executemany("INSERT INTO audit_events VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
                else:
                    marks = ", ".join("?" * len(columns[table]))
                    conn.executemany(f"INSERT INTO {table} ({', '.join(columns[table])}) VALUES ({marks})", rows)
                rows.clear()
        conn.execute("COMMIT")

    channel_id = auth_id = listener_id = 0
    made_channels = 0
    for number in range(sessions):
        started = start + step * number + timedelta(seconds=rng.random())
        user = rng.choices(users, weights)[0]
        client = rng.choice(clients)
        port = rng.randrange(30000, 60000)
        sid = f"{number:012x}"
        if rng.random() < 0.1:
            auth_id += 1
            add("auth", {"id": auth_id, "time": iso(started - timedelta(seconds=1)), "user": user, "client_ip": client,
                         "client_port": port, "method": "publickey", "key_fingerprint": "SHA256:unknown",
                         "result": "failure", "reason": "key not accepted"}, iso(started))
        auth_id += 1
        add("auth", {"id": auth_id, "time": iso(started), "user": user, "client_ip": client, "client_port": port,
                     "method": "publickey", "key_fingerprint": f"SHA256:{user}", "result": "success",
                     "reason": "key accepted"}, iso(started))
        length = timedelta(seconds=rng.expovariate(1 / 1800))
        # about per_channel each, evenly over time, so every day holds its share
        want = channels - made_channels if number == sessions - 1 else min(
            channels - made_channels, max(0, int(per_channel * (number + 1)) - made_channels + rng.randint(-4, 4)))
        for _ in range(want):
            channel_id += 1
            made_channels += 1
            opened = started + length * rng.random()
            host = rng.choice(hosts)
            denied = rng.random() < 0.05
            closed = opened if denied else opened + timedelta(seconds=rng.expovariate(1 / 300))
            add("channels", {
                "id": channel_id, "session_id": sid, "user": user, "kind": "direct-tcpip",
                "target_host": names.get(host, host), "target_ip": host, "target_port": rng.choice(PORTS),
                "decision": "deny" if denied else "allow", "rule": None if denied else f"groups.g{user[-1]}.allow",
                "reason": "not granted by policy" if denied else "granted", "opened_at": iso(opened),
                "closed_at": iso(closed), "bytes_up": 0 if denied else rng.randrange(10**6),
                "bytes_down": 0 if denied else rng.randrange(10**7), "target_ip_key": ip_key(host)}, iso(closed))
        if number % 10 == 0:
            listener_id += 1
            denied = rng.random() < 0.2
            add("listeners", {
                "id": listener_id, "session_id": sid, "user": user, "listen_host": "127.0.0.1",
                "listen_port": 8000 + number % 1000, "requested_port": 8000 + number % 1000,
                "decision": "deny" if denied else "allow", "rule": None, "reason": "refused" if denied else "granted",
                "opened_at": iso(started), "closed_at": iso(started + length), "close_reason": "session ended"},
                iso(started + length))
        add("sessions", {
            "id": sid, "user": user, "client_ip": client, "client_port": port, "key_fingerprint": f"SHA256:{user}",
            "client_version": "SSH-2.0-OpenSSH_9.6", "started_at": iso(started), "ended_at": iso(started + length),
            "end_reason": "client disconnected", "bytes_up": 0, "bytes_down": 0}, iso(started + length))
        if len(batch["events"]) > 50_000:
            flush()
    flush()
    counts["events"] = head.seq
    conn.close()
    return counts


def timed(run, repeat: int) -> tuple[float, float, int]:
    """(first run ms, median of the warm runs ms, rows)."""
    times, rows = [], 0
    for _ in range(repeat + 1):
        began = time.perf_counter()
        rows = run()
        times.append((time.perf_counter() - began) * 1000)
    return times[0], statistics.median(times[1:]), rows


def shapes(conn, now: datetime, sample: dict) -> list[tuple[str, object]]:
    def rows(table: str, **filters) -> object:
        return lambda: sum(1 for _ in select(conn, table, make_filters(now=now, **filters)))

    user, host, net24, net16, name, sid = (sample[k] for k in ("user", "host", "net24", "net16", "name", "session"))
    return [
        (f"channels --user {user} --since 1d", rows("channels", user=user, since="1d")),
        (f"channels --user {user} --since 7d", rows("channels", user=user, since="7d")),
        (f"channels --target {host} --since 7d", rows("channels", target=host, since="7d")),
        (f"channels --target {net24} --since 7d", rows("channels", target=net24, since="7d")),
        (f"channels --target {net16}:22 --since 1d", rows("channels", target=f"{net16}:22", since="1d")),
        ("channels --target 10.0.0.0/8 --since 1h", rows("channels", target="10.0.0.0/8", since="1h")),
        (f"channels --target {name} --since 7d", rows("channels", target=name, since="7d")),
        ("channels --target *.corp.internal:5432 --since 1d", rows("channels", target="*.corp.internal:5432",
                                                                   since="1d")),
        ("channels --denied --since 1d", rows("channels", denied=True, since="1d")),
        ("channels --denied --since 7d", rows("channels", denied=True, since="7d")),
        (f"channels --session {sid}", rows("channels", session=sid)),
        ("channels --limit 100", rows("channels", limit=100)),
        ("channels --client 203.0.113.0/24 --since 1d", rows("channels", client="203.0.113.0/24", since="1d")),
        (f"sessions --user {user} --since 7d", rows("sessions", user=user, since="7d")),
        ("sessions --denied --since 1d", rows("sessions", denied=True, since="1d")),
        (f"sessions --target {host} --since 7d", rows("sessions", target=host, since="7d")),
        ("sessions --client 203.0.113.0/24 --since 1d", rows("sessions", client="203.0.113.0/24", since="1d")),
        ("auth --denied --since 1d", rows("auth", denied=True, since="1d")),
        (f"auth --user {user} --since 7d", rows("auth", user=user, since="7d")),
        (f"listeners --user {user} --since 30d", rows("listeners", user=user, since="30d")),
        (f"show {sid}", lambda: len(timeline(session_record(conn, sid)))),
        ("stats --since 7d", lambda: len(stats(conn, now - timedelta(days=7))["per_day"])),
    ]


def sample_of(path: Path) -> dict:
    conn = connect(path, readonly=True)
    # a typical user (the 30th busiest), a target and a name used in the last hours: shapes that find rows
    user = conn.execute("SELECT user FROM sessions GROUP BY user ORDER BY count(*) DESC LIMIT 1 OFFSET 30").fetchone()[0]
    host = conn.execute("SELECT target_ip FROM channels ORDER BY id DESC LIMIT 1").fetchone()[0]
    name = conn.execute("SELECT target_host FROM channels WHERE target_host LIKE 'host%' ORDER BY id DESC "
                        "LIMIT 1").fetchone()[0]
    session = conn.execute("SELECT session_id FROM channels ORDER BY id DESC LIMIT 1").fetchone()[0]
    conn.close()
    a, b, c, _ = host.split(".")
    return {"user": user, "host": host, "net24": f"{a}.{b}.{c}.0/24", "net16": f"{a}.{b}.0.0/16", "name": name,
            "session": session}


def writer_throughput(path: Path, count: int) -> float:
    """Row changes per second through AuditLog into a fresh database at `path`: `count` channels recorded
    (awaited) and closed, from 50 concurrent tasks."""
    migrate(sqlite_utils.Database(connect(path)))

    async def run() -> float:
        audit = AuditLog(path)
        audit.start()
        began = time.perf_counter()

        async def one(n: int) -> None:
            for i in range(n, count, 50):
                cid = await audit.record_channel(ChannelRecord(
                    "bench", "bench", "direct-tcpip", "10.9.9.9", "10.9.9.9", 22, "allow", None, "granted",
                    datetime.now(UTC)))
                audit.close_channel(cid, i, i)

        await asyncio.gather(*(one(n) for n in range(50)))
        await audit.flush()
        elapsed = time.perf_counter() - began
        audit.stop()
        return 2 * count / elapsed
    return asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", type=Path, help="database file to fill (default: a temporary one)")
    parser.add_argument("--channels", type=int, default=1_000_000)
    parser.add_argument("--sessions", type=int, default=100_000)
    parser.add_argument("--days", type=int, default=90)
    parser.add_argument("--repeat", type=int, default=5, help="warm runs per query (the median is reported)")
    parser.add_argument("--reuse", action="store_true", help="the --db file is already filled: only query it")
    parser.add_argument("--skip-verify", action="store_true")
    args = parser.parse_args()
    directory = tempfile.TemporaryDirectory() if args.db is None else None
    path = args.db or Path(directory.name) / "bench.db"  # type: ignore[union-attr]
    now = datetime.now(UTC)
    result: dict = {"python": sys.version.split()[0]}
    if not args.reuse:
        path.unlink(missing_ok=True)
        began = time.perf_counter()
        result["rows"] = fill(path, args.sessions, args.channels, args.days, now)
        result["fill_seconds"] = round(time.perf_counter() - began, 1)
        print(f"filled {path} in {result['fill_seconds']} s: {result['rows']}", file=sys.stderr)
    result["database_mb"] = round(path.stat().st_size / 2**20)
    conn = open_reader(path)
    result["queries"] = []
    print(f"{'query':<58} {'rows':>7} {'first ms':>9} {'median ms':>10}")
    for label, run in shapes(conn, now, sample_of(path)):
        first, median, rows = timed(run, args.repeat)
        result["queries"].append({"query": label, "rows": rows, "first_ms": round(first, 1),
                                  "median_ms": round(median, 1)})
        print(f"{label:<58} {rows:>7} {first:>9.1f} {median:>10.1f}", flush=True)
    conn.close()
    if not args.skip_verify:
        began = time.perf_counter()
        report = verify(path)
        result["verify_seconds"] = round(time.perf_counter() - began, 1)
        result["verify_intact"] = report.intact
        print(f"verify: {report.events} events, {report.rows} rows, intact={report.intact}, "
              f"{result['verify_seconds']} s")
    with tempfile.TemporaryDirectory() as scratch:
        result["writer_rows_per_second"] = round(writer_throughput(Path(scratch) / "writer.db", 20_000))
    print(f"writer: {result['writer_rows_per_second']} row changes/s (insert+close, chained, 50 concurrent tasks)")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
