"""Benchmark: login latency on a node whose store is PostgreSQL against one on the home's SQLite (#22 part 2).
Not a test; run it by hand as root (a throwaway PostgreSQL, testbed/postgres.py) and record the numbers.

    .venv/bin/python bench/store_login.py                 # 60 logins per node, interleaved
    .venv/bin/python bench/store_login.py --logins 200

Two `bastion serve` on loopback with the same user, key and grant, one per store. Each login is a real OpenSSH
`ssh -W` to an echo server carrying one line, timed from the client's start to its exit; the two nodes take turns so
that a busy machine slows both alike. A PostgreSQL node reads keys and policy from memory (store/cached.py), so the
two should be within noise of each other.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.pg_store import migrated  # noqa: E402
from testbed.postgres import Postgres, unavailable  # noqa: E402
from tests.integration.test_pg_store import Node, bastion, grant, keygen, make_home, ok  # noqa: E402


def echo_server() -> tuple[int, object]:
    import socket

    server = socket.create_server(("127.0.0.2", 0))

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1], server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--logins", type=int, default=60)
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        print(f"cannot run: {reason}", file=sys.stderr)
        return 2
    port, server = echo_server()
    with tempfile.TemporaryDirectory(prefix="bt-store-login-") as tmp_name, Postgres.create() as pg:
        tmp = Path(tmp_name)
        url = migrated(pg.new_database("bench"))
        key = keygen(tmp / "alice")
        homes = {"sqlite": make_home(tmp / "sqlite"), "postgresql": make_home(tmp / "pg", store=url)}
        for home in homes.values():
            ok(bastion(home, "user", "add", "alice", "--key", f"{key}.pub"))
            ok(bastion(home, "policy", "apply", str(grant(tmp, port, True))))
        nodes = {name: Node(home, key, tmp) for name, home in homes.items()}
        times: dict[str, list[float]] = {name: [] for name in nodes}
        try:
            for name, node in nodes.items():  # warm up
                assert node.echo(port).stdout == b"hello\n"
            for _ in range(args.logins):
                for name, node in nodes.items():
                    started = time.perf_counter()
                    done = node.echo(port)
                    times[name].append(time.perf_counter() - started)
                    assert done.stdout == b"hello\n", done.stderr
        finally:
            for node in nodes.values():
                node.stop()
            server.close()  # type: ignore[attr-defined]
    result = {name: {"median_ms": round(statistics.median(t) * 1000, 1),
                     "p90_ms": round(sorted(t)[int(0.9 * (len(t) - 1))] * 1000, 1)} for name, t in times.items()}
    result["ratio_median"] = round(result["postgresql"]["median_ms"] / result["sqlite"]["median_ms"], 3)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
