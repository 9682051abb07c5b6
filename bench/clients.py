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


def jump(argv: list[str], count: int, first_byte: bool) -> dict:
    """Wall time of `argv` until it exits 0, or (first_byte) until its first byte on stdout arrives."""
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
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
            raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {err.decode()[-500:]}")
        if not first_byte:
            samples.append((time.perf_counter() - start) * 1e6)
    return {"us": samples}


# ---- asyncssh clients ------------------------------------------------------------------------------


def _ssh_options(args: argparse.Namespace):
    import asyncssh

    return asyncssh.SSHClientConnectionOptions(
        username=args.user,
        client_keys=[asyncssh.read_private_key(args.key)],
        known_hosts=None,  # the bench pins nothing: both servers are ours, on a sealed network
        server_host_key_algs=["ssh-ed25519"],
        kex_algs=[args.kex],
        encryption_algs=[args.cipher],
        agent_path=None,
        config=None,
        connect_timeout=60,
    )


async def _handshake(args: argparse.Namespace) -> dict:
    import asyncssh

    options = _ssh_options(args)
    done = failed = 0
    errors: set[str] = set()
    deadline = time.perf_counter() + args.duration

    async def worker() -> None:
        nonlocal done, failed
        while time.perf_counter() < deadline:
            try:
                conn = await asyncssh.connect(args.host, args.port, options=options)
                conn.close()
                await conn.wait_closed()
                done += 1
            except (OSError, asyncssh.Error, asyncio.TimeoutError) as exc:
                failed += 1
                errors.add(f"{type(exc).__name__}: {exc}"[:200])

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return {"handshakes": done, "failed": failed, "seconds": time.perf_counter() - start, "errors": sorted(errors)[:3]}


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
    p.add_argument("argv", nargs=argparse.REMAINDER)
    for name in ("handshake", "hold"):
        p = sub.add_parser(name)
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
        emit(jump(argv, args.count, args.first_byte))
    elif args.command == "handshake":
        emit(asyncio.run(_handshake(args)))
    elif args.command == "hold":
        asyncio.run(_hold(args))


if __name__ == "__main__":
    main()
