"""Behind a load balancer on loopback, no root (#22): `bastion serve` with proxy_protocol_from = 127.0.0.1, a tiny
relay in the test playing the balancer (it connects from 127.0.0.1 and sends HAProxy's v2 header claiming the
client is 10.1.2.3:5555), and the real OpenSSH client through it. The end-to-end test with a real HAProxy in
namespaces is tests/e2e/test_e2e_haproxy.py."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from bastion.policy.proxy_header import v2_header
from tests.integration.test_serve_loopback import bastion, echo_server, home, start_serve  # noqa: F401 (fixtures)

SSH = shutil.which("ssh")
pytestmark = pytest.mark.skipif(SSH is None, reason="needs the OpenSSH client (openssh-client)")

CLIENT = ("10.1.2.3", 5555)


class Relay:
    """A load balancer in miniature: each connection to it becomes one to the bastion, from 127.0.0.1, that
    starts with `header`."""

    def __init__(self, backend_port: int, header: bytes):
        self.backend_port, self.header = backend_port, header
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            backend = socket.create_connection(("127.0.0.1", self.backend_port), timeout=10)
            backend.settimeout(None)
            backend.sendall(self.header)
            for a, b in ((client, backend), (backend, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.server.close()


def keygen(path: Path, comment: str) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path], check=True)
    return Path(f"{path}.pub").read_text().strip()


def exchange(source: str, port: int, first: bytes) -> bytes:
    """Connect from `source`, send `first` and close our side, return all the bastion sends until it closes."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(10)
    sock.connect(("127.0.0.1", port))
    received = b""
    with sock:
        sock.sendall(first)
        sock.shutdown(socket.SHUT_WR)
        try:
            while chunk := sock.recv(4096):
                received += chunk
        except ConnectionResetError:
            pass
    return received


def auth_rows(home_dir: Path) -> list[dict]:
    return json.loads(bastion(home_dir, "audit", "auth", "--json").stdout)


def wait_rows(home_dir: Path, predicate, what: str, timeout: float = 10.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        rows = auth_rows(home_dir)
        if predicate(rows):
            return rows
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} in {json.dumps(rows, indent=1)}")
        time.sleep(0.2)


def test_the_balancers_client_is_the_one_audited_matched_and_refused(home, echo_server, tmp_path):
    keys = {name: tmp_path / name for name in ("near", "here", "plain")}
    lines = {name: keygen(path, f"alice@{name}") for name, path in keys.items()}
    authorized = tmp_path / "authorized_keys"
    authorized.write_text(f'from="10.1.2.0/24" {lines["near"]}\nfrom="127.0.0.1" {lines["here"]}\n'
                          f'{lines["plain"]}\n')
    assert bastion(home, "user", "import", "--user", "alice", str(authorized)).returncode == 0, \
        bastion(home, "user", "import", "--help").stdout
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[users.alice]\nallow = ["127.0.0.2:{echo_server}"]\n')
    assert bastion(home, "policy", "apply", str(policy)).returncode == 0
    config = home / "config.toml"
    config.write_text(config.read_text().replace("proxy_protocol_from = []", 'proxy_protocol_from = ["127.0.0.1/32"]')
                      .replace("penalty_threshold = 5", "penalty_threshold = 2"))

    proc, port = start_serve(home)
    relay = Relay(port, v2_header(CLIENT, ("127.0.0.1", port)))
    try:
        known = tmp_path / "known_hosts"
        host_key = " ".join((home / "ssh_host_ed25519_key.pub").read_text().split()[:2])
        known.write_text(f"[127.0.0.1]:{relay.port} {host_key}\n[127.0.0.1]:{port} {host_key}\n")

        def ssh(key: str, to_port: int, source: str = "127.0.0.1") -> subprocess.CompletedProcess:
            return subprocess.run(
                [SSH, "-F", "/dev/null", "-p", str(to_port), "-i", str(keys[key]), "-o", "BatchMode=yes",
                 "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known}", "-b", source,
                 "-W", f"127.0.0.2:{echo_server}", "alice@127.0.0.1"],
                input=b"ping\n", capture_output=True, timeout=30)

        # 1. through the balancer: the header's address is the client's, for from= as for the audit
        assert ssh("near", relay.port).stdout == b"ping\n"
        refused = ssh("here", relay.port)
        assert refused.returncode == 255 and b"Permission denied (publickey)" in refused.stderr
        rows = wait_rows(home, lambda r: any(x["reason"].startswith("key not allowed from 10.1.2.3") for x in r),
                         "from= refusal")
        success = [r for r in rows if r["result"] == "success"]
        assert [(r["client_ip"], r["client_port"]) for r in success] == [CLIENT]
        sessions = json.loads(bastion(home, "audit", "sessions", "--json").stdout)
        assert [(s["client_ip"], s["client_port"]) for s in sessions] == [CLIENT]
        assert {r["client_ip"] for r in rows} == {"10.1.2.3"}
        before = len(rows)

        # 2. the balancer's health checks (v2 LOCAL, or a bare connect): closed before SSH, not audited
        for _ in range(10):
            assert exchange("127.0.0.1", port, v2_header(None)) == b""
            assert exchange("127.0.0.1", port, b"") == b""

        # 3. the balancer without a header: refused before SSH, audited once however often it happens
        for _ in range(3):
            assert exchange("127.0.0.1", port, b"SSH-2.0-OpenSSH_9.6\r\n") == b""
        direct = ssh("plain", port)
        assert direct.returncode == 255
        rows = wait_rows(home, lambda r: any("no PROXY header" in x["reason"] for x in r), "missing header row")
        missing = [r for r in rows if "no PROXY header" in r["reason"]]
        assert len(missing) == 1 and missing[0]["client_ip"] == "127.0.0.1" and missing[0]["result"] == "failure"
        assert len(rows) == before + 1, "health checks must not be audited"

        # 4. a header from anyone else is forged: refused, audited, and it counts against that source
        for _ in range(3):
            sent = exchange("127.0.0.2", port, v2_header(("192.0.2.66", 1)) + b"SSH-2.0-Forger\r\n")
            assert b"192.0.2.66" not in sent
        rows = wait_rows(home, lambda r: any(x["client_ip"] == "127.0.0.2" and "source refused" in x["reason"]
                                             for x in r), "penalty for the forger")
        forged = [r for r in rows if "not in proxy_protocol_from" in r["reason"]]
        assert [(r["client_ip"], r["reason"]) for r in forged] == [
            ("127.0.0.2", "PROXY header from 127.0.0.2, which is not in proxy_protocol_from")]
        assert not any(r["client_ip"] == "192.0.2.66" for r in rows)

        # 5. a direct client that sends no header logs in as without a balancer
        assert ssh("plain", port, source="127.0.0.3").stdout == b"ping\n"
        # 6. and the balancer was never penalized: logins through it still work
        assert ssh("near", relay.port).stdout == b"ping\n"
        rows = wait_rows(home, lambda r: sum(x["result"] == "success" for x in r) == 3, "three logins")
        assert [r["client_ip"] for r in rows if r["result"] == "success"] == ["10.1.2.3", "127.0.0.3", "10.1.2.3"]
        assert not any("source refused" in r["reason"] and r["client_ip"] == "127.0.0.1" for r in rows)
    finally:
        relay.close()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)


@pytest.mark.skipif(HAPROXY is None, reason="needs HAProxy (Debian `haproxy`; .ci/run installs it)")
def test_the_example_haproxy_config_is_valid():
    """deploy/haproxy.cfg, which the README shows, passes `haproxy -c` (the e2e test runs it for real)."""
    cfg = Path(__file__).resolve().parents[2] / "deploy" / "haproxy.cfg"
    result = subprocess.run([HAPROXY, "-c", "-f", str(cfg)], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "send-proxy-v2 check" in cfg.read_text()


def test_a_reloaded_list_applies_to_the_next_connection(home, tmp_path):
    """SIGHUP re-reads proxy_protocol_from: once 127.0.0.1 is no longer listed, its header is a forged one."""
    config = home / "config.toml"
    config.write_text(config.read_text().replace("proxy_protocol_from = []", 'proxy_protocol_from = ["127.0.0.1/32"]'))
    proc, port = start_serve(home)
    try:
        assert exchange("127.0.0.1", port, v2_header(CLIENT) + b"SSH-2.0-Probe\r\n").startswith(b"SSH-2.0-")
        config.write_text(config.read_text().replace('"127.0.0.1/32"', '"127.0.0.9/32"'))
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not any("which is not in proxy_protocol_from" in r["reason"] for r in auth_rows(home)):
            assert time.monotonic() < deadline, auth_rows(home)
            exchange("127.0.0.1", port, v2_header(CLIENT) + b"SSH-2.0-Probe\r\n")
            time.sleep(0.2)
        assert all(r["client_ip"] == "127.0.0.1" for r in auth_rows(home) if "PROXY" in r["reason"])
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
