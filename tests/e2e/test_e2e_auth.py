"""Scenarios: who gets in. Keys only; an unknown user and an unknown key look the same to the client."""

from __future__ import annotations

import re

import paramiko
import pytest

from testbed import SshClient, paramiko_connect

pytestmark = pytest.mark.netns


def permission_denied(stderr: bytes) -> str:
    """The client's final error with the `user@host: ` prefix removed, so two users' errors compare equal."""
    text = stderr.decode(errors="replace").strip().splitlines()[-1]
    return re.sub(r"^\S+@\S+: ", "", text)


def test_unknown_user_and_unknown_key_fail_alike_and_are_audited(testbed, bastion, keys, tmp_path):
    alice = SshClient(testbed, bastion, tmp_path / "alice", keys["alice"])
    stranger = SshClient(testbed, bastion, tmp_path / "stranger", keys["stranger"])

    # 1. bob is not a user (presenting alice's key); alice presents a key the bastion has never seen
    unknown_user = alice.run("-l", "bob", "bastion", "true")
    unknown_key = stranger.run("bastion", "true")

    # 2. the same failure, and nothing to tell the two apart
    assert unknown_user.returncode == unknown_key.returncode == 255
    assert permission_denied(unknown_user.stderr) == permission_denied(unknown_key.stderr) \
        == "Permission denied (publickey)."

    # 3. both audited as failures, with the fingerprint of the key that was offered
    def both_failures(rows):
        return {("bob", keys["alice"].fingerprint), ("alice", keys["stranger"].fingerprint)} <= {
            (r["user"], r["key_fingerprint"]) for r in rows if r["result"] == "failure"}

    rows = bastion.wait_audit("auth", both_failures, "auth failures for bob and for alice's unknown key")
    assert not [r for r in rows if r["result"] == "success"], rows
    for row in rows:
        if row["key_fingerprint"]:
            assert row["method"] == "publickey", row
            assert row["reason"], row


def test_password_is_never_offered(testbed, bastion, ssh, keys):
    # 1. the OpenSSH client, asking for password only, is told the server offers publickey only
    result = ssh.run("-o", "PreferredAuthentications=password", "-o", "PubkeyAuthentication=no", "bastion", "true")
    assert result.returncode == 255
    assert permission_denied(result.stderr) == "Permission denied (publickey)."

    # 2. paramiko's "none" probe lists the methods the server would accept
    sock = testbed.connect(testbed.gw, (bastion.host, bastion.port))
    transport = paramiko.Transport(sock)
    try:
        transport.start_client(timeout=10)
        with pytest.raises(paramiko.BadAuthenticationType) as raised:
            transport.auth_none("alice")
        assert raised.value.allowed_types == ["publickey"]
    finally:
        transport.close()


def test_registered_key_gets_in_with_paramiko(testbed, bastion, keys):
    client = paramiko_connect(testbed, bastion, "alice", keys["alice"])
    try:
        assert client.get_transport().is_authenticated()
    finally:
        client.close()
    rows = bastion.wait_audit("auth", lambda rows: any(r["result"] == "success" for r in rows), "auth success")
    assert [r["key_fingerprint"] for r in rows if r["result"] == "success"] == [keys["alice"].fingerprint]
