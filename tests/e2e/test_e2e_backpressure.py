"""A client that stops reading cannot make the bastion hold what its target sends (issue #18, item 6).

The channel window is the client's to choose: a client announcing 1 GiB and then reading nothing at all
used to make the bastion queue everything the target sent in memory. Each test here opens one channel with
such a window (`direct-tcpip` for -L, `forwarded-tcpip` for an inbound -R connection) from an asyncssh
client process, stops that process (SIGSTOP: its socket is not read any more, as with a stalled or hostile
client), lets the other end send 300 MB, and measures the serve process's resident memory with psutil.
Then the client reads again, and so must the bastion: the relay waits for the SSH connection's transport to
drain, on uvloop and asyncio, with the fast path and with asyncssh as shipped.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import socket
import subprocess
import sys
import threading
import time

import psutil
import pytest

from testbed import DEFAULT_POLICY, LAN_ADDR, kill_group, netns_connect, netns_socket, stop_process

pytestmark = pytest.mark.netns

STREAM_PORT = 7009  # the lan target that sends without reading
LISTEN_PORT = 9007  # the -R listener on the bastion
WINDOW = 1 << 30  # what the client announces for its channel
STREAM_BYTES = 300_000_000
GROWTH_LIMIT = 64 * 1024 * 1024
STALL_SECONDS = 1.0  # the sender saw no progress this long: the bastion stopped reading it

POLICY = DEFAULT_POLICY.replace(
    f'"{LAN_ADDR}:', f'"{LAN_ADDR}:{STREAM_PORT},', 1) + f'listen = ["127.0.0.1:{LISTEN_PORT}"]\n'

# The client: asyncssh, with a WINDOW receive window on its one channel; prints "open" once the channel is
# open, then idles (the test stops it).
_CLIENT = r'''
import asyncio, sys
import asyncssh

async def main(mode, window, host, port, key, known_hosts, target_host, target_port):
    async with asyncssh.connect(host, int(port), username="alice", client_keys=[key], known_hosts=known_hosts,
                                agent_path=None) as conn:
        opened = asyncio.Event()

        class Session(asyncssh.SSHTCPSession):
            def connection_made(self, chan):
                opened.set()

        if mode == "L":
            await conn.create_connection(Session, target_host, int(target_port), window=int(window))
        else:
            await conn.create_server(lambda *origin: Session(), target_host, int(target_port), window=int(window))
            print("listening", flush=True)
        await opened.wait()
        print("open", flush=True)
        await asyncio.Event().wait()

asyncio.run(main(*sys.argv[1:]))
'''


@pytest.fixture
def started(bastion):
    """The standard bastion with the stream target and one -R port granted, restarted on `event_loop` and
    without the fast path if asked."""
    def start(event_loop: str = "uvloop", fast_path: bool = True):
        bastion.apply_policy(POLICY)
        if (event_loop, fast_path) != ("uvloop", True):
            bastion.stop()
            bastion.set_config(event_loop=event_loop)
            bastion.start(env=None if fast_path else {"BASTION_FAST_PATH": "false"})
        return bastion
    return start


@contextlib.contextmanager
def stalled_client(testbed, bastion, keys, tmp_path, mode: str, host: str, port: int):
    """The asyncssh client, in gw; yields once it is started (see `_CLIENT`), and is killed on the way out."""
    script = tmp_path / "client.py"
    script.write_text(_CLIENT)
    known_hosts = tmp_path / "known_hosts"
    known_hosts.write_text("".join(f"{bastion.host} {line}\n" for line in bastion.host_public_keys()))
    argv = [sys.executable, script, mode, str(WINDOW), bastion.host, str(bastion.port), keys["alice"].path,
            known_hosts, host, str(port)]
    proc = testbed.popen(testbed.gw, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        kill_group(proc)
        stop_process(proc)


def wait_line(proc: subprocess.Popen, expected: bytes, timeout: float = 10.0) -> None:
    lines: queue.Queue[bytes] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"the client did not say {expected!r} within {timeout:.0f} s") from None
    assert line.strip() == expected, f"client said {line!r}; stderr: {proc.stderr.read1(4096)!r}"


def send(sock: socket.socket, count: int) -> int:
    """Send up to `count` bytes; stop early once nothing has been taken for STALL_SECONDS. Returns bytes sent."""
    chunk = memoryview(bytes(1 << 20))
    sock.settimeout(0.1)
    sent, progress = 0, time.monotonic()
    while sent < count:
        try:
            sent += sock.send(chunk[:count - sent])
            progress = time.monotonic()
        except (TimeoutError, BlockingIOError):
            if time.monotonic() - progress > STALL_SECONDS:
                break
    return sent


def rss(bastion) -> int:
    return psutil.Process(bastion.proc.pid).memory_info().rss


def stall_and_resume(bastion, client: subprocess.Popen, sock: socket.socket, label: str) -> None:
    """1. the channel is open 2. the client stops reading 3. 300 MB are sent at it: the bastion stops taking
    them, and the serve process grows < 64 MiB 4. the client reads again: so does the bastion."""
    wait_line(client, b"open")
    client.send_signal(signal.SIGSTOP)
    before = rss(bastion)
    sent = send(sock, STREAM_BYTES)
    growth = rss(bastion) - before
    print(f"{label}: {sent / 1e6:.0f} MB sent while the client was stopped, serve grew {growth / 2**20:.1f} MiB")
    assert growth < GROWTH_LIMIT, f"serve grew {growth / 2**20:.0f} MiB; {sent / 1e6:.0f} MB were sent"
    client.send_signal(signal.SIGCONT)
    more = 32 * 2**20
    assert send(sock, more) == more, "the bastion did not read its peer again once the client read again"
    assert bastion.proc.poll() is None


@pytest.mark.parametrize("event_loop, fast_path", [("uvloop", True), ("asyncio", True), ("uvloop", False)],
                         ids=["uvloop", "asyncio", "asyncssh-as-shipped"])
def test_direct_tcpip_to_a_stalled_client_is_bounded(started, testbed, keys, tmp_path, event_loop, fast_path):
    bastion = started(event_loop, fast_path)
    server = netns_socket(testbed.lan)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((LAN_ADDR, STREAM_PORT))
    server.listen(1)
    server.settimeout(10)
    with server, stalled_client(testbed, bastion, keys, tmp_path, "L", LAN_ADDR, STREAM_PORT) as client:
        target, _ = server.accept()
        with target:
            stall_and_resume(bastion, client, target, f"-L, {event_loop}, fast path {fast_path}")


def test_inbound_remote_forward_to_a_stalled_client_is_bounded(started, testbed, keys, tmp_path):
    bastion = started()
    with stalled_client(testbed, bastion, keys, tmp_path, "R", "127.0.0.1", LISTEN_PORT) as client:
        wait_line(client, b"listening")
        with netns_connect(testbed.gw, ("127.0.0.1", LISTEN_PORT)) as inbound:
            stall_and_resume(bastion, client, inbound, "-R")
