"""Scenarios: PuTTY's plink through the bastion: `-nc`, `-L`, and plink as OpenSSH's ProxyCommand (issue #18).

The bastion negotiates only OpenSSH-9.x-grade algorithms (bastion/transport/algorithms.py). PuTTY is the client that
Windows users bring, with its own algorithm preferences, its own key format (.ppk, made here by puttygen from
alice's OpenSSH key) and its own host-key store. Its store is not used: `-hostkey` pins the bastion's Ed25519
key, so plink negotiates that key and checks it, and `-batch` turns any prompt into a failure.
`plink -nc HOST:PORT` is also what PuTTY's own "SSH proxy" does, so the jump scenario below stands for it.
"""

from __future__ import annotations

import shlex
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from testbed import ECHO_PORT, LAN_ADDR, SSH_KEYGEN, SSH_PORT, Key, Testbed, clean_env, deterministic_bytes, \
    free_port, kill_group, recv_all, run, stop_process, wait_listening

PLINK = shutil.which("plink")
PUTTYGEN = shutil.which("puttygen")

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(PLINK is None or PUTTYGEN is None,
                       reason="needs PuTTY's plink and puttygen (Debian putty-tools)"),
]


class Plink:
    """plink in gw as alice, with its own HOME (PuTTY's ~/.putty), her key as a .ppk, the bastion's key pinned."""

    def __init__(self, testbed: Testbed, bastion, alice: Key, workdir: Path) -> None:
        self.testbed = testbed
        self.bastion = bastion
        self.home = workdir / "puttyhome"
        self.home.mkdir(parents=True)
        self.key = self.home / "alice.ppk"
        run([PUTTYGEN, alice.path, "-O", "private", "-o", self.key], env=self.env(), check=True, timeout=10)
        listing = run([SSH_KEYGEN, "-l", "-E", "sha256", "-f", bastion.home / "ssh_host_ed25519_key.pub"],
                      check=True, timeout=10)
        self.host_key = listing.stdout.decode().split()[1]  # "SHA256:..."

    def env(self) -> dict[str, str]:
        return clean_env({"HOME": str(self.home)})

    def argv(self, *args: str) -> list[str]:
        """plink's command line without the namespace: -batch (no prompts), the pinned host key, alice's .ppk,
        no agent and no connection sharing, stdout passed through byte for byte."""
        return [PLINK, "-batch", "-ssh", "-hostkey", self.host_key, "-i", str(self.key), "-noagent", "-noshare",
                "-no-sanitise-stdout", "-l", "alice", "-P", str(self.bastion.port), *args]

    def run(self, *args: str, input: bytes | None = None, timeout: float = 15.0) -> subprocess.CompletedProcess[bytes]:
        return self.testbed.run(self.testbed.gw, self.argv(*args), input=input, timeout=timeout, env=self.env())


@pytest.fixture
def plink(testbed, bastion, keys, tmp_path) -> Plink:
    return Plink(testbed, bastion, keys["alice"], tmp_path)


def test_netcat_mode_to_echo_is_audited_as_a_putty_session(bastion, plink):
    # 1. plink -nc: stdin and stdout are one direct-tcpip channel to the echo target
    message = deterministic_bytes(256 * 1024, b"plink -nc")
    result = plink.run("-nc", f"{LAN_ADDR}:{ECHO_PORT}", bastion.host, input=message)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == message

    # 2. audited as a PuTTY session with one allowed channel to the echo target
    sessions = bastion.wait_audit("sessions", lambda rows: rows and all(r["ended_at"] for r in rows), "session end")
    assert [s["client_version"].split("_")[0] for s in sessions] == ["SSH-2.0-PuTTY"], sessions
    channels = bastion.wait_audit("channels", lambda rows: rows and all(r["closed_at"] for r in rows), "channel")
    assert [(c["target_host"], c["target_port"], c["decision"]) for c in channels] == [(LAN_ADDR, ECHO_PORT, "allow")]


def test_local_forward_to_echo(testbed, bastion, plink):
    port = free_port(testbed.gw)
    proc = testbed.popen(testbed.gw, plink.argv("-N", "-L", f"127.0.0.1:{port}:{LAN_ADDR}:{ECHO_PORT}", bastion.host),
                         env=plink.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_listening(proc, port, "plink -L")
        with testbed.connect(testbed.gw, ("127.0.0.1", port)) as sock:
            message = deterministic_bytes(256 * 1024, b"plink -L")
            sock.sendall(message)
            sock.shutdown(socket.SHUT_WR)
            assert recv_all(sock) == message
    finally:
        kill_group(proc)
        stop_process(proc)


def test_plink_as_proxy_command_jumps_to_the_target_sshd(bastion, plink, ssh):
    # 1. OpenSSH reaches the target's sshd through `plink -nc %h:%p`, the hop PuTTY's own SSH proxy makes;
    #    the target's host key is checked by ssh (known_hosts in its config), the bastion's by plink (-hostkey)
    proxy = shlex.join(plink.argv("-nc", "%h:%p", bastion.host))
    result = ssh.run("-o", f"ProxyCommand={proxy}", "target", "echo hello from the target", env=plink.env())
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout == b"hello from the target\n"

    # 2. the bastion saw a PuTTY session and one allowed channel to the target's sshd
    sessions = bastion.wait_audit("sessions", lambda rows: rows and all(r["ended_at"] for r in rows), "session end")
    assert [s["client_version"].split("_")[0] for s in sessions] == ["SSH-2.0-PuTTY"], sessions
    channels = bastion.wait_audit("channels", lambda rows: rows and all(r["closed_at"] for r in rows), "channel")
    assert [(c["target_host"], c["target_port"], c["decision"]) for c in channels] == [(LAN_ADDR, SSH_PORT, "allow")]
