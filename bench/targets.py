"""The benchmark's targets, run inside the lan namespace: one process, every port.

    python bench/targets.py --host 0.0.0.0

- SOURCE_PORT: read an 8-byte big-endian length N, send N bytes of the pattern, close (target -> client).
- SINK_PORT: read until EOF, compare every byte with the pattern, answer `count ok|bad\n`, close
  (client -> target). The comparison is exact, so a short, reordered or duplicated stream is caught.
- ECHO_PORT: echo until EOF (round trips, held sessions).
- HELLO_PORT: send one byte at once, then wait for the peer to close (first-byte latency, channel opens).

Bulk ports use a thread per connection with blocking sockets (the cheapest way to move bytes in Python);
echo and hello use asyncio so that ten thousand idle connections cost little.
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import socket
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pattern import CHUNK, PatternReader, pattern_view  # noqa: E402

SOURCE_PORT = 5001
SINK_PORT = 5002
ECHO_PORT = 5007
HELLO_PORT = 5008


def _serve_threads(host: str, port: int, handle) -> None:
    server = socket.create_server((host, port), backlog=1024)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("short header")
        data += chunk
    return data


def handle_source(conn: socket.socket) -> None:
    with conn:
        try:
            remaining = int.from_bytes(_recv_exactly(conn, 8), "big")
            offset = 0
            while remaining:
                view = pattern_view(offset, min(CHUNK, remaining))
                sent = conn.send(view)
                offset += sent
                remaining -= sent
            conn.shutdown(socket.SHUT_WR)
            conn.recv(1)  # wait for the client's close, so our close never resets unread data
        except OSError:
            pass


def handle_sink(conn: socket.socket) -> None:
    with conn:
        reader = PatternReader()
        buffer = bytearray(CHUNK)
        try:
            while size := conn.recv_into(buffer):
                reader.feed(buffer if size == len(buffer) else buffer[:size])
            conn.sendall(f"{reader.count} {'ok' if reader.ok else 'bad'}\n".encode())
        except OSError:
            pass


class _Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


class _Hello(asyncio.Protocol):
    def connection_made(self, transport):
        transport.write(b"H")


async def _serve_async(host: str) -> None:
    loop = asyncio.get_running_loop()
    await loop.create_server(_Echo, host, ECHO_PORT, backlog=4096)
    await loop.create_server(_Hello, host, HELLO_PORT, backlog=4096)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="0.0.0.0")
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    threading.stack_size(512 * 1024)
    for port, handle in ((SOURCE_PORT, handle_source), (SINK_PORT, handle_sink)):
        threading.Thread(target=_serve_threads, args=(args.host, port, handle), daemon=True).start()
    asyncio.run(_serve_async(args.host))


if __name__ == "__main__":
    main()
