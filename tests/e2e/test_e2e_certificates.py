"""Scenarios (#21): a user with an OpenSSH certificate from a trusted CA, and no key in the store, jumps through the
bastion to the real target sshd with `ssh -J`; the CA's removal ends the live jump."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from testbed import DEFAULT_POLICY, ECHO_PORT, LAN_ADDR, SSH_KEYGEN, SshClient, generate_key, kill_group, stop_process

pytestmark = pytest.mark.netns


def certificate_client(testbed, bastion, tmp_path: Path, serial: int) -> tuple[SshClient, str, str]:
    """A CA trusted by the bastion's policy, and the OpenSSH client as alice with a key it never saw, certified by
    that CA (`ssh-keygen -s`, the -cert.pub beside the key, where the client finds it). Returns the client, the
    certified key's fingerprint and the CA's."""
    ca = generate_key(tmp_path / "ca", "ca@corp")
    key = generate_key(tmp_path / "laptop" / "id_ed25519", "alice@laptop")
    subprocess.run([SSH_KEYGEN, "-q", "-s", str(ca.path), "-I", "alice@corp", "-z", str(serial), "-n", "alice",
                    "-V", "-5m:+1h", str(key.pub_path)], check=True, timeout=10)
    assert (tmp_path / "laptop" / "id_ed25519-cert.pub").exists()
    bastion.apply_policy(DEFAULT_POLICY + f'\n[cas.corp]\nkey = "{ca.public}"\n')
    return SshClient(testbed, bastion, tmp_path / "client", key), key.fingerprint, ca.fingerprint


def test_proxyjump_with_a_certificate_and_no_stored_key(testbed, bastion, tmp_path):
    # 1. ssh -J alice@bastion target, alice offering only her certificate
    ssh, key_fingerprint, ca_fingerprint = certificate_client(testbed, bastion, tmp_path, serial=5)
    result = ssh.run("-J", "alice@bastion", "target", "echo hello from the target")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"hello from the target\n"

    # 2. the login is audited with the certificate's key id, serial and CA, and the certified key's fingerprint
    auth = bastion.wait_audit("auth", lambda rows: any(r["result"] == "success" for r in rows), "auth success")
    [success] = [r for r in auth if r["result"] == "success"]
    assert success["reason"] == f"certificate accepted: key id alice@corp serial 5 CA {ca_fingerprint}"
    assert success["key_fingerprint"] == key_fingerprint

    # 3. the session and its channel to the target's sshd, as for a key
    sessions = bastion.wait_audit("sessions", lambda rows: rows and all(r["ended_at"] for r in rows), "session end")
    assert [s["key_fingerprint"] for s in sessions] == [key_fingerprint]
    channels = bastion.wait_audit("channels", lambda rows: rows and all(r["closed_at"] for r in rows), "channel")
    assert [(c["decision"], c["target_ip"]) for c in channels] == [("allow", LAN_ADDR)]


def test_a_live_certificate_session_ends_when_its_ca_is_removed(testbed, bastion, tmp_path):
    # 1. a tunnel held open by a certificate login
    ssh, _, _ = certificate_client(testbed, bastion, tmp_path, serial=6)
    proc = ssh.popen("-W", f"{LAN_ADDR}:{ECHO_PORT}", "bastion", stdin=subprocess.PIPE)
    try:
        proc.stdin.write(b"hello\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == b"hello\n"
        # 2. the policy without the CA: the session ends within seconds, with the reason in its row
        bastion.apply_policy(DEFAULT_POLICY)
        proc.wait(timeout=5)
    finally:
        stop_process(proc)
        kill_group(proc)
    rows = bastion.wait_audit("sessions", lambda rows: rows and rows[-1]["ended_at"], "session ended")
    assert rows[-1]["end_reason"] == "certificate authority no longer trusted"
