"""Scenarios (#21): certificates through the real jump, `ssh -J` to the target's real sshd in the testbed.
1. `bastion ca init` while the bastion runs, `bastion ca sign alice`: alice jumps with the certificate beside a key
   the bastion never saw, no restart and no policy file naming the CA.
2. principals_as_groups: `ssh-keygen -s -n bob,ops` for bob, whom the policy does not know, jumps through what the
   group ops may reach (its CA says require_known_user = false)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from testbed import DEFAULT_POLICY, LAN_ADDR, SSH_KEYGEN, SshClient, generate_key

pytestmark = pytest.mark.netns


def test_proxyjump_with_a_certificate_from_bastion_ca_sign(testbed, bastion, tmp_path):
    made = bastion.cli("ca", "init")
    fingerprint = made.stdout.decode().splitlines()[1].split()[1]
    key = generate_key(tmp_path / "laptop" / "id_ed25519", "alice@laptop")
    bastion.cli("ca", "sign", "alice", "--key", key.pub_path, "--valid", "1h",
                "-o", tmp_path / "laptop" / "id_ed25519-cert.pub")
    ssh = SshClient(testbed, bastion, tmp_path / "client", key)
    result = ssh.run("-J", "alice@bastion", "target", "echo hello from the target")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"hello from the target\n"
    auth = bastion.wait_audit("auth", lambda rows: any(r["result"] == "success" for r in rows), "auth success")
    [success] = [r for r in auth if r["result"] == "success"]
    assert success["reason"] == f"certificate accepted: key id alice@bastion serial 1 CA {fingerprint}"
    assert success["key_fingerprint"] == key.fingerprint


def test_proxyjump_through_a_group_named_by_a_certificate_principal(testbed, bastion, tmp_path: Path):
    ca = generate_key(tmp_path / "ca", "ca@corp")
    key = generate_key(tmp_path / "laptop" / "id_ed25519", "bob@laptop")
    subprocess.run([SSH_KEYGEN, "-q", "-s", str(ca.path), "-I", "bob@corp", "-z", "3", "-n", "bob,ops",
                    "-V", "-5m:+1h", str(key.pub_path)], check=True, timeout=10)
    bastion.apply_policy(DEFAULT_POLICY + f'\n[cas.corp]\nkey = "{ca.public}"\nprincipals_as_groups = true\n'
                         "require_known_user = false\n")
    ssh = SshClient(testbed, bastion, tmp_path / "client", key, user="bob")
    result = ssh.run("-J", "bob@bastion", "target", "echo hello from the target")
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout == b"hello from the target\n"
    channels = bastion.wait_audit("channels", lambda rows: rows and all(r["closed_at"] for r in rows), "channel")
    assert [(c["user"], c["decision"], c["target_ip"], c["rule"]) for c in channels] == \
        [("bob", "allow", LAN_ADDR, "groups.ops.allow via certificate: 10.99.0.0/24:22")]
