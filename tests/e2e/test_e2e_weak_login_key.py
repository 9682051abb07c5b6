"""A weak user key already in the store (added before keys were checked, or written by hand) does not log in
(issue #18, item 13): the refusal is audited with a one-line reason naming what is wrong with the key."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess

import asyncssh
import pytest

from testbed import SSH_KEYGEN

pytestmark = pytest.mark.netns


def test_stored_1024_bit_rsa_key_is_refused_at_login(testbed, bastion, tmp_path):
    path = tmp_path / "weak_rsa"
    subprocess.run([SSH_KEYGEN, "-q", "-t", "rsa", "-b", "1024", "-N", "", "-C", "weak@test", "-f", path],
                   check=True, timeout=30)
    kind, blob = (tmp_path / "weak_rsa.pub").read_text().split()[:2]
    fingerprint = subprocess.run([SSH_KEYGEN, "-l", "-E", "sha256", "-f", f"{path}.pub"], capture_output=True,
                                 check=True, timeout=10).stdout.decode().split()[1]
    with sqlite3.connect(bastion.home / "bastion.db") as db:  # as an older version would have stored it
        db.execute("INSERT INTO user_keys (user, fingerprint, key_type, public_key, comment, added_at) "
                   "VALUES ('alice', ?, ?, ?, 'weak@test', '2026-01-01T00:00:00Z')",
                   [fingerprint, kind, f"{kind} {blob}"])

    async def login() -> None:
        sock = testbed.connect(testbed.gw, (bastion.host, bastion.port), 10)
        async with asyncssh.connect(sock=sock, host=bastion.host, username="alice", client_keys=[str(path)],
                                    agent_path=None, known_hosts=None):
            pass

    with pytest.raises(asyncssh.PermissionDenied):
        asyncio.run(login())
    rows = bastion.wait_audit("auth", lambda rows: any("2048" in r["reason"] for r in rows), "the refusal")
    refusal = next(r for r in rows if "2048" in r["reason"])
    assert refusal["result"] == "failure" and refusal["key_fingerprint"] == fingerprint
    assert "1024" in refusal["reason"] and "\n" not in refusal["reason"]
    assert bastion.audit("sessions") == []
