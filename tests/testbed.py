"""A sealed network testbed for end-to-end tests: namespaces, targets, the bastion process and its clients.

Layout (see /work/shared/TESTBED.md)::

    bt-gw-XXXX  10.99.0.1/24   the bastion under test and every client (OpenSSH, paramiko, curl)
        |  veth
    bt-lan-XXXX 10.99.0.2/24   target sshd :22, HTTP :8080 (10.99.0.2 only),
                10.99.0.3/24   echo :7 and close-first :7001 (all addresses)

Neither namespace has a default route, so a connect to a public address from either one fails at once with
ENETUNREACH: a policy bug fails a test, it never sends a packet off this machine. `/etc/netns/<gw>/hosts`
maps the test names below; `ip netns exec` bind-mounts it over `/etc/hosts` for processes started in gw.

Processes are started with `ip netns exec` (which execs, so the pid we hold is the program's own pid) and
killed by that pid. Sockets for the test process itself are created in a short-lived thread that has
joined the namespace with setns(2): a socket keeps the namespace it was created in.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

GW_ADDR = "10.99.0.1"
LAN_ADDR = "10.99.0.2"
LAN_ADDR2 = "10.99.0.3"
PREFIX_LEN = 24

SSH_PORT = 22
ECHO_PORT = 7
HTTP_PORT = 8080
CLOSE_FIRST_PORT = 7001
CLOSED_PORT = 9  # nothing listens here: connect() gets a RST

# name -> addresses, one hosts line each (mixed.evil.test has two lines on purpose)
TEST_HOSTS: dict[str, tuple[str, ...]] = {
    "db.corp.internal": (LAN_ADDR,),
    "web.corp.internal": (LAN_ADDR,),
    "meta.evil.test": ("169.254.169.254",),
    "loop.evil.test": ("127.0.0.1",),
    "pub.evil.test": ("8.8.8.8",),
    "mixed.evil.test": (LAN_ADDR, "169.254.169.254"),
}

# The standard grants for alice. Some grants are there on purpose so that the refusal must come from the
# address checks and not from the policy: the group grants 10.99.0.0/24:22, which includes the bastion's own
# 10.99.0.1:22 and the denied 10.99.0.3:22; alice's name grants cover *.evil.test (names that resolve to
# metadata, loopback and public addresses) and nosuch.corp.internal (a name that does not resolve).
DEFAULT_POLICY = f"""\
[groups.ops]
allow = ["10.99.0.0/24:22", "*.corp.internal:8080"]

[users.alice]
groups = ["ops"]
allow = ["{LAN_ADDR}:{ECHO_PORT},{HTTP_PORT},{CLOSE_FIRST_PORT},{CLOSED_PORT}", "db.corp.internal:{ECHO_PORT}", "*.evil.test:80,{ECHO_PORT}"]
deny = ["{LAN_ADDR2}"]
"""

HTTP_FILE = "blob.bin"
HTTP_FILE_SIZE = 300_000
CLOSE_FIRST_PAYLOAD_SIZE = 512 * 1024

SSH = "/usr/bin/ssh"
SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "/usr/bin/ssh-keygen"

CLONE_NEWNET = 0x40000000
DEFAULT_TIMEOUT = 20.0

T = TypeVar("T")


class TestbedError(RuntimeError):
    """The testbed itself could not be set up or torn down (not a failure of the code under test)."""

    __test__ = False  # not a pytest test class


def deterministic_bytes(size: int, seed: bytes) -> bytes:
    """Incompressible but reproducible bytes, so a truncated or reordered transfer is caught."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(seed + counter.to_bytes(8, "big")).digest()
        counter += 1
    return bytes(out[:size])


CLOSE_FIRST_PAYLOAD = deterministic_bytes(CLOSE_FIRST_PAYLOAD_SIZE, b"close-first")
HTTP_PAYLOAD = deterministic_bytes(HTTP_FILE_SIZE, b"http-blob")


def clean_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment for every child: no proxies, no SSH agent, no BASTION_* overrides from the caller."""
    env = {
        k: v
        for k, v in os.environ.items()
        if "proxy" not in k.lower() and not k.startswith(("BASTION_", "SSH_AUTH_SOCK", "SSH_AGENT_PID", "DISPLAY"))
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("LC_ALL", "C.UTF-8")
    if extra:
        env.update(extra)
    return env


def wait_until(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll `predicate` until it returns something truthy; raise TimeoutError naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float = DEFAULT_TIMEOUT,
    input: bytes | None = None,
    check: bool = False,
    env: dict[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """subprocess.run with a mandatory timeout that also kills the child's process group (ProxyJump's
    inner ssh is a grandchild). stdin is /dev/null unless `input` is given."""
    proc = subprocess.Popen(
        [os.fspath(a) for a in argv],
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env if env is not None else clean_env(),
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        kill_group(proc)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(exc.cmd, timeout, out, err) from None
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    if check and result.returncode != 0:
        raise TestbedError(
            f"command failed (exit {result.returncode}): {' '.join(map(str, proc.args))}\n"
            f"stdout: {out.decode(errors='replace')}\nstderr: {err.decode(errors='replace')}"
        )
    return result


def kill_group(proc: subprocess.Popen[Any], sig: int = signal.SIGKILL) -> None:
    """Signal the process group we created for `proc` (start_new_session=True makes its pgid its pid).

    Only while `proc` is not yet reaped: until then its pid, and so the group id, cannot belong to anyone else.
    """
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def stop_process(proc: subprocess.Popen[Any], timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after `timeout`; always reaps."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


# --- namespaces from inside this process -------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def _in_netns(ns: str, fn: Callable[[], T]) -> T:
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
    return _in_netns(ns, lambda: socket.socket(family, type))


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


# --- keys ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Key:
    """An ed25519 key pair made by ssh-keygen."""

    path: Path
    pub_path: Path
    public: str  # "ssh-ed25519 AAAA... comment"
    fingerprint: str  # "SHA256:..."


def generate_key(path: Path, comment: str) -> Key:
    path.parent.mkdir(parents=True, exist_ok=True)
    run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], check=True, timeout=10)
    return load_key(path)


def load_key(path: Path) -> Key:
    pub_path = Path(f"{path}.pub")
    listing = run([SSH_KEYGEN, "-l", "-E", "sha256", "-f", pub_path], check=True, timeout=10)
    fingerprint = listing.stdout.decode().split()[1]
    return Key(path, pub_path, pub_path.read_text().strip(), fingerprint)


# --- the target programs ------------------------------------------------------------------------------

_TCP_TARGETS = r'''
"""Tiny TCP targets for the testbed: `echo PORT` and `close-first PORT PAYLOAD_FILE`."""
import socket, sys, threading

def serve(port, handle):
    srv = socket.create_server(("0.0.0.0", port), reuse_port=False)
    while True:
        conn, _ = srv.accept()
        threading.Thread(target=handle, args=(conn,), daemon=True).start()

def echo(conn):
    # echo until the peer half-closes, then close: the client-closes-first order
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)

def close_first(payload):
    def handle(conn):
        # write the payload and close at once, without reading: the target-closes-first order
        with conn:
            conn.sendall(payload)
    return handle

mode, port = sys.argv[1], int(sys.argv[2])
if mode == "echo":
    serve(port, echo)
elif mode == "close-first":
    serve(port, close_first(open(sys.argv[3], "rb").read()))
else:
    sys.exit(f"unknown mode {mode}")
'''

_SSHD_CONFIG = """\
Port {port}
ListenAddress {addr}
HostKey {host_key}
PidFile {pid_file}
AuthorizedKeysFile {authorized_keys}
UsePAM no
StrictModes no
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
AllowTcpForwarding no
X11Forwarding no
PrintMotd no
PrintLastLog no
LogLevel VERBOSE
"""


class Testbed:
    """Two namespaces joined by a veth pair, hosts-file names in gw, and the targets in lan.

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

    # targets

    def _start(self, name: str, ns: str, argv: Sequence[str | os.PathLike[str]], port: int) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        proc = self.popen(ns, argv, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self._procs[name] = proc
        wait_listening(proc, port, name)

    def start_targets(self) -> None:
        """Start sshd, echo, HTTP and close-first servers in lan and wait until each listens."""
        self.target_host_key = generate_key(self.workdir / "target_host_ed25519_key", "target-host")
        self.target_client_key = generate_key(self.workdir / "target_client_key", "target-client")
        authorized_keys = self.workdir / "target_authorized_keys"
        authorized_keys.write_text(self.target_client_key.public + "\n")
        sshd_config = self.workdir / "target_sshd_config"
        sshd_config.write_text(
            _SSHD_CONFIG.format(
                port=SSH_PORT,
                addr=LAN_ADDR,
                host_key=self.target_host_key.path,
                pid_file=self.workdir / "target_sshd.pid",
                authorized_keys=authorized_keys,
            )
        )
        # sshd's privilege-separation directory; left in place on teardown, as other sshds (another
        # testbed in a parallel run, the benchmark) may need it while we tear down
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        self._start("target-sshd", self.lan, [SSHD, "-D", "-e", "-f", sshd_config], SSH_PORT)

        script = self.workdir / "tcp_targets.py"
        script.write_text(_TCP_TARGETS)
        self._start("echo", self.lan, [sys.executable, script, "echo", str(ECHO_PORT)], ECHO_PORT)
        payload_file = self.workdir / "close_first.bin"
        payload_file.write_bytes(CLOSE_FIRST_PAYLOAD)
        self._start("close-first", self.lan, [sys.executable, script, "close-first", str(CLOSE_FIRST_PORT),
                                              payload_file], CLOSE_FIRST_PORT)

        self.http_root.mkdir(exist_ok=True)
        (self.http_root / HTTP_FILE).write_bytes(HTTP_PAYLOAD)
        self._start("http", self.lan, [sys.executable, "-m", "http.server", "--bind", LAN_ADDR,
                                       "--directory", self.http_root, str(HTTP_PORT)], HTTP_PORT)

    def target_log(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


# --- the bastion under test ---------------------------------------------------------------------------


class Bastion:
    """One bastion home directory and (at most) one running `bastion serve` in the gw namespace."""

    __test__ = False

    def __init__(self, testbed: Testbed, home: Path, listen: str = f"{GW_ADDR}:{SSH_PORT}") -> None:
        self.testbed = testbed
        self.home = home
        self.listen = listen
        self.host, port = listen.rsplit(":", 1)
        self.port = int(port)
        self.proc: subprocess.Popen[bytes] | None = None
        self._log_lines: list[str] = []
        self._log_lock = threading.Lock()
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None
        self.log_path = home.parent / f"{home.name}-serve.log"

    # CLI

    def cli(self, *args: str | os.PathLike[str], check: bool = True, timeout: float = 30.0,
            input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
        """`bastion --home HOME ARGS...` inside gw (so names resolve through the testbed's hosts file)."""
        argv = [sys.executable, "-m", "bastion", "--home", self.home, *args]
        result = self.testbed.run(self.testbed.gw, argv, timeout=timeout, input=input)
        if check and result.returncode != 0:
            raise TestbedError(
                f"bastion {' '.join(map(str, args))} exited {result.returncode}\n"
                f"stdout: {result.stdout.decode(errors='replace')}\nstderr: {result.stderr.decode(errors='replace')}"
            )
        return result

    def init(self, **config: Any) -> None:
        """`bastion init`, then set top-level config keys (e.g. connect_timeout=2)."""
        self.cli("init", "--listen", self.listen)
        if config:
            self.set_config(**config)

    def set_config(self, **config: Any) -> None:
        """Rewrite top-level keys of config.toml, keeping everything else `init` wrote."""
        path = self.home / "config.toml"
        lines = path.read_text().splitlines()
        first_table = next((i for i, line in enumerate(lines) if line.lstrip().startswith("[")), len(lines))
        top, rest = lines[:first_table], lines[first_table:]
        for key, value in config.items():
            rendered = f"{key} = {_toml_value(value)}"
            for i, line in enumerate(top):
                if line.split("=", 1)[0].strip() == key and "=" in line:
                    top[i] = rendered
                    break
            else:
                top.append(rendered)
        path.write_text("\n".join(top + rest) + "\n")

    def add_user(self, name: str, *keys: Key) -> None:
        args: list[str | os.PathLike[str]] = ["user", "add", name]
        for key in keys:
            args += ["--key", key.pub_path]
        self.cli(*args)

    def apply_policy(self, text: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        path = self.home.parent / f"policy-{secrets.token_hex(3)}.toml"
        path.write_text(text)
        return self.cli("policy", "apply", path, check=check)

    def policy_check(self, user: str, host: str, port: int) -> subprocess.CompletedProcess[bytes]:
        return self.cli("policy", "check", user, host, str(port), check=False)

    def audit(self, kind: str, user: str | None = None, since: str | None = None,
              in_process: bool = True) -> list[dict[str, Any]]:
        """`bastion audit KIND --json` parsed.

        In-process by default: the same CLI code, but without a new interpreter (importing the CLI takes about
        half a second, and tests poll the audit while waiting for rows). `in_process=False` runs the real
        command in gw, as an operator would.
        """
        args = ["audit", kind, "--json"]
        if user:
            args += ["--user", user]
        if since:
            args += ["--since", since]
        out = self.cli_in_process(*args) if in_process else self.cli(*args).stdout.decode()
        rows = json.loads(out)
        if not isinstance(rows, list):
            raise TestbedError(f"bastion audit {kind} --json did not print a JSON array: {out[:200]!r}")
        return rows

    def cli_in_process(self, *args: str) -> str:
        """Run the bastion CLI's typer app in this process; returns stdout, raises on a non-zero exit."""
        from typer.testing import CliRunner

        from bastion.cli.main import app

        env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("BASTION_")}
        result = CliRunner().invoke(app, ["--home", str(self.home), *args], env=env)
        if result.exit_code != 0:
            raise TestbedError(f"bastion {' '.join(args)} exited {result.exit_code}: {result.output}",
                               ) from result.exception
        return result.stdout

    def wait_audit(self, kind: str, predicate: Callable[[list[dict[str, Any]]], bool], what: str,
                   timeout: float = 10.0) -> list[dict[str, Any]]:
        """Poll `audit KIND` until `predicate(rows)` holds (the audit writer may lag the client by a little)."""
        last: list[list[dict[str, Any]]] = [[]]

        def check() -> list[dict[str, Any]] | None:
            last[0] = self.audit(kind)
            return last[0] if predicate(last[0]) else None

        try:
            return wait_until(check, timeout, what, interval=0.1) or []
        except TimeoutError as exc:
            raise AssertionError(f"{exc}; last `audit {kind}` rows:\n{json.dumps(last[0], indent=1)}") from None

    def host_public_keys(self) -> list[str]:
        """The bastion's host public keys as written by `init` (`*host*key*.pub` in its home)."""
        return [p.read_text().strip() for p in sorted(self.home.glob("*host*key*.pub"))]

    # the server process

    def start(self, timeout: float = 10.0, env: dict[str, str] | None = None) -> None:
        """`bastion serve` in gw (`env`: extra variables, e.g. BASTION_FAST_PATH=false); returns once it
        printed "listening on"."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self._ready.clear()
        with self._log_lock:
            self._log_lines.append(f"----- bastion serve started {time.strftime('%H:%M:%S')} -----\n")
        self.proc = self.testbed.popen(
            self.testbed.gw,
            [sys.executable, "-m", "bastion", "--home", self.home, "serve", "--listen", self.listen],
            env=clean_env(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        self._reader = threading.Thread(target=self._read_log, args=(self.proc,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if self.proc.poll() is not None:
                self._reader.join(2)
                raise TestbedError(f"bastion serve exited {self.proc.returncode} before listening:\n{self.log()}")
            if time.monotonic() > deadline:
                raise TestbedError(f"bastion serve did not print 'listening on' within {timeout}s:\n{self.log()}")

    def _read_log(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        with self.log_path.open("ab") as log:
            for raw in proc.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace")
                with self._log_lock:
                    self._log_lines.append(line)
                if "listening on" in line:
                    self._ready.set()

    def log(self) -> str:
        with self._log_lock:
            return "".join(self._log_lines)

    def send_signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.proc is not None
        code = self.proc.wait(timeout)
        if self._reader:
            self._reader.join(5)
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Send `sig` and wait for the exit code."""
        self.send_signal(sig)
        return self.wait(timeout)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if self._reader:
            self._reader.join(5)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot render {value!r} as TOML")


# --- clients ------------------------------------------------------------------------------------------

_SSH_CONFIG = """\
Host bastion {gw_addr}
  HostName {gw_addr}
  Port {port}
  User {user}
  IdentityFile {identity}

Host target {lan_addr}
  HostName {lan_addr}
  User root
  IdentityFile {target_identity}

Host *
  IdentitiesOnly yes
  BatchMode yes
  ConnectTimeout 5
  UserKnownHostsFile {known_hosts}
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking {strict}
  ControlMaster no
  ControlPath none
  ForwardAgent no
  ForwardX11 no
  ServerAliveInterval 0
  LogLevel INFO
"""


class SshClient:
    """The real OpenSSH client, run in gw with its own config file (`ssh -F FILE`).

    `bastion` and `target` are host aliases in that file; ProxyJump's inner ssh reads the same file, which is
    why the IdentityFile of each host lives there and not on the command line.
    """

    __test__ = False

    def __init__(self, testbed: Testbed, bastion: Bastion, workdir: Path, identity: Key,
                 user: str = "alice") -> None:
        self.testbed = testbed
        self.bastion = bastion
        workdir.mkdir(parents=True, exist_ok=True)
        self.config = workdir / f"ssh_config-{user}-{secrets.token_hex(2)}"
        known_hosts = workdir / "known_hosts"
        host_keys = bastion.host_public_keys()
        entries = [f"{bastion.host} {' '.join(key.split()[:2])}" for key in host_keys]
        if testbed.target_host_key is not None:
            entries.append(f"{LAN_ADDR} {' '.join(testbed.target_host_key.public.split()[:2])}")
        known_hosts.write_text("\n".join(entries) + "\n")
        target_identity = testbed.target_client_key.path if testbed.target_client_key else identity.path
        self.config.write_text(
            _SSH_CONFIG.format(
                gw_addr=bastion.host, port=bastion.port, user=user, identity=identity.path,
                lan_addr=LAN_ADDR, target_identity=target_identity, known_hosts=known_hosts,
                # without host keys in the home there is nothing to pin; accept-new keeps the test meaningful
                strict="yes" if host_keys else "accept-new",
            )
        )

    def argv(self, *args: str) -> list[str]:
        return self.testbed.argv(self.testbed.gw, [SSH, "-F", self.config, *args])

    def run(self, *args: str, input: bytes | None = None, timeout: float = 15.0,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
        return run(self.argv(*args), input=input, timeout=timeout, env=env)

    def popen(self, *args: str, **kw: Any) -> subprocess.Popen[bytes]:
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        return self.testbed.popen(self.testbed.gw, [SSH, "-F", self.config, *args], **kw)

    def stdio_forward(self, host: str, port: int, input: bytes | None = None,
                      timeout: float = 15.0) -> subprocess.CompletedProcess[bytes]:
        """`ssh -W host:port bastion` (what ProxyJump does); IPv6 literals are bracketed."""
        spec = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        return self.run("-W", spec, "bastion", input=input, timeout=timeout)

    @contextlib.contextmanager
    def forward(self, flag: str, spec: str, listen_port: int,
                timeout: float = 10.0) -> Iterator[subprocess.Popen[bytes]]:
        """`ssh -N -o ExitOnForwardFailure=yes FLAG SPEC bastion` until the local listener exists; killed on exit."""
        proc = self.popen("-N", "-o", "ExitOnForwardFailure=yes", flag, spec, "bastion")
        try:
            wait_listening(proc, listen_port, f"ssh {flag} {spec}", timeout)
            yield proc
        finally:
            kill_group(proc, signal.SIGTERM)
            stop_process(proc)


def paramiko_connect(testbed: Testbed, bastion: Bastion, user: str, key: Key, timeout: float = 10.0):
    """A paramiko SSHClient connected to the bastion over a socket made in gw (host key pinned from the home)."""
    import paramiko

    sock = testbed.connect(testbed.gw, (bastion.host, bastion.port), timeout)
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.RejectPolicy())
    for line in bastion.host_public_keys():
        kind, blob = line.split()[:2]
        client.get_host_keys().add(bastion.host, kind, paramiko.PKey.from_type_string(kind, _b64(blob)))
    try:
        client.connect(bastion.host, bastion.port, username=user, key_filename=str(key.path), sock=sock,
                       look_for_keys=False, allow_agent=False, timeout=timeout, banner_timeout=timeout,
                       auth_timeout=timeout, channel_timeout=timeout)
    except BaseException:
        client.close()
        sock.close()
        raise
    return client


def _b64(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


def recv_all(sock: socket.socket, limit: int = 64 * 1024 * 1024) -> bytes:
    """Read until EOF (the socket's timeout applies to each recv)."""
    chunks = []
    total = 0
    while chunk := sock.recv(65536):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise AssertionError(f"more than {limit} bytes received")
    return b"".join(chunks)


def socks5_connect(ns: str, proxy_port: int, host: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A SOCKS5 CONNECT by host name through 127.0.0.1:`proxy_port` in `ns` (what curl --socks5-hostname does)."""
    sock = netns_connect(ns, ("127.0.0.1", proxy_port), timeout)
    try:
        sock.sendall(b"\x05\x01\x00")  # version 5, one method: no authentication
        if _recv_exactly(sock, 2) != b"\x05\x00":
            raise ConnectionError("SOCKS5 proxy refused the no-authentication method")
        name = host.encode()
        sock.sendall(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
        version, reply, _, atyp = _recv_exactly(sock, 4)
        if reply != 0:
            raise ConnectionError(f"SOCKS5 CONNECT {host}:{port} failed with reply code {reply}")
        _recv_exactly(sock, {1: 4, 4: 16}.get(atyp) or _recv_exactly(sock, 1)[0])  # bound address
        _recv_exactly(sock, 2)  # bound port
        return sock
    except BaseException:
        sock.close()
        raise


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError(f"connection closed after {len(data)} of {size} bytes")
        data += chunk
    return data


def http_get(sock: socket.socket, host: str, path: str) -> bytes:
    """GET `path` over an already connected socket with HTTP/1.0 and return the body (status must be 200)."""
    sock.sendall(f"GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n".encode())
    response = recv_all(sock)
    head, _, body = response.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0]
    if b" 200 " not in status + b" ":
        raise AssertionError(f"HTTP GET {path}: {status.decode(errors='replace')}")
    return body
