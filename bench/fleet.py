"""Benchmark the fleet (#22 part 5): a node on the PostgreSQL store against one on SQLite, audit shipping, and
revocation across three nodes, in one run. Needs root (a throwaway PostgreSQL, testbed/postgres.py) and the
OpenSSH client; everything is on loopback.

    .venv/bin/python bench/fleet.py [--quick] [--json out.json] [--markdown out.md]
    .venv/bin/python bench/fleet.py --backlog-sessions 100000 --backlog-channels 1000000 --queries --only shipping

What runs, in this order (see bench/README.md, "Fleet"):

1. login: a node on PostgreSQL (store and audit_ship_to) and a node on its home's SQLite, same user, key and
   grant; real OpenSSH `ssh -W` logins carrying one line to an echo target, the two nodes taking turns.
2. opens: one asyncssh session held on each node; direct-tcpip opens to a target that speaks first, one at a
   time, in rounds that alternate the nodes; opens/s per round and the time of each open to its first byte.
3. lag: on the PostgreSQL node, OpenSSH logins and channel opens run at once for a while; lag of each event
   written meanwhile = when PostgreSQL stored it (shipped_at) minus when the node wrote it.
4. shipping: a backlog of events (bench/audit_queries.py's fill) drained by the real Shipper thread into a fresh
   database; events/s, where the CPU went (this process against PostgreSQL's), every event there.
5. revocation: three `bastion serve` on the one store, a live `ssh -W` on each; `bastion policy apply` (the
   CLI, on a home of its own) drops the grant; time from the commit (a LISTEN of the bench's own) to each
   tunnel's end. The grant comes back through the library between rounds.

The bastion runs from a copy of the package as committed (git HEAD), taken at the start, so edits others make
in the tree do not change it mid-run (`--bastion-src DIR` for another copy). The table goes to stdout, then
one line of JSON; progress to stderr. Exit 1 if a figure failed (an error, a lost event, a tunnel that did not
close); a missed target is marked in the table, not an error.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(BENCH))
sys.path.insert(1, str(ROOT))

TARGET_HOST = "127.0.0.2"  # the echo and hello targets; loopback, granted by the bench's policy
FIGURES = ("login", "opens", "lag", "shipping", "revocation")


@dataclass(frozen=True)
class Params:
    logins: int  # per node, taking turns
    open_rounds: int
    opens_per_round: int  # per node per round
    load_seconds: float
    load_logins: int  # OpenSSH logins at once during the load
    load_openers: int  # channel opens at once during the load
    backlog_sessions: int
    backlog_channels: int
    revocations: int
    verify: bool  # `verify --store` over the shipped backlog (about 17 s for 144,000 events here)


# A backlog of S sessions and C channels is about 2.2 S + C events (a session, 1.1 logins, 0.1 listeners each).
FULL = Params(logins=150, open_rounds=10, opens_per_round=100, load_seconds=20, load_logins=4, load_openers=4,
              backlog_sessions=14_000, backlog_channels=70_000, revocations=25, verify=False)
QUICK = Params(logins=40, open_rounds=4, opens_per_round=50, load_seconds=8, load_logins=4, load_openers=4,
               backlog_sessions=3_000, backlog_channels=15_000, revocations=6, verify=False)


@dataclass
class Row:
    figure: str
    measure: str
    unit: str
    better: str  # higher | lower
    pg: float | None
    sqlite: float | None = None
    ratio: float | None = None
    note: str = ""
    target: str = ""  # e.g. "ratio ≤ 1.10"; empty: none
    met: bool | None = None
    detail: dict[str, Any] = field(default_factory=dict)


# ---- pure helpers (bench/test_fleet.py) -------------------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, as bench/figures.py)."""
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def paired(first: list[float], second: list[float]) -> tuple[float, str]:
    """The median of the per-round (or per-pair) ratios first/second, and a note saying so with the ratio of
    the medians beside it: a round the whole machine ran slow in cancels in its own ratio (bench/figures.py)."""
    ratios = [a / b for a, b in zip(first, second)]
    of_medians = statistics.median(first) / statistics.median(second)
    median = statistics.median(ratios)
    return median, (f"paired: median of {len(ratios)} ratios {median:.2f} ({min(ratios):.2f}–{max(ratios):.2f}); "
                    f"of the medians {of_medians:.2f}")


def turns(count: int, names: tuple[str, str]) -> list[str]:
    """A B, B A, A B, …: each pair runs both, and neither always goes first (a warm cache, a busy moment)."""
    order: list[str] = []
    for i in range(count):
        order += list(names if i % 2 == 0 else names[::-1])
    return order


def fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def markdown(rows: list[Row], meta: dict[str, Any]) -> str:
    load = meta.get("loadavg", {})
    lines = [
        f"Machine: {meta.get('nproc')} cores ({meta.get('cpu')}), Linux {meta.get('kernel')}; {meta.get('openssh')}; "
        f"PostgreSQL {meta.get('postgresql')}; Python {meta.get('python')}. Date: {meta.get('date')}. "
        f"Mode: {meta.get('mode')}, {meta.get('seconds', 0):.0f} s. Bastion code: {meta.get('bastion_source')} "
        f"(digest {meta.get('bastion_digest')}). /proc/loadavg before: {load.get('before', '?')}, after: "
        f"{load.get('after', '?')}; other work on the machine during the run: "
        f"{meta.get('other_work_cpu_share', 0):.0%} of its CPU.",
        "",
        "| figure | measure | unit | PostgreSQL store | SQLite store | ratio | target | note |",
        "|---|---|---|---:|---:|---:|---|---|",
    ]
    for row in rows:
        ratio = "–" if row.ratio is None else f"{row.ratio:.2f}"
        target = "" if not row.target else f"{row.target}: {'met' if row.met else 'MISSED'}"
        note = row.note.replace("|", "\\|")
        lines.append(f"| {row.figure} | {row.measure} | {row.unit} ({row.better} is better) | {fmt(row.pg)} | "
                     f"{fmt(row.sqlite)} | {ratio} | {target} | {note} |")
    return "\n".join(lines) + "\n"


# ---- the bench's processes ----------------------------------------------------------------------------------


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def _serve_targets() -> None:
    """The targets (a child process, so their work is not the bench's): echo, and hello, which sends one byte
    at once and waits for the peer to close (bench/targets.py's, on free ports of TARGET_HOST)."""

    class Echo(asyncio.Protocol):
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            self.transport.write(data)

    class Hello(asyncio.Protocol):
        def connection_made(self, transport):  # type: ignore[no-untyped-def]
            transport.write(b"H")

    loop = asyncio.get_running_loop()
    echo = await loop.create_server(Echo, TARGET_HOST, 0, backlog=1024)
    hello = await loop.create_server(Hello, TARGET_HOST, 0, backlog=1024)
    print(json.dumps({"echo": echo.sockets[0].getsockname()[1], "hello": hello.sockets[0].getsockname()[1]}),
          flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the bench closes our stdin


def freeze_bastion(workdir: Path, source: Path | None) -> tuple[Path, str, str]:
    """A copy of the bastion package to run for the whole bench (others edit the tree meanwhile): git HEAD's,
    or `source`'s (a directory holding bastion/). Returns the directory to put first on PYTHONPATH, a digest
    of the copy and where it came from."""
    frozen = workdir / "src"
    frozen.mkdir()
    if source is None:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                                text=True, check=True).stdout.strip()
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", "HEAD", "bastion"], capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(frozen)], input=archive, check=True)
        origin = f"git HEAD {commit}"
    else:
        shutil.copytree(source / "bastion", frozen / "bastion", ignore=shutil.ignore_patterns("__pycache__"))
        origin = str(source)
    digest = hashlib.sha256()
    for path in sorted((frozen / "bastion").rglob("*.py")):
        digest.update(path.relative_to(frozen).as_posix().encode() + b"\0" + path.read_bytes())
    return frozen, digest.hexdigest()[:12], origin


class Lab:
    """The run's working directory, environment, targets and `bastion` commands."""

    def __init__(self, workdir: Path, src: Path) -> None:
        self.workdir = workdir
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("BASTION_")} | {"PYTHONPATH": str(src)}
        self.key = workdir / "alice"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "alice@bench", "-f", str(self.key)],
                       check=True)
        self.targets = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--serve-targets"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=workdir, env=self.env)
        assert self.targets.stdout is not None
        ports = json.loads(self.targets.stdout.readline())
        self.echo, self.hello = ports["echo"], ports["hello"]

    def bastion(self, home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """`bastion --home HOME ARGS…` from the frozen copy; raises with its output when it fails."""
        done = subprocess.run([sys.executable, "-m", "bastion", "--home", str(home), *args], capture_output=True,
                              text=True, timeout=timeout, cwd=self.workdir, env=self.env)
        if done.returncode != 0:
            raise RuntimeError(f"bastion {' '.join(args)} exited {done.returncode}: {done.stdout}{done.stderr}")
        return done

    def policy(self, allowed: bool) -> str:
        """alice with her key (so one `policy apply` sets a home up) and the targets, or the key alone."""
        key = " ".join(Path(f"{self.key}.pub").read_text().split()[:2])
        grant = f'"{TARGET_HOST}:{self.echo},{self.hello}"' if allowed else ""
        return f'[users.alice]\nkeys = ["{key}"]\nallow = [{grant}]\n'

    def home(self, name: str, like: Path | None = None, **settings: str) -> Path:
        """`bastion init` on loopback with the targets' network internal, or a copy of the home `like` (a node
        of the same fleet, sharing its host keys as nodes behind one load balancer do; an `init` costs two
        seconds of CPU here), then the given top-level settings."""
        home = self.workdir / name
        if like is None:
            self.bastion(home, "init", "--listen", "127.0.0.1:0")
            settings["internal_networks"] = ""
        else:
            shutil.copytree(like, home)
        config = home / "config.toml"
        lines = []
        for line in config.read_text().splitlines():
            key = line.split("=", 1)[0].strip()
            if key == "internal_networks" and "internal_networks" in settings:
                line = line.replace("[", '["127.0.0.0/8", ', 1)
            elif key in settings:
                line = f"{key} = {json.dumps(settings[key])}"
            lines.append(line)
        config.write_text("\n".join(lines) + "\n")
        return home

    def close(self) -> None:
        if self.targets.poll() is None:
            assert self.targets.stdin is not None
            self.targets.stdin.close()
            try:
                self.targets.wait(5)
            except subprocess.TimeoutExpired:
                self.targets.kill()
                self.targets.wait(5)


class Node:
    """One `bastion serve` on loopback, its log in a file, and alice's OpenSSH command line for it."""

    def __init__(self, lab: Lab, home: Path) -> None:
        self.lab, self.home, self.name = lab, home, home.name
        self.log_path = lab.workdir / f"{home.name}-serve.log"
        self.log_file = self.log_path.open("wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "bastion", "--home", str(home), "serve"],
                                     stdout=self.log_file, stderr=subprocess.STDOUT, cwd=lab.workdir, env=lab.env)
        self.port = 0
        deadline = time.monotonic() + 60
        while not self.port:
            for line in self.log_path.read_text(errors="replace").splitlines():
                if "listening on" in line:
                    self.port = int(line.rsplit(":", 1)[1].split()[0])
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{self.name}: serve did not start:\n{self.log_tail()}")
            time.sleep(0.05)
        known = lab.workdir / f"known_{home.name}"
        host_key = " ".join((home / "ssh_host_ed25519_key.pub").read_text().split()[:2])
        known.write_text(f"[127.0.0.1]:{self.port} {host_key}\n")
        self.ssh = ["ssh", "-F", "/dev/null", "-p", str(self.port), "-i", str(lab.key), "-o", "BatchMode=yes",
                    "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known}", "-o", "ConnectTimeout=10"]

    def echo(self) -> float:
        """One login: `ssh -W` carrying one line to the echo target, timed from exec to exit."""
        began = time.perf_counter()
        done = subprocess.run([*self.ssh, "-W", f"{TARGET_HOST}:{self.lab.echo}", "alice@127.0.0.1"],
                              input=b"hello\n", capture_output=True, timeout=30)
        seconds = time.perf_counter() - began
        if done.stdout != b"hello\n":
            raise RuntimeError(f"{self.name}: login failed ({done.returncode}): {done.stderr.decode()[-300:]}")
        return seconds

    def tunnel(self) -> subprocess.Popen | None:
        """A live `ssh -W` to the echo target that has carried one line; None if it was refused."""
        proc = subprocess.Popen([*self.ssh, "-W", f"{TARGET_HOST}:{self.lab.echo}", "alice@127.0.0.1"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(b"ping\n")
        proc.stdin.flush()
        if proc.stdout.readline() == b"ping\n":
            return proc
        proc.kill()
        proc.wait(10)
        return None

    async def session(self):  # type: ignore[no-untyped-def]
        import asyncssh

        return await asyncssh.connect("127.0.0.1", self.port, username="alice", known_hosts=None,
                                      client_keys=[str(self.lab.key)], agent_path=None)

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log_file.close()


def start_nodes(lab: Lab, homes: list[Path]) -> list[Node]:
    """`bastion serve` on each home at once; if one does not start, the others are stopped before raising."""
    with ThreadPoolExecutor(len(homes)) as pool:
        futures = [pool.submit(Node, lab, home) for home in homes]
        outcomes = [(f.result(), None) if f.exception() is None else (None, f.exception()) for f in futures]
    failure = next((error for _, error in outcomes if error is not None), None)
    if failure is not None:
        for node, _ in outcomes:
            if node is not None:
                node.stop()
        raise failure
    return [node for node, _ in outcomes if node is not None]


async def open_one(conn, port: int) -> float:  # type: ignore[no-untyped-def]
    """One direct-tcpip open to the hello target, timed to its first byte; the channel is closed after."""
    began = time.perf_counter()
    reader, writer = await conn.open_connection(TARGET_HOST, port)
    if await asyncio.wait_for(reader.readexactly(1), 30) != b"H":
        raise RuntimeError("no first byte from the hello target")
    seconds = time.perf_counter() - began
    writer.close()
    return seconds


# ---- the figures -------------------------------------------------------------------------------------------


class Fleet:
    """The run: PostgreSQL, the targets, the PostgreSQL and SQLite nodes; each figure a method giving rows."""

    def __init__(self, lab: Lab, pg: Any, params: Params) -> None:
        self.lab, self.pg, self.params = lab, pg, params
        self.node_id = "fleet-pg"
        self.nodes: dict[str, Node] = {}

    def setup(self) -> None:
        """The store, the audit trail, the homes and the two nodes (not needed by the shipping figure)."""
        if self.nodes:
            return
        lab, pg = self.lab, self.pg
        self.store_url = migrated(pg.new_database("store"), "store")
        self.audit_url = migrated(pg.new_database("audit"), "audit")
        began = time.monotonic()
        grant = lab.workdir / "grant.toml"
        grant.write_text(lab.policy(True))

        with ThreadPoolExecutor(2) as pool:
            self.pg_home, self.sqlite_home = pool.map(lambda args: lab.home(args[0], **args[1]), [
                ("pg", {"store": self.store_url, "audit_ship_to": self.audit_url, "node_id": self.node_id}),
                ("sqlite", {})])
            # the CLI's home and the revocation's two other nodes: copies of the first node without its shipping
            self.admin, self.b_home, self.c_home = (
                lab.home(name, like=self.pg_home, audit_ship_to="", node_id="") for name in ("admin", "pg-b", "pg-c"))
            # alice, her key and her grant: on the SQLite home, and through admin on the store
            list(pool.map(lambda home: lab.bastion(home, "policy", "apply", str(grant)), [self.admin, self.sqlite_home]))
        self.nodes = dict(zip(("postgresql", "sqlite"), start_nodes(lab, [self.pg_home, self.sqlite_home])))
        log(f"homes and nodes ready in {time.monotonic() - began:.1f} s (2 `bastion init`, 2 `policy apply`)")

    def close(self) -> None:
        for node in self.nodes.values():
            node.stop()

    # 1. login latency

    def login(self) -> list[Row]:
        p = self.params
        times: dict[str, list[float]] = {name: [] for name in self.nodes}
        for node in self.nodes.values():  # warm up: first logins load code and fill caches
            for _ in range(3):
                node.echo()
        for name in turns(p.logins, ("postgresql", "sqlite")):
            times[name].append(self.nodes[name].echo())
        pg, lite = times["postgresql"], times["sqlite"]
        pair_ratio, pair_note = paired(pg, lite)
        rows = []
        for q in (50, 99):
            a, b = percentile(pg, q) * 1000, percentile(lite, q) * 1000
            note = f"n={len(pg)} each, taking turns; OpenSSH `ssh -W` carrying one line, exec to exit"
            if q == 50:
                note += f"; {pair_note}"
            rows.append(Row("login", f"login latency p{q}", "ms", "lower", a, b, a / b, note,
                            target="ratio ≤ 1.10" if q == 50 else "", met=(a / b <= 1.10) if q == 50 else None,
                            detail={"pair_ratio": pair_ratio} if q == 50 else {}))
        rows[0].detail["samples_ms"] = {k: [round(v * 1000, 2) for v in t] for k, t in times.items()}
        return rows

    # 2. channel-open rate

    def opens(self) -> list[Row]:
        return asyncio.run(self._opens())

    async def _opens(self) -> list[Row]:
        p = self.params
        conns = {name: await node.session() for name, node in self.nodes.items()}
        rates: dict[str, list[float]] = {name: [] for name in conns}
        samples: dict[str, list[float]] = {name: [] for name in conns}
        try:
            for conn in conns.values():
                for _ in range(20):
                    await open_one(conn, self.lab.hello)
            for name in turns(p.open_rounds, ("postgresql", "sqlite")):
                began = time.perf_counter()
                for _ in range(p.opens_per_round):
                    samples[name].append(await open_one(conns[name], self.lab.hello))
                rates[name].append(p.opens_per_round / (time.perf_counter() - began))
        finally:
            for conn in conns.values():
                conn.close()
                await conn.wait_closed()
        ratio, note = paired(rates["postgresql"], rates["sqlite"])
        rows = [Row("opens", "channel opens/s, one at a time", "/s", "higher", statistics.median(rates["postgresql"]),
                    statistics.median(rates["sqlite"]), ratio,
                    f"{p.open_rounds} rounds of {p.opens_per_round} per node, alternating; {note}",
                    target="ratio ≥ 0.90", met=ratio >= 0.90, detail={"rates": rates})]
        for q in (50, 99):
            a, b = percentile(samples["postgresql"], q) * 1000, percentile(samples["sqlite"], q) * 1000
            rows.append(Row("opens", f"channel open to first byte p{q}", "ms", "lower", a, b, a / b,
                            f"n={len(samples['sqlite'])} each, pooled; asyncssh client, one session per node"))
        return rows

    # 3. shipping lag under load

    def lag(self) -> list[Row]:
        from bastion.clock import iso, utc_now

        p = self.params
        node = self.nodes["postgresql"]
        began_at = iso(utc_now())
        deadline = time.monotonic() + p.load_seconds
        logins = [0]
        lock = threading.Lock()

        def login_loop() -> None:
            while time.monotonic() < deadline:
                node.echo()
                with lock:
                    logins[0] += 1

        async def opens() -> int:
            conn = await node.session()
            count = 0

            async def worker() -> None:
                nonlocal count
                while time.monotonic() < deadline:
                    await open_one(conn, self.lab.hello)
                    count += 1

            try:
                await asyncio.gather(*(worker() for _ in range(p.load_openers)))
            finally:
                conn.close()
                await conn.wait_closed()
            return count

        started = time.monotonic()
        with ThreadPoolExecutor(p.load_logins) as pool:
            futures = [pool.submit(login_loop) for _ in range(p.load_logins)]
            channels = asyncio.run(opens())
            for future in futures:
                future.result()
        seconds = time.monotonic() - started
        ended_at = iso(utc_now())
        local = sqlite3.connect(f"file:{self.pg_home / 'bastion.db'}?mode=ro", uri=True)
        try:
            head = local.execute("SELECT max(seq) FROM audit_events").fetchone()[0]
        finally:
            local.close()
        wait = time.monotonic()
        while (self.pg.sql("audit", "SELECT coalesce(max(seq), 0) FROM audit_events WHERE node = %s",
                           (self.node_id,))[0][0] < head):
            if time.monotonic() - wait > 60:
                raise RuntimeError(f"CHECK FAILED: the node's events up to seq {head} did not all reach PostgreSQL")
            time.sleep(0.1)
        lags = [float(r[0]) * 1000 for r in self.pg.sql(
            "audit", "SELECT extract(epoch FROM shipped_at - time::timestamptz) FROM audit_events "
                     "WHERE node = %s AND time >= %s AND time <= %s", (self.node_id, began_at, ended_at))]
        if not lags:
            raise RuntimeError("CHECK FAILED: no event written during the load reached PostgreSQL")
        load = (f"{len(lags)} events in {seconds:.0f} s ({len(lags) / seconds:.0f}/s) from {logins[0]} OpenSSH logins "
                f"({logins[0] / seconds:.0f}/s, {p.load_logins} at once) and {channels} channel opens "
                f"({channels / seconds:.0f}/s, {p.load_openers} at once) on the PostgreSQL node")
        return [Row("lag", f"shipping lag p{q}", "ms", "lower", percentile(lags, q), note=load if q == 50 else
                    "event written (node's clock) to stored in PostgreSQL (shipped_at); same machine clock",
                    detail={"events": len(lags), "logins": logins[0], "channels": channels, "seconds": seconds}
                    if q == 50 else {}) for q in (50, 99)] + [
            Row("lag", "shipping lag max", "ms", "lower", max(lags))]

    # 4. shipping throughput

    def shipping(self, batch: int, days: int, queries: bool) -> list[Row]:
        import psutil

        from audit_queries import fill
        from bastion.audit import fleet
        from bastion.audit.shipper import Shipper
        from bastion.clock import utc_now

        p = self.params
        database = self.lab.workdir / "backlog.db"
        filling = time.monotonic()
        fill(database, p.backlog_sessions, p.backlog_channels, days=days, now=utc_now())
        log(f"  filled {database.name} in {time.monotonic() - filling:.1f} s")
        url = migrated(self.pg.new_database("backlog"), "audit")
        local = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
        head, head_hash = local.execute("SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1").fetchone()
        local.close()
        postmaster = psutil.Process(int((self.pg.data / "postmaster.pid").read_text().split()[0]))

        def pg_cpu() -> float:
            own = postmaster.cpu_times()
            total = own.user + own.system + own.children_user + own.children_system
            for child in postmaster.children():
                try:
                    times = child.cpu_times()
                    total += times.user + times.system
                except psutil.NoSuchProcess:
                    pass
            return total

        shipper = Shipper(database, url, "backlog-1", batch=batch, poll=0.01)
        cpu0, pg0 = time.process_time(), pg_cpu()
        began = time.perf_counter()
        shipper.start()
        try:
            while shipper.shipped.seq < head:
                if shipper.last_error:
                    raise RuntimeError(f"shipping failed: {shipper.last_error}")
                time.sleep(0.005)
            seconds = time.perf_counter() - began
            cpu, pg = time.process_time() - cpu0, pg_cpu() - pg0
        finally:
            shipper.stop()
        count, last = self.pg.sql("backlog", "SELECT count(*), max(seq) FROM audit_events WHERE node = 'backlog-1'")[0]
        stored_hash = self.pg.sql("backlog", "SELECT hash FROM audit_events WHERE node = 'backlog-1' AND seq = %s",
                                  (last,))[0][0]
        check = "" if (count, last, stored_hash) == (head, head, head_hash) else (
            f"CHECK FAILED: PostgreSQL holds {count} events up to {last}, the backlog {head}; ")
        rate = head / seconds
        rows = [Row("shipping", "audit shipping, backlog drained", "events/s", "higher", rate,
                    note=f"{check}{head:,} events ({p.backlog_sessions:,} sessions, {p.backlog_channels:,} channels), "
                         f"batch {batch}, {seconds:.1f} s; CPU: shipper thread (this process) {cpu:.1f} s, "
                         f"PostgreSQL {pg:.1f} s; every event there, the head's hash the same",
                    target="≥ 10,000/s", met=rate >= 10_000,
                    detail={"events": head, "seconds": seconds, "bench_cpu": cpu, "postgresql_cpu": pg})]
        if p.verify:
            conn = fleet.open_store(url)
            try:
                began = time.perf_counter()
                report = fleet.verify(conn)
                rows.append(Row("shipping", "audit verify --store over the backlog", "s", "lower",
                                time.perf_counter() - began,
                                note=("" if report.intact else "CHECK FAILED: ") + f"intact={report.intact}"))
            finally:
                conn.close()
        if queries:
            rows += time_queries(database, url)
        return rows

    # 5. revocation across three nodes

    def revocation(self) -> list[Row]:
        import psycopg

        from bastion.policy.file import parse_policy
        from bastion.store.dialect import CHANNEL
        from bastion.store.sqlite import Store

        p = self.params
        others = start_nodes(self.lab, [self.b_home, self.c_home])
        nodes = [self.nodes["postgresql"], *others]
        fifo = self.lab.workdir / "revoke.toml"  # the CLI reads its policy file from here: see pending_cli
        os.mkfifo(fifo)
        listener = psycopg.connect(self.store_url, autocommit=True)
        listener.execute(f"LISTEN {CHANNEL}")
        store = Store(self.store_url)
        restore = parse_policy(self.lab.policy(True))
        from_commit: list[float] = []
        from_write: list[float] = []
        cli_waits: list[float] = []  # how long a round waited for the CLI's start-up after its tunnels were up
        cli = None

        def pending_cli() -> subprocess.Popen:
            """`bastion policy apply FIFO` started ahead: it loads (about 2 s of interpreter start-up and imports
            on this machine) and then blocks opening the FIFO until the round writes the policy into it, so the
            round waits only on what the CLI does after reading its file, and no CLI is starting up meanwhile."""
            return subprocess.Popen([sys.executable, "-m", "bastion", "--home", str(self.admin), "policy", "apply",
                                     str(fifo)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=self.lab.workdir,
                                    env=self.lab.env)

        try:
            cli = pending_cli()
            for round_number in range(p.revocations):
                tunnels = self._tunnels(nodes)
                list(listener.notifies(timeout=0.01))  # the restore's, drained
                version = store.policy_version()  # the revocation's NOTIFY carries a later one
                closed: list[float] = []
                lock = threading.Lock()

                def watch(proc: subprocess.Popen) -> None:
                    try:
                        proc.wait(timeout=30)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        return
                    with lock:
                        closed.append(time.monotonic())

                watchers = [threading.Thread(target=watch, args=(t,)) for t in tunnels]
                for w in watchers:
                    w.start()
                ready = time.monotonic()
                with open(fifo, "w") as out:  # blocks until the CLI has started and opens its policy file
                    written = time.monotonic()
                    cli_waits.append(written - ready)
                    out.write(self.lab.policy(False))
                committed = None
                for note in listener.notifies(timeout=30):
                    if not note.payload.isdigit() or int(note.payload) > version:
                        committed = time.monotonic()
                        break
                if committed is None:
                    raise RuntimeError("CHECK FAILED: no NOTIFY of the revocation within 30 s")
                out_text, err_text = cli.communicate(timeout=60)
                if cli.returncode != 0:
                    raise RuntimeError(f"policy apply exited {cli.returncode}: {out_text.decode()}{err_text.decode()}")
                for w in watchers:
                    w.join(timeout=35)
                if len(closed) != len(tunnels):
                    raise RuntimeError(f"CHECK FAILED: round {round_number + 1}: {len(tunnels) - len(closed)} of "
                                       f"{len(tunnels)} tunnels stayed open after the revocation")
                from_commit += [t - committed for t in closed]
                from_write += [t - written for t in closed]
                cli = pending_cli()  # loads while the grant comes back and the next tunnels open
                store.apply_policy(restore)
        finally:
            if cli is not None and cli.poll() is None:
                cli.kill()
                cli.wait(10)
            store.close()
            listener.close()
            for node in others:
                node.stop()
        ms = [t * 1000 for t in from_commit]
        note = (f"{p.revocations} rounds, {len(ms)} tunnels (OpenSSH `ssh -W`, one per node); `bastion policy apply` "
                "dropping the grant, from the commit (NOTIFY seen by the bench's LISTEN) to the client's exit")
        return [Row("revocation", "revocation to tunnel closed, 3 nodes, p50", "ms", "lower", percentile(ms, 50),
                    note=note, detail={"from_commit_ms": [round(v, 1) for v in ms],
                                       "from_cli_reading_file_ms": [round(v * 1000, 1) for v in from_write],
                                       "waited_for_cli_start_s": [round(v, 2) for v in cli_waits]}),
                Row("revocation", "revocation to tunnel closed, 3 nodes, p99", "ms", "lower", percentile(ms, 99),
                    target="< 1,000 ms", met=percentile(ms, 99) < 1000,
                    note=f"from the CLI reading its policy file: p50 {percentile(from_write, 50) * 1000:.0f} ms, "
                         f"p99 {percentile(from_write, 99) * 1000:.0f} ms (its store connection, plan and commit)"),
                Row("revocation", "revocation to tunnel closed, 3 nodes, max", "ms", "lower", max(ms))]

    def _tunnels(self, nodes: list[Node], timeout: float = 20) -> list[subprocess.Popen]:
        """A live tunnel on each node, retried until the node has the grant back (it learns of it by NOTIFY)."""
        deadline = time.monotonic() + timeout
        tunnels: list[subprocess.Popen] = []
        for node in nodes:
            while (tunnel := node.tunnel()) is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"CHECK FAILED: {node.name} did not take the grant back within {timeout} s")
                time.sleep(0.02)
            tunnels.append(tunnel)
        return tunnels


def migrated(url: str, schema: str) -> str:
    """The store's schema (what `bastion store migrate` makes), or the audit trail's, in a fresh database."""
    from testbed.pg_store import migrated as store_migrated
    from testbed.pg_trail import trail_migrated

    return store_migrated(url) if schema == "store" else trail_migrated(url)


def time_queries(database: Path, url: str) -> list[Row]:
    """`--queries`: the query shapes of bench/audit_queries.py through `audit … --store`'s code (fleet.select)
    on the shipped backlog: the median of 3 warm runs, the first run and the rows found in the note."""
    from audit_queries import sample_of, timed
    from bastion.audit import fleet
    from bastion.audit.query import COLUMNS, make_filters

    sample = sample_of(database)
    user, host, net24, net16, name, sid = (sample[k] for k in ("user", "host", "net24", "net16", "name", "session"))
    shapes = [
        ("channels", {"user": user, "since": "1d"}), ("channels", {"user": user, "since": "7d"}),
        ("channels", {"target": host, "since": "7d"}), ("channels", {"target": net24, "since": "7d"}),
        ("channels", {"target": f"{net16}:22", "since": "1d"}), ("channels", {"target": "10.0.0.0/8", "since": "1h"}),
        ("channels", {"target": name, "since": "7d"}), ("channels", {"target": "*.corp.internal:5432", "since": "1d"}),
        ("channels", {"denied": True, "since": "1d"}), ("channels", {"denied": True, "since": "7d"}),
        ("channels", {"session": sid}), ("channels", {"limit": 100}),
        ("channels", {"client": "203.0.113.0/24", "since": "1d"}),
        ("sessions", {"user": user, "since": "7d"}), ("sessions", {"denied": True, "since": "1d"}),
        ("sessions", {"target": host, "since": "7d"}), ("sessions", {"client": "203.0.113.0/24", "since": "1d"}),
        ("auth", {"denied": True, "since": "1d"}), ("auth", {"user": user, "since": "7d"}),
        ("listeners", {"user": user, "since": "30d"}),
    ]
    conn = fleet.open_store(url)
    conn.execute("ANALYZE")
    rows = []
    try:
        for table, spelled in shapes:
            label = " ".join([table] + [f"--{k}" if v is True else f"--{k} {v}" for k, v in spelled.items()])
            filters = make_filters(**spelled)
            first, median, found = timed(lambda: sum(1 for _ in fleet.select(conn, table, filters, COLUMNS[table])), 3)
            rows.append(Row("queries", f"audit {label} --store", "ms", "lower", median,
                            note=f"first run {first:.1f} ms; {found} rows"))
    finally:
        conn.close()
    return rows


# ---- the run ------------------------------------------------------------------------------------------------


def print_table(rows: list[Row], meta: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"bastion fleet: PostgreSQL store against SQLite — {meta['nproc']} cores, {meta['date']}, "
                        f"load {meta['loadavg']['before']} → {meta['loadavg']['after']}")
    for name, justify in (("figure", "left"), ("measure", "left"), ("unit", "left"), ("PostgreSQL store", "right"),
                          ("SQLite store", "right"), ("ratio", "right"), ("target", "left"), ("note", "left")):
        table.add_column(name, justify=justify, overflow="fold")
    for row in rows:
        target = "" if not row.target else f"{row.target}: [{'green' if row.met else 'red'}]" \
                                           f"{'met' if row.met else 'MISSED'}[/]"
        table.add_row(row.figure, row.measure, f"{row.unit} ({row.better} is better)", fmt(row.pg), fmt(row.sqlite),
                      "–" if row.ratio is None else f"{row.ratio:.2f}", target, row.note)
    Console(width=220).print(table)


def machine_meta() -> dict[str, Any]:
    import datetime
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"), "nproc": os.cpu_count(),
            "cpu": cpu, "kernel": platform.release(), "python": platform.python_version(),
            "openssh": subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()}


def busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (user, nice, system; /proc/stat)."""
    ticks = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:4]
    return sum(int(t) for t in ticks) / os.sysconf("SC_CLK_TCK")


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer logins, opens and rounds, a smaller backlog "
                                                             "(about a minute)")
    parser.add_argument("--only", default="", help=f"comma list of figures: {','.join(FIGURES)}")
    parser.add_argument("--json", type=Path, help="write every sample and the table as JSON to this file")
    parser.add_argument("--markdown", type=Path, help="write the table as Markdown (for bench/README.md)")
    parser.add_argument("--bastion-src", type=Path, help="run the bastion package in DIR/bastion instead of git HEAD's")
    parser.add_argument("--backlog-sessions", type=int, help="the shipping backlog's sessions (14,000; quick 3,000)")
    parser.add_argument("--backlog-channels", type=int, help="its channels (70,000; quick 15,000); events: about "
                                                             "2.2 per session and 1 per channel")
    parser.add_argument("--batch", type=int, default=2000, help="the shipper's batch (its default: 2000)")
    parser.add_argument("--days", type=int, default=90, help="the backlog's span in days (audit_queries.py's: 90)")
    parser.add_argument("--verify", action="store_true", help="then `audit verify --store` over the shipped backlog")
    parser.add_argument("--queries", action="store_true", help="then time the audit query shapes with --store on it")
    parser.add_argument("--logins", type=int, help="logins per node (150; quick 40)")
    parser.add_argument("--revocations", type=int, help="revocation rounds (25; quick 6)")
    parser.add_argument("--serve-targets", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_targets:
        asyncio.run(_serve_targets())
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(FIGURES)
    if unknown := [n for n in names if n not in FIGURES]:
        parser.error(f"unknown figure(s) {unknown}; choose from {','.join(FIGURES)}")
    from testbed.postgres import Postgres, unavailable

    if reason := unavailable():
        log(f"bench/fleet.py cannot run: {reason}")
        return 2
    if shutil.which("ssh") is None:
        log("bench/fleet.py needs the OpenSSH client (ssh)")
        return 2
    base = QUICK if args.quick else FULL
    params = Params(**{**asdict(base), **{k: v for k, v in {
        "backlog_sessions": args.backlog_sessions, "backlog_channels": args.backlog_channels,
        "logins": args.logins, "revocations": args.revocations, "verify": args.verify or None}.items()
        if v is not None}})
    meta = machine_meta() | {"mode": "quick" if args.quick else "full", "params": asdict(params),
                             "loadavg": {"before": loadavg()}}
    rows: list[Row] = []
    errors: dict[str, str] = {}
    timings: dict[str, float] = {}
    started, busy0 = time.monotonic(), busy_seconds()
    own0 = sum(os.times()[:4])
    pg_cpu = 0.0
    workdir = Path(tempfile.mkdtemp(prefix="bt-fleet-", dir="/var/tmp"))  # on disk, as a node's home would be
    try:
        src, meta["bastion_digest"], meta["bastion_source"] = freeze_bastion(workdir, args.bastion_src)
        sys.path.insert(0, str(src))  # this process's own bastion imports (Shipper, Store) use the copy too
        import bastion

        if not bastion.__file__.startswith(str(src)):
            raise RuntimeError(f"imported {bastion.__file__}, not the frozen copy in {src}")
        log(f"bench in {workdir} ({meta['mode']}); bastion from {meta['bastion_source']}, digest "
            f"{meta['bastion_digest']}; load {meta['loadavg']['before']}")
        lab = Lab(workdir, src)
        try:
            with Postgres.create() as pg:
                meta["postgresql"] = pg.sql("postgres", "SHOW server_version")[0][0]
                log(f"PostgreSQL {meta['postgresql']} on 127.0.0.1:{pg.port} ({pg.root}), fsync off")
                fleet = Fleet(lab, pg, params)
                try:
                    for name in names:
                        log(f"{name} …")
                        t0 = time.monotonic()
                        try:
                            if name == "shipping":
                                rows += fleet.shipping(args.batch, args.days, args.queries)
                            else:
                                fleet.setup()
                                rows += getattr(fleet, name)()
                        except Exception as exc:  # one broken figure must not lose the others' numbers
                            errors[name] = f"{type(exc).__name__}: {exc}"
                            log(f"{name} failed: {errors[name]}")
                            for node in fleet.nodes.values():
                                if node.proc.poll() is not None:
                                    log(f"{node.name} exited {node.proc.returncode}:\n{node.log_tail()}")
                        timings[name] = round(time.monotonic() - t0, 1)
                        log(f"{name}: {timings[name]} s; load {loadavg()}")
                finally:
                    fleet.close()
                    import psutil

                    try:
                        postmaster = psutil.Process(int((pg.data / "postmaster.pid").read_text().split()[0]))
                        t = postmaster.cpu_times()
                        pg_cpu = t.user + t.system + t.children_user + t.children_system + sum(
                            c.cpu_times().user + c.cpu_times().system for c in postmaster.children())
                    except (OSError, psutil.Error):
                        pass
        finally:
            lab.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta["seconds"] = round(time.monotonic() - started, 1)
    meta["loadavg"]["after"] = loadavg()
    own = sum(os.times()[:4]) - own0 + pg_cpu
    meta["other_work_cpu_share"] = round(max(0.0, busy_seconds() - busy0 - own) / (meta["seconds"] * (os.cpu_count()
                                                                                                      or 1)), 3)
    meta["figure_seconds"] = timings
    print_table(rows, meta)
    report = {"machine": meta, "errors": errors, "rows": [asdict(r) for r in rows]}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(rows, meta))
    print(json.dumps({"machine": meta, "errors": errors,
                      "rows": [{k: v for k, v in asdict(r).items() if k != "detail"} for r in rows]}, default=str))
    failed = [r.measure for r in rows if r.note.startswith("CHECK FAILED")]
    log(f"done in {meta['seconds']:.0f} s" + (f"; failed: {', '.join([*errors, *failed])}" if errors or failed else "")
        + (f"; targets missed: {', '.join(r.measure for r in rows if r.met is False)}"
           if any(r.met is False for r in rows) else ""))
    return 1 if errors or failed else 0


if __name__ == "__main__":
    sys.exit(main())
