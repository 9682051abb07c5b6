"""The eight figures of issue #6. Each function drives both servers with the same clients, interleaved
(ours, sshd, ours, sshd, ...), and returns `Row`s: ours, the reference (sshd unless said otherwise), ratio.
"""

from __future__ import annotations

import math
import os
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from bed import DEFAULT_CIPHER, LAN_ADDR, LOGINS, Bench, Server, fd_limit, machine_busy_seconds, wait_quiet
from targets import ECHO_PORT, HELLO_PORT, SINK_PORT, SOURCE_PORT

CIPHERS = ("aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com")
DIRECTIONS = {"down": "target→client", "up": "client→target"}
GIB = 1 << 30
SESSIONS_PER_HOLDER = 2500  # sessions per client process in figure 6 (fewer if its RLIMIT_NOFILE is lower)


@dataclass
class Params:
    bulk_bytes: int
    bulk_rounds: int  # A B rounds for one tunnel (figures 1 and 2): its ratio is the one closest to 1
    rounds: int  # A B rounds for the other throughput, round-trip and open-rate figures
    parallel_total: int
    jump_per_round: int
    open_per_round: int
    latency_rounds: int
    rtt_per_round: int
    rtt_rounds: int  # a round takes about a second; the ratio drifts between rounds more than within one
    handshake_levels: tuple[int, ...]
    handshake_seconds: float
    sessions: tuple[int, ...]
    sshd_session_cap: int
    setup_probes: int  # new connections timed while the sessions of figure 6 are held
    opens_seconds: float
    opens_rounds: int  # figure 8 is latency-bound one at a time, and this machine's noise is large there


FULL = Params(bulk_bytes=GIB, bulk_rounds=11, rounds=5, parallel_total=GIB, jump_per_round=10, open_per_round=100,
              latency_rounds=4, rtt_per_round=1000, rtt_rounds=30, handshake_levels=(1, 2, 4, 8, 16, 32, 64, 128),
              handshake_seconds=3.0, sessions=(1000, 10000), sshd_session_cap=1000, setup_probes=200,
              opens_seconds=3.0, opens_rounds=9)
QUICK = Params(bulk_bytes=256 << 20, bulk_rounds=1, rounds=1, parallel_total=256 << 20, jump_per_round=5, open_per_round=50,
               latency_rounds=2, rtt_per_round=300, rtt_rounds=2, handshake_levels=(1, 4, 16, 64), handshake_seconds=1.5,
               sessions=(100, 500), sshd_session_cap=500, setup_probes=50,
               opens_seconds=1.5, opens_rounds=1)


@dataclass
class Row:
    figure: int
    measure: str
    unit: str
    better: str  # higher | lower
    ours: float | None
    sshd: float | None
    direction: str = ""
    note: str = ""
    reference: str = "sshd"  # what the second column is, when it is not sshd
    detail: dict[str, Any] = field(default_factory=dict)
    paired: float | None = None  # the median of the per-round ratios, where the rounds pair up (see paired)

    @property
    def ratio(self) -> float | None:
        if self.paired is not None:
            return self.paired
        if self.ours is None or not self.sshd:
            return None
        return self.ours / self.sshd


def paired(ours: list, reference: list, value) -> tuple[float, str]:
    """The median of value(ours round) / value(reference round) over the rounds, and a note saying so.
    Each round runs the two back to back, so a round-to-round drift in the machine's speed, which on this
    2-core VM moves a whole round by ±15 %, cancels in the round's ratio; the ratio of the two medians does
    not cancel it, and the note gives that one too."""
    ratios = [value(a) / value(b) for a, b in zip(ours, reference)]
    of_medians = statistics.median(map(value, ours)) / statistics.median(map(value, reference))
    return statistics.median(ratios), (f"ratio: median of {len(ratios)} per-round ratios "
                                       f"({min(ratios):.2f}–{max(ratios):.2f}); of the medians {of_medians:.2f}")


def percentile(samples: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(samples)
    position = (len(ordered) - 1) * q / 100
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def interleaved(bench: Bench, rounds: int, servers: tuple[Server, ...], measure) -> dict[str, list]:
    """A B A B ...: `measure(server)` for each server in turn, `rounds` times; samples per server name."""
    samples: dict[str, list] = {s.name: [] for s in servers}
    for round_number in range(rounds):
        for server in servers:
            samples[server.name].append(measure(server))
            bench.log(f"    {server.name:10s} round {round_number + 1}: {_short(samples[server.name][-1])}")
    return samples


def _short(sample: Any) -> str:
    if isinstance(sample, dict):
        return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in sample.items()
                         if not isinstance(v, (list, dict)))
    return str(sample)


# ---- 1, 2, 3: bulk throughput and CPU -----------------------------------------------------------


def _transfer(bench: Bench, server: Server, cipher: str, direction: str, tunnels: int, total: int) -> dict:
    """`tunnels` forwards (one SSH connection each), each moving total/tunnels bytes at once; exact content check."""
    target = SOURCE_PORT if direction == "down" else SINK_PORT
    each = total // tunnels
    with bench.forwards(server, [target] * tunnels, cipher, one_connection=False) as ports:
        cpu_before, machine_before = server.cpu_seconds(), machine_busy_seconds()
        result = bench.client("pull" if direction == "down" else "push", "--ports", ",".join(map(str, ports)),
                              "--bytes", each)
        cpu_after, machine_after = server.cpu_seconds(), machine_busy_seconds()
    moved = result["bytes"]
    return {
        "mb_s": moved / result["seconds"] / 1e6,
        "cpu_s_per_gib": (cpu_after - cpu_before) / (moved / GIB) if moved else math.nan,
        "machine_s_per_gib": (machine_after - machine_before) / (moved / GIB) if moved else math.nan,
        "ok": result["ok"],
        "failed": result["failed"],
        "failures": result["failures"],
    }


def _bulk_rows(figure_tp: int, samples: dict[str, list], label: str, direction: str, cpu_figure: int | None,
               transfers: str) -> list[Row]:
    failed = {name: sum(s["failed"] for s in runs) for name, runs in samples.items()}
    note = ""
    if any(failed.values()):
        note = "CHECK FAILED: " + "; ".join(
            f"{name}: {n} transfer(s) short or corrupt ({runs[0]['failures'] or [s['failures'] for s in runs]})"
            for name, n in failed.items() if n for runs in [samples[name]])
    detail = {"runs": samples, "transfers": transfers}
    ours, sshd = samples["ours"], samples["sshd"]

    def row(figure: int, measure: str, unit: str, better: str, key: str, extra: str, **kw) -> Row:
        median = {name: statistics.median(s[key] for s in runs) for name, runs in samples.items()}
        ratio, how = paired(ours, sshd, lambda s: s[key]) if len(ours) > 1 else (None, "")
        return Row(figure, measure, unit, better, median["ours"], median["sshd"], DIRECTIONS[direction],
                   note or "; ".join(filter(None, (how, extra))), paired=ratio, **kw)

    rows = [row(figure_tp, f"throughput, {label}", "MB/s", "higher", "mb_s", _best_of(samples, "mb_s", max),
                detail=detail)]
    if cpu_figure is not None:
        rows.append(row(cpu_figure, f"server CPU per GiB, {label}", "s/GiB", "lower", "cpu_s_per_gib",
                        _best_of(samples, "cpu_s_per_gib", min)))
        rows.append(row(cpu_figure, f"machine CPU per GiB, {label}", "s/GiB", "lower", "machine_s_per_gib",
                        "all processes: server, ssh client, targets (MB/s follows this when the machine is "
                        "saturated)"))
    return rows


def _best_of(samples: dict[str, list], key: str, best) -> str:
    """The best round of each server, beside the median the row shows: a round that other work on the shared
    cores slowed is slower for either server, so the best rounds compare the code with the least disturbance."""
    rounds = len(samples["ours"])
    if rounds < 2:
        return ""
    ours, sshd = (best(s[key] for s in samples[name]) for name in ("ours", "sshd"))
    shown = [f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in (ours, sshd)]
    return f"best of {rounds}: {shown[0]} against {shown[1]} ({ours / sshd:.2f})"


def figure_bulk(bench: Bench, p: Params) -> list[Row]:
    """1 and 2: one -L tunnel, per cipher and direction: MB/s, and server and machine CPU seconds per GiB."""
    rows = []
    for cipher in CIPHERS:
        for direction in DIRECTIONS:
            bench.log(f"  bulk {cipher} {DIRECTIONS[direction]}, {p.bulk_bytes >> 20} MiB x {p.bulk_rounds}")
            samples = interleaved(bench, p.bulk_rounds, (bench.ours, bench.sshd),
                                  lambda s: _transfer(bench, s, cipher, direction, 1, p.bulk_bytes))
            rows += _bulk_rows(1, samples, f"1 tunnel, {cipher.split('@')[0]}", direction, 2,
                               f"{p.bulk_rounds} x {p.bulk_bytes >> 20} MiB, median")
    return rows


def figure_parallel(bench: Bench, p: Params) -> list[Row]:
    """3: 8 and 64 tunnels at once, each its own `ssh -N -L` connection, sharing `parallel_total` bytes."""
    rows = []
    for tunnels in (8, 64):
        for direction in DIRECTIONS:
            bench.log(f"  parallel {tunnels} tunnels {DIRECTIONS[direction]}, {p.parallel_total >> 20} MiB total")
            samples = interleaved(bench, p.rounds, (bench.ours, bench.sshd),
                                  lambda s: _transfer(bench, s, DEFAULT_CIPHER, direction, tunnels, p.parallel_total))
            rows += _bulk_rows(3, samples, f"{tunnels} tunnels, aes128-gcm", direction, None,
                               f"{p.rounds} x {p.parallel_total >> 20} MiB total, median")
    return rows


# ---- 4, 7: latency --------------------------------------------------------------------------------


def _latency_rows(figure: int, label: str, samples: dict[str, list], unit_scale: float, unit: str,
                  note: str = "") -> list[Row]:
    pooled = {name: [x for run in runs for x in run["us"]] for name, runs in samples.items()}
    rows = []
    for q in (50, 99):
        value = {name: percentile(xs, q) / unit_scale for name, xs in pooled.items()}
        rows.append(Row(figure, f"{label} p{q}", unit, "lower", value["ours"], value["sshd"],
                        note=note or f"n={len(pooled['ours'])} each"))
    return rows


def _login_rows(rows: list[Row], variants: list[Server], value) -> list[Row]:
    """For each login mode other than key: `rows` again (same figure, unit, sshd column: sshd with a key),
    with "(certificate login)" or "(key + TOTP)" on the measure and the bastion's value for that mode;
    `value(server_name, row_index)` gives it. The note compares with the bastion's key login."""
    extra = []
    for server in variants:
        for i, row in enumerate(rows):
            ours = value(server.name, i)
            note = (f"login: {LOGINS[server.login]}; the bastion with a key: {row.ours:.3g} {row.unit} "
                    f"(×{ours / row.ours:.2f}); sshd: key login") if row.ours else ""
            extra.append(replace(row, measure=f"{row.measure} ({LOGINS[server.login]})", ours=ours, note=note,
                                 paired=None, detail={}))
    return extra


def _totp_waits(samples: dict[str, list]) -> str:
    waits = sum(s.get("totp_waits", 0) for runs in samples.values() for s in runs if isinstance(s, dict))
    return f"; TOTP logins that waited for a new 30 s step: {waits}" if waits else ""


def figure_latency(bench: Bench, p: Params) -> list[Row]:
    """4: `ssh -J server target true` wall time, and one direct-tcpip open on an open session (OpenSSH -L:
    connect to the forward until the target's first byte arrives). With other login modes (run.py --login),
    the two login figures are measured for each, interleaved with the key login and sshd; the open on an
    open session is not (no login in it)."""
    servers = (bench.ours, bench.sshd, *bench.login_variants)
    bench.log(f"  ssh -J ... true, {p.jump_per_round} x {p.latency_rounds}")
    jump = interleaved(bench, p.latency_rounds, servers, lambda s: bench.client(
        "jump", "--count", p.jump_per_round, *bench.login_args(s), "--",
        *bench.ssh_argv("-J", bench.jump_host(s), "target", "true")))
    rows = _latency_rows(4, "ssh -J … target true (wall time)", jump, 1000, "ms",
                         f"n={p.jump_per_round * p.latency_rounds} each; includes the target sshd's login and exec")
    rows += _login_rows(rows, bench.login_variants, lambda name, i: percentile(
        [x for run in jump[name] for x in run["us"]], (50, 99)[i]) / 1000)
    bench.log(f"  ssh -W hello (the jump alone, to the first byte), {p.jump_per_round} x {p.latency_rounds}")
    stdio = interleaved(bench, p.latency_rounds, servers, lambda s: bench.client(
        "jump", "--count", p.jump_per_round, "--first-byte", *bench.login_args(s), "--",
        *bench.ssh_argv("-W", f"{LAN_ADDR}:{HELLO_PORT}", bench.jump_host(s))))
    stdio_rows = _latency_rows(4, "ssh -W target (ProxyJump's leg): connect to first byte", stdio, 1000, "ms")
    rows += stdio_rows + _login_rows(stdio_rows, bench.login_variants, lambda name, i: percentile(
        [x for run in stdio[name] for x in run["us"]], (50, 99)[i]) / 1000)
    if waits := _totp_waits(jump) + _totp_waits(stdio):
        rows[-1].note += waits

    def open_latency(server: Server) -> dict:
        with bench.forwards(server, [HELLO_PORT]) as (port,):
            bench.client("first-byte", "--port", port, "--count", 3)  # warm up
            return bench.client("first-byte", "--port", port, "--count", p.open_per_round)

    bench.log(f"  direct-tcpip open to first byte, {p.open_per_round} x {p.latency_rounds}")
    opens = interleaved(bench, p.latency_rounds, (bench.ours, bench.sshd), open_latency)
    rows += _latency_rows(4, "direct-tcpip open + first byte on an open session", opens, 1000, "ms")
    return rows


def figure_rtt(bench: Bench, p: Params) -> list[Row]:
    """7: 64-byte messages echoed through an open -L tunnel, one at a time."""

    def rtt(server: Server) -> dict:
        with bench.forwards(server, [ECHO_PORT]) as (port,):
            return bench.client("rtt", "--port", port, "--count", p.rtt_per_round, "--size", 64)

    bench.log(f"  64-byte round trips, {p.rtt_per_round} x {p.rtt_rounds}")
    samples = interleaved(bench, p.rtt_rounds, (bench.ours, bench.sshd), rtt)
    rows = _latency_rows(7, "round trip, 64 B through -L", samples, 1, "µs",
                         f"n={p.rtt_per_round * p.rtt_rounds} each, pooled")
    if p.rtt_rounds > 1:  # where one round's processes land on the two cores moves its p50 by up to ±30 %
        rows[0].paired, how = paired(samples["ours"], samples["sshd"], lambda s: percentile(s["us"], 50))
        rows[0].note += f"; {how}"
    return rows


# ---- 5: handshakes --------------------------------------------------------------------------------


def _handshakes(bench: Bench, server: Server, concurrency: int, seconds: float) -> dict:
    """asyncssh clients in two processes (one would be the bottleneck): connect, authenticate, close."""
    processes = min(2, concurrency)
    shares = [concurrency // processes + (1 if i < concurrency % processes else 0) for i in range(processes)]
    wait_quiet(server, 0.3)
    cpu_before = server.cpu_seconds()
    with ThreadPoolExecutor(processes) as pool:
        results = list(pool.map(lambda i: bench.client(
            "handshake", *bench.asyncssh_args(server), "--slot", i, "--slots", processes,
            "--concurrency", shares[i], "--duration", seconds), range(processes)))
    wait_quiet(server, 0.3)  # sshd's children finish and are reaped
    cpu = server.cpu_seconds() - cpu_before
    done = sum(r["handshakes"] for r in results)
    return {
        "rate": sum(r["handshakes"] / r["seconds"] for r in results),
        "cpu_ms_per_handshake": 1000 * cpu / done if done else math.nan,
        "failed": sum(r["failed"] for r in results),
        "errors": sorted({e for r in results for e in r["errors"]})[:3],
        "totp_waits": sum(r.get("totp_waits", 0) for r in results),
    }


def figure_handshakes(bench: Bench, p: Params) -> list[Row]:
    """5: raise the number of concurrent clients until neither server's rate grows by 5 % twice running."""
    servers = (bench.ours, bench.sshd, *bench.login_variants)
    levels: dict[int, dict[str, dict]] = {}
    best = {s.name: 0.0 for s in servers}
    flat = {s.name: 0 for s in servers}
    for level in p.handshake_levels:
        bench.log(f"  handshakes, {level} concurrent clients, {p.handshake_seconds:g} s")
        levels[level] = {name: runs[0] for name, runs in interleaved(
            bench, 1, servers, lambda s: _handshakes(bench, s, level, p.handshake_seconds)).items()}
        for name, sample in levels[level].items():
            flat[name] = flat[name] + 1 if sample["rate"] < 1.05 * best[name] else 0
            best[name] = max(best[name], sample["rate"])
        if min(flat.values()) >= 2:
            break
    peak = {name: max(levels, key=lambda lv: levels[lv][name]["rate"]) for name in best}
    rate = {name: levels[peak[name]][name]["rate"] for name in best}
    cpu = {name: levels[peak[name]][name]["cpu_ms_per_handshake"] for name in best}
    failed = sum(levels[lv][n]["failed"] for lv in levels for n in ("ours", "sshd"))
    note = (f"peak at {peak['ours']} / {peak['sshd']} concurrent clients (asyncssh, 2 processes); the clients share "
            f"the machine, so this is the machine's rate with both ends on it")
    if failed:
        note += f"; {failed} handshakes failed"
    detail = {"levels": levels}
    cores = os.cpu_count() or 1
    rows = [Row(5, "handshakes per second at saturation", "/s", "higher", rate["ours"], rate["sshd"], note=note,
                detail=detail),
            Row(5, "server CPU per handshake at that load", "ms", "lower", cpu["ours"], cpu["sshd"]),
            Row(5, "server-only handshakes/s implied by that CPU", "/s", "higher", 1000 / cpu["ours"],
                1000 * cores / cpu["sshd"],
                note=f"estimate: ours is one process (1 core), sshd forks per connection ({cores} cores)")]
    extra = _login_rows(rows, bench.login_variants,
                        lambda name, i: (rate[name], cpu[name], 1000 / cpu[name])[i])
    for row in extra:
        name = next(s.name for s in bench.login_variants if row.measure.endswith(f"({LOGINS[s.login]})"))
        if row.measure.startswith("handshakes per second"):
            lost = sum(levels[lv][name]["failed"] for lv in levels)
            waits = sum(levels[lv][name].get("totp_waits", 0) for lv in levels)
            row.note += f"; peak at {peak[name]} concurrent clients" + (f"; {lost} handshakes failed" if lost else "")
            row.note += f"; logins that waited for a new TOTP step: {waits}" if waits else ""
        elif row.measure.startswith("server CPU per handshake"):  # every level, each against the key login's
            ratios = [levels[lv][name]["cpu_ms_per_handshake"] / levels[lv]["ours"]["cpu_ms_per_handshake"]
                      for lv in levels]
            row.note += (f"; at each of the {len(ratios)} levels against the key login's: median ×"
                         f"{statistics.median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})")
    return rows + extra


# ---- 6: memory per session ------------------------------------------------------------------------


def _stdio_first_byte(bench: Bench, server: Server, count: int) -> dict:
    """`count` times, one after another: `ssh -W lan:hello server` from exec to the target's first byte on
    stdout (a new connection: TCP, key exchange, login, one direct-tcpip channel, the first byte). Figure 4's
    "ProxyJump's leg" measurement, the same driver."""
    return bench.client("jump", "--count", count, "--first-byte", "--",
                        *bench.ssh_argv("-W", f"{LAN_ADDR}:{HELLO_PORT}", server.alias))


def _hold_sessions(bench: Bench, server: Server, sessions: int, probes: int) -> dict:
    """Fresh server; `sessions` asyncssh sessions each holding one direct-tcpip channel to the echo target;
    PSS of the server tree before and with them; then, with them still held, `probes` new connections timed
    to their first byte."""
    bench.restart(server)
    wait_quiet(server)
    base_kib, _ = server.pss_kib()
    per_holder = min(SESSIONS_PER_HOLDER, (fd_limit() - 200) // 100 * 100)  # one descriptor per client session
    holders = math.ceil(sessions / per_holder)
    shares = [sessions // holders + (1 if i < sessions % holders else 0) for i in range(holders)]
    procs: list[subprocess.Popen] = []
    start = time.monotonic()
    probe: dict = {"us": []}
    try:
        for share in shares:
            procs.append(bench.client_popen("hold", *bench.asyncssh_args(server), "--sessions", share,
                                            "--concurrency", 25, "--target-host", "10.99.0.2",
                                            "--target-port", ECHO_PORT))
        ready = [_read_ready(proc, 900) for proc in procs]
        elapsed = time.monotonic() - start
        held = sum(r["ready"] for r in ready)
        wait_quiet(server, 1.0)
        with_kib, processes = server.pss_kib()
        descriptors = server.descriptors()
        if probes:
            bench.log(f"    {server.name:10s} {probes} new connections (ssh -W to first byte) with {held} held")
            try:
                probe = _stdio_first_byte(bench, server, probes)
            except Exception as exc:  # reported in the row's note; the memory numbers stand
                probe = {"us": [], "error": f"{type(exc).__name__}: {exc}"[:300]}
    finally:
        for proc in procs:
            if proc.stdin:
                proc.stdin.close()
        for proc in procs:
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    return {
        "sessions": held,
        "failed": sum(r["failed"] for r in ready),
        "errors": sorted({e for r in ready for e in r["errors"]})[:3],
        "base_mib": base_kib / 1024,
        "total_mib": with_kib / 1024,
        "per_session_kib": (with_kib - base_kib) / held if held else math.nan,
        "processes": processes,
        "workers": server.workers,
        "max_fds_per_process": descriptors[0] if descriptors else 0,
        "fds_top": descriptors[:4],
        "client_processes": holders,
        "setup_s": elapsed,
        "probe_us": probe["us"],
        "probe_error": probe.get("error", ""),
    }


def _read_ready(proc: subprocess.Popen, timeout: float) -> dict:
    import json

    line: list[bytes] = []
    reader = threading.Thread(target=lambda: line.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    if not line or not line[0]:
        raise RuntimeError(f"hold client did not report within {timeout}s (exit {proc.poll()})")
    return json.loads(line[0])


def session_cap() -> int:
    """Sessions one bastion process can hold: two descriptors each (client, target) under its RLIMIT_NOFILE."""
    return (fd_limit() - 400) // 2 // 100 * 100


def figure_memory(bench: Bench, p: Params) -> list[Row]:
    """6: PSS per held session (session + one open tunnel), at each size, and new-connection latency while they
    are held. Ours runs as many workers as the count needs (each process has its own descriptor limit); sshd
    is capped and extrapolated."""
    rows = []
    cap = session_cap()
    measured: dict[tuple[str, int], dict] = {}
    try:
        for wanted in p.sessions:
            rows += _memory_size(bench, p, wanted, cap, measured)
    finally:
        bench.set_workers(bench.ours, 1)  # the other figures measure the single process
    return rows


def _memory_size(bench: Bench, p: Params, wanted: int, cap: int, measured: dict[tuple[str, int], dict]) -> list[Row]:
    results: dict[str, dict] = {}
    workers_needed = math.ceil(wanted / cap)
    for server in (bench.ours, bench.sshd):
        if server.name == "ours":
            n = wanted if bench.set_workers(server, workers_needed) else min(wanted, cap)
        else:
            n = min(wanted, p.sshd_session_cap, cap)
        if (server.name, n) not in measured:  # a capped size already measured is not measured again
            bench.log(f"  memory: {server.name} with {n} sessions"
                      + (f" ({server.workers} workers)" if server.workers > 1 else ""))
            measured[server.name, n] = _hold_sessions(bench, server, n, p.setup_probes)
            bench.log(f"    {server.name:10s} {_short(measured[server.name, n])}")
        results[server.name] = measured[server.name, n]
    notes = []
    for name, r in results.items():
        if r["workers"] > 1:
            notes.append(f"{name}: serve --workers {r['workers']} ({wanted:,} sessions need {2 * wanted:,} "
                         f"descriptors plus the server's own, one process may have {fd_limit():,}); PSS summed "
                         f"over supervisor and workers; at most {r['max_fds_per_process']:,} descriptors in one "
                         f"process")
        if r["sessions"] != wanted:
            why = ("sshd capped; per-session figure measured at this count, total extrapolated linearly"
                   if name == "sshd" and r["sessions"] < wanted and wanted > p.sshd_session_cap
                   else "capped by RLIMIT_NOFILE" if r["sessions"] < wanted and wanted > cap
                   else "sessions failed")
            notes.append(f"{name}: {r['sessions']} held ({why})")
        if r["failed"]:
            notes.append(f"{name}: {r['failed']} failed {r['errors']}")
    if wanted + 200 > fd_limit():
        notes.append(f"the echo target is one process with {fd_limit():,} descriptors: sessions beyond that fail")
    note = "; ".join(notes) or f"{wanted} held by each"
    per = {name: r["per_session_kib"] for name, r in results.items()}
    total = {name: (r["base_mib"] + r["per_session_kib"] * wanted / 1024) for name, r in results.items()}
    detail = {"runs": {name: {k: v for k, v in r.items() if k != "probe_us"} for name, r in results.items()}}
    rows = [Row(6, f"PSS per session with 1 tunnel, {wanted} sessions", "KiB", "lower", per["ours"],
                per["sshd"], note=note, detail=detail),
            Row(6, f"PSS total at {wanted} sessions (server tree)", "MiB", "lower", total["ours"],
                total["sshd"], note="base + per session × count (extrapolated where capped)")]
    fill = {name: r["sessions"] / r["setup_s"] for name, r in results.items()}
    rows.append(Row(6, f"sessions opened per second while filling to {wanted}", "/s", "higher", fill["ours"],
                    fill["sshd"], note="login + one tunnel each, 25 at a time per client process; a rate "
                                       "that falls as the count grows means per-login work grows with live "
                                       "sessions"))
    if p.setup_probes:
        held = " and ".join(f"{name} holding {r['sessions']:,}" for name, r in results.items())
        failed = [f"{name}: {r['probe_error']}" for name, r in results.items() if r["probe_error"]]
        probe_note = (f"n={p.setup_probes} each, one at a time, with {held}: `ssh -W lan:hello server` from "
                      f"exec to the target's first byte (TCP, key exchange, login, one direct-tcpip channel), "
                      f"as figure 4's ProxyJump leg")
        if failed:
            probe_note = "FAILED: " + "; ".join(failed) + "; " + probe_note
        for q in (50, 99):
            value = {name: percentile(r["probe_us"], q) / 1000 if r["probe_us"] else None
                     for name, r in results.items()}
            rows.append(Row(6, f"new connection + first byte while {wanted} held, p{q}", "ms", "lower",
                            value["ours"], value["sshd"], note=probe_note if q == 50 else "",
                            detail={"us": {name: r["probe_us"] for name, r in results.items()}} if q == 50 else {}))
    return rows


# ---- 8: channel opens and the audit path -----------------------------------------------------------


def figure_opens(bench: Bench, p: Params) -> list[Row]:
    """8: channel opens per second on one session, bastion with its audit DB on disk vs on tmpfs (and sshd)."""
    bench.start(bench.ours_tmpfs)
    servers = (bench.ours, bench.ours_tmpfs, bench.sshd)
    rows = []
    try:
        for concurrency in (1, 16):
            def opens(server: Server) -> dict:
                with bench.forwards(server, [HELLO_PORT]) as (port,):
                    bench.client("first-byte", "--port", port, "--count", 3)
                    cpu_before = server.cpu_seconds()
                    r = bench.client("hammer", "--port", port, "--concurrency", concurrency,
                                     "--duration", p.opens_seconds)
                    cpu = server.cpu_seconds() - cpu_before
                return {"rate": r["opens"] / r["seconds"], "failed": r["failed"],
                        "cpu_ms_per_open": 1000 * cpu / r["opens"] if r["opens"] else math.nan, "us": r["us"]}

            bench.log(f"  channel opens, {concurrency} at a time, {p.opens_seconds:g} s x {p.opens_rounds}")
            samples = interleaved(bench, p.opens_rounds, servers, opens)
            rate = {name: statistics.median(s["rate"] for s in runs) for name, runs in samples.items()}
            cpu = {name: statistics.median(s["cpu_ms_per_open"] for s in runs) for name, runs in samples.items()}
            rate_ratio, rate_how = paired(samples["ours"], samples["ours-tmpfs"], lambda s: s["rate"])
            cpu_ratio, cpu_how = paired(samples["ours"], samples["ours-tmpfs"], lambda s: s["cpu_ms_per_open"])
            failed = sum(s["failed"] for runs in samples.values() for s in runs)
            # every round's opens together: a checkpoint's fsync stalls a few opens, so it shows in the tail
            latency = {name: [us for s in runs for us in s.pop("us")] for name, runs in samples.items()}
            label = f"{concurrency} at a time" if concurrency > 1 else "one at a time"
            note = f"{failed} opens failed" if failed else ""
            rows += [
                Row(8, f"channel opens/s, {label}, audit on disk", "/s", "higher", rate["ours"], rate["sshd"],
                    note=note, detail={"runs": samples}),
                Row(8, f"channel opens/s, {label}, audit on tmpfs", "/s", "higher", rate["ours-tmpfs"],
                    rate["sshd"], note=note),
                Row(8, f"audit cost: opens/s disk vs tmpfs, {label}", "/s", "higher", rate["ours"],
                    rate["ours-tmpfs"], reference="ours, audit on tmpfs", note=rate_how, paired=rate_ratio),
                *(Row(8, f"channel open to first byte p{q}, {label}, audit disk vs tmpfs", "ms", "lower",
                      percentile(latency["ours"], q) / 1000, percentile(latency["ours-tmpfs"], q) / 1000,
                      reference="ours, audit on tmpfs",
                      note=f"sshd {percentile(latency['sshd'], q) / 1000:.3g} ms; {len(latency['ours'])} opens")
                  for q in (50, 99)),
                Row(8, f"server CPU per open, {label}, audit on disk", "ms", "lower", cpu["ours"], cpu["sshd"]),
                Row(8, f"audit cost: server CPU per open disk vs tmpfs, {label}", "ms", "lower",
                    cpu["ours"], cpu["ours-tmpfs"], reference="ours, audit on tmpfs", note=cpu_how,
                    paired=cpu_ratio),
            ]
    finally:
        bench.stop(bench.ours_tmpfs)
    return rows


FIGURES = {
    "bulk": figure_bulk,  # 1 and 2
    "parallel": figure_parallel,  # 3
    "latency": figure_latency,  # 4
    "handshakes": figure_handshakes,  # 5
    "memory": figure_memory,  # 6
    "rtt": figure_rtt,  # 7
    "opens": figure_opens,  # 8
}
