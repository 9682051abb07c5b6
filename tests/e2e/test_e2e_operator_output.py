"""Scenario: a client puts newlines and terminal escapes in everything it names (its version string, a user name,
a tunnel's target host), and the operator's views stay honest: the serve log gets no forged line, no escape
sequence reaches the admin's terminal through the audit tables, `audit follow` or `sessions list`, and the JSON
output still holds the exact value the client sent."""

from __future__ import annotations

import json
import re
import shutil

import paramiko
import pytest

from testbed import paramiko_connect

pytestmark = pytest.mark.netns

FORGED = "2026-01-01T00:00:00Z INFO bastion.sshd: [conn=c1 user=root] logged in from 10.0.0.1:1 with SHA256:x"
EVIL_HOST = f"evil\n{FORGED}\x1b[2J\x1b]0;owned\x07\u2028.corp.internal"
EVIL_USER = f"mallory\n{FORGED}\x1b[2J"
EVIL_VERSION = "paramiko\x1b]0;owned\x07\x1b[2J"  # the part after "SSH-2.0-"
LOG_LINE = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")  # service/logs.py


@pytest.fixture
def strict_bastion(make_bastion, bastion_home_template):
    """The standard bastion, but one failed key already ends the login (so the user name reaches a log line)."""
    bastion = make_bastion()
    shutil.copytree(bastion_home_template, bastion.home)
    bastion.set_config(max_auth_tries=1)
    bastion.start()
    return bastion


def assert_shown_safely(text: str, what: str) -> None:
    assert "\x1b" not in text and "\x07" not in text and "\u2028" not in text, f"{what}: a raw control character"
    assert FORGED not in text.replace("\\n" + FORGED, ""), f"{what}: the forged line stands on its own"


def test_client_strings_are_escaped_for_people_and_exact_for_programs(testbed, strict_bastion, keys, monkeypatch):
    bastion = strict_bastion
    # 1. alice logs in with a version string full of escapes and asks for a tunnel to a host that is one
    monkeypatch.setattr(paramiko.Transport, "_CLIENT_ID", EVIL_VERSION)
    client = paramiko_connect(testbed, bastion, "alice", keys["alice"])
    try:
        with pytest.raises(paramiko.ChannelException):
            client.get_transport().open_channel("direct-tcpip", (EVIL_HOST, 22), ("127.0.0.1", 0), timeout=10)
        # `sessions list` while her session is live
        listed = bastion.cli_in_process("sessions", "list")
        assert "alice" in listed
        assert_shown_safely(listed, "sessions list")
    finally:
        client.close()
    # 2. a user name that is a log line of its own: asyncssh's SASLprep refuses control characters in user names
    #    before the bastion sees them (so no row names it); the log must not show it raw either
    with pytest.raises(paramiko.SSHException):
        paramiko_connect(testbed, bastion, EVIL_USER, keys["stranger"]).close()
    bastion.wait_audit("sessions", lambda rows: rows and rows[0]["ended_at"], "alice's session ended")
    bastion.wait_audit("channels", lambda rows: len(rows) == 1, "the refused channel's row")

    # 3. the serve log: every line is one of the server's own, the forged ones appear escaped inside them
    log = bastion.log()
    assert "\\n" + FORGED in log, "the target host is logged, escaped"
    for line in log.splitlines():
        assert line.startswith("-----") or LOG_LINE.match(line), f"a line the server did not write: {line!r}"
    assert_shown_safely(log, "serve log")

    # 4. the tables an admin reads on a terminal: `audit channels` as a real command, its output through a pipe;
    #    the others through the same CLI code in this process (an interpreter start each would add seconds)
    channels = bastion.cli("audit", "channels").stdout.decode()
    assert_shown_safely(channels, "audit channels")
    assert "evil\\n2026-01-01" in channels and "\\x1b[2J\\x1b]0;owned\\x07\\u2028.corp.internal" in channels
    for args in (["audit", "auth"], ["audit", "sessions"], ["audit", "stats"],
                 ["audit", "follow", "--since", "1h", "--limit", "3"]):
        assert_shown_safely(bastion.cli_in_process(*args), " ".join(args))
    [session] = bastion.audit("sessions")
    timeline = bastion.cli_in_process("audit", "show", session["id"])
    assert "paramiko\\x1b]0;owned\\x07\\x1b[2J" in timeline
    assert_shown_safely(timeline, "audit show")

    # 5. programs get the exact values, JSON-escaped: the JSON text itself holds nothing raw either
    raw_json = bastion.cli_in_process("audit", "channels", "--json")
    assert all(line.isprintable() for line in raw_json.split("\n")) and "\\u2028" in raw_json
    assert [row["target_host"] for row in json.loads(raw_json)] == [EVIL_HOST]
    assert session["client_version"] == f"SSH-2.0-{EVIL_VERSION}"
    followed = bastion.cli_in_process("audit", "follow", "--since", "1h", "--table", "channels", "--limit", "1",
                                      "--jsonl")
    assert json.loads(followed)["row"]["target_host"] == EVIL_HOST
