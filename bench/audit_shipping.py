"""Benchmark: how fast a node's audit backlog drains into PostgreSQL (#22 part 3). Not a test; run it by hand (as
root: it starts a throwaway PostgreSQL, testbed/postgres.py) and record the numbers.

    .venv/bin/python bench/audit_shipping.py                       # 20,000 sessions, 100,000 channels, 90 days
    .venv/bin/python bench/audit_shipping.py --sessions 2000 --channels 10000 --batch 500

Fills an SQLite file with a valid chain (bench/audit_queries.py's fill: one event per row), then lets the real
Shipper thread drain it all — the backlog a node builds while PostgreSQL is away — and prints events per second,
then `verify` over the shipped chain. PostgreSQL runs with fsync off (a throwaway cluster), so this measures the
shipper, not the disk.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bastion.audit import fleet  # noqa: E402
from bastion.audit.shipper import Shipper  # noqa: E402
from bastion.clock import utc_now  # noqa: E402
from bench.audit_queries import fill  # noqa: E402
from testbed.pg_trail import trail_migrated  # noqa: E402
from testbed.postgres import Postgres, unavailable  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=20_000)
    parser.add_argument("--channels", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2000)
    parser.add_argument("--days", type=int, default=90, help="the span of the log (audit_queries.py's: 90)")
    parser.add_argument("--queries", action="store_true", help="then time the audit query shapes with --store")
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        sys.exit(f"cannot run: {reason}")
    with tempfile.TemporaryDirectory() as work, Postgres.create() as pg:
        database = Path(work) / "bastion.db"
        fill(database, args.sessions, args.channels, days=args.days, now=utc_now())
        url = trail_migrated(pg.new_database("bench"))  # `bastion store migrate` (#22)
        shipper = Shipper(database, url, "bench-1", batch=args.batch, poll=0.01)
        head = sqlite3.connect(database).execute("SELECT max(seq) FROM audit_events").fetchone()[0]
        began = time.perf_counter()
        shipper.start()
        while shipper.shipped.seq < head:
            if shipper.last_error:
                sys.exit(f"shipping failed: {shipper.last_error}")
            time.sleep(0.005)
        seconds = time.perf_counter() - began
        shipper.stop()
        conn = fleet.open_store(url)
        try:
            began = time.perf_counter()
            report = fleet.verify(conn)
            verify_seconds = time.perf_counter() - began
        finally:
            conn.close()
        result = {"events": head, "batch": args.batch, "seconds": round(seconds, 2),
                  "events_per_second": round(head / seconds), "verify_seconds": round(verify_seconds, 2),
                  "intact": report.intact}
        if args.queries:
            result["queries"] = time_queries(database, url)
        print(f"shipped {head} events in {seconds:.2f}s: {head / seconds:,.0f} events/s (batch {args.batch}); "
              f"verify --store {verify_seconds:.2f}s, intact={report.intact}")
        print(json.dumps(result))


def time_queries(database: Path, url: str) -> dict[str, dict[str, float]]:
    """The query shapes of bench/audit_queries.py, through `audit … --store`'s code (fleet.select): ms of the
    first run and the median of 3 warm ones, and the rows found."""
    from bastion.audit.query import COLUMNS, make_filters
    from bench.audit_queries import sample_of, timed

    sample = sample_of(database)
    user, host, net24, net16, name, sid = (sample[k] for k in ("user", "host", "net24", "net16", "name", "session"))
    shapes = [
        (f"channels --user {user} --since 1d", "channels", {"user": user, "since": "1d"}),
        (f"channels --user {user} --since 7d", "channels", {"user": user, "since": "7d"}),
        (f"channels --target {host} --since 7d", "channels", {"target": host, "since": "7d"}),
        (f"channels --target {net24} --since 7d", "channels", {"target": net24, "since": "7d"}),
        (f"channels --target {net16}:22 --since 1d", "channels", {"target": f"{net16}:22", "since": "1d"}),
        ("channels --target 10.0.0.0/8 --since 1h", "channels", {"target": "10.0.0.0/8", "since": "1h"}),
        (f"channels --target {name} --since 7d", "channels", {"target": name, "since": "7d"}),
        ("channels --target *.corp.internal:5432 --since 1d", "channels", {"target": "*.corp.internal:5432",
                                                                           "since": "1d"}),
        ("channels --denied --since 1d", "channels", {"denied": True, "since": "1d"}),
        ("channels --denied --since 7d", "channels", {"denied": True, "since": "7d"}),
        (f"channels --session {sid}", "channels", {"session": sid}),
        ("channels --limit 100", "channels", {"limit": 100}),
        ("channels --client 203.0.113.0/24 --since 1d", "channels", {"client": "203.0.113.0/24", "since": "1d"}),
        (f"sessions --user {user} --since 7d", "sessions", {"user": user, "since": "7d"}),
        ("sessions --denied --since 1d", "sessions", {"denied": True, "since": "1d"}),
        (f"sessions --target {host} --since 7d", "sessions", {"target": host, "since": "7d"}),
        ("sessions --client 203.0.113.0/24 --since 1d", "sessions", {"client": "203.0.113.0/24", "since": "1d"}),
        ("auth --denied --since 1d", "auth", {"denied": True, "since": "1d"}),
        (f"auth --user {user} --since 7d", "auth", {"user": user, "since": "7d"}),
        (f"listeners --user {user} --since 30d", "listeners", {"user": user, "since": "30d"}),
    ]
    conn = fleet.open_store(url)
    conn.execute("ANALYZE")
    results = {}
    try:
        for label, table, spelled in shapes:
            filters = make_filters(**spelled)
            first, median, rows = timed(lambda: sum(1 for _ in fleet.select(conn, table, filters, COLUMNS[table])), 3)
            results[label] = {"first_ms": round(first, 1), "median_ms": round(median, 1), "rows": rows}
            print(f"{label:<60} {first:9.1f} {median:9.1f} ms {rows:8d} rows")
    finally:
        conn.close()
    return results


if __name__ == "__main__":
    main()
