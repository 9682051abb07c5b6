"""Load and faults, measured (issue #5). Not in the default run (marked `slow`); one command runs it:

    BASTION_LOAD=1 .venv/bin/python -m pytest tests/load -q -s

Scenario, in the testbed's own namespaces (nothing leaves this machine):

1. A fresh bastion in gw with 10 users, each granted the echo target 10.99.0.2:7; limits raised so they do
   not bite legitimate load (max_startups 600:30:1000, 1000 sessions and 5000 channels per user),
   per-source penalties left on (threshold 5, 30 s doubling).
2. Phase 1, 60 s: 500 legitimate asyncssh connections (2 processes) loop open direct-tcpip -> echo a few KB
   -> close, logging in again every 100 tunnels; 50 brute-forcers (1 process) connect from a second gw
   address, 10.99.0.9, with random unknown keys. The server's RSS and PSS are sampled every 5 s.
   Then: no legitimate client saw an error; memory between minute 0.25 and minute 1 grew less than 10 %;
   every confirmed channel open has its `allow` row (exactly, counted), rows are closed, bytes match.
3. Phase 2: the same load again; after 25 s the server gets SIGKILL, the audit files are snapshot, the server
   is started again and the clients reconnect. Then: the rows the kill left open are exactly the ones
   crash recovery closed (sessions `end_reason = crash`), nothing is left open, every confirmed open before
   the kill has its row, the clients get back in, and the hash chain verifies.

Scale it with BASTION_LOAD_CLIENTS, BASTION_LOAD_BRUTE and BASTION_LOAD_SECONDS (e.g. 50/5/20 for a smoke run).
A summary table of the figures is printed (use -s to see it).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncssh
import psutil
import pytest

from testbed import ECHO_PORT, GW_ADDR, LAN_ADDR, PREFIX_LEN, Bastion, Testbed, stop_process, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.netns]

CLIENTS = int(os.environ.get("BASTION_LOAD_CLIENTS", "500"))
BRUTE_FORCERS = int(os.environ.get("BASTION_LOAD_BRUTE", "50"))
SECONDS = float(os.environ.get("BASTION_LOAD_SECONDS", "60"))
LEGIT_PROCESSES = 2
KILL_AFTER = 25.0  # phase 2: seconds of load before SIGKILL (500 logins take 10-15 s on a busy 2-core box)
PHASE2_SECONDS = KILL_AFTER + 30.0  # the clients' duration in phase 2 (they reconnect after the restart)
SAMPLE_EVERY = 5.0
MEMORY_GROWTH_LIMIT = 0.10  # between minute 0.25 and minute 1 of phase 1
USERS = [f"load{i:02d}" for i in range(10)]
BRUTE_SOURCE = "10.99.0.9"  # a second address on gw's veth: the brute-forcers' own source
CONFIG = {
    "max_startups": "600:30:1000",
    "max_sessions_per_user": 1000,
    "max_channels_per_user": 5000,
    "connect_timeout": 10,
    "shutdown_grace_seconds": 5,
}
LOAD_CLIENT = Path(__file__).with_name("load_client.py")


# ---- the client processes ---------------------------------------------------------------------------


class ClientProcess:
    """One load_client.py inside gw; its status lines are read by a thread, its result is a JSON file."""

    def __init__(self, testbed: Testbed, workdir: Path, name: str, args: list[str]) -> None:
        self.name = name
        self.out = workdir / f"{name}.json"
        self.stderr_path = workdir / f"{name}.stderr"
        self.last: dict[str, Any] = {}
        self.done = threading.Event()
        with self.stderr_path.open("wb") as stderr:
            self.proc = testbed.popen(testbed.gw, [sys.executable, LOAD_CLIENT, *args, "--out", self.out],
                                      stdout=subprocess.PIPE, stderr=stderr)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                status = json.loads(line)
            except ValueError:
                continue
            if status.get("done"):
                self.done.set()
            else:
                self.last = status

    def signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def result(self, timeout: float) -> dict[str, Any]:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"load client {self.name} did not finish within {timeout:.0f}s") from None
        if code != 0 or not self.out.exists():
            raise AssertionError(f"load client {self.name} exited {code}:\n{self.stderr_path.read_text()[-5000:]}")
        return json.loads(self.out.read_text())

    def close(self) -> None:
        stop_process(self.proc)


def start_clients(testbed: Testbed, bastion: Bastion, workdir: Path, phase: str, duration: float,
                  key_dir: Path, known_hosts: Path) -> tuple[list[ClientProcess], ClientProcess]:
    common = ["--host", bastion.host, "--port", str(bastion.port), "--users", ",".join(USERS),
              "--duration", str(duration)]
    brute = ClientProcess(testbed, workdir, f"{phase}-brute", [
        "brute", *common, "--connections", str(BRUTE_FORCERS), "--source", BRUTE_SOURCE, "--interval", "0.3"])
    per_process = [CLIENTS // LEGIT_PROCESSES + (i < CLIENTS % LEGIT_PROCESSES) for i in range(LEGIT_PROCESSES)]
    legit = [
        ClientProcess(testbed, workdir, f"{phase}-legit{i}", [
            "legit", *common, "--connections", str(n), "--key-dir", str(key_dir), "--known-hosts", str(known_hosts),
            "--target", f"{LAN_ADDR}:{ECHO_PORT}", "--payload", "4096", "--tunnels-per-session", "100",
            "--ramp", "5"])
        for i, n in enumerate(per_process)
    ]
    return legit, brute


# ---- measuring the server ---------------------------------------------------------------------------


def memory_of(pid: int) -> dict[str, int]:
    """RSS and PSS in KiB from /proc/PID/smaps_rollup."""
    values = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss"):
            values[key.lower()] = int(rest.split()[0])
    return values


@dataclass
class Sampler:
    """Every SAMPLE_EVERY seconds: the server's memory, CPU and fds, the load average and the clients' count of
    confirmed opens. Sampling stops when the server process is gone (SIGKILL) and resumes on `follow(pid)`."""

    pid: int
    clients: list[ClientProcess]
    database: Path
    samples: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._process = psutil.Process(self.pid)
        self._process.cpu_percent()
        self._clients = [psutil.Process(c.proc.pid) for c in self.clients]
        for client in self._clients:
            client.cpu_percent()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Sampler":
        self.take()
        self._thread.start()
        return self

    def follow(self, pid: int) -> None:
        self.pid = pid
        self._process = psutil.Process(pid)
        self._process.cpu_percent()

    def take(self) -> None:
        try:
            memory = memory_of(self.pid)
            cpu = self._process.cpu_percent()
            fds = self._process.num_fds()
            threads = self._process.num_threads()
        except (OSError, psutil.Error):
            return  # between SIGKILL and restart
        client_cpu = 0.0
        for client in self._clients:
            try:
                client_cpu += client.cpu_percent()
            except psutil.Error:
                pass  # finished
        self.samples.append({
            "t": time.monotonic() - self.started, **memory, "cpu": cpu, "client_cpu": client_cpu, "fds": fds,
            "threads": threads,
            "load1": os.getloadavg()[0], "opens": sum(c.last.get("opens", 0) for c in self.clients),
            "connected": sum(c.last.get("connected", 0) for c in self.clients),
            "open_rows": [len(rows) for rows in open_rows(self.database)],
        })

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_EVERY):
            self.take()

    def stop(self) -> list[dict[str, Any]]:
        self._stop.set()
        self._thread.join(SAMPLE_EVERY + 5)
        return self.samples

    def at(self, t: float) -> dict[str, Any]:
        """The sample nearest to `t` seconds."""
        return min(self.samples, key=lambda s: abs(s["t"] - t))


# ---- the audit, read with plain sqlite3 -------------------------------------------------------------


def query(database: Path, sql: str, *params: Any) -> list[tuple]:
    """Read-only; the server may be writing (WAL lets us read a consistent snapshot meanwhile)."""
    conn = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def scalar(database: Path, sql: str, *params: Any) -> Any:
    return query(database, sql, *params)[0][0]


def users_in() -> str:
    return "(" + ",".join(f"'{u}'" for u in USERS) + ")"


def open_rows(database: Path) -> tuple[set[str], set[int]]:
    sessions = {r[0] for r in query(database, "SELECT id FROM sessions WHERE ended_at IS NULL")}
    channels = {r[0] for r in query(database, "SELECT id FROM channels WHERE decision = 'allow' AND closed_at IS NULL")}
    return sessions, channels


def wait_quiet(database: Path, timeout: float = 60.0) -> None:
    """Wait until the server has ended every session and closed every channel of the finished load."""
    wait_until(lambda: open_rows(database) == (set(), set()), timeout, "every session and channel to be closed",
               interval=0.5)


def consistency_problems(database: Path) -> list[str]:
    """Invariants that hold for any audit log once nothing is open."""
    checks = {
        "session without ended_at": "SELECT count(*) FROM sessions WHERE ended_at IS NULL",
        "session without end_reason": "SELECT count(*) FROM sessions WHERE end_reason IS NULL",
        "session ended before it started": "SELECT count(*) FROM sessions WHERE ended_at < started_at",
        "allow channel without closed_at": "SELECT count(*) FROM channels WHERE decision='allow' AND closed_at IS NULL",
        "channel closed before it opened": "SELECT count(*) FROM channels WHERE closed_at < opened_at",
        "channel of an unknown session": "SELECT count(*) FROM channels c LEFT JOIN sessions s "
                                         "ON s.id = c.session_id WHERE s.id IS NULL",
        "channel opened outside its session": "SELECT count(*) FROM channels c JOIN sessions s ON s.id = c.session_id "
                                              "WHERE c.opened_at < s.started_at OR c.opened_at > s.ended_at",
        "negative byte count": "SELECT (SELECT count(*) FROM channels WHERE bytes_up < 0 OR bytes_down < 0) + "
                               "(SELECT count(*) FROM sessions WHERE bytes_up < 0 OR bytes_down < 0)",
    }
    problems = []
    for what, sql in checks.items():
        count = scalar(database, sql)
        if count:
            problems.append(f"{count} x {what}")
    return problems


def snapshot(database: Path, into: Path) -> Path:
    """Copy the database with its WAL as the killed server left them (the restart will rewrite them)."""
    into.mkdir()
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{database}{suffix}")
        if source.exists():
            shutil.copy2(source, into / f"{database.name}{suffix}")
    return into / database.name


# ---- setup ------------------------------------------------------------------------------------------


def make_keys(key_dir: Path) -> dict[str, str]:
    key_dir.mkdir(mode=0o700)
    public = {}
    for user in USERS:
        key = asyncssh.generate_private_key("ssh-ed25519", comment=f"{user}@load")
        fd = os.open(key_dir / user, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(key.export_private_key("openssh"))
        public[user] = key.export_public_key("openssh").decode().strip()
    return public


def load_policy(public: dict[str, str]) -> str:
    return "".join(f'[users.{user}]\nkeys = ["{line}"]\nallow = ["{LAN_ADDR}:{ECHO_PORT}"]\n\n'
                   for user, line in public.items())


def veth_of(testbed: Testbed) -> str:
    links = json.loads(testbed.run(testbed.gw, ["ip", "-j", "link", "show", "type", "veth"], check=True).stdout)
    assert len(links) == 1, links
    return links[0]["ifname"].split("@")[0]


# ---- the test ---------------------------------------------------------------------------------------


def test_load_brute_force_and_sigkill(testbed: Testbed, make_bastion, tmp_path: Path) -> None:
    work = tmp_path / "load"
    work.mkdir()
    public = make_keys(work / "keys")
    bastion = make_bastion("home")
    bastion.init(**CONFIG)
    bastion.apply_policy(load_policy(public))
    known_hosts = work / "known_hosts"
    known_hosts.write_text("".join(f"{GW_ADDR} {' '.join(k.split()[:2])}\n" for k in bastion.host_public_keys()))
    database = bastion.home / "bastion.db"
    device = veth_of(testbed)
    testbed.ip(testbed.gw, "addr", "add", f"{BRUTE_SOURCE}/{PREFIX_LEN}", "dev", device)
    processes: list[ClientProcess] = []
    figures: dict[str, Any] = {"load_before": os.getloadavg()}
    try:
        bastion.start()
        assert bastion.proc is not None
        figures["memory_idle"] = memory_of(bastion.proc.pid)

        # 1. sustained load with brute force ---------------------------------------------------------
        legit, brute = start_clients(testbed, bastion, work, "p1", SECONDS, work / "keys", known_hosts)
        processes += [*legit, brute]
        sampler = Sampler(bastion.proc.pid, [*legit, brute], database).start()
        cpu_before = psutil.Process(bastion.proc.pid).cpu_times()
        p1 = [c.result(SECONDS + 120) for c in legit]
        p1_brute = brute.result(120)
        samples = sampler.stop()
        cpu_after = psutil.Process(bastion.proc.pid).cpu_times()
        wait_quiet(database)
        figures["memory_after_quiet"] = memory_of(bastion.proc.pid)
        p1_log = bastion.log()

        p1_opens = sum(r["opens"] for r in p1)
        p1_tunnels = sum(sum(r["tunnels_ok"].values()) for r in p1)
        p1_logins = sum(r["sessions"] for r in p1)
        p1_errors = sum(sum(r["errors"].values()) for r in p1)
        duration = max(r["duration"] for r in p1)
        allow_rows = scalar(database, f"SELECT count(*) FROM channels WHERE decision='allow' AND user IN {users_in()}")
        deny_rows = scalar(database, f"SELECT count(*) FROM channels WHERE decision='deny' AND user IN {users_in()}")
        session_rows = scalar(database, f"SELECT count(*) FROM sessions WHERE user IN {users_in()}")
        bytes_rows = query(database, "SELECT coalesce(sum(bytes_up), 0), coalesce(sum(bytes_down), 0), "
                                     "sum(bytes_up != bytes_down) FROM channels WHERE decision='allow'")[0]
        session_bytes_mismatch = scalar(database, """
            SELECT count(*) FROM sessions s WHERE bytes_up != (SELECT coalesce(sum(bytes_up), 0) FROM channels c
                                                               WHERE c.session_id = s.id AND c.decision = 'allow')""")
        # minute 0.25, or the first sample after it with (nearly) every client logged in: on a slow machine the
        # logins may still be ramping at 15 s, and that growth is not a leak
        early = next((s for s in samples if s["t"] >= SECONDS / 4 - 1 and s["connected"] >= 0.95 * CLIENTS),
                     sampler.at(SECONDS / 4))
        late = max((s for s in samples if s["t"] <= SECONDS + 1), key=lambda s: s["t"])
        growth_rss = (late["rss"] - early["rss"]) / early["rss"]
        growth_pss = (late["pss"] - early["pss"]) / early["pss"]
        auth = dict(query(database, "SELECT client_ip || ' ' || result || ': ' || "
                                    "CASE WHEN reason LIKE 'source refused%' THEN 'penalty started' ELSE reason END, "
                                    "count(*) FROM auth GROUP BY 1"))
        penalties_legit_source = scalar(database, "SELECT count(*) FROM auth WHERE client_ip = ? AND reason LIKE "
                                                  "'source refused%'", GW_ADDR)
        brute_successes = scalar(database, "SELECT count(*) FROM auth WHERE client_ip = ? AND result = 'success'",
                                 BRUTE_SOURCE)
        startup_drops = scalar(database, "SELECT count(*) FROM auth WHERE reason LIKE 'startup limit%'")
        penalties = query(database, "SELECT time, client_ip, reason FROM auth WHERE reason LIKE 'source refused%' "
                                    "ORDER BY time")
        figures.update(
            p1_duration=duration, p1_opens=p1_opens, p1_tunnels=p1_tunnels, p1_logins=p1_logins, p1_errors=p1_errors,
            p1_rate=p1_opens / duration, p1_allow_rows=allow_rows, p1_deny_rows=deny_rows, p1_session_rows=session_rows,
            p1_bytes_client=sum(r["bytes_echoed"] for r in p1), p1_bytes_rows=bytes_rows,
            p1_server_cpu=(cpu_after.user + cpu_after.system) - (cpu_before.user + cpu_before.system),
            p1_open_latency=merge_latency(p1, "open_latency"), p1_round_trip=merge_latency(p1, "round_trip"),
            p1_login_latency=merge_latency(p1, "login_latency"), p1_brute=p1_brute["brute"], p1_auth=auth,
            penalties=penalties,
            samples=samples, early=early, late=late, growth_rss=growth_rss, growth_pss=growth_pss,
            p1_error_kinds=merged(p1, "error_kinds"), p1_error_samples=[s for r in p1 for s in r["error_samples"]][:10],
        )

        # 2. the same load, SIGKILL, restart ---------------------------------------------------------
        legit2, brute2 = start_clients(testbed, bastion, work, "p2", PHASE2_SECONDS, work / "keys", known_hosts)
        processes += [*legit2, brute2]
        sampler2 = Sampler(bastion.proc.pid, [*legit2, brute2], database).start()
        time.sleep(KILL_AFTER)
        for client in (*legit2, brute2):
            client.signal(signal.SIGUSR1)
        time.sleep(0.5)  # the clients have switched phase: every open they counted before is in the audit
        before_kill = [dict(c.last) for c in legit2]
        killed_pid = bastion.proc.pid
        bastion.send_signal(signal.SIGKILL)
        assert bastion.wait(10) == -signal.SIGKILL
        snap = snapshot(database, work / "snapshot")
        snap_sessions, snap_channels = open_rows(snap)
        snap_allow_rows = scalar(snap, f"SELECT count(*) FROM channels WHERE decision='allow' AND user IN {users_in()}")
        restart_began = time.monotonic()
        bastion.start(timeout=60)
        restart_seconds = time.monotonic() - restart_began
        for client in (*legit2, brute2):
            client.signal(signal.SIGUSR2)
        sampler2.follow(bastion.proc.pid)
        p2 = [c.result(PHASE2_SECONDS + 120) for c in legit2]
        p2_brute = brute2.result(120)
        figures["samples2"] = sampler2.stop()
        wait_quiet(database)
        exit_code = bastion.stop(signal.SIGTERM, timeout=30)
        verify = bastion.cli("audit", "verify", check=False, timeout=300)

        crash_sessions = {r[0] for r in query(database, "SELECT id FROM sessions WHERE end_reason = 'crash'")}
        crash_times = {r[0] for r in query(database, "SELECT ended_at FROM sessions WHERE end_reason = 'crash'")}
        snap_channels_closed = query(database, f"SELECT DISTINCT closed_at FROM channels WHERE id IN "
                                               f"({','.join(map(str, snap_channels)) or 'NULL'})")
        crash_line = next((line for line in bastion.log().splitlines() if "left open by a crash" in line), "")
        p2_before = sum(r["opens_by_phase"].get("before_kill", 0) for r in p2)
        p2_opens = sum(r["opens"] for r in p2)
        final_allow_rows = scalar(database, f"SELECT count(*) FROM channels WHERE decision='allow' "
                                            f"AND user IN {users_in()}")
        figures.update(
            p2_before_kill_status=before_kill, p2_opens_before_kill=p2_before, p2_opens=p2_opens,
            p2_opens_after_restart=sum(r["opens_by_phase"].get("restarted", 0) for r in p2),
            p2_errors={phase: sum(r["errors"].get(phase, 0) for r in p2) for phase in ("before_kill", "outage",
                                                                                      "restarted")},
            p2_error_kinds=merged(p2, "error_kinds"), p2_brute=p2_brute["brute"],
            p2_recovery=[r["first_open_after_restart"] and r["first_open_after_restart"] - r["restart_signalled"]
                         for r in p2],
            # how long after the client handled "server is back" its last refused connect was counted
            p2_refused_after_restart=max((t - r["restart_signalled"] for r in p2 for k, t in r["error_last"].items()
                                          if k == "restarted | connect | ConnectionRefusedError"), default=None),
            killed_pid=killed_pid, snap_open_sessions=len(snap_sessions), snap_open_channels=len(snap_channels),
            snap_allow_rows=snap_allow_rows, restart_seconds=restart_seconds, crash_line=crash_line,
            crash_sessions=len(crash_sessions), final_allow_rows=final_allow_rows, exit_code=exit_code,
            verify=verify.stdout.decode().strip() or verify.stderr.decode().strip(), load_after=os.getloadavg(),
            problems=consistency_problems(database),
        )
        print_summary(figures)
        (work / "figures.json").write_text(json.dumps(figures, indent=1, default=str))

        # phase 1: legitimate clients never failed, memory stayed flat, every open has its row
        assert p1_errors == 0, f"legitimate clients saw errors: {json.dumps(figures['p1_error_kinds'], indent=1)}"
        assert all(not r["workers_crashed"] and not r["workers_stuck"] for r in p1), p1
        assert p1_opens > 0 and p1_tunnels == p1_opens
        assert allow_rows == p1_opens, f"{p1_opens} channel opens confirmed to clients, {allow_rows} allow rows"
        assert deny_rows == 0
        assert session_rows == p1_logins, f"{p1_logins} logins, {session_rows} session rows"
        assert bytes_rows[0] == bytes_rows[1] == figures["p1_bytes_client"] and bytes_rows[2] == 0, bytes_rows
        assert session_bytes_mismatch == 0
        assert growth_rss < MEMORY_GROWTH_LIMIT, f"RSS grew {growth_rss:.1%} from {early} to {late}"
        assert growth_pss < MEMORY_GROWTH_LIMIT, f"PSS grew {growth_pss:.1%} from {early} to {late}"
        assert penalties_legit_source == 0, "the legitimate clients' source was penalized"
        assert brute_successes == 0 and "UNEXPECTED SUCCESS" not in p1_brute["brute"]
        assert startup_drops == 0
        assert "Traceback" not in p1_log, "the server logged a traceback under load (see the serve log)"

        # phase 2: no error before the kill; the kill's open rows are exactly those closed as crashed
        assert figures["p2_errors"]["before_kill"] == 0, figures["p2_error_kinds"]
        assert crash_sessions == snap_sessions, (len(crash_sessions), len(snap_sessions))
        recovery_moments = crash_times | {row[0] for row in snap_channels_closed}
        assert None not in recovery_moments and len(recovery_moments) <= 1, recovery_moments  # one recovery
        assert f"marked {len(snap_sessions)} sessions, {len(snap_channels)} channels" in crash_line or not (
            snap_sessions or snap_channels), crash_line
        assert p1_opens + p2_before <= snap_allow_rows, "a confirmed channel open has no audit row"
        assert p1_opens + p2_opens <= final_allow_rows
        assert figures["p2_opens_after_restart"] > 0, "the clients did not get back in after the restart"
        # a refused connect can only mean no listener, i.e. the server was still down: such failures may be
        # counted after SIGUSR2 when the client's loop handles them late; anything else after the restart is not
        after_restart = {k: n for k, n in figures["p2_error_kinds"].items()
                         if k.startswith("restarted") and "ConnectionRefusedError" not in k}
        assert not after_restart, after_restart
        assert figures["problems"] == [], figures["problems"]
        assert exit_code == 0
        assert verify.returncode == 0, figures["verify"]
    finally:
        for client in processes:
            client.close()
        testbed.run(testbed.gw, ["ip", "addr", "del", f"{BRUTE_SOURCE}/{PREFIX_LEN}", "dev", device])


def merge_latency(results: list[dict[str, Any]], key: str) -> dict[str, float]:
    """Percentiles merged across processes (the worst process's value: an upper bound, good enough here)."""
    parts = [r[key] for r in results if r[key]]
    if not parts:
        return {}
    return {q: max(p[q] for p in parts) for q in ("p50", "p95", "p99", "max")}


def merged(results: list[dict[str, Any]], key: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for result in results:
        for kind, count in result[key].items():
            total[kind] = total.get(kind, 0) + count
    return total


def print_summary(f: dict[str, Any]) -> None:
    def mib(kib: int) -> str:
        return f"{kib / 1024:.1f} MiB"

    def memory(m: dict[str, int]) -> str:
        return f"{mib(m['rss'])} / {mib(m['pss'])}"

    def ms(p: dict[str, float]) -> str:
        return " / ".join(f"{p[q] * 1000:.0f}" for q in ("p50", "p95", "p99", "max")) if p else "-"

    def loads(values: tuple[float, ...]) -> str:
        return " / ".join(f"{x:.2f}" for x in values)

    per_1000 = 1000 * f["p1_server_cpu"] / max(1, f["p1_opens"])
    rows = [
        ("load average before | after", f"{loads(f['load_before'])}  |  {loads(f['load_after'])}"),
        ("phase 1 clients / brute-forcers / seconds", f"{CLIENTS} / {BRUTE_FORCERS} / {f['p1_duration']:.1f}"),
        ("phase 1 logins (session rows)", f"{f['p1_logins']} ({f['p1_session_rows']})"),
        ("phase 1 channel opens (allow rows)",
         f"{f['p1_opens']} ({f['p1_allow_rows']}), deny rows {f['p1_deny_rows']}"),
        ("phase 1 channel opens per second", f"{f['p1_rate']:.1f}"),
        ("phase 1 errors (legitimate)", str(f["p1_errors"])),
        ("phase 1 bytes echoed (rows up/down)",
         f"{f['p1_bytes_client']} ({f['p1_bytes_rows'][0]}/{f['p1_bytes_rows'][1]})"),
        ("open latency p50/p95/p99/max ms", ms(f["p1_open_latency"])),
        ("round trip p50/p95/p99/max ms", ms(f["p1_round_trip"])),
        ("login latency p50/p95/p99/max ms", ms(f["p1_login_latency"])),
        ("server CPU seconds (per 1000 opens)", f"{f['p1_server_cpu']:.1f} ({per_1000:.2f})"),
        ("server memory idle (RSS / PSS)", memory(f["memory_idle"])),
        (f"server memory at {f['early']['t']:.0f}s (RSS / PSS)", memory(f["early"])),
        (f"server memory at {f['late']['t']:.0f}s (RSS / PSS)", memory(f["late"])),
        ("memory growth (RSS / PSS)",
         f"{f['growth_rss']:+.1%} / {f['growth_pss']:+.1%} (limit {MEMORY_GROWTH_LIMIT:.0%})"),
        ("server memory after load ended", memory(f["memory_after_quiet"])),
        ("brute force phase 1 (client view)", json.dumps(f["p1_brute"])),
        ("auth rows by source and reason", json.dumps(f["p1_auth"])),
        ("brute force phase 2 (client view)", json.dumps(f["p2_brute"])),
        ("phase 2 opens before kill / after restart", f"{f['p2_opens_before_kill']} / {f['p2_opens_after_restart']}"),
        ("phase 2 errors before / outage / restarted", " / ".join(str(v) for v in f["p2_errors"].values())
         + ("" if f["p2_refused_after_restart"] is None
            else f" (last refused connect {f['p2_refused_after_restart']:.2f}s after the restart signal)")),
        ("open rows left by SIGKILL (sessions / channels)", f"{f['snap_open_sessions']} / {f['snap_open_channels']}"),
        ("sessions closed as crash", str(f["crash_sessions"])),
        ("confirmed opens <= allow rows at kill",
         f"{f['p1_opens'] + f['p2_opens_before_kill']} <= {f['snap_allow_rows']}"),
        ("confirmed opens <= allow rows at end", f"{f['p1_opens'] + f['p2_opens']} <= {f['final_allow_rows']}"),
        ("restart time / first open after restart (s)", f"{f['restart_seconds']:.2f} / "
         + ", ".join("-" if r is None else f"{r:.2f}" for r in f["p2_recovery"])),
        ("crash recovery log", f["crash_line"].split("] ", 1)[-1][:110] or "-"),
        ("consistency problems", "; ".join(f["problems"]) or "none"),
        ("audit verify", f["verify"][:110]),
        ("SIGTERM exit code after restart", str(f["exit_code"])),
    ]
    width = max(len(r[0]) for r in rows)
    print("\n\nbastion load test (issue #5)\n" + "-" * (width + 60))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("\npenalties started (phase 1):")
    for time_, source, reason in f["penalties"]:
        print(f"  {time_}  {source}  {reason}")
    for title, key in (("phase 1", "samples"), (f"phase 2 (SIGKILL at {KILL_AFTER:g}s)", "samples2")):
        print(f"\n{title}, every {SAMPLE_EVERY:g} s: t  RSS  PSS  server-cpu%  clients-cpu%  fds  load1  opens  "
              "connected  open rows (sessions/channels)")
        for s in f[key]:
            print(f"  {s['t']:5.1f}  {mib(s['rss']):>10}  {mib(s['pss']):>10}  {s['cpu']:5.1f}  {s['client_cpu']:5.1f}  "
                  f"{s['fds']:5d}  {s['load1']:5.2f}  {s['opens']:7d}  {s['connected']:4d}  "
                  f"{s['open_rows'][0]}/{s['open_rows'][1]}")
    for label in ("p1_error_kinds", "p2_error_kinds"):
        if f[label]:
            print(f"{label}:")
            for kind, count in sorted(f[label].items(), key=lambda kv: -kv[1])[:15]:
                print(f"  {count:6d}  {kind}")
    print()
