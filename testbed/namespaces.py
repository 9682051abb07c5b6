"""The sealed network: two namespaces joined by a veth pair, with no default route, and ways in for the test
process (sockets made in a namespace) and for programs (`ip netns exec`).

    bt-gw-XXXX  10.99.0.1/24   the bastion under test and every client (OpenSSH, paramiko, curl)
        |  veth
    bt-lan-XXXX 10.99.0.2/24   the targets (targets.py)
                10.99.0.3/24

Neither namespace has a default route, so a connect to a public address from either one fails at once with
ENETUNREACH: a policy bug fails a test, it never sends a packet off this machine. `/etc/netns/<gw>/hosts`
maps TEST_HOSTS; `ip netns exec` bind-mounts it over `/etc/hosts` for processes started in gw.

Processes are started with `ip netns exec` (which execs, so the pid we hold is the program's own pid) and
killed by that pid. Sockets for the test process itself are created in a short-lived thread that has
joined the namespace with setns(2): a socket keeps the namespace it was created in.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from testbed.keys import Key
from testbed.processes import SSH, SSH_KEYGEN, SSHD, TestbedError, clean_env, run, stop_process, wait_until

GW_ADDR = "10.99.0.1"
LAN_ADDR = "10.99.0.2"
LAN_ADDR2 = "10.99.0.3"
PREFIX_LEN = 24

# name -> addresses, one hosts line each (mixed.evil.test has two lines on purpose)
TEST_HOSTS: dict[str, tuple[str, ...]] = {
    "db.corp.internal": (LAN_ADDR,),
    "web.corp.internal": (LAN_ADDR,),
    "meta.evil.test": ("169.254.169.254",),
    "loop.evil.test": ("127.0.0.1",),
    "pub.evil.test": ("8.8.8.8",),
    "mixed.evil.test": (LAN_ADDR, "169.254.169.254"),
}

CLONE_NEWNET = 0x40000000

T = TypeVar("T")


def netns_unavailable() -> str | None:
    """Why the namespace tests cannot run on this machine, or None when they can (root, iproute2, OpenSSH)."""
    if os.geteuid() != 0:
        return "needs root: creates network namespaces with `ip netns` (run the suite as root, as CI does)"
    missing = [tool for tool in ("ip", SSH, SSHD, SSH_KEYGEN) if shutil.which(tool) is None]
    if missing:
        return f"needs {', '.join(missing)} (iproute2 and openssh-server/client)"
    return None


def skip_netns_tests_if_unavailable(items) -> None:
    """For a conftest's pytest_collection_modifyitems: mark the `netns` tests skipped, with the reason, where the
    namespaces cannot be made."""
    import pytest

    reason = netns_unavailable()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if item.get_closest_marker("netns"):
            item.add_marker(skip)


_libc = ctypes.CDLL(None, use_errno=True)


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run `fn` in a fresh thread that has joined network namespace `ns`; the caller's thread is untouched."""
    result: list[T] = []
    error: list[BaseException] = []

    def worker() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as exc:  # handed to the caller below
            error.append(exc)

    thread = threading.Thread(target=worker, name=f"netns-{ns}")
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


def netns_socket(ns: str, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket that lives in namespace `ns` (connect/bind/listen on it use that namespace's network)."""
    return in_netns(ns, lambda: socket.socket(family, type))


def netns_connect(ns: str, address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
    """A TCP connection from inside `ns`."""
    sock = netns_socket(ns, socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
    sock.settimeout(timeout)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    return sock


def free_port(ns: str) -> int:
    """A TCP port that is free on 127.0.0.1 in `ns` right now (nothing else runs there, so it stays free)."""
    sock = netns_socket(ns)
    try:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
    finally:
        sock.close()


def listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state in the network namespace of process `pid` (from /proc, no connection made)."""
    ports: set[int] = set()
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3 and fields[3] == "0A":  # TCP_LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


def wait_listening(proc: subprocess.Popen[Any], port: int, what: str, timeout: float = 10.0) -> None:
    """Wait until `proc`'s namespace has a listener on `port`, failing early if `proc` dies."""

    def ready() -> bool:
        if proc.poll() is not None:
            raise TestbedError(f"{what} exited with {proc.returncode} before listening on port {port}")
        return port in listening_ports(proc.pid)

    wait_until(ready, timeout, f"{what} to listen on port {port}")


class Testbed:
    """Two namespaces joined by a veth pair, hosts-file names in gw, and the processes started in them.

    Use as a context manager (or call `close()`): teardown kills what it started by pid, deletes both
    namespaces (which removes the veth pair) and the /etc/netns directories it wrote.
    """

    __test__ = False

    def __init__(self, workdir: Path, suffix: str | None = None) -> None:
        self.workdir = workdir
        self.suffix = suffix or secrets.token_hex(3)
        self.gw = f"bt-gw-{self.suffix}"
        self.lan = f"bt-lan-{self.suffix}"
        self._veth_gw = f"btg{self.suffix}"[:15]
        self._veth_lan = f"btl{self.suffix}"[:15]
        self._namespaces: list[str] = []
        self._etc_dirs: list[Path] = []
        self._procs: dict[str, subprocess.Popen[bytes]] = {}
        # set by targets.start_targets, read by the clients: the target sshd's host key and a key it accepts
        self.target_host_key: Key | None = None
        self.target_client_key: Key | None = None
        self.http_root = workdir / "http"

    # lifecycle

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def create(self) -> Testbed:
        """Create both namespaces, the veth pair, addresses and /etc/netns files."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        try:
            for ns in (self.gw, self.lan):
                run(["ip", "netns", "add", ns], check=True)
                self._namespaces.append(ns)
            # created inside gw with its peer moved straight into lan: nothing appears in the host namespace
            self.ip(self.gw, "link", "add", self._veth_gw, "type", "veth", "peer", "name", self._veth_lan,
                    "netns", self.lan)
            self.ip(self.gw, "addr", "add", f"{GW_ADDR}/{PREFIX_LEN}", "dev", self._veth_gw)
            self.ip(self.lan, "addr", "add", f"{LAN_ADDR}/{PREFIX_LEN}", "dev", self._veth_lan)
            self.ip(self.lan, "addr", "add", f"{LAN_ADDR2}/{PREFIX_LEN}", "dev", self._veth_lan)
            for ns, dev in ((self.gw, self._veth_gw), (self.lan, self._veth_lan)):
                self.ip(ns, "link", "set", "lo", "up")
                self.ip(ns, "link", "set", dev, "up")
            self._write_etc(self.gw, TEST_HOSTS)
            self._write_etc(self.lan, {})
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        errors: list[str] = []
        for name, proc in reversed(list(self._procs.items())):
            try:
                stop_process(proc)
            except Exception as exc:  # keep tearing down; report at the end
                errors.append(f"stop {name}: {exc}")
        self._procs.clear()
        for ns in reversed(self._namespaces):
            # anything still running in our namespace was started by this suite: end it by pid
            for pid in self.pids(ns):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            result = run(["ip", "netns", "del", ns])
            if result.returncode != 0:
                errors.append(f"ip netns del {ns}: {result.stderr.decode().strip()}")
        self._namespaces.clear()
        for path in self._etc_dirs:
            shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            Path("/etc/netns").rmdir()  # only if empty, i.e. no other testbed uses it
        self._etc_dirs.clear()
        if errors:
            raise TestbedError("teardown incomplete: " + "; ".join(errors))

    def _write_etc(self, ns: str, hosts: dict[str, tuple[str, ...]]) -> None:
        etc = Path("/etc/netns") / ns
        etc.mkdir(parents=True, exist_ok=True)
        self._etc_dirs.append(etc)
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
        lines += [f"{addr} {name}" for name, addrs in hosts.items() for addr in addrs]
        (etc / "hosts").write_text("\n".join(lines) + "\n")
        (etc / "resolv.conf").write_text("")  # no DNS servers: lookups stay in the hosts file

    # running things inside

    def argv(self, ns: str, argv: Sequence[str | os.PathLike[str]]) -> list[str]:
        return ["ip", "netns", "exec", ns, *map(os.fspath, argv)]

    def run(self, ns: str, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        """Run to completion inside `ns` (same keywords as `run`: timeout, input, check, env)."""
        return run(self.argv(ns, argv), **kw)

    def popen(self, ns: str, argv: Sequence[str | os.PathLike[str]], **kw: Any) -> subprocess.Popen[bytes]:
        """Start inside `ns`; the caller owns the process (see `stop_process`)."""
        kw.setdefault("env", clean_env())
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", True)
        return subprocess.Popen(self.argv(ns, argv), **kw)

    def ip(self, ns: str, *args: str) -> None:
        run(["ip", "-n", ns, *args], check=True)

    def pids(self, ns: str) -> list[int]:
        result = run(["ip", "netns", "pids", ns])
        return [int(p) for p in result.stdout.split()] if result.returncode == 0 else []

    def connect(self, ns: str, address: tuple[str, int], timeout: float = 5.0) -> socket.socket:
        return netns_connect(ns, address, timeout)

    # servers that run in a namespace until close()

    def start(self, name: str, ns: str, argv: Sequence[str | os.PathLike[str]], port: int) -> None:
        """Start a server in `ns`, its output in WORKDIR/NAME.log; returns once it listens on `port`. `close()`
        stops it."""
        log = (self.workdir / f"{name}.log").open("wb")
        proc = self.popen(ns, argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._procs[name] = proc
        wait_listening(proc, port, name)

    def target_log(self, name: str) -> str:
        """The output of the server `start` ran as `name`."""
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""
