"""Scenario: an operator sets a bastion up from nothing with the CLI, and alice jumps through it."""

from __future__ import annotations

import json
import stat

import pytest

from testbed import DEFAULT_POLICY, ECHO_PORT, LAN_ADDR, SshClient

pytestmark = pytest.mark.netns


def test_from_scratch_init_user_policy_serve_and_tunnel(testbed, make_bastion, keys, tmp_path):
    bastion = make_bastion("fresh")

    # 1. init writes the config, private host keys and the database
    bastion.init(connect_timeout=2)
    for key in bastion.home.glob("ssh_host_*_key"):
        assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
    assert (bastion.home / "bastion.db").exists()
    assert bastion.host_public_keys(), "init wrote no *host*key*.pub files to pin"

    # 2. a user with her key, listed as JSON
    bastion.add_user("alice", keys["alice"])
    users = json.loads(bastion.cli("user", "list", "--json").stdout)
    assert [u["name"] if isinstance(u, dict) and "name" in u else u for u in users] == ["alice"], users

    # 3. the policy, applied and checked by name
    bastion.apply_policy(DEFAULT_POLICY)
    assert bastion.policy_check("alice", "db.corp.internal", ECHO_PORT).returncode == 0
    assert bastion.policy_check("alice", "meta.evil.test", 80).returncode == 1  # granted name, metadata address

    # 4. serve, and a tunnel through it
    bastion.start()
    ssh = SshClient(testbed, bastion, tmp_path / "client", keys["alice"])
    result = ssh.stdio_forward(LAN_ADDR, ECHO_PORT, input=b"from scratch\n")
    assert (result.returncode, result.stdout) == (0, b"from scratch\n"), result.stderr.decode(errors="replace")

    # 5. the operator's `audit --json` (a real process) and the in-process reading agree
    bastion.wait_audit("channels", lambda rows: rows and rows[0]["closed_at"], "channel closed")
    operator_view = bastion.audit("channels", user="alice", since="1h", in_process=False)
    assert operator_view == bastion.audit("channels", user="alice", since="1h")
    assert [(r["user"], r["target_port"]) for r in operator_view] == [("alice", ECHO_PORT)]
