"""What a real `bastion serve` on 127.0.0.1 negotiates (issue #18, items 7 and 13): ssh-audit finds no
failure and no more warnings than in OpenSSH's sshd on the same machine; compression is off unless turned on,
and then a zlib bomb ends only its own connection; no user logs in with a SHA-1 signature or a weak key."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import asyncssh
import pytest
from asyncssh.constants import MSG_IGNORE
from asyncssh.packet import String

SSH = shutil.which("ssh")
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def bastion(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "bastion", "--home", str(home), *args], capture_output=True,
                          text=True, timeout=60)


def keygen(path: Path, kind: str, bits: int | None = None, comment: str = "") -> Path:
    if kind == "dsa" and not shutil.which("ssh-keygen"):
        pytest.skip("needs ssh-keygen")
    args = ["ssh-keygen", "-q", "-t", kind, "-N", "", "-C", comment, "-f", str(path)]
    if bits:
        args += ["-b", str(bits)]
    result = subprocess.run(args, capture_output=True, timeout=60)
    if result.returncode != 0:
        pytest.skip(f"this ssh-keygen makes no {kind} keys: {result.stderr.decode().strip()}")
    return path


class Server:
    """`bastion serve` on 127.0.0.1 (port 0) with alice's ed25519 and RSA keys and an echo server it may reach."""

    def __init__(self, tmp_path: Path, compression: bool = False) -> None:
        self.home = tmp_path / "home"
        assert bastion(self.home, "init", "--listen", "127.0.0.1:0").returncode == 0
        text = (self.home / "config.toml").read_text()
        text = text.replace("internal_networks = [", 'internal_networks = ["127.0.0.0/8", ')
        # ssh-audit opens a dozen connections that never log in; the penalty would refuse the later ones
        text = text.replace("penalty_threshold = 5", "penalty_threshold = 1000")
        if compression:
            text = text.replace("compression = false", "compression = true")
        (self.home / "config.toml").write_text(text)
        self.key = keygen(tmp_path / "id_ed25519", "ed25519", comment="alice@test")
        self.rsa_key = keygen(tmp_path / "id_rsa", "rsa", 3072, "alice-rsa@test")
        added = bastion(self.home, "user", "add", "alice", "--key", f"{self.key}.pub", "--key", f"{self.rsa_key}.pub")
        assert added.returncode == 0, added.stderr
        self.echo = socket.create_server(("127.0.0.2", 0))
        self.echo_port = self.echo.getsockname()[1]
        threading.Thread(target=self._serve_echo, daemon=True).start()
        policy = tmp_path / "policy.toml"
        policy.write_text(f'[users.alice]\nallow = ["127.0.0.2:{self.echo_port}"]\n')
        assert bastion(self.home, "policy", "apply", str(policy)).returncode == 0
        self.proc = subprocess.Popen([sys.executable, "-m", "bastion", "--home", str(self.home), "serve"],
                                     stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if "listening on" in line:
                self.port = int(line.rsplit(":", 1)[1].split()[0])
                threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep the pipe drained
                return
            if not line and self.proc.poll() is not None:
                break
        self.close()
        raise AssertionError("serve did not start")

    def _serve_echo(self) -> None:
        while True:
            try:
                conn, _ = self.echo.accept()
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(65536):
                conn.sendall(data)

    def host_key_line(self) -> str:
        return " ".join((self.home / "ssh_host_ed25519_key.pub").read_text().split()[:2])

    async def connect(self, **kw) -> asyncssh.SSHClientConnection:
        known = asyncssh.import_known_hosts(f"[127.0.0.1]:{self.port} {self.host_key_line()}\n")
        kw.setdefault("client_keys", [str(self.key)])
        return await asyncio.wait_for(asyncssh.connect("127.0.0.1", self.port, username="alice", known_hosts=known,
                                                       **kw), 15)

    def close(self) -> None:
        self.echo.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture
def make_server(tmp_path):
    servers = []

    def factory(compression: bool = False) -> Server:
        directory = tmp_path / f"server{len(servers)}"
        directory.mkdir()
        servers.append(Server(directory, compression))
        return servers[-1]

    yield factory
    for server in servers:
        server.close()


# ---- item 13: ssh-audit, bastion against sshd --------------------------------------------------------


def ssh_audit(port: int) -> dict:
    result = subprocess.run([sys.executable, "-m", "ssh_audit", "-j", "--skip-rate-test", "-t", "10", "-p", str(port),
                             "127.0.0.1"], capture_output=True, text=True, timeout=120)
    report = json.loads(result.stdout)
    findings: dict[str, list[str]] = {"fail": [], "warn": []}
    for section in ("kex", "key", "enc", "mac"):
        for algorithm in report.get(section, []):
            for level in findings:
                findings[level] += [f"{algorithm['algorithm']}: {note}" for note in algorithm["notes"].get(level, [])]
    return findings


@pytest.fixture
def sshd(tmp_path):
    """OpenSSH's sshd on 127.0.0.1 as Debian sets it up: RSA, ECDSA and Ed25519 host keys, default algorithms."""
    if os.geteuid() != 0 or not Path(SSHD).exists():
        pytest.skip("needs root and openssh-server to run a comparison sshd")
    directory = tmp_path / "sshd"
    directory.mkdir()
    keys = [keygen(directory / f"host_{kind}", kind, bits) for kind, bits in (("rsa", 3072), ("ecdsa", None),
                                                                             ("ed25519", None))]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = directory / "sshd_config"
    config.write_text(f"Port {port}\nListenAddress 127.0.0.1\n" + "".join(f"HostKey {k}\n" for k in keys)
                      + f"PidFile {directory / 'pid'}\nUsePAM no\nStrictModes no\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"sshd did not listen on 127.0.0.1:{port}")
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.skipif(importlib.util.find_spec("ssh_audit") is None,
                    reason="needs ssh-audit (pip install -e '.[test]')")
def test_ssh_audit_finds_no_failure_and_no_more_warnings_than_sshd(make_server, sshd):
    ours = ssh_audit(make_server().port)
    theirs = ssh_audit(sshd)
    print(f"ssh-audit: bastion {len(ours['fail'])} fail, {len(ours['warn'])} warn; "
          f"sshd {len(theirs['fail'])} fail, {len(theirs['warn'])} warn")
    assert ours["fail"] == []
    assert len(ours["warn"]) <= len(theirs["warn"]), (ours["warn"], theirs["warn"])


# ---- item 13: what a user logs in with -------------------------------------------------------------


def test_an_rsa_key_signing_with_sha1_is_refused(make_server):
    server = make_server()

    async def login(signature_algs: list[str]) -> None:
        async with await server.connect(client_keys=[str(server.rsa_key)], signature_algs=signature_algs):
            pass

    asyncio.run(login(["rsa-sha2-256"]))  # the same key with a SHA-2 signature logs in
    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(login(["ssh-rsa"]))  # asyncssh signs with ssh-rsa (SHA-1) when told to


@pytest.mark.parametrize("kind, bits, why", [("dsa", None, "DSA keys are refused"),
                                             ("rsa", 1024, "RSA keys need at least 2048 bits; this one has 1024")])
def test_user_add_refuses_a_weak_key_naming_it(tmp_path, kind, bits, why):
    key = keygen(tmp_path / "weak", kind, bits, "old@laptop")
    fingerprint = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", f"{key}.pub"], capture_output=True,
                                 text=True, timeout=10).stdout.split()[1]
    result = bastion(tmp_path / "home", "user", "add", "bob", "--key", f"{key}.pub")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert fingerprint in result.stderr and "(old@laptop)" in result.stderr and why in result.stderr


# ---- item 7: compression -----------------------------------------------------------------------------


def negotiated_compression(server: Server, tmp_path: Path) -> list[str]:
    """What the OpenSSH client, asking for compression, agrees on (its -vvv 'kex: ... compression:' lines)."""
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{server.port} {server.host_key_line()}\n")
    result = subprocess.run([SSH, "-vvv", "-F", "/dev/null", "-p", str(server.port), "-i", str(server.key),
                             "-o", "Compression=yes", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                             "-o", f"UserKnownHostsFile={known}", "-W", f"127.0.0.2:{server.echo_port}",
                             "alice@127.0.0.1"], input=b"", capture_output=True, timeout=30)
    return [line.rsplit("compression: ", 1)[1].strip() for line in result.stderr.decode().splitlines()
            if line.startswith("debug1: kex: ") and "compression: " in line]


@pytest.mark.skipif(SSH is None, reason="needs the OpenSSH client (openssh-client)")
def test_compression_is_off_unless_turned_on(make_server, tmp_path):
    # both directions (client to server, server to client) stay uncompressed although the client asks
    assert negotiated_compression(make_server(), tmp_path) == ["none", "none"]


class _Ending(asyncssh.SSHClient):
    """Keeps why the connection ended."""

    def __init__(self) -> None:
        self.ended: asyncio.Future = asyncio.get_running_loop().create_future()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(exc)


def test_a_zlib_bomb_ends_its_own_connection_and_no_other(make_server, tmp_path):
    server = make_server(compression=True)
    # with compression on, the OpenSSH client gets it
    if SSH is not None:
        assert negotiated_compression(server, tmp_path) == ["zlib@openssh.com", "zlib@openssh.com"]

    async def scenario() -> None:
        # 1. another user's tunnel to the echo server, working
        async with await server.connect() as other:
            reader, writer = await other.open_connection("127.0.0.2", server.echo_port)

            async def round_trip(data: bytes) -> None:
                writer.write(data)
                assert await asyncio.wait_for(reader.readexactly(len(data)), 10) == data

            await round_trip(b"before")
            # 2. a compressing client: a packet that inflates to 200 KiB (under the 256 KiB limit) is fine...
            attacker, client = await asyncssh.create_connection(
                _Ending, "127.0.0.1", server.port, username="alice", client_keys=[str(server.key)],
                known_hosts=asyncssh.import_known_hosts(f"[127.0.0.1]:{server.port} {server.host_key_line()}\n"),
                compression_algs=["zlib@openssh.com"])
            attacker.send_packet(MSG_IGNORE, String(bytes(200 * 1024)))
            await round_trip(b"after a large packet")
            assert not client.ended.done()
            # 3. ...one that inflates to 64 MiB (64 KiB on the wire) ends that connection with a compression error
            attacker.send_packet(MSG_IGNORE, String(bytes(64 * 1024 * 1024)))
            ended = await asyncio.wait_for(client.ended, 10)
            assert isinstance(ended, asyncssh.CompressionError), ended
            assert "exceeds" in str(ended)
            # 4. the other user's tunnel goes on
            await round_trip(b"after the bomb")

    asyncio.run(scenario())
