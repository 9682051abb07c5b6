"""The gateway on loopback, no root needed: a tunnel through the real OpenSSH client, and `serve` refusing
to start with a one-line reason (never a traceback) when its home is broken."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

SSH = shutil.which("ssh")


def bastion(home: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bastion", "--home", str(home), *args],
                          capture_output=True, text=True, timeout=timeout)


def start_serve(home: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-m", "bastion", "--home", str(home), "serve"],
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if "listening on" in line:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, int(line.rsplit(":", 1)[1].split()[0])
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"serve did not start: {proc.stderr.read()}")


@pytest.fixture
def home(tmp_path):
    home = tmp_path / "home"
    assert bastion(home, "init", "--listen", "127.0.0.1:0").returncode == 0
    config = home / "config.toml"
    config.write_text(config.read_text().replace(
        'internal_networks = [', 'internal_networks = ["127.0.0.0/8", '))
    return home


@pytest.fixture
def echo_server():
    server = socket.create_server(("127.0.0.2", 0))
    def serve():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)
    threading.Thread(target=serve, daemon=True).start()
    yield server.getsockname()[1]
    server.close()


@pytest.mark.skipif(SSH is None, reason="needs the OpenSSH client (openssh-client)")
def test_tunnel_on_loopback_with_openssh(home, echo_server, tmp_path):
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key], check=True)
    assert bastion(home, "user", "add", "alice", "--key", f"{key}.pub").returncode == 0
    policy = tmp_path / "policy.toml"
    policy.write_text(f'[users.alice]\nallow = ["127.0.0.2:{echo_server}"]\n')
    assert bastion(home, "policy", "apply", str(policy)).returncode == 0
    proc, port = start_serve(home)
    try:
        known = tmp_path / "known_hosts"
        host_key = (home / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        known.write_text(f"[127.0.0.1]:{port} {' '.join(host_key)}\n")
        base = [SSH, "-F", "/dev/null", "-p", str(port), "-i", str(key), "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={known}", "alice@127.0.0.1"]
        ok = subprocess.run([*base[:-1], "-W", f"127.0.0.2:{echo_server}", base[-1]], input=b"hello\n",
                            capture_output=True, timeout=30)
        assert ok.stdout == b"hello\n", ok.stderr
        refused = subprocess.run([*base[:-1], "-W", "169.254.169.254:80", base[-1]], input=b"",
                                 capture_output=True, timeout=30)
        assert b"administratively prohibited: 169.254.169.254 is not in an internal network" in refused.stderr
        own = subprocess.run([*base[:-1], "-W", f"127.1:{port}", base[-1]], input=b"", capture_output=True,
                             timeout=30)
        assert b"127.0.0.1 is the bastion's own address" in own.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    channels = bastion(home, "audit", "channels", "--json")
    assert '"decision": "deny"' in channels.stdout and '"decision": "allow"' in channels.stdout
    for name in ("bastion.db", "bastion.db-wal", "control.sock", "ssh_host_ed25519_key"):
        path = home / name
        if path.exists():
            assert path.stat().st_mode & 0o077 == 0, f"{name} is readable by others"


def test_corrupt_database_is_refused_with_a_reason(home):
    (home / "bastion.db").write_bytes(b"this is not a database" * 100)
    result = bastion(home, "serve")
    assert result.returncode == 1  # a problem found in the home, not bad input
    assert "bastion.db" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_broken_config_is_refused_with_file_and_key(home):
    (home / "config.toml").write_text('listen = "127.0.0.1:0"\nmax_auth_tries = "lots"\n')
    result = bastion(home, "serve")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "config.toml" in result.stderr and "max_auth_tries" in result.stderr


def test_readable_host_key_is_refused_with_the_fix(home):
    os.chmod(home / "ssh_host_ed25519_key", 0o640)
    result = bastion(home, "serve")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "chmod 600" in result.stderr


def test_port_in_use_is_one_line(home):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = bastion(home, "serve", "--listen", f"127.0.0.1:{port}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "cannot listen on" in result.stderr
