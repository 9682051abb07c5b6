"""Scenario: a grant whose name pattern would make a backtracking matcher run for minutes is decided at
once, both ways, and the bastion keeps serving meanwhile.

The names live in the gateway namespace's hosts file (the testbed's `/etc/netns/<gw>/hosts`, which
`ip netns exec` mounts over `/etc/hosts` for the bastion); the test adds two lines and puts the file back.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed import ECHO_PORT, LAN_ADDR, SSH_PORT

pytestmark = pytest.mark.netns

PATTERN = "*a" * 9 + ".corp.test"  # from the report: over 60 s per decision with the old matcher
NEAR_MISS = "a" * 62 + "b.corp.test"  # one label of 63 letters that fails only at its end
MATCH = "a" * 61 + "ba.corp.test"
POLICY = f"""\
[users.alice]
allow = ["{PATTERN}:{SSH_PORT}", "{LAN_ADDR}:{ECHO_PORT}"]
"""


@contextlib.contextmanager
def hosts_lines(testbed, *lines: str) -> Iterator[None]:
    hosts = Path("/etc/netns") / testbed.gw / "hosts"
    before = hosts.read_text()
    # written in place: the bastion's /etc/hosts is a bind mount of this very file
    hosts.write_text(before + "".join(f"{line}\n" for line in lines))
    try:
        yield
    finally:
        hosts.write_text(before)


def test_pathological_name_pattern_is_decided_at_once(testbed, bastion, ssh):
    bastion.apply_policy(POLICY)
    with hosts_lines(testbed, f"{LAN_ADDR} {NEAR_MISS}", f"{LAN_ADDR} {MATCH}"):
        # 1. the near miss is refused by the policy, long before the client gives up (a backtracking
        #    matcher would hold the event loop for minutes: the client times out and the test fails)
        refused = ssh.stdio_forward(NEAR_MISS, SSH_PORT, timeout=20)
        assert refused.returncode != 0
        assert f"alice may not reach {NEAR_MISS}:{SSH_PORT}" in refused.stderr.decode(errors="replace")

        # 2. a name the pattern does match reaches the target's sshd through the same grant
        granted = ssh.stdio_forward(MATCH, SSH_PORT, timeout=20)
        assert granted.stdout.startswith(b"SSH-2.0-"), granted.stderr

    # 3. the bastion still serves everyone else
    echoed = ssh.stdio_forward(LAN_ADDR, ECHO_PORT, input=b"still here\n", timeout=20)
    assert echoed.stdout == b"still here\n", echoed.stderr

    # 4. both decisions audited with their rule or reason
    rows = bastion.wait_audit("channels", lambda rows: len(rows) == 3, "three channel rows")
    by_host = {row["target_host"]: row for row in rows}
    assert by_host[NEAR_MISS]["decision"] == "deny", by_host[NEAR_MISS]
    assert by_host[MATCH]["decision"] == "allow", by_host[MATCH]
    assert by_host[MATCH]["rule"] == f"users.alice.allow: {PATTERN}:{SSH_PORT}", by_host[MATCH]
