"""Prometheus metrics of a real server on loopback (#22, part 4): `metrics_listen` serves them, the real OpenSSH
client logs in, tunnels, is refused and fails to log in, and each counter moves by exactly what happened; the
exposition passes `promtool check metrics`. Off by default: no port at all. With --workers it is refused."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

import bastion as bastion_package
from tests.integration.test_serve_loopback import bastion, echo_server, home  # noqa: F401 (fixtures)

SSH = shutil.which("ssh")
PROMTOOL = shutil.which("promtool")
pytestmark = pytest.mark.skipif(SSH is None, reason="needs the OpenSSH client (openssh-client)")


class Serve:
    """`bastion serve` as a child, its log lines kept (the SSH port and the metrics URL are read from them)."""

    def __init__(self, home: Path):
        self.proc = subprocess.Popen([sys.executable, "-m", "bastion", "--home", str(home), "serve"],
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.port = 0
        self.metrics_url = ""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            self.lines.append(line)
            if "metrics on http://" in line:
                self.metrics_url = line.split("metrics on ", 1)[1].split()[0]
            if "listening on" in line:
                self.port = int(line.rsplit(":", 1)[1].split()[0])
                threading.Thread(target=self._keep_reading, daemon=True).start()
                return
            if not line and self.proc.poll() is not None:
                break
        self.proc.kill()
        raise AssertionError(f"serve did not start: {''.join(self.lines)}{self.proc.stderr.read()}")

    def _keep_reading(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=30) == 0


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return response.read().decode()


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, keyed by (sample name, its labels)."""
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


def moved(before: dict, after: dict) -> dict[tuple[str, frozenset], float]:
    """The counters and histogram counts that changed, by how much (gauges and _created left out)."""
    changed = {}
    for key, now in after.items():
        name = key[0]
        if name.endswith(("_total", "_count")) and not name.startswith("process_"):
            if now != before.get(key, 0.0):
                changed[key] = now - before.get(key, 0.0)
    return changed


def key(name: str, **labels: str) -> tuple[str, frozenset]:
    return name, frozenset(labels.items())


@pytest.fixture
def alice(home, echo_server, tmp_path):
    """alice may reach the echo server; her key, and a key nobody has."""
    keys = {}
    for name in ("alice", "stranger"):
        keys[name] = tmp_path / name
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", keys[name]], check=True)
    assert bastion(home, "user", "add", "alice", "--key", f"{keys['alice']}.pub").returncode == 0
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[users.alice]\nallow = ["127.0.0.2:{echo_server}"]\n')
    assert bastion(home, "policy", "apply", str(policy)).returncode == 0
    return keys


def ssh_command(home: Path, port: int, key: Path, target: str, tmp_path: Path) -> list[str]:
    known = tmp_path / "known_hosts"
    host_key = (home / "ssh_host_ed25519_key.pub").read_text().split()[:2]
    known.write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
    return [SSH, "-F", "/dev/null", "-p", str(port), "-i", str(key), "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={known}", "-W", target, "alice@127.0.0.1"]


def wait_for(url: str, check, what: str, timeout: float = 10.0) -> dict:
    """Scrape until `check(samples)` holds (rows land when the server has seen the client go)."""
    deadline = time.monotonic() + timeout
    while True:
        found = samples(scrape(url))
        if check(found):
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} never happened; last scrape: {found}")
        time.sleep(0.05)


def test_counters_move_by_exactly_what_happened(home, echo_server, alice, tmp_path):
    config = home / "config.toml"
    config.write_text(config.read_text().replace('metrics_listen = ""', 'metrics_listen = "127.0.0.1:0"'))
    server = Serve(home)
    try:
        url = server.metrics_url
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics"), server.lines
        before = samples(scrape(url))
        assert value(before, "bastion_sessions_open") == 0
        build = [dict(labels) for name, labels in before if name == "bastion_build_info"]
        assert len(build) == 1 and build[0]["version"] == bastion_package.__version__
        fast_path = "fast path on" in "".join(server.lines)
        assert value(before, "bastion_transport_fast_path_enabled") == (1 if fast_path else 0)
        assert value(before, "bastion_policy_version") >= 1 and value(before, "bastion_policy_age_seconds") >= 0

        # 1. a tunnel held open: the gauges see it, and its bytes count while it is open
        allowed = ssh_command(home, server.port, alice["alice"], f"127.0.0.2:{echo_server}", tmp_path)
        held = subprocess.Popen(allowed, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            held.stdin.write(b"hello\n")
            held.stdin.flush()
            assert held.stdout.read(6) == b"hello\n"
            live = wait_for(url, lambda s: value(s, "bastion_relayed_bytes_total", direction="to_client") == 6,
                            "6 bytes relayed back")
            assert value(live, "bastion_sessions_open") == 1
            assert value(live, "bastion_channels_open", kind="direct-tcpip") == 1
            assert value(live, "bastion_channels_open", kind="forwarded-tcpip") == 0
            assert value(live, "bastion_relayed_bytes_total", direction="to_target") == 6
        finally:
            held.stdin.close()
            assert held.wait(timeout=30) == 0
            held.stdout.close()
            held.stderr.close()
        # 2. a refused tunnel, 3. a failed login
        refused = subprocess.run(ssh_command(home, server.port, alice["alice"], "169.254.169.254:80", tmp_path),
                                 input=b"", capture_output=True, timeout=30)
        assert b"administratively prohibited" in refused.stderr
        stranger = subprocess.run(ssh_command(home, server.port, alice["stranger"], f"127.0.0.2:{echo_server}",
                                              tmp_path), input=b"", capture_output=True, timeout=30)
        assert stranger.returncode == 255 and b"Permission denied (publickey)" in stranger.stderr

        after = wait_for(url, lambda s: value(s, "bastion_sessions_open") == 0
                         and value(s, "bastion_connections_unauthenticated") == 0
                         and value(s, "bastion_channels_open", kind="direct-tcpip") == 0, "every client gone")
        assert moved(before, after) == {
            key("bastion_auth_attempts_total", method="publickey", result="success", reason="accepted"): 2,
            key("bastion_auth_attempts_total", method="publickey", result="failure", reason="unknown_key"): 1,
            key("bastion_sessions_total"): 2,
            key("bastion_channel_opens_total", kind="direct-tcpip", decision="allow"): 1,
            key("bastion_channel_opens_total", kind="direct-tcpip", decision="deny"): 1,
            key("bastion_relayed_bytes_total", direction="to_target"): 6,
            key("bastion_relayed_bytes_total", direction="to_client"): 6,
            key("bastion_handshake_duration_seconds_count"): 3,
            key("bastion_channel_open_duration_seconds_count", kind="direct-tcpip", result="opened"): 1,
            key("bastion_channel_open_duration_seconds_count", kind="direct-tcpip", result="refused"): 1,
        }
        # every handshake on loopback well inside the histogram's range
        assert value(after, "bastion_handshake_duration_seconds_bucket", le="10.0") == 3
        assert value(after, "bastion_connections_dropped_total", reason="startup_limit") == 0
        assert value(after, "bastion_penalties_total") == 0

        # only /metrics answers, and SIGHUP keeps the running listener (a new address needs a restart)
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(url.replace("/metrics", "/"), timeout=10)
        assert missing.value.code == 404
        config.write_text(config.read_text().replace('metrics_listen = "127.0.0.1:0"',
                                                     'metrics_listen = "127.0.0.1:1"'))
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not any("metrics_listen changes need a restart" in line for line in server.lines):
            assert time.monotonic() < deadline, server.lines
            time.sleep(0.05)
        assert value(samples(scrape(url)), "bastion_sessions_total") == value(after, "bastion_sessions_total")
        exposition = scrape(url)
        assert "bastion_store_" not in exposition  # the embedded SQLite store: no reachability series (#22)
    finally:
        server.stop()

    if PROMTOOL is None:
        pytest.skip("promtool (Debian prometheus) not installed: the exposition was not linted")
    lint = subprocess.run([PROMTOOL, "check", "metrics"], input=exposition, capture_output=True, text=True,
                          timeout=30)
    assert lint.returncode == 0 and lint.stdout + lint.stderr == "", lint.stdout + lint.stderr


def test_off_by_default_no_port_is_opened(home):
    assert 'metrics_listen = ""' in (home / "config.toml").read_text()
    server = Serve(home)
    try:
        listening = {c.laddr.port for c in psutil.Process(server.proc.pid).net_connections(kind="inet")
                     if c.status == psutil.CONN_LISTEN}
        assert listening == {server.port}
        assert not any("metrics" in line for line in server.lines)
    finally:
        server.stop()


def test_refused_with_workers_in_one_line(home):
    config = home / "config.toml"
    config.write_text(config.read_text().replace('metrics_listen = ""', 'metrics_listen = "127.0.0.1:0"')
                      .replace('listen = "127.0.0.1:0"', 'listen = "127.0.0.1:2"'))
    result = bastion(home, "serve", "--workers", "2")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "metrics_listen needs workers = 1" in result.stderr


def test_a_metrics_port_in_use_is_one_line(home):
    taken = socket.create_server(("127.0.0.1", 0))
    try:
        config = home / "config.toml"
        config.write_text(config.read_text().replace(
            'metrics_listen = ""', f'metrics_listen = "127.0.0.1:{taken.getsockname()[1]}"'))
        result = bastion(home, "serve")
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert "cannot serve metrics on 127.0.0.1:" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1
    finally:
        taken.close()


def test_drops_and_penalties_are_counted(home):
    """1. one connection waits unauthenticated 2. a second is dropped by max_startups = 1 3. the first and a
    third close without logging in: with penalty_threshold = 2 the source is penalized 4. a fourth is dropped
    as penalized. Each drop and the penalty counted once; no handshake finished, so none measured."""
    config = home / "config.toml"
    config.write_text(config.read_text().replace('metrics_listen = ""', 'metrics_listen = "127.0.0.1:0"')
                      .replace('max_startups = "10:30:100"', 'max_startups = "1"')
                      .replace("penalty_threshold = 5", "penalty_threshold = 2"))
    server = Serve(home)

    def connect() -> socket.socket:
        return socket.create_connection(("127.0.0.1", server.port), timeout=10)

    def dropped(sock: socket.socket) -> bool:
        try:
            return sock.recv(256) == b""
        except ConnectionResetError:
            return True
        finally:
            sock.close()

    try:
        url = server.metrics_url
        before = samples(scrape(url))
        waiting = connect()
        assert waiting.recv(256).startswith(b"SSH-2.0-bastion")  # accepted: it counts as unauthenticated
        assert dropped(connect())
        waiting.close()
        wait_for(url, lambda s: value(s, "bastion_connections_unauthenticated") == 0, "the first connection gone")
        third = connect()
        assert third.recv(256).startswith(b"SSH-2.0-bastion")
        third.close()
        wait_for(url, lambda s: value(s, "bastion_penalties_total") == 1, "a penalty")
        assert dropped(connect())
        after = wait_for(url, lambda s: value(s, "bastion_connections_dropped_total", reason="penalized") == 1,
                         "a penalized drop")
        assert moved(before, after) == {
            key("bastion_connections_dropped_total", reason="startup_limit"): 1,
            key("bastion_connections_dropped_total", reason="penalized"): 1,
            key("bastion_penalties_total"): 1,
            key("bastion_auth_attempts_total", method="none", result="failure", reason="startup_limit"): 1,
            key("bastion_auth_attempts_total", method="none", result="failure", reason="penalty"): 1,
        }
    finally:
        server.stop()
