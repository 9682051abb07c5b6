"""The benchmark's client drivers, run inside the gw namespace; each prints one JSON object on stdout.

The same driver runs against both servers. Drivers that go through an `ssh -L` forward take local ports;
the asyncssh drivers (handshake, hold) connect to the server themselves.

    pull  --ports P,... --bytes N              target -> client, one connection per port, exact content check
    push  --ports P,... --bytes N              client -> target, the target checks and answers
    rtt   --port P --count K --size 64          round trips through an echo forward (microseconds)
    first-byte --port P --count K               connect to the forward, wait for the target's first byte
    hammer --port P --concurrency C --duration S   channel opens per second (connect, first byte, close)
    jump  --count K [--first-byte] -- ARGV...  wall time of a command (ssh -J ... true), or time to its first
                                                byte on stdout (ssh -W host:hello); must exit 0
    handshake --server ... --concurrency C --duration S   asyncssh connect + auth + close, per second
    (jump and handshake take --login cert|totp: an OpenSSH user certificate, or the key then a TOTP code;
    see TotpPool for how a code, good once per user per 30 s step, is never replayed)
    hold  --server ... --sessions N             N sessions each with one open direct-tcpip channel; prints
                                                {"ready": ...} and holds them until stdin closes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pattern import CHUNK, PatternReader, pattern_view  # noqa: E402


def emit(result: dict) -> None:
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=120)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


# ---- bulk ------------------------------------------------------------------------------------------


def _pull_one(port: int, size: int, out: dict) -> None:
    reader = PatternReader()
    buffer = bytearray(CHUNK)
    with _connect(port) as sock:
        sock.sendall(size.to_bytes(8, "big"))
        while n := sock.recv_into(buffer):
            reader.feed(buffer if n == CHUNK else buffer[:n])
    out.update(bytes=reader.count, ok=reader.ok and reader.count == size)


def _push_one(port: int, size: int, out: dict) -> None:
    with _connect(port) as sock:
        offset = 0
        while offset < size:
            offset += sock.send(pattern_view(offset, min(CHUNK, size - offset)))
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(64):
            answer += chunk
    count, verdict = answer.decode().split()
    out.update(bytes=int(count), ok=verdict == "ok" and int(count) == size)


def bulk(direction: str, ports: list[int], size: int) -> dict:
    """One transfer per port, all at once; the clock runs from the first connect to the last check."""
    work = _pull_one if direction == "pull" else _push_one
    results = [dict(port=p, bytes=0, ok=False, error=None) for p in ports]

    def guarded(port: int, out: dict) -> None:
        try:
            work(port, size, out)
        except Exception as exc:  # reported, never hidden: a failed transfer fails the figure
            out["error"] = f"{type(exc).__name__}: {exc}"

    threads = [threading.Thread(target=guarded, args=(p, r)) for p, r in zip(ports, results)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - start
    bad = [r for r in results if not r["ok"]]
    return {
        "seconds": seconds,
        "bytes": sum(r["bytes"] for r in results),
        "ok": not bad,
        "failures": [f"port {r['port']}: {r['error'] or 'got %d of %d bytes or wrong content' % (r['bytes'], size)}"
                     for r in bad][:5],
        "failed": len(bad),
    }


# ---- latency ---------------------------------------------------------------------------------------


def rtt(port: int, count: int, size: int) -> dict:
    message = bytes(pattern_view(0, size))
    samples = []
    with _connect(port) as sock:
        for i in range(count + 10):  # the first few warm the path up
            start = time.perf_counter()
            sock.sendall(message)
            got = 0
            while got < size:
                chunk = sock.recv(size - got)
                if not chunk:
                    raise ConnectionError("echo closed")
                got += len(chunk)
            if i >= 10:
                samples.append((time.perf_counter() - start) * 1e6)
    return {"us": samples}


def first_byte(port: int, count: int) -> dict:
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        with _connect(port) as sock:
            if sock.recv(1) != b"H":
                raise ConnectionError("no first byte")
            samples.append((time.perf_counter() - start) * 1e6)
    return {"us": samples}


async def _hammer(port: int, concurrency: int, duration: float) -> dict:
    done = failed = 0
    deadline = time.perf_counter() + duration
    samples: list[float] = []  # connect to first byte, µs: the channel open, its audit commit, the target's hello

    async def worker() -> None:
        nonlocal done, failed
        while time.perf_counter() < deadline:
            try:
                began = time.perf_counter()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                if await asyncio.wait_for(reader.readexactly(1), 30) != b"H":
                    raise ConnectionError("no first byte")
                samples.append((time.perf_counter() - began) * 1e6)
                writer.close()
                await writer.wait_closed()
                done += 1
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
                failed += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"opens": done, "failed": failed, "seconds": time.perf_counter() - start, "us": samples}


def jump(argv: list[str], count: int, first_byte: bool, totp: TotpPool | None = None, askpass: str = "") -> dict:
    """Wall time of `argv` until it exits 0, or (first_byte) until its first byte on stdout arrives. With
    `totp`, each run logs in as a user free in this step ("{user}" in argv) and OpenSSH answers the
    "Verification code:" prompt through SSH_ASKPASS: a shell script that prints the code computed here
    before the clock starts (a Python askpass would add its own start-up, tens of ms, to every login)."""
    samples = []
    run_argv, env = argv, None
    for _ in range(count):
        if totp is not None:
            while (user := totp.take()) is None:
                totp.waits += 1
                time.sleep(totp.seconds_to_next_step())
            import os

            env = dict(os.environ, SSH_ASKPASS=askpass, SSH_ASKPASS_REQUIRE="force", DISPLAY=":0",
                       BENCH_TOTP_CODE=totp.code(user))
            run_argv = [a.replace("{user}", user) for a in argv]
        start = time.perf_counter()
        proc = subprocess.Popen(run_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, start_new_session=totp is not None)
        try:
            if first_byte:
                got = proc.stdout.read(1)  # type: ignore[union-attr]
                samples.append((time.perf_counter() - start) * 1e6)
            _, err = proc.communicate(timeout=60)  # closes stdin: ssh -W sends EOF, the target closes
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode != 0 or (first_byte and got != b"H"):
            raise SystemExit(f"{' '.join(run_argv)} exited {proc.returncode}: {err.decode()[-500:]}")
        if not first_byte:
            samples.append((time.perf_counter() - start) * 1e6)
    if totp is not None:
        totp.save()
        return {"us": samples, "totp_waits": totp.waits}
    return {"us": samples}


# ---- TOTP users -------------------------------------------------------------------------------------


class TotpPool:
    """The enrolled TOTP users this process may log in as, least recently used first. The bastion takes a
    user's code once per 30 s step (a replay, or an older step, is refused), so a login takes a user not used
    in the current step, and a user is used at most once per step. The state (each user's last step) is kept
    in files in --totp-state, one per process, read (the maximum over files) by the next process; processes
    running at once take disjoint slices of the users (--slot I --slots N). When every user of the slice has
    been used in this step the login waits for the next step, counted in `waits` (it caps the rate: say so)."""

    STEP = 30

    def __init__(self, users_file: str, state_dir: str, slot: int, slots: int) -> None:
        import collections

        import pyotp

        self.state_dir = Path(state_dir)
        pairs = json.loads(Path(users_file).read_text())[slot::slots]
        self.totp = {name: pyotp.TOTP(secret) for name, secret in pairs}
        self.last: dict[str, int] = {}
        for path in self.state_dir.glob("*.json"):
            for name, step in json.loads(path.read_text()).items():
                if name in self.totp:
                    self.last[name] = max(step, self.last.get(name, -1))
        self.order = collections.deque(sorted(self.totp, key=lambda n: self.last.get(n, -1)))
        self.used: dict[str, int] = {}
        self.waits = 0
        self.slot = slot

    @classmethod
    def step(cls) -> int:
        return int(time.time()) // cls.STEP

    def take(self) -> str | None:
        """A user free in the current step (its last code was of an earlier step), or None: wait for the next."""
        name = self.order[0]
        if self.last.get(name, -1) >= self.step():
            return None
        self.order.rotate(-1)
        return name

    def code(self, name: str) -> str:
        """The current code, and the user marked used in this step (also if the login then fails)."""
        step = self.step()
        self.last[name] = self.used[name] = step
        return self.totp[name].at(step * self.STEP)

    def seconds_to_next_step(self) -> float:
        return (self.step() + 1) * self.STEP - time.time() + 0.05

    def save(self) -> None:
        import os

        (self.state_dir / f"state-{self.slot}-{os.getpid()}.json").write_text(json.dumps(self.used))


def _totp_pool(args: argparse.Namespace, slot: int = 0, slots: int = 1) -> TotpPool | None:
    return TotpPool(args.totp_users, args.totp_state, slot, slots) if args.login == "totp" else None


# ---- asyncssh clients ------------------------------------------------------------------------------


def _ssh_options(args: argparse.Namespace):
    import asyncssh

    key = asyncssh.read_private_key(args.key)
    login = getattr(args, "login", "key")  # hold has no --login
    extra = {}
    if login == "totp":
        extra = dict(kbdint_auth=True, preferred_auth=["publickey", "keyboard-interactive"])
    return asyncssh.SSHClientConnectionOptions(
        username=args.user,
        client_keys=[(key, asyncssh.read_certificate(args.cert))] if login == "cert" else [key],
        **extra,
        known_hosts=None,  # the bench pins nothing: both servers are ours, on a sealed network
        server_host_key_algs=["ssh-ed25519"],
        kex_algs=[args.kex],
        encryption_algs=[args.cipher],
        agent_path=None,
        config=None,
        connect_timeout=60,
    )


def _totp_client(pool: TotpPool, user: str):
    import asyncssh

    class Client(asyncssh.SSHClient):
        """Answers the bastion's "Verification code:" prompt with the user's current code."""

        def kbdint_auth_requested(self) -> str:
            return ""

        def kbdint_challenge_received(self, name, instructions, lang, prompts):
            return [pool.code(user)] if prompts else []

    return Client


async def _handshake(args: argparse.Namespace) -> dict:
    import asyncssh

    options = _ssh_options(args)
    pool = _totp_pool(args, args.slot, args.slots)
    done = failed = 0
    errors: set[str] = set()
    deadline = time.perf_counter() + args.duration

    async def worker() -> None:
        nonlocal done, failed
        while time.perf_counter() < deadline:
            try:
                if pool is None:
                    conn = await asyncssh.connect(args.host, args.port, options=options)
                else:
                    while (user := pool.take()) is None:
                        pool.waits += 1
                        await asyncio.sleep(min(pool.seconds_to_next_step(), max(0.0, deadline - time.perf_counter())))
                        if time.perf_counter() >= deadline:
                            return
                    conn = await asyncssh.connect(args.host, args.port, options=options, username=user,
                                                  client_factory=_totp_client(pool, user))
                conn.close()
                await conn.wait_closed()
                done += 1
            except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
                failed += 1
                errors.add(f"{type(exc).__name__}: {exc}"[:200])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    result = {"handshakes": done, "failed": failed, "seconds": time.perf_counter() - start,
              "errors": sorted(errors)[:3]}
    if pool is not None:
        pool.save()
        result["totp_waits"] = pool.waits
    return result


async def _hold(args: argparse.Namespace) -> None:
    import asyncssh

    options = _ssh_options(args)
    held = []
    failed = 0
    errors: set[str] = set()
    gate = asyncio.Semaphore(args.concurrency)

    async def open_one() -> None:
        nonlocal failed
        async with gate:
            try:
                conn = await asyncssh.connect(args.host, args.port, options=options)
                chan, _ = await conn.create_connection(asyncssh.SSHTCPSession, args.target_host, args.target_port)
                held.append((conn, chan))
            except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
                failed += 1
                errors.add(f"{type(exc).__name__}: {exc}"[:200])

    start = time.perf_counter()
    await asyncio.gather(*(open_one() for _ in range(args.sessions)))
    emit({"ready": len(held), "failed": failed, "seconds": time.perf_counter() - start, "errors": sorted(errors)[:3]})
    # Hold until the harness closes our stdin; exiting drops every connection at once.
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)


# ---- command line ----------------------------------------------------------------------------------


def main() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("pull", "push"):
        p = sub.add_parser(name)
        p.add_argument("--ports", required=True)
        p.add_argument("--bytes", type=int, required=True)
    p = sub.add_parser("rtt")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--size", type=int, default=64)
    p = sub.add_parser("first-byte")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=100)
    p = sub.add_parser("hammer")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=3.0)
    p = sub.add_parser("jump")
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--first-byte", action="store_true")
    for p in (p, sub.add_parser("handshake")):
        p.add_argument("--login", choices=("key", "cert", "totp"), default="key")
        p.add_argument("--cert", help="the OpenSSH user certificate (--login cert)")
        p.add_argument("--totp-users", help="JSON [[user, secret], ...] (--login totp)")
        p.add_argument("--totp-state", help="directory of the users' last steps used (--login totp)")
        p.add_argument("--askpass", default="", help="SSH_ASKPASS script printing $BENCH_TOTP_CODE (jump)")
        p.add_argument("--slot", type=int, default=0, help="this process's slice of the TOTP users")
        p.add_argument("--slots", type=int, default=1)
    sub.choices["jump"].add_argument("argv", nargs=argparse.REMAINDER)
    for name in ("handshake", "hold"):
        p = sub.choices[name] if name in sub.choices else sub.add_parser(name)
        p.add_argument("--host", required=True)
        p.add_argument("--port", type=int, required=True)
        p.add_argument("--user", required=True)
        p.add_argument("--key", required=True)
        p.add_argument("--kex", default="curve25519-sha256")
        p.add_argument("--cipher", default="aes128-gcm@openssh.com")
        p.add_argument("--concurrency", type=int, default=8)
        p.add_argument("--duration", type=float, default=3.0)
        p.add_argument("--sessions", type=int, default=100)
        p.add_argument("--target-host", default="")
        p.add_argument("--target-port", type=int, default=0)
    args = parser.parse_args()

    if args.command in ("pull", "push"):
        emit(bulk(args.command, [int(p) for p in args.ports.split(",")], args.bytes))
    elif args.command == "rtt":
        emit(rtt(args.port, args.count, args.size))
    elif args.command == "first-byte":
        emit(first_byte(args.port, args.count))
    elif args.command == "hammer":
        emit(asyncio.run(_hammer(args.port, args.concurrency, args.duration)))
    elif args.command == "jump":
        argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
        emit(jump(argv, args.count, args.first_byte, _totp_pool(args), args.askpass))
    elif args.command == "handshake":
        emit(asyncio.run(_handshake(args)))
    elif args.command == "hold":
        asyncio.run(_hold(args))


if __name__ == "__main__":
    main()
