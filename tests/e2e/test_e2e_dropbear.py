"""Scenarios: dropbear's dbclient through the bastion: multihop (`-J` style), `-B` and `-L` (issue #18, item 14).

dbclient sends a guessed first key-exchange packet for curve25519-sha256; the bastion prefers
mlkem768x25519-sha256, so by RFC 4253 §7 the guess is wrong, dbclient sends the packet again, and the
bastion must have ignored the guess (bastion/transport/kex_guess.py). Before that, every dbclient connect ended with
"Disconnect received". Host keys are checked: dbclient reads the known_hosts of the HOME it is given.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from testbed import ECHO_PORT, LAN_ADDR, Key, Testbed, clean_env, free_port, kill_group, recv_all, stop_process, \
    wait_listening

DBCLIENT = shutil.which("dbclient")
DROPBEARCONVERT = shutil.which("dropbearconvert") or "/usr/lib/dropbear/dropbearconvert"

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(DBCLIENT is None or not Path(DROPBEARCONVERT).exists(),
                       reason="needs dropbear's dbclient and dropbearconvert (Debian dropbear-bin)"),
]


class Dbclient:
    """dbclient in gw with its own HOME: the keys in dropbear's format, known_hosts pinning bastion and target."""

    def __init__(self, testbed: Testbed, bastion, alice: Key, workdir: Path) -> None:
        self.testbed = testbed
        self.bastion = bastion
        self.home = workdir / "dbhome"
        (self.home / ".ssh").mkdir(parents=True)
        self.alice = self._convert(alice.path, "alice")
        assert testbed.target_client_key is not None and testbed.target_host_key is not None
        self.target_identity = self._convert(testbed.target_client_key.path, "target")
        entries = [f"{bastion.host} {' '.join(line.split()[:2])}" for line in bastion.host_public_keys()]
        entries.append(f"{LAN_ADDR} {' '.join(testbed.target_host_key.public.split()[:2])}")
        (self.home / ".ssh" / "known_hosts").write_text("\n".join(entries) + "\n")

    def _convert(self, openssh_key: Path, name: str) -> Path:
        path = self.home / f"{name}.dropbear"
        subprocess.run([DROPBEARCONVERT, "openssh", "dropbear", openssh_key, path], check=True,
                       capture_output=True, timeout=10)
        return path

    def argv(self, *args: str) -> list[str]:
        # -o BatchMode... dbclient has no such option: without a tty it cannot prompt, and an unknown host key
        # is then a failure (no -y), which is what we want.
        return self.testbed.argv(self.testbed.gw, [DBCLIENT, *args])

    def env(self) -> dict[str, str]:
        return clean_env({"HOME": str(self.home)})

    def run(self, *args: str, input: bytes | None = None, timeout: float = 15.0) -> subprocess.CompletedProcess[bytes]:
        return self.testbed.run(self.testbed.gw, [DBCLIENT, *args], input=input, timeout=timeout, env=self.env())


@pytest.fixture
def dbclient(testbed, bastion, keys, tmp_path) -> Dbclient:
    return Dbclient(testbed, bastion, keys["alice"], tmp_path)


def test_multihop_through_the_bastion_runs_a_command_on_the_target(bastion, dbclient):
    # 1. dbclient alice@bastion,root@target: the outer hop is a -B forward through the bastion
    result = dbclient.run("-i", str(dbclient.alice), "-i", str(dbclient.target_identity),
                          f"alice@{bastion.host},root@{LAN_ADDR}", "echo hello from the target")
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == b"hello from the target\n"

    # 2. audited as a dropbear session with one allowed channel to the target's sshd
    sessions = bastion.wait_audit("sessions", lambda rows: rows and all(r["ended_at"] for r in rows), "session end")
    assert [s["client_version"].split("_")[0] for s in sessions] == ["SSH-2.0-dropbear"], sessions
    channels = bastion.wait_audit("channels", lambda rows: rows and all(r["closed_at"] for r in rows), "channel")
    assert [(c["target_host"], c["target_port"], c["decision"]) for c in channels] == [(LAN_ADDR, 22, "allow")]


def test_netcat_forward_to_echo(bastion, dbclient):
    message = b"through dropbear's -B\n" * 2000
    result = dbclient.run("-i", str(dbclient.alice), "-B", f"{LAN_ADDR}:{ECHO_PORT}", f"alice@{bastion.host}",
                          input=message)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == message


def test_local_forward_to_echo(testbed, bastion, dbclient):
    port = free_port(testbed.gw)
    proc = testbed.popen(testbed.gw, [DBCLIENT, "-i", str(dbclient.alice), "-N", "-L",
                                      f"127.0.0.1:{port}:{LAN_ADDR}:{ECHO_PORT}", f"alice@{bastion.host}"],
                         env=dbclient.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_listening(proc, port, "dbclient -L")
        with testbed.connect(testbed.gw, ("127.0.0.1", port)) as sock:
            message = b"through dropbear's -L\n" * 2000
            sock.sendall(message)
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == message
    finally:
        kill_group(proc)
        stop_process(proc)
