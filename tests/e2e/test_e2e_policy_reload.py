"""Scenarios: policy changes reach the running server at the next channel open; broken files change nothing."""

from __future__ import annotations

import pytest

from testbed import ECHO_PORT, HTTP_PORT, LAN_ADDR

pytestmark = pytest.mark.netns

NARROWER = f"""\
[users.alice]
allow = ["{LAN_ADDR}:{HTTP_PORT}"]
"""

BROKEN = """\
[users.alice]
allow = ["10.99.0.2:7"
deny = [
"""

INVALID = """\
[users.alice]
allow = ["10.99.0.2:not-a-port"]
"""


def test_narrower_policy_applies_to_the_next_channel_without_restart(bastion, ssh):
    # 1. granted now
    before = ssh.stdio_forward(LAN_ADDR, ECHO_PORT, input=b"before\n")
    assert (before.returncode, before.stdout) == (0, b"before\n"), before.stderr.decode(errors="replace")

    # 2. apply a policy without that grant while the server runs
    bastion.apply_policy(NARROWER)
    assert bastion.policy_check("alice", LAN_ADDR, ECHO_PORT).returncode == 1

    # 3. the next channel is refused by the same, still running, server
    after = ssh.stdio_forward(LAN_ADDR, ECHO_PORT, input=b"after\n")
    assert after.returncode != 0
    assert "administratively prohibited" in after.stderr.decode(errors="replace"), after.stderr
    assert bastion.proc.poll() is None

    rows = bastion.wait_audit("channels", lambda rows: len(rows) == 2, "two channel rows")
    assert [r["decision"] for r in sorted(rows, key=lambda r: r["id"])] == ["allow", "deny"], rows


@pytest.mark.parametrize("text", [BROKEN, INVALID], ids=["toml-syntax", "bad-rule"])
def test_broken_policy_is_rejected_and_the_previous_one_stays(bastion, ssh, text):
    # 1. the apply fails and says where
    result = bastion.apply_policy(text, check=False)
    assert result.returncode != 0
    assert (result.stderr + result.stdout).strip(), "a rejected policy must say why"

    # 2. the previous policy is still in force, for `policy check` and for the running server
    assert bastion.policy_check("alice", LAN_ADDR, ECHO_PORT).returncode == 0
    forwarded = ssh.stdio_forward(LAN_ADDR, ECHO_PORT, input=b"still granted\n")
    assert (forwarded.returncode, forwarded.stdout) == (0, b"still granted\n"), forwarded.stderr
