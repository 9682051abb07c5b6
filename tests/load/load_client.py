"""Load generator for tests/load (issue #5): many asyncssh clients in one process, run inside the testbed's
gw namespace with `ip netns exec` by test_load.py (it imports nothing from the bastion or the testbed).

Two roles:

- `legit`: N SSH connections, each logged in with a granted key, each looping: open a direct-tcpip channel to
  the echo target, send a payload, half-close, read the echo back until EOF, compare, close; after
  `--tunnels-per-session` tunnels the connection is closed and a new one made. Every failure is counted
  with its phase and kind; after a failure the worker backs off briefly and reconnects.
- `brute`: W workers connecting from `--source` (a second address of gw, so per-source penalties hit them
  and not the legitimate clients) with random keys the bastion has never seen. Outcomes are counted:
  keys rejected, connection dropped (penalty or startup limit), timeouts, and unexpected successes.

Signals: SIGUSR1 = "the server is about to be killed" (later failures count as `outage`), SIGUSR2 = "the
server is back" (later failures count as `restarted`), SIGTERM = stop now. At the end (duration elapsed or
SIGTERM) every connection is closed cleanly and the totals are written as JSON to `--out`. While running,
one JSON status line a second goes to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import asyncssh

PHASES = ("before_kill", "outage", "restarted")
OP_TIMEOUT = 60.0  # one connect or one tunnel round trip; a legitimate client sees more as an error


@dataclass
class Totals:
    started: float = field(default_factory=time.monotonic)
    phase: str = "before_kill"
    opens: Counter = field(default_factory=Counter)  # confirmed channel opens, by phase
    tunnels_ok: Counter = field(default_factory=Counter)  # full echo round trips, by phase
    sessions: Counter = field(default_factory=Counter)  # logins, by phase
    errors: Counter = field(default_factory=Counter)  # by phase
    error_kinds: Counter = field(default_factory=Counter)  # "phase | where | Type: message"
    error_samples: list = field(default_factory=list)  # the first few, with times
    error_last: dict = field(default_factory=dict)  # "phase | where | Type" -> seconds of its latest
    bytes_echoed: int = 0
    connected: int = 0
    open_latency: list = field(default_factory=list)  # seconds, sampled
    round_trip: list = field(default_factory=list)
    login_latency: list = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)  # brute force outcomes
    first_open_after_restart: float | None = None
    restart_signalled: float | None = None

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def error(self, where: str, exc: BaseException) -> None:
        self.errors[self.phase] += 1
        text = f"{type(exc).__name__}: {exc}"[:200]
        self.error_kinds[f"{self.phase} | {where} | {text}"] += 1
        self.error_last[f"{self.phase} | {where} | {type(exc).__name__}"] = round(self.elapsed(), 3)
        if len(self.error_samples) < 40:
            self.error_samples.append({"t": round(self.elapsed(), 3), "phase": self.phase, "where": where,
                                       "error": text})


def _sample(values: list, value: float, limit: int = 20000) -> None:
    """Keep at most `limit` samples (reservoir-free: enough for percentiles of a 60 s run)."""
    if len(values) < limit:
        values.append(value)
    elif random.random() < 0.1:
        values[random.randrange(limit)] = value


def percentiles(values: list) -> dict:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"p50": pick(0.50), "p95": pick(0.95), "p99": pick(0.99), "max": ordered[-1], "n": len(values)}


# ---- legitimate clients -------------------------------------------------------------------------


async def one_tunnel(conn: asyncssh.SSHClientConnection, host: str, port: int, payload: bytes,
                     totals: Totals) -> None:
    began = time.monotonic()
    reader, writer = await conn.open_connection(host, port)
    opened = time.monotonic()
    totals.opens[totals.phase] += 1
    if totals.phase == "restarted" and totals.first_open_after_restart is None:
        totals.first_open_after_restart = totals.elapsed()
    _sample(totals.open_latency, opened - began)
    try:
        writer.write(payload)
        writer.write_eof()
        echoed = await reader.read()  # until the target's EOF
        if echoed != payload:
            raise RuntimeError(f"echo mismatch: sent {len(payload)} bytes, got {len(echoed)} back "
                               f"({'different content' if len(echoed) == len(payload) else 'truncated'})")
    finally:
        writer.close()
    await writer.channel.wait_closed()
    _sample(totals.round_trip, time.monotonic() - began)
    totals.tunnels_ok[totals.phase] += 1
    totals.bytes_echoed += len(payload)


async def legit_worker(index: int, args: argparse.Namespace, options: list, totals: Totals,
                       stop: asyncio.Event) -> None:
    rng = random.Random(index)
    host, port = args.target.rsplit(":", 1)
    await asyncio.sleep(args.ramp * index / max(1, args.connections))  # spread the logins
    while not stop.is_set():
        began = time.monotonic()
        try:
            conn = await asyncio.wait_for(
                asyncssh.connect(args.host, args.port, options=options[index % len(options)]), OP_TIMEOUT)
        except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
            totals.error("connect", exc)
            await _backoff(rng, stop)
            continue
        totals.sessions[totals.phase] += 1
        _sample(totals.login_latency, time.monotonic() - began)
        totals.connected += 1
        broke = False
        try:
            done = 0
            while not stop.is_set() and (not args.tunnels_per_session or done < args.tunnels_per_session):
                payload = rng.randbytes(rng.randint(args.payload // 2, args.payload))
                try:
                    await asyncio.wait_for(one_tunnel(conn, host, int(port), payload, totals), OP_TIMEOUT)
                except (OSError, asyncssh.Error, asyncio.TimeoutError, RuntimeError) as exc:
                    totals.error("tunnel", exc)
                    broke = True
                    break
                done += 1
                if args.think:
                    await asyncio.sleep(rng.uniform(0, 2 * args.think))
        finally:
            totals.connected -= 1
            conn.close()
            try:
                await asyncio.wait_for(conn.wait_closed(), 10)
            except asyncio.TimeoutError as exc:
                totals.error("close", exc)
        if broke and not stop.is_set():
            await _backoff(rng, stop)  # back off before logging in again


async def _backoff(rng: random.Random, stop: asyncio.Event) -> None:
    try:
        await asyncio.wait_for(stop.wait(), rng.uniform(0.2, 1.0))
    except asyncio.TimeoutError:
        pass


def legit_options(args: argparse.Namespace) -> list:
    """One options object per user, built once (asyncssh would otherwise re-read files per connect)."""
    options = []
    for user in args.users.split(","):
        key = asyncssh.read_private_key(Path(args.key_dir) / user)
        options.append(asyncssh.SSHClientConnectionOptions(
            username=user, client_keys=[key], known_hosts=args.known_hosts, config=[], agent_path=None,
            preferred_auth="publickey", keepalive_interval=0,
        ))
    return options


# ---- brute force --------------------------------------------------------------------------------


async def brute_worker(index: int, args: argparse.Namespace, pool: list, totals: Totals,
                       stop: asyncio.Event) -> None:
    rng = random.Random(1000 + index)
    users = args.users.split(",") + ["root", "admin", "oracle", "git"]
    while not stop.is_set():
        keys = rng.sample(pool, rng.randint(1, 8))  # sometimes more than max_auth_tries
        options = asyncssh.SSHClientConnectionOptions(
            username=rng.choice(users), client_keys=keys, known_hosts=None, config=[], agent_path=None,
            preferred_auth="publickey",
        )
        totals.outcomes["attempts"] += 1
        try:
            # local_addr must be an argument of connect(): its default () overrides the one in `options`
            conn = await asyncio.wait_for(
                asyncssh.connect(args.host, args.port, local_addr=(args.source, 0), options=options), OP_TIMEOUT)
        except asyncssh.PermissionDenied:
            totals.outcomes["keys rejected"] += 1
        except asyncssh.DisconnectError as exc:
            reason = "too many auth failures" if exc.code == asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE else \
                f"disconnected ({exc.reason})"
            totals.outcomes[reason] += 1
        except (asyncssh.ConnectionLost, ConnectionResetError, BrokenPipeError):
            totals.outcomes["dropped"] += 1  # closed before or during the key exchange: penalty or startup limit
        except asyncio.TimeoutError:
            totals.outcomes["timeout"] += 1
        except ConnectionRefusedError:
            totals.outcomes["refused (server down)"] += 1
        except (OSError, asyncssh.Error) as exc:
            totals.outcomes[f"{type(exc).__name__}: {exc}"[:120]] += 1
        else:
            totals.outcomes["UNEXPECTED SUCCESS"] += 1
            conn.close()
        try:
            await asyncio.wait_for(stop.wait(), rng.uniform(0.5, 1.5) * args.interval)
        except asyncio.TimeoutError:
            pass


# ---- main ---------------------------------------------------------------------------------------


def status(totals: Totals, role: str) -> dict:
    return {
        "t": round(totals.elapsed(), 2), "role": role, "phase": totals.phase, "connected": totals.connected,
        "opens": sum(totals.opens.values()), "opens_by_phase": dict(totals.opens),
        "errors": dict(totals.errors), "sessions": sum(totals.sessions.values()),
        "brute": dict(totals.outcomes),
    }


async def main(args: argparse.Namespace) -> int:
    totals = Totals()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def set_phase(phase: str) -> None:
        totals.phase = phase
        if phase == "restarted":
            totals.restart_signalled = totals.elapsed()

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, set_phase, "outage")
    loop.add_signal_handler(signal.SIGUSR2, set_phase, "restarted")

    if args.role == "legit":
        options = legit_options(args)
        workers = [legit_worker(i, args, options, totals, stop) for i in range(args.connections)]
    else:
        pool = [asyncssh.generate_private_key("ssh-ed25519") for _ in range(40)]
        workers = [brute_worker(i, args, pool, totals, stop) for i in range(args.connections)]
    tasks = [asyncio.ensure_future(w) for w in workers]

    async def report() -> None:
        while True:
            print(json.dumps(status(totals, args.role)), flush=True)
            await asyncio.sleep(1)

    reporter = asyncio.ensure_future(report())
    try:
        await asyncio.wait_for(stop.wait(), args.duration)
    except asyncio.TimeoutError:
        stop.set()
    ended_at = totals.elapsed()
    # every worker notices `stop` after its current tunnel and closes its connection cleanly
    done, pending = await asyncio.wait(tasks, timeout=OP_TIMEOUT + 15)
    for task in pending:
        task.cancel()
    crashed = [repr(t.exception()) for t in done if not t.cancelled() and t.exception() is not None]
    reporter.cancel()
    result = {
        **status(totals, args.role),
        "duration": ended_at,
        "tunnels_ok": dict(totals.tunnels_ok),
        "sessions_by_phase": dict(totals.sessions),
        "error_kinds": dict(totals.error_kinds.most_common(200)),
        "error_samples": totals.error_samples,
        "error_last": totals.error_last,
        "bytes_echoed": totals.bytes_echoed,
        "open_latency": percentiles(totals.open_latency),
        "round_trip": percentiles(totals.round_trip),
        "login_latency": percentiles(totals.login_latency),
        "first_open_after_restart": totals.first_open_after_restart,
        "restart_signalled": totals.restart_signalled,
        "workers_stuck": len(pending),
        "workers_crashed": crashed,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"done": True, "t": round(totals.elapsed(), 2)}), flush=True)
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", choices=("legit", "brute"))
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, default=22)
    parser.add_argument("--users", required=True, help="comma list; legit: keys are KEY_DIR/USER")
    parser.add_argument("--key-dir", default="")
    parser.add_argument("--known-hosts", default=None)
    parser.add_argument("--target", default="10.99.0.2:7")
    parser.add_argument("--connections", type=int, required=True, help="legit connections or brute workers")
    parser.add_argument("--duration", type=float, required=True)
    parser.add_argument("--ramp", type=float, default=5.0, help="seconds over which logins are spread")
    parser.add_argument("--payload", type=int, default=4096, help="largest payload per tunnel (bytes)")
    parser.add_argument("--tunnels-per-session", type=int, default=100, help="0: never log in again")
    parser.add_argument("--think", type=float, default=0.0, help="mean pause between tunnels (s)")
    parser.add_argument("--source", default=None, help="brute: local address to connect from")
    parser.add_argument("--interval", type=float, default=0.3, help="brute: mean pause between attempts (s)")
    parser.add_argument("--out", required=True)
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args(sys.argv[1:]))))
