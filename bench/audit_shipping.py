"""Benchmark: how fast a node's audit backlog drains into PostgreSQL (#22 part 3). Not a test; run it by hand (as
root: it starts a throwaway PostgreSQL, testbed/postgres.py) and record the numbers.

    .venv/bin/python bench/audit_shipping.py                       # 20,000 sessions, 100,000 channels
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
from testbed.postgres import Postgres, unavailable  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=20_000)
    parser.add_argument("--channels", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2000)
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        sys.exit(f"cannot run: {reason}")
    with tempfile.TemporaryDirectory() as work, Postgres.create() as pg:
        database = Path(work) / "bastion.db"
        fill(database, args.sessions, args.channels, days=30, now=utc_now())
        url = pg.new_database("bench")
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
        print(f"shipped {head} events in {seconds:.2f}s: {head / seconds:,.0f} events/s (batch {args.batch}); "
              f"verify --store {verify_seconds:.2f}s, intact={report.intact}")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
