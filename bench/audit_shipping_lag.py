"""Benchmark: shipping lag under a login loop (#22 part 3). Not a test; run it by hand as root (a throwaway
PostgreSQL, testbed/postgres.py) with the OpenSSH client installed, and record the numbers.

    .venv/bin/python bench/audit_shipping_lag.py --logins 200 --parallel 4

A real `bastion serve` on loopback with audit_ship_to; `--parallel` OpenSSH clients log in and open a tunnel to an
echo server, `--logins` in all. Lag of an event = when PostgreSQL stored it (shipped_at, the batch's transaction
time) minus when the node wrote it (its `time`); printed as p50/p99/max, with the login rate.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from testbed.pg_trail import trail_migrated  # noqa: E402
from testbed.postgres import Postgres, unavailable  # noqa: E402


def bastion(home: Path, *args: str) -> None:
    subprocess.run([sys.executable, "-m", "bastion", "--home", str(home), *args], check=True, capture_output=True)


def echo_server() -> int:
    server = socket.create_server(("127.0.0.2", 0))

    def serve_one(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def serve() -> None:
        while True:
            conn, _ = server.accept()
            threading.Thread(target=serve_one, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logins", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=4)
    args = parser.parse_args()
    reason = unavailable()
    if reason:
        sys.exit(f"cannot run: {reason}")
    with tempfile.TemporaryDirectory() as work, Postgres.create() as pg:
        url = trail_migrated(pg.new_database("lag"))  # `bastion store migrate` (#22)
        home = Path(work) / "home"
        bastion(home, "init", "--listen", "127.0.0.1:0")
        config = home / "config.toml"
        config.write_text(config.read_text().replace('internal_networks = [', 'internal_networks = ["127.0.0.0/8", ')
                          .replace('audit_ship_to = ""', f'audit_ship_to = "{url}"')
                          .replace('node_id = ""', 'node_id = "lag-1"'))
        key = Path(work) / "id"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
        bastion(home, "user", "add", "alice", "--key", f"{key}.pub")
        port_echo = echo_server()
        policy = Path(work) / "policy.toml"
        policy.write_text(f'[users.alice]\nallow = ["127.0.0.2:{port_echo}"]\n')
        bastion(home, "policy", "apply", str(policy))
        proc = subprocess.Popen([sys.executable, "-m", "bastion", "--home", str(home), "serve"],
                                stderr=subprocess.PIPE, text=True)
        port = 0
        while not port:
            line = proc.stderr.readline()
            if "listening on" in line:
                port = int(line.rsplit(":", 1)[1].split()[0])
            elif not line:
                sys.exit("serve did not start")
        threading.Thread(target=proc.stderr.read, daemon=True).start()
        known = Path(work) / "known_hosts"
        known.write_text(f"[127.0.0.1]:{port} {' '.join((home / 'ssh_host_ed25519_key.pub').read_text().split()[:2])}\n")

        def login(_: int) -> None:
            subprocess.run(["ssh", "-F", "/dev/null", "-p", str(port), "-i", str(key), "-o", "BatchMode=yes",
                            "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known}",
                            "-W", f"127.0.0.2:{port_echo}", "alice@127.0.0.1"], input=b"ping\n", capture_output=True,
                           timeout=60, check=True)

        began = time.perf_counter()
        with ThreadPoolExecutor(args.parallel) as pool:
            list(pool.map(login, range(args.logins)))
        seconds = time.perf_counter() - began
        time.sleep(2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
        lags = [float(r[0]) for r in pg.sql("lag", "SELECT extract(epoch FROM shipped_at - time::timestamptz) "
                                                   "FROM audit_events")]
        lags.sort()
        result = {"logins": args.logins, "parallel": args.parallel, "logins_per_second": round(args.logins / seconds, 1),
                  "events": len(lags), "lag_p50_ms": round(statistics.median(lags) * 1000),
                  "lag_p99_ms": round(lags[int(len(lags) * 0.99) - 1] * 1000), "lag_max_ms": round(lags[-1] * 1000)}
        print(f"{args.logins} logins with a tunnel ({args.parallel} at once, {result['logins_per_second']}/s): "
              f"{len(lags)} events shipped, lag p50 {result['lag_p50_ms']} ms, p99 {result['lag_p99_ms']} ms, "
              f"max {result['lag_max_ms']} ms")
        print(json.dumps(result))


if __name__ == "__main__":
    main()
